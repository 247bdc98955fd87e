/*
 * The nolock C API (nolock.h), linked with -lnolock_c: kmalloc, caches, RCU, SRCU-fast; the API from a signal
 * handler; fork while other threads allocate; threads that come and go. Prints "api: all ok" and exits 0, or
 * names the failed check and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "nolock.h"

#define CHECK(c)                                                                  \
    do {                                                                          \
        if (!(c)) {                                                               \
            printf("api: FAILED at line %d: %s\n", __LINE__, #c);                 \
            fflush(stdout);                                                       \
            _exit(1);                                                             \
        }                                                                         \
    } while (0)

static volatile int callbacks;
static void count_cb(struct rcu_head *h) {
    (void)h;
    __atomic_fetch_add(&callbacks, 1, __ATOMIC_RELAXED);
}

struct node {
    long value;
    struct rcu_head rcu;
};

static void kmalloc_api(void) {
    void *p = kmalloc_nolock(100, NOLOCK_GFP_NONE);
    CHECK(p != NULL);
    CHECK(ksize(p) == 112); /* kmalloc-112: four classes per power of two above 64 B */
    kfree_nolock(p);
    CHECK(kmalloc_nolock(0, 0) == NOLOCK_ZERO_SIZE_PTR);
    kfree_nolock(NOLOCK_ZERO_SIZE_PTR);
    kfree_nolock(NULL);
    unsigned char *z = kmalloc_nolock(5000, NOLOCK_GFP_ZERO);
    CHECK(z != NULL);
    for (int i = 0; i < 5000; i++) CHECK(z[i] == 0);
    kfree_nolock(z);
    /* malloc and kfree_nolock share the arena. */
    p = malloc(64);
    CHECK(ksize(p) >= 64);
    kfree_nolock(p);
}

static void cache_api(void) {
    errno = 0;
    CHECK(kmem_cache_create("bad", 0, 8, 0) == NULL && errno == EINVAL);
    errno = 0;
    CHECK(kmem_cache_create("bad", 64, 3, 0) == NULL && errno == EINVAL);
    errno = 0;
    CHECK(kmem_cache_create("bad", 64, 8, 0x100) == NULL && errno == EINVAL);
    struct kmem_cache *c = kmem_cache_create("c-objects", 48, 16, 0);
    CHECK(c != NULL);
    enum { N = 1000 };
    void *objs[N];
    for (int i = 0; i < N; i++) {
        objs[i] = kmem_cache_alloc_nolock(c, i % 2 ? NOLOCK_GFP_ZERO : 0);
        CHECK(objs[i] != NULL && ((uintptr_t)objs[i] & 15) == 0);
        memset(objs[i], i, 48);
    }
    for (int i = 0; i < N; i++) kmem_cache_free(c, objs[i]);
    void *o = kmem_cache_alloc(c, 0);
    kmem_cache_free_nolock(c, o);
    CHECK(kmem_cache_destroy(c) == 0);

    struct kmem_cache *r = kmem_cache_create("c-typesafe", sizeof(struct node), 0,
                                             NOLOCK_SLAB_TYPESAFE_BY_RCU | NOLOCK_SLAB_HARDENED);
    CHECK(r != NULL);
    struct node *n = kmem_cache_alloc_nolock(r, 0);
    CHECK(n != NULL);
    kmem_cache_free_nolock(r, n);
    CHECK(kmem_cache_destroy(r) == 0);
}

static void rcu_api(void) {
    CHECK(!rcu_read_lock_held());
    rcu_read_lock();
    rcu_read_lock();
    rcu_read_lock();
    CHECK(rcu_read_lock_held());
    rcu_read_unlock();
    rcu_read_unlock();
    CHECK(rcu_read_lock_held());
    rcu_read_unlock();
    CHECK(!rcu_read_lock_held());
    synchronize_rcu();

    static struct rcu_head heads[10];
    int before = callbacks;
    for (int i = 0; i < 10; i++) call_rcu_nolock(&heads[i], count_cb);
    rcu_barrier();
    CHECK(callbacks == before + 10);

    for (int i = 0; i < 1000; i++) {
        struct node *n = malloc(sizeof *n);
        n->value = i;
        kfree_rcu_nolock(n, &n->rcu);
    }
    rcu_barrier();
}

