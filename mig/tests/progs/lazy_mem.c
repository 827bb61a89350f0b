// Test program for mig/tests/pages.rs (lazy restore).
//   lazy_mem OUT MIB [THREADS]
// Fills MIB MiB of anonymous memory (two mappings: the second, with
// MADV_NOHUGEPAGE, starts 3 pages past MIB/8 MiB), a heap buffer and a
// stack array with a pattern, appends "filled <addr>" to OUT, sleeps in
// 5 ms steps. Signals ask for work, each answered by a line in OUT:
//   SIGUSR1  check every page: "verified ok <ms>" or "verified BAD ...";
//            pages discarded by SIGUSR2 must read as zeros.
//   SIGUSR2  madvise(MADV_DONTNEED) the second quarter: "dontneed done".
//   SIGHUP   map, fill, check and unmap 64 MiB more, malloc and free:
//            "alloc ok" or "alloc BAD".
//   SIGALRM  mremap the last quarter elsewhere, 1 MiB longer (the tail must
//            read as zeros), check the first half of what moved: "moved ok"
//            or "moved BAD ..."; later checks look for it there.
//   SIGWINCH fork a child that checks every page as SIGUSR1 would and
//            appends "child ok" or "child BAD ..."; the parent waits for it.
// With THREADS > 0, SIGUSR1's check is split between that many threads
// (started before the first line), which fault at the same time.
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t want_check, want_drop, want_alloc, want_move, want_fork;
static void on_sig(int s) {
    if (s == SIGUSR1) want_check = 1;
    if (s == SIGUSR2) want_drop = 1;
    if (s == SIGHUP) want_alloc = 1;
    if (s == SIGALRM) want_move = 1;
    if (s == SIGWINCH) want_fork = 1;
}

static uint64_t pat(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ (i >> 7) ^ 0x5a5a; }

// The threaded check: each worker takes slice k of the region when `gen`
// moves on, and adds the first bad index it finds (or n) to `found`.
static uint64_t *region;
static size_t region_n, nthreads;
static volatile int gen;
static size_t done_count, bad_count;

