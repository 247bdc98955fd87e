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
#[path = "../tests/hybrid_workload/mod.rs"]
mod hybrid_workload;

#[cfg(feature = "c-baselines")]
fn main() {
    use hybrid_workload::workload;
    use std::alloc::{GlobalAlloc, Layout};

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
