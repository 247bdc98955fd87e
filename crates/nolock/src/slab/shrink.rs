//! Shrinking: releasing a cache's entirely free slabs, and the rescue that keeps an allocation from failing
//! while a shrink holds free objects.
//!
//! - **shrink** (the background worker, `trim`, cache destroy, and any allocation that finds no page): move the
//!   partial slabs one at a time from one list to the other, releasing entirely free slabs beyond a small
//!   reserve. A slab that counts no object in use is verified first (`verify_empty`: its free list must hold
//!   every object; a double free that reached the slab makes the count lie). A type-safe cache's released slab
//!   waits for its grace period (`release_slab`, through the slab's page descriptor as the `rcu_head`), and
//!   its destructors run then.
//! - **rescue** (cold): an allocation found no partial slab and no page even after releasing every cache's empty
//!   slabs: before it fails, it looks at the lists again and takes the objects of the slab a shrink holds.
//!
//! # Shrinking, and `None` only when memory is exhausted
//!
//! A slab's free objects can be taken only by whoever can find the slab; a slab off the partial lists is found
//! by nobody. A shrink used to take the whole partial list for its pass, and an allocation meanwhile — on
//! another thread, or in a signal handler on the shrinking thread — found no partial slab, no page, and failed
//! while thousands of freed objects sat in the slabs it held. Now:
//!
//! - the shrink flips `active` (pushes and pops start with the other list) and drains the old list one slab at
//!   a time: it *names* the top slab in the cache's `hand`, then pops it only if it is still the top
//!   ([`TaggedStack::pop_if`]), releases it if it is entirely free and beyond the reserve, and otherwise pushes
//!   it on the other list. At every instant each listed slab is on one of the two lists or in the hand;
//! - the rescue looks at the lists, the hand, the lists again — the direction slabs move — and repeats a look
//!   during which `moves` changed. A slab in the hand is taken from in place, without its take right:
//!   [`SlabFreelist::steal_all`] for a refill, [`SlabFreelist::pop_any`] for the shared path. The ABA tag in the
//!   slab's state word makes that safe against whoever holds the take right, and a stale name harmless.
//!
//! Who can meet whom (each shrink is alone on its cache: the `shrinking` flag):
//!
//! - *alloc (refill or shared) on another thread × shrink*: at most one slab is off the lists, named; the
//!   allocation pops the lists or, finding nothing, rescues from the hand. A shrink that keeps moving while the
//!   rescue looks makes it look again (at most `RESCUE_LOOKS` times: only a shrink that moves slabs faster than
//!   a rescue can look, sixty-four times in a row, could still make it fail).
//! - *alloc in a signal handler × a shrink it interrupted on the same thread* (trim, or an out-of-pages reclaim
//!   in the interrupted allocation): the shrink is frozen, so the rescue's first look is complete. If it froze
//!   between its kill of an empty slab and the page allocator's taking back the pages, those pages are in
//!   nobody's hands for that moment (the page allocator has the same window inside `free_run`): a handler that
//!   needs exactly them fails. That is the one window left.
//! - *free × shrink*: a free onto a slab in the hand sees it `LISTED` and does not list it; the shrink puts it
//!   back. A free that read `active` before the flip lists its slab on the list being drained; the shrink
//!   takes it with the rest (its pass is bounded by the number of slabs, plus slack for these).
//! - *rescue × shrink's decision*: a steal makes `used` non-zero, so the shrink's `try_kill` fails and the slab
//!   is kept; a killed slab is `DEAD` and gives nothing to a rescue.
//! - *rescue × a holder of the take right* (a refill or shared allocation that popped the named slab first):
//!   both change the state word by tagged CAS; the holder finds the list emptied and unlists the slab.
//! - *shrink × shrink* (trim, the worker, reclaims on several threads): one runs, the others skip (`shrink`) or
//!   wait (`shrink_wait`: trim and destroy, normal context only).
//! - *destroy*: claims every thread's list, then waits for any shrink and shrinks with no reserve; allocating
//!   from a cache being destroyed is the caller's bug (destroy takes the handle).
//!
//! Other short windows where a slab with free objects is off the lists remain and are not covered by the
//! rescue: a refill between popping a slab and taking its objects, the shared path while it holds a slab to
//! take one object, and a free between listing a slab (its CAS) and pushing it on a list. Each is a few
//! instructions on one slab.
//!

use core::sync::atomic::{AtomicU32, Ordering};

