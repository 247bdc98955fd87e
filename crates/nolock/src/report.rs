//! The raw reporter: problems nolock finds (refused frees, debug-mode findings, callbacks that panicked) are
//! written to standard error with one `write(2)` from a stack buffer — no lock, no allocation, safe in a signal
//! handler — and counted. A leaf module: every layer may report, none is imported here.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::sys::StackBuf;

static REPORTS: AtomicU64 = AtomicU64::new(0);
static QUIET: AtomicBool = AtomicBool::new(false);

/// Number of problems reported so far (refused frees and debug-mode findings), process-wide.
pub fn reports() -> u64 {
    REPORTS.load(Ordering::Relaxed)
}

/// Stop (or resume) printing reports on standard error; they are still counted. For tests that provoke them.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Count a report and print `nolock: <args>` (unless quiet).
///
/// # Context
/// Any context: async-signal-safe (a stack buffer and one `write(2)`).
#[cold]
pub(crate) fn emit(args: core::fmt::Arguments<'_>) {
    REPORTS.fetch_add(1, Ordering::Relaxed);
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    let mut b = StackBuf::<384>::new();
    let _ = b.write_fmt(format_args!("nolock: {args}\n"));
    crate::sys::write_stderr(b.as_bytes());
}
