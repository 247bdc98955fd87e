//! The baseline of `hybrid_real.rs`: the same workload with jemalloc alone as the global allocator.

#[cfg(feature = "c-baselines")]
#[global_allocator]
static A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "common/hybrid_real_workload.rs"]
mod workload;

fn main() {
    workload::run("jemalloc");
}
