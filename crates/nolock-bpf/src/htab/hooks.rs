//! Test-only hook points inside map operations: "a signal that lands in the worst place, on purpose".
//!
//! With the crate's `test-hooks` feature, writers call `point` at the named places below; a test installs a
//! hook with `set_hook` that raises a signal (or calls the map directly), so a nested operation runs exactly
//! there, the way a signal handler arriving at that instruction would (the mechanism, shared with the other
//! modules of this crate, is in `hook_site`).

/// Named places inside a map operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Point {
    /// A writer holds its bucket lock (locked modes) or has entered its section (lock-free mode).
    Locked,
    /// A writer's walk found its position, before it inserts or claims.
    AfterSeek,
    /// A new element is initialised and linked into nothing yet, before the head CAS.
    BeforeInsert,
    /// A remover won its claim, before it completes the removal.
    AfterClaim,
    /// A completion froze the element, before it swings the predecessor's link.
    AfterFreeze,
    /// An element was unlinked, before it is retired.
    BeforeRetire,
    /// A lockless reader found an element that is not its key, before it loads the element's `next`.
    ReaderStep,
}

hook_points!(Point, point);
