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
//! `synchronize_srcu_fast`, `malloc_trim`, `nolock_init`) are normal context only, as in nolock. `realloc` of
//! a pointer nolock does not own makes one `process_vm_readv` system call.
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

/// `NOLOCK_BACKGROUND=1` in the environment of a preloaded program starts nolock's background worker (which
/// gives free memory back to the OS) and the grace-period worker from this library's constructor. Without it,
/// a preloaded program gets no extra thread: memory freed stays in nolock's arena for reuse, and the workers
/// start on the first normal-context RCU call (`synchronize_rcu`, `rcu_barrier`) or `nolock_init`.
extern "C" fn nolock_c_ctor() {
    // SAFETY: getenv with a NUL-terminated name; the result is only compared.
    let v = unsafe { libc::getenv(c"NOLOCK_BACKGROUND".as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    if !v.is_null() && unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes() == b"1" {
        nolock::init();
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static NOLOCK_C_CTOR: extern "C" fn() = nolock_c_ctor;
