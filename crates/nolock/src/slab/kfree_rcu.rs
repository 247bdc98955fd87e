//! `kfree_rcu_nolock` and `kfree_srcu_fast_nolock`: free an object after a grace period, from any context.
//!
//! This is the slab layer's: the pointer blocks come from `kmalloc_nolock` and go back to it, and the objects
//! they hold are freed with `kfree_nolock` (the kernel moved `kvfree_rcu` into its slab allocator in its 2025
//! slab series for the same reason). The RCU layer only gives it what any user gets: callbacks, grace-period
//! cookies ([`GracePeriod`]) and their "is this one done" check. The grace-period worker frees ready blocks and
//! ages partial ones through the `GpClient` hooks registered by `process` (`GP_CLIENT`).
//!
//! # Batching
//!
//! Like the kernel's `kvfree_rcu`, pointers are collected in per-thread *pointer blocks* (4 KiB, allocated with
//! `kmalloc_nolock`, 508 pointers each). A full block is freed as one unit after its grace period; the object's
//! own [`RcuHead`] is not touched, so retiring a cold object does not pull it into the cache. Each thread has one
//! block for RCU and one for SRCU-fast (tagged with its domain; retiring into another domain queues the current
//! block first), in this file's own table indexed by thread slot.
//!
//! The block is per-thread state guarded by a [`LocalTryLock`]. When it cannot be used — a signal handler
//! interrupted the owner inside this code, the block is claimed by the worker, or no block can be allocated —
//! the object goes through its own head instead: a grace-period callback (`free_by_head`) that finds the object
//! the head lies in through the page descriptors and frees it. The head may lie anywhere inside the object; one
//! that does not (or a pointer that is no nolock object) is reported at once and the object is leaked, never
//! freed too early. So retiring never fails.
//!
//! # Freeing, and keeping a retire flood bounded
//!
//! A full block does not go through the callback machinery: it is stamped with the cookie of the grace period
//! it needs and put, in order, on its domain's *block ring* (a bounded multi-producer multi-consumer ring,
//! `BlockRing`; RCU's is static, each SRCU-fast domain's is allocated on its first full block). Whoever finds
//! the oldest block's grace period over may take it and free its pointers: the grace-period worker after each
//! pass, and — the backpressure — every thread that fills a block of its own frees up to two ready blocks on
//! the spot (bounded work: at most 1016 `kfree`s). So the threads that retire memory also free it, in
//! proportion, and a `kfree_rcu_nolock` flood does not depend on the worker getting CPU. (Only if a ring is
//! full, or could not be allocated, does a block fall back to a grace-period callback run by the worker.)
//!
//! # Getting partial blocks out
//!
//! A block that is not full would wait forever on an idle thread, so the grace-period worker *ages* blocks:
//! every few milliseconds it claims the blocks that are at least two ticks old (claim, `membarrier`, wait for
//! the owner to leave its critical section — the [`LocalTryLock`] protocol) and queues them. Barriers
//! (`rcu_barrier`, `srcu_barrier`) do the same for every block of their grace period before entraining, and a
//! thread's exit (the slab layer's slot hooks) queues its own blocks.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::page::Gfp;
use crate::rcu::srcu::SrcuFast;
use crate::rcu::{GpClient, GracePeriod, RcuHead};
use crate::sync::local_lock::{LocalTryLock, TryLock};
use crate::thread::MAX_THREADS;

/// Bytes per pointer block.
const BLOCK_BYTES: usize = 4096;
/// Pointers per block.
const BLOCK_PTRS: usize = (BLOCK_BYTES - core::mem::size_of::<BlockHeader>()) / 8;

#[repr(C)]
struct BlockHeader {
    head: RcuHead,
    count: u32,
    epoch: u32,
    domain: usize,
}

#[repr(C)]
struct PtrBlock {
    hdr: BlockHeader,
    ptrs: [usize; BLOCK_PTRS],
}

const _: () = assert!(core::mem::size_of::<PtrBlock>() <= BLOCK_BYTES);

/// Aging clock, advanced by the worker.
static EPOCH: AtomicU32 = AtomicU32::new(0);

/// Blocks a retiring thread frees each time it fills a block of its own, if their grace period is over: the
/// backpressure that keeps a retire flood bounded.
const HELP_BLOCKS: usize = 2;

