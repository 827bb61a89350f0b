// Checkpoint test program: appends "N\n" to argv[1] every 10 ms through
// fd 7 (O_WRONLY|O_APPEND), unlinking the file first when argv[2] is
// "unlink". SIGUSR2 makes it stop writing, SIGUSR1 go on: so an image
// taken with --leave-running while it is quiet still matches the file.
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t quiet;
static void on_sig(int s) { quiet = s == SIGUSR2; }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0 || dup2(fd, 7) != 7) return 3;
    close(fd);
    if (argc > 2 && strcmp(argv[2], "unlink") == 0 && unlink(argv[1]) != 0) return 4;
    signal(SIGUSR1, on_sig);
    signal(SIGUSR2, on_sig);
    for (long i = 0;;) {
        if (!quiet) {
            char b[32];
            int n = snprintf(b, sizeof b, "%ld\n", i++);
            if (write(7, b, n) != n) return 5;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
