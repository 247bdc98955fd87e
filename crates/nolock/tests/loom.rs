//! loom models of the lock-free building blocks in `nolock::sync`: `Llist`, `TaggedStack` and `SlabFreelist`.
//!
//! Under `--cfg loom` only `nolock::sync` is compiled, with loom's atomics, so these models explore the very
//! code the allocator runs. Every model keeps a small payload next to each node in a `loom::cell::UnsafeCell`,
//! written by the node's owner before it publishes the node and read/written by whoever takes it: loom reports
//! a data race if the push/take orderings do not hand ownership over, or if one node is owned by two threads
//! at once (for example after an ABA pop).
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p nolock-mm --release --test loom`.
//! The preemption bound keeps the whole file to about a minute.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use nolock::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use nolock::sync::llist::Llist;
use nolock::sync::slab_freelist::{DEAD, Geometry, LISTED, PushError, SlabFreelist, State};
use nolock::sync::tagged::{TaggedStack, decode_link};

fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

// ---------------------------------------------------------------------------------------------------------------
// Llist
// ---------------------------------------------------------------------------------------------------------------

/// A list node: the link word first (its address is the node's address), then a payload.
#[repr(C)]
struct LNode {
    link: AtomicUsize,
    payload: UnsafeCell<usize>,
}

fn lnodes(n: usize) -> Arc<Vec<LNode>> {
    Arc::new((0..n).map(|_| LNode { link: AtomicUsize::new(0), payload: UnsafeCell::new(0) }).collect())
}

fn laddr(nodes: &[LNode], i: usize) -> usize {
    &nodes[i] as *const LNode as usize
}

/// Walk a chain taken from the list: node indices in list order; reads each payload (ownership check).
fn lwalk(nodes: &[LNode], mut head: usize, out: &mut Vec<usize>) {
    while head != 0 {
        let i = nodes.iter().position(|n| n as *const LNode as usize == head).expect("the list holds only our nodes");
        let v = nodes[i].payload.with(|p| {
            // SAFETY: the node was taken from the list, so this thread owns it; loom checks the claim.
            unsafe { *p }
        });
        assert_eq!(v, 100 + i, "payload published with the node");
        out.push(i);
        head = nodes[i].link.load(Ordering::Relaxed);
    }
}

/// Two producers (one pushes a 2-node chain) race a consumer's take_all; every node is seen exactly once, the
/// chain stays intact, and "was empty" is reported exactly once per non-empty take.
#[test]
fn llist_push_chain_vs_take_all() {
    model(3, || {
        let list = Arc::new(Llist::new());
        let nodes = lnodes(3);
        let empties = Arc::new(AtomicUsize::new(0));

        let t1 = {
            let (list, nodes, empties) = (list.clone(), nodes.clone(), empties.clone());
            thread::spawn(move || {
                // SAFETY: node 0 is owned by this thread until it is pushed.
                nodes[0].payload.with_mut(|p| unsafe { *p = 100 });
                if list.push(laddr(&nodes, 0), &nodes[0].link) {
                    empties.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let t2 = {
            let (list, nodes, empties) = (list.clone(), nodes.clone(), empties.clone());
            thread::spawn(move || {
                for i in [1, 2] {
                    // SAFETY: nodes 1 and 2 are owned by this thread until they are pushed.
                    nodes[i].payload.with_mut(|p| unsafe { *p = 100 + i });
                }
                nodes[1].link.store(laddr(&nodes, 2), Ordering::Relaxed);
                if list.push_chain(laddr(&nodes, 1), &nodes[2].link) {
                    empties.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let (list2, nodes2) = (list.clone(), nodes.clone());
        let t3 = thread::spawn(move || {
            let mut seen = Vec::new();
            let mut takes = 0;
            for _ in 0..2 {
                let h = list2.take_all();
                if h != 0 {
                    takes += 1;
                }
                lwalk(&nodes2, h, &mut seen);
            }
            (seen, takes)
        });
        t1.join().unwrap();
        t2.join().unwrap();
        let (mut seen, mut takes) = t3.join().unwrap();
        let h = list.take_all();
        if h != 0 {
            takes += 1;
        }
        lwalk(&nodes, h, &mut seen);
        assert!(list.is_empty());

        let pos = |i| seen.iter().position(|&x| x == i).unwrap();
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2], "every node exactly once: {seen:?}");
        assert_eq!(pos(2), pos(1) + 1, "the pushed chain 1 -> 2 stays linked: {seen:?}");
        assert_eq!(empties.load(Ordering::Relaxed), takes, "one 'was empty' push per non-empty take");
    });
}

// ---------------------------------------------------------------------------------------------------------------
// TaggedStack
// ---------------------------------------------------------------------------------------------------------------

/// Per-index link words and payloads for a `TaggedStack`.
struct TNodes {
    links: Vec<AtomicU32>,
    payload: Vec<UnsafeCell<u32>>,
}

impl TNodes {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            links: (0..n).map(|_| AtomicU32::new(0)).collect(),
            payload: (0..n).map(|_| UnsafeCell::new(0)).collect(),
        })
    }

    /// The caller owns `i`: check the payload that the previous owner left and write its own.
    fn own(&self, i: u32, expect: Option<u32>, write: u32) {
        self.payload[i as usize].with_mut(|p| {
            // SAFETY: index `i` is owned by this thread (popped, or never pushed yet); loom checks the claim.
            unsafe {
                if let Some(e) = expect {
                    assert_eq!(*p, e, "index {i} payload");
                }
                *p = write;
            }
        });
    }

    fn pop(&self, s: &TaggedStack) -> Option<u32> {
        s.pop(|i| &self.links[i as usize])
    }

    /// Everything reachable from `top` through the links.
    fn walk(&self, top: Option<u32>, out: &mut Vec<u32>) {
        let mut cur = top;
        while let Some(i) = cur {
            out.push(i);
            assert!(out.len() <= self.links.len(), "cycle in the stack: {out:?}");
            cur = decode_link(self.links[i as usize].load(Ordering::Relaxed));
        }
    }
}

/// The ABA scenario: the stack holds A over B; one thread pops A, pops B and pushes A back while another
/// thread's pop (which may have read "A, next B") is in flight. With the tag, the in-flight pop cannot install
/// B as the head while B is owned by the first thread; no index is lost or duplicated.
#[test]
fn tagged_stack_aba() {
    model(3, || {
        const A: u32 = 0;
        const B: u32 = 1;
        let s = Arc::new(TaggedStack::new());
        let n = TNodes::new(2);
        n.own(B, None, 7);
        s.push(B, &n.links[B as usize]);
        n.own(A, None, 7);
        s.push(A, &n.links[A as usize]);

        let t1 = {
            let (s, n) = (s.clone(), n.clone());
            thread::spawn(move || {
                let mut got = Vec::new();
                let x = n.pop(&s);
                let y = n.pop(&s);
                for i in [x, y].into_iter().flatten() {
                    n.own(i, Some(7), 8);
                    got.push(i);
                }
                // Push back the first one we got (A, unless the other thread was faster).
                if let Some(&back) = got.first() {
                    n.own(back, Some(8), 7);
                    s.push(back, &n.links[back as usize]);
                    got.remove(0);
                }
                got
            })
        };
        let t2 = {
            let (s, n) = (s.clone(), n.clone());
            thread::spawn(move || {
                let x = n.pop(&s);
                if let Some(i) = x {
                    n.own(i, Some(7), 9);
                }
                x
            })
        };
        let mut all = t1.join().unwrap();
        all.extend(t2.join().unwrap());
        let mut rest = Vec::new();
        n.walk(s.take_all(), &mut rest);
        assert!(s.is_empty());
        assert_eq!(s.take_all(), None);
        all.extend(rest);
        all.sort_unstable();
        assert_eq!(all, [A, B], "each index exactly once");
    });
}

/// Pushes from two threads (one a chain) race a pop and a take_all; every index comes out exactly once.
#[test]
fn tagged_stack_push_pop_take_all() {
    model(3, || {
        let s = Arc::new(TaggedStack::new());
        let n = TNodes::new(4);
        n.own(3, None, 5);
        s.push(3, &n.links[3]);

        let t1 = {
            let (s, n) = (s.clone(), n.clone());
            thread::spawn(move || {
                n.own(0, None, 5);
                s.push(0, &n.links[0]);
            })
        };
        let t2 = {
            let (s, n) = (s.clone(), n.clone());
            thread::spawn(move || {
                n.own(1, None, 5);
                n.own(2, None, 5);
                n.links[1].store(2 + 1, Ordering::Relaxed);
                s.push_chain(1, &n.links[2]);
            })
        };
        let t3 = {
            let (s, n) = (s.clone(), n.clone());
            thread::spawn(move || {
                let mut got = Vec::new();
                if let Some(i) = n.pop(&s) {
                    n.own(i, Some(5), 6);
                    got.push(i);
                }
                let mut taken = Vec::new();
                n.walk(s.take_all(), &mut taken);
                for &i in &taken {
                    n.own(i, Some(5), 6);
                }
                // 1 -> 2 was pushed as a chain: if both were taken together they are adjacent.
                if let Some(p) = taken.iter().position(|&x| x == 1) {
                    assert_eq!(taken.get(p + 1), Some(&2), "chain intact: {taken:?}");
                }
                got.extend(taken);
                got
            })
        };
        t1.join().unwrap();
        t2.join().unwrap();
        let mut all = t3.join().unwrap();
        let mut rest = Vec::new();
        n.walk(s.take_all(), &mut rest);
        all.extend(rest);
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3], "each index exactly once");
    });
}

// ---------------------------------------------------------------------------------------------------------------
// SlabFreelist
// ---------------------------------------------------------------------------------------------------------------

/// A fake slab: `capacity` objects that are just their link words, a payload per object, the state word, and
/// a model of the cache's partial list (how many times the slab is on it: 0 or 1).
struct Slab {
    objs: Vec<AtomicUsize>,
    payload: Vec<UnsafeCell<usize>>,
    fl: SlabFreelist,
    partial: AtomicUsize,
}

impl Slab {
    /// A slab whose objects are all in use, unlisted: the state `new_slab` leaves behind.
    fn new(capacity: u16) -> Arc<Self> {
        Arc::new(Self {
            objs: (0..capacity).map(|_| AtomicUsize::new(0)).collect(),
            payload: (0..capacity).map(|_| UnsafeCell::new(0)).collect(),
            fl: SlabFreelist::new(State::new(0, capacity, 0)),
            partial: AtomicUsize::new(0),
        })
    }

    fn geo(&self) -> Geometry {
        Geometry {
            base: self.objs.as_ptr() as usize,
            stride: core::mem::size_of::<AtomicUsize>(),
            link_off: 0,
            capacity: self.objs.len() as u16,
        }
    }

    fn addr(&self, i: usize) -> usize {
        self.geo().obj(i as u32)
    }

    fn index(&self, addr: usize) -> usize {
        let g = self.geo();
        assert!(addr >= g.base && (addr - g.base) % g.stride == 0, "{addr:#x} is no object");
        let i = (addr - g.base) / g.stride;
        assert!(i < self.objs.len());
        i
    }

    /// The caller owns object `i`: check the previous owner's payload and write its own.
    fn own(&self, i: usize, expect: usize, write: usize) {
        self.payload[i].with_mut(|p| {
            // SAFETY: object `i` is owned by this thread; loom checks the claim.
            unsafe {
                assert_eq!(*p, expect, "object {i} payload");
                *p = write;
            }
        });
    }

    /// Free the objects `idx` (in use, owned by the caller) as one chain, and follow the listing protocol.
    fn free(&self, idx: &[usize]) -> Result<bool, PushError> {
        for &i in idx {
            self.own(i, 0, 1);
        }
        for w in idx.windows(2) {
            self.objs[w[0]].store(self.addr(w[1]), Ordering::Relaxed);
        }
        let last = *idx.last().unwrap();
        // SAFETY: the objects belong to this slab, are counted in `used`, and the caller gives them up.
        let r = unsafe { self.fl.push_chain(&self.geo(), idx[0] as u32, self.addr(last), idx.len() as u16) }?;
        if r.listed_now {
            // The pusher that listed the slab puts it on the partial list: it must not be there already.
            assert_eq!(self.partial.fetch_add(1, Ordering::AcqRel), 0, "slab listed twice");
        }
        Ok(r.listed_now)
    }

    /// Take the slab off the partial list (the take right), if it is there.
    fn take_right(&self) -> bool {
        self.partial.compare_exchange(1, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Put the slab back on the partial list (its state is still `LISTED`).
    fn put_back(&self) {
        assert_eq!(self.partial.fetch_add(1, Ordering::AcqRel), 0, "slab listed twice");
    }

    /// Walk a chain of `n` objects taken from the slab, taking ownership of each.
    fn walk(&self, first: usize, n: u16, out: &mut Vec<usize>) {
        let mut cur = first;
        for _ in 0..n {
            let i = self.index(cur);
            self.own(i, 1, 0);
            out.push(i);
            cur = self.objs[i].load(Ordering::Relaxed);
        }
    }
}

/// Remote frees (two threads; one frees a chain) race the take-right holder's pop_one and take_all. Checks:
/// every freed object comes back exactly once, the in-use count, and the listing protocol (the slab is on the
/// partial list at most once, a listed slab always has a free object, a slab with free objects is always listed).
#[test]
fn slab_freelist_remote_free_vs_take() {
    model(3, || {
        // Four objects, all in use. Object 0 stays in use; 1 is freed by one thread, 2 and 3 by another.
        let slab = Slab::new(4);
        let r1 = {
            let slab = slab.clone();
            thread::spawn(move || slab.free(&[1]).unwrap())
        };
        let r2 = {
            let slab = slab.clone();
            thread::spawn(move || slab.free(&[2, 3]).unwrap())
        };
        let taker = {
            let slab = slab.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                if slab.take_right() {
                    let g = slab.geo();
                    let (obj, emptied) = slab.fl.pop_one(&g).expect("a listed slab has a free object");
                    let i = slab.index(obj);
                    slab.own(i, 1, 0);
                    got.push(i);
                    // When pop_one emptied the list it also unlisted the slab in the same CAS (a later free
                    // lists it again; the final checks cover that). Otherwise take the rest.
                    if !emptied {
                        // Take the rest; this unlists the slab, and the next free lists it again.
                        let (first, n) = slab.fl.take_all(&g);
                        assert!(n >= 1, "not emptied by pop_one, so something is left");
                        slab.walk(first, n, &mut got);
                    }
                }
                got
            })
        };
        let l1 = r1.join().unwrap();
        let l2 = r2.join().unwrap();
        let mut got = taker.join().unwrap();

        let st = slab.fl.load();
        let on_list = slab.partial.load(Ordering::Relaxed);
        let free_now = 3 - got.len();
        assert_eq!(st.used() as usize, 4 - free_now, "in-use count");
        assert_eq!(st.flags() & LISTED != 0, on_list == 1, "LISTED <=> on the partial list");
        assert_eq!(st.head_enc() != 0, on_list == 1, "free objects <=> findable");
        // Every listing was either consumed by the taker or is still there.
        let listings = usize::from(l1) + usize::from(l2);
        assert!((1..=2).contains(&listings), "one or two listings: {listings}");
        assert_eq!(listings, on_list + usize::from(!got.is_empty()));

        // Drain what is left, as the next holder of the take right would.
        if slab.take_right() {
            let (first, n) = slab.fl.take_all(&slab.geo());
            slab.walk(first, n, &mut got);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3], "each freed object exactly once");
        let st = slab.fl.load();
        assert_eq!((st.used(), st.head_enc(), st.flags()), (4, 0, 0));
    });
}

/// The take-right holder (popping the slab off the partial list) may push objects back while remote frees come
/// in; pushes of objects it took and of remote objects interleave, and each lists the slab at most once.
#[test]
fn slab_freelist_local_and_remote_push() {
    model(3, || {
        let slab = Slab::new(3);
        let r = {
            let slab = slab.clone();
            thread::spawn(move || slab.free(&[2]).unwrap())
        };
        // This thread frees 0 (listing the slab unless the remote free was first), then acts as the allocator:
        // takes the right, takes everything, frees one object back.
        slab.free(&[0]).unwrap();
        let mut got = Vec::new();
        // Whoever freed first listed the slab; it may still be about to put it on the partial list.
        if slab.take_right() {
            let (first, n) = slab.fl.take_all(&slab.geo());
            assert!(n >= 1, "a listed slab has a free object");
            slab.walk(first, n, &mut got);
            // take_all unlisted it; this free (or the remote one, if it comes later) lists it again.
            let back = got.pop().unwrap();
            slab.free(&[back]).unwrap();
        }
        r.join().unwrap();
        if slab.take_right() {
            let (first, n) = slab.fl.take_all(&slab.geo());
            slab.walk(first, n, &mut got);
        }
        assert_eq!(slab.partial.load(Ordering::Relaxed), 0);
        got.sort_unstable();
        assert_eq!(got, [0, 2], "each freed object exactly once");
        assert_eq!(slab.fl.load().used(), 3);
    });
}

/// try_kill: refused while an object is in use (changing nothing); succeeds only on a fully free slab held
/// through the partial list, racing the frees that make it free; afterwards every push is refused with `Dead`
/// and changes nothing.
#[test]
fn slab_freelist_try_kill() {
    model(3, || {
        let slab = Slab::new(2);
        let st0 = slab.fl.load();
        assert!(!slab.fl.try_kill(), "objects are in use");
        assert_eq!(slab.fl.load(), st0, "a refused kill changes nothing");
        let frees: Vec<_> = [0usize, 1]
            .into_iter()
            .map(|i| {
                let slab = slab.clone();
                thread::spawn(move || slab.free(&[i]).unwrap())
            })
            .collect();
        // The shrinker: take the slab off the partial list; kill it if entirely free, else put it back.
        let mut killed = false;
        if slab.take_right() {
            let before = slab.fl.load();
            assert_ne!(before.flags() & LISTED, 0);
            if slab.fl.try_kill() {
                killed = true;
            } else {
                // An object was still in use when try_kill looked; the slab stays listed and goes back.
                assert_ne!(slab.fl.load().flags() & (LISTED | DEAD), DEAD);
                slab.put_back();
            }
        }
        for t in frees {
            t.join().unwrap();
        }
        if !killed {
            // All objects are free now and the slab is listed.
            assert!(slab.take_right(), "a slab with free objects is on the partial list");
            assert_eq!(slab.fl.load().used(), 0);
            assert!(slab.fl.try_kill());
        }
        let st = slab.fl.load();
        assert_eq!(st.flags(), DEAD);
        assert!(!slab.fl.try_kill(), "killed once only");
        // Nothing can be pushed to a dead slab.
        let g = slab.geo();
        // SAFETY: a deliberate bad push; it must be refused without touching the state.
        let r = unsafe { slab.fl.push_chain(&g, 0, slab.addr(0), 1) };
        assert_eq!(r, Err(PushError::Dead));
        assert_eq!(slab.fl.load(), st);
    });
}

/// A double free that reaches the slab (more objects pushed than are in use) is refused and changes nothing,
/// even when it races a legitimate free.
#[test]
fn slab_freelist_underflow() {
    model(3, || {
        // Two objects, one in use (object 1; object 0 is on the free list).
        let slab = Slab::new(2);
        slab.fl.init(State::new(1, 1, LISTED));
        slab.objs[0].store(0, Ordering::Relaxed);
        slab.partial.store(1, Ordering::Relaxed);
        slab.payload[0].with_mut(|p| {
            // SAFETY: no other thread exists yet.
            unsafe { *p = 1 }
        });
        let (s1, s2) = (slab.clone(), slab.clone());
        // Two threads both free object 1: exactly one push is accepted.
        let a = thread::spawn(move || {
            let g = s1.geo();
            // SAFETY: deliberate racing double free of object 1 (its payload is not touched).
            unsafe { s1.fl.push_chain(&g, 1, s1.addr(1), 1) }
        });
        let b = thread::spawn(move || {
            let g = s2.geo();
            // SAFETY: as above.
            unsafe { s2.fl.push_chain(&g, 1, s2.addr(1), 1) }
        });
        let ra = a.join().unwrap();
        let rb = b.join().unwrap();
        assert!(ra.is_ok() != rb.is_ok(), "exactly one of two frees of one object is accepted: {ra:?} {rb:?}");
        assert!([ra, rb].contains(&Err(PushError::Underflow)));
        let st = slab.fl.load();
        assert_eq!((st.used(), st.head_enc(), st.flags()), (0, 2, LISTED));
    });
}

/// `PushError` promises that a refused push changed nothing. A double free of an object that sits on the free
/// list can race a legitimate free: the double free reads the state (one object in use), stores the list head
/// into the object's link word, loses its CAS to the legitimate free, then sees `used == 0` and is refused with
/// `Underflow`. This model found that the link word used to stay overwritten (the list then looped X -> X);
/// `push_chain` now puts it back on refusal. (A taker running in that window could still read the temporary
/// value: only debug caches, with per-object state, make a racing double free fully safe.)
#[test]
fn slab_freelist_refused_double_free_changes_nothing() {
    model(1, || {
        // Objects: X = 0 free at the head (link -> Y), Y = 1 free (end), W = 2 in use.
        let slab = Slab::new(3);
        slab.objs[0].store(slab.addr(1), Ordering::Relaxed);
        slab.objs[1].store(0, Ordering::Relaxed);
        slab.fl.init(State::new(1, 1, LISTED));
        let s1 = slab.clone();
        let legit = thread::spawn(move || {
            let g = s1.geo();
            // SAFETY: W is in use and freed once.
            unsafe { s1.fl.push_chain(&g, 2, s1.addr(2), 1) }
        });
        let g = slab.geo();
        // SAFETY: a deliberate double free of X, which is on the free list.
        let dbl = unsafe { slab.fl.push_chain(&g, 0, slab.addr(0), 1) };
        let legit = legit.join().unwrap();
        if dbl == Err(PushError::Underflow) {
            assert!(legit.is_ok());
            let (first, n) = slab.fl.take_all(&g);
            assert_eq!(n, 3);
            let mut cur = first;
            let mut seen = Vec::new();
            for _ in 0..n {
                seen.push(slab.index(cur));
                cur = slab.objs[slab.index(cur)].load(Ordering::Relaxed);
            }
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2], "the refused double free left the free list intact");
        }
    });
}
