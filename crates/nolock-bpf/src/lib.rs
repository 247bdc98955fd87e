//! # nolock-bpf: BPF-style maps on nolock, and the allocator they replace
//!
//! The first users of nolock's primitives, built the way the kernel builds them, beside a faithful
//! re-creation of the kernel's BPF memory allocator (`kernel/bpf/memalloc.c`) as the baseline they must beat:
//!
//! - [`cpu`]: what "CPU" and "IRQs-off region" mean here. A CPU is a thread's nolock slot
//!   ([`nolock::thread`]); an IRQs-off region is one map operation, or any section where a bucket lock is held.
//! - [`memalloc`]: `BpfMemAlloc`, the kernel's `bpf_mem_alloc` (per-CPU free lists with watermarks, refill in
//!   an `irq_work` analogue, `free_rcu` through Tasks Trace), over nolock's `kmalloc`.
//! - [`htab`]: `HashMap`, a byte-oriented BPF hash map with the kernel's element layout, selectable element
//!   backends (preallocated, `BpfMemAlloc`, nolock) and bucket locking (per-version kernel behaviour, and a
//!   lock-free mode no kernel has).
//!
//! ## Context rules
//!
//! As in `nolock`: unless its documentation has a `# Context` section, a public function may be called from
//! any context (a signal handler that interrupted this crate on the same thread included), never blocks, takes
//! no lock that can deadlock against itself, does not allocate through the global allocator and makes no
//! system call. Map creation and destruction are normal-context operations and say so.

#![warn(missing_docs)]

#[macro_use]
mod hook_site;

#[cfg(not(loom))]
pub mod cpu;
#[cfg(not(loom))]
pub mod htab;
#[cfg(not(loom))]
pub mod memalloc;
#[cfg(not(loom))]
pub mod task_storage;

/// Under `--cfg loom` only the bucket list (and its no-op hook points) is compiled, with loom's atomics, for
/// `tests/loom_htab.rs`.
#[cfg(loom)]
pub mod htab {
    #[path = "hooks.rs"]
    pub mod hooks;
    #[path = "list.rs"]
    pub mod list;
}
