//! The normal-context workload that `HybridAlloc`'s cost is measured on, shared by the same-run pair of
//! `tests/hybrid_jemalloc.rs` and the instruction count of `examples/hybrid_pair.rs`.

use std::alloc::{GlobalAlloc, Layout};

/// A mixed allocation workload through `a` (allocate a window of blocks of varied sizes, free the oldest,
/// realloc some): what the program does in normal context.
#[inline(never)]
pub fn workload<G: GlobalAlloc>(a: &G, rounds: usize) -> usize {
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
