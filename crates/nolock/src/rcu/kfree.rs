//! `kfree_rcu_nolock` and `kfree_srcu_fast_nolock`: free an object after a grace period, from any context.
//!
//! # Batching
//!
//! Like the kernel's `kvfree_rcu`, pointers are collected in per-thread *pointer blocks* (4 KiB, allocated with
//! `kmalloc_nolock`, 508 pointers each). A full block is queued as one callback that frees all its pointers; the
//! object's own [`RcuHead`] is not touched, so retiring a cold object does not pull it into the cache. Each
//! thread has one block for RCU and one for SRCU-fast (tagged with its domain; retiring into another domain
//! queues the current block first).
//!
//! The block is per-thread state guarded by a [`LocalTryLock`]. When it cannot be used — a signal handler
//! interrupted the owner inside this code, the block is claimed by the worker, or no block can be allocated —
//! the object goes through its own head instead: the callback value encodes "kfree the object at `head - off`"
//! (the kernel's offset trick; the head must lie in the object's first 64 KiB). So retiring never fails.
//!
//! # Freeing, and keeping a retire flood bounded
//!
//! When a block's grace period ends, its callback only pushes it on a global *ready* stack (a `TaggedStack`
//! of page numbers). The worker frees ready blocks after each batch; and every thread that fills a block of
//! its own while ready blocks are waiting frees up to two of them on the spot (bounded work: 1016 `kfree`s).
//! So the threads that retire memory also free it, in proportion, and a flood of `kfree_rcu_nolock` cannot
//! outrun the single worker thread.
//!
//! # Getting partial blocks out
//!
//! A block that is not full would wait forever on an idle thread, so the grace-period worker *ages* blocks:
//! every few milliseconds it claims the blocks that are at least two ticks old (claim, `membarrier`, wait for
//! the owner to leave its critical section — the [`LocalTryLock`] protocol) and queues them. Barriers
//! (`rcu_barrier`, `srcu_barrier`) do the same for every block of their flavour before entraining, and a
//! thread's exit queues its own blocks.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::RcuHead;
use super::srcu::{SrcuFast, SrcuState};
use crate::page::Gfp;
use crate::slab::shard::{self, Shard};
use crate::sync::local_lock::{LocalTryLock, TryLock};
use crate::sync::tagged::TaggedStack;

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
    /// Link in the ready stack once the grace period has ended (page index + 1 encoding).
    ready_link: AtomicU32,
}

#[repr(C)]
struct PtrBlock {
    hdr: BlockHeader,
    ptrs: [usize; BLOCK_PTRS],
}

const _: () = assert!(core::mem::size_of::<PtrBlock>() <= BLOCK_BYTES);

/// Aging clock, advanced by the worker.
static EPOCH: AtomicU32 = AtomicU32::new(0);

/// Blocks whose grace period has ended, waiting to be freed (by the worker, or by retiring threads that help).
static READY: TaggedStack = TaggedStack::new();

/// Blocks whose grace period has ended and that are not entirely freed yet (on the ready stack or being freed).
static UNFREED: AtomicUsize = AtomicUsize::new(0);

/// Ready blocks a retiring thread frees each time it fills a block of its own while some are waiting: the
/// backpressure that keeps a retire flood bounded (the threads that retire also free, in proportion).
const HELP_BLOCKS: usize = 2;

/// One per-thread block slot.
#[derive(Debug, Default)]
pub struct KfreeSlot {
    lock: LocalTryLock,
    /// The current block (0: none).
    block: AtomicUsize,
}

/// Which grace period a block waits for.
#[derive(Clone, Copy)]
pub(crate) enum Flavor {
    Rcu,
    Srcu(&'static SrcuState),
}

impl Flavor {
    fn slot_index(self) -> usize {
        match self {
            Flavor::Rcu => 0,
            Flavor::Srcu(_) => 1,
        }
    }

    fn domain_tag(self) -> usize {
        match self {
            Flavor::Rcu => 0,
            Flavor::Srcu(s) => s as *const SrcuState as usize,
        }
    }

    pub(crate) fn enqueue(self, head: NonNull<RcuHead>, func: usize) {
        match self {
            Flavor::Rcu => super::tree::enqueue(head, func),
            Flavor::Srcu(s) => s.enqueue(head, func),
        };
    }