/// Cells per ring: blocks that may wait for their grace period per domain (× 508 objects).
const RING_CELLS: usize = 4096;

/// One ring cell. `seq` holds the cell's sequence number minus its index (so zeroed memory is a valid, empty
/// ring): `pos - idx` when free for the producer of position `pos`, `pos - idx + 1` once published, and
/// `pos - idx + RING_CELLS` once the block of position `pos` has been **entirely freed** (which frees the cell
/// for the producer of the next lap).
#[derive(Debug, Default)]
struct Cell {
    seq: AtomicUsize,
    block: AtomicUsize,
    cookie: AtomicU64,
}

/// A domain's ring of blocks waiting for their grace period, in submission order (Dmitry Vyukov's bounded
/// MPMC queue, with one change: a consumer releases the cell only after it has freed the block, so the cells
/// themselves say which blocks are still being freed, and a barrier can wait for exactly the blocks queued
/// before it, never for later ones). Lock-free for producers; a consumer that finds the oldest cell
/// unpublished (its producer was interrupted between claiming and filling it) or its grace period not over
/// simply gets nothing. Zeroed memory is an empty ring.
#[derive(Debug)]
pub(crate) struct BlockRing {
    head: AtomicUsize,
    tail: AtomicUsize,
    cells: [Cell; RING_CELLS],
}

/// A block taken off a ring: free it, then [`BlockRing::release`] its cell.
struct Taken {
    pos: usize,
    block: usize,
}

impl BlockRing {
    /// An empty ring.
    pub(crate) const fn new() -> Self {
        Self {
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
            cells: [const { Cell { seq: AtomicUsize::new(0), block: AtomicUsize::new(0), cookie: AtomicU64::new(0) } };
                RING_CELLS],
        }
    }

    /// Append `block` waiting for `cookie`; false if the ring is full. Any context, lock-free.
    fn push(&self, block: usize, cookie: u64) -> bool {
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let idx = pos % RING_CELLS;
            let c = &self.cells[idx];
            // Acquire: pairs with the consumer's Release in `release`: the previous lap's block is freed.
            let seq = c.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos - idx) as isize;
            if diff == 0 {
                match self.tail.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        c.block.store(block, Ordering::Relaxed);
                        c.cookie.store(cookie, Ordering::Relaxed);
                        // Release: publishes block and cookie to the consumer's Acquire in `pop_done`.
                        c.seq.store(pos - idx + 1, Ordering::Release);
                        return true;
                    }
                    Err(now) => pos = now,
                }
            } else if diff < 0 {
                return false; // full: the cell still holds (or is still freeing) the previous lap's block
            } else {
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Take the oldest block if `done(cookie)` says its grace period is over. Any context, lock-free. The
    /// caller frees the block and then calls [`release`](Self::release).
    fn pop_done(&self, done: impl Fn(u64) -> bool) -> Option<Taken> {
        let mut pos = self.head.load(Ordering::Relaxed);
        loop {
            let idx = pos % RING_CELLS;
            let c = &self.cells[idx];
            // Acquire: pairs with the producer's Release in `push`.
            let seq = c.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos - idx + 1) as isize;
            if diff == 0 {
                if !done(c.cookie.load(Ordering::Relaxed)) {
                    return None;
                }
                match self.head.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return Some(Taken { pos, block: c.block.load(Ordering::Relaxed) }),
                    Err(now) => pos = now,
                }
            } else if diff < 0 {
                return None; // empty, or the oldest cell is not published yet
            } else {
                pos = self.head.load(Ordering::Relaxed);
            }
        }
    }

    /// The block taken at `pos` is entirely freed: give its cell to the next lap's producer.
    fn release(&self, pos: usize) {
        let idx = pos % RING_CELLS;
        // Release: pairs with the Acquire loads in `push` (next lap) and `wait_freed` (barriers): the frees
        // happen before either sees the cell released.
        self.cells[idx].seq.store(pos - idx + RING_CELLS, Ordering::Release);
    }

    /// Whether the block of position `pos` has been entirely freed (or the cell has moved on past it).
    fn freed(&self, pos: usize) -> bool {
        let idx = pos % RING_CELLS;
        // Acquire: pairs with the Release in `release`.
        let seq = self.cells[idx].seq.load(Ordering::Acquire);
        seq.wrapping_sub(pos - idx) as isize >= RING_CELLS as isize
    }

    /// Whether blocks are waiting.
    fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) == self.tail.load(Ordering::Relaxed)
    }

    /// In a fork child: a producer that is gone may have claimed a position without publishing it, and a
    /// consumer that is gone may have taken a block without releasing its cell. Publish the former as empty
    /// (block 0, skipped) and release the latter (its block leaks in the child), so that no barrier or
    /// producer waits for them.
    fn after_fork_child(&self) {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        for pos in head.saturating_sub(RING_CELLS)..head {
            let idx = pos % RING_CELLS;
            if self.cells[idx].seq.load(Ordering::Relaxed) == pos - idx + 1 {
                self.release(pos);
            }
        }
        for pos in head..tail {
            let idx = pos % RING_CELLS;
            let c = &self.cells[idx];
            if c.seq.load(Ordering::Relaxed) == pos - idx {
                c.block.store(0, Ordering::Relaxed);
                c.cookie.store(0, Ordering::Relaxed);
                // Release: pairs with the Acquire load of `seq` in `pop_done`: block and cookie (zero) are visible.
                c.seq.store(pos - idx + 1, Ordering::Release);
            }
        }
    }
}

