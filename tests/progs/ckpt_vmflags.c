// Checkpoint test program: mappings with VmFlags that /proc/PID/maps does
// not show. Three anonymous mappings of 16 pages, written: one
// madvise(MADV_DONTFORK), one madvise(MADV_WIPEONFORK), one mlock()ed.
// Writes "dontfork <addr> wipeonfork <addr> locked <addr>" (hex) to argv[1],
// then appends "beat" every 10 ms.
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static char *region(void) {
    char *p = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    memset(p, 0x5a, 16 * 4096);
    return p;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    char *a = region(), *b = region(), *c = region();
    if (!a || !b || !c) return 3;
    if (madvise(a, 16 * 4096, MADV_DONTFORK)) return 4;
    if (madvise(b, 16 * 4096, MADV_WIPEONFORK)) return 5;
    if (mlock(c, 16 * 4096)) return 6;
    FILE *out = fopen(argv[1], "a");
    if (!out) return 7;
    fprintf(out, "dontfork %lx wipeonfork %lx locked %lx\n", (unsigned long)a, (unsigned long)b,
            (unsigned long)c);
    fflush(out);
    for (;;) {
        fprintf(out, "beat\n");
        fflush(out);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
