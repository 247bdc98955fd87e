//! The real-program workload of `nolock bench alloc` (`src/prog/workload.rs`) with nolock as the global allocator.

#[global_allocator]
static GLOBAL: nolock::NolockAlloc = nolock::NolockAlloc::new();

#[path = "../prog/workload.rs"]
mod workload;

fn main() {
    workload::main(nolock::init);
}