static void srcu_api(void) {
    struct srcu_fast *d = srcu_fast_create();
    CHECK(d != NULL);
    struct srcu_fast_ctr a = srcu_read_lock_fast(d);
    struct srcu_fast_ctr b = srcu_read_lock_fast(d);
    /* Sections of one domain may end in any order. */
    srcu_read_unlock_fast(d, a);
    usleep(1000);
    srcu_read_unlock_fast(d, b);
    synchronize_srcu_fast(d);
    static struct rcu_head heads[5];
    int before = callbacks;
    for (int i = 0; i < 5; i++) call_srcu_fast_nolock(d, &heads[i], count_cb);
    struct node *n = kmalloc_nolock(sizeof *n, 0);
    kfree_srcu_fast_nolock(d, n, &n->rcu);
    srcu_barrier_fast(d);
    CHECK(callbacks == before + 5);
    srcu_fast_destroy(d);
}

/* ---- the API from a signal handler that interrupts it -------------------------------------------------- */

static struct srcu_fast *sig_domain;
static volatile long handler_runs;
static volatile int handler_failed;

static void on_signal(int sig) {
    (void)sig;
    int saved = errno;
    rcu_read_lock();
    struct srcu_fast_ctr c = srcu_read_lock_fast(sig_domain);
    void *p = kmalloc_nolock(200, NOLOCK_GFP_ZERO);
    void *q = malloc(3000);
    if (!p || !q) handler_failed = 1;
    else {
        memset(q, 1, 3000);
        struct node *n = malloc(sizeof *n);
        if (n) kfree_rcu_nolock(n, &n->rcu);
    }
    kfree_nolock(p);
    free(q);
    srcu_read_unlock_fast(sig_domain, c);
    rcu_read_unlock();
    handler_runs++;
    errno = saved;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void signal_api(void) {
    sig_domain = srcu_fast_create();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGPROF, &sa, NULL);
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGPROF;
    sev._sigev_un._tid = gettid();
    timer_t t;
    CHECK(timer_create(CLOCK_MONOTONIC, &sev, &t) == 0);
    struct itimerspec its = {{0, 20000}, {0, 20000}};
    timer_settime(t, 0, &its, NULL);
    double end = now_ms() + 150;
    while (now_ms() < end) {
        rcu_read_lock();
        void *p = malloc(100);
        void *q = kmalloc_nolock(5000, 0);
        struct srcu_fast_ctr c = srcu_read_lock_fast(sig_domain);
        p = realloc(p, 7000);
        srcu_read_unlock_fast(sig_domain, c);
        free(p);
        kfree_nolock(q);
        rcu_read_unlock();
    }
    struct itimerspec off = {{0, 0}, {0, 0}};
    timer_settime(t, 0, &off, NULL);
    timer_delete(t);
    CHECK(!handler_failed);
    CHECK(handler_runs > 0);
    CHECK(!rcu_read_lock_held());
    rcu_barrier();
    srcu_fast_destroy(sig_domain);
}

/* ---- fork while other threads allocate ---------------------------------------------------------------- */

static volatile int stop_threads;

static void *churn(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *live[32] = {0};
    while (!stop_threads) {
        int i = (seed = seed * 1103515245u + 12345u) >> 16 & 31;
        free(live[i]);
        live[i] = malloc(16 + (seed >> 8) % 20000);
        rcu_read_lock();
        rcu_read_unlock();
    }
    for (int i = 0; i < 32; i++) free(live[i]);
    return NULL;
}

