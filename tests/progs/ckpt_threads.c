// Checkpoint test program: 4 threads, each counting in thread-local
// storage, append "t<k> <count> rseq=<0|1> robust=<0|1>" every 10 ms to
// argv[1] (rseq=1: glibc's rseq area is still registered for this thread;
// robust=1: the robust futex list is still glibc's). The main thread,
// every 50 ms, starts a thread that mallocs, and joins it ("spawn <n> ok"),
// checks its alternate signal stack ("alt=<0|1>"), and when <argv[1]>.stop
// exists asks thread t0 to exit and joins it ("joined t0").
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static __thread long counter;
static int out;
static volatile int stop0;
static char stopfile[4096];

static int rseq_registered(void) {
    struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    // glibc registers at least 32 bytes; __rseq_size may say less (the
    // size of the fields it uses).
    unsigned len = __rseq_size < 32 ? 32 : __rseq_size;
    long rc = syscall(SYS_rseq, rs, len, 0, RSEQ_SIG);
    return rc == -1 && errno == EBUSY;
}

static int robust_ok(void *want) {
    void *head;
    size_t len;
    syscall(SYS_get_robust_list, 0, &head, &len);
    return head == want;
}

static void *worker(void *arg) {
    int k = (int)(long)arg;
    void *head;
    size_t len;
    syscall(SYS_get_robust_list, 0, &head, &len);
    for (;;) {
        counter++;
        dprintf(out, "t%d %ld rseq=%d robust=%d\n", k, counter, rseq_registered(), robust_ok(head));
        if (k == 0 && stop0) return NULL;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static void *short_lived(void *arg) {
    char *p = malloc(1 << 20);
    memset(p, 7, 1 << 20);
    long s = p[12345];
    free(p);
    return (void *)s;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    snprintf(stopfile, sizeof stopfile, "%s.stop", argv[1]);
    static char altstack[64 * 1024];
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    sigaltstack(&ss, NULL);
    pthread_t t[4];
    for (long k = 0; k < 4; k++) pthread_create(&t[k], NULL, worker, (void *)k);
    int joined = 0;
    for (long n = 0;; n++) {
        pthread_t s;
        void *ret = NULL;
        int ok = pthread_create(&s, NULL, short_lived, NULL) == 0 && pthread_join(s, &ret) == 0 && (long)ret == 7;
        stack_t cur;
        sigaltstack(NULL, &cur);
        dprintf(out, "spawn %ld %s alt=%d\n", n, ok ? "ok" : "FAILED", cur.ss_sp == altstack && cur.ss_size == sizeof altstack);
        if (!joined && access(stopfile, F_OK) == 0) {
            stop0 = 1;
            pthread_join(t[0], NULL);
            dprintf(out, "joined t0\n");
            joined = 1;
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
