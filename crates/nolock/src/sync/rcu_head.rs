//! `RcuHead`: the callback link embedded in an object retired after a grace period (the kernel's
//! `struct rcu_head`). A plain intrusive link, kept here at the bottom so that any layer can hold one — the page
//! descriptor lends its last 16 bytes as the `rcu_head` of a dead slab — without importing the RCU layer.

use super::atomic::AtomicUsize;

/// The callback link embedded in an object retired through `call_rcu_nolock` and friends (the kernel's
/// `struct rcu_head`). 16 bytes; it must stay valid until the callback runs.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RcuHead {
    /// Next head on a callback list (owned by the list while queued).
    pub(crate) next: AtomicUsize,
    /// The callback, as an address (set when queued).
    pub(crate) func: AtomicUsize,
}

impl RcuHead {
    super::loom_const_fn! {
        /// An unused head.
        pub fn new() -> Self {
            Self { next: AtomicUsize::new(0), func: AtomicUsize::new(0) }
        }
    }
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<RcuHead>() == 16);