impl Default for BlockRing {
    fn default() -> Self {
        Self::new()
    }
}

/// The RCU domain's block ring.
static RCU_RING: BlockRing = BlockRing::new();

/// SRCU-fast domains whose blocks can have a ring; the blocks of further domains take the callback fallback.
const SRCU_RINGS: usize = 64;

/// Rings for the first SRCU-fast domains, in the executable's zero-initialised data (what the first four
/// domains' tables held before the rings moved here); further domains' rings are allocated from the arena.
const STATIC_RINGS: usize = 4;
static STATIC_RING_POOL: [BlockRing; STATIC_RINGS] = [const { BlockRing::new() }; STATIC_RINGS];
static STATIC_RINGS_USED: AtomicU32 = AtomicU32::new(0);

/// An SRCU-fast domain's ring: the domain's [`GracePeriod::id`] (0: entry unused) and the ring, set by the
/// thread that claimed the entry (null: not yet, or no memory then: that domain's blocks take the callback
/// fallback). Neither is ever cleared: a domain's table outlives it and is reused by a later domain, which
/// inherits the ring (empty after the old domain's final barrier) with it.
struct DomainRing {
    domain: AtomicUsize,
    ring: AtomicPtr<BlockRing>,
}

static DOMAIN_RINGS: [DomainRing; SRCU_RINGS] =
    [const { DomainRing { domain: AtomicUsize::new(0), ring: AtomicPtr::new(core::ptr::null_mut()) } }; SRCU_RINGS];

/// The ring of `gp`'s blocks, if it has one; with `create`, an SRCU-fast domain that has no entry yet gets one
/// and its ring (a static one, or an arena allocation; none if the arena is out of memory or every entry is
/// taken).
///
/// # Context
/// Any context: lock-free; `create` may allocate with `kmalloc_nolock`.
fn ring_of(gp: GracePeriod, create: bool) -> Option<&'static BlockRing> {
    if gp.is_rcu() {
        return Some(&RCU_RING);
    }
    let id = gp.id();
    // Acquire: pairs with the Release store of the ring below (a ring seen is initialised).
    let found = |e: &DomainRing| (e.domain.load(Ordering::Acquire) == id).then(|| e.ring.load(Ordering::Acquire));
    if let Some(r) = DOMAIN_RINGS.iter().find_map(found) {
        // SAFETY: rings are never freed (null: none).
        return unsafe { r.as_ref() };
    }
    if !create {
        return None;
    }
    for e in &DOMAIN_RINGS {
        // AcqRel: one claimer per entry; only the claimer sets the ring, so none is ever made twice.
        match e.domain.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            // Another context claimed this domain's entry a moment ago and may still be setting its ring.
            // SAFETY: as above.
            Err(cur) if cur == id => return unsafe { e.ring.load(Ordering::Acquire).as_ref() },
            Err(_) => continue,
        }
        let n = STATIC_RINGS_USED.fetch_add(1, Ordering::Relaxed) as usize;
        let ring: *mut BlockRing = if n < STATIC_RINGS {
            &STATIC_RING_POOL[n] as *const BlockRing as *mut BlockRing
        } else {
            crate::kmalloc_nolock(core::mem::size_of::<BlockRing>(), Gfp::ZERO)?.as_ptr().cast()
        };
        // Release: publishes the (zeroed: empty) ring to the Acquire loads above.
        e.ring.store(ring, Ordering::Release);
        // SAFETY: static, or ours from the arena and never freed.
        return Some(unsafe { &*ring });
    }
    None
}

