//! The "real program" half of HybridAlloc's cost figure: one std workload (hash maps of strings, B-trees,
//! sorting, formatting, channels between threads) run with a global allocator chosen at build time, so that
//! the two binaries differ only in it. `hybrid_real` uses `HybridAlloc<Jemalloc>`; `hybrid_real_jemalloc`
//! (the same file, included) uses jemalloc alone.
//!
//! ```text
//! cargo build --release -p nolock-cli --example hybrid_real --example hybrid_real_jemalloc
//! for i in 1 2 3 4 5; do target/release/examples/hybrid_real_jemalloc; target/release/examples/hybrid_real; done
//! ```
//!
//! Each run prints its wall time; compare the medians.

#[cfg(feature = "c-baselines")]
#[global_allocator]
static A: nolock::hybrid::HybridAlloc<tikv_jemallocator::Jemalloc> =
    nolock::hybrid::HybridAlloc::new(tikv_jemallocator::Jemalloc);

#[path = "common/hybrid_real_workload.rs"]
mod workload;

fn main() {
    workload::run("HybridAlloc<jemalloc>");
}
