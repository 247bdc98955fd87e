/*
 * The malloc family's observable semantics, printed one per line: run under glibc and under
 * LD_PRELOAD=libnolock_c.so, the outputs must be identical (tests/malloc_semantics.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SHOW(name, ok) printf("%-44s %s\n", name, (ok) ? "yes" : "NO")

static const char *err(int e) {
    switch (e) {
    case 0: return "0";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    default: return "other";
    }
}

static int aligned(const void *p, size_t a) {
    return ((uintptr_t)p & (a - 1)) == 0;
}

int main(void) {
    void *p, *q;
    int rc;

    /* malloc */
    p = malloc(0);
    q = malloc(0);
    SHOW("malloc(0) non-null and unique", p && q && p != q);
    free(p);
    free(q);
    int all16 = 1;
    for (size_t n = 1; n < 20000; n += 7) {
        p = malloc(n);
        all16 &= p != NULL && aligned(p, 16) && malloc_usable_size(p) >= n;
        memset(p, 1, n);
        free(p);
    }
    SHOW("malloc(1..20000) 16-aligned, usable >= n", all16);
    errno = 0;
    p = malloc(SIZE_MAX);
    printf("%-44s %s %s\n", "malloc(SIZE_MAX)", p ? "ptr" : "NULL", err(errno));
    errno = 0;
    p = malloc(SIZE_MAX / 2);
    printf("%-44s %s %s\n", "malloc(SIZE_MAX/2)", p ? "ptr" : "NULL", err(errno));
    free(NULL);
    SHOW("free(NULL) returns", 1);

    /* calloc */
    errno = 0;
    p = calloc(SIZE_MAX / 2, 3);
    printf("%-44s %s %s\n", "calloc overflow", p ? "ptr" : "NULL", err(errno));
    unsigned char *z = malloc(100000);
    memset(z, 0xff, 100000);
    free(z);
    z = calloc(1, 100000);
    int zero = z != NULL;
    for (size_t i = 0; z && i < 100000; i++) zero &= z[i] == 0;
    SHOW("calloc(1, 100000) zeroed after a dirty free", zero);
    free(z);
    z = malloc(4500);
    memset(z, 0xff, 4500);
    free(z);
    z = calloc(1, 4500);
    zero = z != NULL;
    for (size_t i = 0; z && i < 4500; i++) zero &= z[i] == 0;
    SHOW("calloc(1, 4500) zeroed after a dirty free", zero);
    free(z);
    z = calloc(10, 10);
    zero = z != NULL;
    for (size_t i = 0; z && i < 100; i++) zero &= z[i] == 0;
    SHOW("calloc(10, 10) zeroed", zero);
    free(z);
    p = calloc(0, 5);
    SHOW("calloc(0, 5) non-null", p != NULL);
    free(p);

    /* realloc */
    p = realloc(NULL, 40);
    SHOW("realloc(NULL, 40) non-null", p != NULL);
    memset(p, 7, 40);
    p = realloc(p, 100000);
    int kept = p != NULL;
    for (int i = 0; p && i < 40; i++) kept &= ((unsigned char *)p)[i] == 7;
    SHOW("realloc grow keeps the data", kept);
    memset(p, 9, 100000);
    p = realloc(p, 10);
    kept = p != NULL;
    for (int i = 0; p && i < 10; i++) kept &= ((unsigned char *)p)[i] == 9;
    SHOW("realloc shrink keeps the data", kept);
    errno = 0;
    q = realloc(p, SIZE_MAX / 2);
    printf("%-44s %s %s\n", "realloc(p, SIZE_MAX/2)", q ? "ptr" : "NULL", err(errno));
    kept = 1;
    for (int i = 0; i < 10; i++) kept &= ((unsigned char *)p)[i] == 9;
    SHOW("failed realloc leaves the block intact", kept);
    q = realloc(p, 0);
    SHOW("realloc(p, 0) returns NULL (frees)", q == NULL);
    errno = 0;
    p = malloc(16);
    q = reallocarray(p, SIZE_MAX / 2, 3);
    printf("%-44s %s %s\n", "reallocarray overflow", q ? "ptr" : "NULL", err(errno));
    free(p);

    /* posix_memalign */
    p = (void *)1;
    rc = posix_memalign(&p, 3, 10);
    printf("%-44s %s %s\n", "posix_memalign(align 3)", err(rc), p == (void *)1 ? "untouched" : "written");
    rc = posix_memalign(&p, 4, 10);
    printf("%-44s %s %s\n", "posix_memalign(align 4)", err(rc), p == (void *)1 ? "untouched" : "written");
    rc = posix_memalign(&p, 0, 10);
    printf("%-44s %s\n", "posix_memalign(align 0)", err(rc));
    rc = posix_memalign(&p, 24, 10);
    printf("%-44s %s\n", "posix_memalign(align 24)", err(rc));
    int alignok = 1;
    for (size_t a = 8; a <= (1 << 20); a <<= 1) {
        void *r = NULL;
        rc = posix_memalign(&r, a, 100);
        alignok &= rc == 0 && r && aligned(r, a) && malloc_usable_size(r) >= 100;
        free(r);
    }
    SHOW("posix_memalign(8 .. 1 MiB, 100) aligned", alignok);
    p = (void *)1;
    rc = posix_memalign(&p, 64, SIZE_MAX / 2);
    printf("%-44s %s %s\n", "posix_memalign(64, SIZE_MAX/2)", err(rc), p == (void *)1 ? "untouched" : "written");

    /* aligned_alloc, memalign, valloc, pvalloc */
    p = aligned_alloc(256, 1000);
    SHOW("aligned_alloc(256, 1000) aligned", p && aligned(p, 256));
    free(p);
    p = memalign(4096, 10);
    SHOW("memalign(4096, 10) aligned", p && aligned(p, 4096));
    free(p);
    p = memalign(48, 10);
    SHOW("memalign(48, 10) aligned to 64", p && aligned(p, 64));
    free(p);
    p = memalign(1, 10);
    SHOW("memalign(1, 10) non-null", p != NULL);
    free(p);
    long page = sysconf(_SC_PAGESIZE);
    p = valloc(10);
    SHOW("valloc(10) page aligned", p && aligned(p, (size_t)page));
    free(p);
    p = pvalloc(10);
    SHOW("pvalloc(10) page aligned, a whole page", p && aligned(p, (size_t)page) && malloc_usable_size(p) >= (size_t)page);
    free(p);

    /* malloc_usable_size */
    printf("%-44s %zu\n", "malloc_usable_size(NULL)", malloc_usable_size(NULL));
    p = malloc(1000);
    size_t u = malloc_usable_size(p);
    memset(p, 3, u);
    SHOW("usable size is usable", u >= 1000);
    free(p);

    /* strdup, asprintf, getline: libc's own allocations, freed by the program */
    char *s = strdup("nolock");
    SHOW("strdup", s && strcmp(s, "nolock") == 0);
    free(s);
    char *a = NULL;
    rc = asprintf(&a, "%s-%d", "x", 42);
    SHOW("asprintf", rc == 4 && strcmp(a, "x-42") == 0);
    free(a);
    FILE *f = fopen("/proc/self/status", "r");
    char *line = NULL;
    size_t cap = 0;
    int lines = 0;
    while (f && getline(&line, &cap, f) > 0) lines++;
    SHOW("getline over /proc/self/status", lines > 5);
    free(line);
    if (f) fclose(f);
    return 0;
}
