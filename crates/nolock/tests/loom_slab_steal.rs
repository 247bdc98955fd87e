//! loom models of the shrink's and the out-of-memory rescue's new operations: `TaggedStack::pop_if` (the shrink
//! takes the slab it named only if it is still the top), and `SlabFreelist::pop_any` and `steal_all`, by a
//! context that does not hold the slab's take right, racing the holder's `pop_one` / `take_all` and remote
//! frees. What makes them safe is the ABA tag in the state word: a pop that read the head
//! object's link fails its CAS if anybody changed the word meanwhile, even if head and count came back.
//!
//! Every object has a payload in a `loom::cell::UnsafeCell` that its owner writes: loom reports a data race if an
//! object is ever owned by two threads at once (an ABA pop hands out an object twice). At the end every object
//! is owned by exactly one thread or on the free list exactly once, and the in-use count agrees.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p nolock-mm --release --test loom_slab_steal`.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use nolock::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use nolock::sync::slab_freelist::{Geometry, LISTED, LinkCodec, SlabFreelist, State};
use nolock::sync::tagged::{TaggedStack, decode_link};

fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

/// A fake slab: objects that are just their link words, a payload per object, and the state word.
struct Slab {
    objs: Vec<AtomicUsize>,
    payload: Vec<UnsafeCell<usize>>,
    fl: SlabFreelist,
}

impl Slab {
    /// `capacity` objects; `free` of them (0, 1, ...) on the free list in that order, the rest in use.
    fn new(capacity: u16, free: u16) -> Arc<Self> {
        let s = Self {
            objs: (0..capacity).map(|_| AtomicUsize::new(0)).collect(),
            payload: (0..capacity).map(|_| UnsafeCell::new(0)).collect(),
            fl: SlabFreelist::new(State::new(0, capacity, 0)),
        };
        for i in 0..free {
            let next = if i + 1 < free { s.addr(usize::from(i) + 1) } else { 0 };
            s.objs[usize::from(i)].store(next, Ordering::Relaxed);
        }
        let head = if free > 0 { 1 } else { 0 };
        s.fl.init(State::new(head, capacity - free, if free > 0 { LISTED } else { 0 }));
        Arc::new(s)
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
        self.objs.as_ptr() as usize + i * core::mem::size_of::<AtomicUsize>()
    }

    fn index(&self, addr: usize) -> usize {
        let i = self.geo().index_of(addr).unwrap_or_else(|| panic!("{addr:#x} is no object"));
        i as usize
    }

    /// This thread owns object `i` now: write its payload (loom checks that nobody else does).
    fn own(&self, i: usize, tag: usize) {
        self.payload[i].with_mut(|p| {
            // SAFETY: object `i` was just handed to this thread; loom checks the claim.
            unsafe { *p = tag };
        });
    }

    /// Free the object `i` (owned by the caller).
    fn free(&self, i: usize, tag: usize) {
        self.own(i, tag);
        // SAFETY: object `i` belongs to this slab, is in use and given up by the caller.
        unsafe { self.fl.push_chain(&self.geo(), i as u32, self.addr(i), 1) }.expect("a valid free");
    }

    /// Walk a chain of `n` objects handed to this thread, taking each.
    fn walk(&self, mut cur: usize, n: u16, tag: usize, out: &mut Vec<usize>) {
        for _ in 0..n {
            let i = self.index(cur);
            self.own(i, tag);
            out.push(i);
            cur = self.objs[i].load(Ordering::Relaxed);
        }
    }

    /// At the end: the objects on the free list, walked from the state word.
    fn free_list(&self) -> Vec<usize> {
        let st = self.fl.load();
        let mut v = Vec::new();
        let mut cur = match st.head_enc() {
            0 => 0,
            e => self.addr(e as usize - 1),
        };
        while cur != 0 {
            let i = self.index(cur);
            assert!(!v.contains(&i), "the free list loops");
            v.push(i);
            cur = self.objs[i].load(Ordering::Relaxed);
        }
        v
    }

    /// Every object owned once or free once; the in-use count agrees.
    fn check(&self, owned: &[usize]) {
        let free = self.free_list();
        let mut all: Vec<usize> = owned.iter().chain(&free).copied().collect();
        all.sort_unstable();
        let want: Vec<usize> = (0..self.objs.len()).collect();
        assert_eq!(all, want, "each object owned once or free once (owned {owned:?}, free {free:?})");
        assert_eq!(usize::from(self.fl.load().used()), owned.len(), "in-use count");
    }
}

