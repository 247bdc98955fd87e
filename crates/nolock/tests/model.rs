//! Model tests: random sequences of allocations and frees (kmalloc of any size, kmalloc with a layout,
//! `KmemCache`, `NBox`), checked against a shadow model of the live objects.
//!
//! Invariants checked after every allocation, and for every live object at its free:
//! - the pointer is non-null and aligned as requested (and as the size class promises);
//! - `ksize` is at least the requested size, and does not change while the object lives;
//! - the object's usable range `[ptr, ptr + usable)` overlaps no other live object's (so no object is inside
//!   another, and no address is handed out twice while live);
//! - the contents written at allocation (a per-object pattern over the whole requested size) are intact at free;
//! - `Gfp::ZERO` memory reads as zero;
//! - every free is accepted (`try_*` variants return `Ok`).
//!
//! The multi-threaded variant splits the operations across 2-3 threads that share one live set, so objects are
//! freed on threads other than the one that allocated them; a final check runs after the join.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use nolock::{Gfp, KmemCache, NBox, ZERO_SIZE_PTR, kmalloc_layout_nolock, kmalloc_nolock, ksize, try_kfree_nolock};
use proptest::prelude::*;
use proptest::sample::Index;

/// Object layouts of the test caches: (size, align, freeptr offset).
const CACHE_LAYOUTS: [(usize, usize, usize); 3] = [(40, 8, 16), (200, 64, 0), (3000, 512, 8)];

fn caches() -> &'static [KmemCache] {
    static C: OnceLock<Vec<KmemCache>> = OnceLock::new();
    C.get_or_init(|| {
        CACHE_LAYOUTS
            .iter()
            .enumerate()
            .map(|(i, &(size, align, off))| {
                KmemCache::builder(&format!("model-{i}"), Layout::from_size_align(size, align).unwrap())
                    .freeptr_offset(off)
                    .build()
                    .unwrap()
            })
            .collect()
    })
}

#[repr(C, align(64))]
struct Aligned64 {
    bytes: [u8; 100],
}

/// What owns a live object, and how to free it.
enum Owner {
    /// `kmalloc_nolock` / `kmalloc_layout_nolock`.
    Kmalloc,
    /// A `KmemCache` of `caches()`.
    Cache(usize),
    Words(NBox<[u64; 5]>),
    Bytes(NBox<[u8]>),
    Aligned(NBox<Aligned64>),
}

struct Live {
    id: u64,
    ptr: usize,
    /// Requested size (the pattern covers it).
    size: usize,
    /// Usable size (ksize, or the cache's object size).
    usable: usize,
    owner: Owner,
}

fn pattern(id: u64, i: usize) -> u8 {
    (id as u8).wrapping_mul(31) ^ (i as u8) ^ ((i >> 8) as u8).wrapping_mul(7)
}

impl Live {
    fn bytes(&self) -> &[u8] {
        // SAFETY: a live object of at least `size` bytes, owned by the model.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.size) }
    }

    fn fill(&mut self) {
        // SAFETY: a live object of at least `size` bytes, owned by the model (NBox contents are plain bytes).
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.size) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = pattern(self.id, i);
        }
    }

    fn check(&self) {
        if let Some(i) = self.bytes().iter().enumerate().position(|(i, &b)| b != pattern(self.id, i)) {
            panic!("object {} at {:#x} (size {}) corrupted at offset {i}", self.id, self.ptr, self.size);
        }
    }

    /// Free the object (after checking its contents).
    fn free(self) {
        self.check();
        match self.owner {
            Owner::Kmalloc => {
                // SAFETY: a live kmalloc object, freed once and never used again.
                let r = unsafe { try_kfree_nolock(self.ptr as *mut u8) };
                assert_eq!(r, Ok(()), "free of kmalloc object {:#x}", self.ptr);
            }
            Owner::Cache(c) => {
                let p = std::ptr::NonNull::new(self.ptr as *mut u8).unwrap();
                // SAFETY: a live object of this cache, freed once and never used again.
                let r = unsafe { caches()[c].try_free_nolock(p) };
                assert_eq!(r, Ok(()), "free of cache object {:#x}", self.ptr);
            }
            Owner::Words(b) => drop(b),
            Owner::Bytes(b) => drop(b),
            Owner::Aligned(b) => drop(b),
        }
    }
}

/// The shadow model: live objects by address.
#[derive(Default)]
struct Model {
    live: BTreeMap<usize, Live>,
    next_id: u64,
}

