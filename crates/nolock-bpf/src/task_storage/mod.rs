//! Task local storage: one value per thread per map, created from any context (`bpf_task_storage_get` with
//! `BPF_LOCAL_STORAGE_GET_F_CREATE`), the seed's second user of nolock's primitives.
//!
//! # Layout (as the kernel's `bpf_local_storage`)
//!
//! - A [`Task`] (a thread) owns at most one `LocalStorage`, published in its record with one compare-and-swap
//!   on its first creation (`cmpxchg(&task->bpf_storage, NULL, s)`). It holds a cache of
//!   [`CACHE_SIZE`] recently used elements (each map has a cache index, shared round-robin among maps as the
//!   kernel's `cache_idx`), the list of its elements, a reference count (one for the live owner, one per linked
//!   element) and a lock word that only the [`Recursion::Rqspin`] mode uses.
//! - An element (`selem`) holds the value and is linked into both its owner's list (`snode`) and a bucket of
//!   its map (`map_node`). Both lists are the lock-free lists of `list.rs`.
//!
//! # Lifetimes
//!
//! Every operation runs inside an [`IrqRegion`] (RCU) and a Tasks Trace read-side section
//! ([`nolock::rcu_read_lock_tasks_trace`]); elements and storages are freed only after a Tasks Trace grace
//! period (which implies an RCU one), whatever the allocator, so a traversal never meets freed memory. An
//! element's `state` word decides who deletes it: the context whose compare-and-swap moves it to `DEAD` (a
//! `delete`, the owner's exit, or the map's drop) marks both its links, clears the owner's cache entry, walks
//! both lists until it is unlinked, frees it and drops its reference on the storage. The storage is freed with
//! the last reference. A new element goes into its bucket *before* its owner list (state `LINKING`), so
//! whoever kills it can always unlink it from both.
//!
//! # Allocators ([`StorageAlloc`])
//!
//! - `BpfMemAlloc` (Linux up to 6.18): elements from the map's fixed-size [`BpfMemAlloc`], storages from one
//!   process-wide one; freed with `free_rcu` (RCU, then Tasks Trace).
//! - `KmallocNolock` (6.19): `kmalloc_nolock`, freed by a `call_rcu_tasks_trace` callback that calls
//!   `kfree_nolock`.
//! - `SrcuFast` (the seed's target): `kmalloc_nolock`, freed with `kfree_srcu_fast_nolock` on the Tasks Trace
//!   domain (batched pointer blocks, no callback per object).
//!
//! # Recursion handling ([`Recursion`])
//!
//! - `PerCpuBusy` (up to ~v7.0): a per-CPU busy counter around every `get` and `delete` (and the owner's
//!   exit). A call that finds it held — here: a signal handler that interrupted a storage call on the same
//!   thread — fails with [`StorageError::Busy`] (`get` returned NULL, `delete` -EBUSY) even though nothing is
//!   wrong.
//! - `Rqspin` (since ~v7.0): the storage lock and the bucket lock are rqspinlocks. Creation and deletion take
//!   them; a context that finds one held by its own thread (a handler that interrupted the holder) gets
//!   [`StorageError::Deadlock`], one that waits 250 ms [`StorageError::TimedOut`]. Lookups take no lock.
//! - `Nolock`: no lock and no counter; every step is a compare-and-swap on the lists. `get(CREATE)` from a
//!   handler that interrupted a `get` or `delete` on the same thread succeeds unless memory is exhausted.
//!   The kernel's -EAGAIN for a lost first-creation race is also gone: the loser uses the winner's storage.
//!
//! Memory is charged to the map's [`MemGroup`] (elements) and to one process-wide group for storages
//! ([`storage_group`]).
//!
//! # Context
//!
//! The crate default for `get`, `delete`, `for_each` and [`Task`]: any context, a signal handler that
//! interrupted any of them on the same thread included. `Rqspin` may spin up to 250 ms on a lock held by
//! another thread. Map creation and drop are normal-context operations and say so.

mod list;
pub mod owner;

use core::marker::PhantomData;
use core::mem::{offset_of, size_of};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nolock::memcg::{MemGroup, kfree_charged_nolock, kmalloc_charged_nolock};
use nolock::{Gfp, RCU_TASKS_TRACE, RcuHead, SrcuFastGuard};

use crate::cpu::{self, IrqRegion, NR_CPUS};
use crate::memalloc::{BpfMaConfig, BpfMemAlloc, RefillMode};
pub use owner::{MAX_TASKS, Task, unregistered_exits};

use list::MARK;

/// Entries of a storage's cache of recently used elements (`BPF_LOCAL_STORAGE_CACHE_SIZE`).
pub const CACHE_SIZE: usize = 16;
/// Buckets of a map.
const NBUCKETS: usize = 64;
/// How long an `Rqspin` lock waits before [`StorageError::TimedOut`].
pub const RQSPIN_TIMEOUT: Duration = Duration::from_millis(250);

const LINKING: u32 = 1;
const LIVE: u32 = 2;
const DEAD: u32 = 3;

/// Which allocator elements and storages come from (and how they are freed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageAlloc {
    /// `bpf_mem_alloc` (Linux 6.18 and earlier).
    BpfMemAlloc,
    /// `kmalloc_nolock`, freed after Tasks Trace by a callback (Linux 6.19).
    KmallocNolock,
    /// `kmalloc_nolock`, freed with `kfree_srcu_fast_nolock` (the seed's target).
    SrcuFast,
}

