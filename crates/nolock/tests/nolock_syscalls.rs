//! No system calls on `*_nolock` paths (hardening issue, item 6).
//!
//! The test binary interposes the libc entry points through which nolock (and std) make system calls and
//! allocate: `syscall` (so `futex`, `membarrier`, `gettid`, `tgkill` ... are seen by number), `mmap`, `munmap`,
//! `madvise`, `mprotect`, `write`, `read`, `open`, `close`, `getpid`, `sched_yield`, `nanosleep`,
//! `clock_nanosleep`, the
//! `pthread_key_create` / `pthread_key_delete` / `pthread_setspecific` trio, and the `malloc` family. The
//! static link binds every call the test binary makes — nolock's included — to these definitions; each one
//! counts the call, when the calling thread is inside a counted region, and forwards it: system calls with the
//! raw `syscall` instruction (setting `errno` as libc does), pthread functions through `dlsym(RTLD_NEXT, ..)`,
//! the allocator through glibc's `__libc_*` entry points. The interposers allocate nothing and take no lock;
//! their counters are static atomics.
//!
//! A counted region is one `*_nolock` (or any-context) call: the test sets a thread-local flag, makes the call
//! and clears it. A signal handler saves the flag, clears it, counts its own `*_nolock` calls the same way, and
//! puts the flag back before it returns, so the handler's own bookkeeping is never counted against the call it
//! interrupted.
//!
//! `interposers_see_calls` proves the interposition works (each interposer, and nolock's own calls through it:
//! a `synchronize_rcu` in a counted region must be seen making its system calls). The workload, run once and
//! judged by two tests, runs for a few seconds threads doing `kmalloc_nolock` / `kfree_nolock` of mixed sizes,
//! `KmemCache` allocations and frees, `kfree_rcu_nolock`, `kfree_srcu_fast_nolock` (two domains),
//! `call_rcu_nolock`, `call_srcu_fast_nolock` and `call_rcu_tasks_trace` floods (pointer blocks fill and go
//! through the rings), RCU, SRCU-fast and Tasks Trace read-side sections, with a per-thread POSIX-timer
//! `SIGPROF` storm whose handler makes the same calls, while another thread runs `synchronize_*` and barriers
//! (normal context, not counted). A warm-up first lets each thread claim its per-thread state and the domains
//! map their tables; it is counted separately and printed. The counters say which call made each system call,
//! and whether inside a signal handler; the whole table is printed.
//!
//! - `nothing_blocking_mapping_or_allocating_inside_nolock_calls`: after the warm-up, inside counted regions, no
//!   `membarrier`, no `mmap` / `munmap` / `mprotect` / `madvise`, no `write` (nolock writes only debug reports,
//!   and the workload fails on those anyway), no `futex` operation but a wake, no `sched_yield` or sleep, no
//!   `malloc` family call, no pthread key call; nothing at all but futex wakes. (DESIGN.md's `irq_work` row lets a `*_nolock` path wake a worker
//!   with `futex(FUTEX_WAKE)`.) The code before commit 63639a6 fails it: hundreds of `membarrier` calls from
//!   `kfree_rcu_nolock`, and thousands of futex wakes from `call_*_nolock` and `kfree_*_nolock`.
//! - `no_system_call_at_all_inside_nolock_calls`: the assertion, nothing at all after the warm-up. It
//!   failed now and then until `kfree_nolock` / `KmemCache::free_nolock` stopped waking the background worker
//!   with `futex(FUTEX_WAKE)` when the 64th slab since the cache's last shrink became empty (they now only
//!   change the word the worker sleeps on), and until allocations stopped committing arena memory with
//!   `mprotect` (the arena is committed all at once by default).
//! - `freeing_until_slabs_are_empty_makes_no_system_call`: that wake, made deterministic (failed every run
//!   before the fix).

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering, compiler_fence};
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nolock::{
    Gfp, KmemCache, RCU_TASKS_TRACE, RcuHead, SrcuFast, call_rcu_nolock, call_rcu_tasks_trace, kfree_nolock,
    kfree_rcu_nolock, kfree_srcu_fast_nolock, kmalloc_nolock, rcu_barrier, rcu_barrier_tasks_trace, rcu_read_lock,
    rcu_read_lock_tasks_trace, synchronize_rcu, synchronize_rcu_tasks_trace,
};
use testkit::{AltStack, ErrnoGuard, ThreadTimer};

// ------------------------------------------------------------------------------------------------------------
// The interposers
// ------------------------------------------------------------------------------------------------------------

mod interpose {
    use core::ffi::{c_char, c_int, c_long, c_uint, c_void};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// Counter slots: system call numbers below `NR_LIMIT`, then the library functions below.
    pub const NR_LIMIT: usize = 512;
    pub const PTHREAD_KEY_CREATE: usize = NR_LIMIT;
    pub const PTHREAD_KEY_DELETE: usize = NR_LIMIT + 1;
    pub const PTHREAD_SETSPECIFIC: usize = NR_LIMIT + 2;
    pub const MALLOC: usize = NR_LIMIT + 3;
    pub const CALLOC: usize = NR_LIMIT + 4;
    pub const REALLOC: usize = NR_LIMIT + 5;
    pub const FREE: usize = NR_LIMIT + 6;
    pub const MEMALIGN: usize = NR_LIMIT + 7;
    /// A `syscall()` number out of range.
    pub const NR_OTHER: usize = NR_LIMIT + 8;
    /// `futex` with `FUTEX_WAKE` (slot `SYS_futex` counts every other futex operation: waits, requeues ...).
    pub const FUTEX_WAKE: usize = NR_LIMIT + 9;
    pub const SLOTS: usize = NR_LIMIT + 10;
    /// Operations a counted region may be (0: not inside one), plus 16 for the same operation made inside a
    /// signal handler.
    pub const OPS: usize = 32;

