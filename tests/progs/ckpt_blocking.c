// Checkpoint test program: makes one blocking call and reports how it
// returned: "rc=<rc> errno=<errno> elapsed_ms=<ms>" to argv[1], then idles.
//   nanosleep MS  nanosleep(MS, &rem)
//   poll MS       poll(NULL, 0, MS)
//   setlkw PATH   fcntl(F_SETLKW) write lock on PATH (held by someone else)
//   hold PATH     takes a write lock on PATH with F_SETLK and idles
//   flock PATH    takes flock(LOCK_EX | LOCK_NB) on PATH and idles
//   read PATH     read() PATH whole, again and again for 3 s; reports the
//                 first short or failed read, else rc=<reads>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    dprintf(out, "start\n");
    long t0 = now_ms();
    long rc = -1;
    errno = 0;
    if (strcmp(argv[2], "nanosleep") == 0) {
        long ms = atol(argv[3]);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000}, rem;
        rc = nanosleep(&ts, &rem);
    } else if (strcmp(argv[2], "poll") == 0) {
        rc = poll(NULL, 0, atoi(argv[3]));
    } else if (strcmp(argv[2], "setlkw") == 0) {
        int fd = open(argv[3], O_RDWR);
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
        rc = fcntl(fd, F_SETLKW, &fl);
    } else if (strcmp(argv[2], "hold") == 0) {
        int fd = open(argv[3], O_RDWR);
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
        rc = fcntl(fd, F_SETLK, &fl);
    } else if (strcmp(argv[2], "flock") == 0) {
        int fd = open(argv[3], O_RDWR);
        rc = flock(fd, LOCK_EX | LOCK_NB);
    } else if (strcmp(argv[2], "read") == 0) {
        int fd = open(argv[3], O_RDONLY);
        struct stat st;
        fstat(fd, &st);
        char *buf = malloc(st.st_size);
        for (rc = 0; now_ms() - t0 < 3000; rc++) {
            ssize_t n = pread(fd, buf, st.st_size, 0);
            if (n != st.st_size) {
                rc = n;
                break;
            }
        }
    }
    int e = errno;
    dprintf(out, "rc=%ld errno=%d elapsed_ms=%ld\n", rc, e, now_ms() - t0);
    for (;;) pause();
}
