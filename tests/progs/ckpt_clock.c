// Checkpoint test program: calls clock_gettime (MONOTONIC, REALTIME) and
// gettimeofday (vDSO) in a loop; every 10 ms appends "<i> ok" to argv[1],
// or "<i> BAD ..." when time went backwards or the clocks disagree.
#include <fcntl.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    long long last = 0;
    for (long i = 0;; i++) {
        struct timespec m, r;
        struct timeval tv;
        clock_gettime(CLOCK_MONOTONIC, &m);
        clock_gettime(CLOCK_REALTIME, &r);
        gettimeofday(&tv, NULL);
        long long mono = m.tv_sec * 1000000000LL + m.tv_nsec;
        long long diff = (long long)r.tv_sec * 1000000 + r.tv_nsec / 1000 - ((long long)tv.tv_sec * 1000000 + tv.tv_usec);
        if (mono < last || diff > 100000 || diff < -100000)
            dprintf(fd, "%ld BAD mono=%lld last=%lld diff_us=%lld\n", i, mono, last, diff);
        else
            dprintf(fd, "%ld ok\n", i);
        last = mono;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
