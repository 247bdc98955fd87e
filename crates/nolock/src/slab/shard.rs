//! Shards: per-thread caches of free objects (the userspace `kmem_cache_cpu`), and their life cycle.
//!
//! A *shard* belongs to one thread at a time. It holds one [`PerCpuCache`] per cache id: a LIFO list of free
//! objects linked through their link words, its length, a deferred-free list and counters. The owner thread
//! edits its list with plain (relaxed) loads and stores, so the fast paths cost a few instructions; the list is
//! guarded against signal handlers on the same thread by the per-cache `busy` byte (the `local_trylock_t`
//! "acquired" flag): the owner sets it before its first read of the list and clears it after its last write,
//! with compiler fences around, and a nested context that finds it set keeps off (next size class, deferred
//! free, or the shared path). Counters that a nested context also changes are atomic RMWs on the cache instead.
//!
//! Another thread may need to take over a list (cache destroy). It sets the `claimed` byte, calls
//! `heavy_barrier()` (membarrier), then waits for `busy` to be clear: the owner checks `claimed` after setting
//! `busy`, with only a compiler fence between, and the barrier makes the pair an asymmetric Dekker: either the
//! owner sees the claim and backs off, or the claimer sees `busy` and waits for the bounded operation to end.
//!
//! Life cycle:
//! - **claim**: a thread's first nolock call takes a shard from the free stack or a fresh one (lock-free), and
//!   publishes it in its thread-local pointer with a CAS, so a signal handler that raced the claim on the same
//!   thread cannot leak one. It also registers a pthread key destructor for the thread (glibc's first 32 keys
//!   need no allocation, so this is async-signal-safe there), so the first call may be in a signal handler.
//! - **exit**: the key destructor marks the thread as exited (its later calls use the shared path), returns
//!   every cached object to its slab and gives the shard back. It takes each list's lock like any owner
//!   operation: a cache destroy may be claiming the same lists at that moment (exit destructors still run
//!   after `std::thread::scope` returns), and a claimed list is left to the destroy.
//! - **orphans**: a shard whose thread died without the destructor (no key available) is found by the worker
//!   (`tgkill(pid, tid, 0)` fails with ESRCH) and drained the same way. A claim generation in the state word
//!   keeps the sweep from taking a shard that was released and claimed again while it looked.
//! - **fork**: in the child, only the forking thread exists; an atfork handler drains every other shard whose
//!   lists are consistent (no busy flag set) and fixes the owner thread id of the current one.
//!
//! If no shard is available (more than `MAX_SHARDS` threads at once), the thread works on the shared path:
//! slower, never failing.

use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::global::{self, Global, MAX_CACHES, MAX_SHARDS};
use crate::hooks::{self, Point};
use crate::sync::llist::Llist;
use crate::sync::local_lock::{LocalTryLock, TryLock};

/// Yields a claimer waits for an owner's critical section to end before declaring it stuck.
const CLAIM_PATIENCE: u32 = 100_000;

/// The per-thread cache of one cache id. See the module documentation for who touches what.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct PerCpuCache {
    /// Held by the owner around every edit of `freelist`/`count`/counters; claimed by a thread taking over.
    pub lock: LocalTryLock,
    /// Objects on `freelist`.
    pub count: AtomicU32,
    /// First free object (0: empty); the rest follow through link words.
    pub freelist: AtomicUsize,
    /// Frees that arrived while `busy` was set; drained by the owner when it clears `busy`.
    pub deferred: Llist,
    /// Allocations served from `freelist` (busy-guarded).
    pub alloc_fast: AtomicU64,
    /// Allocations that refilled `freelist` from a slab (busy-guarded).
    pub alloc_refill: AtomicU64,
    /// Frees pushed on `freelist` (busy-guarded).
    pub free_fast: AtomicU64,
    /// Times `freelist` was flushed back to slabs (busy-guarded).
    pub flushes: AtomicU64,
    /// The cache's `high` mark, copied here by the first full-path free so that the free fast path never
    /// touches the cache itself; 0 until then (which sends every free down the full path). Owner-written,
    /// busy-guarded; zeroed by `reset_all` when the cache id is reused.
    pub high: AtomicU32,
    /// The cache's link offset, copied with `high` (meaningful only once `high != 0`).
    pub link_off: AtomicU32,
}

