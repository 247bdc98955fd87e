//! Bucket locking: what each kernel version did, and the lock-free mode no kernel has.
//!
//! - [`LockMode::MapLocked`] — **Linux v5.x to v6.14**: a raw spinlock per bucket, entered only after an
//!   increment of one of 8 per-CPU `map_locked` counters per map (slot = `hash & min(7, n_buckets - 1)`). A
//!   nested operation on the same CPU (here: the same thread, e.g. a signal handler) whose key falls in a busy
//!   slot gets `-EBUSY` ([`Error::Busy`](super::Error::Busy)), even for another bucket and another key: with
//!   8 slots, 1 nested operation in 8 on unrelated keys fails. Threads without a nolock slot share one row of
//!   counters (more spurious `Busy`).
//! - [`LockMode::Rqspin`] — **Linux v6.15 and later**: a resilient queued spinlock per bucket. Taking a lock
//!   the same thread already holds is a real self-deadlock and fails at once with `-EDEADLK`
//!   ([`Error::Deadlock`](super::Error::Deadlock)); a lock that stays held by someone else for 250 ms fails
//!   with `-ETIMEDOUT` ([`Error::TimedOut`](super::Error::TimedOut)) — which also breaks AB-BA cycles, for
//!   example two threads whose handlers update each other's held bucket of another map.
//! - [`LockMode::LockFree`] — **no kernel**: no bucket lock. Writers change the list only by single CAS steps
//!   that any context can complete (see `list`), inside a read-side section, and unlinked elements are reused
//!   only after a grace period. A signal handler that interrupted an update of the same bucket on the same
//!   thread completes its own operation (helping the interrupted one when it meets it) with no error.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::Error;

/// How buckets are locked. See the module documentation for the kernel version each one re-creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LockMode {
    /// v6.14 and earlier: 8 per-CPU `map_locked` counters per map, `-EBUSY` on slot aliasing when nested.
    MapLocked,
    /// v6.15 and later: rqspinlock, `-EDEADLK` on same-thread re-entry, `-ETIMEDOUT` after 250 ms.
    Rqspin,
    /// No kernel: lock-free buckets, no error from re-entry.
    #[default]
    LockFree,
}

/// How long `Rqspin` spins before it gives up (the kernel's `RES_DEF_TIMEOUT`).
pub const RQSPIN_TIMEOUT: Duration = Duration::from_millis(250);

/// Number of `map_locked` counters per CPU (the kernel's `HASHTAB_MAP_LOCK_COUNT`).
pub const MAP_LOCK_COUNT: usize = 8;

/// A bucket's lock word (locked modes): 0 free, else the owner's token. With the list head (8 bytes) a bucket
/// of a locked map takes 16 bytes, as the kernel's; a lock-free map has no lock words (8-byte buckets).
#[repr(transparent)]
#[derive(Default)]
pub struct BucketLock {
    lock: AtomicUsize,
}

thread_local! {
    static TOKEN: u8 = const { 0 };
}

/// A token unique to the calling thread while it lives: the address of a thread-local byte.
#[inline]
fn my_token() -> usize {
    TOKEN.with(|t| t as *const u8 as usize)
}

impl BucketLock {
    /// Plain spin lock (the kernel's `raw_spin_lock` under `map_locked`, which already excluded same-CPU
    /// re-entry).
    ///
    /// # Context
    /// Spins while another thread holds the bucket (as the kernel's raw spinlock): bounded by that thread's
    /// critical section, which is a map operation.
    #[inline]
    pub fn raw_lock(&self) {
        let me = my_token();
        // Acquire: pairs with the Release store in `unlock`: the previous holder's list changes are visible.
        while self.lock.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
    }

    /// rqspinlock: take the lock, or fail with `Deadlock` when this thread holds it already, or `TimedOut`
    /// after [`RQSPIN_TIMEOUT`].
    ///
    /// # Context
    /// Spins for at most 250 ms; reads the clock (`clock_gettime` through the vDSO) every 1024 spins.
    #[inline]
    pub fn rqspin_lock(&self) -> Result<(), Error> {
        let me = my_token();
        // Acquire: as in `raw_lock`.
        match self.lock.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(o) if o == me => return Err(Error::Deadlock),
            Err(_) => {}
        }
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            core::hint::spin_loop();
            // Acquire: as in `raw_lock`.
            match self.lock.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(o) if o == me => return Err(Error::Deadlock),
                Err(_) => {}
            }
            spins += 1;
            if spins.is_multiple_of(1024) && start.elapsed() >= RQSPIN_TIMEOUT {
                return Err(Error::TimedOut);
            }
        }
    }

    /// Release the lock.
    #[inline]
    pub fn unlock(&self) {
        // Release: pairs with the Acquire CAS of the next holder.
        self.lock.store(0, Ordering::Release);
    }
}

/// The `map_locked` counters of one map: `MAP_LOCK_COUNT` per CPU, plus one shared row for slot-less threads.
pub struct MapLockedCounters {
    rows: Box<[AtomicU32]>,
    mask: usize,
}

impl MapLockedCounters {
    /// Counters for a map of `n_buckets` buckets.
    pub fn new(n_buckets: usize) -> Self {
        let rows = (0..(crate::cpu::NR_CPUS + 1) * MAP_LOCK_COUNT).map(|_| AtomicU32::new(0)).collect();
        MapLockedCounters { rows, mask: (MAP_LOCK_COUNT - 1).min(n_buckets - 1) }
    }

    /// Bytes the kernel's formula counts for them (`sizeof(int) * 8 * num_possible_cpus`), for `ncpus`.
    pub fn formula_bytes(ncpus: usize) -> usize {
        4 * MAP_LOCK_COUNT * ncpus
    }

    /// Enter slot `hash & mask` of this CPU: `Busy` if it is already entered (the kernel's
    /// `htab_lock_bucket` check). Returns the counter to leave.
    #[inline]
    pub fn enter(&self, hash: u32) -> Result<&AtomicU32, Error> {
        let cpu = crate::cpu::this_cpu().unwrap_or(crate::cpu::NR_CPUS);
        let c = &self.rows[cpu * MAP_LOCK_COUNT + (hash as usize & self.mask)];
        // Relaxed: the counter is touched by this thread and its handlers (and, for the shared row, by other
        // slot-less threads, which the RMW keeps exact); it orders nothing.
        if c.fetch_add(1, Ordering::Relaxed) != 0 {
            c.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Busy);
        }
        Ok(c)
    }
}
