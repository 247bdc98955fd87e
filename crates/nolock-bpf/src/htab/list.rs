//! The bucket list: a singly linked "nulls" list with claim-and-help removal, shared by every lock mode.
//!
//! # Layout
//!
//! A bucket head and every element's `next` word hold either an element address (8-aligned, so its low bits
//! are 0) or a *nulls* end marker `(bucket << 2) | 1` naming the bucket the list belongs to. Bit 1 of an
//! element's `next` word is the *freeze* mark. Each element also has a `repl` word: 0 while nobody removes
//! it, [`DEL`] when it is being deleted, or the address of the element that replaces it.
//!
//! # Operations (one bucket)
//!
//! - **Insert at head** (key absent): `new.next = first` (a private store), then CAS `head: first -> new`.
//! - **Claim** (delete or replace `old`): CAS `old.repl: 0 -> DEL | new`. Exactly one claim per element wins;
//!   `new` is fully initialised before the claim (the claim publishes it to helpers) and has `next == UNSET`.
//!   (Locked modes with immediate reuse replace as the kernel does instead, under the bucket lock: claim `old`
//!   with [`REPLACED`], insert `new` at the head, then complete `old` as a delete: [`update_at_head`].)
//! - **Complete** (anyone who meets a claimed element `c` behind link word `prev` — its claimer, another thread,
//!   or a signal handler that interrupted the claimer): freeze `c.next` (set the mark by CAS until it is set;
//!   from then on `c.next` never changes), let `succ = c.next & !MARK`; for a replace, CAS `new.next: UNSET ->
//!   succ` (the first helper wins, every helper would write the same value); then CAS `prev: c -> target`
//!   (`succ` or `new`). The one whose CAS on `prev` succeeds *unlinked* `c` and retires it; any other helper
//!   restarts its walk.
//! - **Lookup** (readers, lockless): walk from the head, following `next & !MARK`, ignoring claims, and return
//!   the first element with the key. If the walk ends in a nulls marker of another bucket it followed a
//!   recycled element into another list: restart. With immediate reuse (locked modes) the element a reader
//!   stands on may be reinitialised under it, its `next` UNSET (0) until it is linked again: restart too.
//!
//! # Invariants
//!
//! 1. Every element in a list is reachable through exactly one link word. (An insert links `new` from the head
//!    and `new.next` takes over the old head's link; a completion replaces the one link to `c` by a link to
//!    `succ` or to `new`, whose `next` took over `c`'s link to `succ`.)
//! 2. A frozen `next` never changes; an unfrozen `next` changes only by a completion that unlinks the element's
//!    successor. So `succ` read after the freeze is the element's successor until it is unlinked.
//! 3. At most one element with a given key is reachable and unclaimed. A key becomes reachable only by an
//!    insert at head after a walk that saw no element with the key (claimed or not: walks complete the claims
//!    they meet) and whose head value is still `first` at the CAS (so nothing was inserted or spliced at the
//!    head meanwhile, and nothing new can appear further down, where only completions change links), or by the
//!    completion of a replace, which swaps one element of the key for another in one CAS.
//! 4. An element is retired only by the context whose CAS unlinked it, and reused only when no walk can hold
//!    its address: either under the bucket lock (the locked modes, where walks of writers are serialised and
//!    readers restart through the nulls check) or after a grace period of the readers' domain (lock-free mode,
//!    where writers walk inside a read-side section; this also makes every CAS here ABA-free, as an address
//!    cannot come back while a walk that read it is running).
//!
//! # Linearisation points
//!
//! Insert: the head CAS. Delete and replace: the completion CAS on `prev` (by whoever does it); until then
//! readers still see the old element, afterwards they see the new one or none. A claim decides *which*
//! operation removes the element; a second remover that loses the claim helps complete the first one and
//! retries on the new state.
//!
//! # Who can run concurrently with whom
//!
//! Another thread (lock-free mode: any step of any operation; locked modes: only readers), a signal handler on
//! the same thread that interrupted any step (lock-free mode: it completes the interrupted operation's claim
//! if it meets it, and the interrupted code then finds its CAS failed and re-walks), and grace-period
//! callbacks retiring elements (they touch only unlinked elements). A map is dropped only when no operation
//! runs (it takes `&mut`).
//!
//! # Ordering pairs
//!
//! - The head CAS and the completion CAS on `prev` are `Release` (they publish the element's key, value and
//!   `next`); every walk loads link words with `Acquire`, pairing with them.
//! - The claim CAS is `AcqRel`: `Release` publishes `new`'s contents to helpers, whose `Acquire` load of `repl`
//!   pairs with it.
//! - The freeze CAS and the `new.next` CAS are `AcqRel`, ordered before the `prev` CAS that publishes `new`.
//!
//! Under `--cfg loom` this module is compiled alone with loom's atomics (`tests/loom_htab.rs`).

