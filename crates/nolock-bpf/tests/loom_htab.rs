//! loom models of the bucket operations of the lock-free mode (`nolock_bpf::htab::list`): inserts at head,
//! claim-and-help replace and delete, and lockless lookups, run by two threads on one bucket.
//!
//! Under `--cfg loom` the crate compiles only the list, with loom's atomics (through `nolock::sync::atomic`),
//! so these models explore the code the map runs. Elements come from a fixed array and are never reused within
//! a model, which is what the lock-free mode guarantees (an unlinked element is reused only after a grace
//! period, and every walk runs inside a read-side section). Each element's value sits in a loom `UnsafeCell`
//! written before the element is published and read by walks: loom reports a data race if a publication
//! ordering is missing.
//!
//! Checked in every interleaving: at most one unclaimed element per key is reachable; the operations' results
//! are those of some sequential order; each unlinked element is retired exactly once and only when unreachable;
//! lookups of a key that stays present always find it.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p nolock-bpf --release --test loom_htab`.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use nolock::sync::atomic::{AtomicUsize, Ordering};
use nolock_bpf::htab::list::{self, Done, Nodes, WalkStats, Want};

#[repr(C, align(8))]
struct Node {
    next: AtomicUsize,
    repl: AtomicUsize,
    key: AtomicUsize,
    value: UnsafeCell<usize>,
    retired: AtomicUsize,
}

struct Arena {
    head: AtomicUsize,
    nodes: Vec<Node>,
    /// Next free node (each thread takes from its own range, so no allocator is modelled).
    _pad: usize,
}

impl Nodes for Arena {
    unsafe fn next(&self, e: usize) -> &AtomicUsize {
        &self.node(e).next
    }
    unsafe fn repl(&self, e: usize) -> &AtomicUsize {
        &self.node(e).repl
    }
}

impl Arena {
    fn new(n: usize) -> Self {
        Arena {
            head: AtomicUsize::new(list::nulls(0)),
            nodes: (0..n)
                .map(|_| Node {
                    next: AtomicUsize::new(0),
                    repl: AtomicUsize::new(0),
                    key: AtomicUsize::new(0),
                    value: UnsafeCell::new(0),
                    retired: AtomicUsize::new(0),
                })
                .collect(),
            _pad: 0,
        }
    }
    fn addr(&self, i: usize) -> usize {
        &self.nodes[i] as *const Node as usize
    }
    fn node(&self, e: usize) -> &Node {
        let i = self.nodes.iter().position(|n| n as *const Node as usize == e).expect("an element of the arena");
        &self.nodes[i]
    }
    /// Initialise node `i` (private) with key and value.
    fn init(&self, i: usize, key: usize, value: usize) -> usize {
        let n = &self.nodes[i];
        n.key.store(key, Ordering::Relaxed);
        n.repl.store(0, Ordering::Relaxed);
        n.next.store(list::UNSET, Ordering::Relaxed);
        // SAFETY: the node is private until published.
        n.value.with_mut(|p| unsafe { *p = value });
        self.addr(i)
    }
    fn key_of(&self, e: usize) -> usize {
        self.node(e).key.load(Ordering::Relaxed)
    }
    fn value_of(&self, e: usize) -> usize {
        // SAFETY: a published node's value is written before publication and never again; loom checks it.
        self.node(e).value.with(|p| unsafe { *p })
    }
    fn retire(&self, e: usize) {
        assert_eq!(self.node(e).retired.fetch_add(1, Ordering::Relaxed), 0, "an element retired twice");
    }

    fn update(&self, key: usize, value: usize, want: Want, slot: usize) -> Done {
        let mut st = WalkStats::default();
        let e = self.init(slot, key, value);
        // SAFETY: elements are never reused within the model (grace-period reuse).
        unsafe {
            list::update(
                self,
                &self.head,
                0,
                |c| self.key_of(c) == key,
                want,
                |_| Ok::<usize, ()>(e),
                &mut |r| self.retire(r),
                &mut st,
            )
        }
        .unwrap()
    }

    fn delete(&self, key: usize) -> Option<usize> {
        let mut st = WalkStats::default();
        let mut got = None;
        // SAFETY: as in `update`.
        let found = unsafe {
            list::delete(
                self,
                &self.head,
                0,
                |c| self.key_of(c) == key,
                |e| got = Some(self.value_of(e)),
                &mut |r| self.retire(r),
                &mut st,
            )
        };
        assert_eq!(found, got.is_some());
        got
    }

    fn lookup(&self, key: usize) -> Option<usize> {
        let mut restarts = 0;
        // SAFETY: as in `update`.
        unsafe { list::lookup(self, &self.head, 0, |c| self.key_of(c) == key, &mut restarts) }.map(|e| self.value_of(e))
    }

