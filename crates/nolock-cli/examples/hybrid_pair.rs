//! Instruction counts of HybridAlloc's normal-context cost: the mixed alloc/free/realloc loop of
//! `tests/hybrid_jemalloc.rs` (`pair_cost`) through jemalloc alone or through `HybridAlloc<Jemalloc>`, for
//! `valgrind --tool=callgrind` on two loop lengths (start-up cancels out in the difference):
//!
//! ```text
//! cargo build --release -p nolock-cli --example hybrid_pair
//! for a in jemalloc hybrid; do for n in 200000 400000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hybrid_pair $a $n 2>&1 |
//!     grep Collected
//! done; done
//! ```

#[cfg(feature = "c-baselines")]
fn main() {
    use std::alloc::{GlobalAlloc, Layout};

    #[inline(never)]
    fn workload<G: GlobalAlloc>(a: &G, rounds: usize) -> usize {
        let mut ring = [(std::ptr::null_mut::<u8>(), 0usize); 256];
        let mut x = 0x9e37_79b9u64;
        let mut sum = 0usize;
        for i in 0..rounds {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = i % ring.len();
            let (p, sz) = ring[slot];
            if !p.is_null() {
                // SAFETY: allocated below with this size and align 8.
                unsafe { a.dealloc(p, Layout::from_size_align_unchecked(sz, 8)) };
            }
            let size = 8 + (x % 512) as usize;
            // SAFETY: a valid non-zero layout.
            let mut q = unsafe { a.alloc(Layout::from_size_align_unchecked(size, 8)) };
            assert!(!q.is_null());
            let mut size_now = size;
            if i % 8 == 0 {
                // SAFETY: q is ours with this layout; the new size is valid.
                q = unsafe { a.realloc(q, Layout::from_size_align_unchecked(size, 8), size * 2) };
                assert!(!q.is_null());
                size_now = size * 2;
            }
            // SAFETY: q holds at least 8 bytes.
            unsafe { q.write(i as u8) };
            sum = sum.wrapping_add(q as usize & 0xff);
            ring[slot] = (q, size_now);
        }
        for (p, sz) in ring {
            if !p.is_null() {
                // SAFETY: as above.
                unsafe { a.dealloc(p, Layout::from_size_align_unchecked(sz, 8)) };
            }
        }
        sum
    }

    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "hybrid".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    // A static, as a `#[global_allocator]` is.
    static HYBRID: nolock::hybrid::HybridAlloc<tikv_jemallocator::Jemalloc> =
        nolock::hybrid::HybridAlloc::new(tikv_jemallocator::Jemalloc);
    let hybrid = &HYBRID;
    // A handler-side allocation first, so that the range check runs against a real arena, as in a program
    // whose handlers have allocated.
    nolock::hybrid::in_handler(|| {
        let l = Layout::new::<u64>();
        // SAFETY: a valid layout; freed at once.
        unsafe { hybrid.dealloc(hybrid.alloc(l), l) };
    });
    let r = match which.as_str() {
        "jemalloc" => workload(&tikv_jemallocator::Jemalloc, n),
        _ => workload(hybrid, n),
    };
    std::hint::black_box(r);
}

#[cfg(not(feature = "c-baselines"))]
fn main() {
    eprintln!("hybrid_pair needs the c-baselines feature (jemalloc)");
}
