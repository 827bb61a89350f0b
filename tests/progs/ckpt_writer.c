// Pre-copy test program: fills argv[2] MiB of anonymous memory with
// generation 0 of a pattern, appends "filled" to argv[1], then sweeps the
// buffer forever, writing generation g into every word (sleeping 1 ms
// every 256 KiB: ~250 MB/s of writes, so pre-copy rounds race it), and g
// goes up after each sweep. On SIGUSR1 (seen between two steps) it checks
// every word: below its sweep position generation g, from there on g-1;
// appends "verified ok gen G at K" or "verified BAD at I (gen G at K)".
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

static uint64_t pat(uint64_t g, uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ (g << 40) ^ 0x5a5a; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t n = (size_t)atol(argv[2]) << 20 >> 3;
    uint64_t *p = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    for (size_t i = 0; i < n; i++) p[i] = pat(0, i);
    signal(SIGUSR1, on_usr1);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    dprintf(fd, "filled\n");
    const size_t step = (256 << 10) / 8;
    for (uint64_t g = 1;; g++) {
        for (size_t k = 0; k < n; k += step) {
            if (check) {
                check = 0;
                size_t bad = n;
                for (size_t i = 0; i < n && bad == n; i++)
                    if (p[i] != pat(i < k ? g : g - 1, i)) bad = i;
                if (bad == n)
                    dprintf(fd, "verified ok gen %llu at %zu\n", (unsigned long long)g, k);
                else
                    dprintf(fd, "verified BAD at %zu (gen %llu at %zu)\n", bad, (unsigned long long)g, k);
            }
            size_t end = k + step < n ? k + step : n;
            for (size_t i = k; i < end; i++) p[i] = pat(g, i);
            struct timespec ts = {0, 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
}