use nolock::sync::atomic::{AtomicUsize, Ordering};

use super::hooks::{Point, point};

/// Bit 0 of a link: the value is a nulls end marker, not an element.
pub const NULLS: usize = 1;
/// Bit 1 of an element's `next`: frozen (the element is being removed).
pub const MARK: usize = 2;
/// `repl` of an element being deleted.
pub const DEL: usize = 1;
/// `repl` of an element being removed because its replacement was linked at the head ([`update_at_head`]):
/// unlinked as a delete, retired as a replaced element.
pub const REPLACED: usize = 3;
/// `next` of a replacement element not linked yet.
pub const UNSET: usize = 0;

/// The nulls marker that ends bucket `idx`'s list.
#[inline]
pub const fn nulls(idx: usize) -> usize {
    (idx << 2) | NULLS
}

/// Whether a link is a nulls marker.
#[inline]
pub const fn is_nulls(link: usize) -> bool {
    link & NULLS != 0
}

/// The bucket a nulls marker names.
#[inline]
pub const fn nulls_index(link: usize) -> usize {
    link >> 2
}

/// Access to the list words of elements. Element addresses come from the list itself.
pub trait Nodes {
    /// The `next` word of element `e`.
    ///
    /// # Safety
    /// `e` must be an element address read from a list of this map while the caller's protection holds (the
    /// bucket lock, or a read-side section in lock-free mode): its memory is an element of this map.
    unsafe fn next(&self, e: usize) -> &AtomicUsize;
    /// The `repl` word of element `e`.
    ///
    /// # Safety
    /// As [`next`](Self::next).
    unsafe fn repl(&self, e: usize) -> &AtomicUsize;
}

/// Where a walk stopped.
#[derive(Clone, Copy, Debug)]
pub struct Pos {
    /// The head value the final walk started from (for an insert at head).
    pub first: usize,
    /// The link word that points to `cur`.
    pub prev: *const AtomicUsize,
    /// The element found, or the nulls marker at the end of the list.
    pub cur: usize,
}

impl Pos {
    /// The element found, if the walk found one.
    #[inline]
    pub fn found(&self) -> Option<usize> {
        (!is_nulls(self.cur)).then_some(self.cur)
    }
}

/// Counters of the slow events of walks.
#[derive(Default, Debug, Clone, Copy)]
pub struct WalkStats {
    /// Restarts because the walk ended in another bucket's nulls marker.
    pub nulls_restarts: u64,
    /// Claimed elements this walk completed (unlinked) itself.
    pub helped: u64,
    /// Restarts because a completion CAS lost.
    pub cas_restarts: u64,
}

