import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// One line of the kernel's mount table.
public struct MountEntry: Hashable, Sendable {
    public var source: String
    public var target: String
    public var fileSystemType: String
    public var options: String
    /// The device number of the mounted filesystem (its st_dev).
    public var device: DeviceNumber
    /// The subtree of the filesystem mounted here ("/" unless it is a bind mount).
    public var root: String
    /// mountinfo's mount id and its parent's (nil for entries not read from mountinfo): which
    /// mount sits on which, including one hidden under a later mount on the same place.
    public var id: Int32?
    public var parentID: Int32?

    public init(source: String, target: String, fileSystemType: String, options: String, device: DeviceNumber, root: String, id: Int32? = nil, parentID: Int32? = nil) {
        self.source = source
        self.target = target
        self.fileSystemType = fileSystemType
        self.options = options
        self.device = device
        self.root = root
        self.id = id
        self.parentID = parentID
    }
}

/// A process that holds files on a filesystem.
public struct ProcessHolder: Hashable, Sendable, CustomStringConvertible {
    public var pid: Int32
    public var command: String
    public var description: String { "pid \(pid) (\(command))" }
}

/// Mounting, unmounting and reading the mount table through libmount.
public enum Mounts {
    /// The current mount table (/proc/self/mountinfo).
    public static func current() throws(BlockDeviceError) -> [MountEntry] {
        try LibMount.readTable("/proc/self/mountinfo")
    }

    /// Where the block device `device` is mounted (its whole filesystem, not bind mounts of subtrees first).
    public static func mountPoints(of device: DeviceNumber) -> [MountEntry] {
        ((try? current()) ?? []).filter { $0.device == device }.sorted { ($0.root == "/" ? 0 : 1) < ($1.root == "/" ? 0 : 1) }
    }

    /// The mount entry whose target is exactly `path`, the last one if several are stacked.
    public static func entry(at path: String) -> MountEntry? {
        let normalized = normalize(path)
        return ((try? current()) ?? []).last { $0.target == normalized }
    }

    /// The mount entry holding `path`: the longest mount target that is a prefix of it.
    public static func entry(containing path: String) -> MountEntry? {
        let normalized = normalize(path)
        return ((try? current()) ?? []).filter { isPath(normalized, under: $0.target) }
            .max { $0.target.count < $1.target.count }
    }

    /// The mount point /etc/fstab lists for `path` (the longest one holding it) when it is not
    /// mounted now: the filesystem that holds `path` comes late, or was not mounted at all.
    public static func unmountedFileSystem(holding path: String, fstab: String = "/etc/fstab") -> String? {
        guard let owner = fstabFileSystem(holding: path, fstab: fstab), owner != "/" else { return nil }
        return entry(at: owner) == nil ? owner : nil
    }

    /// The mount point of the /etc/fstab filesystem that holds `path` (the longest target above
    /// it), or nil when the file cannot be read or no entry holds it.
    public static func fstabFileSystem(holding path: String, fstab: String = "/etc/fstab") -> String? {
        guard let text = Sys.readSmallFile(fstab) else { return nil }
        let normalized = normalize(path)
        let targets = text.split(separator: "\n").compactMap { line -> String? in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 3, !fields[0].hasPrefix("#"), fields[1].hasPrefix("/"), fields[2] != "swap" else { return nil }
            return normalize(fields[1].split(separator: "\\040", omittingEmptySubsequences: false).joined(separator: " "))
        }
        return targets.filter({ isPath(normalized, under: $0) }).max(by: { $0.count < $1.count })
    }

    /// The mount point of the mounted filesystem that holds `path` now (the longest target above it).
    public static func mountPoint(holding path: String) -> String? {
        let normalized = normalize(path)
        return ((try? current()) ?? []).map(\.target).filter { isPath(normalized, under: $0) }.max(by: { $0.count < $1.count })
    }

    /// Mounts `source` on `target`.
    ///
    /// - Parameters:
    ///   - options: comma-separated mount options ("ro,nodev,noload").
    /// - Throws: `BlockDeviceError` naming source, target and the kernel's reason.
    /// - Note: libmount's mnt_context_mount, without fstab or mount helpers.
    public static func mount(source: String, target: String, fileSystemType: String? = nil, options: String = "")
        throws(BlockDeviceError)
    {
        if let failure = LibMount.run(
            source: source, target: target, fileSystemType: fileSystemType, options: options, unmount: false, flags: 0)
        {
            throw BlockDeviceError(
                code: .from(errno: failure.errno), operation: "mount of \(source) on \(target)", call: "mount",
                errno: failure.errno, detail: failure.message.isEmpty ? nil : failure.message)
        }
    }

