#if canImport(Glibc)
import Glibc
#endif
import CGuardShims

/// Process-wide memory locking, for the instants when a suspended volume must not be
/// touched: no page of guard may need to be read back from a disk then.
public enum Memory {
    /// Locks every current and future page of this process in RAM.
    /// - Throws: `BlockDeviceError` (EPERM without CAP_IPC_LOCK, ENOMEM over RLIMIT_MEMLOCK).
    /// - Note: mlockall(MCL_CURRENT | MCL_FUTURE).
    public static func lockAll() throws(BlockDeviceError) {
        let result = guard_lock_memory()
        if result < 0 { throw .syscall("mlockall", errno: -result, operation: "locking guard's memory") }
    }

    /// Undoes `lockAll()`.
    /// - Note: munlockall(2).
    public static func unlockAll() {
        _ = guard_unlock_memory()
    }
}

/// Filesystem-level operations on a mounted path.
public enum FileSystems {
    /// Writes the dirty data of the filesystem holding `path` to disk, so a following
    /// freeze (dm suspend) has little left to flush.
    /// - Note: syncfs(2).
    public static func sync(_ path: String) throws(BlockDeviceError) {
        let fd = try Sys.open(path, O_RDONLY | O_DIRECTORY, operation: "sync of the filesystem at \(path)")
        defer { Sys.close(fd) }
        _ = try Sys.retrying("syncfs", operation: "sync of the filesystem at \(path)") { guard_syncfs(fd) }
    }
}
