/*
 * Loopback TCP from memory to memory, one stream or several at once
 * (docs/benchmarks.md, "Session 13"). A forked sender fills SIZE MiB of
 * fresh anonymous memory; the receiver's SIZE MiB is populated before
 * the clock starts (MADV_DONTFORK, so the fork does not make it
 * copy-on-write). Each of N streams carries SIZE/N bytes: one sender and
 * one receiver thread per stream.
 *
 *   gcc -O2 -pthread tcp-streams.c -o tcp-streams
 *   ./tcp-streams SIZE_MIB N        memory to memory, N streams
 *   ./tcp-streams SIZE_MIB 1 hot    the bench's floor: a 1 MiB buffer each side
 *   ./tcp-streams SIZE_MIB 2 copy   stream 1 copies each 4 MiB into a buffer
 *                                   first (a page server's process_vm_readv)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PIECE (4 << 20)
static size_t size, slice;
static int streams, hot, copy;
static char *src, *dst;
static int socks[16];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void send_all(int s, const char *p, size_t len) {
    while (len) {
        ssize_t n = send(s, p, len, 0);
        if (n <= 0) { perror("send"); exit(1); }
        p += n;
        len -= (size_t)n;
    }
}

static void *sender(void *arg) {
    long i = (long)arg;
    char *base = src + i * slice, *buf = malloc(PIECE);
    for (size_t done = 0; done < slice;) {
        size_t len = slice - done < PIECE ? slice - done : PIECE;
        if (hot) {
            len = len < (1 << 20) ? len : (1 << 20);
            send_all(socks[i], src, len);
        } else if (copy && i == 1) {
            memcpy(buf, base + done, len);
            send_all(socks[i], buf, len);
        } else {
            send_all(socks[i], base + done, len);
        }
        done += len;
    }
    return NULL;
}

static void *receiver(void *arg) {
    long i = (long)arg;
    char *base = dst + i * slice;
    for (size_t done = 0; done < slice;) {
        size_t want = slice - done < PIECE ? slice - done : PIECE;
        ssize_t n = recv(socks[i], hot ? dst : base + done, want, 0);
        if (n <= 0) { perror("recv"); exit(1); }
        done += (size_t)n;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s SIZE_MIB N [hot|copy]\n", argv[0]); return 2; }
    size = (size_t)atoi(argv[1]) << 20;
    streams = atoi(argv[2]);
    if (streams < 1 || streams > 16) return 2;
    hot = argc > 3 && !strcmp(argv[3], "hot");
    copy = argc > 3 && !strcmp(argv[3], "copy");
    slice = size / streams;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t al = sizeof a;
    if (bind(l, (void *)&a, sizeof a) || getsockname(l, (void *)&a, &al) || listen(l, 16)) {
        perror("listen");
        return 1;
    }
    dst = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    madvise(dst, size, MADV_DONTFORK);
    memset(dst, 1, size);
    int go[2];
    if (pipe(go)) return 1;
    pid_t child = fork();
    if (!child) {
        src = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(src, 7, size);
        for (int i = 0; i < streams; i++) {
            socks[i] = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(socks[i], (void *)&a, sizeof a)) { perror("connect"); exit(1); }
        }
        char x;
        if (read(go[0], &x, 1) != 1) exit(1);
        pthread_t t[16];
        for (long i = 0; i < streams; i++) pthread_create(&t[i], 0, sender, (void *)i);
        for (int i = 0; i < streams; i++) pthread_join(t[i], 0);
        exit(0);
    }
    for (int i = 0; i < streams; i++) socks[i] = accept(l, 0, 0);
    if (write(go[1], "x", 1) != 1) return 1;
    double t0 = now();
    pthread_t t[16];
    for (long i = 0; i < streams; i++) pthread_create(&t[i], 0, receiver, (void *)i);
    for (int i = 0; i < streams; i++) pthread_join(t[i], 0);
    double ms = now() - t0;
    waitpid(child, 0, 0);
    printf("%zu MiB, %d stream(s)%s: %.1f ms (%.0f MB/s)\n", size >> 20, streams,
           hot ? ", 1 MiB buffers" : copy ? ", stream 1 copies first" : "", ms, size / ms / 1e3);
    return 0;
}