    /// The block devices that hold what is written under `directory`, or nil when that cannot be
    /// told. A filesystem on a block device has it as its st_dev; one with an anonymous st_dev
    /// (major 0) is resolved through the mount table: memory filesystems hold nothing on a disk,
    /// an overlay writes to its upper directory (resolved in turn), btrfs to the device it was
    /// mounted from; anything else (a FUSE or network filesystem) is unknown.
    public static func backingDevices(of directory: String, depth: Int = 0) -> Set<DeviceNumber>? {
        guard let device = try? BlockDevices.filesystemDevice(of: directory) else { return nil }
        guard device.major == 0 else { return [device] }
        guard depth < 4, let mount = entry(containing: directory) else { return nil }
        switch mount.fileSystemType {
        case "tmpfs", "ramfs", "devtmpfs", "proc", "sysfs", "cgroup2", "devpts", "mqueue":
            return []
        case "overlay":
            let options = mount.options.split(separator: ",")
            guard let upper = options.first(where: { $0.hasPrefix("upperdir=") })?.dropFirst("upperdir=".count) else { return nil }
            return backingDevices(of: String(upper), depth: depth + 1)
        case "btrfs":
            guard mount.source.hasPrefix("/dev/"), let source = try? BlockDevices.deviceNumber(of: mount.source) else { return nil }
            return [source]
        default:
            return nil
        }
    }

    /// Bind-mounts `source` (a directory) on `target`, read-only when asked.
    /// - Note: libmount with MS_BIND, then MS_REMOUNT|MS_BIND|MS_RDONLY for a read-only bind.
    public static func bind(_ source: String, on target: String, readOnly: Bool) throws(BlockDeviceError) {
        if let failure = LibMount.run(source: source, target: target, fileSystemType: nil, options: nil, unmount: false, flags: UInt(MS_BIND)) {
            throw BlockDeviceError(
                code: .from(errno: failure.errno), operation: "bind mount of \(source) on \(target)", call: "mount", errno: failure.errno,
                detail: failure.message.isEmpty ? nil : failure.message)
        }
        guard readOnly else { return }
        try Sys.mount(nil, target, flags: UInt(MS_REMOUNT | MS_BIND | MS_RDONLY), operation: "read-only remount of the bind mount \(target)")
    }

    /// Whether `path` is still the directory a mount table named: no symbolic link anywhere in
    /// it (its canonical form is itself), and a directory. A mount point that became a symlink
    /// after its filesystem was unmounted would redirect a mount made by its path.
    public static func isUnchangedMountPoint(_ path: String) -> Bool {
        guard let resolved = Glibc.realpath(path, nil) else { return false }
        defer { free(resolved) }
        guard String(cString: resolved) == normalize(path), let info = try? Sys.lstat(path, operation: "checking \(path)") else { return false }
        return info.st_mode & S_IFMT == S_IFDIR
    }

    /// Makes `directory` a mount point of its own with private propagation (a bind mount of
    /// itself, made private), so that nothing mounted under it ever appears in another mount
    /// namespace: on a systemd host `/` is shared, and every service with PrivateTmp,
    /// ProtectSystem or its own namespace (udevd, logind, backup agents) would get a copy of
    /// each mount, which an open file there keeps mounted after guard unmounts its own.
    ///
    /// Idempotent: a directory that is already a private mount point is left as it is. The
    /// bind itself still appears (empty) in namespaces that were slaves of its parent; what is
    /// mounted under it afterwards does not.
    /// - Note: mount(2) with MS_BIND, then MS_PRIVATE.
    public static func makePrivateMountPoint(_ directory: String) throws(BlockDeviceError) {
        let target = normalize(directory)
        let mounted = ((try? LibMount.readTable("/proc/self/mountinfo")) ?? []).contains { $0.target == target }
        if !mounted {
            try Sys.mount(target, target, flags: UInt(MS_BIND), operation: "bind mount of \(target) on itself")
        }
        try Sys.mount(nil, target, flags: UInt(MS_PRIVATE), operation: "private propagation for \(target)")
    }

