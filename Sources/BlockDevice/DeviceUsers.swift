import Glibc

/// Who keeps a block device open, for messages: the processes with the device itself open,
/// the mount namespaces (a service's PrivateTmp or ProtectSystem copy of the host's mounts, an
/// `unshare -m`) where a filesystem on it is still mounted after it was unmounted here, and
/// the devices stacked on it.
public enum DeviceUsers {
    /// One line per user of `device`, e.g. `pid 812 (lvm)`, `a mount on /srv in the mount
    /// namespace of pid 77 (sleep); `nsenter -t 77 -m umount /srv` unmounts it there`,
    /// `dm-7 (vg-website-real), stacked on it`. Empty
    /// when nothing that can be named has it open.
    /// - Note: scans /proc/PID/fd, /proc/PID/ns/mnt with /proc/PID/mountinfo, and
    ///   /sys/dev/block/M:m/holders.
    public static func describe(_ device: DeviceNumber) -> [String] {
        var users = Mounts.processes(holdingDevice: device).map(\.description)
        users += otherNamespaceMounts(of: device)
        for holder in BlockDevices.holders(of: device) {
            let kernel = BlockDevices.kernelName(of: holder) ?? "\(holder)"
            let name = Sys.readSmallFile("/sys/dev/block/\(holder)/dm/name")?.trimmingWhitespace()
            users.append("\(kernel)\(name.map { " (\($0))" } ?? ""), stacked on it")
        }
        return users
    }

    /// The mounts of `device` in mount namespaces other than this process's, one per namespace.
    static func otherNamespaceMounts(of device: DeviceNumber) -> [String] {
        let mine = Sys.readlink("/proc/self/ns/mnt")
        var seen: Set<String> = []
        var found: [String] = []
        for name in Sys.listDirectory("/proc") {
            guard let pid = Int32(name), let namespace = Sys.readlink("/proc/\(pid)/ns/mnt"), namespace != mine,
                seen.insert(namespace).inserted,
                let entry = (try? LibMount.readTable("/proc/\(pid)/mountinfo"))?.first(where: { $0.device == device })
            else { continue }
            let command = Sys.readSmallFile("/proc/\(pid)/comm")?.trimmingWhitespace() ?? "?"
            let plain = entry.target.allSatisfy { $0.isLetter || $0.isNumber || "/._-+:@".contains($0) }
            let target = plain ? entry.target : "'" + entry.target.map { $0 == "'" ? "'\\''" : String($0) }.joined() + "'"
            found.append("a mount on \(entry.target) in the mount namespace of pid \(pid) (\(command)); `nsenter -t \(pid) -m umount \(target)` unmounts it there")
        }
        return found
    }
}
