//! A bare alloc+free loop for instruction counting: `valgrind --tool=callgrind` on two loop lengths, and the
//! difference divided by the difference in iterations is the cost of one pair (start-up cancels out).
//!
//! ```text
//! cargo build --release -p nolock-cli --example pair_loop
//! for a in nolock mimalloc; do for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/pair_loop $a $n 2>&1 |
//!     grep Collected
//! done; done
//! ```
//!
//! A third argument `random` makes it `n` allocations, then `n` frees in a fixed random order instead (repeated
//! as many rounds as a fourth argument says, default 1).
//!
//! Each allocator's alloc and free sit behind one non-inlined function each, so both pay the same call and
//! loop overhead.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;

const SIZE: usize = 64;
const LAYOUT: Layout = match Layout::from_size_align(SIZE, 8) {
    Ok(l) => l,
    Err(_) => panic!("bad layout"),
};

static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One allocator's alloc and free.
type Pair = (fn() -> *mut u8, fn(*mut u8));

#[inline(never)]
fn nolock_alloc() -> *mut u8 {
    nolock::kmalloc_nolock(SIZE, nolock::Gfp::NONE).map_or(core::ptr::null_mut(), |p| p.as_ptr())
}

#[inline(never)]
fn nolock_free(p: *mut u8) {
    // SAFETY: `p` came from `nolock_alloc` and is freed once.
    unsafe { nolock::kfree_nolock(p) }
}

#[inline(never)]
fn mimalloc_alloc() -> *mut u8 {
    // SAFETY: a non-zero-size layout.
    unsafe { MIMALLOC.alloc(LAYOUT) }
}

#[inline(never)]
fn mimalloc_free(p: *mut u8) {
    // SAFETY: `p` came from `mimalloc_alloc` with the same layout and is freed once.
    unsafe { MIMALLOC.dealloc(p, LAYOUT) }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "nolock".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let (alloc, free): Pair = match which.as_str() {
        "nolock" => (nolock_alloc, nolock_free),
        "mimalloc" => (mimalloc_alloc, mimalloc_free),
        other => {
            eprintln!("usage: pair_loop [nolock|mimalloc] [iterations] (not {other:?})");
            std::process::exit(2);
        }
    };
    match args.next().as_deref() {
        None | Some("pair") => {
            for _ in 0..n {
                let p = alloc();
                assert!(!p.is_null(), "out of memory");
                free(black_box(p));
            }
        }
        // `n` allocations, then `n` frees in a fixed random order (the bench's random100k-64 with n = 100000).
        Some("random") => {
            let mut order: Vec<usize> = (0..n as usize).collect();
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for i in (1..order.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let rounds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
            for _ in 0..rounds {
                let ptrs: Vec<*mut u8> = (0..n).map(|_| alloc()).collect();
                assert!(ptrs.iter().all(|p| !p.is_null()), "out of memory");
                for &i in &order {
                    free(black_box(ptrs[i]));
                }
            }
        }
        Some(other) => {
            eprintln!("pattern: pair or random (not {other:?})");
            std::process::exit(2);
        }
    }
}
