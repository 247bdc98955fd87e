//! Tasks: the owners of task storage. A task is a thread; its record lives in a static table, so finding,
//! claiming and releasing one needs no allocation.
//!
//! A record holds the task's storage pointer (`task->bpf_storage`: 0, a [`LocalStorage`](super::LocalStorage)
//! published with one compare-and-swap, or [`DEAD`] once the thread has exited) and a reference count: the
//! thread holds one reference from its first [`Task::current`] until it exits, every [`Task`] handle holds one
//! (the kernel's `task_struct` reference a caller holds). The record is handed out again only when the thread
//! has exited and the last handle is gone, so a handle never names another thread.
//!
//! # Thread exit
//!
//! The first [`Task::current`] on a thread sets a pthread key whose destructor ([`owner_exit`]) frees the
//! thread's storage. The key is created in normal context when a map is created ([`ensure_key`]); setting its
//! value is a store into the thread descriptor for glibc's first 32 keys, so it is safe in a signal handler.
//! A `thread_local!` with `Drop` was not used: registering its destructor (`__cxa_thread_atexit_impl`) calls
//! `malloc`, which a signal handler must not. When the key is not one of the first 32, no destructor is set
//! and the thread's storage is freed only when its maps are dropped (counted in [`unregistered_exits`]).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Task records in the table; threads beyond this get no [`Task`] (their `get` fails with `NoTask`).
pub const MAX_TASKS: usize = 4096;

/// Storage word of a task that has exited: no storage will be created for it again.
pub(crate) const DEAD: usize = 1;

pub(crate) struct Record {
    /// 0 / `LocalStorage` address / [`DEAD`].
    pub(crate) storage: AtomicUsize,
    /// References: the live thread's plus one per handle.
    refs: AtomicU32,
    /// 0: free, 1: claimed.
    used: AtomicU32,
}

pub(crate) static RECORDS: [Record; MAX_TASKS] =
    [const { Record { storage: AtomicUsize::new(0), refs: AtomicU32::new(0), used: AtomicU32::new(0) } }; MAX_TASKS];

/// Where the next claim starts looking.
static HINT: AtomicUsize = AtomicUsize::new(0);
/// pthread key + 1 (0: not created yet).
static KEY: AtomicU32 = AtomicU32::new(0);
static UNREGISTERED: AtomicU64 = AtomicU64::new(0);

const EXITED: u32 = u32::MAX;

thread_local! {
    /// This thread's record + 1; 0 before the first claim, `EXITED` once its destructor ran.
    static MINE: AtomicU32 = const { AtomicU32::new(0) };
}

/// A task (thread) that storage belongs to: a counted reference to its record, like a held `task_struct`.
/// It may be sent to other threads, which can then read or create the task's storage.
#[derive(Debug)]
pub struct Task {
    idx: u32,
}

impl Task {
    /// The calling thread, claiming its record on the first call. `None` when the thread is past its exit
    /// destructor or every record is in use.
    ///
    /// # Context
    /// Any context. The first call on a thread makes one `pthread_setspecific` (a plain store for glibc's first
    /// 32 keys; see the module header).
    pub fn current() -> Option<Task> {
        let idx = current_idx()?;
        RECORDS[idx as usize].refs.fetch_add(1, Ordering::Relaxed);
        Some(Task { idx })
    }

    /// Index of the task's record (stable while the handle lives); for reports.
    pub fn id(&self) -> u32 {
        self.idx
    }

    /// Whether the thread has exited.
    pub fn exited(&self) -> bool {
        // Acquire: pairs with the AcqRel swap to DEAD in `owner_exit`.
        RECORDS[self.idx as usize].storage.load(Ordering::Acquire) == DEAD
    }

    pub(crate) fn record(&self) -> &'static Record {
        &RECORDS[self.idx as usize]
    }
}

