/*
 * nolock.h: allocate and retire memory from any context, from C.
 *
 * Link with -lnolock_c (libnolock_c.so or libnolock_c.a, built by `cargo build --release -p nolock-c`),
 * or run any program on it with LD_PRELOAD=.../libnolock_c.so: the library also defines malloc, free,
 * calloc, realloc, reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc,
 * malloc_usable_size and malloc_trim, and those may be called from signal handlers.
 *
 * Context: unless a function's comment says "normal context only", it may be called from any context:
 * any thread, a signal handler that interrupted any instruction of this library on the same thread, a
 * thread holding arbitrary locks. It never blocks, takes no lock and makes no system call (except the
 * first mmap of the arena, and an mprotect when the memory committed ahead of need runs out).
 * "Normal context only" functions may block, allocate or make system calls.
 *
 * The malloc family follows glibc's semantics (errno ENOMEM on failure, calloc overflow checked, realloc(p, 0)
 * frees and returns NULL, posix_memalign returns EINVAL for a bad alignment, aligned_alloc needs a power of
 * two). free of a block of 128 KiB or more first gives its pages back with one madvise(MADV_DONTNEED)
 * (async-signal-safe), as glibc unmaps its large blocks. A pointer nolock does not own (memory the dynamic
 * loader handed out before the library took over) given to free is leaked, never passed to another free.
 *
 * Threads: the library starts none unless NOLOCK_BACKGROUND=1 (the background worker, which gives free
 * memory back to the OS) or until the first normal-context RCU call or nolock_init (the grace-period worker).
 * NOLOCK_C_STATS=1 prints nolock's statistics at exit. The arena is 16 GiB of address space
 * (NOLOCK_ARENA_SIZE); under an address-space limit (ulimit -v) without that variable, half the limit.
 */
#ifndef NOLOCK_H
#define NOLOCK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- kmalloc -------------------------------------------------------------------------------------- */

#define NOLOCK_GFP_NONE 0u
#define NOLOCK_GFP_ZERO 1u /* zero the memory */

/* Size 0 returns ZERO_SIZE_PTR: not null, not dereferenceable, free to kfree. */
#define NOLOCK_ZERO_SIZE_PTR ((void *)16)

/* size bytes, aligned to at least 8 and to the largest power of two dividing size (up to 32 KiB), page
 * aligned above 32 KiB. NULL only when memory is exhausted, never because something was busy. */
void *kmalloc_nolock(size_t size, unsigned int gfp);
/* Free memory from kmalloc_nolock, a cache or malloc. NULL and ZERO_SIZE_PTR are ignored; a bad pointer
 * (foreign, double free, interior) is reported on stderr and nothing is freed. Never fails: a free that
 * cannot be done now (a handler interrupted this thread's list) is deferred. */
void kfree_nolock(void *p);
/* Usable size of a nolock object (its size class or page run); 0 for anything else. */
size_t ksize(const void *p);

/* ---- caches --------------------------------------------------------------------------------------- */

struct kmem_cache;

#define NOLOCK_SLAB_TYPESAFE_BY_RCU 1u /* slabs return to the page allocator only after an RCU grace period */
#define NOLOCK_SLAB_DEBUG 4u           /* red zones, poison, per-object state: catches double frees */
#define NOLOCK_SLAB_HARDENED 8u        /* encoded free pointers, checked pops */

/* Normal context only. NULL with errno EINVAL (size 0 or above 1 MiB, bad alignment, unknown flag),
 * ENOSPC (all 256 caches in use) or ENOMEM. align 0 means 1. */
struct kmem_cache *kmem_cache_create(const char *name, size_t size, size_t align, unsigned int flags);
void *kmem_cache_alloc_nolock(struct kmem_cache *cache, unsigned int gfp);
void kmem_cache_free_nolock(struct kmem_cache *cache, void *p);
/* The same as the _nolock names. */
void *kmem_cache_alloc(struct kmem_cache *cache, unsigned int gfp);
void kmem_cache_free(struct kmem_cache *cache, void *p);
/* Normal context only. Returns the objects still allocated (0 when all were freed; otherwise their slabs
 * are kept, nothing is corrupted, and the problem is reported). */
uint64_t kmem_cache_destroy(struct kmem_cache *cache);

/* ---- RCU ------------------------------------------------------------------------------------------ */

/* Embed one in an object retired with call_rcu_nolock or kfree_rcu_nolock. */
struct rcu_head {
    void *nolock_private[2];
    void (*func)(struct rcu_head *head);
};
typedef void (*rcu_callback_t)(struct rcu_head *head);

/* Sections nest, at most 16 deep per thread. Any context, including a signal handler. */
void rcu_read_lock(void);
void rcu_read_unlock(void);
int rcu_read_lock_held(void);
/* Normal context only: wait for a grace period (never inside a section). */
void synchronize_rcu(void);
/* Normal context only: wait until every callback queued before has run. */
void rcu_barrier(void);
/* Run func(head) on nolock's grace-period worker after a grace period. The worker is started by
 * nolock_init, synchronize_rcu or rcu_barrier (NOLOCK_BACKGROUND=1 starts it when preloaded). */
void call_rcu_nolock(struct rcu_head *head, rcu_callback_t func);
/* Free ptr (nolock memory: kmalloc_nolock, a cache, malloc) after a grace period; head lies inside *ptr. */
void kfree_rcu_nolock(void *ptr, struct rcu_head *head);

/* ---- SRCU-fast: read-side sections that may sleep ------------------------------------------------- */

struct srcu_fast;
/* Opaque: give it back to srcu_read_unlock_fast on the same thread. */
struct srcu_fast_ctr {
    void *nolock_private[3];
};

struct srcu_fast *srcu_fast_create(void);        /* normal context only */
void srcu_fast_destroy(struct srcu_fast *d);      /* normal context only; runs pending callbacks */
struct srcu_fast_ctr srcu_read_lock_fast(struct srcu_fast *d);
void srcu_read_unlock_fast(struct srcu_fast *d, struct srcu_fast_ctr ctr);
void synchronize_srcu_fast(struct srcu_fast *d);  /* normal context only */
void srcu_barrier_fast(struct srcu_fast *d);      /* normal context only */
void call_srcu_fast_nolock(struct srcu_fast *d, struct rcu_head *head, rcu_callback_t func);
void kfree_srcu_fast_nolock(struct srcu_fast *d, void *ptr, struct rcu_head *head);

/* ---- process -------------------------------------------------------------------------------------- */

/* Normal context only: map the arena, register the fork and thread-exit hooks, start the grace-period
 * worker, and the background worker (gives free memory back to the OS) if NOLOCK_BACKGROUND=1. Optional. */
void nolock_init(void);
/* Normal context only: give free memory back to the OS now; returns the pages purged. */
size_t nolock_trim(void);
/* Problems reported so far (refused frees, debug findings). */
uint64_t nolock_reports(void);
/* Pointers nolock does not own that were given to free or realloc (they are leaked, see README). */
uint64_t nolock_c_foreign_frees(void);

#ifdef __cplusplus
}
#endif

#endif /* NOLOCK_H */