use super::cache::CacheInner;
use super::tables::SlabState;
use crate::hooks::{self, Point};
use crate::page::desc::{Info, Kind};
use crate::sync::slab_freelist::{DEAD, LISTED, State};
use crate::sync::tagged::decode_link;

/// The word a shrinker sleeps on (the background worker, which imports this layer; this layer names no one
/// above it). A free path that empties enough slabs of a cache bumps it ([`request_shrink`]).
pub static SHRINK_WANTED: AtomicU32 = AtomicU32::new(0);

/// Ask for an early shrink pass (a cache has empty slabs to give back). Called from free paths, so it makes no
/// system call: it only changes the word the shrinker sleeps on. A shrinker about to sleep then passes at once
/// (its `futex` wait finds the word changed); one already asleep passes at the end of its interval.
pub fn request_shrink() {
    // Release: pairs with the Acquire load of `SHRINK_WANTED` at the top of the background worker's loop (a
    // pass that sees the new value sees the empty events counted before it).
    SHRINK_WANTED.fetch_add(1, Ordering::Release);
}

/// Looks a rescue repeats while a shrink keeps moving slabs under it.
pub(super) const RESCUE_LOOKS: usize = 64;

impl CacheInner {
    /// Release entirely free slabs beyond `keep` to the page allocator. Returns the number released.
    ///
    /// Lock-free (it only pops and pushes the partial lists and CASes slab states), so it may also run on an
    /// allocation path that is out of pages. It holds at most one slab at a time, named in the cache's hand,
    /// whose objects an allocation that finds no memory can still take (see "Shrinking" and `rescue`).
    pub fn shrink(&self, g: &SlabState, keep: usize) -> usize {
        if !self.try_start_shrink() {
            return 0;
        }
        self.shrink_locked(g, keep)
    }

