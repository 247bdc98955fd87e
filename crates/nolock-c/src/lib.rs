//! # nolock-c: nolock as a C library
//!
//! `libnolock_c.so` (and `libnolock_c.a`) exports two things, declared in `include/nolock.h`:
//!
//! - **the nolock API** for C: `kmalloc_nolock`, `kfree_nolock`, `ksize`, `kmem_cache_*`, `rcu_read_lock` /
//!   `rcu_read_unlock`, `synchronize_rcu`, `call_rcu_nolock`, `kfree_rcu_nolock`, SRCU-fast domains
//!   ([`api`]);
//! - **the malloc family** (`malloc`, `free`, `calloc`, `realloc`, `reallocarray`, `posix_memalign`,
//!   `aligned_alloc`, `memalign`, `valloc`, `pvalloc`, `malloc_usable_size`, `malloc_trim`), so that
//!   `LD_PRELOAD=libnolock_c.so program` runs an unmodified program on nolock, and its signal handlers may call
//!   `malloc` and `free` ([`malloc`]).
//!
//! ## Context rules of this crate
//!
//! **Unless its documentation (here and in `nolock.h`) says otherwise, an exported function may be called from
//! any context**: any thread, a signal handler that interrupted any instruction of this library or of nolock
//! on the same thread, a thread holding arbitrary locks. It never blocks, takes no lock and makes no system
//! call except those nolock documents for the allocation paths (the first `mmap` of the arena, an `mprotect`
//! when the memory committed ahead of need is used up). Functions that wait for grace periods, create or
//! destroy caches or domains, or give memory back to the OS (`synchronize_rcu`, `rcu_barrier`,
//! `kmem_cache_create`, `kmem_cache_destroy`, `srcu_fast_create`, `srcu_fast_destroy`,
//! `synchronize_srcu_fast`, `malloc_trim`, `nolock_init`) are normal context only, as in nolock. Two system
//! calls of the malloc family (both async-signal-safe): `free` (and `realloc`, which frees) of a block of at
//! least 128 KiB first gives its pages back with one `madvise(MADV_DONTNEED)`, as glibc unmaps its large
//! blocks; `realloc` of a pointer nolock does not own makes one `process_vm_readv`.
//!
//! ## Threads
//!
//! The library starts no thread unless asked: nolock's background worker is off unless
//! `NOLOCK_BACKGROUND=1`, and its grace-period worker starts with the first normal-context RCU call
//! (`synchronize_rcu`, `rcu_barrier`, ...) or `nolock_init`. (A thread in a preloaded program would turn on
//! glibc's stdio locking and make `unshare(CLONE_NEWUSER)` fail.)
//!
//! ## Pointers nolock does not own
//!
//! Under `LD_PRELOAD` the dynamic loader hands out a little memory from its own minimal allocator before the
//! program's first `malloc` reaches this library, and may later give such a block to `free` or `realloc`.
//! nolock tells its own pointers from others in O(1) ([`nolock::stats::in_arena`]); a foreign pointer given to
//! `free` is **leaked** (counted, see `nolock_c_foreign_frees`), never forwarded to the C library's `free`:
//! it may come from the loader's minimal allocator, which glibc's `free` does not know either (it would abort
//! with "free(): invalid pointer"), and looking the real `free` up with `dlsym` can itself allocate. The
//! loader's blocks are few and small.
//!
//! ## Thread-locals
//!
//! Stable Rust compiles the thread-locals of a `cdylib` (nolock's and this crate's) in the general-dynamic TLS
//! model: each access goes through `__tls_get_addr`. Preloaded (or linked) at start-up, the library's TLS
//! block is in the static TLS area and `__tls_get_addr` finds it without allocating; but after a `dlopen` of
//! another library with thread-locals, the first access on a thread may make glibc grow that thread's DTV,
//! which calls `malloc`. The initial-exec model, which never calls the loader, needs
//! `-Z tls-model=initial-exec` (nightly). See the README section and `tests/tls_model.rs`.

#![warn(missing_docs)]

pub mod api;
pub mod malloc;

/// Rust code inside this library (std's own allocations, the background worker) allocates from nolock
/// directly, without going through the exported `malloc`.
#[global_allocator]
static ALLOC: nolock::NolockAlloc = nolock::NolockAlloc::new();

/// Write a message to standard error without allocating (raw `write(2)`).
pub(crate) fn say(msg: &[u8]) {
    let mut rest = msg;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid readable buffer of the given length.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            // SAFETY: reads the calling thread's errno.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Set the calling thread's `errno`.
#[inline]
pub(crate) fn set_errno(e: i32) {
    // SAFETY: `__errno_location` returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// The library's constructor (normal context, before `main`): reads the malloc configuration.
///
/// `NOLOCK_BACKGROUND=1` in the environment also starts nolock's background worker (which gives free memory
/// back to the OS) and the grace-period worker. Without it, a program gets no extra thread: small freed memory
/// stays in nolock's arena for reuse (large blocks go back to the OS when freed, see [`malloc`]), and the
/// grace-period worker starts on the first normal-context RCU call (`synchronize_rcu`, `rcu_barrier`) or
/// `nolock_init`.
///
/// `NOLOCK_C_STATS=1` prints nolock's statistics to standard error at exit (`atexit`).
extern "C" fn nolock_c_ctor() {
    malloc::configure();
    if env_is(c"NOLOCK_BACKGROUND", b"1") {
        nolock::init();
    }
    if env_is(c"NOLOCK_C_STATS", b"1") {
        // SAFETY: registers a plain extern "C" function.
        unsafe { libc::atexit(print_stats) };
    }
}

fn env_is(name: &core::ffi::CStr, value: &[u8]) -> bool {
    // SAFETY: getenv with a NUL-terminated name; the result is only compared.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    !v.is_null() && unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes() == value
}

/// `NOLOCK_C_STATS=1`: what nolock holds at exit (normal context: `atexit`).
extern "C" fn print_stats() {
    use std::fmt::Write as _;
    let s = nolock::stats::snapshot();
    let mut out = String::from("nolock: cache            object  live objects   slab KiB\n");
    for c in s.caches.iter().filter(|c| c.slabs > 0) {
        let _ = writeln!(
            out,
            "nolock: {:<16} {:>7} {:>13} {:>10}",
            c.name.as_str(),
            c.object_size,
            c.allocs.saturating_sub(c.frees),
            c.slabs as usize * c.slab_pages * 4
        );
    }
    let p = &s.pages;
    let _ = writeln!(
        out,
        "nolock: large blocks {} ({} pages); pages used {}, below the frontier {}, dirty free {}, purged {}; RSS {} KiB",
        s.large.allocs.saturating_sub(s.large.frees),
        s.large.pages,
        p.used_pages,
        p.active_pages,
        p.dirty_free_pages,
        p.purged_pages,
        s.resident_bytes.unwrap_or(0) / 1024
    );
    say(out.as_bytes());
}

#[used]
#[unsafe(link_section = ".init_array")]
static NOLOCK_C_CTOR: extern "C" fn() = nolock_c_ctor;
