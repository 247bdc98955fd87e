//! `SlabFreelist`: the state word of one slab, changed only by single 64-bit CAS.
//!
//! SLUB keeps a slab's free list and its counters in two adjacent words and changes them together with
//! `cmpxchg_double`; architectures without it cannot run `kmalloc_nolock` at all. nolock does not need a double
//! word: a slab holds at most 65 535 objects of one size at fixed offsets, so its free-list head fits in a 32-bit
//! *index*, and head, in-use count and flags share one `u64`:
//!
//! ```text
//!  63          48 47           32 31                           0
//! +--------------+---------------+-----------------------------+
//! |    flags     |     used      |   head index + 1 (0: none)  |
//! +--------------+---------------+-----------------------------+
//! ```
//!
//! Free objects are linked through a pointer-sized link word inside each object (at the cache's free-pointer
//! offset). `used` counts objects that are not on this list: handed to users or sitting in some thread's cache.
//!
//! Operations and who may call them:
//! - [`push_chain`](SlabFreelist::push_chain): anyone, any context (frees, flushes of thread caches). Prepending
//!   never reads another free object's link, so it is ABA-free without a tag.
//! - [`take_all`](SlabFreelist::take_all) and [`pop_one`](SlabFreelist::pop_one): only the holder of the slab's
//!   *take right*, i.e. whoever popped the slab off its cache's partial list (or created it). Because nobody else
//!   removes objects meanwhile, the link of the head object cannot change under `pop_one`, so it is ABA-free too.
//!
//! Listing protocol: `LISTED` is set exactly while the slab is on (or being put back on) its cache's partial list.
//! `take_all` clears it; the first push onto an unlisted slab sets it in the same CAS and reports `listed_now`,
//! and that pusher must put the slab on the partial list. So a slab with free objects is always findable, and is
//! never on the list twice. `DEAD` marks a slab whose pages were given back; any push to it is a caller bug.
//!
//! Ordering: pushes publish object contents and links with `Release`; take/pop acquire them with `Acquire`.

use super::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The slab is on its cache's partial list (or its lister is about to put it there).
pub const LISTED: u16 = 1;
/// The slab's pages were released: it must never be touched again.
pub const DEAD: u16 = 2;

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
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline(always)]
    pub fn obj(&self, idx: u32) -> usize {
        self.base + idx as usize * self.stride
    }

    /// The link word of the free object at `obj`.
    ///
    /// # Safety
    /// `obj` must be an object of this slab that the caller may treat as free (on a free list it controls, or
    /// one it is about to push), and the slab's memory must stay mapped for `'a`.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline(always)]
    pub unsafe fn link<'a>(&self, obj: usize) -> &'a AtomicUsize {
        // SAFETY: `obj + link_off` is inside the object and pointer-aligned (the cache guarantees both); the memory
        // stays mapped (caller). Free objects' link words are only ever accessed atomically.
        unsafe { &*((obj + self.link_off) as *const AtomicUsize) }
    }
}

/// A decoded state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State(pub u64);

impl State {
    /// Build a state word.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline(always)]
    pub fn new(head_enc: u32, used: u16, flags: u16) -> Self {
        Self(u64::from(head_enc) | (u64::from(used) << 32) | (u64::from(flags) << 48))
    }
    /// Head index + 1, or 0 when the list is empty.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline(always)]
    pub fn head_enc(self) -> u32 {
        self.0 as u32
    }
    /// Objects not on the free list.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline(always)]
    pub fn used(self) -> u16 {
        (self.0 >> 32) as u16
    }
    /// `LISTED` / `DEAD`.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline(always)]
    pub fn flags(self) -> u16 {
        (self.0 >> 48) as u16
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

/// The state word of one slab. Zeroed memory is an empty, unlisted slab with nothing in use.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct SlabFreelist {
    state: AtomicU64,
}

impl SlabFreelist {
    /// A fresh state word.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn new(state: State) -> Self {
        Self { state: AtomicU64::new(state.0) }
    }

    /// Current state (a snapshot).
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    #[inline]
    pub fn load(&self) -> State {
        State(self.state.load(Ordering::Acquire))
    }

    /// Set the state of a slab nobody else can see yet (just created, or just killed and being reused).
    ///
    /// # Context
    /// Only while nobody else can see the slab: one store.
    #[inline]
    pub fn init(&self, state: State) {
        // Release: pairs with the Acquire loads of whoever finds the slab through its descriptor afterwards.
        self.state.store(state.0, Ordering::Release);
    }

    /// Prepend the chain `first_idx ..= last` of `n` objects (linked through their link words except `last`,
    /// whose link this sets). Any context.
    ///
    /// # Safety
    /// The objects belong to this slab, are in use (counted in `used`), and the caller gives them up.
    ///
    /// # Context
    /// Any context: lock-free, async-signal-safe, reentrant; never blocks.
    #[inline]
    pub unsafe fn push_chain(&self, g: &Geometry, first_idx: u32, last: usize, n: u16) -> Result<Pushed, PushError> {
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
            let next = match old.head_enc() {
                0 => 0,
                enc => g.obj(enc - 1),
            };
            last_link.store(next, Ordering::Relaxed);
            wrote = true;
            let listed_now = old.flags() & LISTED == 0;
            let new = State::new(first_idx + 1, old.used() - n, old.flags() | LISTED);
            // Release: pairs with the Acquire in take_all/pop_one; publishes the links and object contents.
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
            let new = State::new(0, g.capacity, old.flags() & !LISTED);
            // AcqRel/Acquire: acquire the pushed objects; order our take before later pushes see `used`.
            match self.state.compare_exchange_weak(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let first = match old.head_enc() {
                        0 => 0,
                        enc => g.obj(enc - 1),
                    };
                    return (first, n);
                }
                Err(now) => old = State(now),
            }
        }
    }

    /// Take one free object. Returns it and whether the list is now empty (then the slab was unlisted in the
    /// same CAS, and the caller must not put it back on the partial list). Caller holds the take right.
    ///
    /// # Context
    /// Any context, by the holder of the slab's take right: lock-free, async-signal-safe.
    #[inline]
    pub fn pop_one(&self, g: &Geometry) -> Option<(usize, bool)> {
        let mut old = State(self.state.load(Ordering::Acquire));
        loop {
            let enc = old.head_enc();
            if enc == 0 {
                return None;
            }
            let obj = g.obj(enc - 1);
            // SAFETY: `obj` is on the free list, and with the take right nobody else removes it, so its link is
            // stable (pushers only prepend in front of it).
            let next = unsafe { g.link(obj) }.load(Ordering::Relaxed);
            let next_enc = if next == 0 { 0 } else { ((next - g.base) / g.stride) as u32 + 1 };
            let flags = if next == 0 { old.flags() & !LISTED } else { old.flags() };
            let new = State::new(next_enc, old.used() + 1, flags);
            // AcqRel/Acquire: as in take_all.
            match self.state.compare_exchange_weak(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((obj, next == 0)),
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
        // AcqRel: nothing can be pushed to an unused slab, but a concurrent push (a caller bug) must lose cleanly.
        self.state.compare_exchange(old.0, State::new(0, 0, DEAD).0, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}
