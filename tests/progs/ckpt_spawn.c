// Test helper for tests/tests/checkpoint.rs.
//   ckpt_spawn exec CMD ARGS...  closes every descriptor above 2 (the
//                                test runner may hold pipes) and runs CMD.
//   ckpt_spawn reap CMD ARGS...  the same in a child, as a child subreaper:
//                                after CMD exits, closes its own stdout and
//                                stderr and reaps every descendant CMD left
//                                behind (a process `migfs restore` started)
//                                until none is left; exits with CMD's status.
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void run(char **argv) {
    syscall(SYS_close_range, 3, ~0U, 0);
    execvp(argv[0], argv);
    _exit(127);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    if (strcmp(argv[1], "exec") == 0) run(argv + 2);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) return 3;
    pid_t c = fork();
    if (c < 0) return 4;
    if (c == 0) run(argv + 2);
    int status, rc = 0;
    if (waitpid(c, &status, 0) == c) rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    close(1);
    close(2);
    while (wait(NULL) > 0 || errno == EINTR) {
    }
    return rc;
}