/// The holder pops two objects and frees the first back while a remote thread frees another object: the head
/// and the in-use count can come back to what a rescuer without the take right read, with another successor
/// (the A-B-A of the classic Treiber bug). The rescuer's pop must not hand out the holder's second object.
#[test]
fn pop_any_vs_holder_pop_one_and_free() {
    model(3, || {
        // Objects 0, 1, 2 free (0 -> 1 -> 2); object 3 in use by the remote thread.
        let slab = Slab::new(4, 3);
        let holder = {
            let slab = slab.clone();
            thread::spawn(move || {
                let g = slab.geo();
                let mut got = Vec::new();
                if let Ok(Some((a, _))) = slab.fl.pop_one_coded(&g, LinkCodec::PLAIN) {
                    let a = slab.index(a);
                    slab.own(a, 1);
                    if let Ok(Some((b, _))) = slab.fl.pop_one_coded(&g, LinkCodec::PLAIN) {
                        let b = slab.index(b);
                        slab.own(b, 1);
                        got.push(b);
                    }
                    // Give the first back: the head may be `a` again, with another successor.
                    slab.free(a, 0);
                }
                got
            })
        };
        let remote = {
            let slab = slab.clone();
            thread::spawn(move || slab.free(3, 0))
        };
        let rescuer = {
            let slab = slab.clone();
            thread::spawn(move || {
                let g = slab.geo();
                let mut got = Vec::new();
                if let Ok(Some(x)) = slab.fl.pop_any(&g, LinkCodec::PLAIN) {
                    let x = slab.index(x);
                    slab.own(x, 2);
                    got.push(x);
                }
                got
            })
        };
        let mut owned = holder.join().unwrap();
        remote.join().unwrap();
        owned.extend(rescuer.join().unwrap());
        slab.check(&owned);
    });
}

/// A rescuer steals every free object while the holder pops and a remote thread frees: every object ends up
/// with exactly one owner or on the list once, and the flags are left to the holder.
#[test]
fn steal_all_vs_holder_pop_and_remote_free() {
    model(3, || {
        // Objects 0, 1 free (0 -> 1); 2 in use by the remote thread; 3 in use by the main thread.
        let slab = Slab::new(4, 2);
        let holder = {
            let slab = slab.clone();
            thread::spawn(move || {
                let g = slab.geo();
                let mut got = Vec::new();
                if let Ok(Some((a, _))) = slab.fl.pop_one_coded(&g, LinkCodec::PLAIN) {
                    let a = slab.index(a);
                    slab.own(a, 1);
                    got.push(a);
                }
                got
            })
        };
        let rescuer = {
            let slab = slab.clone();
            thread::spawn(move || {
                let (first, n) = slab.fl.steal_all(&slab.geo());
                let mut got = Vec::new();
                slab.walk(first, n, 2, &mut got);
                got
            })
        };
        let remote = {
            let slab = slab.clone();
            thread::spawn(move || slab.free(2, 0))
        };
        let mut owned = holder.join().unwrap();
        owned.extend(rescuer.join().unwrap());
        remote.join().unwrap();
        owned.push(3);
        slab.check(&owned);
    });
}

/// `pop_if(0)` while another thread pops 0, pops 1 and pushes 0 back (so 0 is on top again, with another
/// successor) and a third pushes 2: `pop_if` takes 0 only while it is the top and never corrupts the stack.
#[test]
fn tagged_pop_if_vs_pop_and_push() {
    model(3, || {
        struct Stack {
            s: TaggedStack,
            links: Vec<AtomicU32>,
            owner: Vec<UnsafeCell<usize>>,
        }
        let st = Arc::new(Stack {
            s: TaggedStack::new(),
            links: (0..3).map(|_| AtomicU32::new(0)).collect(),
            owner: (0..3).map(|_| UnsafeCell::new(0)).collect(),
        });
        // 1 at the bottom, 0 on top; 2 held by the pusher.
        st.s.push(1, &st.links[1]);
        st.s.push(0, &st.links[0]);
        let own = |st: &Stack, i: u32, who: usize| {
            st.owner[i as usize].with_mut(|p| {
                // SAFETY: node `i` was just taken off the stack by this thread; loom checks the claim.
                unsafe { *p = who };
            })
        };
        let a = {
            let st = st.clone();
            thread::spawn(move || {
                let took = st.s.pop_if(0, |i| &st.links[i as usize]);
                if took {
                    own(&st, 0, 1);
                }
                took
            })
        };
        let b = {
            let st = st.clone();
            thread::spawn(move || {
                let mut kept = Vec::new();
                if let Some(x) = st.s.pop(|i| &st.links[i as usize]) {
                    own(&st, x, 2);
                    if let Some(y) = st.s.pop(|i| &st.links[i as usize]) {
                        own(&st, y, 2);
                        kept.push(y);
                    }
                    st.s.push(x, &st.links[x as usize]);
                }
                kept
            })
        };
        let c = {
            let st = st.clone();
            thread::spawn(move || st.s.push(2, &st.links[2]))
        };
        let a_took = a.join().unwrap();
        let b_kept = b.join().unwrap();
        c.join().unwrap();
        let mut all: Vec<u32> = b_kept;
        if a_took {
            all.push(0);
        }
        let mut cur = st.s.take_all();
        while let Some(i) = cur {
            all.push(i);
            cur = decode_link(st.links[i as usize].load(Ordering::Relaxed));
        }
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2], "each node taken once or on the stack once");
    });
}
