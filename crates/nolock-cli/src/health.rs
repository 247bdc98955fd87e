//! Checks every command makes before and after its run, so that a run that could not work never reports
//! success: the arena must be mapped, and nolock must print no report (a refused free, a debug-mode finding)
//! while a scenario runs.

use std::fmt::Write as _;

use testkit::ReportCounter;

use crate::fmt::bytes;

/// The size of nolock's arena in bytes, or why there is none.
///
/// nolock reserves its arena (16 GiB of address space by default, `NOLOCK_ARENA_SIZE` otherwise) at first
/// use; when the kernel refuses the reservation (`ulimit -v`, `vm.overcommit_memory=2`, a 32-bit address
/// space) every allocation returns `None`. A scenario run in that state would only count failures, so the
/// commands refuse to start and say what to change.
///
/// # Context
/// Normal context: may map the arena (first use), allocates the message.
pub fn arena_bytes() -> Result<u64, String> {
    nolock::init();
    let arena = nolock::stats::snapshot().pages.arena_pages as u64 * 4096;
    if arena > 0 {
        return Ok(arena);
    }
    let (asked, source) = match std::env::var("NOLOCK_ARENA_SIZE") {
        Ok(v) => (v.clone(), format!("NOLOCK_ARENA_SIZE={v}")),
        Err(_) => (bytes(nolock::DEFAULT_ARENA_SIZE as u64), "the default size".to_string()),
    };
    let mut msg = format!("could not reserve the arena ({asked}, {source}): the kernel refused the mapping");
    match address_space_limit() {
        Some(limit) => {
            // A quarter of the limit leaves room for the program, its thread stacks and the baselines.
            let suggest = (limit / 4).max(256 << 20);
            let suggest_g = suggest >> 30;
            let hint = if suggest_g >= 1 {
                format!("{}G", 1u64 << (63 - suggest_g.leading_zeros()))
            } else {
                format!("{}M", suggest >> 20)
            };
            let _ = write!(
                msg,
                "; the address-space limit (ulimit -v) is {}: try NOLOCK_ARENA_SIZE={hint} or raise the limit",
                bytes(limit)
            );
        }
        None => {
            msg.push_str("; try a smaller NOLOCK_ARENA_SIZE (e.g. 1G), or check vm.overcommit_memory");
        }
    }
    Err(msg)
}

/// The soft `RLIMIT_AS` in bytes, `None` when unlimited or unreadable.
fn address_space_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}

/// A failure line if nolock reported anything (a refused free, a debug-mode finding: each also printed on
/// standard error) since `reports` started counting.
pub fn report_failure(reports: &ReportCounter) -> Option<String> {
    let n = reports.count();
    (n != 0).then(|| format!("nolock printed {n} report(s) on standard error during the run (see above)"))
}