    /// Phase of the counters: 0 during warm-up, 1 after.
    pub static PHASE: AtomicUsize = AtomicUsize::new(0);
    /// `COUNTS[phase][op][slot]`.
    pub static COUNTS: [[[AtomicU64; SLOTS]; OPS]; 2] =
        [const { [const { [const { AtomicU64::new(0) }; SLOTS] }; OPS] }; 2];

    thread_local! {
        /// The counted region (a `*_nolock` call) this thread is inside: an operation number, 0 for none.
        pub static INSIDE: Cell<u8> = const { Cell::new(0) };
    }

    #[inline(always)]
    fn count(slot: usize) {
        let op = INSIDE.with(Cell::get) as usize;
        if op != 0 {
            let phase = PHASE.load(Ordering::Relaxed).min(1);
            COUNTS[phase][op.min(OPS - 1)][slot.min(SLOTS - 1)].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_nr(nr: c_long, a2: c_long) {
        count(if nr == libc::SYS_futex && (a2 as c_int & 0x7f) == libc::FUTEX_WAKE {
            FUTEX_WAKE
        } else if (0..NR_LIMIT as c_long).contains(&nr) {
            nr as usize
        } else {
            NR_OTHER
        });
    }

    /// Zero every counter.
    pub fn reset() {
        for c in COUNTS.iter().flatten().flatten() {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The raw `syscall` instruction with six arguments; returns the kernel's value (`-errno` on failure).
    ///
    /// # Safety
    /// The arguments must be valid for system call `nr`.
    #[inline(always)]
    unsafe fn raw(nr: c_long, a1: c_long, a2: c_long, a3: c_long, a4: c_long, a5: c_long, a6: c_long) -> c_long {
        let r: c_long;
        // SAFETY: the caller passes valid arguments for `nr`; the instruction clobbers rcx and r11 only (and
        // memory, as the system call may write through its arguments: no `nomem`).
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr => r,
                in("rdi") a1,
                in("rsi") a2,
                in("rdx") a3,
                in("r10") a4,
                in("r8") a5,
                in("r9") a6,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            )
        };
        r
    }

    /// libc's convention: a kernel error becomes `-1` with `errno` set.
    fn libc_ret(r: c_long) -> c_long {
        if (-4095..0).contains(&r) {
            // SAFETY: __errno_location returns this thread's errno.
            unsafe { *libc::__errno_location() = -r as c_int };
            -1
        } else {
            r
        }
    }

    /// `syscall(2)`. Variadic in C; on x86-64 the caller passes the number and up to six arguments in the same
    /// registers (and stack slot) as for this non-variadic definition, and `%al` is ignored.
    ///
    /// # Safety
    /// As the system call requires.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn syscall(
        nr: c_long,
        a1: c_long,
        a2: c_long,
        a3: c_long,
        a4: c_long,
        a5: c_long,
        a6: c_long,
    ) -> c_long {
        count_nr(nr, a2);
        // SAFETY: forwarded as the caller gave it.
        libc_ret(unsafe { raw(nr, a1, a2, a3, a4, a5, a6) })
    }

    /// # Safety
    /// As `mmap(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn mmap(
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: i64,
    ) -> *mut c_void {
        count(libc::SYS_mmap as usize);
        let a = [addr as c_long, len as c_long, prot as c_long, flags as c_long, fd as c_long, off as c_long];
        // SAFETY: forwarded.
        let r = libc_ret(unsafe { raw(libc::SYS_mmap, a[0], a[1], a[2], a[3], a[4], a[5]) });
        if r == -1 { libc::MAP_FAILED } else { r as *mut c_void }
    }

