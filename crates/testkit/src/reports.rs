//! nolock's reports (a refused free, a debug-mode finding, a destroy with live objects, a panicking
//! callback: everything `nolock::debug::reports()` counts, each also printed on standard error) during a test
//! or a scenario run.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Counts nolock's reports from its creation on.
///
/// # Context
/// Any context: one atomic load of nolock's counter per call.
pub struct ReportCounter(u64);

impl ReportCounter {
    /// Start counting now.
    ///
    /// # Context
    /// Any context.
    pub fn start() -> Self {
        Self(nolock::debug::reports())
    }

    /// Reports made since [`start`](Self::start).
    ///
    /// # Context
    /// Any context.
    pub fn count(&self) -> u64 {
        nolock::debug::reports().wrapping_sub(self.0)
    }
}

/// Tests of one binary that must see no report take this gate shared; a test that provokes reports on purpose
/// takes it exclusively ([`reports_expected`]), so it never runs while a [`NoReports`] test counts. Reports
/// are counted process-wide (`nolock::debug::reports()`) and the tests of one binary run in parallel threads.
static REPORT_GATE: RwLock<()> = RwLock::new(());

/// Fails the test if nolock reports anything between [`new`](Self::new) and the drop of the guard or an
/// explicit [`check`](Self::check).
///
/// Create it first thing in the test, before any serialisation lock of the test file, and keep it to the end
/// (`let _reports = testkit::NoReports::new();`). A background worker's report made for this test after the
/// guard is dropped is not seen; tests that wait for their grace periods (`rcu_barrier`) before returning see
/// those too.
///
/// # Context
/// Normal context: takes a process-wide reader lock (waits while a [`reports_expected`] test runs).
pub struct NoReports {
    counter: ReportCounter,
    _gate: RwLockReadGuard<'static, ()>,
}

impl NoReports {
    /// Start counting (waits while a test that expects reports runs).
    ///
    /// # Context
    /// Normal context: may block on the gate.
    pub fn new() -> Self {
        let gate = REPORT_GATE.read().unwrap_or_else(|e| e.into_inner());
        Self { counter: ReportCounter::start(), _gate: gate }
    }

    /// Reports made since [`new`](Self::new).
    ///
    /// # Context
    /// Any context.
    pub fn count(&self) -> u64 {
        self.counter.count()
    }

    /// Panic if nolock reported anything so far.
    ///
    /// # Context
    /// Normal context: panics (allocates its message) on a report.
    #[track_caller]
    pub fn check(&self, when: &str) {
        let n = self.count();
        assert_eq!(n, 0, "{when}: nolock printed {n} report(s) on standard error during the test (see stderr)");
    }
}

impl Default for NoReports {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoReports {
    fn drop(&mut self) {
        // A test that already fails keeps its own message (a second panic while unwinding would abort).
        if !std::thread::panicking() {
            self.check("at the end of the test");
        }
    }
}

/// For a test that provokes reports on purpose: no [`NoReports`] test of this binary runs while the guard is
/// held. The test checks its own expected count.
///
/// # Context
/// Normal context: takes a process-wide writer lock (waits for every [`NoReports`] test to end).
pub fn reports_expected() -> RwLockWriteGuard<'static, ()> {
    REPORT_GATE.write().unwrap_or_else(|e| e.into_inner())
}