/// Every ring there is, with its grace period.
fn for_each_ring(mut f: impl FnMut(GracePeriod, &'static BlockRing)) {
    f(GracePeriod::RCU, &RCU_RING);
    for e in &DOMAIN_RINGS {
        let id = e.domain.load(Ordering::Acquire);
        // Acquire: as in `ring_of`.
        let r = e.ring.load(Ordering::Acquire);
        if id != 0 && !r.is_null() {
            // SAFETY: entries hold `GracePeriod::id` values; rings are never freed.
            f(unsafe { GracePeriod::from_id(id) }, unsafe { &*r });
        }
    }
}

/// Which of a thread's two block slots holds blocks of `gp`: 0 for RCU, 1 for SRCU-fast domains.
fn slot_index(gp: GracePeriod) -> usize {
    usize::from(!gp.is_rcu())
}

/// One per-thread block slot.
#[derive(Debug, Default)]
pub(crate) struct KfreeSlot {
    lock: LocalTryLock,
    /// The current block (0: none).
    block: AtomicUsize,
}

/// The per-thread table of block slots, indexed by thread slot: `[RCU, SRCU-fast]` for each. Zeroed memory is
/// a table of empty, unlocked slots.
static SLOTS: [[KfreeSlot; 2]; MAX_THREADS] = [const {
    [
        KfreeSlot { lock: LocalTryLock::new(), block: AtomicUsize::new(0) },
        KfreeSlot { lock: LocalTryLock::new(), block: AtomicUsize::new(0) },
    ]
}; MAX_THREADS];

/// Free every pointer of a block, then the block.
///
/// # Safety
/// `b` is a block whose grace period has ended, owned by the caller.
unsafe fn free_block(b: usize) {
    if b == 0 {
        return; // a cell a fork child published empty
    }
    let b = b as *mut PtrBlock;
    // SAFETY: `count` pointers were stored by `retire_in_block`; the caller owns the block.
    unsafe {
        let n = (*b).hdr.count as usize;
        for i in 0..n {
            crate::kfree_nolock((*b).ptrs[i] as *mut u8);
        }
        crate::kfree_nolock(b as *mut u8);
    }
}

/// Grace-period callback of a block that found its ring full.
unsafe fn block_gp_done(head: NonNull<RcuHead>) {
    // SAFETY: blocks are queued with this callback only; the grace period has ended.
    unsafe { free_block(head.as_ptr() as usize) };
}

/// Free up to `max` blocks of `ring` (of `gp`) whose grace period is over; returns how many. Any context
/// (bounded by `max` blocks of 508 frees each).
fn free_done_blocks(gp: GracePeriod, ring: &BlockRing, max: usize) -> usize {
    let mut n = 0;
    while n < max {
        let Some(t) = ring.pop_done(|c| gp.done(c)) else { break };
        // SAFETY: taken off the ring: ours, and its grace period has ended.
        unsafe { free_block(t.block) };
        ring.release(t.pos);
        n += 1;
    }
    n
}

/// The worker's share ([`GpClient::reclaim`]): free every block whose grace period is over, in every domain.
/// Returns whether blocks still wait (the worker keeps driving their grace periods).
fn free_done_blocks_everywhere() -> bool {
    let mut waiting = false;
    for_each_ring(|gp, ring| {
        free_done_blocks(gp, ring, usize::MAX);
        waiting |= !ring.is_empty();
    });
    waiting
}

/// For a barrier: wait until every block queued on `gp`'s ring before this call is entirely freed — driving
/// its grace period, and freeing blocks here when nobody else does — and no longer: blocks queued after the
/// call began are not waited for, so a barrier ends under a steady retire flood too. Normal context (blocks).
fn finish_blocks(gp: GracePeriod) {
    let Some(ring) = ring_of(gp, false) else { return };
    let end = ring.tail.load(Ordering::Acquire);
    if ring.head.load(Ordering::Relaxed) != end {
        // Every block before `end` took its cookie before now, so a grace period that starts after now covers
        // them all.
        gp.wait(gp.snap());
        crate::hooks::point(crate::hooks::Point::KfreeBarrier);
        let done = |c| gp.done(c);
        while (ring.head.load(Ordering::Relaxed).wrapping_sub(end) as isize) < 0 {
            match ring.pop_done(done) {
                Some(t) => {
                    // SAFETY: taken off the ring: ours, and its grace period has ended.
                    unsafe { free_block(t.block) };
                    ring.release(t.pos);
                }
                None => std::thread::yield_now(), // an unpublished cell: its producer finishes in a moment
            }
        }
    }
    // Blocks other threads took before `end` and are still freeing.
    for pos in end.saturating_sub(RING_CELLS)..end {
        while !ring.freed(pos) {
            std::thread::yield_now();
        }
    }
}

fn queue_block(b: usize, gp: GracePeriod) {
    let cookie = gp.snap();
    gp.request(cookie);
    if ring_of(gp, true).is_some_and(|r| r.push(b, cookie)) {
        return; // the worker polls the rings; no wake-up (no system call on this path)
    }
    // The ring is full (or the domain has none): let the worker free the block after the grace period.
    // SAFETY: `b` is a block owned by the caller, handed over to the callback.
    let head = unsafe { NonNull::new_unchecked(b as *mut RcuHead) };
    // SAFETY: the block stays untouched until its callback frees it.
    unsafe { gp.call(head, block_gp_done) };
}

/// Backpressure, after filling a block: free up to [`HELP_BLOCKS`] blocks whose grace period is over. (It does
/// not drive the grace period: that needs `membarrier`, a system call that a `*_nolock` path must not make. The
/// worker drives it.)
fn help(gp: GracePeriod) {
    if let Some(ring) = ring_of(gp, false)
        && !ring.is_empty()
    {
        free_done_blocks(gp, ring, HELP_BLOCKS);
    }
}

fn retire(ptr: *mut u8, head: NonNull<RcuHead>, gp: GracePeriod) {
    if (ptr as usize) < super::kmalloc::ZERO_SIZE_LIMIT {
        return; // null, ZERO_SIZE_PTR: nothing to free (as `kfree_nolock`)
    }
    if let Some(me) = crate::thread::current()
        && retire_in_block(&SLOTS[me as usize], ptr, gp)
    {
        return;
    }
    // Through the object's own head. The callback finds the object from the head, so check now that the head
    // lies inside the object `ptr` starts: otherwise report, and keep the object alive (leak) rather than free
    // the wrong memory, or free it too early.
    let off = (head.as_ptr() as usize).wrapping_sub(ptr as usize);
    if off >= super::kmalloc::ksize(ptr) {
        super::debug::report_kfree_rcu_offset(ptr as usize, off);
        return;
    }
    // SAFETY: the head is inside the object, which nobody touches until the callback frees it (caller).
    unsafe { gp.call(head, free_by_head) };
}

/// Grace-period callback of an object retired through its own head: free the object the head lies in.
unsafe fn free_by_head(head: NonNull<RcuHead>) {
    let obj = super::tables::state_if_init().and_then(|g| super::kmalloc::object_containing(g, head.as_ptr() as usize));
    if let Some(obj) = obj {
        // SAFETY: `retire` checked that the head lies inside this object, which it retired.
        unsafe { crate::kfree_nolock(obj as *mut u8) };
    }
}

fn retire_in_block(mine: &[KfreeSlot; 2], ptr: *mut u8, gp: GracePeriod) -> bool {
    let slot = &mine[slot_index(gp)];
    if slot.lock.try_lock() != TryLock::Locked {
        return false;
    }
    let mut b = slot.block.load(Ordering::Relaxed);
    if b != 0 {
        // SAFETY: the slot's block is ours while we hold the lock.
        let hdr = unsafe { &*(b as *const BlockHeader) };
        if hdr.domain != gp.id() {
            // Empty the slot before queueing: a slot never holds a block that is already queued, so whoever
            // finds it abandoned (a fork child, where this thread no longer exists) may queue what it holds.
            slot.block.store(0, Ordering::Relaxed);
            // SAFETY: block headers hold `GracePeriod::id` values.
            queue_block(b, unsafe { GracePeriod::from_id(hdr.domain) });
            b = 0;
        }
    }
    if b == 0 {
        match crate::kmalloc_nolock(BLOCK_BYTES, Gfp::NONE) {
            Some(p) => {
                b = p.as_ptr() as usize;
                // SAFETY: a fresh 4 KiB object.
                unsafe {
                    (b as *mut BlockHeader).write(BlockHeader {
                        head: RcuHead::new(),
                        count: 0,
                        epoch: EPOCH.load(Ordering::Relaxed),
                        domain: gp.id(),
                    })
                };
                // Release: pairs with the Acquire pre-check in `steal_blocks`, which reads the header.
                slot.block.store(b, Ordering::Release);
            }
            None => {
                slot.lock.unlock();
                return false;
            }
        }
    }
    crate::hooks::point(crate::hooks::Point::KfreeAppend);
    let blk = b as *mut PtrBlock;
    // SAFETY: we hold the slot lock; count < BLOCK_PTRS is kept by queueing full blocks at once.
    let full = unsafe {
        let n = (*blk).hdr.count as usize;
        (*blk).ptrs[n] = ptr as usize;
        (*blk).hdr.count = n as u32 + 1;
        n + 1 == BLOCK_PTRS
    };
    if full {
        slot.block.store(0, Ordering::Relaxed);
        queue_block(b, gp);
    }
    slot.lock.unlock();
    if full {
        help(gp);
    }
    true
}

/// Free `ptr` (from `kmalloc_nolock` or a `KmemCache`) after an RCU grace period (`kfree_rcu`). `head` is an
/// [`RcuHead`] inside the object (anywhere in it); it is used only when no pointer block is available. A head
/// outside the object, or a `ptr` that is no nolock object, is reported and the object is leaked, never freed
/// too early.
///
/// # Safety
/// `ptr` must be a live nolock object that nobody frees otherwise; readers may keep using it until the grace
/// period ends, writers must not touch it after this call.
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free. Never fails and never loses the object.
pub unsafe fn kfree_rcu_nolock(ptr: *mut u8, head: NonNull<RcuHead>) {
    retire(ptr, head, GracePeriod::RCU);
}

/// Free `ptr` after a grace period of the SRCU-fast `domain` (`kfree_srcu_fast_nolock`).
///
/// # Safety
/// As [`kfree_rcu_nolock`].
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free. Never fails.
pub unsafe fn kfree_srcu_fast_nolock(domain: &SrcuFast, ptr: *mut u8, head: NonNull<RcuHead>) {
    retire(ptr, head, GracePeriod::srcu_fast(domain));
}

/// What the grace-period worker and barriers do for the blocks (registered with the RCU layer by `process`).
pub(crate) static GP_CLIENT: GpClient = GpClient {
    reclaim: free_done_blocks_everywhere,
    holds_partial: any_blocks,
    age: age_blocks,
    flush: flush_blocks,
    give_back: give_back_cached,
};

/// [`GpClient::give_back`]: return every object on the calling thread's (the worker's) lists to its slab. A
/// list with nothing on it costs one load.
fn give_back_cached() {
    if let Some(g) = super::tables::state_if_init() {
        super::thread_cache::drain_current(g);
    }
}

/// [`GpClient::flush`]: queue every partial block of `gp` (only blocks of that very domain), then wait for their
/// grace periods and free every block of `gp`'s ring queued before the call. For barriers. Normal context.
fn flush_blocks(gp: GracePeriod) {
    adopt_abandoned_slot();
    steal_blocks(slot_index(gp), Some(gp.id()), None);
    finish_blocks(gp);
}

/// [`GpClient::age`]: advance the aging clock; queue blocks at least two ticks old. Called by the worker every
/// few ms.
fn age_blocks() {
    let now = EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
    for which in 0..2 {
        steal_blocks(which, None, Some(now.wrapping_sub(2)));
    }
}

/// Claim and queue the blocks in block slot `which` (0: RCU, 1: SRCU-fast) of every thread, optionally only those of domain `tag` and those
/// created at or before epoch `older`.
///
/// Who else may touch a slot meanwhile, and why each pairing is safe:
/// - **its owner** (or a signal handler on the owner's thread) in `retire_in_block`: it holds the slot's
///   [`LocalTryLock`]; the claim + `membarrier` + `wait_unlocked` protocol means that once we proceed, the
///   owner either is out of its section or will see the claim and keep off (it retires through the object's
///   own head instead).
/// - **another stealer** (a second barrier, the worker's aging tick, a cache destroy): claims are exclusive
///   (`try_claim` is a CAS), so only one stealer at a time is inside a slot. A stealer that finds the slot
///   claimed by another waits for that claim to end and looks again, when it must see the block gone
///   (barriers); the aging tick just skips it, and skips a slot whose owner is inside its section too.
/// - **the owner's thread exit** (`drain_slot`): it takes the slot's lock like any owner operation, so it
///   finds a claimed slot `Claimed` and leaves the block to the stealer.
/// - **the reset of a thread that is gone** (`drain_slot` from the orphan sweep or a fork child): like the
///   owner's exit, under the lock; a claimed slot is left to the stealer.
/// - **a fork**: a stealer that is gone leaves its claim behind; `after_fork_child` clears it.
///
/// The block itself is taken with a `swap`, so even a path that broke these rules could not queue it twice.
fn steal_blocks(which: usize, tag: Option<usize>, older: Option<u32>) {
    let n = crate::thread::count();
    let wanted = |i: u32| {
        // Acquire: pairs with the Release store of the block in `retire_in_block`, so the header is readable.
        let b = SLOTS[i as usize][which].block.load(Ordering::Acquire);
        if b == 0 {
            return false;
        }
        // SAFETY: a block in a slot is live until queued; we only read header fields that the owner wrote
        // when it installed the block (a stale read only makes us claim or skip needlessly).
        let hdr = unsafe { &*(b as *const BlockHeader) };
        tag.is_none_or(|t| t == hdr.domain) && older.is_none_or(|e| hdr.epoch.wrapping_sub(e) as i32 <= 0)
    };
    // A barrier (a `tag`) must not return while a block it wants sits in a slot another stealer holds.
    let must_see_all = tag.is_some();
    let aging = older.is_some() && !must_see_all;
    let mut todo: Vec<u32> = (0..n).filter(|&i| wanted(i)).collect();
    while !todo.is_empty() {
        let mut claimed = Vec::new();
        let mut busy = Vec::new();
        for &i in &todo {
            if SLOTS[i as usize][which].lock.try_claim() {
                claimed.push(i);
            } else if must_see_all {
                busy.push(i);
            }
        }
        if !claimed.is_empty() {
            // Pairs with the owners' `try_lock` (the asymmetric Dekker of `sync::local_lock`).
            crate::sys::membarrier::heavy_barrier();
        }
        for i in claimed {
            let st = &SLOTS[i as usize][which];
            // The aging tick never waits for an owner inside its section: it only hurries blocks along, and the
            // next tick looks again. (An owner that never comes back — the `retire_in_block` a forking signal
            // handler interrupted, in the child — would otherwise cost it a second of yields every tick.) A
            // barrier waits, bounded: its caller asked for the blocks queued before it.
            let quiescent = if aging { !st.lock.is_locked() } else { st.lock.wait_unlocked(100_000) };
            if quiescent {
                crate::hooks::point(crate::hooks::Point::KfreeSteal);
                // AcqRel: Acquire pairs with the owner's Release store of the block (its header is visible);
                // Release orders our later header reads before a reuse of the slot by the owner.
                let b = st.block.swap(0, Ordering::AcqRel);
                if b != 0 {
                    // SAFETY: claimed and quiescent: the block is ours.
                    let hdr = unsafe { &*(b as *const BlockHeader) };
                    if tag.is_none_or(|t| t == hdr.domain) {
                        // SAFETY: block headers hold `GracePeriod::id` values.
                        queue_block(b, unsafe { GracePeriod::from_id(hdr.domain) });
                    } else {
                        // Release: pairs with the Acquire loads of the slot in `retire_in_block` and `wanted`: put back.
                        st.block.store(b, Ordering::Release); // another domain's: put it back
                    }
                }
            }
            st.lock.unclaim();
        }
        if busy.is_empty() {
            break;
        }
        // Another stealer holds these slots: wait for it to finish, then look again.
        std::thread::yield_now();
        todo = busy.into_iter().filter(|&i| wanted(i)).collect();
    }
}

/// A thread is going away: queue the blocks of its slot `me`. On its own exit (`dead` false) each block slot is
/// taken under its lock, like any owner operation: a slot a stealer has claimed is left to the stealer (see
/// `steal_blocks`), and a slot whose lock is still set (a signal handler left by `longjmp`) is left alone and
/// makes the result false. When the thread no longer exists (`dead`: orphan sweep, fork child), a lock it left
/// set is cleared as its own unlock would have: what the slot holds is a consistent partial block (a block is
/// published in its slot only once its header is written, `count` is written after the pointer it counts, and a
/// slot never holds a block that is already queued), so it is queued like any other.
pub(crate) fn drain_slot(me: u32, dead: bool) -> bool {
    let mut all = true;
    for slot in &SLOTS[me as usize] {
        crate::hooks::point(crate::hooks::Point::KfreeExit);
        if dead && slot.lock.is_locked() {
            slot.lock.unlock();
        }
        match slot.lock.try_lock() {
            TryLock::Locked => {}
            TryLock::Claimed => continue,
            TryLock::Busy => {
                all = false;
                continue;
            }
        }
        // AcqRel: Acquire pairs with the owner's Release store of the block (its header is visible); we hold
        // the slot's lock, so nobody else takes it.
        let b = slot.block.swap(0, Ordering::AcqRel);
        slot.lock.unlock();
        if b != 0 {
            // SAFETY: the block is ours now.
            let id = unsafe { &*(b as *const BlockHeader) }.domain;
            // SAFETY: block headers hold `GracePeriod::id` values.
            queue_block(b, unsafe { GracePeriod::from_id(id) });
        }
    }
    all
}

/// In a fork child, before the slots of the threads that are gone are reset (which queues their blocks, see
/// [`drain_slot`]): repair the rings (see [`BlockRing::after_fork_child`]), clear the claims that stealers
/// which are gone left on the block slots, and clear the busy flag of every slot but the forking thread's own.
/// Such a flag was set by a thread that was inside `retire_in_block` at the fork and no longer exists; left
/// set, every barrier and aging tick of the child would wait for it in vain.
pub(crate) fn after_fork_child() {
    for_each_ring(|_, ring| ring.after_fork_child());
    LOCKED_AT_FORK.store(0, Ordering::Relaxed);
    let mine = crate::thread::current_if_any();
    for i in 0..crate::thread::count() {
        let own = mine == Some(i);
        for slot in &SLOTS[i as usize] {
            if own {
                // A signal handler may have forked from inside this thread's own `retire_in_block`: that call
                // continues in the child and unlocks if the handler returns; only a stale claim is cleared. If
                // the handler never returns, its first barrier takes the slot over (`adopt_abandoned_slot`).
                slot.lock.unclaim();
                if slot.lock.is_locked() {
                    LOCKED_AT_FORK.store(i + 1, Ordering::Relaxed);
                }
            } else {
                slot.lock.reset();
            }
        }
    }
}

/// In a fork child: the forking thread's slot + 1 if one of its block slots was locked at the fork (by the
/// `retire_in_block` that the forking signal handler interrupted), else 0.
static LOCKED_AT_FORK: AtomicU32 = AtomicU32::new(0);

/// A barrier (a blocking call) on the thread that forked, in a fork child where that thread's block slot was
/// locked at the fork: the lock belongs to the `retire_in_block` that the forking signal handler interrupted,
/// and only a handler that never returns to it (it ends the child with `_exit` or `exec`) may make a blocking
/// call. That call will never unlock, so the slot is drained as a dead thread's (see `drain_slot`). Before
/// this, every barrier of the child and every aging tick of its worker waited a second for that lock in vain
/// (`steal_blocks`), and the slot's partial block was never flushed (`tests/fork_step.rs`).
fn adopt_abandoned_slot() {
    let Some(me) = crate::thread::current_if_any() else { return };
    if LOCKED_AT_FORK.load(Ordering::Relaxed) == me + 1 {
        LOCKED_AT_FORK.store(0, Ordering::Relaxed);
        if SLOTS[me as usize].iter().any(|s| s.lock.is_locked()) {
            drain_slot(me, true);
        }
    }
}

/// [`GpClient::holds_partial`]: whether any thread holds a partial block (for the worker's aging tick).
fn any_blocks() -> bool {
    (0..crate::thread::count()).any(|i| SLOTS[i as usize].iter().any(|s| s.block.load(Ordering::Relaxed) != 0))
}
