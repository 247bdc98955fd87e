//! "CPU" and "IRQs-off region" in userspace.
//!
//! The kernel's BPF code is written for per-CPU data touched with interrupts off. Here a CPU is the calling
//! thread's nolock slot ([`nolock::thread::current`]): an index below [`NR_CPUS`] that one thread owns at a
//! time, so per-CPU tables are arrays indexed by it. A thread with no slot (more than [`NR_CPUS`] threads, or
//! one that is exiting) has no CPU and takes each structure's shared path.
//!
//! Interrupts cannot be turned off in userspace: a signal handler can run in the middle of any region. What
//! the kernel got from `local_irq_save` (a per-CPU structure is never entered twice at once) the baseline
//! re-creates with its own counters (the `active` counter of `bpf_mem_alloc`, `map_locked`), which is exactly
//! where its spurious failures come from.
//!
//! An [`IrqRegion`] marks one region on the current thread. Work deferred with [`IrqRegion::defer`] (the
//! kernel's `irq_work_queue`) runs when the outermost region of this thread ends, the way a queued `irq_work`
//! runs once interrupts are enabled again.

use core::cell::Cell;

/// Number of per-CPU entries a table needs: one per nolock thread slot.
pub const NR_CPUS: usize = nolock::thread::MAX_THREADS;

/// The calling thread's CPU (its nolock slot), claiming a slot on the thread's first call.
///
/// Returns `None` when the thread has no slot (all [`NR_CPUS`] in use, or the thread is exiting).
pub fn this_cpu() -> Option<usize> {
    nolock::thread::current().map(|id| id as usize)
}

/// Work run when the outermost region on this thread ends: a function and its argument.
type Deferred = (fn(usize), usize);

/// How many deferred items a thread can hold; a full queue runs the new item at once instead.
const DEFERRED_MAX: usize = 8;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static QUEUED: Cell<usize> = const { Cell::new(0) };
    static QUEUE: [Cell<Option<Deferred>>; DEFERRED_MAX] = const { [const { Cell::new(None) }; DEFERRED_MAX] };
}

/// One IRQs-off region on the current thread (the kernel's `local_irq_save` … `local_irq_restore`).
///
/// Regions nest (a signal handler that runs a map operation inside another opens a nested region). Deferred
/// work runs when the outermost region is dropped.
pub struct IrqRegion {
    _not_send: core::marker::PhantomData<*mut ()>,
}

impl IrqRegion {
    /// Enters a region on the current thread.
    pub fn enter() -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        IrqRegion { _not_send: core::marker::PhantomData }
    }

    /// Whether the current thread is inside a region.
    pub fn inside() -> bool {
        DEPTH.with(|d| d.get() > 0)
    }

    /// Queues `f(arg)` to run when the outermost region on this thread ends (the kernel's `irq_work_queue`).
    ///
    /// Outside any region, or when the thread's queue is full, it runs at once. The same `(f, arg)` queued
    /// twice runs once, as a queued `irq_work` is not queued again.
    pub fn defer(f: fn(usize), arg: usize) {
        if !Self::inside() {
            f(arg);
            return;
        }
        let queued = QUEUE.with(|q| {
            for cell in q.iter() {
                if cell.get() == Some((f, arg)) {
                    return true;
                }
            }
            for cell in q.iter() {
                if cell.get().is_none() {
                    cell.set(Some((f, arg)));
                    QUEUED.with(|n| n.set(n.get() + 1));
                    return true;
                }
            }
            false
        });
        if !queued {
            f(arg);
        }
    }
}

impl Drop for IrqRegion {
    fn drop(&mut self) {
        let outermost = DEPTH.with(|d| {
            let v = d.get() - 1;
            d.set(v);
            v == 0
        });
        if !outermost {
            return;
        }
        // Run what was queued. A handler that interrupts this loop opens and closes its own region, which runs
        // the queue too; taking each item out of its cell before running it means each runs once.
        while QUEUED.with(|n| n.get()) > 0 {
            let item = QUEUE.with(|q| q.iter().find_map(|c| c.take()));
            match item {
                Some((f, arg)) => {
                    QUEUED.with(|n| n.set(n.get().saturating_sub(1)));
                    f(arg);
                }
                None => break,
            }
        }
    }
}