    /// # Safety
    /// As `munmap(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
        count(libc::SYS_munmap as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_munmap, addr as c_long, len as c_long, 0, 0, 0, 0) }) as c_int
    }

    /// # Safety
    /// As `madvise(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
        count(libc::SYS_madvise as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_madvise, addr as c_long, len as c_long, advice as c_long, 0, 0, 0) }) as c_int
    }

    /// # Safety
    /// As `mprotect(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
        count(libc::SYS_mprotect as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_mprotect, addr as c_long, len as c_long, prot as c_long, 0, 0, 0) }) as c_int
    }

    /// # Safety
    /// As `write(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: usize) -> isize {
        count(libc::SYS_write as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_write, fd as c_long, buf as c_long, n as c_long, 0, 0, 0) }) as isize
    }

    /// # Safety
    /// As `read(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize {
        count(libc::SYS_read as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_read, fd as c_long, buf as c_long, n as c_long, 0, 0, 0) }) as isize
    }

    /// `open(2)` (variadic in C: the mode is read only with `O_CREAT` / `O_TMPFILE`, like libc does), made as
    /// `openat(AT_FDCWD, ..)`.
    ///
    /// # Safety
    /// As `open(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
        count(libc::SYS_open as usize);
        let mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 { mode } else { 0 };
        let a = [libc::AT_FDCWD as c_long, path as c_long, flags as c_long, mode as c_long];
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_openat, a[0], a[1], a[2], a[3], 0, 0) }) as c_int
    }

    /// # Safety
    /// As `close(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn close(fd: c_int) -> c_int {
        count(libc::SYS_close as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_close, fd as c_long, 0, 0, 0, 0, 0) }) as c_int
    }

    #[unsafe(no_mangle)]
    extern "C" fn getpid() -> libc::pid_t {
        count(libc::SYS_getpid as usize);
        // SAFETY: getpid takes no argument and cannot fail.
        unsafe { raw(libc::SYS_getpid, 0, 0, 0, 0, 0, 0) as libc::pid_t }
    }

    #[unsafe(no_mangle)]
    extern "C" fn sched_yield() -> c_int {
        count(libc::SYS_sched_yield as usize);
        // SAFETY: sched_yield takes no argument and cannot fail.
        unsafe { raw(libc::SYS_sched_yield, 0, 0, 0, 0, 0, 0) as c_int }
    }

    /// # Safety
    /// As `nanosleep(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn nanosleep(req: *const libc::timespec, rem: *mut libc::timespec) -> c_int {
        count(libc::SYS_nanosleep as usize);
        // SAFETY: forwarded.
        libc_ret(unsafe { raw(libc::SYS_nanosleep, req as c_long, rem as c_long, 0, 0, 0, 0) }) as c_int
    }

    /// `clock_nanosleep(2)` (it returns the error number instead of setting `errno`).
    ///
    /// # Safety
    /// As `clock_nanosleep(2)`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn clock_nanosleep(
        clock: libc::clockid_t,
        flags: c_int,
        req: *const libc::timespec,
        rem: *mut libc::timespec,
    ) -> c_int {
        count(libc::SYS_clock_nanosleep as usize);
        let a = [clock as c_long, flags as c_long, req as c_long, rem as c_long];
        // SAFETY: forwarded.
        -(unsafe { raw(libc::SYS_clock_nanosleep, a[0], a[1], a[2], a[3], 0, 0) }) as c_int
    }

    // ---- pthread keys: forwarded to libc's own through dlsym(RTLD_NEXT) ----

    static REAL_KEY_CREATE: AtomicUsize = AtomicUsize::new(0);
    static REAL_KEY_DELETE: AtomicUsize = AtomicUsize::new(0);
    static REAL_SETSPECIFIC: AtomicUsize = AtomicUsize::new(0);

    /// The next definition of `name` after this executable (libc's), looked up once. `dlsym` may allocate:
    /// [`resolve_all`] does every look-up up front, in a normal context; a lazy one happens only for a call made
    /// before (nolock's own process constructor registers its thread-exit keys before `main`).
    fn real(cache: &AtomicUsize, name: &core::ffi::CStr) -> usize {
        let mut f = cache.load(Ordering::Acquire);
        if f == 0 {
            // SAFETY: RTLD_NEXT with a valid NUL-terminated name.
            f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
            assert_ne!(f, 0, "dlsym(RTLD_NEXT, {name:?}) failed");
            // Release: pairs with the Acquire load above.
            cache.store(f, Ordering::Release);
        }
        f
    }

    /// Look up every forwarded pthread function now (normal context).
    pub fn resolve_all() {
        real(&REAL_KEY_CREATE, c"pthread_key_create");
        real(&REAL_KEY_DELETE, c"pthread_key_delete");
        real(&REAL_SETSPECIFIC, c"pthread_setspecific");
    }

    type KeyCreate = unsafe extern "C" fn(*mut libc::pthread_key_t, Option<unsafe extern "C" fn(*mut c_void)>) -> c_int;

    /// # Safety
    /// As `pthread_key_create`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn pthread_key_create(
        key: *mut libc::pthread_key_t,
        dtor: Option<unsafe extern "C" fn(*mut c_void)>,
    ) -> c_int {
        count(PTHREAD_KEY_CREATE);
        // SAFETY: libc's pthread_key_create, which has this signature.
        let f: KeyCreate = unsafe { core::mem::transmute(real(&REAL_KEY_CREATE, c"pthread_key_create")) };
        // SAFETY: forwarded.
        unsafe { f(key, dtor) }
    }

    /// # Safety
    /// As `pthread_key_delete`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn pthread_key_delete(key: libc::pthread_key_t) -> c_int {
        count(PTHREAD_KEY_DELETE);
        // SAFETY: libc's pthread_key_delete, which has this signature.
        let f: unsafe extern "C" fn(libc::pthread_key_t) -> c_int =
            unsafe { core::mem::transmute(real(&REAL_KEY_DELETE, c"pthread_key_delete")) };
        // SAFETY: forwarded.
        unsafe { f(key) }
    }

    /// # Safety
    /// As `pthread_setspecific`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn pthread_setspecific(key: libc::pthread_key_t, value: *const c_void) -> c_int {
        count(PTHREAD_SETSPECIFIC);
        // SAFETY: libc's pthread_setspecific, which has this signature.
        let f: unsafe extern "C" fn(libc::pthread_key_t, *const c_void) -> c_int =
            unsafe { core::mem::transmute(real(&REAL_SETSPECIFIC, c"pthread_setspecific")) };
        // SAFETY: forwarded.
        unsafe { f(key, value) }
    }

    // ---- the malloc family: forwarded to glibc's __libc_* entry points ----

    unsafe extern "C" {
        fn __libc_malloc(n: usize) -> *mut c_void;
        fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
        fn __libc_realloc(p: *mut c_void, n: usize) -> *mut c_void;
        fn __libc_free(p: *mut c_void);
        fn __libc_memalign(align: usize, n: usize) -> *mut c_void;
    }

    #[unsafe(no_mangle)]
    extern "C" fn malloc(n: usize) -> *mut c_void {
        count(MALLOC);
        // SAFETY: glibc's malloc.
        unsafe { __libc_malloc(n) }
    }

    #[unsafe(no_mangle)]
    extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
        count(CALLOC);
        // SAFETY: glibc's calloc.
        unsafe { __libc_calloc(n, size) }
    }

    /// # Safety
    /// As `realloc`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn realloc(p: *mut c_void, n: usize) -> *mut c_void {
        count(REALLOC);
        // SAFETY: forwarded to glibc's realloc.
        unsafe { __libc_realloc(p, n) }
    }

    /// # Safety
    /// As `free`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn free(p: *mut c_void) {
        count(FREE);
        // SAFETY: forwarded to glibc's free (every allocation of the process comes from glibc's allocator).
        unsafe { __libc_free(p) }
    }

    /// # Safety
    /// As `posix_memalign`.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, n: usize) -> c_int {
        count(MEMALIGN);
        if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
            return libc::EINVAL;
        }
        // SAFETY: glibc's memalign.
        let p = unsafe { __libc_memalign(align, n) };
        if p.is_null() {
            return libc::ENOMEM;
        }
        // SAFETY: `out` is the caller's valid out-pointer.
        unsafe { *out = p };
        0
    }

    #[unsafe(no_mangle)]
    extern "C" fn aligned_alloc(align: usize, n: usize) -> *mut c_void {
        count(MEMALIGN);
        // SAFETY: glibc's memalign.
        unsafe { __libc_memalign(align, n) }
    }

    #[unsafe(no_mangle)]
    extern "C" fn memalign(align: usize, n: usize) -> *mut c_void {
        count(MEMALIGN);
        // SAFETY: glibc's memalign.
        unsafe { __libc_memalign(align, n) }
    }

    /// A readable name for counter slot `i`.
    pub fn name(i: usize) -> String {
        let known: &[(c_long, &str)] = &[
            (libc::SYS_read, "read"),
            (libc::SYS_write, "write"),
            (libc::SYS_open, "open"),
            (libc::SYS_close, "close"),
            (libc::SYS_mmap, "mmap"),
            (libc::SYS_mprotect, "mprotect"),
            (libc::SYS_munmap, "munmap"),
            (libc::SYS_sched_yield, "sched_yield"),
            (libc::SYS_madvise, "madvise"),
            (libc::SYS_nanosleep, "nanosleep"),
            (libc::SYS_getpid, "getpid"),
            (libc::SYS_gettid, "gettid"),
            (libc::SYS_futex, "futex, not FUTEX_WAKE"),
            (libc::SYS_tgkill, "tgkill"),
            (libc::SYS_clock_nanosleep, "clock_nanosleep"),
            (libc::SYS_openat, "openat"),
            (libc::SYS_getrandom, "getrandom"),
            (libc::SYS_membarrier, "membarrier"),
        ];
        match i {
            PTHREAD_KEY_CREATE => "pthread_key_create()".into(),
            PTHREAD_KEY_DELETE => "pthread_key_delete()".into(),
            PTHREAD_SETSPECIFIC => "pthread_setspecific()".into(),
            MALLOC => "malloc()".into(),
            CALLOC => "calloc()".into(),
            REALLOC => "realloc()".into(),
            FREE => "free()".into(),
            MEMALIGN => "posix_memalign/aligned_alloc/memalign()".into(),
            NR_OTHER => "syscall(out of range)".into(),
            FUTEX_WAKE => format!("futex FUTEX_WAKE (syscall {})", libc::SYS_futex),
            _ => match known.iter().find(|(n, _)| *n as usize == i) {
                Some((_, s)) => format!("{s} (syscall {i})"),
                None => format!("syscall {i}"),
            },
        }
    }
}

