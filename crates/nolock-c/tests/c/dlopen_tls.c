/*
 * Under LD_PRELOAD=libnolock_c.so: a thread that exists before the main thread dlopens many libraries with
 * thread-locals (more than the DTV's spare room, so glibc must grow that thread's DTV on its next
 * __tls_get_addr, calling malloc) then allocates. With the general-dynamic TLS model (stable Rust), nolock's
 * own thread-local accesses are such __tls_get_addr calls, so this is where the loader and malloc meet.
 * Usage: dlopen_tls DIR COUNT (DIR holds libtls1.so .. libtlsCOUNT.so). Prints "ok".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile int phase;

static void *worker(void *arg) {
    (void)arg;
    void *p = malloc(10);
    free(p);
    while (phase == 0) usleep(1000);
    for (int i = 0; i < 1000; i++) {
        p = malloc(100 + i);
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int count = atoi(argv[2]);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    char path[4096];
    for (int i = 1; i <= count; i++) {
        snprintf(path, sizeof path, "%s/libtls%d.so", argv[1], i);
        void *h = dlopen(path, RTLD_NOW);
        if (!h) {
            printf("dlopen: %s\n", dlerror());
            return 1;
        }
        int (*touch)(void) = (int (*)(void))dlsym(h, "touch");
        if (!touch || touch() != 1) return 1;
    }
    phase = 1;
    pthread_join(t, NULL);
    printf("ok\n");
    return 0;
}
