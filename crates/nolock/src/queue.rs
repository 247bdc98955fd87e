//! Multi-producer, single-consumer queues that a signal handler can push into and one thread drains: the piece
//! every sampling profiler writes by hand.
//!
//! - [`BoundedQueue<T, N>`]: a ring of `N` slots, `const`-constructible (so it can be a `static` a handler
//!   reaches without any set-up). A push claims a slot with one CAS and publishes it with one store; when the
//!   ring is full the item is handed back. No allocation at all.
//! - [`UnboundedQueue<T>`]: each push allocates a node with `kmalloc_nolock`, so it fails only when memory is
//!   exhausted (the item is handed back); the nodes form a lock-free stack (the kernel's `llist`) that the
//!   consumer takes whole and reverses, so items come out in the order each producer pushed them.
//!
//! Both carry any `T: Send` — typically an [`NBox<Sample>`](crate::NBox), built in the handler with
//! `NBox::try_new` — and both are lock-free: a push never blocks, never waits for the consumer or another
//! producer, and may run in a signal handler that interrupted any push or pop on the same thread. A push
//! interrupted between its claim and its publication delays only the consumer (which then sees the queue as
//! empty from that slot on, and never spins); it never delays another push.
//!
//! ```
//! use nolock::NBox;
//! use nolock::queue::BoundedQueue;
//!
//! static SAMPLES: BoundedQueue<NBox<[usize]>, 1024> = BoundedQueue::new();
//!
//! // In the handler: copy the frames into nolock memory and queue them; on a full queue, drop the sample.
//! if let Some(frames) = NBox::try_from_slice(&[0x1234usize, 0x5678]) {
//!     let _ = SAMPLES.push(frames);
//! }
//! // In the draining thread:
//! while let Some(s) = SAMPLES.pop() {
//!     assert_eq!(s[0], 0x1234);
//! }
//! ```
//!
//! # One consumer
//!
//! [`pop`](BoundedQueue::pop) may be called from any thread, but by one at a time: a second consumer that
//! overlaps gets `None` (a busy flag, never a wait). The loom models in `tests/loom_queue.rs` check the push/pop
//! protocols under `--cfg loom`, where this module compiles with loom's atomics.

use core::mem::MaybeUninit;

use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::llist::Llist;

#[cfg(loom)]
use loom::cell::UnsafeCell;

/// `core::cell::UnsafeCell` with loom's closure API, so that one body serves both builds.
#[cfg(not(loom))]
#[derive(Debug)]
struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    const fn new(v: T) -> Self {
        Self(core::cell::UnsafeCell::new(v))
    }
    #[inline(always)]
    fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// The consumer's busy flag: taken by `pop`, so that two overlapping consumers cannot both own the head.
struct ConsumerFlag(AtomicUsize);

impl ConsumerFlag {
    crate::sync::loom_const_fn! {
        fn new() -> Self {
            Self(AtomicUsize::new(0))
        }
    }

    #[inline]
    fn try_take(&self) -> Option<ConsumerToken<'_>> {
        // Acquire: pairs with the Release store in `ConsumerToken::drop`, so this consumer sees the head and
        // the pending chain as the previous consumer left them.
        (self.0.swap(1, Ordering::Acquire) == 0).then_some(ConsumerToken(self))
    }
}

struct ConsumerToken<'a>(&'a ConsumerFlag);