use interpose::{COUNTS, INSIDE, OPS, PHASE, SLOTS};

/// What a counted region is (the `op` of [`counted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    /// The interposition check's own calls.
    Check = 1,
    RcuReadSection = 2,
    SrcuReadSection = 3,
    TasksTraceReadSection = 4,
    Kmalloc = 5,
    Kfree = 6,
    CacheAlloc = 7,
    CacheFree = 8,
    KfreeRcu = 9,
    KfreeSrcuDomain = 10,
    KfreeSrcuTasksTrace = 11,
    CallRcuNolock = 12,
    CallSrcuFastNolock = 13,
    CallRcuTasksTrace = 14,
    /// Normal-context calls in the interposition check (`synchronize_rcu`, `rcu_barrier`).
    NormalContext = 15,
}

const OP_NAMES: [&str; 16] = [
    "-",
    "(interposition check)",
    "rcu_read_lock section",
    "SrcuFast::read_lock_fast section",
    "rcu_read_lock_tasks_trace section",
    "kmalloc_nolock",
    "kfree_nolock",
    "KmemCache::alloc_nolock",
    "KmemCache::free_nolock",
    "kfree_rcu_nolock",
    "kfree_srcu_fast_nolock (static domain)",
    "kfree_srcu_fast_nolock (Tasks Trace)",
    "call_rcu_nolock",
    "call_srcu_fast_nolock",
    "call_rcu_tasks_trace",
    "synchronize_rcu + rcu_barrier (normal context)",
];

/// Offset of an operation's counters when it is made inside a signal handler.
const IN_HANDLER: u8 = 16;

fn op_name(op: usize) -> String {
    if op >= IN_HANDLER as usize {
        format!("{} (in a signal handler)", OP_NAMES[op - IN_HANDLER as usize])
    } else {
        OP_NAMES[op].to_string()
    }
}

