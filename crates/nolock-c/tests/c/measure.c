/*
 * measure OUT PRELOAD PROGRAM [ARGS...]: run PROGRAM (with LD_PRELOAD=PRELOAD unless PRELOAD is "-") in a
 * child, wait4 it, and write "<status> <wall ns> <peak RSS KiB> <user+system CPU ns>" to OUT. Exits 0 once
 * OUT is written.
 *
 * Why a helper: a child's ru_maxrss includes the memory of the process it was forked (or vforked) from, up to
 * its exec. Spawned straight from the test harness, every program would "peak" at the harness's own size.
 * Spawned from this small helper, the figure is the program's own (and its waited-for children's).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: measure OUT PRELOAD PROGRAM [ARGS...]\n");
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 2;
    }
    if (pid == 0) {
        if (strcmp(argv[2], "-") != 0) setenv("LD_PRELOAD", argv[2], 1);
        execvp(argv[3], argv + 3);
        perror("exec");
        _exit(127);
    }
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    if (wait4(pid, &status, 0, &ru) != pid) {
        perror("wait4");
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long long ns = (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    FILE *f = fopen(argv[1], "w");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    long long cpu = (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000LL +
                    (long long)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
    fprintf(f, "%d %lld %ld %lld\n", status, ns, ru.ru_maxrss, cpu);
    fclose(f);
    return 0;
}
