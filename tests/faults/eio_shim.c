/* An LD_PRELOAD shim that makes writes and fsyncs of files under one directory fail while a control file
 * exists, so the fault tests can inject real I/O errors into a running mailhop daemon and take them away.
 *
 *   MAILHOP_EIO_FILE    the control file. While it exists, its first line says what fails:
 *                       "<calls> <errno>", calls a comma-separated subset of write,fsync (write covers write,
 *                       pwrite, pwrite64 and writev; fsync covers fsync and fdatasync), errno EIO or ENOSPC.
 *                       An empty file means "write,fsync EIO".
 *   MAILHOP_EIO_PREFIX  only descriptors whose /proc/self/fd target starts with this path fail (the spool), so
 *                       sockets, pipes and log files keep working.
 *
 * Build: gcc -shared -fPIC -O2 -o eio_shim.so eio_shim.c -ldl
 * The control file is read on every call on a matching descriptor: a test toggles the fault while the
 * daemon runs, with no signal and no restart. Test code only: the checks cost a syscall per write. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define KIND_WRITE 1
#define KIND_FSYNC 2

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwrite64_fn)(int, const void *, size_t, off64_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef int (*fsync_fn)(int);

/* The errno to fail a call of this kind on fd with, or 0 to let it through. Preserves errno when passing. */
static int injected(int fd, int kind) {
    const char *control = getenv("MAILHOP_EIO_FILE");
    const char *prefix = getenv("MAILHOP_EIO_PREFIX");
    if (control == NULL || prefix == NULL || fd < 0)
        return 0;
    int saved = errno;
    int result = 0;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n > 0) {
        target[n] = '\0';
        size_t plen = strlen(prefix);
        if (strncmp(target, prefix, plen) == 0 && (target[plen] == '/' || target[plen] == '\0')) {
            int cfd = open(control, O_RDONLY | O_CLOEXEC);
            if (cfd >= 0) {
                char spec[128] = {0};
                ssize_t got = read(cfd, spec, sizeof spec - 1);
                close(cfd);
                int kinds = KIND_WRITE | KIND_FSYNC, code = EIO;
                if (got > 0 && spec[0] != '\n') {
                    kinds = (strstr(spec, "write") ? KIND_WRITE : 0) | (strstr(spec, "fsync") ? KIND_FSYNC : 0);
                    code = strstr(spec, "ENOSPC") ? ENOSPC : EIO;
                }
                if (kinds & kind)
                    result = code;
            }
        }
    }
    errno = saved;
    return result;
}

#define NEXT(type, name) static type real_##name; if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    NEXT(write_fn, write);
    int code = injected(fd, KIND_WRITE);
    if (code) { errno = code; return -1; }
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    NEXT(pwrite_fn, pwrite);
    int code = injected(fd, KIND_WRITE);
    if (code) { errno = code; return -1; }
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    NEXT(pwrite64_fn, pwrite64);
    int code = injected(fd, KIND_WRITE);
    if (code) { errno = code; return -1; }
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    NEXT(writev_fn, writev);
    int code = injected(fd, KIND_WRITE);
    if (code) { errno = code; return -1; }
    return real_writev(fd, iov, iovcnt);
}

int fsync(int fd) {
    NEXT(fsync_fn, fsync);
    int code = injected(fd, KIND_FSYNC);
    if (code) { errno = code; return -1; }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    NEXT(fsync_fn, fdatasync);
    int code = injected(fd, KIND_FSYNC);
    if (code) { errno = code; return -1; }
    return real_fdatasync(fd);
}