static void fork_api(void) {
    enum { T = 4 };
    pthread_t th[T];
    for (int i = 0; i < T; i++) pthread_create(&th[i], NULL, churn, (void *)(uintptr_t)(i + 1));
    for (int k = 0; k < 40; k++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            alarm(10); /* a hang in the child fails the check below */
            void *ps[100];
            for (int i = 0; i < 100; i++) ps[i] = malloc(8 + i * 100);
            for (int i = 0; i < 100; i++) free(ps[i]);
            rcu_read_lock();
            rcu_read_unlock();
            void *q = kmalloc_nolock(64, 0);
            kfree_nolock(q);
            _exit(q ? 0 : 2);
        }
        int st = 0;
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    stop_threads = 1;
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
}

/* ---- threads that come and go, freeing each other's memory -------------------------------------------- */

static void *producer(void *arg) {
    void **slot = arg;
    for (int i = 0; i < 64; i++) slot[i] = malloc(32 + i * 64);
    return NULL;
}

static void threads_api(void) {
    for (int round = 0; round < 50; round++) {
        void *slots[4][64];
        pthread_t th[4];
        for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, producer, slots[i]);
        for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 64; j++) free(slots[i][j]);
    }
}

static long threads_now(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long n = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %ld", &n) == 1) break;
    if (f) fclose(f);
    return n;
}

static long resident_kib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0;
        fclose(f);
    }
    return res * (sysconf(_SC_PAGESIZE) / 1024);
}

/* What the C library adds to nolock for malloc: no thread of its own, large blocks given back to the OS when
 * freed; and what it relies on: kmalloc's 5 and 6 KiB classes (a database page and its header takes 5 KiB). */
static void malloc_policy(void) {
    CHECK(threads_now() == 1);
    void *p = malloc(4200);
    CHECK(malloc_usable_size(p) == 5120);
    free(p);
    p = malloc(5121);
    CHECK(malloc_usable_size(p) == 6144);
    free(p);
    enum { BIG = 64 << 20 };
    unsigned char *big = malloc(BIG);
    CHECK(big != NULL);
    /* Volatile stores, one per page: the compiler may not drop stores to memory that is freed unread. */
    for (size_t i = 0; i < BIG; i += 4096) ((volatile unsigned char *)big)[i] = 1;
    long before = resident_kib();
    free(big);
    long after = resident_kib();
    CHECK(before - after > (BIG >> 10) * 9 / 10);
}

/* Pointers nolock does not own (under LD_PRELOAD: the loader's early blocks): free leaks and counts them,
 * realloc copies what is mapped of them, malloc_usable_size says 0. An mmap'd page stands in for them. */
static void *volatile laundry;
/* Hides where a pointer came from, so the compiler does not refuse to free what is not from malloc. */
static void *launder(void *p) {
    laundry = p;
    return laundry;
}

static void foreign_pointers(void) {
    uint64_t before = nolock_c_foreign_frees();
    char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    CHECK(malloc_usable_size(m) == 0);
    memset(m, 'x', 8192);
    char *tail = m + 8192 - 16;
    strcpy(tail, "end of a mapping");
    /* Asks for more than is mapped after `tail`: the 16 mapped bytes are copied, nothing faults. */
    char *q = realloc(launder(tail), 100000);
    CHECK(q != NULL && memcmp(q, "end of a mapping", 16) == 0);
    free(q);
    /* Spans two pages. */
    q = realloc(launder(m + 4000), 200);
    CHECK(q != NULL && q[0] == 'x' && q[199] == 'x');
    free(q);
    free(launder(m));
    CHECK(nolock_c_foreign_frees() == before + 3);
    CHECK(munmap(launder(m), 8192) == 0);
}

int main(void) {
    uint64_t reports = nolock_reports();
    malloc_policy();
    foreign_pointers();
    kmalloc_api();
    cache_api();
    rcu_api();
    srcu_api();
    signal_api();
    fork_api();
    threads_api();
    CHECK(nolock_reports() == reports);
    printf("api: all ok (handler runs %ld, foreign frees %llu)\n", (long)handler_runs,
           (unsigned long long)nolock_c_foreign_frees());
    return 0;
}