thread_local! {
    /// Signal handlers of the storm running on this thread (nested ones included).
    static HANDLER_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Run `f` as a counted region of kind `op` (one `*_nolock` call). Restores the previous state, so it nests.
#[inline(always)]
fn counted<R>(op: Op, f: impl FnOnce() -> R) -> R {
    let op = op as u8 + if HANDLER_DEPTH.with(|d| d.get()) > 0 { IN_HANDLER } else { 0 };
    let was = INSIDE.with(|c| c.replace(op));
    compiler_fence(Ordering::SeqCst);
    let r = f();
    compiler_fence(Ordering::SeqCst);
    INSIDE.with(|c| c.set(was));
    r
}

/// The counters of `phase`: `[op][slot]`.
type Table = [[u64; SLOTS]; OPS];

fn snapshot(phase: usize) -> Table {
    core::array::from_fn(|op| core::array::from_fn(|i| COUNTS[phase][op][i].load(Ordering::Relaxed)))
}

/// Sum over every operation, per slot.
fn totals(t: &Table) -> [u64; SLOTS] {
    core::array::from_fn(|i| t.iter().map(|op| op[i]).sum())
}

fn render(t: &Table) -> String {
    let mut rows = Vec::new();
    for (op, counts) in t.iter().enumerate() {
        for (i, &n) in counts.iter().enumerate().filter(|(_, n)| **n != 0) {
            rows.push(format!("    {n:>10}  {:<45} in {}", interpose::name(i), op_name(op)));
        }
    }
    if rows.is_empty() { "    (nothing)".into() } else { rows.join("\n") }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Start a test: its turn, the pthread look-ups done, the counters zeroed, warm-up phase.
fn begin() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    interpose::resolve_all();
    interpose::reset();
    PHASE.store(0, Ordering::Relaxed);
    g
}

// ------------------------------------------------------------------------------------------------------------
// The interposition works
// ------------------------------------------------------------------------------------------------------------

/// Each interposer counts inside a counted region and not outside; nolock's own calls go through them.
#[test]
fn interposers_see_calls() {
    let _turn = begin();
    let p = 1usize; // count into the "after warm-up" table
    PHASE.store(p, Ordering::Relaxed);
    let get = |i: usize| totals(&snapshot(p))[i];
    let nr = |n: libc::c_long| n as usize;

    // Outside a region: nothing is counted.
    // SAFETY: getpid has no preconditions.
    unsafe { libc::syscall(libc::SYS_getpid) };
    assert_eq!(totals(&snapshot(p)), [0; SLOTS], "counted outside a counted region");

    // SAFETY: opening /dev/null.
    let devnull = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    assert!(devnull >= 0);
    counted(Op::Check, || {
        // SAFETY: plain system calls on a private mapping made here, a write to /dev/null, a pthread key made
        // and deleted here, and a malloc'd block freed once.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_getpid), libc::getpid() as libc::c_long);
            // errno is set like libc does: a futex wait on a word that does not hold the expected value fails
            // with EAGAIN.
            let word = 5u32;
            assert_eq!(libc::syscall(libc::SYS_futex, &word as *const u32, libc::FUTEX_WAIT, 4, 0usize), -1);
            assert_eq!(*libc::__errno_location(), libc::EAGAIN);
            assert_eq!(libc::syscall(libc::SYS_futex, &word as *const u32, libc::FUTEX_WAKE, 1), 0);
            let m = libc::mmap(
                core::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(m, libc::MAP_FAILED);
            m.cast::<u8>().write(7);
            assert_eq!(libc::mprotect(m, 4096, libc::PROT_READ), 0);
            assert_eq!(m.cast::<u8>().read(), 7);
            assert_eq!(libc::madvise(m, 8192, libc::MADV_DONTNEED), 0);
            assert_eq!(libc::munmap(m, 8192), 0);
            assert_eq!(libc::write(devnull, b"x".as_ptr().cast(), 1), 1);
            libc::sched_yield();
            let ts = libc::timespec { tv_sec: 0, tv_nsec: 1000 };
            assert_eq!(libc::nanosleep(&ts, core::ptr::null_mut()), 0);
            let mut key = 0;
            assert_eq!(libc::pthread_key_create(&mut key, None), 0);
            assert_eq!(libc::pthread_setspecific(key, std::ptr::dangling::<libc::c_void>()), 0);
            assert_eq!(libc::pthread_getspecific(key), std::ptr::dangling_mut::<libc::c_void>());
            assert_eq!(libc::pthread_key_delete(key), 0);
            let b = libc::malloc(100);
            assert!(!b.is_null());
            libc::free(std::hint::black_box(b));
        }
        std::thread::sleep(Duration::from_micros(1));
    });
    // SAFETY: our descriptor.
    unsafe { libc::close(devnull) };
    let table = render(&snapshot(p));
    for (what, slot) in [
        ("syscall(getpid)", nr(libc::SYS_getpid)),
        ("syscall(futex FUTEX_WAIT)", nr(libc::SYS_futex)),
        ("syscall(futex FUTEX_WAKE)", interpose::FUTEX_WAKE),
        ("mmap", nr(libc::SYS_mmap)),
        ("mprotect", nr(libc::SYS_mprotect)),
        ("madvise", nr(libc::SYS_madvise)),
        ("munmap", nr(libc::SYS_munmap)),
        ("write", nr(libc::SYS_write)),
        ("sched_yield", nr(libc::SYS_sched_yield)),
        ("nanosleep", nr(libc::SYS_nanosleep)),
        ("clock_nanosleep (std::thread::sleep)", nr(libc::SYS_clock_nanosleep)),
        ("pthread_key_create", interpose::PTHREAD_KEY_CREATE),
        ("pthread_setspecific", interpose::PTHREAD_SETSPECIFIC),
        ("pthread_key_delete", interpose::PTHREAD_KEY_DELETE),
        ("malloc", interpose::MALLOC),
        ("free", interpose::FREE),
    ] {
        assert!(get(slot) >= 1, "the {what} interposer did not count (is it linked in?):\n{table}");
    }
    // getpid: through syscall() and through libc's getpid().
    assert!(get(nr(libc::SYS_getpid)) >= 2, "getpid() not interposed:\n{table}");

    // nolock's own calls bind to the interposers too: a grace period (normal context) orders readers with
    // membarrier (or its mprotect fallback).
    let before = totals(&snapshot(p));
    counted(Op::NormalContext, || {
        synchronize_rcu();
        rcu_barrier();
    });
    let after = totals(&snapshot(p));
    let grew = |n: libc::c_long| after[n as usize] > before[n as usize];
    assert!(
        grew(libc::SYS_membarrier) || grew(libc::SYS_mprotect),
        "synchronize_rcu in a counted region made no membarrier/mprotect call: nolock's calls are not interposed\n{}",
        render(&snapshot(p))
    );
    eprintln!("nolock_syscalls: interposition check, counted:\n{}", render(&snapshot(p)));
}

// ------------------------------------------------------------------------------------------------------------
// The workload
// ------------------------------------------------------------------------------------------------------------

/// Workload threads (each with a `SIGPROF` timer).
const THREADS: usize = 3;
/// How long the measured phase runs (at least; each thread also does at least `MIN_ROUNDS`).
const RUN: Duration = Duration::from_secs(3);
const MIN_ROUNDS: u64 = 5_000;
/// Per-thread timer period: 3 threads at 50 µs ask for 60,000 signals/s (the kernel merges some).
const TIMER_PERIOD: Duration = Duration::from_micros(50);
/// Requested sizes for `kmalloc_nolock`: small classes up to page runs.
const SIZES: [usize; 10] = [8, 24, 64, 100, 256, 700, 2048, 4096, 9000, 40_000];
/// Objects of the retire cache allowed to wait for their grace period before a thread slows down (outside
/// the counted regions).
const BACKLOG: u64 = 100_000;

static DOMAIN: SrcuFast = SrcuFast::new();
static STOP: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static RETIRED: AtomicU64 = AtomicU64::new(0);

/// Retired objects: 64 bytes with an `RcuHead` at offset 16.
#[repr(C)]
struct Obj {
    tag: AtomicU64,
    seq: AtomicU64,
    head: RcuHead,
    data: [AtomicU64; 4],
}
const HEAD_OFFSET: usize = core::mem::offset_of!(Obj, head);

fn cache() -> &'static KmemCache {
    static C: OnceLock<KmemCache> = OnceLock::new();
    C.get_or_init(|| KmemCache::new("syscalls-obj", Layout::new::<Obj>()).expect("cache"))
}

