//! Our BPF hash maps (`nolock_bpf::htab::HashMap`, from the bpf-htab work) on the same scenarios as the
//! kernel part (`crate::kernel_bpf`), so that the report can put them side by side: update of an existing key,
//! update + delete, update of a random existing key, insert until full, memory per occupancy. Key 4 B,
//! value 8 B. Times are user-space ns per operation of a timed loop (each operation is one IRQs-off region
//! opened by the map itself), against the kernel's in-kernel ns per operation.

use std::time::Instant;

use nolock_bpf::htab::{Backend, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;

use crate::kernel_bpf::Fig;

fn attr(i: usize, n: usize) -> HtabAttr {
    let a = HtabAttr::new(4, 8, n);
    match i {
        0 => a.backend(Backend::Prealloc).lock(LockMode::Rqspin),
        1 => a.backend(Backend::BpfMemAlloc(RefillMode::AtRegionEnd)).lock(LockMode::Rqspin),
        _ => a.backend(Backend::Nolock(NolockReuse::TypesafeImmediate)).lock(LockMode::LockFree),
    }
}

/// Results, each with the three contenders in order: prealloc (rqspin), bpf_ma (rqspin), nolock-D/lf.
#[derive(Clone, Debug, Default)]
pub struct OurMaps {
    /// (measure, figures) in the kernel part's order.
    pub ops: Vec<(String, [Fig; 3])>,
    /// (entries, ns per insert).
    pub insert: Vec<(u32, [Fig; 3])>,
    /// (occupancy %, bytes measured) for `memory_entries` entries.
    pub memory: Vec<(u32, [f64; 3])>,
    /// Entries of the memory map.
    pub memory_entries: u32,
}

fn fig(mut v: Vec<f64>) -> Fig {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 };
    Fig { median, min: v[0], max: v[v.len() - 1] }
}

fn k(x: u32) -> [u8; 4] {
    x.to_le_bytes()
}

/// Times `n` calls of `f`, in ns per call.
fn timed(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// Runs every measurement.
///
/// # Context
/// Normal context (creates and drops maps).
pub fn measure(quick: bool) -> Result<OurMaps, String> {
    let reps = if quick { 3 } else { 5 };
    let n_ops: u32 = if quick { 100_000 } else { 500_000 };
    let e = |e: nolock_bpf::htab::CreateError| e.to_string();
    let mut out = OurMaps::default();
    let v = [1u8; 8];
    // Interleave the contenders inside each repetition.
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new()]; 3];
    #[allow(clippy::needless_range_loop)] // `c` picks the contender and its column in each measure
    for _ in 0..reps {
        for c in 0..3 {
            let m = HashMap::new(attr(c, 8192)).map_err(e)?;
            for key in 0..8192 {
                let _ = m.update(&k(key), &v, UpdateFlags::Any);
            }
            samples[0][c].push(timed(n_ops, |_| {
                let _ = m.update(&k(0), &v, UpdateFlags::Any);
            }));
            samples[1][c].push(timed(n_ops, |_| {
                let _ = m.update(&k(0), &v, UpdateFlags::Any);
                let _ = m.delete(&k(0));
            }));
            let mut x = 0x9e37_79b9u32;
            samples[2][c].push(timed(n_ops, |_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let _ = m.update(&k(x & 8191), &v, UpdateFlags::Any);
            }));
        }
    }
    let names =
        ["update of an existing key", "update + delete of a key", "update of a random existing key (8192 present)"];
    for (i, name) in names.iter().enumerate() {
        let s = std::mem::take(&mut samples[i]);
        let [a, b, c] = s;
        out.ops.push((name.to_string(), [fig(a), fig(b), fig(c)]));
    }
    let sizes: &[u32] = if quick { &[16_384] } else { &[16_384, 131_072, 1_048_576] };
    for &n in sizes {
        let mut s = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (c, sc) in s.iter_mut().enumerate() {
                let m = HashMap::new(attr(c, n as usize)).map_err(e)?;
                sc.push(timed(n, |i| {
                    let _ = m.update(&k(i + 1), &v, UpdateFlags::NoExist);
                }));
            }
        }
        let [a, b, c] = s;
        out.insert.push((n, [fig(a), fig(b), fig(c)]));
    }
    let n: u32 = if quick { 262_144 } else { 1_048_576 };
    out.memory_entries = n;
    let levels = [0u32, 1, 10, 25, 50, 75, 100];
    let mut mem = vec![[0.0f64; 3]; levels.len()];
    #[allow(clippy::needless_range_loop)] // `c` picks the contender and its column
    for c in 0..3 {
        let m = HashMap::new(attr(c, n as usize)).map_err(e)?;
        let mut done = 0u32;
        for (li, &lvl) in levels.iter().enumerate() {
            let want = (n as u64 * lvl as u64 / 100) as u32;
            while done < want {
                let _ = m.update(&k(done + 1), &v, UpdateFlags::NoExist);
                done += 1;
            }
            mem[li][c] = m.mem_measured() as f64;
        }
    }
    out.memory = levels.iter().zip(mem).map(|(&l, m)| (l, m)).collect();
    Ok(out)
}
