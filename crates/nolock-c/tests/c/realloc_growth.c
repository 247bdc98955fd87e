/*
 * A buffer grown by realloc 4 KiB at a time up to MIB MiB (argv[1], default 8), the way naive C code appends
 * to a buffer. Prints how many times the block moved. glibc moves it a few times (large blocks grow with
 * mremap); an allocator that copies on every growth moves it every time and spends time quadratic in the
 * final size.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    size_t target = (size_t)(argc > 1 ? atol(argv[1]) : 8) << 20;
    unsigned char *p = NULL;
    size_t n = 0;
    int moves = 0;
    while (n < target) {
        unsigned char *q = realloc(p, n + 4096);
        if (!q) return 1;
        if (q != p) moves++;
        p = q;
        memset(p + n, (int)(n >> 12), 4096);
        n += 4096;
    }
    for (size_t i = 0; i < n; i += 4096)
        if (p[i] != (unsigned char)(i >> 12)) return 2;
    free(p);
    printf("moves %d\n", moves);
    return 0;
}