/// The cache once created, for handlers and callbacks (one atomic load).
static CACHE: AtomicPtr<KmemCache> = AtomicPtr::new(core::ptr::null_mut());

fn cache_any_context() -> Option<&'static KmemCache> {
    let p = CACHE.load(Ordering::Acquire);
    // SAFETY: `CACHE` only holds the address of the `OnceLock`'s cache, which lives for the whole program.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Grace-period callback: free the object (runs on the grace-period worker: normal context, not counted).
unsafe fn free_obj(h: NonNull<RcuHead>) {
    let o = (h.as_ptr() as usize - HEAD_OFFSET) as *mut u8;
    // SAFETY: the head of an object of the cache retired once, whose grace period has ended.
    unsafe { cache_any_context().expect("set").free_nolock(NonNull::new_unchecked(o)) };
}

/// One round of `*_nolock` calls, each its own counted region: read-side sections of every flavour, an
/// allocation and free of a mixed size, and an allocation retired in way `how % 7`.
fn nolock_round(c: &KmemCache, n: u64, how: u64) {
    counted(Op::RcuReadSection, || {
        let g = rcu_read_lock();
        std::hint::black_box(&g);
    });
    counted(Op::SrcuReadSection, || {
        let g = DOMAIN.read_lock_fast();
        std::hint::black_box(&g);
    });
    if n.is_multiple_of(8) {
        counted(Op::TasksTraceReadSection, || {
            let g = rcu_read_lock_tasks_trace();
            std::hint::black_box(&g);
        });
    }
    let size = SIZES[(n % SIZES.len() as u64) as usize];
    if let Some(p) = counted(Op::Kmalloc, || kmalloc_nolock(size, Gfp::NONE)) {
        // SAFETY: a fresh object of at least `size` bytes.
        unsafe { p.as_ptr().write_bytes(0x5a, size.min(64)) };
        // SAFETY: our object, freed once.
        counted(Op::Kfree, || unsafe { kfree_nolock(p.as_ptr()) });
    }
    let Some(p) = counted(Op::CacheAlloc, || c.alloc_nolock(Gfp::NONE)) else { return };
    let o = p.cast::<Obj>();
    // SAFETY: a fresh object of the cache (all atomics).
    unsafe { o.as_ref() }.seq.store(n, Ordering::Relaxed);
    // SAFETY: the head field of our object.
    let h = unsafe { NonNull::new_unchecked(core::ptr::addr_of_mut!((*o.as_ptr()).head)) };
    RETIRED.fetch_add(1, Ordering::Relaxed);
    let q = p.as_ptr();
    // SAFETY (each arm): our object, retired or freed once; the callbacks free it into its cache.
    match how % 7 {
        // SAFETY: see above.
        0 => counted(Op::KfreeRcu, || unsafe { kfree_rcu_nolock(q, h) }),
        // SAFETY: see above.
        1 => counted(Op::KfreeSrcuDomain, || unsafe { kfree_srcu_fast_nolock(&DOMAIN, q, h) }),
        // SAFETY: see above.
        2 => counted(Op::KfreeSrcuTasksTrace, || unsafe { kfree_srcu_fast_nolock(&RCU_TASKS_TRACE, q, h) }),
        // SAFETY: see above.
        3 => counted(Op::CallRcuNolock, || unsafe { call_rcu_nolock(h, free_obj) }),
        // SAFETY: see above.
        4 => counted(Op::CallSrcuFastNolock, || unsafe { DOMAIN.call_srcu_fast_nolock(h, free_obj) }),
        // SAFETY: see above.
        5 => counted(Op::CallRcuTasksTrace, || unsafe { call_rcu_tasks_trace(h, free_obj) }),
        // SAFETY: see above.
        _ => counted(Op::CacheFree, || unsafe { c.free_nolock(p) }),
    }
}