const _: () = assert!(core::mem::size_of::<PerCpuCache>() == 64, "one cache line per list");

/// Outcome of [`PerCpuCache::try_pop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Pop {
    /// An object; the lock is released.
    Obj(usize),
    /// An object, and frees deferred by a nested context are waiting: the caller drains them (off the fast
    /// path). The lock is released.
    ObjDrain(usize),
    /// The lock could not be taken: a context this one interrupted holds it, or another thread claimed the list.
    Busy,
    /// The list is empty. **The caller holds the lock**: it refills the list (or fails) and unlocks.
    Empty,
}

/// Outcome of [`PerCpuCache::try_push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Push {
    /// Pushed; the lock is released.
    Done,
    /// Pushed, and frees deferred by a nested context are waiting: the caller drains them. The lock is released.
    DoneDrain,
    /// A context this one interrupted holds the lock: the caller defers the free.
    Busy,
    /// Another thread claimed the list: the caller frees straight to the slab.
    Claimed,
    /// Not pushed: the list would pass its `high` mark, is not set up yet, or starts with this very object (a
    /// double free). **The caller holds the lock**: it finishes the free on the full path and unlocks.
    Locked,
}

impl PerCpuCache {
    /// Allocation fast path: take the lock and pop the first object of the list, whose link words sit at
    /// `link_off`.
    ///
    /// Straight-line code with no calls, so that the callers' other cases can be tail calls and the fast path
    /// saves no registers.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, never blocks.
    #[inline(always)]
    pub fn try_pop(&self, link_off: usize) -> Pop {
        if self.lock.try_lock() != TryLock::Locked {
            return Pop::Busy;
        }
        let head = self.freelist.load(Ordering::Relaxed);
        if head == 0 {
            return Pop::Empty;
        }
        hooks::point(Point::AllocFast);
        // SAFETY: `head` is a free object on our list (busy held); its link word is at `link_off`.
        let link = unsafe { &*((head + link_off) as *const AtomicUsize) };
        self.freelist.store(link.load(Ordering::Relaxed), Ordering::Relaxed);
        self.count.store(self.count.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Relaxed);
        bump(&self.alloc_fast);
        self.lock.unlock();
        if self.deferred.is_empty() { Pop::Obj(head) } else { Pop::ObjDrain(head) }
    }

    /// Free fast path: take the lock and push `slot` (a validated object of this list's cache) unless the list
    /// would pass its `high` mark, is not set up yet, or already starts with `slot`.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, never blocks.
    #[inline(always)]
    pub fn try_push(&self, slot: usize) -> Push {
        match self.lock.try_lock() {
            TryLock::Locked => {}
            TryLock::Busy => return Push::Busy,
            TryLock::Claimed => return Push::Claimed,
        }
        let head = self.freelist.load(Ordering::Relaxed);
        let count = self.count.load(Ordering::Relaxed) + 1;
        if head == slot || count > self.high.load(Ordering::Relaxed) {
            return Push::Locked;
        }
        hooks::point(Point::FreeFast);
        // `high != 0`, so `link_off` is the cache's.
        self.push_locked(slot, head, count, self.link_off.load(Ordering::Relaxed) as usize);
        self.lock.unlock();
        if self.deferred.is_empty() { Push::Done } else { Push::DoneDrain }
    }

    /// Put `slot` in front of the list, whose first object is `head`; the list then holds `count` objects.
    ///
    /// # Context
    /// The holder of the lock.
    #[inline(always)]
    pub fn push_locked(&self, slot: usize, head: usize, count: u32, link_off: usize) {
        // SAFETY: `slot` is a validated object of this list's cache given up by the caller; `link_off` is in
        // bounds and pointer-aligned.
        let link = unsafe { &*((slot + link_off) as *const AtomicUsize) };
        link.store(head, Ordering::Relaxed);
        self.freelist.store(slot, Ordering::Relaxed);
        self.count.store(count, Ordering::Relaxed);
        bump(&self.free_fast);
    }
}

