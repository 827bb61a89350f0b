// Checkpoint test program: maps argv[1] (16 KiB) MAP_SHARED read-write and
// every 10 ms increments the counter in its first 8 bytes, appending the
// new value to argv[2].
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
    if (ftruncate(fd, 16384)) return 3;
    volatile uint64_t *p = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return 4;
    close(fd);
    int log = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (;;) {
        p[0]++;
        dprintf(log, "%llu\n", (unsigned long long)p[0]);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
