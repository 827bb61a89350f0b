// Move test and benchmark program: fills argv[2] MiB of anonymous memory
// with a pattern, appends "filled" to argv[1], then every 10 ms appends
// "beat <monotonic ns>" and checks argv[3] (default 0) pages chosen at
// random against the pattern (touching memory at random right after a
// lazy move). On SIGUSR1 it checks every page and appends
// "verified ok <ms>" or "verified BAD at <index>"; a random check that
// fails appends "random BAD at <index>" and exits 1. argv[4] (default 0)
// is a rate in MB/s at which it rewrites whole pages chosen at random
// (each page's generation counter, kept in its own memory, says what the
// page must hold): the dirtying a pre-copy has to keep up with.
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t check;
static void on_usr1(int s) {
    (void)s;
    check = 1;
}

static uint64_t pat(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ (i >> 7) ^ 0x5a5a; }

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t n = (size_t)atol(argv[2]) << 20 >> 3;
    long random_pages = argc > 3 ? atol(argv[3]) : 0;
    double dirty_mbs = argc > 4 ? atof(argv[4]) : 0;
    uint64_t *p = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    for (size_t i = 0; i < n; i++) p[i] = pat(i);
    signal(SIGUSR1, on_usr1);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return 4;
    size_t per_page = 4096 / 8, pages = n / per_page;
    uint32_t *gen = calloc(pages ? pages : 1, sizeof *gen);
    if (!gen) return 5;
    dprintf(fd, "filled\n");
    uint64_t seed = now_ns() | 1;
    long dirty_per_tick = (long)(dirty_mbs * 1e6 / 100 / 4096);
#define WANT(i) (pat(i) ^ ((uint64_t)gen[(i) / per_page] << 32))
    for (;;) {
        dprintf(fd, "beat %llu\n", (unsigned long long)now_ns());
        for (long k = 0; k < random_pages && pages > 0; k++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            size_t i = (seed % pages) * per_page + (seed >> 40) % per_page;
            if (p[i] != WANT(i)) {
                dprintf(fd, "random BAD at %zu\n", i);
                return 1;
            }
        }
        for (long k = 0; k < dirty_per_tick && pages > 0; k++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            size_t pg = seed % pages;
            gen[pg]++;
            for (size_t j = pg * per_page; j < (pg + 1) * per_page; j++) p[j] = WANT(j);
        }
        if (check) {
            check = 0;
            uint64_t t0 = now_ns();
            size_t bad = n;
            for (size_t i = 0; i < n; i++)
                if (p[i] != WANT(i)) {
                    bad = i;
                    break;
                }
            if (bad == n)
                dprintf(fd, "verified ok %.1f\n", (double)(now_ns() - t0) / 1e6);
            else
                dprintf(fd, "verified BAD at %zu\n", bad);
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
}
