/*
 * malloc inside a SIGPROF handler, while the interrupted thread is itself in malloc and free.
 *
 * A high-rate POSIX timer (CLOCK_MONOTONIC, default every 20 us) sends SIGPROF to the process; the main thread
 * mallocs, fills, checks and frees blocks of 1-64 KiB in a loop (sizes that glibc serves from its arena,
 * under the arena lock, not from the lock-free per-thread cache); the handler does the same with one block.
 * A second thread that only sleeps makes the process multi-threaded, so glibc takes its arena lock (a
 * single-threaded glibc process skips it and corrupts its heap instead). Under glibc the handler's malloc
 * eventually interrupts the main thread inside malloc and waits forever for the lock the main thread holds:
 * the process hangs. Under nolock (LD_PRELOAD=libnolock_c.so) it never does.
 *
 * Usage: sigprof_malloc [run_ms] [interval_us]. Prints "ok <iterations> <signals>" and exits 0, or exits 3
 * when a block's contents were damaged.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t signals;
static volatile sig_atomic_t damaged;
static unsigned handler_seed = 12345;

static size_t pick_size(unsigned *seed) {
    *seed = *seed * 1103515245u + 12345u;
    return 1024 + (*seed >> 8) % (64 * 1024);
}

static void fill(unsigned char *p, size_t n, unsigned char v) {
    memset(p, v, n);
}

static int intact(const unsigned char *p, size_t n, unsigned char v) {
    for (size_t i = 0; i < n; i += 61)
        if (p[i] != v) return 0;
    return p[n - 1] == v;
}

static void on_sigprof(int sig) {
    (void)sig;
    int saved = errno;
    size_t n = pick_size(&handler_seed);
    unsigned char *p = malloc(n);
    if (p) {
        fill(p, n, 0xA5);
        if (!intact(p, n, 0xA5)) damaged = 1;
        p = realloc(p, n / 2 + 1);
        if (p && !intact(p, n / 2 + 1, 0xA5)) damaged = 1;
        free(p);
    }
    signals++;
    errno = saved;
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    long run_ms = argc > 1 ? atol(argv[1]) : 200;
    long interval_us = argc > 2 ? atol(argv[2]) : 20;

    pthread_t t;
    pthread_create(&t, NULL, sleeper, NULL);
    pthread_detach(t);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigprof;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPROF, &sa, NULL);
    /* Only the main thread takes SIGPROF: the sleeper blocks it. */
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGPROF);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    pthread_t me = pthread_self();
    (void)me;

    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGPROF;
    sev._sigev_un._tid = gettid();
    timer_t timer;
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) != 0) {
        perror("timer_create");
        return 2;
    }
    pthread_sigmask(SIG_UNBLOCK, &block, NULL);
    struct itimerspec its;
    its.it_interval.tv_sec = 0;
    its.it_interval.tv_nsec = interval_us * 1000;
    its.it_value = its.it_interval;
    timer_settime(timer, 0, &its, NULL);

    enum { LIVE = 64 };
    unsigned char *live[LIVE] = {0};
    size_t sizes[LIVE] = {0};
    unsigned seed = 777;
    long iterations = 0;
    double end = now_ms() + run_ms;
    while (now_ms() < end) {
        for (int k = 0; k < 64; k++) {
            int i = (int)((seed = seed * 1103515245u + 12345u) >> 16) % LIVE;
            if (live[i]) {
                if (!intact(live[i], sizes[i], (unsigned char)i)) damaged = 1;
                free(live[i]);
            }
            sizes[i] = pick_size(&seed);
            live[i] = malloc(sizes[i]);
            if (live[i]) fill(live[i], sizes[i], (unsigned char)i);
            iterations++;
        }
    }
    struct itimerspec off;
    memset(&off, 0, sizeof off);
    timer_settime(timer, 0, &off, NULL);
    for (int i = 0; i < LIVE; i++) {
        if (live[i] && !intact(live[i], sizes[i], (unsigned char)i)) damaged = 1;
        free(live[i]);
    }
    if (damaged) {
        printf("damaged\n");
        return 3;
    }
    printf("ok %ld %ld\n", iterations, (long)signals);
    return 0;
}
