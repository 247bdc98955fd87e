//! Loom model of the page bitmap's summary-bit protocol (`nolock::sync::page_bitmap`): a claim that fills a
//! word races frees in the same word, and when everything is done, a word with a free page must have its
//! summary bit set (a clear bit would hide free pages from every search: allocations failing while memory is
//! free). Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p nolock-mm --release
//! --test loom_page_bitmap`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::thread;

use nolock::sync::page_bitmap::{note_free, note_full};

const BIT: u64 = 1 << 5;

struct Bitmap {
    word: AtomicU64,
    summary: AtomicU64,
}

/// The claimer: take the last free page of the word (CAS), note the word full if it is.
fn claim_last(b: &Bitmap, page: u64) -> bool {
    let mut cur = b.word.load(Ordering::Relaxed);
    loop {
        if cur & page != 0 {
            return false;
        }
        match b.word.compare_exchange(cur, cur | page, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => {
                if cur | page == !0 {
                    note_full(&b.summary, BIT, &b.word);
                }
                return true;
            }
            Err(now) => cur = now,
        }
    }
}

/// The freer: free `page` (its bit is set), note the word has room.
fn free(b: &Bitmap, page: u64) {
    b.word.fetch_and(!page, Ordering::Release);
    note_free(&b.summary, BIT);
}

fn check(b: &Bitmap) {
    let word = b.word.load(Ordering::Relaxed);
    let summary = b.summary.load(Ordering::Relaxed);
    assert!(word == !0 || summary & BIT != 0, "word {word:#x} has room but its summary bit is clear");
}

#[test]
fn fill_races_a_free() {
    loom::model(|| {
        // Page 0 free, page 1 allocated, every other page allocated.
        let b = Arc::new(Bitmap { word: AtomicU64::new(!1), summary: AtomicU64::new(BIT) });
        let b1 = b.clone();
        let claimer = thread::spawn(move || {
            claim_last(&b1, 1);
        });
        free(&b, 2);
        claimer.join().unwrap();
        check(&b);
    });
}

#[test]
fn fill_races_two_frees_and_a_refill() {
    loom::model(|| {
        let b = Arc::new(Bitmap { word: AtomicU64::new(!1), summary: AtomicU64::new(BIT) });
        let b1 = b.clone();
        let b2 = b.clone();
        let claimer = thread::spawn(move || {
            claim_last(&b1, 1);
            claim_last(&b1, 2);
        });
        let freer = thread::spawn(move || {
            free(&b2, 2);
        });
        free(&b, 4);
        claimer.join().unwrap();
        freer.join().unwrap();
        check(&b);
    });
}