    /// Take the right to shrink (`shrinking`), naming this thread; false if another shrink runs.
    fn try_start_shrink(&self) -> bool {
        // Acquire: pairs with the Release store at the end of `shrink_locked`: this shrink sees the lists and the
        // hand as the previous one left them.
        self.shrinking.compare_exchange(0, shrinker_id(), Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// [`shrink`](Self::shrink) that waits (yielding) for a shrink already running on this cache instead of
    /// skipping it, so that "every entirely free slab beyond `keep` is released" holds when it returns.
    ///
    /// # Context
    /// Normal context only: may yield while another thread shrinks the cache.
    pub fn shrink_wait(&self, g: &SlabState, keep: usize) -> usize {
        // A normal-context call on the thread whose own shrink holds the flag is nested in that shrink: in a fork
        // child, the signal handler that forked while it ran, which makes blocking calls only because it never
        // returns to it. That shrink will never end: take its right over (the slab it held off the lists stays
        // named in `hand`, where a rescue may still take its objects; otherwise the child loses it). Before
        // this the child's `trim` and `KmemCache::destroy` waited for it forever (`tests/fork_step.rs`).
        if self.held_at_fork.load(Ordering::Relaxed) && self.shrinking.load(Ordering::Relaxed) == shrinker_id() {
            self.held_at_fork.store(false, Ordering::Relaxed);
            self.shrinking.store(0, Ordering::Relaxed);
        }
        while !self.try_start_shrink() {
            std::thread::yield_now();
        }
        self.shrink_locked(g, keep)
    }

    /// The pass itself; the caller set `shrinking`. See "Shrinking" in the module documentation.
    pub(super) fn shrink_locked(&self, g: &SlabState, keep: usize) -> usize {
        let events = self.counters.empty_events.load(Ordering::Relaxed);
        let mut released = 0;
        let mut kept_empty = 0;
        // Pushes and pops now start with the other list; this one only drains (into the other).
        let src = self.active.load(Ordering::Relaxed) as usize & 1;
        let dst = src ^ 1;
        self.active.store(dst as u32, Ordering::Relaxed);
        // Release: a rescue that sees this count sees the flip.
        self.moves.fetch_add(1, Ordering::Release);
        let next_of = |i: u32| &g.pages.desc(i as usize).next;
        // Frees that read `active` before the flip may still list a slab on `src`: bound the pass.
        let mut budget = self.nr_slabs.load(Ordering::Relaxed) + 64;
        while budget > 0
            && let Some(head) = self.partial[src].peek()
        {
            budget -= 1;
            // Name the slab before taking it off the list (Release: pairs with the Acquire load in `rescue`),
            // so that at every instant it is on a list or in the hand.
            self.hand.store(head + 1, Ordering::Release);
            // Release: pairs with the rescue's Acquire loads of `moves` (a look that overlaps this is repeated).
            self.moves.fetch_add(1, Ordering::Release);
            if !self.partial[src].pop_if(head, next_of) {
                continue;
            }
            hooks::point(Point::Shrink);
            let d = g.pages.desc(head as usize);
            let state = d.slab.load();
            if state.used() == 0 && kept_empty >= keep {
                match self.verify_empty(g, head, state) {
                    Verified::Empty => {
                        if d.slab.try_kill() {
                            self.release_slab(g, head);
                            released += 1;
                            continue;
                        }
                    }
                    Verified::Keep => {}
                    Verified::Unlisted => continue,
                }
            } else if state.used() == 0 {
                kept_empty += 1;
            }
            // Still `LISTED` (a rescue that took its objects leaves the flag): back on a list, then unnamed.
            self.partial[dst].push(head, &d.next);
        }
        // Release: as in the loop (the last slab is on a list before the hand is cleared).
        self.hand.store(0, Ordering::Release);
        self.moves.fetch_add(1, Ordering::Release);
        self.shrunk_at.store(events, Ordering::Relaxed);
        // The shrink a fork child inherited has ended: nothing left to take over.
        self.held_at_fork.store(false, Ordering::Relaxed);
        // Release: pairs with the Acquire CAS in `try_start_shrink`.
        self.shrinking.store(0, Ordering::Release);
        released
    }

    /// The slab at `head`, held by the shrink, counted no object in use (`state`): before it is released, check
    /// that its free list really holds all its objects — a double free that reached the slab makes the count
    /// lie while an object is still live. Reads only, unless it finds damage; then, if the slab did not change
    /// meanwhile (a rescue may steal from it, which makes it non-empty anyway), its objects are taken, the list
    /// is cut to its sound part (reported) and pushed back, which makes the count true again.
    #[inline(never)]
    pub(super) fn verify_empty(&self, g: &SlabState, head: u32, state: State) -> Verified {
        let geo = self.geometry(g, head);
        let d = g.pages.desc(head as usize);
        let first = state.head_enc().checked_sub(1).map_or(0, |i| geo.obj(i));
        if first != 0 && self.chain_sound(g, head, first, u32::from(geo.capacity), None).is_some() {
            return Verified::Empty;
        }
        if d.slab.load() != state {
            return Verified::Keep;
        }
        let (first, n) = d.slab.take_all(&geo);
        let (kept, last) =
            if n == 0 { (0, 0) } else { self.check_chain(g, first, Some(u32::from(n)), Some(head), self.codec()) };
        if kept == 0 {
            // Nothing sound is left to list: the slab stays off the lists, its objects leaked.
            return Verified::Unlisted;
        }
        let idx = geo.index_of(first).expect("a checked chain starts at a slot of the slab");
        // SAFETY: the chain's `kept` slots belong to the slab and were just taken from it (counted in use).
        match unsafe { d.slab.push_chain_coded(&geo, self.codec(), idx, last, kept as u16) } {
            // Unlisted by the take, listed again by this push: the shrink puts it on a list.
            Ok(p) if p.listed_now => Verified::Keep,
            // A push that raced ours (another double free) listed it, or the push was refused.
            _ => Verified::Unlisted,
        }
    }

    /// Give a dead slab's pages back: at once, or for a type-safe cache after a grace period (the slab's page
    /// descriptor doubles as its `rcu_head`, as `struct slab` does in the kernel).
    pub(super) fn release_slab(&self, g: &SlabState, head: u32) {
        let Some(gp) = self.cfg().typesafe else {
            return self.free_slab_now(g, head);
        };
        self.counters.pending_slabs.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the dead slab's descriptor fields that make up the head are unused until the callback runs.
        unsafe { gp.call(g.pages.desc(head as usize).rcu_head(), typesafe_slab_gp_done) };
    }

    /// Run the destructors of a dead slab and give its pages back.
    pub(super) fn free_slab_now(&self, g: &SlabState, head: u32) {
        let c = self.cfg();
        if c.dtor != 0 {
            let geo = self.geometry(g, head);
            for i in 0..u32::from(c.capacity) {
                c.destruct(geo.obj(i) + c.obj_off as usize);
            }
        }
        let pages = c.slab_pages as usize;
        let free = Info::new(Kind::Free, 0, 0);
        for p in head as usize..head as usize + pages {
            g.pages.desc(p).set_info(free);
        }
        // SAFETY: the slab is dead (no object in use, no list holds it), so its run is ours to free.
        unsafe { g.pages.free_run(head as usize, pages) };
        self.nr_slabs.fetch_sub(1, Ordering::Relaxed);
        self.counters.slabs_freed.fetch_add(1, Ordering::Relaxed);
    }

    /// The partial lists and the page allocator had nothing: before declaring the cache out of memory, look
    /// again, and take the objects of the slab a shrink holds (see "Shrinking"). Returns a slab's head page and
    /// a chain of free objects it gave (`steal`: all of them, as `take_all`; otherwise one).
    ///
    /// A shrink moves each slab from one list, to its hand, to the other list (or releases it). Looking at the
    /// lists, the hand, then the lists again follows that direction, so a slab the shrink moves meanwhile is
    /// seen at one of the three looks; a look during which `moves` changed (the shrink started a pass or
    /// took the next slab) is repeated, a bounded number of times. A signal handler that interrupted the
    /// shrink on its own thread sees it frozen, so its first look is complete.
    #[cold]
    #[inline(never)]
    pub(super) fn rescue(&self, g: &SlabState, steal: bool) -> Option<(u32, usize, u16)> {
        for _ in 0..RESCUE_LOOKS {
            // Acquire: pairs with the Release increments in `shrink_locked`, which follow each hand change.
            let seen = self.moves.load(Ordering::Acquire);
            if let Some(t) = self.take_from_lists(g, steal) {
                return Some(t);
            }
            // Acquire: pairs with the Release store that named the slab (made before it left its list).
            let hand = self.hand.load(Ordering::Acquire);
            if let Some(head) = hand.checked_sub(1)
                && let Some(t) = self.take_from_named(g, head, steal)
            {
                return Some(t);
            }
            if let Some(t) = self.take_from_lists(g, steal) {
                return Some(t);
            }
            // Acquire: as above. Unchanged: the shrink named no other slab while we looked, so a slab it moved
            // was seen at one of the three looks (a list pop that saw it gone synchronises with the `pop_if`
            // that took it, which follows its naming).
            if self.moves.load(Ordering::Acquire) == seen {
                return None;
            }
        }
        None
    }

    /// One slab's objects from the partial lists: all of them (`steal`) or one, with the slab put back.
    pub(super) fn take_from_lists(&self, g: &SlabState, steal: bool) -> Option<(u32, usize, u16)> {
        if steal {
            return self.take_partial(g);
        }
        self.pop_partial_one(g).map(|(head, slot)| (head, slot, 1))
    }

    /// Objects of slab `head`, named by a shrink that may hold its take right: only if it is still a live slab
    /// of this cache (the tag in its state word makes a stale name harmless).
    pub(super) fn take_from_named(&self, g: &SlabState, head: u32, steal: bool) -> Option<(u32, usize, u16)> {
        let d = g.pages.desc(head as usize);
        // The state first (Acquire: pairs with `init`'s Release, which follows the slab's `set_info`), then the
        // owner: a slab reused since by another cache shows that cache's info, an older state fails the CAS.
        let _ = d.slab.load();
        let info = d.info();
        if info.kind() != Kind::Slab || info.cache_id() != self.id() || info.head() != head {
            return None;
        }
        let geo = self.geometry(g, head);
        if steal {
            let (first, n) = d.slab.steal_all(&geo);
            return self.checked_chain(g, head, first, n);
        }
        match d.slab.pop_any(&geo, self.codec()) {
            Ok(Some(slot)) => Some((head, slot, 1)),
            Ok(None) => None,
            Err(e) => {
                self.report_corrupt(e.obj, e.link);
                None
            }
        }
    }
}

/// What the shrink may do with a slab that counted no object in use (`verify_empty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verified {
    /// Its free list holds every object: it may be released.
    Empty,
    /// Keep it: put it back on a list.
    Keep,
    /// It is no longer listed (nothing sound left, or listed by someone else): leave it alone.
    Unlisted,
}

/// Grace-period callback of a type-safe cache's dead slab: destructors, then the pages go back.
pub(super) unsafe fn typesafe_slab_gp_done(head: core::ptr::NonNull<crate::rcu::RcuHead>) {
    let g = super::tables::state_if_init().expect("a slab exists, so the global state does");
    let page = g.pages.page_of_desc(head.as_ptr() as usize);
    let c = g.cache(g.pages.desc(page).info().cache_id());
    c.free_slab_now(g, page as u32);
    c.counters.pending_slabs.fetch_sub(1, Ordering::Relaxed);
}

thread_local! {
    /// Its address names the thread in `CacheInner::shrinking` (unique among live threads, and the same in a
    /// fork child for the thread that forked).
    static SHRINKER_ID: u8 = const { 0 };
}

/// The calling thread's identity for `CacheInner::shrinking` (never 0).
fn shrinker_id() -> usize {
    SHRINKER_ID.with(|t| t as *const u8 as usize)
}

/// In a fork child (the atfork child handler): a shrink that a thread which is gone was running will never end.
/// Its right is cleared; before this, every `trim` and `KmemCache::destroy` of the child waited for it forever
/// and no shrink ran on that cache again (`tests/fork_step.rs`). The slab it held off the lists is put back on
/// one, and the slabs it had not reached yet are moved to the list the next shrink drains
/// (`adopt_orphaned_shrink`); before that, only a rescue could still take the first one's objects, and the
/// child's next `trim` released none of them (its `KmemCache::destroy` reported them as slabs still in use). A shrink of this thread's own
/// (fork() from a signal handler that interrupted it) continues if the handler returns: it is only marked, and
/// `shrink_wait` takes it over if the handler makes a blocking call instead.
pub(crate) fn after_fork_child(g: &SlabState) {
    let me = shrinker_id();
    // Whether this thread was inside a list operation of the slab layer at the fork (a signal handler forked
    // there): it may hold the take right of a slab, which `adopt_orphaned_shrink` must not put on a list, or be
    // in the middle of a list operation.
    let inside = super::thread_cache::current_if_any()
        .is_none_or(|t| (0..g.cache_count()).any(|id| t.list(id).lock.is_locked()));
    for id in 0..g.cache_count() {
        let c = g.cache(id);
        let who = c.shrinking.load(Ordering::Relaxed);
        c.held_at_fork.store(who == me, Ordering::Relaxed);
        if who != 0 && who != me {
            c.shrinking.store(0, Ordering::Relaxed);
            if !inside {
                c.adopt_orphaned_shrink(g);
            }
        }
    }
}

impl CacheInner {
    /// In a fork child, for a cache whose shrink was run by a thread that is gone. The child has one thread and
    /// it is here, outside the slab layer's list operations (the caller checks), so nothing moves. What that
    /// shrink left:
    /// - the list it was draining (the one pushes no longer go to) still holds the slabs it had not reached; the
    ///   next shrink drains only the other one, so they are moved there first;
    /// - the slab named in `hand` may be off the lists for good (taken, not yet put back or released): it is
    ///   put back unless it is on the list already, was killed (`DEAD`: its release may have been cut short;
    ///   it is left alone), or is not `LISTED` (whoever unlisted it lists it again with its next free).
    ///
    /// Every walk stops after as many steps as the cache has slabs, plus slack.
    fn adopt_orphaned_shrink(&self, g: &SlabState) {
        let next_of = |i: u32| &g.pages.desc(i as usize).next;
        let dst = self.active.load(Ordering::Relaxed) as usize & 1;
        let bound = self.nr_slabs.load(Ordering::Relaxed) as usize + 64;
        for _ in 0..bound {
            let Some(h) = self.partial[dst ^ 1].pop(next_of) else { break };
            self.partial[dst].push(h, next_of(h));
        }
        let Some(head) = self.hand.load(Ordering::Relaxed).checked_sub(1) else { return };
        self.hand.store(0, Ordering::Relaxed);
        let flags = g.pages.desc(head as usize).slab.load().flags();
        let ours = g.pages.info_of(g.pages.page_addr(head as usize)).is_slab_of(self.id());
        if flags & DEAD != 0 || flags & LISTED == 0 || !ours {
            return;
        }
        let mut at = self.partial[dst].peek();
        for _ in 0..bound {
            match at {
                // On the list already.
                Some(i) if i == head => return,
                Some(i) => at = decode_link(next_of(i).load(Ordering::Relaxed)),
                None => return self.list_push(g, head),
            }
        }
        // A list longer than the cache's slabs (a loop): leave the slab where it is rather than risk a second
        // place on a list.
    }
}

/// Release every cache's entirely free slabs (keeping none). Lock-free; used when the page allocator is out.
pub fn reclaim_empty_slabs(g: &SlabState) -> usize {
    (0..g.cache_count()).map(|id| g.cache(id)).filter(|c| c.is_active()).map(|c| c.shrink(g, 0)).sum()
}

/// Release every cache's entirely free slabs, waiting for shrinks in progress. Normal context only.
pub fn reclaim_empty_slabs_wait(g: &SlabState) -> usize {
    (0..g.cache_count()).map(|id| g.cache(id)).filter(|c| c.is_active()).map(|c| c.shrink_wait(g, 0)).sum()
}