/// The storm handler: the same `*_nolock` calls, counted on their own (the interrupted region's mark is put
/// aside and restored).
extern "C" fn on_sigprof(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    let was = INSIDE.with(|c| c.replace(0));
    HANDLER_DEPTH.with(|d| d.set(d.get() + 1));
    compiler_fence(Ordering::SeqCst);
    let n = SIGNALS.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = cache_any_context() {
        nolock_round(c, n, n);
    }
    compiler_fence(Ordering::SeqCst);
    HANDLER_DEPTH.with(|d| d.set(d.get() - 1));
    INSIDE.with(|c| c.set(was));
}

/// What the workload counted after the warm-up (the warm-up is printed), and how much it did.
struct Counted {
    measured: Table,
    summary: String,
}

/// Run the workload once per test binary (both tests judge the same run).
fn workload() -> &'static Counted {
    static RUN_ONCE: OnceLock<Counted> = OnceLock::new();
    RUN_ONCE.get_or_init(run_workload)
}

fn run_workload() -> Counted {
    nolock::init();
    let reports = nolock::debug::reports();
    let c = cache();
    CACHE.store(c as *const KmemCache as *mut KmemCache, Ordering::Release);
    testkit::install_handler(libc::SIGPROF, on_sigprof, libc::SA_ONSTACK);
    STOP.store(false, Ordering::Relaxed);
    let measuring = AtomicBool::new(false);
    let warmed = Barrier::new(THREADS + 1);
    let gp_before = nolock::rcu_stats().grace_periods;
    let mut rounds = [0u64; THREADS];
    let mut measured_for = Duration::ZERO;
    std::thread::scope(|s| {
        struct StopOnDrop;
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                STOP.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop;
        // Grace periods and barriers in normal context: never counted.
        s.spawn(|| {
            let mut i = 0u64;
            while !STOP.load(Ordering::Relaxed) {
                match i % 6 {
                    0 => synchronize_rcu(),
                    1 => rcu_barrier(),
                    2 => DOMAIN.synchronize(),
                    3 => DOMAIN.barrier(),
                    4 => synchronize_rcu_tasks_trace(),
                    _ => rcu_barrier_tasks_trace(),
                }
                i += 1;
            }
        });
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (warmed, measuring) = (&warmed, &measuring);
                s.spawn(move || {
                    // Warm-up: every kind of call many times on this thread (claims its slot and shard, maps the
                    // domains' tables, fills the first pointer blocks), and the handler once.
                    for n in 0..(7 * 600) {
                        nolock_round(c, n, n);
                    }
                    let alt = AltStack::new(256 << 10);
                    // SAFETY: raising a signal whose handler is installed.
                    unsafe { libc::raise(libc::SIGPROF) };
                    warmed.wait();
                    while !measuring.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let timer = ThreadTimer::for_current_thread(libc::SIGPROF, TIMER_PERIOD);
                    let t0 = Instant::now();
                    let mut n = 0u64;
                    while !STOP.load(Ordering::Relaxed) && (n < MIN_ROUNDS || t0.elapsed() < RUN) {
                        nolock_round(c, n * 31 + t as u64, n);
                        n += 1;
                        if n.is_multiple_of(256) {
                            let st = c.stats();
                            if st.allocs.saturating_sub(st.frees) > BACKLOG {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    drop(timer);
                    drop(alt);
                    n
                })
            })
            .collect();
        warmed.wait();
        PHASE.store(1, Ordering::Release);
        measuring.store(true, Ordering::Release);
        let t = Instant::now();
        for (r, h) in rounds.iter_mut().zip(handles) {
            *r = h.join().expect("workload thread");
        }
        measured_for = t.elapsed();
    });
    let warm = snapshot(0);
    let measured = snapshot(1);
    PHASE.store(0, Ordering::Relaxed);
    rcu_barrier();
    DOMAIN.barrier();
    rcu_barrier_tasks_trace();
    let st = c.stats();
    let signals = SIGNALS.load(Ordering::Relaxed);
    let summary = format!(
        "{} rounds ({rounds:?} per thread) measured in {measured_for:.1?}, {signals} SIGPROF handlers, {} objects \
         retired, {} grace periods",
        rounds.iter().sum::<u64>(),
        RETIRED.load(Ordering::Relaxed),
        nolock::rcu_stats().grace_periods - gp_before,
    );
    eprintln!(
        "nolock_syscalls: {summary}\n  warm-up, counted inside *_nolock calls:\n{}\n  after warm-up, counted \
         inside *_nolock calls:\n{}",
        render(&warm),
        render(&measured),
    );
    assert!(signals > 0, "no SIGPROF handler ran: the storm did not happen");
    assert_eq!(st.allocs, st.frees, "objects lost: allocated but never freed after the barriers");
    assert_eq!(nolock::debug::reports(), reports, "nolock made a debug report (see stderr)");
    Counted { measured, summary }
}

/// After warm-up, inside `*_nolock` calls: nothing that blocks, maps, allocates or orders other CPUs. No
/// `membarrier`, no `mmap` / `munmap` / `mprotect` / `madvise`, no `write` (nolock writes only debug reports),
/// no `futex` wait (or any futex operation but a wake), no `sched_yield` or sleep, no `malloc`, no pthread key
/// call. A `futex` wake is allowed here: DESIGN.md (the `irq_work` row) lets a `*_nolock` path wake a worker with
/// one. The strict test below allows nothing at all.
#[test]
fn nothing_blocking_mapping_or_allocating_inside_nolock_calls() {
    let _turn = begin();
    let w = workload();
    let t = totals(&w.measured);
    for (what, slot) in [
        ("membarrier", libc::SYS_membarrier as usize),
        ("futex other than FUTEX_WAKE", libc::SYS_futex as usize),
        ("mmap", libc::SYS_mmap as usize),
        ("munmap", libc::SYS_munmap as usize),
        ("mprotect", libc::SYS_mprotect as usize),
        ("madvise", libc::SYS_madvise as usize),
        ("write", libc::SYS_write as usize),
        ("sched_yield", libc::SYS_sched_yield as usize),
        ("nanosleep", libc::SYS_nanosleep as usize),
        ("clock_nanosleep", libc::SYS_clock_nanosleep as usize),
        ("malloc", interpose::MALLOC),
        ("calloc", interpose::CALLOC),
        ("realloc", interpose::REALLOC),
        ("free", interpose::FREE),
        ("posix_memalign", interpose::MEMALIGN),
        ("pthread_key_create", interpose::PTHREAD_KEY_CREATE),
        ("pthread_setspecific", interpose::PTHREAD_SETSPECIFIC),
    ] {
        assert_eq!(t[slot], 0, "{what} inside *_nolock calls after warm-up ({}):\n{}", w.summary, render(&w.measured));
    }
    // Nor any other system call or interposed function: only futex wakes are allowed here.
    let mut rest = t;
    rest[interpose::FUTEX_WAKE] = 0;
    assert!(
        rest == [0; SLOTS],
        "calls other than futex wakes inside *_nolock calls after warm-up ({}):\n{}",
        w.summary,
        render(&w.measured)
    );
}

/// The assertion: after warm-up, no system call at all inside `*_nolock` calls (the documented set of
/// `kfree_nolock`, `kmalloc_nolock`, `KmemCache::{alloc,free}_nolock`, `kfree_rcu_nolock`, `call_rcu_nolock`
/// and the read-side sections is empty: their `# Context` sections document none), in particular no `futex`
/// wake.
#[test]
fn no_system_call_at_all_inside_nolock_calls() {
    let _turn = begin();
    let w = workload();
    assert!(
        totals(&w.measured) == [0; SLOTS],
        "calls inside *_nolock calls after warm-up ({}):\n{}",
        w.summary,
        render(&w.measured)
    );
}

/// The deterministic form of what the workload above meets now and then: freeing objects until many slabs of a
/// cache are empty. Every 64th slab that becomes empty since the cache was last shrunk, the free wakes the
/// background worker with `futex(FUTEX_WAKE)` (`slab/cache.rs`, `push_run` -> `worker::kick`). The worker
/// shrinks every 100 ms; the frees here take well under that, so the 64th empty slab comes before it.
/// `kfree_nolock` and `kfree_rcu_nolock` (whose retiring threads free ready pointer blocks) reach the same path.
#[test]
fn freeing_until_slabs_are_empty_makes_no_system_call() {
    let _turn = begin();
    nolock::init();
    let c = KmemCache::new("syscalls-empty", Layout::from_size_align(2048, 8).expect("layout")).expect("cache");
    // Warm-up (phase 0): this thread's first calls on the cache.
    for _ in 0..2 {
        let p = counted(Op::CacheAlloc, || c.alloc_nolock(Gfp::NONE)).expect("memory");
        // SAFETY: our object, freed once.
        counted(Op::CacheFree, || unsafe { c.free_nolock(p) });
    }
    // Enough objects for 3 x 64 slabs.
    let mut held = Vec::new();
    while c.stats().slabs_allocated < 3 * 64 {
        for _ in 0..64 {
            held.push(c.alloc_nolock(Gfp::NONE).expect("memory"));
        }
    }
    let slabs = c.stats().slabs_allocated;
    PHASE.store(1, Ordering::Release);
    for &p in &held {
        // SAFETY: our objects, each freed once.
        counted(Op::CacheFree, || unsafe { c.free_nolock(p) });
    }
    PHASE.store(0, Ordering::Release);
    let measured = snapshot(1);
    eprintln!(
        "nolock_syscalls: freed {} objects of {slabs} slabs; counted inside KmemCache::free_nolock:\n{}",
        held.len(),
        render(&measured)
    );
    assert_eq!(c.destroy().live_objects, 0);
    assert!(totals(&measured) == [0; SLOTS], "system calls inside KmemCache::free_nolock:\n{}", render(&measured));
}
