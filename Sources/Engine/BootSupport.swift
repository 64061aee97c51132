import BlockDevice
import Foundation
import Recipe

/// What lets guard snapshot a volume the initramfs mounts (/, /usr): guard's initramfs-tools
/// hook (Initramfs/hooks/guard) put this guard into the initramfs of the running kernel, with
/// the state directory on a volume the initramfs mounts before the root. Each time the hook
/// builds an initramfs it leaves a stamp, `<state directory>/initramfs/<kernel release>`, that
/// names the guard binary it copied (size and modification time) and the state volume.
public struct BootSupport: Sendable {
    /// Left in /run by the initramfs script once its `guard recover --boot --initramfs` ran
    /// (/run is carried over into the booted system).
    public static let marker = "/run/guard/initramfs"
    /// Left in /run by `guard recover --boot` (guard-reassemble.service) once it ran at this boot.
    public static let reassembledMarker = "/run/guard/reassembled"

    /// guard's systemd generator configured guard-reassemble-late.service at this boot: the
    /// state directory is on a filesystem of its own, and that unit reassembles after it is
    /// mounted and before the other filesystems are.
    public static var lateUnitConfigured: Bool {
        FileManager.default.fileExists(atPath: "/run/systemd/generator/guard-reassemble-late.service.d/guard.conf")
    }

    /// Where systemd looks for guard's generator.
    static let generatorPaths = ["/etc/systemd/system-generators", "/usr/local/lib/systemd/system-generators", "/usr/lib/systemd/system-generators"].map { $0 + "/guard-generator" }

    /// On a systemd host, why the boot could not reach `directories` (the state directory, the
    /// COW directories) before it mounts a guarded volume that is not / or /usr, or nil. On the
    /// root filesystem they are reached by guard-reassemble.service; on a filesystem of its own
    /// that /etc/fstab mounts, by guard-reassemble-late.service, which guard's generator orders
    /// (installed with guard); anywhere else, not at all.
    public static func bootReachabilityProblem(_ directories: [String], fstab: String = "/etc/fstab", systemd: Bool = FileManager.default.fileExists(atPath: "/run/systemd/system"))
        -> String?
    {
        guard systemd else { return nil }  // no systemd: `guard recover` before the mounts, by hand (guard-recover(8))
        for directory in directories {
            guard let holder = Mounts.mountPoint(holding: directory), !["/", "/usr"].contains(holder) else { continue }
            guard Mounts.fstabFileSystem(holding: directory, fstab: fstab) == holder else {
                return
                    "\(directory) is on \(holder), which /etc/fstab does not mount: after a power loss the boot would mount the guarded volumes before anything could reach it, and a kept snapshot would go stale; put guard's state and COW directories on / or on a filesystem /etc/fstab mounts (state_dir and cow_dir in guard.conf, or --state-dir)"
            }
            guard generatorPaths.contains(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
                return
                    "\(directory) is on \(holder), a filesystem /etc/fstab mounts after guard-reassemble.service runs, and guard's systemd generator (guard-generator, which orders guard-reassemble-late.service after it and before the other filesystems) is not installed; install guard with its units (Scripts/install or the package), or put the state and COW directories on /"
            }
        }
        return nil
    }

    /// Whether this boot's reassembly ran (the boot unit, or the initramfs's recovery).
    public static var reassemblyRanThisBoot: Bool {
        FileManager.default.fileExists(atPath: reassembledMarker) || initramfsStatus() == "0"
    }

    /// Leaves `reassembledMarker` (best effort: /run may not be writable in a test).
    static func markReassembled(at now: Double) {
        try? FileManager.default.createDirectory(atPath: "/run/guard", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        try? "\(Int(now))\n".write(toFile: reassembledMarker, atomically: true, encoding: .utf8)
    }

    /// The exit status the initramfs script left in `marker` ("0" when its recovery succeeded),
    /// or nil when there is no marker (this boot had no guard in its initramfs).
    static func initramfsStatus(marker: String = marker) -> String? {
        guard let text = try? String(contentsOfFile: marker, encoding: .utf8) else { return nil }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    public let stateDirectory: String

    public init(stateDirectory: String) { self.stateDirectory = stateDirectory }

    public var stampDirectory: String { stateDirectory + "/initramfs" }

    /// The running kernel's release (`uname -r`).
    static var kernelRelease: String {
        var names = utsname()
        uname(&names)
        return withUnsafeBytes(of: &names.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    /// The stamp's `guard=` value for this guard's own binary: "size:mtime".
    static var ownBinary: String? {
        var info = stat()
        guard stat("/proc/self/exe", &info) == 0 else { return nil }
        return "\(info.st_size):\(info.st_mtim.tv_sec)"
    }

    /// Why guard cannot yet take a snapshot of a volume the initramfs mounts on `target`, or nil.
    /// - Parameter cow: the recipe's `cow:`; such a volume needs a COW device (a COW file would
    ///   keep the state volume busy in the initramfs, which must unmount it before the root).
    public func problem(target: String, cow: CowLocation?) -> String? {
        initramfsProblem(target: target) ?? Self.cowProblem(target: target, cow: cow)
    }

    /// Why the initramfs of the running kernel cannot yet reassemble or merge `target` at boot
    /// (no stamp, or a stamp naming another guard binary than this one), or nil.
    public func initramfsProblem(target: String) -> String? {
        let release = Self.kernelRelease
        let stamp = "\(stampDirectory)/\(release)"
        guard let text = try? String(contentsOfFile: stamp, encoding: .utf8) else {
            return
                "\(target) is mounted and written by the initramfs, before guard-reassemble.service runs: after a power loss its snapshot could not be reassembled in time and the rollback would be lost. guard refuses it until it reassembles in the initramfs: no initramfs of this kernel (\(release)) carries guard (no \(stamp))"
        }
        let fields = Dictionary(
            text.split(separator: "\n").compactMap { line -> (String, String)? in
                guard let equals = line.firstIndex(of: "=") else { return nil }
                return (String(line[..<equals]), String(line[line.index(after: equals)...]))
            }, uniquingKeysWith: { $1 })
        if let copied = fields["guard"], let own = Self.ownBinary, copied != own {
            return
                "the initramfs of this kernel (\(release)) holds another guard binary than this one (\(stamp) says \(copied), this one is \(own)): run `update-initramfs -u` so that the guard that reassembles \(target) at boot is this one"
        }
        return nil
    }

    /// Why `cow` cannot hold the snapshot of a volume the initramfs mounts, or nil.
    static func cowProblem(target: String, cow: CowLocation?) -> String? {
        switch cow {
        case .device?: return nil
        default:
            return
                "\(target) needs a COW device (`cow: /dev/VG/LV` in the recipe): a COW file would keep the state volume busy in the initramfs, which unmounts it before it mounts \(target)"
        }
    }
}
