//! The real-program workload of `nolock bench alloc` (`src/prog/workload.rs`) with jemalloc as the global allocator.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../prog/workload.rs"]
mod workload;

fn main() {
    workload::main(|| {});
}
