/* fsprobe DIR CHECK... : POSIX behaviour checks run on a migfs mount by the
 * end-to-end tests. Prints "ok CHECK" per passed check; on the first failed
 * assertion prints "FAIL CHECK line N: what (errno)" and exits 1. DIR must
 * exist and be empty-ish; each check works in DIR/CHECK. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static const char *cur;
#define CHECK(cond, what) do { if (!(cond)) { \
    printf("FAIL %s line %d: %s (errno %d %s)\n", cur, __LINE__, what, errno, strerror(errno)); \
    fflush(stdout); exit(1); } } while (0)
#define ERR(call, e, what) do { errno = 0; long r_ = (long)(call); \
    CHECK(r_ == -1 && errno == (e), what); } while (0)

static void put(const char *p, const char *s) {
    int fd = open(p, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    CHECK(fd >= 0, "create for put");
    CHECK(write(fd, s, strlen(s)) == (ssize_t)strlen(s), "write for put");
    CHECK(close(fd) == 0, "close for put");
}
static char *get(const char *p) {
    static char buf[1 << 16];
    int fd = open(p, O_RDONLY);
    CHECK(fd >= 0, "open for get");
    ssize_t n = read(fd, buf, sizeof buf - 1);
    CHECK(n >= 0, "read for get");
    buf[n] = 0; close(fd);
    return buf;
}

static void check_rw(void) {
    char buf[64];
    int fd = open("f", O_CREAT | O_EXCL | O_RDWR, 0644);
    CHECK(fd >= 0, "create O_EXCL");
    ERR(open("f", O_CREAT | O_EXCL | O_RDWR, 0644), EEXIST, "second O_EXCL create gives EEXIST");
    CHECK(write(fd, "hello world", 11) == 11, "write");
    CHECK(pread(fd, buf, 5, 6) == 5 && memcmp(buf, "world", 5) == 0, "pread sees written data");
    CHECK(close(fd) == 0, "close");
    fd = open("f", O_WRONLY | O_APPEND);
    CHECK(fd >= 0, "open O_APPEND");
    CHECK(lseek(fd, 0, SEEK_SET) == 0, "seek to 0");
    CHECK(write(fd, "!!", 2) == 2, "append write");
    close(fd);
    CHECK(strcmp(get("f"), "hello world!!") == 0, "append went to the end");
    fd = open("f", O_RDWR);
    CHECK(ftruncate(fd, 5) == 0, "ftruncate down");
    CHECK(ftruncate(fd, 8) == 0, "ftruncate up");
    CHECK(pread(fd, buf, 8, 0) == 8 && memcmp(buf, "hello\0\0\0", 8) == 0, "truncated tail reads as zeros");
    close(fd);
    CHECK(truncate("f", 2) == 0, "truncate by path");
    struct stat st; CHECK(stat("f", &st) == 0 && st.st_size == 2, "size after truncate");
    fd = open("f", O_RDWR);
    CHECK(fallocate(fd, 0, 0, 1 << 20) == 0, "fallocate mode 0");
    CHECK(fstat(fd, &st) == 0 && st.st_size == 1 << 20, "fallocate extends size");
    CHECK(pwrite(fd, "Z", 1, 3 << 20) == 1, "write past EOF leaves a hole");
    CHECK(pread(fd, buf, 4, (2 << 20)) == 4 && memcmp(buf, "\0\0\0\0", 4) == 0, "hole reads as zeros");
    CHECK(fsync(fd) == 0, "fsync");
    CHECK(fdatasync(fd) == 0, "fdatasync");
    close(fd);
    /* a larger file crossing many blocks, rewritten in the middle */
    fd = open("big", O_CREAT | O_RDWR, 0644);
    static char blk[300000];
    for (size_t i = 0; i < sizeof blk; i++) blk[i] = (char)(i * 7 + 3);
    for (int i = 0; i < 10; i++) CHECK(write(fd, blk, sizeof blk) == sizeof blk, "big write");
    CHECK(pwrite(fd, "XYZ", 3, 1000000) == 3, "overwrite inside");
    close(fd);
    fd = open("big", O_RDONLY);
    static char rb[300000];
    for (int i = 0; i < 10; i++) {
        CHECK(read(fd, rb, sizeof rb) == sizeof rb, "big read");
        for (size_t j = 0; j < sizeof rb; j++) {
            size_t off = (size_t)i * sizeof rb + j;
            char want = (off >= 1000000 && off < 1000003) ? "XYZ"[off - 1000000] : (char)(j * 7 + 3);
            CHECK(rb[j] == want, "big file content");
        }
    }
    close(fd);
}