impl StorageAlloc {
    /// All of them, baseline first.
    pub const ALL: [StorageAlloc; 3] = [StorageAlloc::BpfMemAlloc, StorageAlloc::KmallocNolock, StorageAlloc::SrcuFast];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            StorageAlloc::BpfMemAlloc => "bpf_mem_alloc (<=6.18)",
            StorageAlloc::KmallocNolock => "kmalloc_nolock+tasks_trace (6.19)",
            StorageAlloc::SrcuFast => "kfree_srcu_fast_nolock (nolock)",
        }
    }
}

/// How a call that interrupted another storage call on the same thread is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recursion {
    /// The per-CPU busy counter (spurious `Busy`).
    PerCpuBusy,
    /// rqspinlocks (`Deadlock` on same-thread nesting, `TimedOut` after 250 ms).
    Rqspin,
    /// Lock-free: no failure but out of memory.
    Nolock,
}

impl Recursion {
    /// All of them, oldest first.
    pub const ALL: [Recursion; 3] = [Recursion::PerCpuBusy, Recursion::Rqspin, Recursion::Nolock];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Recursion::PerCpuBusy => "per-CPU busy (<~7.0)",
            Recursion::Rqspin => "rqspinlock (~7.0)",
            Recursion::Nolock => "lock-free (nolock)",
        }
    }
}

/// Flags of [`TaskStorage::get`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetFlags(u32);

impl GetFlags {
    /// Look up only.
    pub const NONE: GetFlags = GetFlags(0);
    /// Create the element if it does not exist (`BPF_LOCAL_STORAGE_GET_F_CREATE`).
    pub const CREATE: GetFlags = GetFlags(1);
}

/// Why a storage call failed (the kernel's NULL / errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageError {
    /// No element and no `CREATE` (-ENOENT).
    NotFound,
    /// The allocator returned nothing (-ENOMEM): out of memory, or a `bpf_mem_alloc` cache that was empty or
    /// busy.
    NoMem,
    /// The per-CPU busy counter was held (NULL / -EBUSY).
    Busy,
    /// An rqspinlock held by this very thread (-EDEADLK).
    Deadlock,
    /// An rqspinlock held for 250 ms (-ETIMEDOUT).
    TimedOut,
    /// Another context published the task's storage first (-EAGAIN; not in `Nolock` mode).
    Again,
    /// The task has exited (or has no record).
    NoTask,
}

impl StorageError {
    /// Every kind, for reports.
    pub const ALL: [StorageError; 7] = [
        StorageError::NotFound,
        StorageError::NoMem,
        StorageError::Busy,
        StorageError::Deadlock,
        StorageError::TimedOut,
        StorageError::Again,
        StorageError::NoTask,
    ];

    /// Short name (errno style).
    pub fn name(self) -> &'static str {
        match self {
            StorageError::NotFound => "ENOENT",
            StorageError::NoMem => "ENOMEM",
            StorageError::Busy => "EBUSY",
            StorageError::Deadlock => "EDEADLK",
            StorageError::TimedOut => "ETIMEDOUT",
            StorageError::Again => "EAGAIN",
            StorageError::NoTask => "ESRCH",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl core::fmt::Display for StorageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for StorageError {}

/// How a map is built.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// The allocator.
    pub alloc: StorageAlloc,
    /// Recursion handling.
    pub recursion: Recursion,
    /// When the `BpfMemAlloc` allocator refills.
    pub refill: RefillMode,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { alloc: StorageAlloc::SrcuFast, recursion: Recursion::Nolock, refill: RefillMode::AtRegionEnd }
    }
}

/// Counters of one map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageStats {
    /// Elements created.
    pub created: u64,
    /// Elements deleted (by `delete`, owner exit or map drop).
    pub deleted: u64,
    /// Storages (first element of a task) created by this map.
    pub storages_created: u64,
    /// Successful `get` calls.
    pub gets: u64,
    /// Failed calls by kind, indexed as [`StorageError::ALL`].
    pub errors: [u64; 7],
}

impl StorageStats {
    /// Failures of one kind.
    pub fn errors_of(&self, e: StorageError) -> u64 {
        self.errors[e.index()]
    }

    /// Elements alive.
    pub fn live(&self) -> u64 {
        self.created.saturating_sub(self.deleted)
    }
}

// -------------------------------------------------------------------------------------------------------------
// Memory layout
// -------------------------------------------------------------------------------------------------------------

/// The element header (`bpf_local_storage_elem` without the data).
#[repr(C)]
struct SelemHdr {
    rcu: RcuHead,
    snode: AtomicUsize,
    map_node: AtomicUsize,
    /// `*const MapCore`.
    smap: usize,
    /// `*const LocalStorage`.
    storage: usize,
    owner: u32,
    state: AtomicU32,
}

#[repr(C)]
struct Selem<V> {
    hdr: SelemHdr,
    value: V,
}

/// The owner's storage (`bpf_local_storage`).
#[repr(C)]
pub(crate) struct LocalStorage {
    rcu: RcuHead,
    cache: [AtomicUsize; CACHE_SIZE],
    /// Head of the owner list; low bit: the owner has exited.
    list: AtomicUsize,
    refs: AtomicUsize,
    lock: RqLock,
    owner: u32,
    kind: StorageAlloc,
}

/// # Safety
/// `n` is a live element.
unsafe fn snode_link(n: usize) -> *const AtomicUsize {
    (n + offset_of!(SelemHdr, snode)) as *const AtomicUsize
}

/// # Safety
/// `n` is a live element.
unsafe fn map_link(n: usize) -> *const AtomicUsize {
    (n + offset_of!(SelemHdr, map_node)) as *const AtomicUsize
}

fn hdr<'a>(n: usize) -> &'a SelemHdr {
    // SAFETY: callers pass elements reached under the read-side protection (or owned).
    unsafe { &*(n as *const SelemHdr) }
}