    /// Unmounts the filesystem mounted on `target`.
    ///
    /// - Throws: `BlockDeviceError`; when the filesystem is busy the error lists the
    ///   processes holding it (`held by pid 812 (postgres)`).
    /// - Note: libmount's mnt_context_umount.
    public static func unmount(_ target: String) throws(BlockDeviceError) {
        let device = try? BlockDevices.filesystemDevice(of: target)
        if let failure = LibMount.run(
            source: nil, target: target, fileSystemType: nil, options: nil, unmount: true, flags: 0)
        {
            var detail = failure.message.isEmpty ? nil : failure.message
            if failure.errno == EBUSY, let device {
                let holders = processes(using: device)
                if !holders.isEmpty {
                    detail =
                        "held by " + holders.map(\.description).joined(separator: ", ")
                        + "; stop them (or the service) and try again"
                }
            }
            throw BlockDeviceError(
                code: .from(errno: failure.errno), operation: "unmount of \(target)", call: "umount2",
                errno: failure.errno, detail: detail)
        }
    }

    /// The processes with a file, directory, root or mapping on the filesystem `device`.
    /// - Note: scans /proc/PID/{cwd,root,exe,fd/*} with stat(2) and /proc/PID/maps.
    public static func processes(using device: DeviceNumber) -> [ProcessHolder] {
        let me = getpid()
        var holders: [ProcessHolder] = []
        for name in Sys.listDirectory("/proc") {
            guard let pid = Int32(name), pid != me else { continue }
            if processUses(pid: pid, device: device) {
                let command = Sys.readSmallFile("/proc/\(pid)/comm")?.trimmingWhitespace() ?? "?"
                holders.append(ProcessHolder(pid: pid, command: command))
            }
        }
        return holders.sorted { $0.pid < $1.pid }
    }

    /// The processes that have the block device `device` itself open (not a file on it).
    public static func processes(holdingDevice device: DeviceNumber) -> [ProcessHolder] {
        let me = getpid()
        var holders: [ProcessHolder] = []
        for name in Sys.listDirectory("/proc") {
            guard let pid = Int32(name), pid != me else { continue }
            let base = "/proc/\(pid)/fd"
            let holds = Sys.listDirectory(base).contains { fd in
                var info = stat()
                return guard_stat("\(base)/\(fd)", &info) == 0 && info.st_mode & S_IFMT == S_IFBLK
                    && DeviceNumber(info.st_rdev) == device
            }
            if holds {
                holders.append(ProcessHolder(pid: pid, command: Sys.readSmallFile("/proc/\(pid)/comm")?.trimmingWhitespace() ?? "?"))
            }
        }
        return holders
    }

    private static func processUses(pid: Int32, device: DeviceNumber) -> Bool {
        func on(_ path: String) -> Bool {
            var info = stat()
            return guard_stat(path, &info) == 0 && DeviceNumber(info.st_dev) == device
        }
        let base = "/proc/\(pid)"
        if on("\(base)/cwd") || on("\(base)/root") || on("\(base)/exe") { return true }
        for fd in Sys.listDirectory("\(base)/fd") where on("\(base)/fd/\(fd)") { return true }
        // maps: "start-end perms offset MAJ:MIN inode path" with hex numbers.
        if let maps = Sys.readSmallFile("\(base)/maps", limit: 4 << 20) {
            for line in maps.split(separator: "\n") {
                let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
                guard fields.count >= 5, fields[4] != "0" else { continue }
                let numbers = fields[3].split(separator: ":")
                if numbers.count == 2, let major = UInt32(numbers[0], radix: 16), let minor = UInt32(numbers[1], radix: 16),
                    DeviceNumber(major: major, minor: minor) == device
                {
                    return true
                }
            }
        }
        return false
    }

    /// `path` without a trailing slash and with `.`/`..`/`//` resolved lexically.
    public static func normalize(_ path: String) -> String {
        var parts: [Substring] = []
        for part in path.split(separator: "/") {
            if part == "." || part.isEmpty { continue }
            if part == ".." {
                _ = parts.popLast()
                continue
            }
            parts.append(part)
        }
        return "/" + parts.joined(separator: "/")
    }

    /// Whether `path` is `base` or inside it (lexically).
    public static func isPath(_ path: String, under base: String) -> Bool {
        if base == "/" { return true }
        return path == base || path.hasPrefix(base + "/")
    }
}
