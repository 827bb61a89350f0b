// A process with no private anonymous memory (for `migfs restore --lazy`
// refusing an image with nothing lazy). Built with -nostdlib -static
// -no-pie: it moves its stack to a shared anonymous mapping, discards
// the stack the kernel made (munmap), and waits in
// pause() forever. Its one initialised global puts a writable private
// file mapping (.data) first, where a checkpoint borrows scratch bytes.
// x86-64 only.
#include <sys/mman.h>
#include <sys/syscall.h>

static long sc(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

volatile long data_page[16] = {1};

__attribute__((noreturn, used)) void run(unsigned long old_sp) {
    unsigned long page = old_sp & ~0xfffUL;
    sc(SYS_munmap, (long)(page - (1UL << 20)), 2L << 20, 0);
    for (;;) sc(SYS_pause, data_page[0], 0, 0);
}

__attribute__((naked, noreturn)) void _start(void) {
    __asm__ volatile(
        "mov %rsp, %r12\n"
        "mov $9, %eax\n"        // mmap(NULL, 64 KiB, RW, MAP_SHARED|MAP_ANONYMOUS, -1, 0)
        "xor %edi, %edi\n"
        "mov $65536, %esi\n"
        "mov $3, %edx\n"
        "mov $0x21, %r10d\n"
        "mov $-1, %r8\n"
        "xor %r9d, %r9d\n"
        "syscall\n"
        "lea 65536(%rax), %rsp\n"
        "mov %r12, %rdi\n"
        "call run\n");
}
