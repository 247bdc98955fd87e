//! The real-program workload of `nolock bench alloc` (`src/prog/workload.rs`) with glibc as the global allocator.

#[global_allocator]
static GLOBAL: std::alloc::System = std::alloc::System;

#[path = "../prog/workload.rs"]
mod workload;

fn main() {
    workload::main(|| {});
}
