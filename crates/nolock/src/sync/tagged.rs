//! `TaggedStack`: a Treiber stack of 32-bit indices, ABA-safe with a single 64-bit CAS.
//!
//! The head word holds `(tag << 32) | (index + 1)`; zero is the empty stack, so zeroed memory is a valid empty
//! stack. Every successful push and pop increments the tag, so a pop that read head `A` with next `B` cannot
//! succeed after `A` was popped and pushed back with another successor in between: the tag differs. (The tag wraps
//! after 2^32 changes of this one head between a pop's load and its CAS, which a preempted thread would have to
//! sleep through; that is the usual, accepted bound for tagged pointers.)
//!
//! Links live outside the stack, one `AtomicU32` per index, provided by the caller (`next_of`); they hold the
//! successor as `index + 1` (0 ends the chain). The caller guarantees that link words stay readable for the life
//! of the stack (nolock keeps them in page descriptors and shard slots, which are never unmapped).
//!
//! Ordering: push stores the link, then publishes with a `Release` CAS; pop and take-all load the head with
//! `Acquire` (pairs with that CAS) before they read the link, and their own CAS is `AcqRel`.

use super::atomic::{AtomicU32, AtomicU64, Ordering};

/// An ABA-safe lock-free stack of `u32` indices (each below `u32::MAX`).
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct TaggedStack {
    head: AtomicU64,
}

const IDX_MASK: u64 = 0xffff_ffff;

#[inline]
fn pack(tag: u64, enc: u32) -> u64 {
    (tag << 32) | u64::from(enc)
}

#[inline]
fn next_tag(word: u64) -> u64 {
    (word >> 32).wrapping_add(1) & IDX_MASK
}

impl TaggedStack {
    super::loom_const_fn! {
        /// An empty stack.
        pub fn new() -> Self {
            Self { head: AtomicU64::new(0) }
        }
    }

    /// Whether the stack looks empty right now.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) as u32 == 0
    }

    /// Push the chain `first ..= last`, already linked through their link words; `last_link` is `last`'s link.
    /// Async-signal-safe and reentrant.
    #[inline]
    pub fn push_chain(&self, first: u32, last_link: &AtomicU32) {
        debug_assert!(first < u32::MAX);
        let mut cur = self.head.load(Ordering::Relaxed);
        loop {
            last_link.store(cur as u32, Ordering::Relaxed);
            let new = pack(next_tag(cur), first + 1);
            // Release: pairs with the Acquire loads in `pop`/`take_all`; publishes the link store above.
            match self.head.compare_exchange_weak(cur, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Push `idx`, whose link word is `link`. Async-signal-safe and reentrant.
    #[inline]
    pub fn push(&self, idx: u32, link: &AtomicU32) {
        self.push_chain(idx, link)
    }

    /// Pop the most recently pushed index. `next_of(i)` returns the link word of index `i`.
    /// Async-signal-safe and reentrant.
    #[inline]
    pub fn pop<'a>(&self, next_of: impl Fn(u32) -> &'a AtomicU32) -> Option<u32> {
        // Acquire: pairs with the Release CAS of the push that published the head, so its link is visible.
        let mut cur = self.head.load(Ordering::Acquire);
        loop {
            let enc = cur as u32;
            if enc == 0 {
                return None;
            }
            // The link may be stale if `enc - 1` was popped meanwhile; then the tag changed and the CAS fails.
            let next = next_of(enc - 1).load(Ordering::Relaxed);
            let new = pack(next_tag(cur), next);
            // AcqRel on success: we take ownership of the node (Acquire) and our tag bump is ordered for the next
            // popper (Release). Acquire on failure: we are about to read the new head's link.
            match self.head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(enc - 1),
                Err(now) => cur = now,
            }
        }
    }

    /// The index on top of the stack right now, if any (a snapshot: another context may pop it at once).
    ///
    /// # Context
    /// Any context: one atomic load.
    #[inline]
    pub fn peek(&self) -> Option<u32> {
        // Acquire: pairs with the Release CAS of the push that published the top.
        (self.head.load(Ordering::Acquire) as u32).checked_sub(1)
    }

    /// Pop the top of the stack only if it is `expect`: true if this call took `expect` off the stack. Lets a
    /// caller announce which node it is about to take before it takes it (see the cache shrink).
    #[inline]
    pub fn pop_if<'a>(&self, expect: u32, next_of: impl Fn(u32) -> &'a AtomicU32) -> bool {
        // Acquire: as in `pop`.
        let mut cur = self.head.load(Ordering::Acquire);
        loop {
            if cur as u32 != expect + 1 {
                return false;
            }
            // As in `pop`: a stale link means the tag changed, and the CAS fails.
            let next = next_of(expect).load(Ordering::Relaxed);
            let new = pack(next_tag(cur), next);
            // AcqRel/Acquire: as in `pop`.
            match self.head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Take the whole stack; returns its top index, or `None` when empty. The rest follows through the links.
    #[inline]
    pub fn take_all(&self) -> Option<u32> {
        let mut cur = self.head.load(Ordering::Acquire);
        loop {
            let enc = cur as u32;
            if enc == 0 {
                return None;
            }
            let new = pack(next_tag(cur), 0);
            // AcqRel/Acquire: as in `pop`.
            match self.head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(enc - 1),
                Err(now) => cur = now,
            }
        }
    }
}

/// Decode a link word: `Some(index)` or `None` at the end of a chain.
#[inline]
pub fn decode_link(v: u32) -> Option<u32> {
    v.checked_sub(1)
}
