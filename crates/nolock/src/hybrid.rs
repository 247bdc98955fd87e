//! [`HybridAlloc`]: keep your allocator (System, jemalloc, mimalloc) for the program, and use nolock only inside
//! signal handlers.
//!
//! A signal handler that allocates — a profiler capturing a stack into a `Vec`, a crash handler formatting a
//! report — deadlocks or corrupts the heap when the signal interrupted `malloc` on the same thread: the
//! allocator's lock is held, or its thread cache is half-updated. `HybridAlloc<A>` is a [`GlobalAlloc`] that
//! forwards to `A` in normal context and to nolock's `kmalloc_nolock` while the thread is in a *marked* handler:
//!
//! ```no_run
//! use nolock::hybrid::{self, HybridAlloc};
//!
//! #[global_allocator]
//! static A: HybridAlloc<std::alloc::System> = HybridAlloc::new(std::alloc::System);
//!
//! extern "C" fn on_sigprof(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
//!     // Marked by the wrapper below: this Vec and this String come from nolock.
//!     let v: Vec<u64> = (0..100).collect();
//!     let s = format!("{} samples", v.len());
//!     drop((v, s));
//! }
//!
//! // SAFETY: `on_sigprof` only does what a marked handler may (no locks, no stdio).
//! unsafe { hybrid::sigaction(libc::SIGPROF, on_sigprof, libc::SA_RESTART) }.unwrap();
//! ```
//!
//! # Marking the handler context
//!
//! Either install the handler with [`sigaction`] (nolock's wrapper: it installs a trampoline that marks the
//! thread, calls your handler, and unmarks it), or mark it yourself at the top of a handler you install by other
//! means with a [`HandlerGuard`] (or [`in_handler`]). The mark is a per-thread depth counter, so nested signals
//! (a handler interrupted by another) work, and the mark never leaks to other threads. An unmarked handler that
//! allocates goes to `A`, exactly as without `HybridAlloc`.
//!
//! # Frees route by address
//!
//! nolock's memory is one range of addresses (its arena), so one range check tells whose a block is, and any
//! context may free anything:
//! - nolock memory is freed with `kfree_nolock`, in any context (a sample built in a handler can be dropped by
//!   the thread that drains it);
//! - memory of `A` freed in a marked handler is **deferred**: pushed on a lock-free list (its node comes from
//!   `kmalloc_nolock`) and handed to `A` by the next allocation in normal context, or by [`drain`].
//!   If the node cannot be allocated (nolock's arena is exhausted), the block is leaked, never freed into `A`
//!   from the handler; [`HybridStats::leaked`] counts it.
//!
//! # `realloc` across the boundary
//!
//! - In a handler: nolock memory is reallocated by nolock; memory of `A` moves to nolock (copy, and the old
//!   block's free is deferred as above).
//! - In normal context: memory of `A` is reallocated by `A`. nolock memory that still fits its block (shrinking,
//!   or growing within the size class) stays where it is; memory that must grow **moves to `A`** (copy, then
//!   `kfree_nolock`): a buffer that a handler started and normal code keeps filling ends up in `A`, and nolock's
//!   arena keeps serving handlers only.
//!
//! [`drain`]: HybridAlloc::drain

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::ffi::{c_int, c_void};
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::alloc::NolockAlloc;
use crate::global::{self, Config};
use crate::page::Gfp;
use crate::slab::kmalloc::{kfree_nolock, kmalloc_nolock, ksize};
use crate::sync::llist::Llist;

std::thread_local! {
    /// How many marked handlers this thread is inside (nested signals count up). `const`-initialised and without
    /// a destructor, so reading it never allocates nor registers anything, and works in any handler.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Whether the calling thread is inside a marked signal handler (a [`HandlerGuard`] is alive on it).
///
/// # Context
/// Any context (one thread-local load).
#[inline(always)]
pub fn handler_context() -> bool {
    DEPTH.get() != 0
}

/// Marks the calling thread as "inside a signal handler" while it lives: [`HybridAlloc`] then allocates from
/// nolock. Create it first thing in a handler you install yourself (the [`sigaction`] wrapper does it for you).
/// Guards nest (a handler interrupted by another signal); each one undoes its own mark on drop. Not `Send`: the
/// mark belongs to the thread.
///
/// A handler that leaves by `longjmp` (or `siglongjmp`) skips the drop and leaves the thread marked: the thread
/// then keeps allocating from nolock, which is still correct, only not what you wanted. Call
/// [`HandlerGuard::reset_thread`] after such a jump.
#[must_use = "the mark ends when the guard is dropped"]
pub struct HandlerGuard {
    _not_send: PhantomData<*const ()>,
}

impl HandlerGuard {
    /// Mark the calling thread.
    ///
    /// # Context
    /// Any context (a thread-local increment). An interrupting handler's own guard is undone before it returns,
    /// so the increment cannot be lost.
    #[inline]
    pub fn enter() -> Self {
        DEPTH.set(DEPTH.get() + 1);
        crate::sync::signal_fence();
        Self { _not_send: PhantomData }
    }

    /// Clear the calling thread's mark entirely (after a `longjmp` out of a marked handler).
    ///
    /// # Context
    /// Any context.
    pub fn reset_thread() {
        DEPTH.set(0);
    }
}

impl Drop for HandlerGuard {
    #[inline]
    fn drop(&mut self) {
        crate::sync::signal_fence();
        DEPTH.set(DEPTH.get().saturating_sub(1));
    }
}

/// Run `f` with the calling thread marked as inside a signal handler (see [`HandlerGuard`]).
///
/// # Context
/// Any context, if `f` is.
#[inline]
pub fn in_handler<R>(f: impl FnOnce() -> R) -> R {
    let _g = HandlerGuard::enter();
    f()
}

/// The handler [`sigaction`] installs for you: the `SA_SIGINFO` signature.
pub type SigHandler = extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void);

