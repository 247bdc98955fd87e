/* A shared library with thread-locals, dlopened many times over (under different names) by dlopen_tls.c. */
__thread char nolock_test_big[4096];
__thread int nolock_test_counter;

int touch(void) {
    nolock_test_big[nolock_test_counter % 4096]++;
    return ++nolock_test_counter;
}
