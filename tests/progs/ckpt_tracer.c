// Test helper: ptrace-seizes argv[1] and sleeps, so the process is
// "ptraced by" us. Prints "ready" once attached.
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (ptrace(PTRACE_SEIZE, atoi(argv[1]), 0, 0) != 0) return 3;
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
