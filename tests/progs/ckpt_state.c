// Checkpoint test program: process state that must come back.
//   umask 027, cwd argv[2], RLIMIT_NOFILE 777/4096, name "ckpt-state",
//   fd 9 /dev/null, fd 10 the directory argv[2], fd 11 argv[3] read-only
//   at offset 5 and fd 12 a dup of it (shared offset), fd 13 argv[4]
//   opened read-write with a POSIX write lock on bytes 0-9, fd 14 argv[5]
//   with a shared flock.
// Appends "beat" to argv[1] every 10 ms; on SIGUSR1 reads one byte through
// fd 11 and appends "shared offset <pos of fd 12>".
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t probe;
static void on_usr1(int s) {
    (void)s;
    probe = 1;
}

static void at(int fd, int want) {
    if (fd != want) {
        dup2(fd, want);
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc < 6) return 2;
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    umask(027);
    if (chdir(argv[2])) return 3;
    struct rlimit rl = {777, 4096};
    if (setrlimit(RLIMIT_NOFILE, &rl)) return 4;
    prctl(PR_SET_NAME, "ckpt-state");
    at(open("/dev/null", O_RDWR), 9);
    at(open(argv[2], O_RDONLY | O_DIRECTORY), 10);
    at(open(argv[3], O_RDONLY), 11);
    lseek(11, 5, SEEK_SET);
    dup2(11, 12);
    at(open(argv[4], O_RDWR), 13);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
    if (fcntl(13, F_SETLK, &fl)) return 5;
    at(open(argv[5], O_RDONLY), 14);
    if (flock(14, LOCK_SH)) return 6;
    signal(SIGUSR1, on_usr1);
    for (;;) {
        if (probe) {
            probe = 0;
            char c;
            if (read(11, &c, 1) == 1) dprintf(out, "shared offset %ld\n", (long)lseek(12, 0, SEEK_CUR));
        }
        dprintf(out, "beat\n");
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
