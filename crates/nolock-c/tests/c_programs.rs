//! C programs against the library: the nolock API linked with `-lnolock_c` and with `libnolock_c.a`
//! (`tests/c/api.c`: kmalloc,
//! caches, RCU, SRCU-fast, the API inside a signal handler that interrupts it, fork while threads allocate,
//! thread churn); the malloc family's semantics printed under glibc and under the preload, which must match
//! (`tests/c/malloc_semantics.c`); and thread-locals meeting the loader (`tests/c/dlopen_tls.c`).

mod common;

use std::time::Duration;

use common::{command, compile_c, lib_path, run, scratch};

const LIMIT: Duration = Duration::from_secs(120);

fn link_args() -> Vec<String> {
    let dir = lib_path().parent().expect("lib dir").display().to_string();
    vec![format!("-L{dir}"), "-lnolock_c".into(), format!("-Wl,-rpath,{dir}"), "-pthread".into(), "-lrt".into()]
}

#[test]
fn api_linked() {
    let dir = scratch("api-linked");
    let exe = dir.join("api");
    let args = link_args();
    compile_c("api.c", &exe, &args.iter().map(String::as_str).collect::<Vec<_>>());
    for preload in [false, true] {
        let r = run(command::<&str>(&exe, &[]), preload, None, &dir, LIMIT);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(
            r.success() && out.starts_with("api: all ok"),
            "api.c (preload {preload}): {}\n{out}{}",
            r.describe(),
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(r.stderr.is_empty(), "nolock reported something: {}", String::from_utf8_lossy(&r.stderr));
        eprintln!("{}", out.trim());
    }
}

#[test]
fn api_static() {
    let dir = scratch("api-static");
    let exe = dir.join("api");
    let archive = lib_path().with_file_name("libnolock_c.a");
    let archive = archive.display().to_string();
    compile_c("api.c", &exe, &[archive.as_str(), "-pthread", "-lrt", "-ldl", "-lm"]);
    let r = run(command::<&str>(&exe, &[]), false, None, &dir, LIMIT);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.success() && out.starts_with("api: all ok"),
        "api.c linked with libnolock_c.a: {}\n{out}{}",
        r.describe(),
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn malloc_semantics_match_glibc() {
    let dir = scratch("malloc-semantics");
    let exe = dir.join("malloc_semantics");
    // The program asks for impossible sizes and uses pointers after failed reallocs on purpose.
    compile_c("malloc_semantics.c", &exe, &["-w"]);
    let g = run(command::<&str>(&exe, &[]), false, None, &dir, LIMIT);
    let n = run(command::<&str>(&exe, &[]), true, None, &dir, LIMIT);
    assert!(g.success(), "glibc run: {}", g.describe());
    assert!(n.success(), "preload run: {}: {}", n.describe(), String::from_utf8_lossy(&n.stderr));
    let (gs, ns) = (String::from_utf8_lossy(&g.stdout), String::from_utf8_lossy(&n.stdout));
    assert!(!gs.contains(" NO"), "glibc itself fails a check:\n{gs}");
    assert_eq!(gs, ns, "the preload's malloc family differs from glibc's");
    assert!(n.stderr.is_empty(), "nolock reported something: {}", String::from_utf8_lossy(&n.stderr));
}

/// A buffer grown 4 KiB at a time to 8 MiB: the block may move only a few times (glibc: 8), not at every
/// growth (a copy each time is quadratic: 2048 moves and 8 s under the first version, against 9 ms for glibc).
#[test]
fn realloc_growth_is_amortised() {
    let dir = scratch("realloc-growth");
    let exe = dir.join("realloc_growth");
    compile_c("realloc_growth.c", &exe, &[]);
    for preload in [false, true] {
        let r = run(command(&exe, &["8"]), preload, None, &dir, LIMIT);
        assert!(r.success(), "realloc_growth (preload {preload}): {}", r.describe());
        let out = String::from_utf8_lossy(&r.stdout);
        let moves: u32 = out.trim().trim_start_matches("moves ").parse().expect("moves N");
        assert!(moves <= 64, "preload {preload}: the block moved {moves} times while growing to 8 MiB");
    }
}

/// Under `ulimit -v` (here 3 GB, less than nolock's default 16 GiB arena) the preload sizes its arena to fit,
/// instead of failing every allocation.
#[test]
fn address_space_limit() {
    let Some(sh) = common::need("sh", "dash") else { return };
    let dir = scratch("ulimit-v");
    let exe = dir.join("malloc_semantics");
    compile_c("malloc_semantics.c", &exe, &["-w"]);
    let script = format!("ulimit -v 3000000 && exec {}", exe.display());
    let g = run(command(&sh, &["-c", &script]), false, None, &dir, LIMIT);
    let n = run(command(&sh, &["-c", &script]), true, None, &dir, LIMIT);
    assert!(g.success(), "glibc run: {}", g.describe());
    assert!(n.success(), "preload run under ulimit -v: {}: {}", n.describe(), String::from_utf8_lossy(&n.stderr));
    assert_eq!(String::from_utf8_lossy(&g.stdout), String::from_utf8_lossy(&n.stdout));
    assert!(n.stderr.is_empty(), "{}", String::from_utf8_lossy(&n.stderr));
}

#[test]
fn dlopen_of_tls_libraries_then_malloc_on_an_older_thread() {
    const COUNT: usize = 24; // more than glibc's DTV surplus (14)
    let dir = scratch("dlopen-tls");
    for i in 1..=COUNT {
        compile_c("tls_module.c", &dir.join(format!("libtls{i}.so")), &["-shared", "-fPIC"]);
    }
    let exe = dir.join("dlopen_tls");
    compile_c("dlopen_tls.c", &exe, &["-pthread", "-ldl"]);
    let args = [dir.display().to_string(), COUNT.to_string()];
    for preload in [false, true] {
        let r = run(command(&exe, &args), preload, None, &dir, LIMIT);
        assert!(
            r.success() && r.stdout == b"ok\n",
            "dlopen_tls (preload {preload}): {}: {}{}",
            r.describe(),
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
}
