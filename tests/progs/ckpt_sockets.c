// Checkpoint test program holding things that cannot be moved: a pipe, a
// listening TCP socket on 127.0.0.1 and a connected pair, an io_uring
// instance, a pty master (/dev/ptmx, a device) and an eventfd. Appends a
// line to argv[1] every 10 ms so a test can see it keeps running.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int p[2];
    if (pipe(p) != 0) return 3;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4) || getsockname(l, (void *)&a, &len)) return 4;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a)) return 5;
    int s = accept(l, NULL, NULL);
    if (s < 0) return 6;
    char params[120];
    memset(params, 0, sizeof params);
    if (syscall(SYS_io_uring_setup, 4, params) < 0) return 7;
    if (open("/dev/ptmx", O_RDWR | O_NOCTTY) < 0) return 8;
    if (eventfd(0, 0) < 0) return 9;
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (long i = 0;; i++) {
        dprintf(fd, "%ld\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
