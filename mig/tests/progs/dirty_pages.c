// Test program for mig/tests/pages.rs (dirty tracking).
//   dirty_pages OUT CMD
// Maps 64 pages, writes the first 32 (the others stay untouched), appends
// "region <addr>" to OUT and then only sleeps. On SIGUSR1 it reads CMD,
// whose lines are "w I" (add 1 to the first byte of page I) or "d I"
// (madvise(MADV_DONTNEED) page I), does them in order and appends
// "done <n>" (n counts the SIGUSR1s handled).
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGES 64
static volatile sig_atomic_t go;
static void on_usr1(int s) {
    (void)s;
    go = 1;
}

int main(int argc, char **argv) {
    // The test runner may leak descriptors (cargo's jobserver pipe).
    syscall(SYS_close_range, 3, ~0U, 0);
    if (argc < 3) return 2;
    long pg = sysconf(_SC_PAGESIZE);
    char *p = mmap(NULL, PAGES * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    // Keep the region one mapping of its own (no merge with neighbours).
    madvise(p, PAGES * pg, MADV_NOHUGEPAGE);
    for (int i = 0; i < PAGES / 2; i++) p[i * pg] = (char)i;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out < 0) return 4;
    dprintf(out, "region %p\n", (void *)p);
    int n = 0;
    for (;;) {
        if (go) {
            go = 0;
            char buf[4096];
            int fd = open(argv[2], O_RDONLY);
            ssize_t len = fd >= 0 ? read(fd, buf, sizeof buf - 1) : 0;
            if (fd >= 0) close(fd);
            buf[len > 0 ? len : 0] = 0;
            for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
                int i = atoi(line + 2);
                if (i < 0 || i >= PAGES) continue;
                if (line[0] == 'w') p[i * pg] += 1;
                if (line[0] == 'd') madvise(p + i * pg, pg, MADV_DONTNEED);
            }
            dprintf(out, "done %d\n", ++n);
        }
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
