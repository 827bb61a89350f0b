// Checkpoint test and benchmark program: fills argv[2] MiB of anonymous
// memory with a pattern, appends "filled" to argv[1], then appends a
// heartbeat "beat <monotonic ns>" every 10 ms. On SIGUSR1 it checks the
// whole pattern and appends "verified ok" or "verified BAD at <index>".
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

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t n = (size_t)atol(argv[2]) << 20 >> 3;
    uint64_t *p = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    for (size_t i = 0; i < n; i++) p[i] = pat(i);
    signal(SIGUSR1, on_usr1);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    dprintf(fd, "filled\n");
    for (;;) {
        if (check) {
            check = 0;
            size_t bad = n;
            for (size_t i = 0; i < n && bad == n; i++)
                if (p[i] != pat(i)) bad = i;
            if (bad == n)
                dprintf(fd, "verified ok\n");
            else
                dprintf(fd, "verified BAD at %zu\n", bad);
        }
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        dprintf(fd, "beat %lld\n", (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
