import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// A file by identity: the device of its filesystem and its inode.
public struct FileIdentity: Hashable, Sendable {
    public var device: DeviceNumber
    public var inode: UInt64

    public init(device: DeviceNumber, inode: UInt64) {
        self.device = device
        self.inode = inode
    }
}

/// Which processes can write which files, on chosen filesystems.
public enum OpenFiles {
    /// The files on the filesystems `devices` that a process has open for writing (a
    /// descriptor opened write-only or read-write) or mapped shared and writable (SQLite's
    /// `-shm` index), each with the processes that do, in pid order. Readers are not listed.
    /// A process that exits during the scan may be listed; one that opens a file after it is
    /// not.
    /// - Note: scans /proc/PID/fd/* with stat(2), /proc/PID/fdinfo/* and /proc/PID/maps.
    public static func writers(on devices: Set<DeviceNumber>) -> [FileIdentity: [ProcessHolder]] {
        let me = getpid()
        var result: [FileIdentity: [ProcessHolder]] = [:]
        for name in Sys.listDirectory("/proc") {
            guard let pid = Int32(name), pid != me else { continue }
            var files: Set<FileIdentity> = []
            let base = "/proc/\(pid)/fd"
            for fd in Sys.listDirectory(base) {
                var info = stat()
                guard guard_stat("\(base)/\(fd)", &info) == 0, info.st_mode & S_IFMT == S_IFREG else { continue }
                let file = FileIdentity(device: DeviceNumber(info.st_dev), inode: UInt64(info.st_ino))
                if devices.contains(file.device), openForWriting(pid: pid, fd: fd) { files.insert(file) }
            }
            // maps: "start-end perms offset MAJ:MIN inode path", the device numbers in hex.
            for line in (Sys.readSmallFile("/proc/\(pid)/maps", limit: 4 << 20) ?? "").split(separator: "\n") {
                let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
                guard fields.count >= 5, let inode = UInt64(fields[4]), inode != 0, fields[1].hasPrefix("rw"), fields[1].hasSuffix("s") else { continue }
                let numbers = fields[3].split(separator: ":")
                guard numbers.count == 2, let major = UInt32(numbers[0], radix: 16), let minor = UInt32(numbers[1], radix: 16) else { continue }
                let file = FileIdentity(device: DeviceNumber(major: major, minor: minor), inode: inode)
                if devices.contains(file.device) { files.insert(file) }
            }
            guard !files.isEmpty else { continue }
            let holder = ProcessHolder(pid: pid, command: Sys.readSmallFile("/proc/\(pid)/comm")?.trimmingWhitespace() ?? "?")
            for file in files { result[file, default: []].append(holder) }
        }
        return result.mapValues { $0.sorted { $0.pid < $1.pid } }
    }

    /// Whether descriptor `fd` of `pid` was opened O_WRONLY or O_RDWR: fdinfo's `flags:` line,
    /// in octal. Unreadable: counted as writing (the careful side).
    static func openForWriting(pid: Int32, fd: String) -> Bool {
        guard let info = Sys.readSmallFile("/proc/\(pid)/fdinfo/\(fd)"),
            let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags:") }),
            let flags = Int(line.dropFirst("flags:".count).trimmingWhitespace(), radix: 8)
        else { return true }
        return flags & Int(O_ACCMODE) != Int(O_RDONLY)
    }
}