/// Increment a counter that only the busy-flag holder writes (a plain load and store, no lock prefix).
#[inline(always)]
pub fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

// `Shard::state`: the state in the low byte, a generation above it that every claim advances, so that an
// orphan sweep that looked at one owner can never take the shard from the next one (ABA: the owner exits,
// its thread dies, another thread claims the shard while the sweep is between its look and its CAS).
const STATE_FREE: u32 = 0;
const STATE_OWNED: u32 = 1;
const STATE_LEAKED: u32 = 2;
const STATE_MASK: u32 = 0xff;
const GENERATION_ONE: u32 = 1 << 8;

/// `w` with its state replaced by `state`, generation kept.
fn with_state(w: u32, state: u32) -> u32 {
    (w & !STATE_MASK) | state
}

/// One thread's set of per-cache lists. Zeroed memory is a free shard.
#[repr(C, align(64))]
pub struct Shard {
    /// Index in the shard table.
    pub id: AtomicU32,
    /// `STATE_*` in the low byte, the claim generation above.
    state: AtomicU32,
    /// Link in the free-shard stack.
    pub next: AtomicU32,
    /// Kernel thread id of the owner.
    pub owner_tid: AtomicI32,
    /// `kfree_rcu` pointer blocks: `[RCU, SRCU-fast]`.
    pub kfree: [crate::rcu::kfree::KfreeSlot; 2],
    pcs: [PerCpuCache; MAX_CACHES],
}

const _: () = assert!(MAX_CACHES == 256, "Shard::pc indexes with a u8");

impl Shard {
    /// The list of cache `id`.
    #[inline(always)]
    pub fn pc(&self, id: u16) -> &PerCpuCache {
        // Cache ids are below MAX_CACHES = 256, so the u8 index needs no bounds check.
        &self.pcs[usize::from(id as u8)]
    }

    /// Shard id + 1 (0 means "no shard"), as stored in slab descriptors.
    #[inline]
    pub fn tag(&self) -> u32 {
        self.id.load(Ordering::Relaxed) + 1
    }

    /// Whether a thread owns this shard.
    pub fn is_owned(&self) -> bool {
        self.state.load(Ordering::Acquire) & STATE_MASK == STATE_OWNED
    }
}

thread_local! {
    /// This thread's shard; null before the first claim, `EXITED` after the exit destructor ran.
    static CURRENT: AtomicPtr<Shard> = const { AtomicPtr::new(core::ptr::null_mut()) };
}

const EXITED: usize = 1;

/// The calling thread's shard, claiming one on first use. `None`: the thread has exited (it is running other
/// thread-local destructors) or no shard is free; use the shared path.
///
/// # Context
/// Any context.
#[inline(always)]
pub fn current(g: &'static Global) -> Option<&'static Shard> {
    let p = CURRENT.with(|c| c.load(Ordering::Relaxed));
    if p as usize > EXITED {
        // SAFETY: only pointers into the shard table (which lives forever) are stored, by `claim`.
        return Some(unsafe { &*p });
    }
    if p.is_null() { claim(g) } else { None }
}

/// The calling thread's shard if it has one (never claims).
#[inline]
pub fn current_if_any() -> Option<&'static Shard> {
    let p = CURRENT.with(|c| c.load(Ordering::Relaxed));
    // SAFETY: as in `current`.
    (p as usize > EXITED).then(|| unsafe { &*p })
}

