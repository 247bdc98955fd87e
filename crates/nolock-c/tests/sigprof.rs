//! malloc inside a SIGPROF handler (`tests/c/sigprof_malloc.c`): under glibc the process hangs (the handler
//! waits for the arena lock that the thread it interrupted holds); under `LD_PRELOAD=libnolock_c.so` it never
//! does. Each run is a child process with a time limit; runs go in parallel batches (a hung child sleeps on a
//! futex, so it costs no CPU).
//!
//! `NOLOCK_C_SIGPROF_RUNS` (default 200) runs each; `NOLOCK_C_SIGPROF_MS` (default 100) how long each child
//! runs its loop; `NOLOCK_C_SIGPROF_PARALLEL` (default 16) children at once.

mod common;

use std::time::Duration;

use common::{Run, command, compile_c, run, scratch};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    hung: usize,
    crashed: usize,
    damaged: usize,
    signals: u64,
}

fn tally(runs: &[Run]) -> Tally {
    let mut t = Tally::default();
    for r in runs {
        if r.timed_out {
            t.hung += 1;
        } else if r.success() {
            t.ok += 1;
            let s = String::from_utf8_lossy(&r.stdout);
            t.signals += s.split_whitespace().nth(2).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        } else if libc::WIFEXITED(r.status) && libc::WEXITSTATUS(r.status) == 3 {
            t.damaged += 1;
        } else {
            t.crashed += 1;
        }
    }
    t
}

fn batch(exe: &std::path::Path, preload: bool, runs: usize, ms: usize, parallel: usize, tag: &str) -> Vec<Run> {
    // A healthy child finishes its loop in `ms` plus start-up. Under the preload, where no child should hang,
    // the limit is generous (a loaded CI machine must not turn a slow start into a "hang"); under glibc, where
    // they do hang, it sets the test's duration.
    let limit = if preload { Duration::from_secs(30) } else { Duration::from_millis(ms as u64 * 10 + 2000) };
    let mut all = Vec::with_capacity(runs);
    let mut next = 0;
    while next < runs {
        let n = parallel.min(runs - next);
        let handles: Vec<_> = (0..n)
            .map(|k| {
                let exe = exe.to_path_buf();
                let dir = scratch(&format!("sigprof-{tag}-{}", next + k));
                std::thread::spawn(move || {
                    run(command(&exe, &[ms.to_string(), "20".to_string()]), preload, None, &dir, limit)
                })
            })
            .collect();
        all.extend(handles.into_iter().map(|h| h.join().expect("runner thread")));
        next += n;
    }
    all
}

#[test]
fn malloc_in_sigprof_handler_hangs_glibc_never_nolock() {
    let runs = env_or("NOLOCK_C_SIGPROF_RUNS", 200);
    let ms = env_or("NOLOCK_C_SIGPROF_MS", 100);
    let parallel = env_or("NOLOCK_C_SIGPROF_PARALLEL", 16);
    let dir = scratch("sigprof");
    let exe = dir.join("sigprof_malloc");
    compile_c("sigprof_malloc.c", &exe, &["-pthread", "-lrt"]);

    let nolock = tally(&batch(&exe, true, runs, ms, parallel, "nolock"));
    let glibc = tally(&batch(&exe, false, runs, ms, parallel, "glibc"));
    eprintln!("sigprof_malloc, {runs} runs each, {ms} ms per run, timer every 20 us:");
    eprintln!(
        "  glibc : ok {:4}  hung {:4}  crashed {:4}  damaged {:4}",
        glibc.ok, glibc.hung, glibc.crashed, glibc.damaged
    );
    eprintln!(
        "  nolock: ok {:4}  hung {:4}  crashed {:4}  damaged {:4}  (handler mallocs: {})",
        nolock.ok, nolock.hung, nolock.crashed, nolock.damaged, nolock.signals
    );
    assert_eq!(
        (nolock.hung, nolock.crashed, nolock.damaged),
        (0, 0, 0),
        "under the preload every run must finish intact: {nolock:?}"
    );
    assert!(nolock.signals > 0, "no SIGPROF arrived: the test exercised nothing");
    assert!(
        glibc.hung + glibc.crashed + glibc.damaged > 0,
        "the glibc baseline never failed in {runs} runs: the test no longer shows the problem ({glibc:?})"
    );
}
