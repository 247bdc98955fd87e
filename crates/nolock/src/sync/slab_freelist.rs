//! `SlabFreelist`: the state word of one slab, changed only by single 64-bit CAS.
//!
//! SLUB keeps a slab's free list and its counters in two adjacent words and changes them together with
//! `cmpxchg_double`; architectures without it cannot run `kmalloc_nolock` at all. nolock does not need a double
//! word: a slab holds at most 65 535 objects of one size at fixed offsets, so its free-list head fits in a 16-bit
//! *index*, and head, in-use count, flags and an ABA tag share one `u64`:
//!
//! ```text
//!  63                       36 35   32 31          16 15            0
//! +---------------------------+-------+--------------+---------------+
//! |            tag            | flags |     used     | head index + 1|
//! +---------------------------+-------+--------------+---------------+
//! ```
//!
//! Free objects are linked through a pointer-sized link word inside each object (at the cache's free-pointer
//! offset), stored through a [`LinkCodec`] (plain, or encoded in hardened caches). `used` counts objects that are
//! not on this list: handed to users or sitting in some thread's cache. Every successful change moves the tag
//! (28 bits), so a CAS prepared from an old snapshot fails even if head, count and flags came back to the same
//! values meanwhile.
//!
//! Operations and who may call them:
//! - [`push_chain`](SlabFreelist::push_chain): anyone, any context (frees, flushes of thread caches). Prepending
//!   never reads another free object's link.
//! - [`take_all`](SlabFreelist::take_all) and [`pop_one`](SlabFreelist::pop_one): the holder of the slab's
//!   *take right*, i.e. whoever popped the slab off its cache's partial list (or created it); they also keep the
//!   listing protocol below.
//! - [`steal_all`](SlabFreelist::steal_all) and [`pop_any`](SlabFreelist::pop_any): anyone who can name the slab,
//!   even while another context holds its take right; they take objects and leave the flags alone. The tag is
//!   what makes a pop by a non-holder safe: the link it read from the head object is stale exactly when the
//!   word changed, and then its CAS fails. (The out-of-memory rescue uses them on a slab a shrink holds.)
//!
//! Listing protocol: `LISTED` is set exactly while the slab is on (or being put back on, or held off by the
//! holder of its take right) one of its cache's partial lists. `take_all` clears it; a holder's `pop_one` that
//! finds or leaves the list empty clears it; the first push onto an unlisted slab sets it in the same CAS and
//! reports `listed_now`, and that pusher must put the slab on a partial list. So a slab with free objects is
//! always findable, and is never on a list twice. A listed slab may have no free object (a non-holder took
//! them); the next holder unlists it. `DEAD` marks a slab whose pages were given back; a push to it is refused.
//!
//! Ordering: pushes publish object contents and links with `Release`; takes and pops acquire them (`Acquire`).

use super::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The slab is on its cache's partial list (or its lister is about to put it there).
pub const LISTED: u16 = 1;
/// The slab's pages were released: it must never be touched again.
pub const DEAD: u16 = 2;

const HEAD_MASK: u64 = 0xffff;
const USED_SHIFT: u32 = 16;
const FLAGS_SHIFT: u32 = 32;
const FLAGS_MASK: u64 = 0xf;
const TAG_SHIFT: u32 = 36;

/// How link words are stored: plain addresses, or (hardened caches) encoded like Linux's
/// `SLAB_FREELIST_HARDENED`: `value ^ key ^ bswap(address of the link word)`, with a random per-cache key. A
/// write-after-free that scribbles on a free object's link word then decodes to an address that is almost never
/// an object of the slab, which the pop checks; and a leaked link word reveals neither the key nor a pointer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCodec {
    key: usize,
}

impl LinkCodec {
    /// Links are plain addresses.
    pub const PLAIN: LinkCodec = LinkCodec { key: 0 };

    /// Encoded links with `key` (0 means plain).
    #[inline(always)]
    pub const fn new(key: usize) -> Self {
        Self { key }
    }

    /// Whether links are encoded.
    #[inline(always)]
    pub fn is_hardened(self) -> bool {
        self.key != 0
    }

    /// The word to store at `link_addr` for the link value `v` (an object address or 0).
    #[inline(always)]
    pub fn encode(self, link_addr: usize, v: usize) -> usize {
        if self.key == 0 { v } else { v ^ self.key ^ link_addr.swap_bytes() }
    }

    /// The link value stored as `stored` at `link_addr`.
    #[inline(always)]
    pub fn decode(self, link_addr: usize, stored: usize) -> usize {
        self.encode(link_addr, stored)
    }
}

