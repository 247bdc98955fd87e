//! The summary-bit protocol of the page allocator's bitmap, kept here so that a loom model runs this exact code.
//!
//! The page allocator keeps one bit per page in *allocation words* (set: allocated) and, above them, one
//! *summary* bit per allocation word (set: the word may have a free page). Searches skip words whose summary bit
//! is clear, so the invariant that matters is:
//!
//! > once no operation is in progress, every allocation word with a free page has its summary bit set.
//!
//! A stale set bit (a full word marked as having room) only costs a search a look; a stale clear bit would
//! hide free pages for good, and allocations would fail while memory is free. The race to close is a claim that
//! fills a word (and clears its bit) against a free in the same word (which sets it):
//!
//! ```text
//! claimer:  CAS word -> full;  summary &= !bit (A);  if word != full { summary |= bit }
//! freer:    word &= !run (release);  summary |= bit (B)
//! ```
//!
//! (A) and (B) are `AcqRel` RMWs on the same summary word, so one reads the other's result. If (B) comes first,
//! (A) synchronizes with it and the claimer's re-check sees the freed page, setting the bit again. If (A) comes
//! first, (B) sets the bit after it. Either way the bit ends set while the word has room.

use super::atomic::{AtomicU64, Ordering};

/// A claim filled allocation word `word` (whose summary bit is `bit` in `summary`): clear the bit, then re-check.
#[inline]
pub fn note_full(summary: &AtomicU64, bit: u64, word: &AtomicU64) {
    // AcqRel (A): pairs with the AcqRel `fetch_or` (B) in `note_free`; whichever is second sees the other's word.
    summary.fetch_and(!bit, Ordering::AcqRel);
    // Acquire: pairs with the Release `fetch_and` of a freer's word (through B, see the module documentation).
    if word.load(Ordering::Acquire) != !0 {
        // AcqRel: as (A).
        summary.fetch_or(bit, Ordering::AcqRel);
    }
}

/// Pages of the allocation word whose summary bit is `bit` were freed (its bits cleared, `Release`): set the bit.
#[inline]
pub fn note_free(summary: &AtomicU64, bit: u64) {
    // AcqRel (B): pairs with (A) in `note_full`.
    summary.fetch_or(bit, Ordering::AcqRel);
}