fn storage<'a>(s: usize) -> &'a LocalStorage {
    // SAFETY: callers pass storages reached under the read-side protection or holding a reference.
    unsafe { &*(s as *const LocalStorage) }
}

// -------------------------------------------------------------------------------------------------------------
// Recursion guards
// -------------------------------------------------------------------------------------------------------------

static BUSY: [AtomicU32; NR_CPUS] = [const { AtomicU32::new(0) }; NR_CPUS];

/// The per-CPU busy counter held (`bpf_task_storage_trylock`).
struct BusyGuard(Option<usize>);

impl BusyGuard {
    fn try_enter() -> Option<BusyGuard> {
        let Some(c) = cpu::this_cpu() else { return Some(BusyGuard(None)) };
        // Relaxed: the counter orders nothing; it is only touched by this CPU's thread and its handlers, and a
        // read-modify-write cannot be split by a handler.
        if BUSY[c].fetch_add(1, Ordering::Relaxed) != 0 {
            BUSY[c].fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(BusyGuard(Some(c)))
    }

    /// `bpf_task_storage_lock`: unconditional (the owner's exit).
    fn enter() -> BusyGuard {
        let c = cpu::this_cpu();
        if let Some(c) = c {
            BUSY[c].fetch_add(1, Ordering::Relaxed);
        }
        BusyGuard(c)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            BUSY[c].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static ME: u8 = const { 0 };
}

/// An identity of the calling thread for lock words (the address of a thread-local; no allocation).
fn me() -> usize {
    ME.with(|m| m as *const u8 as usize)
}

/// An rqspinlock: a lock word holding the holder's identity; same-thread nesting is a deadlock, a wait longer
/// than [`RQSPIN_TIMEOUT`] a timeout.
#[repr(C)]
struct RqLock(AtomicUsize);

struct RqGuard<'a>(&'a RqLock);

impl RqLock {
    const fn new() -> Self {
        RqLock(AtomicUsize::new(0))
    }

    fn lock(&self) -> Result<RqGuard<'_>, StorageError> {
        let me = me();
        let mut spins = 0u32;
        let mut start: Option<Instant> = None;
        loop {
            // Acquire: pairs with the Release store in `RqGuard::drop` of the previous holder.
            match self.0.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(RqGuard(self)),
                Err(h) if h == me => return Err(StorageError::Deadlock),
                Err(_) => {
                    core::hint::spin_loop();
                    spins += 1;
                    if spins.is_multiple_of(1024) {
                        let t0 = *start.get_or_insert_with(Instant::now);
                        if t0.elapsed() >= RQSPIN_TIMEOUT {
                            return Err(StorageError::TimedOut);
                        }
                    }
                }
            }
        }
    }
}

impl Drop for RqGuard<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire compare-and-swap of the next holder in `RqLock::lock`.
        self.0.0.store(0, Ordering::Release);
    }
}

// -------------------------------------------------------------------------------------------------------------
// Test hooks
// -------------------------------------------------------------------------------------------------------------

/// Test-only points (feature `test-hooks`) where a test lands a signal on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookPoint {
    /// `get`, after the recursion guard (busy counter) is taken, before the lookup.
    GetGuardHeld,
    /// Creation on an existing storage: the element is in its bucket, before the owner-list compare-and-swap
    /// (the storage lock held in `Rqspin` mode).
    CreateBeforeLink,
    /// First creation: storage and element built, before the compare-and-swap that publishes the storage.
    CreateBeforePublish,
    /// `delete`, locks held, before the state compare-and-swap.
    DeleteLocked,
}

hook_points!(HookPoint, hook);

// -------------------------------------------------------------------------------------------------------------
// Process-wide storage allocation
// -------------------------------------------------------------------------------------------------------------

static STORAGE_GROUP: OnceLock<Arc<MemGroup>> = OnceLock::new();
static STORAGE_MA: OnceLock<BpfMemAlloc> = OnceLock::new();
static CACHE_USERS: [AtomicUsize; CACHE_SIZE] = [const { AtomicUsize::new(0) }; CACHE_SIZE];

/// The accounting group charged for every task's storage (the part shared by all its maps).
///
/// # Context
/// Normal context on the first call (creates the group).
pub fn storage_group() -> &'static Arc<MemGroup> {
    STORAGE_GROUP.get_or_init(|| Arc::new(MemGroup::new()))
}

fn storage_ma() -> &'static BpfMemAlloc {
    STORAGE_MA.get().expect("storage allocator set up at map creation")
}

fn alloc_storage(kind: StorageAlloc) -> Option<usize> {
    let p = match kind {
        StorageAlloc::BpfMemAlloc => storage_ma().cache_alloc()?,
        StorageAlloc::KmallocNolock | StorageAlloc::SrcuFast => {
            kmalloc_charged_nolock(size_of::<LocalStorage>(), Gfp::NONE, STORAGE_GROUP.get()?)?
        }
    };
    Some(p.as_ptr() as usize)
}

unsafe fn storage_free_cb(head: NonNull<RcuHead>) {
    // The head is the storage's first field.
    let p = head.as_ptr() as *mut u8;
    if let Some(g) = STORAGE_GROUP.get() {
        // SAFETY: a storage from `kmalloc_charged_nolock` with this group, retired once.
        unsafe { kfree_charged_nolock(p, g) };
    }
}