    /// Final state (single-threaded): reachable (key, value) pairs, checking that unlinked nodes were retired
    /// once and reachable ones not at all.
    fn reachable(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        let mut cur = self.head.load(Ordering::Acquire);
        while !list::is_nulls(cur) {
            assert_eq!(self.node(cur).repl.load(Ordering::Relaxed), 0, "a claimed element left in the list");
            assert_eq!(self.node(cur).retired.load(Ordering::Relaxed), 0, "a reachable element was retired");
            out.push((self.key_of(cur), self.value_of(cur)));
            seen.push(cur);
            cur = self.node(cur).next.load(Ordering::Acquire) & !list::MARK;
        }
        assert_eq!(list::nulls_index(cur), 0);
        for (i, n) in self.nodes.iter().enumerate() {
            let a = self.addr(i);
            let claimed = n.repl.load(Ordering::Relaxed) != 0;
            if claimed {
                assert!(!seen.contains(&a));
                assert_eq!(n.retired.load(Ordering::Relaxed), 1, "a removed element was not retired");
            }
        }
        let mut keys: Vec<usize> = out.iter().map(|p| p.0).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), out.len(), "two live elements with one key: {out:?}");
        out.sort();
        out
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// Prefill: node `i` with (key, value), linked in order so that the list is `pre[0] -> pre[1] -> ...`.
fn prefill(a: &Arena, pre: &[(usize, usize)]) {
    for (i, &(k, v)) in pre.iter().enumerate().rev() {
        assert_eq!(a.update(k, v, Want::NoExist, i), Done::Inserted);
    }
}

/// Two inserts of the same key (NoExist): exactly one wins.
#[test]
fn insert_insert_same_key() {
    model(|| {
        let a = Arc::new(Arena::new(4));
        prefill(&a, &[(9, 90)]);
        let a2 = a.clone();
        let t = thread::spawn(move || a2.update(1, 20, Want::NoExist, 2));
        let r1 = a.update(1, 10, Want::NoExist, 1);
        let r2 = t.join().unwrap();
        let fin = a.reachable();
        match (r1, r2) {
            (Done::Inserted, Done::Exists) => assert_eq!(fin, vec![(1, 10), (9, 90)]),
            (Done::Exists, Done::Inserted) => assert_eq!(fin, vec![(1, 20), (9, 90)]),
            o => panic!("both or neither inserted: {o:?}"),
        }
    });
}

/// A replace (Any) and a delete of the same key, and a stable key that lookups always find.
#[test]
fn replace_delete_same_key() {
    model(|| {
        let a = Arc::new(Arena::new(4));
        prefill(&a, &[(1, 10), (9, 90)]);
        let a2 = a.clone();
        let t = thread::spawn(move || {
            let d = a2.delete(1);
            assert_eq!(a2.lookup(9), Some(90), "a stable key vanished");
            d
        });
        let r = a.update(1, 11, Want::Any, 2);
        let d = t.join().unwrap();
        let fin = a.reachable();
        // Replace then delete: the delete took 11, key gone. Delete then Any: the delete took 10, Any inserted.
        match (r, d) {
            (Done::Replaced, Some(11)) => assert_eq!(fin, vec![(9, 90)]),
            (Done::Inserted, Some(10)) => assert_eq!(fin, vec![(1, 11), (9, 90)]),
            o => panic!("no sequential order: {o:?}, final {fin:?}"),
        }
    });
}

/// Two replaces of neighbouring keys: the completion of one changes the predecessor link of the other.
#[test]
fn replace_replace_neighbours() {
    model(|| {
        let a = Arc::new(Arena::new(5));
        prefill(&a, &[(1, 10), (2, 20)]);
        let a2 = a.clone();
        let t = thread::spawn(move || a2.update(2, 21, Want::Exist, 3));
        let r = a.update(1, 11, Want::Exist, 2);
        assert_eq!(t.join().unwrap(), Done::Replaced);
        assert_eq!(r, Done::Replaced);
        assert_eq!(a.reachable(), vec![(1, 11), (2, 21)]);
    });
}

/// Delete of a key while its successor is deleted and a new key is inserted at the head.
#[test]
fn delete_neighbours_and_insert() {
    model(|| {
        let a = Arc::new(Arena::new(5));
        prefill(&a, &[(1, 10), (2, 20), (3, 30)]);
        let a2 = a.clone();
        let t = thread::spawn(move || {
            let d = a2.delete(2);
            assert_eq!(a2.lookup(3), Some(30), "a stable key vanished");
            d
        });
        let d1 = a.delete(1);
        let r = a.update(4, 40, Want::NoExist, 3);
        assert_eq!(t.join().unwrap(), Some(20));
        assert_eq!(d1, Some(10));
        assert_eq!(r, Done::Inserted);
        assert_eq!(a.reachable(), vec![(3, 30), (4, 40)]);
    });
}

/// A reader looks a key up while it is replaced: it sees the old or the new value, never nothing.
#[test]
fn lookup_during_replace() {
    model(|| {
        let a = Arc::new(Arena::new(4));
        prefill(&a, &[(7, 1), (1, 10)]);
        let a2 = a.clone();
        let t = thread::spawn(move || a2.lookup(1));
        assert_eq!(a.update(1, 11, Want::Exist, 2), Done::Replaced);
        let v = t.join().unwrap();
        assert!(v == Some(10) || v == Some(11), "lookup during a replace saw {v:?}");
        assert_eq!(a.reachable(), vec![(1, 11), (7, 1)]);
    });
}