impl Clone for Task {
    fn clone(&self) -> Self {
        RECORDS[self.idx as usize].refs.fetch_add(1, Ordering::Relaxed);
        Task { idx: self.idx }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        put(self.idx);
    }
}

/// The calling thread's record index, claiming one if needed.
pub(crate) fn current_idx() -> Option<u32> {
    let m = MINE.with(|m| m.load(Ordering::Relaxed));
    if m == EXITED {
        return None;
    }
    if m != 0 {
        return Some(m - 1);
    }
    claim()
}

fn claim() -> Option<u32> {
    let start = HINT.load(Ordering::Relaxed);
    for i in 0..MAX_TASKS {
        let idx = (start + i) % MAX_TASKS;
        let r = &RECORDS[idx];
        // Acquire: pairs with the Release store of `used` in `put`, so the record's reset storage word is seen.
        if r.used.load(Ordering::Relaxed) == 0
            && r.used.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
        {
            r.refs.store(1, Ordering::Relaxed);
            // A signal handler may have claimed a record for this thread meanwhile: its claim wins, this one
            // is given back (never two records for one thread).
            let won = MINE.with(|m| m.compare_exchange(0, idx as u32 + 1, Ordering::Relaxed, Ordering::Relaxed));
            if let Err(theirs) = won {
                r.refs.store(0, Ordering::Relaxed);
                // Release: pairs with the Acquire claim above of the next claimer.
                r.used.store(0, Ordering::Release);
                return (theirs != EXITED).then(|| theirs - 1);
            }
            HINT.store(idx + 1, Ordering::Relaxed);
            register_exit(idx as u32);
            return Some(idx as u32);
        }
    }
    None
}

fn put(idx: u32) {
    let r = &RECORDS[idx as usize];
    // AcqRel: the last reference sees every use of the record by other holders (their Release decrements).
    if r.refs.fetch_sub(1, Ordering::AcqRel) == 1 {
        r.storage.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire compare-and-swap in `claim`.
        r.used.store(0, Ordering::Release);
    }
}

/// Creates the thread-exit key if it does not exist yet.
///
/// # Context
/// Normal context (called from map creation): `pthread_key_create`.
pub(crate) fn ensure_key() -> Option<u32> {
    // Acquire: pairs with the AcqRel publication below.
    let k = KEY.load(Ordering::Acquire);
    if k != 0 {
        return Some(k - 1);
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer and `owner_exit` has the destructor's signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(owner_exit)) } != 0 {
        return None;
    }
    // AcqRel: publishes the key (pairs with the Acquire load above); a loser deletes its own.
    match KEY.compare_exchange(0, key + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // SAFETY: created above and never used.
            unsafe { libc::pthread_key_delete(key) };
            Some(winner - 1)
        }
    }
}

fn register_exit(idx: u32) {
    // Acquire: pairs with the AcqRel publication in `ensure_key`.
    let k = KEY.load(Ordering::Acquire);
    if k == 0 || (cfg!(target_env = "gnu") && k > 32) {
        UNREGISTERED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // SAFETY: a live key; the value is non-null, so the destructor runs at thread exit.
    unsafe { libc::pthread_setspecific(k - 1, (idx as usize + 1) as *const libc::c_void) };
}

/// Threads whose exit destructor could not be registered (their storage waits for the maps' drop).
pub fn unregistered_exits() -> u64 {
    UNREGISTERED.load(Ordering::Relaxed)
}

extern "C" fn owner_exit(p: *mut libc::c_void) {
    let idx = p as usize as u32 - 1;
    MINE.with(|m| m.store(EXITED, Ordering::Relaxed));
    let r = &RECORDS[idx as usize];
    // AcqRel: Acquire pairs with the Release compare-and-swap that published the storage; Release orders the
    // exit before later loads that see DEAD.
    let s = r.storage.swap(DEAD, Ordering::AcqRel);
    if s != 0 && s != DEAD {
        super::free_storage_at_exit(s);
    }
    put(idx);
}