/// Frees a storage after a Tasks Trace grace period.
fn retire_storage(s: usize) {
    let st = storage(s);
    let head = NonNull::from(&st.rcu);
    match st.kind {
        // SAFETY: the storage came from this allocator and has no reference left.
        StorageAlloc::BpfMemAlloc => unsafe { storage_ma().cache_free_rcu(NonNull::new_unchecked(s as *mut u8)) },
        // SAFETY: as above; the head is inside the storage and unused.
        StorageAlloc::KmallocNolock => unsafe { nolock::call_rcu_tasks_trace(head, storage_free_cb) },
        StorageAlloc::SrcuFast => {
            if let Some(g) = STORAGE_GROUP.get() {
                g.uncharge(nolock::ksize(s as *mut u8));
            }
            // SAFETY: as above; readers hold Tasks Trace sections.
            unsafe { nolock::kfree_srcu_fast_nolock(&RCU_TASKS_TRACE, s as *mut u8, head) }
        }
    }
}

fn storage_put(s: usize) {
    // AcqRel: the last reference sees every user's writes (their Release decrements) before freeing.
    if storage(s).refs.fetch_sub(1, Ordering::AcqRel) == 1 {
        retire_storage(s);
    }
}

/// The owner's exit (called from its pthread key destructor with the storage it swapped out of its record).
pub(crate) fn free_storage_at_exit(s: usize) {
    let _region = IrqRegion::enter();
    let _tt = nolock::rcu_read_lock_tasks_trace();
    let _busy = BusyGuard::enter();
    let st = storage(s);
    // AcqRel: no insertion succeeds after this (their compare-and-swap expects the bit clear); Acquire sees
    // every element linked before.
    st.list.fetch_or(MARK, Ordering::AcqRel);
    // SAFETY: under the Tasks Trace section; the owner list's link word.
    unsafe {
        list::find(&st.list, snode_link, |n| {
            if try_kill(n) {
                kill_linked(n);
            }
            None::<()>
        })
    };
    storage_put(s);
}

