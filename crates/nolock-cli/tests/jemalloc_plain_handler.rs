//! The baseline of `hybrid_jemalloc.rs`: the same SIGPROF storm with allocating handlers, with plain jemalloc
//! as the global allocator (handlers not marked, nothing to route them elsewhere), in child processes with a
//! timeout. The handlers re-enter jemalloc while it is interrupted, so children hang (a lock the interrupted code
//! holds), crash, or fail a content check. The test prints the counts and asserts nothing about them (whether a
//! given run fails is up to timing); the closing figures come from `HYBRID_RUNS=200`.
#![cfg(feature = "c-baselines")]

#[path = "../../nolock/tests/hybrid_common/mod.rs"]
mod hybrid_common;

use std::time::Duration;

use tikv_jemallocator::Jemalloc;

#[global_allocator]
static A: Jemalloc = Jemalloc;

#[test]
fn child() {
    hybrid_common::child_main(false);
}

#[test]
fn handler_storm_children_with_plain_jemalloc() {
    if std::env::var_os("HYBRID_CHILD_MS").is_some() {
        return;
    }
    let runs = std::env::var("HYBRID_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20u32);
    let ms = std::env::var("HYBRID_STORM_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(300u64);
    let o = hybrid_common::run_children("child", runs, ms, Duration::from_secs(5));
    eprintln!(
        "plain jemalloc: {runs} runs of {ms} ms: {} ok, {} hangs, {} crashes, {} corrupt",
        o.ok, o.hangs, o.crashes, o.corrupt
    );
    assert_eq!(o.ok + o.hangs + o.crashes + o.corrupt, runs);
}