/// Where a slab's objects are.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Address of object 0.
    pub base: usize,
    /// Distance between objects.
    pub stride: usize,
    /// Offset of the link word inside a free object (pointer aligned).
    pub link_off: usize,
    /// Number of objects in the slab.
    pub capacity: u16,
}

impl Geometry {
    /// Address of object `idx`.
    #[inline(always)]
    pub fn obj(&self, idx: u32) -> usize {
        self.base + idx as usize * self.stride
    }

    /// The index of the object at `addr`, if `addr` is exactly an object of this slab.
    #[inline]
    pub fn index_of(&self, addr: usize) -> Option<u32> {
        let rel = addr.wrapping_sub(self.base);
        (rel.is_multiple_of(self.stride) && rel / self.stride < usize::from(self.capacity))
            .then_some((rel / self.stride) as u32)
    }

    /// The link word of the free object at `obj`.
    ///
    /// # Safety
    /// `obj` must be an object of this slab that the caller may treat as free (on a free list it controls, or
    /// one it is about to push), and the slab's memory must stay mapped for `'a`.
    #[inline(always)]
    pub unsafe fn link<'a>(&self, obj: usize) -> &'a AtomicUsize {
        // SAFETY: `obj + link_off` is inside the object and pointer-aligned (the cache guarantees both); the memory
        // stays mapped (caller). Free objects' link words are only ever accessed atomically.
        unsafe { &*((obj + self.link_off) as *const AtomicUsize) }
    }

    /// The decoded successor of the free object `obj` (0 at the end of a list).
    ///
    /// # Safety
    /// As [`link`](Self::link).
    #[inline(always)]
    pub unsafe fn next_of(&self, codec: LinkCodec, obj: usize) -> usize {
        // SAFETY: forwarded.
        let stored = unsafe { self.link(obj) }.load(Ordering::Relaxed);
        codec.decode(obj + self.link_off, stored)
    }
}

/// A decoded state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State(pub u64);

impl State {
    /// Build a state word (tag 0). `head_enc` is at most 65 535.
    #[inline(always)]
    pub fn new(head_enc: u32, used: u16, flags: u16) -> Self {
        debug_assert!(u64::from(head_enc) <= HEAD_MASK && u64::from(flags) <= FLAGS_MASK);
        Self(
            (u64::from(head_enc) & HEAD_MASK)
                | (u64::from(used) << USED_SHIFT)
                | ((u64::from(flags) & FLAGS_MASK) << FLAGS_SHIFT),
        )
    }
    /// Head index + 1, or 0 when the list is empty.
    #[inline(always)]
    pub fn head_enc(self) -> u32 {
        (self.0 & HEAD_MASK) as u32
    }
    /// Objects not on the free list.
    #[inline(always)]
    pub fn used(self) -> u16 {
        (self.0 >> USED_SHIFT) as u16
    }
    /// `LISTED` / `DEAD`.
    #[inline(always)]
    pub fn flags(self) -> u16 {
        ((self.0 >> FLAGS_SHIFT) & FLAGS_MASK) as u16
    }
    /// The ABA tag.
    #[inline(always)]
    pub fn tag(self) -> u32 {
        (self.0 >> TAG_SHIFT) as u32
    }
    /// `next` with this word's tag advanced by one: the word a CAS from `self` installs.
    #[inline(always)]
    fn succeeded_by(self, next: State) -> State {
        let tag = (self.0 >> TAG_SHIFT).wrapping_add(1);
        State((next.0 & ((1 << TAG_SHIFT) - 1)) | (tag << TAG_SHIFT))
    }
    /// The address of the head object, 0 if none.
    #[inline(always)]
    fn head_obj(self, g: &Geometry) -> usize {
        match self.head_enc() {
            0 => 0,
            enc => g.obj(enc - 1),
        }
    }
}

/// What a push changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The slab was unlisted and is now `LISTED`: the pusher must put it on the partial list.
    pub listed_now: bool,
    /// No object of the slab is in use any more.
    pub empty_now: bool,
}

/// Why a push was refused (nothing was changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// More objects freed than are in use: a double free.
    Underflow,
    /// The slab was already released.
    Dead,
}

/// A pop found the head object's link pointing outside the slab's objects (a write after free): the list was
/// cut (its objects are leaked, counted in use for good) rather than followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corrupt {
    /// The free object whose link word was damaged.
    pub obj: usize,
    /// The decoded link found there.
    pub link: usize,
}

/// The state word of one slab. Zeroed memory is an empty, unlisted slab with nothing in use.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct SlabFreelist {
    state: AtomicU64,
}

impl SlabFreelist {
    /// A fresh state word.
    pub fn new(state: State) -> Self {
        Self { state: AtomicU64::new(state.0) }
    }

