//! `Llist`: a lock-free multi-producer stack of nodes linked through a word inside each node (the kernel's
//! `llist`). Producers push single nodes or whole chains with a CAS; the consumer takes everything at once with
//! a swap. There is no single-node pop, so there is no ABA problem and no tag.
//!
//! Ordering: a push publishes the node (its link word and everything written to it before) with a `Release` CAS;
//! [`Llist::take_all`] acquires with an `Acquire` swap, so the consumer sees the links and the contents.

use super::atomic::{AtomicUsize, Ordering};

/// A lock-free stack of node addresses. Zero-initialised memory is a valid empty list.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct Llist {
    head: AtomicUsize,
}

impl Llist {
    super::loom_const_fn! {
        /// An empty list.
        pub fn new() -> Self {
            Self { head: AtomicUsize::new(0) }
        }
    }

    /// Whether the list looks empty right now (a hint: another context may push at any moment).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) == 0
    }

    /// Push the chain `first ..= last` (already linked through their link words); `last_link` is the link word of
    /// `last`. Returns true when the list was empty before, the moment to kick whoever drains it.
    ///
    /// Async-signal-safe and reentrant.
    #[inline]
    pub fn push_chain(&self, first: usize, last_link: &AtomicUsize) -> bool {
        debug_assert_ne!(first, 0);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            last_link.store(head, Ordering::Relaxed);
            // Release: pairs with the Acquire swap in `take_all`; publishes the links and node contents.
            match self.head.compare_exchange_weak(head, first, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return head == 0,
                Err(now) => head = now,
            }
        }
    }

    /// Push one node whose link word is `link`. Returns true when the list was empty before.
    #[inline]
    pub fn push(&self, node: usize, link: &AtomicUsize) -> bool {
        self.push_chain(node, link)
    }

    /// Take every node pushed so far; returns the most recently pushed node (0 when empty). Follow the chain
    /// through the nodes' link words until 0.
    #[inline]
    pub fn take_all(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        // Acquire: pairs with the Release CAS in `push_chain`.
        self.head.swap(0, Ordering::Acquire)
    }
}