/// Walk bucket `idx` (head word `head`) for a writer: complete every claimed element met on the way (each one
/// this walk unlinks goes to `retire`), and stop at the first element for which `want` is true, or at the end.
///
/// # Safety
/// The caller holds the bucket's protection (see [`Nodes::next`]).
pub unsafe fn seek<N: Nodes>(
    n: &N,
    head: &AtomicUsize,
    idx: usize,
    mut want: impl FnMut(usize) -> bool,
    retire: &mut impl FnMut(usize),
    st: &mut WalkStats,
) -> Pos {
    'restart: loop {
        // Acquire: pairs with the Release head CAS / completion CAS that published the first element.
        let first = head.load(Ordering::Acquire);
        let mut prev: *const AtomicUsize = head;
        let mut cur = first;
        loop {
            if is_nulls(cur) {
                if nulls_index(cur) != idx {
                    st.nulls_restarts += 1;
                    continue 'restart;
                }
                return Pos { first, prev, cur };
            }
            // SAFETY: `cur` was read from this bucket's list under the caller's protection.
            let r = unsafe { n.repl(cur) }.load(Ordering::Acquire);
            if r != 0 {
                // SAFETY: as above; `prev` is the link word we read `cur` from.
                if unsafe { complete(n, &*prev, cur, r) } {
                    st.helped += 1;
                    retire(cur);
                } else {
                    st.cas_restarts += 1;
                }
                continue 'restart;
            }
            if want(cur) {
                return Pos { first, prev, cur };
            }
            // SAFETY: as above.
            let next = unsafe { n.next(cur) };
            prev = next;
            // Acquire: pairs with the Release CAS that linked the successor.
            cur = next.load(Ordering::Acquire) & !MARK;
        }
    }
}

