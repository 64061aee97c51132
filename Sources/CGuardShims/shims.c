#define _GNU_SOURCE
#include "guard_shims.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <libdevmapper.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

uint32_t guard_major(uint64_t dev) { return major((dev_t)dev); }
uint32_t guard_minor(uint64_t dev) { return minor((dev_t)dev); }
uint64_t guard_makedev(uint32_t ma, uint32_t mi) { return (uint64_t)makedev(ma, mi); }
int guard_stat(const char *path, struct stat *out) { return stat(path, out); }
int guard_lstat(const char *path, struct stat *out) { return lstat(path, out); }
int guard_fstat(int fd, struct stat *out) { return fstat(fd, out); }
int guard_fallocate(int fd, int mode, int64_t offset, int64_t length) { return fallocate(fd, mode, offset, length); }
int guard_o_direct(void) { return O_DIRECT; }
int guard_syncfs(int fd) { return syncfs(fd); }

#include <syslog.h>
void guard_syslog(int priority, const char *message)
{
    static int opened = 0;
    if (!opened) {
        openlog("guard", LOG_PID, LOG_DAEMON);
        opened = 1;
    }
    syslog(priority, "%s", message);
}
int guard_lock_memory(void) { return mlockall(MCL_CURRENT | MCL_FUTURE) == 0 ? 0 : -errno; }
int guard_unlock_memory(void) { return munlockall() == 0 ? 0 : -errno; }

static guard_dm_log_callback guard_callback = NULL;
static volatile int guard_max_level = 4;

// libdevmapper ORs flags into the level (e.g. _LOG_STDERR 128); the level itself is the low bits.
static void guard_dm_log(int level, const char *file, int line, int dm_errno, const char *format, ...)
{
    int plain_level = level & 0x07;
    if (guard_callback == NULL || plain_level > guard_max_level)
        return;
    char buffer[1024];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(buffer, sizeof buffer, format, arguments);
    va_end(arguments);
    guard_callback(plain_level, file, line, dm_errno, buffer);
}

void guard_dm_log_install(guard_dm_log_callback callback, int max_level)
{
    guard_callback = callback;
    guard_max_level = max_level;
    dm_log_with_errno_init(guard_dm_log);
}

void guard_dm_log_set_level(int max_level) { guard_max_level = max_level; }

int guard_ioctl_ptr(int fd, unsigned long request, void *argument)
{
    int result;
    do {
        result = ioctl(fd, request, argument);
    } while (result < 0 && errno == EINTR);
    return result < 0 ? -errno : result;
}

int guard_ioctl_long(int fd, unsigned long request, unsigned long argument)
{
    int result;
    do {
        result = ioctl(fd, request, argument);
    } while (result < 0 && errno == EINTR);
    return result < 0 ? -errno : result;
}

unsigned long guard_req_blkgetsize64(void) { return BLKGETSIZE64; }

int guard_loop_configure(int loop_fd, int backing_fd, int read_only, int autoclear, int direct_io,
                         const char *backing_name)
{
    struct loop_config config;
    memset(&config, 0, sizeof config);
    config.fd = (uint32_t)backing_fd;
    config.info.lo_flags = (read_only ? LO_FLAGS_READ_ONLY : 0) | (autoclear ? LO_FLAGS_AUTOCLEAR : 0) |
                           (direct_io ? LO_FLAGS_DIRECT_IO : 0);
    if (backing_name != NULL)
        strncpy((char *)config.info.lo_file_name, backing_name, LO_NAME_SIZE - 1);
    int result = guard_ioctl_ptr(loop_fd, LOOP_CONFIGURE, &config);
    if (result != -EINVAL && result != -ENOTTY)
        return result < 0 ? result : 0;

    // Kernels before 5.8: the two-step form.
    result = guard_ioctl_long(loop_fd, LOOP_SET_FD, (unsigned long)backing_fd);
    if (result < 0)
        return result;
    struct loop_info64 info;
    memset(&info, 0, sizeof info);
    info.lo_flags = config.info.lo_flags & ~LO_FLAGS_READ_ONLY;
    if (backing_name != NULL)
        strncpy((char *)info.lo_file_name, backing_name, LO_NAME_SIZE - 1);
    result = guard_ioctl_ptr(loop_fd, LOOP_SET_STATUS64, &info);
    if (result < 0) {
        guard_ioctl_long(loop_fd, LOOP_CLR_FD, 0);
        return result;
    }
    return 0;
}

int guard_loop_get_status(int loop_fd, char *name_out, size_t name_size, uint32_t *flags_out,
                          uint64_t *device_out, uint64_t *inode_out)
{
    struct loop_info64 info;
    memset(&info, 0, sizeof info);
    int result = guard_ioctl_ptr(loop_fd, LOOP_GET_STATUS64, &info);
    if (result < 0)
        return result;
    if (name_out != NULL && name_size > 0) {
        size_t length = strnlen((const char *)info.lo_file_name, LO_NAME_SIZE);
        if (length >= name_size)
            length = name_size - 1;
        memcpy(name_out, info.lo_file_name, length);
        name_out[length] = '\0';
    }
    if (flags_out != NULL)
        *flags_out = info.lo_flags;
    if (device_out != NULL)
        *device_out = info.lo_device;
    if (inode_out != NULL)
        *inode_out = info.lo_inode;
    return 0;
}