/// Signals are 1..=64 on Linux.
const NSIG: usize = 65;

/// The user's handler for each signal installed through [`sigaction`] (a function address; 0: none).
static HANDLERS: [AtomicUsize; NSIG] = [const { AtomicUsize::new(0) }; NSIG];

extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let Some(slot) = usize::try_from(sig).ok().and_then(|s| HANDLERS.get(s)) else { return };
    // Acquire: pairs with the Release store in `sigaction`, which precedes the system call that installed us.
    let h = slot.load(Ordering::Acquire);
    if h == 0 {
        return;
    }
    // SAFETY: only `sigaction` stores into HANDLERS, and it stores `SigHandler` function addresses.
    let f: SigHandler = unsafe { core::mem::transmute::<usize, SigHandler>(h) };
    let _mark = HandlerGuard::enter();
    f(sig, info, ctx);
}

/// Install `handler` for `sig` wrapped so that it runs marked (see [`HandlerGuard`]): inside it, and inside any
/// signal handler it is interrupted by that is also marked, [`HybridAlloc`] allocates from nolock. The handler
/// gets `SA_SIGINFO` arguments; `flags` are added to `SA_SIGINFO` (e.g. `SA_RESTART`, `SA_ONSTACK`,
/// `SA_NODEFER`); the mask is empty (other signals may interrupt it). Returns the action it replaced.
///
/// # Safety
/// `handler` runs in signal context: it must do only what is async-signal-safe with a `HybridAlloc` global
/// allocator (allocate and free, nolock's API, atomics, async-signal-safe system calls; no locks, no stdio).
///
/// # Context
/// Normal context: one `sigaction` system call.
pub unsafe fn sigaction(sig: c_int, handler: SigHandler, flags: c_int) -> std::io::Result<libc::sigaction> {
    let Some(slot) = usize::try_from(sig).ok().filter(|&s| s > 0).and_then(|s| HANDLERS.get(s)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // Release: pairs with the Acquire load in `trampoline`.
    slot.store(handler as *const () as usize, Ordering::Release);
    // SAFETY: an all-zero sigaction is a valid value (no handler, empty mask, no flags); filled in below.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = trampoline as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | flags;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: as above, for the out-value.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: `sa` is initialised, the trampoline is an `extern "C"` SA_SIGINFO handler living for the whole
    // program, `old` is a valid out-pointer.
    if unsafe { libc::sigaction(sig, &sa, &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(old)
}

/// A deferred free of `A`'s memory: allocated with `kmalloc_nolock` in the handler, freed by the drain.
#[repr(C)]
struct Deferred {
    /// The `Llist` link (first field: its address is the node's).
    link: AtomicUsize,
    ptr: *mut u8,
    size: usize,
    align: usize,
}

/// Counters of a [`HybridAlloc`] (the handler side; the normal path counts nothing, to stay at `A`'s cost).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HybridStats {
    /// Allocations (and reallocations) served by nolock inside marked handlers.
    pub handler_allocs: u64,
    /// Frees of `A`'s memory deferred by marked handlers.
    pub deferred: u64,
    /// Deferred frees handed to `A` so far.
    pub drained: u64,
    /// Blocks of `A` leaked because a handler freed them when nolock had no memory left for the deferral node.
    pub leaked: u64,
    /// Frees of nolock memory (any context).
    pub nolock_frees: u64,
}

/// A [`GlobalAlloc`] that is `A` in normal context and nolock inside marked signal handlers (see the module
/// documentation).
///
/// # Context
/// Its `GlobalAlloc` methods, in normal context, do what `A` does (`A` may take locks and make system calls)
/// plus, on allocation, hand deferred frees to `A`. Inside a marked handler they never call `A`: they are
/// nolock's (any context, async-signal-safe, no lock), and a free of `A`'s memory is deferred.
pub struct HybridAlloc<A> {
    inner: A,
    nolock: NolockAlloc,
    cfg: Config,
    deferred: Llist,
    handler_allocs: AtomicU64,
    deferred_count: AtomicU64,
    drained: AtomicU64,
    leaked: AtomicU64,
    nolock_frees: AtomicU64,
}

impl<A> HybridAlloc<A> {
    /// `inner` in normal context, nolock (settings from the environment or their default) in handlers.
    pub const fn new(inner: A) -> Self {
        Self::with_config(inner, Config::new())
    }

    /// As [`new`](Self::new), with nolock initialised with `cfg` if this allocator is what initialises it.
    pub const fn with_config(inner: A, cfg: Config) -> Self {
        Self {
            inner,
            nolock: NolockAlloc::with_config(cfg),
            cfg,
            deferred: Llist::new(),
            handler_allocs: AtomicU64::new(0),
            deferred_count: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
            nolock_frees: AtomicU64::new(0),
        }
    }

    /// The inner allocator.
    ///
    /// # Context
    /// Any context.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// Initialise nolock now (map its arena) with this allocator's settings, so that the first allocation in a
    /// handler does not have to (it could: nolock's first call may be in a signal handler, but it then makes
    /// the `mmap` calls there).
    ///
    /// # Context
    /// Normal context: `mmap` system calls, once.
    pub fn warm_up(&self) {
        let _ = global::get_with(&self.cfg);
    }

    /// A snapshot of the counters.
    ///
    /// # Context
    /// Any context (relaxed loads).
    pub fn stats(&self) -> HybridStats {
        HybridStats {
            handler_allocs: self.handler_allocs.load(Ordering::Relaxed),
            deferred: self.deferred_count.load(Ordering::Relaxed),
            drained: self.drained.load(Ordering::Relaxed),
            leaked: self.leaked.load(Ordering::Relaxed),
            nolock_frees: self.nolock_frees.load(Ordering::Relaxed),
        }
    }

    /// Whether frees deferred by handlers are waiting for a drain (a hint: a handler may defer one at any time).
    ///
    /// # Context
    /// Any context.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }
}

/// nolock's arena as `HybridAlloc` has seen it: set (once) before `HybridAlloc` hands out its first block of
/// nolock memory, so every free of such a block happens after it and sees it; `len == 0` until then. Both words
/// in one cache line, read with two loads and no pointer chasing: the free path in normal context pays this
/// check on every call.
#[repr(C, align(64))]
struct ArenaRange {
    base: AtomicUsize,
    len: AtomicUsize,
}

static ARENA: ArenaRange = ArenaRange { base: AtomicUsize::new(0), len: AtomicUsize::new(0) };

/// Whether `ptr` lies in nolock's arena (O(1): two loads and a range check).
#[inline(always)]
fn is_nolock(ptr: *mut u8) -> bool {
    // Acquire: pairs with the Release store of `len` in `note_arena`, so a non-zero length comes with its base.
    let len = ARENA.len.load(Ordering::Acquire);
    let base = ARENA.base.load(Ordering::Relaxed);
    (ptr as usize).wrapping_sub(base) < len
}

/// Record the arena's range (before handing out nolock memory).
#[inline]
fn note_arena() {
    if ARENA.len.load(Ordering::Relaxed) == 0 {
        note_arena_cold();
    }
}

#[cold]
#[inline(never)]
fn note_arena_cold() {
    if let Some(g) = global::get_if_init() {
        // The arena never moves nor shrinks once mapped, so concurrent callers store the same values.
        ARENA.base.store(g.pages.page_addr(0), Ordering::Relaxed);
        // Release: pairs with the Acquire load in `is_nolock`.
        ARENA.len.store(g.pages.size(), Ordering::Release);
    }
}

impl<A: GlobalAlloc> HybridAlloc<A> {
    /// Hand every free deferred by handlers so far to `A`. Also done by every allocation in normal context that
    /// finds the list non-empty (frees and reallocations only check the address and the context, to stay
    /// cheap). Returns how many were drained.
    ///
    /// # Context
    /// Normal context only (it calls `A`); a no-op (returning 0) inside a marked handler.
    pub fn drain(&self) -> usize {
        if handler_context() {
            return 0;
        }
        let mut node = self.deferred.take_all();
        let mut n = 0;
        while node != 0 {
            let d = node as *mut Deferred;
            // SAFETY: every node on the list is a `Deferred` written by `defer` and published by the list's
            // Release push (this thread acquired it with `take_all`); the chain is ours alone now.
            let (next, ptr, layout) = unsafe {
                ((*d).link.load(Ordering::Relaxed), (*d).ptr, Layout::from_size_align_unchecked((*d).size, (*d).align))
            };
            // SAFETY: `ptr` is a block of `A` with `layout` that a handler gave up (it was handed to our
            // `dealloc`/`realloc`, whose caller no longer uses it); the node came from kmalloc_nolock.
            unsafe {
                self.inner.dealloc(ptr, layout);
                kfree_nolock(d as *mut u8);
            }
            n += 1;
            node = next;
        }
        if n > 0 {
            self.drained.fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }

    /// A handler gives up `ptr` of `A`: queue it for the next drain.
    #[cold]
    fn defer(&self, ptr: *mut u8, layout: Layout) {
        let Some(node) = kmalloc_nolock(core::mem::size_of::<Deferred>(), Gfp::NONE) else {
            self.leaked.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let d = node.cast::<Deferred>();
        // SAFETY: fresh memory of Deferred's size; kmalloc objects are 8-aligned at least.
        unsafe {
            d.as_ptr().write(Deferred { link: AtomicUsize::new(0), ptr, size: layout.size(), align: layout.align() })
        };
        // SAFETY: the node is initialised and ours until pushed.
        let link = unsafe { &(*d.as_ptr()).link };
        self.deferred.push(d.as_ptr() as usize, link);
        self.deferred_count.fetch_add(1, Ordering::Relaxed);
    }

    #[inline(always)]
    fn drain_if_needed(&self) {
        if !self.deferred.is_empty() {
            self.drain_cold();
        }
    }

    #[cold]
    #[inline(never)]
    fn drain_cold(&self) {
        self.drain();
    }

    /// Allocation inside a marked handler.
    #[cold]
    #[inline(never)]
    unsafe fn alloc_in_handler(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        self.handler_allocs.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded from the caller (a non-zero-size layout).
        let p = unsafe { if zeroed { self.nolock.alloc_zeroed(layout) } else { self.nolock.alloc(layout) } };
        note_arena();
        p
    }

    #[cold]
    #[inline(never)]
    unsafe fn realloc_slow(&self, ptr: *mut u8, layout: Layout, new_size: usize, handler: bool) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if is_nolock(ptr) {
            if handler {
                self.handler_allocs.fetch_add(1, Ordering::Relaxed);
                // (The range is known: `ptr` is nolock memory we handed out.)
                // SAFETY: nolock memory with `layout`, forwarded.
                return unsafe { self.nolock.realloc(ptr, layout, new_size) };
            }
            if new_size <= ksize(ptr) {
                return ptr; // still fits its block: stays
            }
            // Grows in normal context: moves to A.
            // SAFETY: a valid non-zero-size layout (caller).
            let new = unsafe { self.inner.alloc(new_layout) };
            if !new.is_null() {
                // SAFETY: both blocks are valid for the smaller size and do not overlap; `ptr` is ours to free.
                unsafe {
                    core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    kfree_nolock(ptr);
                }
                self.nolock_frees.fetch_add(1, Ordering::Relaxed);
            }
            return new;
        }
        // A's memory in a handler: move to nolock, defer the old block's free.
        // SAFETY: a valid non-zero-size layout.
        let new = unsafe { self.alloc_in_handler(new_layout, false) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            self.defer(ptr, layout);
        }
        new
    }
}

// SAFETY: every block comes from `A` (normal context) or from nolock (`NolockAlloc`, in handlers), both
// `GlobalAlloc`s honouring the layout; `dealloc` and `realloc` send each block back to the allocator that owns
// its address (nolock's arena is one range, disjoint from anything `A` returns), or defer `A`'s free to normal
// context with its original layout; realloc keeps the first `min(old, new)` bytes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for HybridAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if handler_context() {
            // SAFETY: forwarded.
            return unsafe { self.alloc_in_handler(layout, false) };
        }
        self.drain_if_needed();
        // SAFETY: forwarded.
        unsafe { self.inner.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if handler_context() {
            // SAFETY: forwarded.
            return unsafe { self.alloc_in_handler(layout, true) };
        }
        self.drain_if_needed();
        // SAFETY: forwarded.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_nolock(ptr) {
            self.nolock_frees.fetch_add(1, Ordering::Relaxed);
            // SAFETY: nolock memory given up by the caller.
            return unsafe { kfree_nolock(ptr) };
        }
        if handler_context() {
            return self.defer(ptr, layout);
        }
        // (No drain here: the next allocation drains; the free path stays two checks.)
        // SAFETY: a block of A with `layout`, given up by the caller.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let handler = handler_context();
        if handler || is_nolock(ptr) {
            // SAFETY: forwarded.
            return unsafe { self.realloc_slow(ptr, layout, new_size, handler) };
        }
        // SAFETY: a block of A, forwarded.
        unsafe { self.inner.realloc(ptr, layout, new_size) }
    }
}

impl<A> core::fmt::Debug for HybridAlloc<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HybridAlloc").field("stats", &self.stats()).finish_non_exhaustive()
    }
}