#[cold]
#[inline(never)]
fn claim(g: &'static Global) -> Option<&'static Shard> {
    let id = match g.free_shards.pop(|i| &g.shard(i).next) {
        Some(i) => i,
        None => {
            if g.next_shard.load(Ordering::Relaxed) as usize >= MAX_SHARDS {
                return None;
            }
            let i = g.next_shard.fetch_add(1, Ordering::AcqRel);
            if i as usize >= MAX_SHARDS {
                return None;
            }
            i
        }
    };
    let s = g.shard(id);
    s.id.store(id, Ordering::Relaxed);
    s.owner_tid.store(crate::sys::gettid(), Ordering::Relaxed);
    // A free shard is ours alone (popped or fresh): a plain update. Release: pairs with the Acquire loads in
    // `is_owned` and `sweep_orphans` (they see this owner's tid with this generation).
    let w = s.state.load(Ordering::Relaxed);
    s.state.store(with_state(w.wrapping_add(GENERATION_ONE), STATE_OWNED), Ordering::Release);
    crate::hooks::point(crate::hooks::Point::ShardClaim);
    let me = s as *const Shard as *mut Shard;
    // An atomic RMW on our own thread-local word: a signal handler that claimed meanwhile wins, and we give ours
    // back instead of overwriting (and leaking) theirs.
    match CURRENT.with(|c| c.compare_exchange(core::ptr::null_mut(), me, Ordering::AcqRel, Ordering::Acquire)) {
        Ok(_) => {
            register_exit(s);
            Some(s)
        }
        Err(other) => {
            release(g, s);
            // SAFETY: `other` was stored by a nested claim (a shard pointer) or is EXITED.
            (other as usize > EXITED).then(|| unsafe { &*other })
        }
    }
}

/// Give a shard with empty lists back to the pool.
fn release(g: &Global, s: &Shard) {
    s.owner_tid.store(0, Ordering::Relaxed);
    let w = s.state.load(Ordering::Relaxed);
    s.state.store(with_state(w, STATE_FREE), Ordering::Release);
    g.free_shards.push(s.id.load(Ordering::Relaxed), &s.next);
}

// -------------------------------------------------------------------------------------------------------------
// Thread exit: a pthread key destructor
// -------------------------------------------------------------------------------------------------------------

/// pthread key + 1 (0: not created).
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);

/// glibc keeps the values of its first 32 keys inside the thread descriptor; setting them never allocates.
const KEY_FIRST_LEVEL: u32 = 32;

/// Create the exit key if needed. Lock-free in glibc (the key table is claimed with atomic operations).
pub fn ensure_exit_key() -> Option<u32> {
    let k = EXIT_KEY.load(Ordering::Acquire);
    if k != 0 {
        return Some(k - 1);
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; `shard_exit` has the destructor signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(shard_exit)) } != 0 {
        return None;
    }
    // AcqRel: publish the key; a loser deletes its own.
    match EXIT_KEY.compare_exchange(0, key + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // SAFETY: `key` was created above and never used.
            unsafe { libc::pthread_key_delete(key) };
            Some(winner - 1)
        }
    }
}

fn register_exit(s: &Shard) {
    let Some(key) = ensure_exit_key() else { return };
    if cfg!(target_env = "gnu") && key >= KEY_FIRST_LEVEL {
        // Setting this key could allocate: leave the shard to the orphan sweep instead.
        return;
    }
    // SAFETY: `key` is a live key; the value is a pointer into the shard table.
    unsafe { libc::pthread_setspecific(key, s as *const Shard as *const libc::c_void) };
}

extern "C" fn shard_exit(p: *mut libc::c_void) {
    CURRENT.with(|c| c.store(EXITED as *mut Shard, Ordering::Relaxed));
    crate::sync::signal_fence();
    let Some(g) = global::get_if_init() else {
        return;
    };
    // SAFETY: the value was set by `register_exit` to this thread's shard.
    let s = unsafe { &*(p as *const Shard) };
    drain_and_release(g, s);
}

/// Return every object cached in `s` to its slab and give `s` back. The caller guarantees that no other
/// context uses `s` as its owner (its owner exited, or is this thread past its exit marker).
///
/// Each list is drained under its lock, like any owner operation, because a cache destroy may be taking the
/// same lists over at the same moment (a thread's exit destructor still runs after `std::thread::scope` has
/// returned): a list the destroy claimed is left to it, and the destroy waits for a list drained here. If a
/// list was left mid-edit (a busy flag still set: the owner died inside the allocator, e.g. killed in a fork
/// child), that list is leaked, never corrupted.
pub fn drain_and_release(g: &Global, s: &Shard) {
    crate::rcu::kfree::drain_shard(s);
    let mut consistent = true;
    for id in 0..g.cache_count() {
        let pc = s.pc(id);
        match pc.lock.try_lock() {
            TryLock::Locked => {
                if pc.count.load(Ordering::Relaxed) != 0 || !pc.deferred.is_empty() {
                    g.cache(id).drain_pc(g, s, pc);
                }
                pc.lock.unlock();
            }
            // A cache destroy claimed the list: it drains it.
            TryLock::Claimed => {}
            TryLock::Busy => consistent = false,
        }
    }
    if consistent {
        release(g, s);
    } else {
        let w = s.state.load(Ordering::Relaxed);
        s.state.store(with_state(w, STATE_LEAKED), Ordering::Release);
    }
}

