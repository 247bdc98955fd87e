//! `HybridAlloc<Jemalloc>` as the global allocator under the SIGPROF storm of
//! `crates/nolock/tests/hybrid_common` (handlers that grow `Vec`s, `format!`, capture backtraces into `Vec`s, take
//! over jemalloc memory and hand nolock memory back), in child processes with a timeout: every child must end
//! cleanly (no hang, no crash, no failed content check). The same children with plain jemalloc as the global
//! allocator are `jemalloc_plain_handler.rs`.
//!
//! `HYBRID_RUNS` (default 20) sets the number of children, `HYBRID_CHILD_MS` in the parent their storm length
//! (default 300 ms). Also `pair_cost`: HybridAlloc's cost over jemalloc in normal context, printed (no timing is
//! asserted).
#![cfg(feature = "c-baselines")]

#[path = "../../nolock/tests/hybrid_common/mod.rs"]
mod hybrid_common;
mod hybrid_workload;

use std::time::{Duration, Instant};

use hybrid_workload::workload;
use nolock::hybrid::HybridAlloc;
use tikv_jemallocator::Jemalloc;

#[global_allocator]
static A: HybridAlloc<Jemalloc> = HybridAlloc::new(Jemalloc);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The child's body (does nothing when not run as a child).
#[test]
fn child() {
    if std::env::var_os("HYBRID_CHILD_MS").is_some() {
        A.warm_up();
    }
    hybrid_common::child_main(true);
}

#[test]
fn handler_storm_children_never_hang_nor_corrupt() {
    if std::env::var_os("HYBRID_CHILD_MS").is_some() {
        return;
    }
    let runs = env_or("HYBRID_RUNS", 20) as u32;
    let ms = env_or("HYBRID_STORM_MS", 300);
    let o = hybrid_common::run_children("child", runs, ms, Duration::from_secs(5));
    eprintln!(
        "HybridAlloc<jemalloc>: {runs} runs of {ms} ms: {} ok, {} hangs, {} crashes, {} corrupt",
        o.ok, o.hangs, o.crashes, o.corrupt
    );
    assert_eq!((o.hangs, o.crashes, o.corrupt), (0, 0, 0), "{o:?}");
    assert_eq!(o.ok, runs);
}

/// Same-run pair: jemalloc alone and HybridAlloc<jemalloc> on the same workload, alternating, 15 rounds each; the
/// median of the per-round ratios, and the ratio of each side's fastest round. The workload is `pub` for the
/// instruction-count version, `examples/hybrid_pair.rs`.
#[test]
fn pair_cost() {
    if std::env::var_os("HYBRID_CHILD_MS").is_some() {
        return;
    }
    // A static, as a `#[global_allocator]` is (a second instance: the measured calls are direct, not through
    // the global allocator).
    static HYBRID: HybridAlloc<Jemalloc> = HybridAlloc::new(Jemalloc);
    let hybrid = &HYBRID;
    hybrid.warm_up();
    let rounds = 2_000_000;
    let (_, _) = (workload(&Jemalloc, rounds / 4), workload(hybrid, rounds / 4));
    let mut ratios = Vec::new();
    let (mut tj, mut th) = (Duration::ZERO, Duration::ZERO);
    let (mut min_j, mut min_h) = (Duration::MAX, Duration::MAX);
    for r in 0..15 {
        let time = |f: &dyn Fn() -> usize| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        };
        let (j, h) = if r % 2 == 0 {
            let j = time(&|| workload(&Jemalloc, rounds));
            (j, time(&|| workload(hybrid, rounds)))
        } else {
            let h = time(&|| workload(hybrid, rounds));
            (time(&|| workload(&Jemalloc, rounds)), h)
        };
        tj += j;
        th += h;
        min_j = min_j.min(j);
        min_h = min_h.min(h);
        ratios.push(h.as_secs_f64() / j.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let per_op = |d: Duration| d.as_nanos() as f64 / (15.0 * rounds as f64);
    // The ratio of the fastest rounds is the least disturbed by other load on the machine.
    eprintln!(
        "pair_cost: jemalloc {:.1} ns/op, HybridAlloc<jemalloc> {:.1} ns/op; per-round ratio median {:.3} (min \
         {:.3}, max {:.3}); fastest rounds {:.2} vs {:.2} ns/op, ratio {:.3}",
        per_op(tj),
        per_op(th),
        ratios[7],
        ratios[0],
        ratios[14],
        min_j.as_nanos() as f64 / rounds as f64,
        min_h.as_nanos() as f64 / rounds as f64,
        min_h.as_secs_f64() / min_j.as_secs_f64()
    );
}
