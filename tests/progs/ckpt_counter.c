// Checkpoint test program: appends "N\n" to argv[1] every 10 ms through
// fd 7 (O_WRONLY|O_APPEND|O_CLOEXEC), kept open. argv[2], if given, is a
// process name to set with prctl(PR_SET_NAME).
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (argc > 2) prctl(PR_SET_NAME, argv[2]);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0 || fcntl(fd, F_DUPFD_CLOEXEC, 7) != 7) return 3;
    close(fd);
    for (long i = 0;; i++) {
        char b[32];
        int n = snprintf(b, sizeof b, "%ld\n", i);
        if (write(7, b, n) != n) return 4;
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
}
