#ifndef GUARD_SHIMS_H
#define GUARD_SHIMS_H

// The few things Swift cannot do itself: receive libdevmapper's variadic log calls,
// issue ioctls (variadic in C, request numbers built by _IOR macros) and read
// kernel structs whose layout only <linux/*.h> knows. Every symbol is prefixed guard_.

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <linux/loop.h>

/// Receives one formatted libdevmapper log message.
typedef void (*guard_dm_log_callback)(int level, const char *file, int line, int dm_errno,
                                      const char *message);

/// Routes libdevmapper's log (dm_log_with_errno_init) to `callback`; messages above
/// `max_level` (libdevmapper's 2 fatal .. 7 debug) are dropped before formatting.
void guard_dm_log_install(guard_dm_log_callback callback, int max_level);
void guard_dm_log_set_level(int max_level);

/// ioctl(2) with a pointer argument, retried on EINTR. Returns the result, or -errno.
int guard_ioctl_ptr(int fd, unsigned long request, void *argument);
/// ioctl(2) with an integer argument, retried on EINTR. Returns the result, or -errno.
int guard_ioctl_long(int fd, unsigned long request, unsigned long argument);

unsigned long guard_req_blkgetsize64(void);

#include <sys/stat.h>
/// dev_t helpers (macros in glibc).
uint32_t guard_major(uint64_t dev);
uint32_t guard_minor(uint64_t dev);
uint64_t guard_makedev(uint32_t major, uint32_t minor);
/// stat(2) family, unambiguous for Swift (where `stat` is also a struct).
int guard_stat(const char *path, struct stat *out);
int guard_lstat(const char *path, struct stat *out);
int guard_fstat(int fd, struct stat *out);
/// fallocate(2) and O_DIRECT need _GNU_SOURCE.
int guard_fallocate(int fd, int mode, int64_t offset, int64_t length);
int guard_o_direct(void);
int guard_syncfs(int fd);
/// syslog(3) of one preformatted message under the identity "guard".
void guard_syslog(int priority, const char *message);
/// Locks all current and future pages in memory (mlockall MCL_CURRENT|MCL_FUTURE); 0 or -errno.
int guard_lock_memory(void);
int guard_unlock_memory(void);

/// Attaches `backing_fd` to the loop device `loop_fd` with LOOP_CONFIGURE (Linux 5.8+),
/// falling back to LOOP_SET_FD + LOOP_SET_STATUS64. Returns 0 or -errno.
int guard_loop_configure(int loop_fd, int backing_fd, int read_only, int autoclear, int direct_io,
                         const char *backing_name);
/// Reads the loop device's backing file name and flags. Returns 0 or -errno.
int guard_loop_get_status(int loop_fd, char *name_out, size_t name_size, uint32_t *flags_out,
                          uint64_t *device_out, uint64_t *inode_out);

struct dm_names;
struct dm_versions;
/// Walks libdevmapper's DM_DEVICE_LIST result (flexible array members Swift cannot read).
const char *guard_dm_names_name(const struct dm_names *names);
uint64_t guard_dm_names_dev(const struct dm_names *names);
/// The next entry, or NULL after the last one.
const struct dm_names *guard_dm_names_next(const struct dm_names *names);
/// Walks DM_DEVICE_LIST_VERSIONS' result.
const char *guard_dm_versions_name(const struct dm_versions *versions);
void guard_dm_versions_version(const struct dm_versions *versions, uint32_t out[3]);
const struct dm_versions *guard_dm_versions_next(const struct dm_versions *versions);

/// Reads the kernel log ring (klogctl SYSLOG_ACTION_READ_ALL) into `buffer`; returns bytes or -errno.
int guard_read_kernel_log(char *buffer, int size);

/// Extended attributes of an open file (sys/xattr.h, which Swift's Glibc module leaves out).
/// Each returns what the libc call returns (-1 and errno on failure).
long guard_flistxattr(int fd, char *list, size_t size);
long guard_fgetxattr(int fd, const char *name, void *value, size_t size);
int guard_fsetxattr(int fd, const char *name, const void *value, size_t size);
int guard_fremovexattr(int fd, const char *name);

/// Starts `path` (argv, envp) in a session of its own: stdin /dev/null, stdout and stderr on
/// `stdout_fd` and `stderr_fd`, in `directory` (NULL: guard's), with every signal at its
/// default and none blocked, no other descriptor of guard's open. stdin is `stdin_fd`, or
/// /dev/null when it is -1. With `cgroup_fd` >= 0 the
/// child is created inside that cgroup (clone3 CLONE_INTO_CGROUP, Linux 5.7+), so it and all
/// it starts are in it from the first instruction, with no shell in between.
/// Returns the pid once the program runs (exec succeeded), or -errno; `in_child` says
/// whether the error came from the child (chdir, execve: the command cannot run) or from
/// creating it (clone3: e.g. ENOSYS or EINVAL where the kernel cannot create into a cgroup).
/// pipe2(2) with O_CLOEXEC (pipe2 needs _GNU_SOURCE). Returns 0 or -errno.
int guard_pipe_cloexec(int fds[2]);
int guard_spawn(const char *path, char *const argv[], char *const envp[], const char *directory,
                int cgroup_fd, int stdin_fd, int stdout_fd, int stderr_fd, int *in_child);

#endif