impl Drop for ConsumerToken<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: pairs with the Acquire swap in `try_take`.
        self.0.0.store(0, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Bounded
// ---------------------------------------------------------------------------------------------------------------

struct Slot<T> {
    /// The slot's sequence number minus its index (so that an all-zero array is the initial state): with
    /// `seq = stored + index`, `seq == pos` means free for the push at position `pos`, `seq == pos + 1` means
    /// filled by that push, and the pop of `pos` sets `seq = pos + N` (free for the next lap).
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

impl<T> Slot<T> {
    crate::sync::loom_const_fn! {
        fn new() -> Self {
            Self { seq: AtomicUsize::new(0), value: UnsafeCell::new(MaybeUninit::uninit()) }
        }
    }
}

/// A bounded MPSC queue of `N` slots (`N` a power of two, at least 2). See the module documentation.
pub struct BoundedQueue<T, const N: usize> {
    slots: [Slot<T>; N],
    /// Next position to push (claimed by CAS).
    tail: AtomicUsize,
    /// Next position to pop (the consumer's).
    head: AtomicUsize,
    consumer: ConsumerFlag,
}

// SAFETY: items move from producers to the consumer (T: Send); a slot's value is accessed by the one producer
// that claimed it, then by the consumer after the Release/Acquire hand-over on its sequence number.
unsafe impl<T: Send, const N: usize> Sync for BoundedQueue<T, N> {}
// SAFETY: as above; the queue owns its items.
unsafe impl<T: Send, const N: usize> Send for BoundedQueue<T, N> {}

impl<T, const N: usize> BoundedQueue<T, N> {
    const CHECK: () = assert!(N >= 2 && N.is_power_of_two(), "BoundedQueue: N must be a power of two, at least 2");

    /// An empty queue.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::CHECK;
        Self {
            slots: [const { Slot::new() }; N],
            tail: AtomicUsize::new(0),
            head: AtomicUsize::new(0),
            consumer: ConsumerFlag::new(),
        }
    }

    /// An empty queue.
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::CHECK;
        Self {
            slots: core::array::from_fn(|_| Slot::new()),
            tail: AtomicUsize::new(0),
            head: AtomicUsize::new(0),
            consumer: ConsumerFlag::new(),
        }
    }

    /// The number of slots.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Queue `value`; when the queue is full, hand it back.
    ///
    /// Lock-free: it retries only when another push claimed the same slot first.
    #[inline]
    pub fn push(&self, value: T) -> Result<(), T> {
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let i = pos % N;
            let slot = &self.slots[i];
            // Acquire: pairs with the Release store in `pop` that freed the slot, so our write of the value
            // comes after the consumer's read of the previous one.
            let seq = slot.seq.load(Ordering::Acquire).wrapping_add(i);
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match self.tail.compare_exchange_weak(pos, pos.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        // SAFETY: winning the CAS on `tail` at `pos` makes this push the slot's only writer until it
                        // publishes below; the consumer reads it only after that.
                        slot.value.with_mut(|p| unsafe { (*p).write(value) });
                        // Release: pairs with the Acquire load in `pop`; publishes the value.
                        slot.seq.store(pos.wrapping_add(1).wrapping_sub(i), Ordering::Release);
                        return Ok(());
                    }
                    Err(now) => pos = now,
                }
            } else if diff < 0 {
                // The slot still holds the item of the previous lap: full.
                return Err(value);
            } else {
                // Another push took this position; catch up.
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Take the oldest published item, or `None` when the queue is empty, when the next item's push has
    /// claimed its slot but not published it yet (a handler interrupted it), or when another consumer is
    /// popping at the same time.
    #[inline]
    pub fn pop(&self) -> Option<T> {
        let _token = self.consumer.try_take()?;
        let pos = self.head.load(Ordering::Relaxed);
        let i = pos % N;
        let slot = &self.slots[i];
        // Acquire: pairs with the Release store in `push` that published the value.
        let seq = slot.seq.load(Ordering::Acquire).wrapping_add(i);
        if seq != pos.wrapping_add(1) {
            return None;
        }
        // SAFETY: the slot was published for position `pos` and we are the only consumer (token): the value is
        // initialised and read once.
        let v = slot.value.with_mut(|p| unsafe { (*p).assume_init_read() });
        // Release: pairs with the Acquire load in `push`; frees the slot for the next lap.
        slot.seq.store(pos.wrapping_add(N).wrapping_sub(i), Ordering::Release);
        self.head.store(pos.wrapping_add(1), Ordering::Relaxed);
        Some(v)
    }

    /// Items pushed and not yet popped, claimed-but-unpublished ones included (a snapshot).
    pub fn len(&self) -> usize {
        // Head first: a position is claimed (tail) before it can be popped (head), so a tail read after the
        // head is never behind it.
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        tail.wrapping_sub(head).min(N)
    }

    /// Whether [`len`](Self::len) is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(not(loom))]
impl<T, const N: usize> Default for BoundedQueue<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> Drop for BoundedQueue<T, N> {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

impl<T, const N: usize> core::fmt::Debug for BoundedQueue<T, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BoundedQueue").field("capacity", &N).field("len", &self.len()).finish()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Unbounded: the node protocol (loom-checked) and the typed queue over kmalloc nodes
// ---------------------------------------------------------------------------------------------------------------

/// The unbounded queue's protocol over caller-owned nodes whose link word (an `AtomicUsize`) is at the node's
/// address: producers push with the `llist` CAS, the consumer takes the whole stack, reverses it into a private
/// chain and pops from that. Public (hidden) for the loom model; use [`UnboundedQueue`].
#[doc(hidden)]
pub struct RawMpsc {
    list: Llist,
    /// The consumer's chain, oldest first (0: empty). Only the consumer holding the flag touches it.
    pending: AtomicUsize,
    consumer: ConsumerFlag,
}

/// The link word of node `addr` (at the node's address).
///
/// # Safety
/// `addr` is a live node whose first field is its `AtomicUsize` link.
#[inline(always)]
unsafe fn link<'a>(addr: usize) -> &'a AtomicUsize {
    // SAFETY: forwarded from the caller.
    unsafe { &*(addr as *const AtomicUsize) }
}

impl RawMpsc {
    crate::sync::loom_const_fn! {
        /// An empty queue.
        pub fn new() -> Self {
            Self { list: Llist::new(), pending: AtomicUsize::new(0), consumer: ConsumerFlag::new() }
        }
    }

    /// Push node `node` (its link word at its address). Returns true when the producer side was empty.
    ///
    /// # Safety
    /// `node` is a live node owned by the caller, whose first field is its `AtomicUsize` link; it belongs to
    /// the queue until popped.
    #[inline]
    pub unsafe fn push(&self, node: usize) -> bool {
        // SAFETY: forwarded.
        self.list.push(node, unsafe { link(node) })
    }

    /// Pop the oldest node (0 when none, or when another consumer is popping).
    #[inline]
    pub fn pop(&self) -> usize {
        let Some(_token) = self.consumer.try_take() else { return 0 };
        let mut p = self.pending.load(Ordering::Relaxed);
        if p == 0 {
            // Newest first: reverse into oldest first.
            let mut chain = self.list.take_all();
            while chain != 0 {
                // SAFETY: nodes taken from the list are ours (the Acquire in `take_all` pairs with the push's
                // Release, so their link words are visible).
                let l = unsafe { link(chain) };
                let next = l.load(Ordering::Relaxed);
                l.store(p, Ordering::Relaxed);
                p = chain;
                chain = next;
            }
            if p == 0 {
                return 0;
            }
        }
        // SAFETY: `p` is a node of the consumer's chain.
        let next = unsafe { link(p) }.load(Ordering::Relaxed);
        self.pending.store(next, Ordering::Relaxed);
        p
    }

    /// Whether no node is queued (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.pending.load(Ordering::Relaxed) == 0
    }
}

impl Default for RawMpsc {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(not(loom))]
pub use unbounded::UnboundedQueue;

#[cfg(not(loom))]
mod unbounded {
    use core::alloc::Layout;
    use core::marker::PhantomData;

    use super::RawMpsc;
    use crate::page::Gfp;
    use crate::sync::atomic::AtomicUsize;

    #[repr(C)]
    struct Node<T> {
        link: AtomicUsize,
        value: T,
    }

    /// An unbounded MPSC queue whose nodes come from `kmalloc_nolock`. See the module documentation.
    ///
    /// ```
    /// use nolock::queue::UnboundedQueue;
    ///
    /// static EVENTS: UnboundedQueue<(u32, u64)> = UnboundedQueue::new();
    /// EVENTS.push((1, 10)).expect("out of memory");
    /// EVENTS.push((2, 20)).unwrap();
    /// assert_eq!(EVENTS.pop(), Some((1, 10)));
    /// assert_eq!(EVENTS.pop(), Some((2, 20)));
    /// assert_eq!(EVENTS.pop(), None);
    /// ```
    pub struct UnboundedQueue<T> {
        raw: RawMpsc,
        _owns: PhantomData<T>,
    }

    // SAFETY: items move from producers to the consumer (T: Send); nodes are handed over by the llist's
    // Release/Acquire pair.
    unsafe impl<T: Send> Sync for UnboundedQueue<T> {}
    // SAFETY: as above; the queue owns its items.
    unsafe impl<T: Send> Send for UnboundedQueue<T> {}

    impl<T> UnboundedQueue<T> {
        /// An empty queue.
        pub const fn new() -> Self {
            Self { raw: RawMpsc::new(), _owns: PhantomData }
        }

        /// Queue `value` in a new node from `kmalloc_nolock`; hands it back only when memory is exhausted.
        ///
        /// Lock-free: one allocation and a CAS loop that retries only when another push got in first.
        pub fn push(&self, value: T) -> Result<(), T> {
            let Some(mem) = crate::kmalloc_layout_nolock(Layout::new::<Node<T>>(), Gfp::NONE) else {
                return Err(value);
            };
            let node = mem.cast::<Node<T>>();
            // SAFETY: fresh memory with Node<T>'s layout.
            unsafe { node.as_ptr().write(Node { link: AtomicUsize::new(0), value }) };
            // SAFETY: our initialised node, link first (repr(C)); the queue owns it from here.
            unsafe { self.raw.push(node.as_ptr() as usize) };
            Ok(())
        }

        /// Take the oldest item (per producer: items of one producer come out in the order it pushed them; a
        /// handler's push that interrupted a push of its thread counts as earlier). `None` when the queue is
        /// empty or another consumer is popping at the same time. Frees the node with `kfree_nolock`.
        pub fn pop(&self) -> Option<T> {
            let p = self.raw.pop();
            if p == 0 {
                return None;
            }
            let node = p as *mut Node<T>;
            // SAFETY: a node pushed by `push`, now owned by this consumer: read its value once, free it.
            unsafe {
                let v = core::ptr::addr_of!((*node).value).read();
                crate::kfree_nolock(node as *mut u8);
                Some(v)
            }
        }

        /// Whether the queue is empty (a snapshot).
        pub fn is_empty(&self) -> bool {
            self.raw.is_empty()
        }
    }

    impl<T> Default for UnboundedQueue<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<T> Drop for UnboundedQueue<T> {
        fn drop(&mut self) {
            while self.pop().is_some() {}
        }
    }

    impl<T> core::fmt::Debug for UnboundedQueue<T> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("UnboundedQueue").field("empty", &self.is_empty()).finish()
        }
    }
}
