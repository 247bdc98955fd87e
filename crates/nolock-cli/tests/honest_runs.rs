//! `nolock demo` and `nolock rcu` must not pass when they could not work: without an arena (the kernel refused
//! the reservation under `ulimit -v`), with an arena too small for the demo, or when nolock printed a report.
//! Each test runs the built `nolock` binary for half a second.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

/// An address-space limit well below the default 16 GiB arena, and well above what the program needs.
const AS_LIMIT: u64 = 6 << 30;

/// Run `nolock args...`, with `RLIMIT_AS` set to `limit` if given, and the arena size from `arena` if given.
fn nolock(args: &[&str], limit: Option<u64>, arena: Option<&str>) -> (Output, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nolock"));
    cmd.args(args).env_remove("NOLOCK_ARENA_SIZE").env_remove("NOLOCK_DEBUG");
    if let Some(a) = arena {
        cmd.env("NOLOCK_ARENA_SIZE", a);
    }
    if let Some(l) = limit {
        // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit, which is
        // async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit { rlim_cur: l, rlim_max: l };
                if libc::setrlimit(libc::RLIMIT_AS, &r) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
    }
    let out = cmd.output().expect("run the nolock binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

const DEMO: &[&str] = &["demo", "--seconds", "0.5", "--threads", "2", "--quiet"];
const RCU: &[&str] = &["rcu", "--seconds", "0.5", "--threads", "3", "--quiet"];

#[test]
fn demo_without_arena_fails_and_says_why() {
    let (out, text) = nolock(DEMO, Some(AS_LIMIT), None);
    assert!(!out.status.success(), "the demo passed without an arena:\n{text}");
    assert!(!text.contains("PASS"), "{text}");
    assert!(text.contains("could not reserve the arena"), "{text}");
    assert!(text.contains("NOLOCK_ARENA_SIZE="), "no hint:\n{text}");
}

#[test]
fn demo_with_a_smaller_arena_under_the_limit_passes() {
    let (out, text) = nolock(DEMO, Some(AS_LIMIT), Some("1G"));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("PASS"), "{text}");
}

#[test]
fn demo_with_an_arena_too_small_fails() {
    // 256 KiB (the smallest arena): most page runs and many slabs cannot be had.
    let (out, text) = nolock(DEMO, None, Some("256K"));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FAIL"), "{text}");
    assert!(!text.contains("PASS"), "{text}");
}

#[test]
fn demo_fails_on_a_nolock_report() {
    let mut args = DEMO.to_vec();
    args.push("--inject-bad-free");
    let (out, text) = nolock(&args, None, None);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("nolock printed 1 report(s)"), "{text}");
    assert!(text.contains("is not from nolock's arena"), "the report itself is shown:\n{text}");
}

#[test]
fn rcu_without_arena_fails_and_says_why() {
    let (out, text) = nolock(RCU, Some(AS_LIMIT), None);
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("PASS"), "{text}");
    assert!(text.contains("could not reserve the arena"), "{text}");
}

#[test]
fn rcu_with_a_smaller_arena_under_the_limit_passes() {
    let (out, text) = nolock(RCU, Some(AS_LIMIT), Some("1G"));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("PASS"), "{text}");
}

#[test]
fn bench_without_arena_refuses_to_run() {
    let (out, text) = nolock(&["bench", "--quick"], Some(AS_LIMIT), None);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("could not reserve the arena"), "{text}");
}