const char *guard_dm_names_name(const struct dm_names *names) { return names->name; }
uint64_t guard_dm_names_dev(const struct dm_names *names) { return names->dev; }
const struct dm_names *guard_dm_names_next(const struct dm_names *names)
{
    if (names->next == 0)
        return NULL;
    return (const struct dm_names *)((const char *)names + names->next);
}

const char *guard_dm_versions_name(const struct dm_versions *versions) { return versions->name; }
void guard_dm_versions_version(const struct dm_versions *versions, uint32_t out[3])
{
    out[0] = versions->version[0];
    out[1] = versions->version[1];
    out[2] = versions->version[2];
}
const struct dm_versions *guard_dm_versions_next(const struct dm_versions *versions)
{
    if (versions->next == 0)
        return NULL;
    return (const struct dm_versions *)((const char *)versions + versions->next);
}

#include <sys/klog.h>
int guard_read_kernel_log(char *buffer, int size)
{
    int result = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buffer, size);
    return result < 0 ? -errno : result;
}

long guard_flistxattr(int fd, char *list, size_t size) { return flistxattr(fd, list, size); }
long guard_fgetxattr(int fd, const char *name, void *value, size_t size) { return fgetxattr(fd, name, value, size); }
int guard_fsetxattr(int fd, const char *name, const void *value, size_t size) { return fsetxattr(fd, name, value, size, 0); }
int guard_fremovexattr(int fd, const char *name) { return fremovexattr(fd, name); }

#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

/* clone3's arguments (linux/sched.h has them too, but its CLONE_ macros clash with glibc's). */
struct guard_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup;
};
#define GUARD_CLONE_INTO_CGROUP 0x200000000ULL

/* The child's side of guard_spawn: async-signal-safe calls only (guard is multi-threaded
   and the child is a copy of one of its threads). Never returns. */
static void spawn_child(const char *path, char *const argv[], char *const envp[], const char *directory,
                        int null_fd, int stdout_fd, int stderr_fd, int report_fd)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &dfl, NULL); /* an ignored SIGPIPE would survive exec */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Where guard itself was started with 0, 1 or 2 closed, a descriptor may be one of them:
       each moves above 2 before 0, 1 and 2 are set. */
    if (null_fd < 3) null_fd = fcntl(null_fd, F_DUPFD_CLOEXEC, 3);
    if (stdout_fd < 3) stdout_fd = fcntl(stdout_fd, F_DUPFD_CLOEXEC, 3);
    if (stderr_fd < 3) stderr_fd = fcntl(stderr_fd, F_DUPFD_CLOEXEC, 3);
    if (report_fd < 3) report_fd = fcntl(report_fd, F_DUPFD_CLOEXEC, 3);
    if (setsid() < 0 || dup2(null_fd, 0) < 0 || dup2(stdout_fd, 1) < 0 || dup2(stderr_fd, 2) < 0)
        goto fail;
    if (directory != NULL && chdir(directory) != 0)
        goto fail;
    /* Every other descriptor closes (the report pipe closes at exec: it is close-on-exec). */
    if (report_fd > 3)
        syscall(SYS_close_range, 3, report_fd - 1, 0);
    if (syscall(SYS_close_range, report_fd + 1, ~0U, 0) != 0) {
        struct rlimit limit;
        long last = syscall(SYS_getrlimit, RLIMIT_NOFILE, &limit) == 0 ? (long)limit.rlim_cur : 1024;
        for (long fd = 3; fd < last; fd++)
            if (fd != report_fd) close((int)fd);
    }
    execve(path, argv, envp);
fail:;
    int code = errno;
    ssize_t ignored = write(report_fd, &code, sizeof code);
    (void)ignored;
    _exit(127);
}

int guard_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC) == 0 ? 0 : -errno; }

int guard_spawn(const char *path, char *const argv[], char *const envp[], const char *directory,
                int cgroup_fd, int stdin_fd, int stdout_fd, int stderr_fd, int *in_child)
{
    *in_child = 0;
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0)
        return -errno;
    /* stdin: the caller's descriptor (a copy, closed here afterwards), else /dev/null. */
    int null_fd = stdin_fd >= 0 ? fcntl(stdin_fd, F_DUPFD_CLOEXEC, 3) : open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd < 0) {
        int code = errno;
        close(report[0]);
        close(report[1]);
        return -code;
    }
    /* No handler of guard's may run in the child before its dispositions are reset. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long pid;
    if (cgroup_fd >= 0) {
        struct guard_clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = GUARD_CLONE_INTO_CGROUP;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t)cgroup_fd;
        pid = syscall(SYS_clone3, &args, sizeof args);
    } else {
        pid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    }
    if (pid == 0)
        spawn_child(path, argv, envp, directory, null_fd, stdout_fd, stderr_fd, report[1]);
    int code = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(null_fd);
    close(report[1]);
    if (pid < 0) {
        close(report[0]);
        return -code;
    }
    /* The report pipe closes at exec (nothing read) or carries the child's errno. */
    int child_errno = 0;
    ssize_t got;
    do {
        got = read(report[0], &child_errno, sizeof child_errno);
    } while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof child_errno) {
        while (waitpid((pid_t)pid, NULL, 0) < 0 && errno == EINTR) {}
        *in_child = 1;
        return -child_errno;
    }
    return (int)pid;
}
