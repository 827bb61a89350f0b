// Checkpoint test program: a SIGUSR1 handler counts; SIGUSR2 is blocked.
// Every 10 ms appends "c=<count> blocked=<0|1> pending=<0|1>" to argv[1].
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t count;

static void on_usr1(int sig) {
    (void)sig;
    count++;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, NULL);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (;;) {
        sigset_t cur, pend;
        sigprocmask(SIG_BLOCK, NULL, &cur);
        sigpending(&pend);
        dprintf(fd, "c=%d blocked=%d pending=%d\n", (int)count, sigismember(&cur, SIGUSR2), sigismember(&pend, SIGUSR2));
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