static void *worker(void *arg) {
    size_t k = (size_t)arg, seen = 0;
    volatile uint64_t scratch[512];
    for (size_t i = 0; i < 512; i++) scratch[i] = pat(i) + k;
    for (;;) {
        int g = __atomic_load_n(&gen, __ATOMIC_ACQUIRE);
        if ((size_t)g != seen) {
            seen = (size_t)g;
            size_t lo = region_n / nthreads * k, hi = k + 1 == nthreads ? region_n : region_n / nthreads * (k + 1);
            size_t bad = 0;
            for (size_t i = lo; i < hi; i++)
                if (region[i] != pat(i)) bad++;
            for (size_t i = 0; i < 512; i++)
                if (scratch[i] != pat(i) + k) bad++;
            __atomic_add_fetch(&bad_count, bad, __ATOMIC_RELEASE);
            __atomic_add_fetch(&done_count, 1, __ATOMIC_RELEASE);
        }
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

// The first word of the region that is not what it should be (n: none):
// the pattern, zeros where discarded, the moved part at its new place.
static size_t first_bad(uint64_t *p, size_t n, int dropped, size_t d0, size_t d1, uint64_t *moved,
                        size_t m0) {
    for (size_t i = 0; i < n; i++) {
        uint64_t want = dropped && i >= d0 && i < d1 ? 0 : pat(i);
        uint64_t got = moved && i >= m0 ? moved[i - m0] : p[i];
        if (got != want) return i;
    }
    return n;
}

static uint64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static int alloc_more(void) {
    size_t n = (64u << 20) / 8;
    uint64_t *q = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED) return 0;
    for (size_t i = 0; i < n; i++) q[i] = pat(i + 7);
    int ok = 1;
    for (size_t i = 0; i < n; i++)
        if (q[i] != pat(i + 7)) ok = 0;
    munmap(q, n * 8);
    for (int k = 0; k < 100; k++) {
        char *m = malloc(1000 + k * 997);
        if (!m) return 0;
        memset(m, k, 1000 + k * 997);
        free(m);
    }
    return ok;
}

int main(int argc, char **argv) {
    // The test runner may leak descriptors (cargo's jobserver pipe).
    syscall(SYS_close_range, 3, ~0U, 0);
    if (argc < 3) return 2;
    size_t n = (size_t)atol(argv[2]) << 20 >> 3;
    uint64_t *p = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    for (size_t i = 0; i < n; i++) p[i] = pat(i);
    // Two mappings, not one: from 3 pages past its first eighth on, the
    // region has MADV_NOHUGEPAGE, so one run of the original's pages
    // spans a mapping boundary (here and in the copy).
    size_t split = n * 8 / 8 + 3 * 4096;
    if (madvise((char *)p + split, n * 8 - split, MADV_NOHUGEPAGE) != 0) return 3;
    size_t hn = 50000;
    uint64_t *heap = malloc(hn * 8);
    if (!heap) return 3;
    for (size_t i = 0; i < hn; i++) heap[i] = pat(i) + 1;
    volatile uint64_t stack[2048];
    for (size_t i = 0; i < 2048; i++) stack[i] = pat(i) + 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    sigaction(SIGWINCH, &sa, NULL);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return 4;
    region = p;
    region_n = n;
    nthreads = argc > 3 ? (size_t)atol(argv[3]) : 0;
    for (size_t k = 0; k < nthreads; k++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)k) != 0) return 5;
    }
    // The discarded quarter, once SIGUSR2 came.
    size_t d0 = n / 4, d1 = n / 2;
    int dropped = 0;
    // The moved quarter, once SIGALRM came.
    size_t m0 = n / 4 * 3;
    uint64_t *moved = NULL;
    dprintf(fd, "filled %p\n", (void *)p);
    for (;;) {
        if (want_drop) {
            want_drop = 0;
            madvise(p + d0, (d1 - d0) * 8, MADV_DONTNEED);
            dropped = 1;
            dprintf(fd, "dontneed done\n");
        }
        if (want_move && !moved) {
            want_move = 0;
            size_t len = (n - m0) * 8, extra = 1 << 20;
            void *at = mmap(NULL, len + extra, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            moved = mremap(p + m0, len, len + extra, MREMAP_MAYMOVE | MREMAP_FIXED, at);
            size_t bad = n;
            for (size_t i = m0; i < m0 + (n - m0) / 2 && bad == n; i++)
                if (moved[i - m0] != pat(i)) bad = i;
            for (size_t i = 0; i < extra / 8 && bad == n; i++)
                if (moved[n - m0 + i] != 0) bad = n + i;
            if (moved == MAP_FAILED || bad != n)
                dprintf(fd, "moved BAD at %zu\n", bad);
            else
                dprintf(fd, "moved ok\n");
        }
        if (want_check && nthreads > 0) {
            want_check = 0;
            uint64_t t0 = now_ms();
            __atomic_store_n(&done_count, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&bad_count, 0, __ATOMIC_RELEASE);
            __atomic_add_fetch(&gen, 1, __ATOMIC_RELEASE);
            while (__atomic_load_n(&done_count, __ATOMIC_ACQUIRE) < nthreads) {
                struct timespec ts = {0, 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            size_t bad = __atomic_load_n(&bad_count, __ATOMIC_ACQUIRE);
            if (bad == 0)
                dprintf(fd, "verified ok %llu\n", (unsigned long long)(now_ms() - t0));
            else
                dprintf(fd, "verified BAD %zu words\n", bad);
        }
        if (want_check) {
            want_check = 0;
            uint64_t t0 = now_ms();
            size_t bad = first_bad(p, n, dropped, d0, d1, moved, m0);
            size_t hbad = hn, sbad = 2048;
            for (size_t i = 0; i < hn && hbad == hn; i++)
                if (heap[i] != pat(i) + 1) hbad = i;
            for (size_t i = 0; i < 2048 && sbad == 2048; i++)
                if (stack[i] != pat(i) + 2) sbad = i;
            if (bad == n && hbad == hn && sbad == 2048)
                dprintf(fd, "verified ok %llu\n", (unsigned long long)(now_ms() - t0));
            else
                dprintf(fd, "verified BAD at %zu (got %llx) heap %zu stack %zu\n", bad,
                        bad < n && !(moved && bad >= m0) ? (unsigned long long)p[bad] : 0ULL, hbad, sbad);
        }
        if (want_fork) {
            want_fork = 0;
            pid_t c = fork();
            if (c == 0) {
                size_t bad = first_bad(p, n, dropped, d0, d1, moved, m0);
                if (bad == n)
                    dprintf(fd, "child ok\n");
                else
                    dprintf(fd, "child BAD at %zu\n", bad);
                _exit(0);
            }
            if (c < 0) dprintf(fd, "child BAD fork\n");
            else waitpid(c, NULL, 0);
        }
        if (want_alloc) {
            want_alloc = 0;
            dprintf(fd, alloc_more() ? "alloc ok\n" : "alloc BAD\n");
        }
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