/// Complete the removal of claimed element `c` (claim value `r`) that `prev` pointed to: freeze it, link its
/// replacement if any, and swing `prev`. True if this call's CAS unlinked `c` (the caller retires it).
///
/// # Safety
/// As [`seek`]; `c` was read from `prev`.
pub unsafe fn complete<N: Nodes>(n: &N, prev: &AtomicUsize, c: usize, r: usize) -> bool {
    // SAFETY: per the caller.
    let cn = unsafe { n.next(c) };
    let mut nx = cn.load(Ordering::Acquire);
    while nx & MARK == 0 {
        // AcqRel: ordered before the CAS on `prev` below; pairs with other helpers' loads of the frozen word.
        match cn.compare_exchange(nx, nx | MARK, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                nx |= MARK;
                break;
            }
            Err(now) => nx = now,
        }
    }
    let succ = nx & !MARK;
    point(Point::AfterFreeze);
    let target = if r == DEL || r == REPLACED {
        succ
    } else {
        // SAFETY: `r` is the replacement published by the claim (Acquire load of `repl` in the caller).
        let nn = unsafe { n.next(r) };
        // AcqRel: the first helper sets it; ordered before the Release CAS on `prev` that publishes `r`.
        let _ = nn.compare_exchange(UNSET, succ, Ordering::AcqRel, Ordering::Acquire);
        r
    };
    // Release: publishes `target` (and, for a replace, its contents and `next`) to walks, which load `prev`
    // with Acquire. Acquire on failure: the caller re-walks from the head.
    prev.compare_exchange(c, target, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Link `new` at the head if the head is still `first`. True on success.
///
/// # Safety
/// `new` is a private, fully initialised element of this map.
pub unsafe fn insert_head<N: Nodes>(n: &N, head: &AtomicUsize, first: usize, new: usize) -> bool {
    // SAFETY: per the caller; nobody else can see `new` yet.
    unsafe { n.next(new) }.store(first, Ordering::Relaxed);
    // Release: publishes `new`'s contents and `next` to walks (their Acquire loads of the head).
    head.compare_exchange(first, new, Ordering::Release, Ordering::Relaxed).is_ok()
}

/// Claim `e` for removal: `with` is [`DEL`] or the replacement. True if this call won the claim.
///
/// # Safety
/// As [`seek`]; for a replace, `with` is fully initialised with `next == UNSET`.
pub unsafe fn claim<N: Nodes>(n: &N, e: usize, with: usize) -> bool {
    // AcqRel: Release publishes `with` to helpers (their Acquire load of `repl` in `seek`); pairs too with
    // another claimer's CAS.
    // SAFETY: per the caller.
    unsafe { n.repl(e) }.compare_exchange(0, with, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

/// What an update asks for (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Insert or replace.
    Any,
    /// Insert only.
    NoExist,
    /// Replace only.
    Exist,
}

/// What an update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// The key was absent; the new element was linked at the head.
    Inserted,
    /// The key was present; its element was replaced (and is unlinked when this returns).
    Replaced,
    /// `NoExist` and the key is present: nothing changed.
    Exists,
    /// `Exist` and the key is absent: nothing changed.
    NotFound,
}

/// An update of bucket `idx`: walk (completing the claims met), check `want`, take a new element from `get`
/// (called with `true` when it will replace an existing element; it may be called again after a lost CAS and
/// may then return the same element), and insert it at the head or claim the old element and complete the
/// replacement. Elements this call unlinked go to `retire`.
///
/// # Safety
/// As [`seek`]; `get` returns a private, initialised element of this map.
#[allow(clippy::too_many_arguments)]
pub unsafe fn update<N: Nodes, E>(
    n: &N,
    head: &AtomicUsize,
    idx: usize,
    mut matches: impl FnMut(usize) -> bool,
    want: Want,
    mut get: impl FnMut(bool) -> Result<usize, E>,
    retire: &mut impl FnMut(usize),
    st: &mut WalkStats,
) -> Result<Done, E> {
    loop {
        // SAFETY: per the caller.
        let pos = unsafe { seek(n, head, idx, &mut matches, retire, st) };
        point(Point::AfterSeek);
        let old = pos.found();
        match (old, want) {
            (Some(_), Want::NoExist) => return Ok(Done::Exists),
            (None, Want::Exist) => return Ok(Done::NotFound),
            _ => {}
        }
        let e = get(old.is_some())?;
        match old {
            None => {
                point(Point::BeforeInsert);
                // SAFETY: `e` is private and initialised (caller).
                if unsafe { insert_head(n, head, pos.first, e) } {
                    return Ok(Done::Inserted);
                }
            }
            Some(o) => {
                // SAFETY: `e` is private (caller).
                unsafe { n.next(e) }.store(UNSET, Ordering::Relaxed);
                // SAFETY: `o` was found by the walk; `e` is initialised with next == UNSET.
                if unsafe { claim(n, o, e) } {
                    point(Point::AfterClaim);
                    // Complete the replacement (or find it completed by a helper): walk until `o` is gone.
                    // SAFETY: per the caller.
                    unsafe { seek(n, head, idx, |c| c == o, retire, st) };
                    return Ok(Done::Replaced);
                }
            }
        }
        st.cas_restarts += 1;
    }
}

/// An update for the locked modes whose removed elements are reused at once: as [`update`], but a replacement is
/// linked at the head and the old element then removed (claimed with [`REPLACED`] first, so iterations can
/// skip it), as the kernel's `htab_map_update_elem` does, instead of taking the old element's place.
///
/// Why: a lockless reader may stand on an element that a writer removes and reuses at once. Reused as the
/// replacement of a *deeper* element of the same bucket and linked in its place, it carries the reader from
/// where it stood to that place, past every element in between: a key present all along is not found (a
/// reader on X in `head -> X -> K -> P`; the writer replaces X's key, then P's, reusing X in place of P; the
/// reader goes from X to the end of the bucket). Linked at the head, a reused element only takes the reader
/// back to the start of the bucket (or, in another bucket, to a nulls marker that restarts the walk).
///
/// # Safety
/// As [`update`]; and the caller holds the bucket's lock: no other writer changes the bucket.
#[allow(clippy::too_many_arguments)]
pub unsafe fn update_at_head<N: Nodes, E>(
    n: &N,
    head: &AtomicUsize,
    idx: usize,
    mut matches: impl FnMut(usize) -> bool,
    want: Want,
    mut get: impl FnMut(bool) -> Result<usize, E>,
    retire: &mut impl FnMut(usize),
    st: &mut WalkStats,
) -> Result<Done, E> {
    // SAFETY: per the caller.
    let pos = unsafe { seek(n, head, idx, &mut matches, retire, st) };
    point(Point::AfterSeek);
    let old = pos.found();
    match (old, want) {
        (Some(_), Want::NoExist) => return Ok(Done::Exists),
        (None, Want::Exist) => return Ok(Done::NotFound),
        _ => {}
    }
    let e = get(old.is_some())?;
    if let Some(o) = old {
        // SAFETY: `o` was found by the walk; under the bucket lock nobody else claims it.
        let won = unsafe { claim(n, o, REPLACED) };
        debug_assert!(won, "an element claimed under the bucket lock by another writer");
        point(Point::AfterClaim);
    }
    point(Point::BeforeInsert);
    // Under the bucket lock only readers run beside us: the head is still `first` (retry anyway).
    let mut first = pos.first;
    // SAFETY: `e` is private and initialised (caller).
    while !unsafe { insert_head(n, head, first, e) } {
        // Acquire: as in `seek`.
        first = head.load(Ordering::Acquire);
        st.cas_restarts += 1;
    }
    let Some(o) = old else { return Ok(Done::Inserted) };
    // SAFETY: per the caller.
    unsafe { seek(n, head, idx, |c| c == o, retire, st) };
    Ok(Done::Replaced)
}

/// A delete of bucket `idx`: walk, claim the element with the key, call `claimed(e)` (the value is still
/// there, for lookup-and-delete), and complete the removal. False if the key is absent.
///
/// # Safety
/// As [`seek`].
pub unsafe fn delete<N: Nodes>(
    n: &N,
    head: &AtomicUsize,
    idx: usize,
    mut matches: impl FnMut(usize) -> bool,
    claimed: impl FnOnce(usize),
    retire: &mut impl FnMut(usize),
    st: &mut WalkStats,
) -> bool {
    loop {
        // SAFETY: per the caller.
        let pos = unsafe { seek(n, head, idx, &mut matches, retire, st) };
        point(Point::AfterSeek);
        let Some(e) = pos.found() else {
            return false;
        };
        // SAFETY: `e` was found by the walk.
        if unsafe { claim(n, e, DEL) } {
            point(Point::AfterClaim);
            claimed(e);
            // SAFETY: per the caller.
            unsafe { seek(n, head, idx, |c| c == e, retire, st) };
            return true;
        }
        st.cas_restarts += 1;
    }
}

/// Lockless lookup for readers: the first element of bucket `idx` for which `is_key` is true. Restarts when
/// the walk ends in another bucket, or meets the UNSET link of an element that is being reused.
///
/// # Safety
/// The caller is inside a read-side section that keeps element memory type-stable.
pub unsafe fn lookup<N: Nodes>(
    n: &N,
    head: &AtomicUsize,
    idx: usize,
    mut is_key: impl FnMut(usize) -> bool,
    restarts: &mut u64,
) -> Option<usize> {
    'restart: loop {
        // Acquire: pairs with the Release CAS that linked the first element.
        let mut cur = head.load(Ordering::Acquire);
        loop {
            if is_nulls(cur) {
                if nulls_index(cur) != idx {
                    *restarts += 1;
                    continue 'restart;
                }
                return None;
            }
            if cur == UNSET {
                // The element we stood on was reused and is being initialised (immediate-reuse backends under
                // bucket locks): its `next` means nothing yet. Start over, as for a nulls mismatch.
                *restarts += 1;
                continue 'restart;
            }
            if is_key(cur) {
                return Some(cur);
            }
            point(Point::ReaderStep);
            // SAFETY: per the caller.
            cur = unsafe { n.next(cur) }.load(Ordering::Acquire) & !MARK;
        }
    }
}
