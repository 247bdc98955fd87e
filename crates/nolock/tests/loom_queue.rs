//! loom models of the MPSC queues in `nolock::queue`: the bounded ring (`BoundedQueue`, whose slots are loom
//! `UnsafeCell`s under `--cfg loom`, so a value read before its publication or overwritten before its pop is a
//! reported data race) and the unbounded queue's node protocol (`RawMpsc`: llist push, take-all, reverse).
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p nolock-mm --release --test loom_queue`.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use nolock::queue::{BoundedQueue, RawMpsc};
use nolock::sync::atomic::{AtomicUsize, Ordering};

fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

/// Two producers push into a 2-slot ring (three items in all, so one push may find it full) while the consumer
/// pops; afterwards the consumer drains. Every accepted item comes out exactly once; a refused item comes back
/// to its producer; each producer's items come out in its order.
/// Whether some explored execution popped an item while the producers ran (the model's own sanity check).
static BOUNDED_CONCURRENT_POP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static UNBOUNDED_CONCURRENT_POP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[test]
fn bounded_two_producers_one_consumer() {
    model(3, || {
        let q = Arc::new(BoundedQueue::<usize, 2>::new());
        let refused = Arc::new(AtomicUsize::new(0));
        let p1 = {
            let (q, refused) = (q.clone(), refused.clone());
            thread::spawn(move || {
                for v in [10, 11] {
                    if let Err(back) = q.push(v) {
                        assert_eq!(back, v);
                        refused.fetch_add(1 << (v - 10), Ordering::Relaxed);
                    }
                }
            })
        };
        let p2 = {
            let (q, refused) = (q.clone(), refused.clone());
            thread::spawn(move || {
                if let Err(back) = q.push(20) {
                    assert_eq!(back, 20);
                    refused.fetch_add(4, Ordering::Relaxed);
                }
            })
        };
        let mut got = Vec::new();
        // Pop while the producers run (the yields let loom schedule them in between).
        for _ in 0..2 {
            if let Some(v) = q.pop() {
                got.push(v);
                BOUNDED_CONCURRENT_POP.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            thread::yield_now();
        }
        p1.join().unwrap();
        p2.join().unwrap();
        while let Some(v) = q.pop() {
            got.push(v);
        }
        let refused = refused.load(Ordering::Relaxed);
        let mut expected: Vec<usize> =
            [(10, 1), (11, 2), (20, 4)].iter().filter(|&&(_, bit)| refused & bit == 0).map(|&(v, _)| v).collect();
        let mut sorted = got.clone();
        sorted.sort();
        expected.sort();
        assert_eq!(sorted, expected, "accepted items out exactly once");
        let p1_order: Vec<usize> = got.iter().copied().filter(|&v| v < 20).collect();
        assert!(p1_order.windows(2).all(|w| w[0] < w[1]), "per-producer order");
        assert!(q.is_empty());
    });
    assert!(BOUNDED_CONCURRENT_POP.load(std::sync::atomic::Ordering::Relaxed), "no execution popped concurrently");
}

/// A node of the unbounded protocol: the link word first, then a payload checked by loom.
#[repr(C)]
struct Node {
    link: AtomicUsize,
    payload: UnsafeCell<usize>,
}

/// Two producers (one pushes two nodes) race the consumer's pops; every node comes out once, with the payload its
/// producer wrote, and each producer's nodes in its order.
#[test]
fn unbounded_node_protocol() {
    model(3, || {
        let q = Arc::new(RawMpsc::new());
        let nodes: Arc<Vec<Node>> =
            Arc::new((0..3).map(|_| Node { link: AtomicUsize::new(0), payload: UnsafeCell::new(0) }).collect());
        let addr = |nodes: &[Node], i: usize| &nodes[i] as *const Node as usize;
        let p1 = {
            let (q, nodes) = (q.clone(), nodes.clone());
            thread::spawn(move || {
                for i in [0, 1] {
                    // SAFETY: the node is this thread's until pushed.
                    nodes[i].payload.with_mut(|p| unsafe { *p = 100 + i });
                    // SAFETY: a live node, link first, owned by the queue from now on.
                    unsafe { q.push(addr(&nodes, i)) };
                }
            })
        };
        let p2 = {
            let (q, nodes) = (q.clone(), nodes.clone());
            thread::spawn(move || {
                // SAFETY: as above.
                nodes[2].payload.with_mut(|p| unsafe { *p = 102 });
                // SAFETY: as above.
                unsafe { q.push(addr(&nodes, 2)) };
            })
        };
        let mut got = Vec::new();
        let take = |got: &mut Vec<usize>| {
            let p = q.pop();
            if p == 0 {
                return false;
            }
            let i = nodes.iter().position(|n| n as *const Node as usize == p).expect("our node");
            // SAFETY: popped, so the consumer owns it; loom checks the hand-over.
            let v = nodes[i].payload.with(|p| unsafe { *p });
            assert_eq!(v, 100 + i);
            got.push(i);
            true
        };
        for _ in 0..2 {
            if take(&mut got) {
                UNBOUNDED_CONCURRENT_POP.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            thread::yield_now();
        }
        p1.join().unwrap();
        p2.join().unwrap();
        while take(&mut got) {}
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2]);
        let p1_order: Vec<usize> = got.iter().copied().filter(|&i| i < 2).collect();
        assert_eq!(p1_order, [0, 1], "per-producer order");
        assert!(q.is_empty());
    });
    assert!(UNBOUNDED_CONCURRENT_POP.load(std::sync::atomic::Ordering::Relaxed), "no execution popped concurrently");
}
