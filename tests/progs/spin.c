/* A CPU-bound task for the balancer tests:
 *
 *   spin STOP OUT ITERS SEED [MEM_MIB [pipe]]
 *
 * Steps a 64-bit LCG in units of ITERS steps from SEED until the file STOP
 * exists (checked after every unit), then writes to OUT
 * "units U value X sum S mem ok|BAD": U units done, X the LCG's state, S
 * the wrapping sum of its state after each unit; the test recomputes X and
 * S with LCG jumps, so a task whose registers or memory a move damaged is
 * caught. With MEM_MIB it first fills that much memory with a pattern
 * and checks it at the end; with `pipe` it holds a pipe open, which makes
 * it a process migfs refuses to move. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define A 6364136223846793005ULL
#define C 1442695040888963407ULL

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: spin STOP OUT ITERS SEED [MEM_MIB [pipe]]\n");
        return 2;
    }
    const char *stop = argv[1], *out = argv[2];
    uint64_t iters = strtoull(argv[3], 0, 10);
    uint64_t x = strtoull(argv[4], 0, 10), sum = 0, units = 0;
    size_t mem = argc > 5 ? strtoull(argv[5], 0, 10) << 20 : 0;
    int fds[2];
    if (argc > 6 && strcmp(argv[6], "pipe") == 0 && pipe(fds) != 0) {
        perror("pipe");
        return 1;
    }
    unsigned char *buf = mem ? malloc(mem) : 0;
    if (mem && !buf) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < mem; i++)
        buf[i] = (unsigned char)(i * 7 + 3);
    for (;;) {
        for (uint64_t i = 0; i < iters; i++)
            x = x * A + C;
        units++;
        sum += x;
        if (access(stop, F_OK) == 0)
            break;
    }
    int mem_ok = 1;
    for (size_t i = 0; i < mem; i++)
        if (buf[i] != (unsigned char)(i * 7 + 3))
            mem_ok = 0;
    FILE *f = fopen(out, "w");
    if (!f) {
        perror(out);
        return 1;
    }
    fprintf(f, "units %llu value %llu sum %llu mem %s\n", (unsigned long long)units,
            (unsigned long long)x, (unsigned long long)sum, mem_ok ? "ok" : "BAD");
    return fclose(f) ? 1 : 0;
}
