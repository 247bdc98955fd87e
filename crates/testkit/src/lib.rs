//! The test kit shared by nolock's tests and the `nolock` command's scenarios (internal, not published).
//!
//! - [`signal`]: handler installation (with the previous actions put back on drop), signal sets and masks;
//! - [`sys`]: `gettid`, `tgkill`, one raw `write(2)` to standard error, [`ErrnoGuard`];
//! - [`timer`]: per-thread POSIX timers (`timer_create` with `SIGEV_THREAD_ID`);
//! - [`storm`]: the two-signal storm of the scenarios: two timers per thread, a controller that re-tunes them
//!   until the *delivered* rate meets a target, and the handler dispatch;
//! - [`altstack`]: alternate signal stacks;
//! - [`sleep`]: [`sleep_wall`], a sleep to an absolute deadline that ends on time under any storm;
//! - [`pattern`]: stamps that detect corruption and double hand-outs, and [`rand`]: small generators;
//! - [`reports`]: [`NoReports`], the guard that fails a test on any report nolock printed during it.
//!
//! # Signal safety
//!
//! What a signal handler may call says so in its `# Context` section: [`gettid`], [`tgkill`], [`raw_stderr`],
//! [`ErrnoGuard`], [`fill`], [`check`], [`is_zeroed`], [`pattern_word`], [`splitmix64`], [`Rng`],
//! [`storm::dispatch_timer_signal`] and [`storm::StormSlot::count`]. They use only raw memory accesses, atomics
//! and async-signal-safe system calls: no allocation, no lock, no stdio, no panicking path. Everything else is
//! for normal context (it may allocate, and panics with a message on a failed system call).

pub mod altstack;
pub mod pattern;
pub mod rand;
// The library's loom build (`--cfg loom`) models the lock-free pieces only and has no debug reports.
#[cfg(not(loom))]
pub mod reports;
pub mod signal;
pub mod sleep;
#[cfg(target_arch = "x86_64")]
pub mod step;
pub mod storm;
pub mod sys;
pub mod timer;

pub use altstack::AltStack;
pub use pattern::{Damage, check, fill, is_zeroed, pattern_word};
pub use rand::{Rng, splitmix64};
#[cfg(not(loom))]
pub use reports::{NoReports, ReportCounter, reports_expected};
pub use signal::{BASE_FLAGS, Handler, SavedActions, block_signal, install_handler, try_install_handler};
pub use sleep::sleep_wall;
pub use sys::{ErrnoGuard, gettid, raw_stderr, tgkill};
pub use timer::ThreadTimer;