static void check_rename(void) {
    put("a", "A"); put("b", "B");
    CHECK(rename("a", "b") == 0, "rename over existing file");
    CHECK(strcmp(get("b"), "A") == 0, "target has source content");
    ERR(access("a", F_OK), ENOENT, "source name gone");
    CHECK(mkdir("d1", 0755) == 0 && mkdir("d2", 0755) == 0, "mkdir");
    CHECK(rename("b", "d1/b") == 0, "rename into dir");
    CHECK(rename("d1/b", "d2/c") == 0, "rename across dirs");
    CHECK(strcmp(get("d2/c"), "A") == 0, "moved content");
    put("x", "X"); put("y", "Y");
    ERR(renameat2(AT_FDCWD, "x", AT_FDCWD, "y", RENAME_NOREPLACE), EEXIST, "RENAME_NOREPLACE over existing");
    CHECK(renameat2(AT_FDCWD, "x", AT_FDCWD, "z", RENAME_NOREPLACE) == 0, "RENAME_NOREPLACE to free name");
    CHECK(renameat2(AT_FDCWD, "z", AT_FDCWD, "y", RENAME_EXCHANGE) == 0, "RENAME_EXCHANGE");
    CHECK(strcmp(get("z"), "Y") == 0 && strcmp(get("y"), "X") == 0, "exchanged contents");
    CHECK(mkdir("d3", 0755) == 0 && mkdir("d3/sub", 0755) == 0, "mkdir nested");
    put("d2/keep", "k");
    ERR(rename("d3", "d2"), ENOTEMPTY, "dir over non-empty dir");
    ERR(rename("d3", "d3/sub/inner"), EINVAL, "dir into its own subtree");
    ERR(rename("y", "d1"), EISDIR, "file over dir");
    ERR(rename("d1", "y"), ENOTDIR, "dir over file");
    CHECK(rename("d1", "d4") == 0, "rename empty dir");
    struct stat st; CHECK(stat("d4", &st) == 0 && S_ISDIR(st.st_mode), "renamed dir is a dir");
}

static void check_dirs(void) {
    struct stat st;
    CHECK(mkdir("d", 0750) == 0, "mkdir");
    ERR(mkdir("d", 0750), EEXIST, "mkdir existing");
    CHECK(stat("d", &st) == 0 && (st.st_mode & 0777) == 0750 && st.st_nlink == 2, "dir mode and nlink");
    CHECK(mkdir("d/e", 0755) == 0, "mkdir sub");
    CHECK(stat("d", &st) == 0 && st.st_nlink == 3, "parent nlink counts subdir");
    put("d/f", "f");
    ERR(rmdir("d"), ENOTEMPTY, "rmdir non-empty");
    ERR(rmdir("d/f"), ENOTDIR, "rmdir a file");
    ERR(unlink("d/e"), EISDIR, "unlink a dir");
    CHECK(unlink("d/f") == 0 && rmdir("d/e") == 0 && rmdir("d") == 0, "remove tree");
    ERR(stat("d", &st), ENOENT, "dir gone");
}

static int cmpstr(const void *a, const void *b) { return strcmp(*(char **)a, *(char **)b); }

static void check_readdir(void) {
    enum { N = 3000 };
    char name[64];
    CHECK(mkdir("big", 0755) == 0, "mkdir");
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "big/e%05d", i);
        int fd = open(name, O_CREAT | O_WRONLY, 0644); CHECK(fd >= 0, "create entry"); close(fd);
    }
    DIR *d = opendir("big"); CHECK(d != NULL, "opendir");
    static char *seen[N + 2]; int n = 0; struct dirent *e;
    long half_pos = -1;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        CHECK(n < N, "no more entries than created");
        seen[n++] = strdup(e->d_name);
        if (n == N / 2) half_pos = telldir(d);
    }
    CHECK(n == N, "every entry listed once");
    qsort(seen, n, sizeof *seen, cmpstr);
    for (int i = 1; i < n; i++) CHECK(strcmp(seen[i - 1], seen[i]) != 0, "no duplicates");
    /* Stable offsets: delete entries already returned, then seek back to the
     * middle: the rest must come back exactly once. */
    rewinddir(d);
    int first = 0; static char *firsthalf[N];
    while (first < N / 2 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        firsthalf[first++] = strdup(e->d_name);
    }
    long pos = telldir(d);
    for (int i = 0; i < first; i += 2) { snprintf(name, sizeof name, "big/%s", firsthalf[i]); CHECK(unlink(name) == 0, "unlink listed entry"); }
    int fd = open("big/zz-new", O_CREAT | O_WRONLY, 0644); CHECK(fd >= 0, "create during listing"); close(fd);
    seekdir(d, pos);
    int rest = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        for (int i = 0; i < first; i++) CHECK(strcmp(firsthalf[i], e->d_name) != 0, "entry before the seek point came back");
        rest++;
    }
    CHECK(rest >= N - first && rest <= N - first + 1, "rest of the listing after seekdir");
    (void)half_pos;
    closedir(d);
}