impl Model {
    /// Record a new object after checking it against every live one.
    fn insert(&mut self, mut l: Live, align: usize, zero: bool) {
        assert_ne!(l.ptr, 0);
        assert_eq!(l.ptr % align, 0, "object {:#x} not aligned to {align}", l.ptr);
        assert!(l.usable >= l.size, "usable {} < requested {}", l.usable, l.size);
        if zero {
            assert!(l.bytes().iter().all(|&b| b == 0), "Gfp::ZERO object {:#x} not zeroed", l.ptr);
        }
        let (lo, hi) = (l.ptr, l.ptr + l.usable.max(1));
        // The closest live object below must end before us; the closest above must start after us.
        if let Some((_, below)) = self.live.range(..=lo).next_back() {
            assert!(
                below.ptr + below.usable.max(1) <= lo,
                "new object [{lo:#x}, {hi:#x}) overlaps live object {} at {:#x} (usable {})",
                below.id,
                below.ptr,
                below.usable
            );
        }
        if let Some((_, above)) = self.live.range(lo + 1..).next() {
            assert!(
                hi <= above.ptr,
                "new object [{lo:#x}, {hi:#x}) overlaps live object {} at {:#x}",
                above.id,
                above.ptr
            );
        }
        l.id = self.next_id;
        self.next_id += 1;
        l.fill();
        self.live.insert(l.ptr, l);
    }

    fn take(&mut self, idx: &Index) -> Option<Live> {
        if self.live.is_empty() {
            return None;
        }
        let key = *self.live.keys().nth(idx.index(self.live.len())).unwrap();
        self.live.remove(&key)
    }

    fn ksize_check(&self, idx: &Index) {
        if self.live.is_empty() {
            return;
        }
        let l = self.live.values().nth(idx.index(self.live.len())).unwrap();
        let k = ksize(l.ptr as *const u8);
        match l.owner {
            Owner::Kmalloc | Owner::Cache(_) => assert_eq!(k, l.usable, "ksize changed"),
            _ => assert!(k >= l.size),
        }
        l.check();
    }
}

#[derive(Clone, Debug)]
enum Op {
    Kmalloc { size: usize, zero: bool },
    Layout { size: usize, align_log2: u32 },
    Cache { which: usize, zero: bool },
    BoxWords(u64),
    BoxBytes(usize),
    BoxAligned,
    Free(Index),
    Ksize(Index),
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        6 => 1usize..=256,
        3 => 257usize..=8192,
        1 => 8193usize..=32_768,
        1 => Just(32_768usize),
        2 => 32_769usize..50_000,
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (size_strategy(), any::<bool>()).prop_map(|(size, zero)| Op::Kmalloc { size, zero }),
        3 => (size_strategy(), 0u32..=14).prop_map(|(size, align_log2)| Op::Layout { size, align_log2 }),
        3 => (0..CACHE_LAYOUTS.len(), any::<bool>()).prop_map(|(which, zero)| Op::Cache { which, zero }),
        1 => any::<u64>().prop_map(Op::BoxWords),
        1 => (0usize..3000).prop_map(Op::BoxBytes),
        1 => Just(Op::BoxAligned),
        8 => any::<Index>().prop_map(Op::Free),
        2 => any::<Index>().prop_map(Op::Ksize),
    ]
}