// -------------------------------------------------------------------------------------------------------------
// Orphans and fork
// -------------------------------------------------------------------------------------------------------------

/// Drain shards whose owner thread no longer exists (normal context; the worker calls it).
pub fn sweep_orphans(g: &Global) -> usize {
    let mut n = 0;
    for id in 0..g.shard_count() {
        let s = g.shard(id);
        // Acquire: pairs with the Release in `claim`, so `owner_tid` below is this generation's owner (or a later
        // one's, which the CAS then refuses).
        let w = s.state.load(Ordering::Acquire);
        if w & STATE_MASK != STATE_OWNED {
            continue;
        }
        let tid = s.owner_tid.load(Ordering::Relaxed);
        if tid == 0 || crate::sys::thread_alive(tid) {
            continue;
        }
        // The owner of generation `w` is gone for good (ESRCH), so nobody else can touch the shard: take it,
        // unless it was released and claimed again meanwhile (the generation moved on).
        if s.state.compare_exchange(w, with_state(w, STATE_LEAKED), Ordering::AcqRel, Ordering::Acquire).is_ok() {
            drain_and_release(g, s);
            n += 1;
        }
    }
    n
}

/// In a fork child: fix the current shard's owner and drain every other owned shard.
pub fn after_fork_child() {
    let Some(g) = global::get_if_init() else {
        return;
    };
    let me = current_if_any();
    if let Some(me) = me {
        me.owner_tid.store(crate::sys::gettid(), Ordering::Relaxed);
    }
    for id in 0..g.shard_count() {
        let s = g.shard(id);
        if me.is_some_and(|m| core::ptr::eq(m, s)) || !s.is_owned() {
            continue;
        }
        let w = s.state.load(Ordering::Relaxed);
        s.state.store(with_state(w, STATE_LEAKED), Ordering::Relaxed);
        drain_and_release(g, s);
    }
}

/// Take over the list of cache `id` in every shard: mark them claimed, wait out in-flight operations, and
/// return their objects. Used by cache destroy. Blocks (normal context).
pub fn claim_and_drain_all(g: &Global, id: u16) {
    let n = g.shard_count();
    for i in 0..n {
        g.shard(i).pc(id).lock.claim();
    }
    // Pairs with the owners' try_lock (see `sync::local_lock`).
    crate::sys::membarrier::heavy_barrier();
    for i in 0..n {
        let s = g.shard(i);
        let pc = s.pc(id);
        if !pc.lock.wait_unlocked(CLAIM_PATIENCE) {
            // The owner left the allocator without clearing busy (e.g. longjmp out of a signal handler): its
            // list is leaked rather than touched.
            crate::debug::report_stuck_shard(i, g.cache(id).name());
            continue;
        }
        if pc.count.load(Ordering::Acquire) != 0 || !pc.deferred.is_empty() {
            g.cache(id).drain_pc(g, s, pc);
        }
    }
}

/// Reset the list of cache `id` in every shard for a new cache with that id (before it is published).
pub fn reset_all(g: &Global, id: u16) {
    for i in 0..g.shard_count() {
        let pc = g.shard(i).pc(id);
        pc.freelist.store(0, Ordering::Relaxed);
        pc.count.store(0, Ordering::Relaxed);
        pc.alloc_fast.store(0, Ordering::Relaxed);
        pc.alloc_refill.store(0, Ordering::Relaxed);
        pc.free_fast.store(0, Ordering::Relaxed);
        pc.flushes.store(0, Ordering::Relaxed);
        pc.high.store(0, Ordering::Relaxed);
        pc.link_off.store(0, Ordering::Relaxed);
        pc.lock.reset();
    }
}