static void check_links(void) {
    char buf[256]; struct stat st;
    put("t", "target");
    CHECK(symlink("t", "s") == 0, "symlink");
    ssize_t n = readlink("s", buf, sizeof buf);
    CHECK(n == 1 && buf[0] == 't', "readlink");
    CHECK(lstat("s", &st) == 0 && S_ISLNK(st.st_mode), "lstat symlink");
    CHECK(strcmp(get("s"), "target") == 0, "follow symlink");
    CHECK(link("t", "h") == 0, "hard link");
    CHECK(stat("t", &st) == 0 && st.st_nlink == 2, "nlink 2");
    struct stat st2; CHECK(stat("h", &st2) == 0 && st2.st_ino == st.st_ino, "same inode");
    CHECK(unlink("t") == 0, "unlink one name");
    CHECK(strcmp(get("h"), "target") == 0 && stat("h", &st) == 0 && st.st_nlink == 1, "other name keeps data");
    ERR(readlink("h", buf, sizeof buf), EINVAL, "readlink on a file");
    CHECK(mkdir("dd", 0755) == 0, "mkdir");
    ERR(link("dd", "dd2"), EPERM, "hard link to dir");
}

static void check_attrs(void) {
    struct stat st; struct statvfs sv;
    put("f", "x");
    CHECK(chmod("f", 04751) == 0 && stat("f", &st) == 0 && (st.st_mode & 07777) == 04751, "chmod incl setuid");
    CHECK(chown("f", 1234, 5678) == 0 && stat("f", &st) == 0 && st.st_uid == 1234 && st.st_gid == 5678, "chown");
    struct timespec ts[2] = {{1000000000, 123}, {1100000000, 456000}};
    CHECK(utimensat(AT_FDCWD, "f", ts, 0) == 0, "utimensat explicit");
    CHECK(stat("f", &st) == 0 && st.st_atim.tv_sec == 1000000000 && st.st_mtim.tv_sec == 1100000000 && st.st_mtim.tv_nsec == 456000, "times stored with ns");
    struct timespec now[2] = {{0, UTIME_NOW}, {0, UTIME_OMIT}};
    CHECK(utimensat(AT_FDCWD, "f", now, 0) == 0 && stat("f", &st) == 0 && st.st_atim.tv_sec > 1600000000 && st.st_mtim.tv_sec == 1100000000, "UTIME_NOW / UTIME_OMIT");
    CHECK(statvfs(".", &sv) == 0 && sv.f_namemax == 255 && sv.f_blocks > 0, "statvfs");
    CHECK(mknod("fifo", S_IFIFO | 0644, 0) == 0 && stat("fifo", &st) == 0 && S_ISFIFO(st.st_mode), "mkfifo");
}

static void check_perms(void) {
    put("secret", "s");
    CHECK(chmod("secret", 0600) == 0, "chmod 600");
    CHECK(mkdir("closed", 0755) == 0, "mkdir 755");
    pid_t p = fork();
    if (p == 0) {
        if (setgid(65534) || setuid(65534)) _exit(10);
        errno = 0; if (open("secret", O_RDONLY) != -1 || errno != EACCES) _exit(11);
        errno = 0; if (open("closed/new", O_CREAT | O_WRONLY, 0644) != -1 || errno != EACCES) _exit(12);
        errno = 0; if (chmod("secret", 0777) != -1 || errno != EPERM) _exit(13);
        _exit(0);
    }
    int status; CHECK(waitpid(p, &status, 0) == p, "wait child");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "unprivileged user is refused (child exit code says which check)");
}