    /// Current state (a snapshot).
    #[inline]
    pub fn load(&self) -> State {
        State(self.state.load(Ordering::Acquire))
    }

    /// Set the state of a slab nobody else takes from yet (just created). The tag keeps moving from the
    /// previous word, so that a CAS prepared against the slab's former life (a rescue that named it before it
    /// was released) fails.
    ///
    /// # Context
    /// Only while nobody else can change the word: one load and one store.
    #[inline]
    pub fn init(&self, state: State) {
        let old = State(self.state.load(Ordering::Relaxed));
        // Release: pairs with the Acquire loads of whoever finds the slab through its descriptor afterwards.
        self.state.store(old.succeeded_by(state).0, Ordering::Release);
    }

    /// Prepend the chain `first_idx ..= last` of `n` objects (linked through their link words except `last`,
    /// whose link this sets). Any context.
    ///
    /// # Safety
    /// The objects belong to this slab, are in use (counted in `used`), and the caller gives them up.
    #[inline]
    pub unsafe fn push_chain(&self, g: &Geometry, first_idx: u32, last: usize, n: u16) -> Result<Pushed, PushError> {
        // SAFETY: forwarded.
        unsafe { self.push_chain_coded(g, LinkCodec::PLAIN, first_idx, last, n) }
    }

    /// [`push_chain`](Self::push_chain) with links stored through `codec`.
    ///
    /// # Safety
    /// As [`push_chain`](Self::push_chain).
    #[inline]
    pub unsafe fn push_chain_coded(
        &self,
        g: &Geometry,
        codec: LinkCodec,
        first_idx: u32,
        last: usize,
        n: u16,
    ) -> Result<Pushed, PushError> {
        // SAFETY: `last` is an object of this slab being freed by the caller.
        let last_link = unsafe { g.link(last) };
        let mut old = State(self.state.load(Ordering::Relaxed));
        // If the push is refused after a lost CAS, the link word is put back. (A refused push is a double free:
        // the object may be on the free list already, and a concurrent taker may glimpse the written value in
        // between — only debug caches, which track each object's state, make that race fully safe.)
        let original = last_link.load(Ordering::Relaxed);
        let mut wrote = false;
        loop {
            let refuse = if old.flags() & DEAD != 0 {
                Some(PushError::Dead)
            } else if old.used() < n {
                Some(PushError::Underflow)
            } else {
                None
            };
            if let Some(e) = refuse {
                if wrote {
                    last_link.store(original, Ordering::Relaxed);
                }
                return Err(e);
            }
            last_link.store(codec.encode(last + g.link_off, old.head_obj(g)), Ordering::Relaxed);
            wrote = true;
            let listed_now = old.flags() & LISTED == 0;
            let new = old.succeeded_by(State::new(first_idx + 1, old.used() - n, old.flags() | LISTED));
            // Release: pairs with the Acquire in the takes and pops; publishes the links and object contents.
            match self.state.compare_exchange_weak(old.0, new.0, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => {
                    return Ok(Pushed { listed_now, empty_now: new.used() == 0 });
                }
                Err(now) => old = State(now),
            }
        }
    }

    /// Take every free object and unlist the slab. Returns the first object's address (0 if none) and how many
    /// there are. Caller holds the take right.
    ///
    /// # Context
    /// Any context, by the holder of the slab's take right: lock-free, async-signal-safe.
    #[inline]
    pub fn take_all(&self, g: &Geometry) -> (usize, u16) {
        let mut old = State(self.state.load(Ordering::Acquire));
        loop {
            debug_assert_eq!(old.flags() & DEAD, 0);
            let n = g.capacity - old.used();
            let new = old.succeeded_by(State::new(0, g.capacity, old.flags() & !LISTED));
            // AcqRel/Acquire: acquire the pushed objects; order our take before later pushes see `used`.
            match self.state.compare_exchange_weak(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return (old.head_obj(g), n),
                Err(now) => old = State(now),
            }
        }
    }

    /// Take every free object of a slab whose take right someone else may hold; the flags are left as they are
    /// (the holder or the next one keeps the listing protocol). A dead slab gives nothing. Returns the first
    /// object (0 if none) and how many there are.
    #[inline]
    pub fn steal_all(&self, g: &Geometry) -> (usize, u16) {
        let mut old = State(self.state.load(Ordering::Acquire));
        loop {
            if old.flags() & DEAD != 0 || old.head_enc() == 0 {
                return (0, 0);
            }
            let n = g.capacity - old.used();
            let new = old.succeeded_by(State::new(0, g.capacity, old.flags()));
            // AcqRel/Acquire: as in take_all.
            match self.state.compare_exchange_weak(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return (old.head_obj(g), n),
                Err(now) => old = State(now),
            }
        }
    }

