// Checkpoint test program: interval timers. ITIMER_REAL every 2 ms (so it
// always fires while the process is frozen, SIGALRM left pending) and
// ITIMER_PROF every 10 ms of CPU; their SIGALRM / SIGPROF handlers count.
// Every 10 ms of busy work appends
// "alrm=<n> prof=<n> real_us=<interval> prof_us=<interval>" to argv[1].
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t alrm, prof;

static void on_alrm(int sig) { (void)sig; alrm++; }
static void on_prof(int sig) { (void)sig; prof++; }

static long us(const struct timeval *tv) { return tv->tv_sec * 1000000L + tv->tv_usec; }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    struct sigaction sa = {.sa_handler = on_alrm, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_prof;
    sigaction(SIGPROF, &sa, NULL);
    struct itimerval real = {{0, 2000}, {0, 2000}};
    struct itimerval cpu = {{0, 10000}, {0, 10000}};
    setitimer(ITIMER_REAL, &real, NULL);
    setitimer(ITIMER_PROF, &cpu, NULL);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (;;) {
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
            clock_gettime(CLOCK_MONOTONIC, &t);
        } while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 10000000L);
        struct itimerval r, p;
        getitimer(ITIMER_REAL, &r);
        getitimer(ITIMER_PROF, &p);
        dprintf(fd, "alrm=%d prof=%d real_us=%ld prof_us=%ld\n", (int)alrm, (int)prof,
                us(&r.it_interval), us(&p.it_interval));
    }
}