    fn of_tag(slot: usize, tag: usize) -> Self {
        if slot == 0 {
            Flavor::Rcu
        } else {
            // SAFETY: SRCU tags are pointers to never-unmapped states.
            Flavor::Srcu(unsafe { &*(tag as *const SrcuState) })
        }
    }
}

/// Grace-period callback of a block: its pointers may be freed now. It goes on the ready stack, where the
/// worker — or a retiring thread that helps — frees it (see [`HELP_BLOCKS`]).
unsafe fn block_gp_done(head: NonNull<RcuHead>) {
    let Some(g) = crate::global::get_if_init() else { return };
    let b = head.as_ptr() as usize;
    // SAFETY: blocks are queued with this callback only; the block is ours until freed.
    let hdr = unsafe { &*(b as *const BlockHeader) };
    UNFREED.fetch_add(1, Ordering::AcqRel);
    READY.push(g.pages.page_of(b) as u32, &hdr.ready_link);
}

/// Free every pointer of a block, then the block.
///
/// # Safety
/// `b` is a block whose grace period has ended, owned by the caller.
unsafe fn free_block(b: usize) {
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

/// Free up to `max` ready blocks; returns how many. Any context (bounded by `max` blocks of 508 frees each).
pub(crate) fn free_ready_blocks(max: usize) -> usize {
    let Some(g) = crate::global::get_if_init() else { return 0 };
    let mut n = 0;
    while n < max {
        // The link words live in the blocks, which stay in the arena (readable) even once freed: a stale read
        // only makes the tagged pop retry.
        let Some(page) = READY.pop(|i| {
            // SAFETY: `i` is the page of a block that was pushed; arena memory is never unmapped.
            unsafe { &(*(g.pages.page_addr(i as usize) as *const BlockHeader)).ready_link }
        }) else {
            break;
        };
        // SAFETY: popped: the block is ours, and its grace period has ended.
        unsafe { free_block(g.pages.page_addr(page as usize)) };
        // Release: pairs with the Acquire in `finish_ready_blocks`: the frees happen before it sees the count.
        UNFREED.fetch_sub(1, Ordering::Release);
        n += 1;
    }
    n
}

/// Free every ready block and wait (yielding) until blocks that helping threads popped are freed too, so that
/// when a barrier marker runs every pointer of an earlier block is back in the allocator. Normal context.
pub(crate) fn finish_ready_blocks() {
    free_ready_blocks(usize::MAX);
    while UNFREED.load(Ordering::Acquire) != 0 {
        free_ready_blocks(usize::MAX);
        std::thread::yield_now();
    }
}

fn queue_block(b: usize, flavor: Flavor) {
    // SAFETY: `b` is a block owned by the caller, handed over to the callback.
    let head = unsafe { NonNull::new_unchecked(b as *mut RcuHead) };
    flavor.enqueue(head, block_gp_done as super::RcuCallback as usize);
}

fn retire(ptr: *mut u8, head: NonNull<RcuHead>, flavor: Flavor) {
    let off = (head.as_ptr() as usize).wrapping_sub(ptr as usize);
    if ptr.is_null() {
        return;
    }
    if let Some(s) = crate::global::get().and_then(shard::current)
        && retire_in_block(s, ptr, flavor)
    {
        return;
    }
    if off + 1 >= super::KFREE_OFFSET_LIMIT {
        // Cannot encode the offset: report, and keep the object alive (leak) rather than free it too early.
        crate::debug::report_kfree_rcu_offset(ptr as usize, off);
        return;
    }
    flavor.enqueue(head, off + 1);
}

fn retire_in_block(s: &Shard, ptr: *mut u8, flavor: Flavor) -> bool {
    let slot = &s.kfree[flavor.slot_index()];
    if slot.lock.try_lock() != TryLock::Locked {
        return false;
    }
    let mut b = slot.block.load(Ordering::Relaxed);
    if b != 0 {
        // SAFETY: the slot's block is ours while we hold the lock.
        let hdr = unsafe { &*(b as *const BlockHeader) };
        if hdr.domain != flavor.domain_tag() {
            queue_block(b, Flavor::of_tag(flavor.slot_index(), hdr.domain));
            b = 0;
        }
    }
    if b == 0 {
        // Page-aligned, so that a block is named by its page number on the ready stack.
        let layout = core::alloc::Layout::from_size_align(BLOCK_BYTES, BLOCK_BYTES).expect("constant layout");
        match crate::kmalloc_layout_nolock(layout, Gfp::NONE) {
            Some(p) => {
                b = p.as_ptr() as usize;
                // SAFETY: a fresh 4 KiB object.
                unsafe {
                    (b as *mut BlockHeader).write(BlockHeader {
                        head: RcuHead::new(),
                        count: 0,
                        epoch: EPOCH.load(Ordering::Relaxed),
                        domain: flavor.domain_tag(),
                        ready_link: AtomicU32::new(0),
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
        queue_block(b, flavor);
    }
    slot.lock.unlock();
    if full && !READY.is_empty() {
        // Backpressure: a thread that fills blocks also frees ready ones, so retiring cannot outrun freeing.
        free_ready_blocks(HELP_BLOCKS);
    }
    true
}

/// Free `ptr` (from `kmalloc_nolock` or a `KmemCache`) after an RCU grace period (`kfree_rcu`). `head` is an
/// [`RcuHead`] inside the object, within its first 64 KiB; it is used only when no pointer block is available.
///
/// # Safety
/// `ptr` must be a live nolock object that nobody frees otherwise; readers may keep using it until the grace
/// period ends, writers must not touch it after this call.
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free. Never fails and never loses the object.
pub unsafe fn kfree_rcu_nolock(ptr: *mut u8, head: NonNull<RcuHead>) {
    retire(ptr, head, Flavor::Rcu);
}

/// Free `ptr` after a grace period of the SRCU-fast `domain` (`kfree_srcu_fast_nolock`).
///
/// # Safety
/// As [`kfree_rcu_nolock`].
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free. Never fails.
pub unsafe fn kfree_srcu_fast_nolock(domain: &SrcuFast, ptr: *mut u8, head: NonNull<RcuHead>) {
    retire(ptr, head, Flavor::Srcu(domain.state()));
}

/// Queue every partial block of `flavor` (an SRCU flavour: only blocks of that domain). Normal context.
pub(crate) fn flush_blocks(flavor: Flavor) {
    steal_blocks(flavor.slot_index(), Some(flavor.domain_tag()), None);
}

/// Advance the aging clock; queue blocks at least two ticks old. Called by the worker every few ms.
pub(crate) fn age_blocks() {
    let now = EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
    for slot in 0..2 {
        steal_blocks(slot, None, Some(now.wrapping_sub(2)));
    }
}

/// Claim and queue the blocks in slot `slot` of every shard, optionally only those of domain `tag` and those
/// created at or before epoch `older`.
fn steal_blocks(slot: usize, tag: Option<usize>, older: Option<u32>) {
    let Some(g) = crate::global::get_if_init() else { return };
    let n = g.shard_count();
    let wanted = |s: &Shard| {
        let b = s.kfree[slot].block.load(Ordering::Acquire);
        if b == 0 {
            return false;
        }
        // SAFETY: a block in a slot is live until queued; we only read header fields that the owner wrote
        // when it installed the block (a stale read only makes us claim or skip needlessly).
        let hdr = unsafe { &*(b as *const BlockHeader) };
        tag.is_none_or(|t| t == hdr.domain) && older.is_none_or(|e| hdr.epoch.wrapping_sub(e) as i32 <= 0)
    };
    let mut claimed = Vec::new();
    for i in 0..n {
        let s = g.shard(i);
        if wanted(s) {
            s.kfree[slot].lock.claim();
            claimed.push(i);
        }
    }
    if claimed.is_empty() {
        return;
    }
    crate::sys::membarrier::heavy_barrier();
    for i in claimed {
        let s = g.shard(i);
        let st = &s.kfree[slot];
        if st.lock.wait_unlocked(100_000) {
            let b = st.block.load(Ordering::Acquire);
            if b != 0 {
                // SAFETY: claimed and quiescent: the block is ours to queue.
                let hdr = unsafe { &*(b as *const BlockHeader) };
                if tag.is_none_or(|t| t == hdr.domain) {
                    st.block.store(0, Ordering::Release);
                    queue_block(b, Flavor::of_tag(slot, hdr.domain));
                }
            }
        }
        st.lock.unclaim();
    }
}

/// A thread is exiting (or its shard is drained): queue its blocks. The caller has exclusive use of `s`.
pub(crate) fn drain_shard(s: &Shard) {
    for (i, slot) in s.kfree.iter().enumerate() {
        if slot.lock.is_locked() {
            continue;
        }
        let b = slot.block.swap(0, Ordering::AcqRel);
        if b != 0 {
            // SAFETY: the block is ours now.
            let tag = unsafe { &*(b as *const BlockHeader) }.domain;
            queue_block(b, Flavor::of_tag(i, tag));
        }
    }
}

/// Whether any shard holds a partial block (for the worker's aging tick).
pub(crate) fn any_blocks() -> bool {
    let Some(g) = crate::global::get_if_init() else { return false };
    (0..g.shard_count()).any(|i| g.shard(i).kfree.iter().any(|s| s.block.load(Ordering::Relaxed) != 0))
}
