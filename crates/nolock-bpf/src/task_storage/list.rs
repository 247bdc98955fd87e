//! The two intrusive lists every element is on: its owner's list (`snode`) and its map bucket (`map_node`).
//!
//! Both are lock-free singly linked lists in the manner of Harris: a node is inserted at the head with one
//! compare-and-swap, deleted logically by setting [`MARK`] in its own link word (after which nothing can be
//! inserted behind it and its link never changes again), and unlinked physically by whichever traversal finds
//! it marked, with a compare-and-swap on its predecessor's link. A traversal that fails such a compare-and-swap
//! starts again from the head. No step waits for another context, so a signal handler that interrupts any step
//! on the same thread finishes its own operation (and may finish the interrupted one's unlinking for it); the
//! interrupted compare-and-swap then fails and retries. Memory stays valid for traversals because nodes are
//! freed only after a grace period of the domains every traversal holds (see the module header).
//!
//! A list head's low bit is not a mark but a flag of the head itself (the owner list's `DEAD`: the owner has
//! exited and takes no more insertions); unlinking at the head keeps it.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Low bit of a node's link word: the node is deleted.
pub(crate) const MARK: usize = 1;

/// Which link word of a node a list uses.
pub(crate) type LinkOf = unsafe fn(usize) -> *const AtomicUsize;

/// Unlinks every marked node of the list at `head`, walking it to the end.
///
/// Once a node is marked, a completed call unlinks it: nothing is inserted behind a marked node and insertion
/// happens only at the head, so the walk reaches every node that was on the list when it started.
///
/// # Safety
/// The caller holds the read-side protection under which nodes of this list are freed, and `link` gives the
/// link word of a node of this list.
pub(crate) unsafe fn clean(head: &AtomicUsize, link: LinkOf) {
    'restart: loop {
        let mut pred: *const AtomicUsize = head;
        let mut at_head = true;
        // Acquire: pairs with the Release (AcqRel) compare-and-swap that inserted or unlinked the node.
        // SAFETY: `pred` is the head or the link of a node reached under the caller's protection.
        let mut pw = unsafe { &*pred }.load(Ordering::Acquire);
        loop {
            let cur = pw & !MARK;
            if cur == 0 {
                return;
            }
            // Acquire: pairs with the insertion's Release compare-and-swap that published the node's link.
            // SAFETY: `cur` is a node of this list, alive under the caller's protection.
            let cw = unsafe { &*link(cur) }.load(Ordering::Acquire);
            if cw & MARK != 0 {
                // Keep the head's own flag; a node's link we advanced to was unmarked when read.
                let flag = if at_head { pw & MARK } else { 0 };
                let new = (cw & !MARK) | flag;
                // AcqRel: Release publishes the skip to later walkers (their Acquire loads above); Acquire on
                // failure reads the newer value before restarting.
                // SAFETY: as above.
                match unsafe { &*pred }.compare_exchange(pw, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => pw = new,
                    Err(_) => continue 'restart,
                }
            } else {
                // SAFETY: as above.
                pred = unsafe { link(cur) };
                pw = cw;
                at_head = false;
            }
        }
    }
}

/// Calls `f` on every node of the list at `head` in order, marked ones included (the caller filters), until it
/// returns `Some`.
///
/// # Safety
/// As [`clean`].
pub(crate) unsafe fn find<T>(head: &AtomicUsize, link: LinkOf, mut f: impl FnMut(usize) -> Option<T>) -> Option<T> {
    // Acquire: pairs with the Release compare-and-swap that inserted the first node.
    let mut cur = head.load(Ordering::Acquire) & !MARK;
    while cur != 0 {
        if let Some(t) = f(cur) {
            return Some(t);
        }
        // Acquire: pairs with the insertion's Release compare-and-swap that linked the next node.
        // SAFETY: `cur` is a node of this list, alive under the caller's protection.
        cur = unsafe { &*link(cur) }.load(Ordering::Acquire) & !MARK;
    }
    None
}

/// Pushes `node` at the head of a list whose head carries no flag (a map bucket), retrying until it is in.
///
/// # Safety
/// `node` is not on this list, and `link(node)` is its link word for this list.
pub(crate) unsafe fn push(head: &AtomicUsize, node: usize, link: LinkOf) {
    let mut h = head.load(Ordering::Relaxed);
    loop {
        // SAFETY: the caller owns `node` until it is linked.
        unsafe { &*link(node) }.store(h, Ordering::Relaxed);
        // Release: publishes the node's contents to walkers' Acquire loads in `find` and `clean`.
        match head.compare_exchange_weak(h, node, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => h = now,
        }
    }
}