static void check_xattr(void) {
    char buf[64];
    put("f", "x");
    CHECK(setxattr("f", "user.k", "v1", 2, 0) == 0, "setxattr");
    CHECK(getxattr("f", "user.k", buf, sizeof buf) == 2 && memcmp(buf, "v1", 2) == 0, "getxattr");
    ERR(setxattr("f", "user.k", "v2", 2, XATTR_CREATE), EEXIST, "XATTR_CREATE on existing");
    ERR(setxattr("f", "user.other", "v2", 2, XATTR_REPLACE), ENODATA, "XATTR_REPLACE on missing");
    CHECK(setxattr("f", "user.k2", "", 0, 0) == 0, "empty value");
    ssize_t n = listxattr("f", buf, sizeof buf);
    CHECK(n == 15 && memmem(buf, n, "user.k\0", 7) && memmem(buf, n, "user.k2\0", 8), "listxattr");
    ERR(getxattr("f", "user.k", buf, 1), ERANGE, "small buffer gives ERANGE");
    CHECK(removexattr("f", "user.k") == 0, "removexattr");
    ERR(getxattr("f", "user.k", buf, sizeof buf), ENODATA, "removed");
}

static void check_mmap(void) {
    int fd = open("m", O_CREAT | O_RDWR, 0644);
    CHECK(fd >= 0 && ftruncate(fd, 3 * 65536 + 100) == 0, "create and size");
    char *p = mmap(NULL, 3 * 65536 + 100, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(p != MAP_FAILED, "mmap shared writable");
    for (int i = 0; i < 3 * 65536 + 100; i++) p[i] = (char)('a' + i % 26);
    CHECK(msync(p, 3 * 65536 + 100, MS_SYNC) == 0, "msync");
    p[70000] = '#';
    CHECK(munmap(p, 3 * 65536 + 100) == 0, "munmap");
    CHECK(close(fd) == 0, "close");
    fd = open("m", O_RDONLY);
    static char b[3 * 65536 + 100];
    CHECK(read(fd, b, sizeof b) == sizeof b, "read back");
    for (int i = 0; i < (int)sizeof b; i++) CHECK(b[i] == (i == 70000 ? '#' : (char)('a' + i % 26)), "mapped writes persisted");
    close(fd);
}

static void check_errors(void) {
    char name[300]; memset(name, 'n', 256); name[256] = 0;
    ERR(open(name, O_CREAT | O_WRONLY, 0644), ENAMETOOLONG, "name of 256 bytes");
    name[255] = 0;
    int fd = open(name, O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0, "name of 255 bytes is fine"); close(fd);
    put("file", "x");
    ERR(open("file/x", O_RDONLY), ENOTDIR, "path through a file");
    ERR(mkdir("file/x", 0755), ENOTDIR, "mkdir through a file");
    ERR(open("nope/x", O_RDONLY), ENOENT, "missing dir");
    fd = open("file", O_WRONLY);
    ERR(pwrite(fd, "abc", 3, INT64_MAX - 10), EFBIG, "write past the maximum file size");
    close(fd);
    CHECK(strcmp(get("file"), "x") == 0, "failed write changed nothing");
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s DIR CHECK...\n", argv[0]); return 2; }
    for (int i = 2; i < argc; i++) {
        cur = argv[i];
        char dir[4096]; snprintf(dir, sizeof dir, "%s/%s", argv[1], cur);
        CHECK(mkdir(dir, 0777) == 0 || errno == EEXIST, "make the check's directory");
        CHECK(chdir(dir) == 0, "enter the check's directory");
        umask(022);
        if (!strcmp(cur, "rw")) check_rw();
        else if (!strcmp(cur, "rename")) check_rename();
        else if (!strcmp(cur, "dirs")) check_dirs();
        else if (!strcmp(cur, "readdir")) check_readdir();
        else if (!strcmp(cur, "links")) check_links();
        else if (!strcmp(cur, "attrs")) check_attrs();
        else if (!strcmp(cur, "perms")) check_perms();
        else if (!strcmp(cur, "xattr")) check_xattr();
        else if (!strcmp(cur, "mmap")) check_mmap();
        else if (!strcmp(cur, "errors")) check_errors();
        else { printf("FAIL %s: unknown check\n", cur); return 2; }
        printf("ok %s\n", cur); fflush(stdout);
    }
    return 0;
}
