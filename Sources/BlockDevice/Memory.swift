import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

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

    /// Whether a page of this process could have to be read from one of `devices`, or from a
    /// device stacked on one of them, while they are suspended: a file it maps (its program,
    /// its libraries) lives there, or a swap area does. Only then must its memory be locked for
    /// the window; otherwise locking costs the time of reading 100 MB in, for nothing.
    /// - Note: the device numbers of /proc/self/maps and the swap areas of /proc/swaps.
    public static func mayFault(on devices: Set<DeviceNumber>) -> Bool {
        guard !devices.isEmpty else { return false }
        var used: Set<DeviceNumber> = []
        // "start-end perms offset MAJ:MIN inode path", the numbers in hex; 00:00 is anonymous.
        for line in (Sys.readSmallFile("/proc/self/maps", limit: 16 << 20) ?? "").split(separator: "\n") {
            let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count >= 5, fields[4] != "0" else { continue }
            let numbers = fields[3].split(separator: ":")
            if numbers.count == 2, let major = UInt32(numbers[0], radix: 16), let minor = UInt32(numbers[1], radix: 16), major != 0 {
                used.insert(DeviceNumber(major: major, minor: minor))
            }
        }
        // "Filename Type Size Used Priority": a swap file's filesystem, or a swap device.
        for line in (Sys.readSmallFile("/proc/swaps") ?? "").split(separator: "\n").dropFirst() {
            guard let name = line.split(separator: " ").first.map(String.init), let info = try? Sys.stat(name, operation: "swap \(name)") else { continue }
            used.insert(info.st_mode & S_IFMT == S_IFBLK ? DeviceNumber(info.st_rdev) : DeviceNumber(info.st_dev))
        }
        return used.contains { device in devices.contains(device) || !BlockDevices.allLowerDevices(of: device).isDisjoint(with: devices) }
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
