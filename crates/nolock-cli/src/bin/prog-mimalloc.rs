//! The real-program workload of `nolock bench alloc` (`src/prog/workload.rs`) with mimalloc as the global allocator.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../prog/workload.rs"]
mod workload;

fn main() {
    workload::main(|| {});
}