    /// Take one free object. Returns it and whether the list is now empty (then the slab was unlisted in the
    /// same CAS, and the caller must not put it back on the partial list). Caller holds the take right. A slab
    /// found empty is unlisted and gives `None`; so does a corrupted list (see [`pop_one_coded`]).
    ///
    /// [`pop_one_coded`]: Self::pop_one_coded
    ///
    /// # Context
    /// Any context, by the holder of the slab's take right: lock-free, async-signal-safe.
    #[inline]
    pub fn pop_one(&self, g: &Geometry) -> Option<(usize, bool)> {
        self.pop_one_coded(g, LinkCodec::PLAIN).unwrap_or(None)
    }

    /// [`pop_one`](Self::pop_one) with links read through `codec`. The successor read from the head object must
    /// be 0 or an object of this slab; if it is not (and the word did not change meanwhile, so it really is
    /// what the list holds), the list is cut — the slab keeps no free object, the lost ones count as in use for
    /// good — and the damage is returned instead of followed.
    ///
    /// # Context
    /// Any context, by the holder of the slab's take right: lock-free, async-signal-safe.
    #[inline]
    pub fn pop_one_coded(&self, g: &Geometry, codec: LinkCodec) -> Result<Option<(usize, bool)>, Corrupt> {
        self.pop_inner(g, codec, true)
    }

    /// Take one free object of a slab whose take right someone else may hold, leaving the flags alone (even
    /// when the list becomes empty). Checks and cuts like [`pop_one_coded`](Self::pop_one_coded). A dead slab
    /// gives nothing.
    #[inline]
    pub fn pop_any(&self, g: &Geometry, codec: LinkCodec) -> Result<Option<usize>, Corrupt> {
        self.pop_inner(g, codec, false).map(|o| o.map(|(obj, _)| obj))
    }

    fn pop_inner(&self, g: &Geometry, codec: LinkCodec, holder: bool) -> Result<Option<(usize, bool)>, Corrupt> {
        // Acquire: pairs with the Release half of the CAS that pushed the head object (its link word, written
        // before the push, is read below).
        let mut old = State(self.state.load(Ordering::Acquire));
        loop {
            if old.flags() & DEAD != 0 {
                debug_assert!(!holder, "the take right of a dead slab");
                return Ok(None);
            }
            let obj = old.head_obj(g);
            if obj == 0 {
                if !holder || old.flags() & LISTED == 0 {
                    return Ok(None);
                }
                // Someone without the take right emptied the list: unlist the slab as `take_all` would.
                let new = old.succeeded_by(State::new(0, old.used(), old.flags() & !LISTED));
                // AcqRel/Acquire: as in take_all.
                match self.state.compare_exchange_weak(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(None),
                    Err(now) => {
                        old = State(now);
                        continue;
                    }
                }
            }
            // SAFETY: `obj` is on the free list; if it was taken meanwhile the word changed (tag) and the value
            // read is discarded by the failing CAS below. The slab's memory is never unmapped.
            let next = unsafe { g.next_of(codec, obj) };
            let next_idx = if next == 0 { Some(0) } else { g.index_of(next).map(|i| i + 1) };
            let Some(next_enc) = next_idx else {
                let now = State(self.state.load(Ordering::Acquire));
                if now != old {
                    old = now;
                    continue;
                }
                // The list really holds this link: cut it, keep the free objects out of circulation.
                let flags = if holder { old.flags() & !LISTED } else { old.flags() };
                let new = old.succeeded_by(State::new(0, g.capacity, flags));
                // AcqRel/Acquire: as in take_all.
                match self.state.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Err(Corrupt { obj, link: next }),
                    Err(now) => {
                        old = State(now);
                        continue;
                    }
                }
            };
            let emptied = next == 0;
            let flags = if holder && emptied { old.flags() & !LISTED } else { old.flags() };
            let new = old.succeeded_by(State::new(next_enc, old.used() + 1, flags));
            // AcqRel/Acquire: as in take_all.
            match self.state.compare_exchange_weak(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(Some((obj, emptied))),
                Err(now) => old = State(now),
            }
        }
    }

    /// Mark an entirely free slab dead so that it can be released. Fails (changing nothing) if any object is in
    /// use. Caller holds the take right.
    ///
    /// # Context
    /// Any context, by the holder of the slab's take right: one CAS.
    #[inline]
    pub fn try_kill(&self) -> bool {
        let old = State(self.state.load(Ordering::Acquire));
        if old.used() != 0 || old.flags() & DEAD != 0 {
            return false;
        }
        let new = old.succeeded_by(State::new(0, 0, DEAD));
        // AcqRel: a push to an unused slab (a caller bug) or a rescue's steal must lose cleanly.
        self.state.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}