/// Perform an allocating operation: the new object, its required alignment, and whether it must be zeroed.
/// `None` for operations that allocate nothing (zero sizes) — those are checked here.
fn allocate(op: &Op) -> Option<(Live, usize, bool)> {
    let raw = |ptr: usize, size: usize, usable: usize, owner| Live { id: 0, ptr, size, usable, owner };
    match *op {
        Op::Kmalloc { size, zero } => {
            let flags = if zero { Gfp::ZERO } else { Gfp::NONE };
            let p = kmalloc_nolock(size, flags).expect("kmalloc_nolock failed with memory available");
            if size == 0 {
                assert_eq!(p.as_ptr(), ZERO_SIZE_PTR);
                assert_eq!(ksize(p.as_ptr()), 0);
                // SAFETY: ZERO_SIZE_PTR is accepted and ignored.
                assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
                return None;
            }
            let k = ksize(p.as_ptr());
            // Natural alignment for power-of-two sizes up to the largest class (32 KiB); page alignment above; 8
            // otherwise.
            let align = if size > nolock::KMALLOC_MAX_CACHE_SIZE {
                4096
            } else if size.is_power_of_two() {
                size.max(8)
            } else {
                8
            };
            Some((raw(p.as_ptr() as usize, size, k, Owner::Kmalloc), align, zero))
        }
        Op::Layout { size, align_log2 } => {
            let align = 1usize << align_log2;
            let layout = Layout::from_size_align(size, align).unwrap();
            let p =
                kmalloc_layout_nolock(layout, Gfp::NONE).expect("kmalloc_layout_nolock failed with memory available");
            assert_eq!(p.as_ptr() as usize % align, 0, "layout {layout:?}");
            if size == 0 {
                // A dangling, aligned pointer; nothing was allocated.
                assert_eq!(ksize(p.as_ptr()), 0);
                return None;
            }
            let k = ksize(p.as_ptr());
            Some((raw(p.as_ptr() as usize, size, k, Owner::Kmalloc), align, false))
        }
        Op::Cache { which, zero } => {
            let c = &caches()[which];
            let flags = if zero { Gfp::ZERO } else { Gfp::NONE };
            let p = c.alloc_nolock(flags).expect("KmemCache::alloc_nolock failed with memory available");
            let (size, align, _) = CACHE_LAYOUTS[which];
            assert_eq!(ksize(p.as_ptr()), c.object_size());
            Some((raw(p.as_ptr() as usize, size, c.object_size(), Owner::Cache(which)), align, zero))
        }
        Op::BoxWords(v) => {
            let b = NBox::try_new([v; 5]).expect("NBox::try_new failed");
            assert_eq!(*b, [v; 5]);
            let ptr = NBox::as_ptr(&b) as *const u8 as usize;
            Some((raw(ptr, 40, ksize(ptr as *const u8), Owner::Words(b)), 8, false))
        }
        Op::BoxBytes(len) => {
            let src: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let b = NBox::try_from_slice(&src).expect("NBox::try_from_slice failed");
            assert_eq!(&*b, &src[..]);
            if len == 0 {
                return None;
            }
            let ptr = b.as_ptr() as usize;
            Some((raw(ptr, len, ksize(ptr as *const u8), Owner::Bytes(b)), 1, false))
        }
        Op::BoxAligned => {
            let b = NBox::try_new(Aligned64 { bytes: [1; 100] }).unwrap_or_else(|_| panic!("NBox::try_new failed"));
            assert!(b.bytes.iter().all(|&x| x == 1));
            let ptr = NBox::as_ptr(&b) as *const u8 as usize;
            Some((raw(ptr, 100, ksize(ptr as *const u8), Owner::Aligned(b)), 64, false))
        }
        Op::Free(_) | Op::Ksize(_) => None,
    }
}

fn run_single(ops: &[Op]) {
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Free(i) => {
                if let Some(l) = m.take(i) {
                    l.free();
                }
            }
            Op::Ksize(i) => m.ksize_check(i),
            _ => {
                if let Some((l, align, zero)) = allocate(op) {
                    m.insert(l, align, zero);
                }
            }
        }
    }
    for l in m.live.values() {
        l.check();
    }
    for (_, l) in std::mem::take(&mut m.live) {
        l.free();
    }
}

/// The same operations split across threads that share the live set: a free takes any live object, whichever
/// thread allocated it. An object leaves the shared set before it is freed and enters it after it is allocated,
/// so an address reused by the allocator is never in the set twice unless it was handed out twice.
fn run_threads(ops: &[Op], threads: usize) {
    let shared = Mutex::new(Model::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let shared = &shared;
            let mine: Vec<Op> = ops.iter().skip(t).step_by(threads).cloned().collect();
            s.spawn(move || {
                for op in &mine {
                    match op {
                        Op::Free(i) => {
                            let l = shared.lock().unwrap().take(i);
                            if let Some(l) = l {
                                l.free();
                            }
                        }
                        Op::Ksize(i) => shared.lock().unwrap().ksize_check(i),
                        _ => {
                            if let Some((l, align, zero)) = allocate(op) {
                                shared.lock().unwrap().insert(l, align, zero);
                            }
                        }
                    }
                }
            });
        }
    });
    let mut m = shared.into_inner().unwrap();
    for l in m.live.values() {
        l.check();
    }
    for (_, l) in std::mem::take(&mut m.live) {
        l.free();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 4000, ..ProptestConfig::default() })]

    #[test]
    fn single_thread(ops in prop::collection::vec(op_strategy(), 1..300)) {
        let _reports = testkit::NoReports::new();
        run_single(&ops);
    }

    #[test]
    fn multi_thread(ops in prop::collection::vec(op_strategy(), 1..400), threads in 2usize..=3) {
        let _reports = testkit::NoReports::new();
        run_threads(&ops, threads);
    }
}

/// Long deterministic runs: many objects live at once across every size class and the large path, in one
/// thread and in three.
#[test]
fn long_sequences() {
    let _reports = testkit::NoReports::new();
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strat = prop::collection::vec(op_strategy(), 3000);
    for round in 0..4 {
        let ops = strat.new_tree(&mut runner).unwrap().current();
        if round % 2 == 0 {
            run_single(&ops);
        } else {
            run_threads(&ops, 3);
        }
    }
}