/// Moves an element to `DEAD`; true for the context that did it (which must then call [`kill_linked`]).
fn try_kill(n: usize) -> bool {
    let h = hdr(n);
    // SeqCst: part of the Dekker pair described below.
    let mut cur = h.state.load(Ordering::SeqCst);
    while cur != DEAD {
        // SeqCst: pairs with the SeqCst cache store and state load in `cache_it` (a Dekker pair: either the
        // cacher sees DEAD, or this context's cache clear in `kill_linked` sees the cached pointer).
        match h.state.compare_exchange(cur, DEAD, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
    false
}

/// Unlinks a killed element from its owner list and its bucket, frees it after a grace period and drops its
/// reference on the storage.
fn kill_linked(n: usize) {
    let h = hdr(n);
    // AcqRel: the marks are what every walker's Acquire load of the link sees before skipping the node.
    h.snode.fetch_or(MARK, Ordering::AcqRel);
    h.map_node.fetch_or(MARK, Ordering::AcqRel);
    // SAFETY: the map outlives its elements' deaths (its drop waits for every Tasks Trace section).
    let map = unsafe { &*(h.smap as *const MapCore) };
    let s = h.storage;
    let st = storage(s);
    // SeqCst: see `try_kill`.
    let _ = st.cache[map.cache_idx].compare_exchange(n, 0, Ordering::SeqCst, Ordering::Relaxed);
    // SAFETY: under the caller's Tasks Trace section; the matching link words.
    unsafe {
        list::clean(&st.list, snode_link);
        list::clean(map.bucket(n), map_link);
    }
    map.deleted.fetch_add(1, Ordering::Relaxed);
    map.retire_selem(n);
    storage_put(s);
}

// -------------------------------------------------------------------------------------------------------------
// The map
// -------------------------------------------------------------------------------------------------------------

struct MapCore {
    buckets: [AtomicUsize; NBUCKETS],
    bucket_locks: [RqLock; NBUCKETS],
    cache_idx: usize,
    alloc: StorageAlloc,
    recursion: Recursion,
    elem_size: usize,
    ma: Option<BpfMemAlloc>,
    group: Arc<MemGroup>,
    created: AtomicU64,
    deleted: AtomicU64,
    storages_created: AtomicU64,
    gets: AtomicU64,
    errors: [AtomicU64; 7],
}

unsafe fn selem_free_cb(head: NonNull<RcuHead>) {
    let n = head.as_ptr() as usize;
    // SAFETY: the map's drop waits for these callbacks (rcu_barrier_tasks_trace) before it frees itself.
    let map = unsafe { &*(hdr(n).smap as *const MapCore) };
    // SAFETY: an element from `kmalloc_charged_nolock` with the map's group, retired once.
    unsafe { kfree_charged_nolock(n as *mut u8, &map.group) };
}

impl MapCore {
    fn bucket(&self, n: usize) -> &AtomicUsize {
        &self.buckets[Self::bucket_idx(n)]
    }

    fn bucket_idx(n: usize) -> usize {
        ((n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % NBUCKETS
    }

    fn fail<T>(&self, e: StorageError) -> Result<T, StorageError> {
        self.errors[e.index()].fetch_add(1, Ordering::Relaxed);
        Err(e)
    }

    fn alloc_selem(&self) -> Option<usize> {
        let p = match self.alloc {
            StorageAlloc::BpfMemAlloc => self.ma.as_ref()?.cache_alloc()?,
            StorageAlloc::KmallocNolock | StorageAlloc::SrcuFast => {
                kmalloc_charged_nolock(self.elem_size, Gfp::NONE, &self.group)?
            }
        };
        Some(p.as_ptr() as usize)
    }

    /// Frees an element nobody else ever saw.
    fn free_selem_now(&self, n: usize) {
        match self.alloc {
            // SAFETY: from this map's allocator, never published.
            StorageAlloc::BpfMemAlloc => unsafe {
                self.ma.as_ref().expect("allocator").cache_free(NonNull::new_unchecked(n as *mut u8))
            },
            // SAFETY: as above.
            _ => unsafe { kfree_charged_nolock(n as *mut u8, &self.group) },
        }
    }

    /// Frees an element after a Tasks Trace grace period.
    fn retire_selem(&self, n: usize) {
        let head = NonNull::from(&hdr(n).rcu);
        match self.alloc {
            // SAFETY: from this map's allocator, unlinked from both lists.
            StorageAlloc::BpfMemAlloc => unsafe {
                self.ma.as_ref().expect("allocator").cache_free_rcu(NonNull::new_unchecked(n as *mut u8))
            },
            // SAFETY: as above; the head is inside the element and unused.
            StorageAlloc::KmallocNolock => unsafe { nolock::call_rcu_tasks_trace(head, selem_free_cb) },
            StorageAlloc::SrcuFast => {
                self.group.uncharge(nolock::ksize(n as *mut u8));
                // SAFETY: as above; every reader holds a Tasks Trace section.
                unsafe { nolock::kfree_srcu_fast_nolock(&RCU_TASKS_TRACE, n as *mut u8, head) }
            }
        }
    }

    fn me(&self) -> usize {
        self as *const MapCore as usize
    }

    fn is_mine_alive(&self, n: usize) -> bool {
        let h = hdr(n);
        // Acquire: pairs with the AcqRel LINKING -> LIVE compare-and-swap of the creator (and the SeqCst kill).
        h.smap == self.me() && h.state.load(Ordering::Acquire) != DEAD
    }

    /// The element of this map in storage `s`, caching it.
    fn lookup(&self, s: usize) -> Option<usize> {
        let st = storage(s);
        // Acquire: pairs with the SeqCst store in `cache_it` (which publishes a linked element).
        let c = st.cache[self.cache_idx].load(Ordering::Acquire);
        if c != 0 && self.is_mine_alive(c) {
            return Some(c);
        }
        // SAFETY: under the Tasks Trace section of the caller; the owner list's link word.
        let found = unsafe {
            list::find(&st.list, snode_link, |n| {
                // Acquire: pairs with the marking fetch_or in `kill_linked`.
                (self.is_mine_alive(n) && hdr(n).snode.load(Ordering::Acquire) & MARK == 0).then_some(n)
            })
        }?;
        self.cache_it(st, found);
        Some(found)
    }

    fn cache_it(&self, st: &LocalStorage, n: usize) {
        let slot = &st.cache[self.cache_idx];
        // SeqCst: a Dekker pair with `try_kill` / `kill_linked` (see `try_kill`).
        slot.store(n, Ordering::SeqCst);
        if hdr(n).state.load(Ordering::SeqCst) == DEAD {
            let _ = slot.compare_exchange(n, 0, Ordering::SeqCst, Ordering::Relaxed);
        }
    }

    /// Builds a new element for `s` (state `LINKING`), with the value written by `init`, and links it into its
    /// bucket. Takes a reference on `s`.
    fn new_selem(&self, s: usize, owner: u32, init: &mut dyn FnMut(*mut u8)) -> Result<usize, StorageError> {
        let Some(n) = self.alloc_selem() else { return self.fail(StorageError::NoMem) };
        // SAFETY: `n` is a fresh element of `elem_size` bytes, owned here.
        unsafe {
            core::ptr::write(
                n as *mut SelemHdr,
                SelemHdr {
                    rcu: RcuHead::new(),
                    snode: AtomicUsize::new(0),
                    map_node: AtomicUsize::new(0),
                    smap: self.me(),
                    storage: s,
                    owner,
                    state: AtomicU32::new(LINKING),
                },
            );
        }
        init(n as *mut u8);
        storage(s).refs.fetch_add(1, Ordering::Relaxed);
        let _bl = if self.recursion == Recursion::Rqspin {
            match self.bucket_locks[Self::bucket_idx(n)].lock() {
                Ok(g) => Some(g),
                Err(e) => {
                    storage(s).refs.fetch_sub(1, Ordering::Relaxed);
                    self.free_selem_now(n);
                    return self.fail(e);
                }
            }
        } else {
            None
        };
        // SAFETY: `n` is not on the bucket yet; the bucket list uses `map_node`.
        unsafe { list::push(self.bucket(n), n, map_link) };
        Ok(n)
    }

    /// Kills an element whose creator lost (it is in its bucket, not on the owner list).
    fn undo_selem(&self, n: usize) {
        let won = try_kill(n);
        debug_assert!(won, "an element not on its owner list is killed only by its creator");
        if won {
            kill_linked(n);
            self.deleted.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn get_raw(&self, task: &Task, create: bool, init: &mut dyn FnMut(*mut u8)) -> Result<usize, StorageError> {
        let rec = task.record();
        // Acquire: pairs with the AcqRel compare-and-swap that published the storage.
        let w = rec.storage.load(Ordering::Acquire);
        if w == owner::DEAD {
            return self.fail(StorageError::NoTask);
        }
        if w != 0
            && let Some(n) = self.lookup(w)
        {
            return Ok(n);
        }
        if !create {
            return self.fail(StorageError::NotFound);
        }
        loop {
            // Acquire: as above.
            let w = rec.storage.load(Ordering::Acquire);
            if w == owner::DEAD {
                return self.fail(StorageError::NoTask);
            }
            if w == 0 {
                match self.create_first(rec, task.id(), init)? {
                    Some(n) => return Ok(n),
                    None if self.recursion == Recursion::Nolock => continue,
                    None => return self.fail(StorageError::Again),
                }
            }
            return self.create_in(w, task.id(), init);
        }
    }

    /// First element of a task: builds the storage and publishes it. `Ok(None)`: another context published
    /// one first (everything built here was undone).
    fn create_first(
        &self,
        rec: &owner::Record,
        owner: u32,
        init: &mut dyn FnMut(*mut u8),
    ) -> Result<Option<usize>, StorageError> {
        let Some(s) = alloc_storage(self.alloc) else { return self.fail(StorageError::NoMem) };
        // SAFETY: a fresh storage, owned here until published.
        unsafe {
            core::ptr::write(
                s as *mut LocalStorage,
                LocalStorage {
                    rcu: RcuHead::new(),
                    cache: [const { AtomicUsize::new(0) }; CACHE_SIZE],
                    list: AtomicUsize::new(0),
                    refs: AtomicUsize::new(1),
                    lock: RqLock::new(),
                    owner,
                    kind: self.alloc,
                },
            );
        }
        let n = match self.new_selem(s, owner, init) {
            Ok(n) => n,
            Err(e) => {
                storage_put(s);
                return Err(e);
            }
        };
        let st = storage(s);
        // Relaxed: published by the Release of the compare-and-swap below.
        st.list.store(n, Ordering::Relaxed);
        st.cache[self.cache_idx].store(n, Ordering::Relaxed);
        hook(HookPoint::CreateBeforePublish);
        // AcqRel: Release publishes the storage and its first element (pairs with the Acquire loads of the
        // record's word in `get_raw` and the exit's swap); Acquire on failure reads the winner's storage.
        match rec.storage.compare_exchange(0, s, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                let _ = hdr(n).state.compare_exchange(LINKING, LIVE, Ordering::AcqRel, Ordering::Relaxed);
                self.created.fetch_add(1, Ordering::Relaxed);
                self.storages_created.fetch_add(1, Ordering::Relaxed);
                Ok(Some(n))
            }
            Err(_) => {
                // Never published: drop the first element (it is in its bucket) and the storage with it.
                st.list.store(0, Ordering::Relaxed);
                self.undo_selem(n);
                storage_put(s);
                Ok(None)
            }
        }
    }

    /// An element in an existing storage `s`.
    fn create_in(&self, s: usize, owner: u32, init: &mut dyn FnMut(*mut u8)) -> Result<usize, StorageError> {
        let st = storage(s);
        let _sl = if self.recursion == Recursion::Rqspin {
            match st.lock.lock() {
                Ok(g) => Some(g),
                Err(e) => return self.fail(e),
            }
        } else {
            None
        };
        let mut new = 0usize;
        loop {
            // Acquire: pairs with the Release compare-and-swap of the last insertion.
            let h = st.list.load(Ordering::Acquire);
            if h & MARK != 0 {
                if new != 0 {
                    self.undo_selem(new);
                }
                return self.fail(StorageError::NoTask);
            }
            // Look from exactly `h`: if the compare-and-swap below succeeds, nothing was inserted since.
            let mut cur = h;
            let mut existing = 0usize;
            while cur != 0 {
                // Acquire: pairs with the marking in `kill_linked` and the insertion's Release.
                let l = hdr(cur).snode.load(Ordering::Acquire);
                if l & MARK == 0 && self.is_mine_alive(cur) {
                    existing = cur;
                    break;
                }
                cur = l & !MARK;
            }
            if existing != 0 {
                if new != 0 {
                    self.undo_selem(new);
                }
                self.cache_it(st, existing);
                return Ok(existing);
            }
            if new == 0 {
                new = self.new_selem(s, owner, init)?;
                continue;
            }
            hdr(new).snode.store(h, Ordering::Relaxed);
            hook(HookPoint::CreateBeforeLink);
            // Release: publishes the element (pairs with the Acquire loads of walkers).
            if st.list.compare_exchange(h, new, Ordering::Release, Ordering::Relaxed).is_ok() {
                let _ = hdr(new).state.compare_exchange(LINKING, LIVE, Ordering::AcqRel, Ordering::Relaxed);
                self.created.fetch_add(1, Ordering::Relaxed);
                self.cache_it(st, new);
                return Ok(new);
            }
        }
    }

    fn delete_raw(&self, task: &Task) -> Result<(), StorageError> {
        // Acquire: pairs with the publication of the storage.
        let w = task.record().storage.load(Ordering::Acquire);
        if w == 0 || w == owner::DEAD {
            return self.fail(StorageError::NotFound);
        }
        let st = storage(w);
        let _sl = if self.recursion == Recursion::Rqspin {
            match st.lock.lock() {
                Ok(g) => Some(g),
                Err(e) => return self.fail(e),
            }
        } else {
            None
        };
        let Some(n) = self.lookup(w) else { return self.fail(StorageError::NotFound) };
        let _bl = if self.recursion == Recursion::Rqspin {
            match self.bucket_locks[Self::bucket_idx(n)].lock() {
                Ok(g) => Some(g),
                Err(e) => return self.fail(e),
            }
        } else {
            None
        };
        hook(HookPoint::DeleteLocked);
        if !try_kill(n) {
            return self.fail(StorageError::NotFound);
        }
        drop(_bl);
        kill_linked(n);
        Ok(())
    }
}

/// A task storage map: one `V` per task (`BPF_MAP_TYPE_TASK_STORAGE`).
///
/// `V` must not need dropping (as BPF values: plain data and atomics); use interior mutability to change a
/// value in place.
pub struct TaskStorage<V> {
    core: Box<MapCore>,
    _v: PhantomData<V>,
}

// SAFETY: all shared state is atomic or per-thread; values are `Sync` and reached through shared references.
unsafe impl<V: Send + Sync> Send for TaskStorage<V> {}
// SAFETY: as above.
unsafe impl<V: Send + Sync> Sync for TaskStorage<V> {}

/// A value returned by [`TaskStorage::get`]: valid while the guard lives (it holds the read-side sections).
pub struct StorageRef<'a, V> {
    value: &'a V,
    _tt: SrcuFastGuard<'static>,
    _region: IrqRegion,
}

impl<V> core::ops::Deref for StorageRef<'_, V> {
    type Target = V;
    fn deref(&self) -> &V {
        self.value
    }
}

impl<V: Send + Sync> TaskStorage<V> {
    const CHECK: () = {
        assert!(!core::mem::needs_drop::<V>(), "TaskStorage values must not need drop");
        assert!(core::mem::align_of::<V>() <= 8, "TaskStorage values are at most 8-byte aligned");
    };

    /// Creates a map (`map_alloc`).
    ///
    /// # Context
    /// Normal context only: allocates with the global allocator, may create the thread-exit pthread key, the
    /// process-wide storage allocator and, for `BpfMemAlloc`, the map's allocator (see [`BpfMemAlloc::new`]).
    pub fn new(cfg: StorageConfig) -> Result<Self, StorageError> {
        #[allow(clippy::let_unit_value)]
        let _ = Self::CHECK;
        owner::ensure_key();
        let sgroup = storage_group().clone();
        if cfg.alloc == StorageAlloc::BpfMemAlloc && STORAGE_MA.get().is_none() {
            let ma = BpfMemAlloc::new(
                Some(size_of::<LocalStorage>()),
                BpfMaConfig { refill: cfg.refill, percpu: false, group: Some(sgroup) },
            )
            .map_err(|_| StorageError::NoMem)?;
            let _ = STORAGE_MA.set(ma);
        }
        let group = Arc::new(MemGroup::new());
        let elem_size = size_of::<Selem<V>>();
        let ma = match cfg.alloc {
            StorageAlloc::BpfMemAlloc => Some(
                BpfMemAlloc::new(
                    Some(elem_size),
                    BpfMaConfig { refill: cfg.refill, percpu: false, group: Some(group.clone()) },
                )
                .map_err(|_| StorageError::NoMem)?,
            ),
            _ => None,
        };
        // The least used cache index (`bpf_local_storage_cache_idx_get`).
        let cache_idx = (0..CACHE_SIZE).min_by_key(|&i| CACHE_USERS[i].load(Ordering::Relaxed)).unwrap_or(0);
        CACHE_USERS[cache_idx].fetch_add(1, Ordering::Relaxed);
        Ok(TaskStorage {
            core: Box::new(MapCore {
                buckets: [const { AtomicUsize::new(0) }; NBUCKETS],
                bucket_locks: [const { RqLock::new() }; NBUCKETS],
                cache_idx,
                alloc: cfg.alloc,
                recursion: cfg.recursion,
                elem_size,
                ma,
                group,
                created: AtomicU64::new(0),
                deleted: AtomicU64::new(0),
                storages_created: AtomicU64::new(0),
                gets: AtomicU64::new(0),
                errors: [const { AtomicU64::new(0) }; 7],
            }),
            _v: PhantomData,
        })
    }

    /// `bpf_task_storage_get`: `task`'s value, created with `init()` under [`GetFlags::CREATE`] if absent.
    /// `init` runs at most once, before the value is published, in the calling context.
    pub fn get(
        &self,
        task: &Task,
        flags: GetFlags,
        init: impl FnOnce() -> V,
    ) -> Result<StorageRef<'_, V>, StorageError> {
        let region = IrqRegion::enter();
        let tt = nolock::rcu_read_lock_tasks_trace();
        let busy = match self.core.recursion {
            Recursion::PerCpuBusy => match BusyGuard::try_enter() {
                Some(b) => Some(b),
                None => return self.core.fail(StorageError::Busy),
            },
            _ => None,
        };
        hook(HookPoint::GetGuardHeld);
        let mut init = Some(init);
        // Where `init`'s value was written first. `write` can be called twice: in `Nolock` mode a first creation
        // that loses the race to publish the task's storage (a signal handler on this thread published one,
        // for another map, between this call's `create_first` and its compare-and-swap) undoes its element and
        // creates a new one in the winner's storage. `init` has run already (at most once, as documented), so
        // the value moves from the undone element, whose memory stays valid: it is freed after a Tasks Trace
        // grace period and this call holds a section. (Before, the new element's value was never written:
        // tests/single_step_maps.rs, `task_storage_creation_at_each_instruction`.)
        let mut first: *const V = core::ptr::null();
        let mut write = |p: *mut u8| {
            // SAFETY: `p` is a fresh element of `Selem<V>` layout, owned by the caller until published.
            let dst = unsafe { &raw mut (*(p as *mut Selem<V>)).value };
            if let Some(f) = init.take() {
                // SAFETY: as above.
                unsafe { core::ptr::write(dst, f()) };
                first = dst;
            } else if !first.is_null() {
                // SAFETY: `first` is the value of the undone element (valid, see above, and never published,
                // so nobody else reads it or will drop it: `V` needs no drop); `dst` is as above.
                unsafe { core::ptr::copy_nonoverlapping(first, dst, 1) };
            }
        };
        let n = self.core.get_raw(task, flags == GetFlags::CREATE, &mut write)?;
        drop(busy);
        self.core.gets.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `n` is an element of this map (so of `Selem<V>` layout), alive while the Tasks Trace section
        // held by the returned guard lasts.
        let value = unsafe { &(*(n as *const Selem<V>)).value };
        Ok(StorageRef { value, _tt: tt, _region: region })
    }

    /// `get` for the calling thread.
    pub fn get_current(&self, flags: GetFlags, init: impl FnOnce() -> V) -> Result<StorageRef<'_, V>, StorageError> {
        let Some(t) = Task::current() else { return self.core.fail(StorageError::NoTask) };
        self.get(&t, flags, init)
    }

    /// `bpf_task_storage_delete`.
    pub fn delete(&self, task: &Task) -> Result<(), StorageError> {
        let _region = IrqRegion::enter();
        let _tt = nolock::rcu_read_lock_tasks_trace();
        let _busy = match self.core.recursion {
            Recursion::PerCpuBusy => match BusyGuard::try_enter() {
                Some(b) => Some(b),
                None => return self.core.fail(StorageError::Busy),
            },
            _ => None,
        };
        self.core.delete_raw(task)
    }

    /// Calls `f(task id, value)` for every live element (the map's iterator). Elements created or deleted
    /// during the walk may or may not be seen; no element is seen twice.
    pub fn for_each(&self, mut f: impl FnMut(u32, &V)) {
        let _region = IrqRegion::enter();
        let _tt = nolock::rcu_read_lock_tasks_trace();
        let mut visit = |n: usize| {
            let h = hdr(n);
            // Only LIVE elements: one still LINKING may be a creation that lost its race and is being undone
            // (the task would be seen twice). Acquire: pairs with the creator's AcqRel LINKING -> LIVE.
            if h.state.load(Ordering::Acquire) == LIVE && h.map_node.load(Ordering::Acquire) & MARK == 0 {
                // SAFETY: an element of this map, alive during the section.
                f(h.owner, unsafe { &(*(n as *const Selem<V>)).value });
            }
            None::<()>
        };
        for b in &self.core.buckets {
            // SAFETY: under the Tasks Trace section; buckets use `map_node`.
            unsafe { list::find(b, map_link, &mut visit) };
        }
    }

    /// Counters.
    pub fn stats(&self) -> StorageStats {
        let c = &self.core;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut errors = [0u64; 7];
        for (i, e) in c.errors.iter().enumerate() {
            errors[i] = l(e);
        }
        StorageStats {
            created: l(&c.created),
            deleted: l(&c.deleted),
            storages_created: l(&c.storages_created),
            gets: l(&c.gets),
            errors,
        }
    }

    /// The map's accounting group (its elements; storages are in [`storage_group`]).
    pub fn group(&self) -> &Arc<MemGroup> {
        &self.core.group
    }

    /// Objects this map's allocator took from `kmalloc_nolock` (`BpfMemAlloc` only; `None` otherwise).
    pub fn allocator_kmallocs(&self) -> Option<u64> {
        self.core.ma.as_ref().map(|m| m.stats().kmallocs)
    }

    /// Size of one element (header and value).
    pub fn elem_size(&self) -> usize {
        self.core.elem_size
    }

    /// The allocator.
    pub fn alloc_kind(&self) -> StorageAlloc {
        self.core.alloc
    }
}

/// The kmalloc class a `BpfMemAlloc` unit of `size` bytes (plus its header) comes from.
fn ma_unit_bytes(size: usize) -> usize {
    let unit = size + crate::memalloc::LLIST_NODE_SZ;
    nolock::KMALLOC_SIZES.iter().copied().find(|&c| c >= unit).unwrap_or(unit)
}

fn ma_cached(ma: &BpfMemAlloc, size: usize) -> usize {
    let ncpu = NR_CPUS.min(nolock::thread::count() as usize);
    (0..ncpu).map(|c| ma.free_count(c, 0).max(0) as usize).sum::<usize>() * ma_unit_bytes(size)
}

impl<V> TaskStorage<V> {
    /// Bytes of free objects sitting in the per-CPU `free_llist`s of the `BpfMemAlloc` allocators (this map's
    /// elements and the process-wide storages): charged, but not in use. 0 for the other allocators.
    pub fn allocator_cached_bytes(&self) -> usize {
        let Some(ma) = self.core.ma.as_ref() else { return 0 };
        ma_cached(ma, self.core.elem_size) + STORAGE_MA.get().map_or(0, |s| ma_cached(s, size_of::<LocalStorage>()))
    }
}

/// Objects the process-wide `BpfMemAlloc` for storages took from `kmalloc_nolock` (0 before one exists).
pub fn storage_allocator_kmallocs() -> u64 {
    STORAGE_MA.get().map_or(0, |m| m.stats().kmallocs)
}

/// Size of one task's storage.
pub const fn storage_size() -> usize {
    size_of::<LocalStorage>()
}

impl<V> Drop for TaskStorage<V> {
    /// `map_free`: deletes every element (unlinking each from its owner), waits for every reader and every
    /// free callback, then frees the map.
    ///
    /// # Context
    /// Normal context only: blocks (Tasks Trace grace period and barrier).
    fn drop(&mut self) {
        let core = &*self.core;
        {
            let _region = IrqRegion::enter();
            let _tt = nolock::rcu_read_lock_tasks_trace();
            for b in &core.buckets {
                // SAFETY: under the Tasks Trace section; buckets use `map_node`.
                unsafe {
                    list::find(b, map_link, |n| {
                        if try_kill(n) {
                            kill_linked(n);
                        }
                        None::<()>
                    })
                };
            }
        }
        // Owners that exit meanwhile may be freeing elements of this map inside their sections, and free
        // callbacks read the map: wait for both.
        nolock::synchronize_rcu_tasks_trace();
        nolock::rcu_barrier_tasks_trace();
        CACHE_USERS[core.cache_idx].fetch_sub(1, Ordering::Relaxed);
        // `core` (with its allocator, whose own drop waits for its callbacks) is freed with the Box.
    }
}
