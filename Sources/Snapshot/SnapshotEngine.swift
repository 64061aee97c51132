import BlockDevice
import DeviceMapper
import Foundation
import Quantities

/// Resumes devices if guard dies or stalls while they are suspended.
///
/// `arm` must return only once the watchdog is ready to act (a separate process that
/// does not depend on any suspended volume); `disarm` after the last resume.
public protocol WindowWatchdog: AnyObject {
    /// If `disarm()` does not follow within `timeout`, or this process dies, finish the window
    /// `plan` describes: once any of its devices is suspended, suspend the rest in order, resume
    /// in order, then remove what must never be live again.
    func arm(_ plan: WatchdogPlan, timeout: Duration) throws
    /// - Returns: false when the watchdog did not confirm: it fired (and resumed the devices
    ///   itself) or died; the caller says so.
    @discardableResult
    func disarm() -> Bool
}

/// guard's own implementation of `lvcreate -s`, the removal of a snapshot, and
/// `lvconvert --merge`, for any active device-mapper volume (an LVM LV or a guard volume).
///
/// Every operation is written so that it can be repeated after a crash at any line: it
/// looks at what the kernel has (by GUARD- UUID) and the COW label, and does what is left.
/// The order of kernel calls is lvm2's (lib/activate/dev_manager.c, libdm/libdm-deptree.c).
/// How the loop device of a COW file writes it: through the backing file's page cache
/// (`buffered`), or with direct I/O (`direct`), over a file whose extents were written with
/// zeros when it was made (`directZeroed`). See `Scripts/bench`, section 4b.
public enum CowFileIO: String, Sendable {
    case buffered, direct
    case directZeroed = "direct-zeroed"
    public static let `default`: CowFileIO = .directZeroed
}

public struct SnapshotEngine {
    /// 4 KiB chunks (8 sectors), lvm2's default; `Scripts/bench` compares 4, 16 and 64 KiB.
    public static let defaultChunkSectors: UInt32 = 8

    /// How a COW file is written by its loop device (see `CowFileIO`).
    public static var cowFileIO: CowFileIO {
        if TestHooks.isEnabled, let value = getenv("GUARD_COW_IO").map({ String(cString: $0) }), let io = CowFileIO(rawValue: value) { return io }
        return .default
    }
    /// How long a suspend window may last before the watchdog resumes everything.
    public static let defaultWatchdogTimeout: Duration = .seconds(30)

    public let dm: DeviceMapper
    public var watchdog: (any WindowWatchdog)?
    public var watchdogTimeout: Duration = SnapshotEngine.defaultWatchdogTimeout
    /// Receives one line per step, for guard's log. Never called while a device is suspended.
    public var log: (@Sendable (String) -> Void)?
    /// Receives what the admin should see as it happens (a wait of seconds and what it waits for).
    public var notice: (@Sendable (String) -> Void)?

    public init(dm: DeviceMapper, watchdog: (any WindowWatchdog)? = nil, log: (@Sendable (String) -> Void)? = nil) {
        self.dm = dm
        self.watchdog = watchdog
        self.log = log
    }

    // MARK: Origins

    /// An origin as guard found it: its device, table and size.
    public struct Origin: Sendable, Hashable {
        public var info: DeviceInfo
        public var table: Table
        public var bytes: UInt64 { table.lengthSectors * 512 }
    }

    /// Finds the active dm volume behind `path` (/dev/mapper/X, /dev/VG/LV, /dev/dm-N or a dm name)
    /// and checks that guard can snapshot it.
    ///
    /// - Throws: `SnapshotError` with `.originNotFound`, `.notAVolume` or `.alreadySnapshotted`.
    public func inspectOrigin(_ path: String) throws -> Origin {
        let operation = "snapshot of \(path)"
        let ref: DeviceRef
        if path.hasPrefix("/") {
            let number: DeviceNumber
            do {
                number = try BlockDevices.deviceNumber(of: path)
            } catch {
                throw SnapshotError(.originNotFound, operation, "\(error)", hint: "check the device path (lvs, dmsetup ls)")
            }
            guard BlockDevices.deviceMapperName(of: number) != nil else {
                throw SnapshotError(
                    .notAVolume, operation, "\(path) (\(number)) is not a device-mapper device",
                    hint: "guard snapshots LVM logical volumes and guard volumes (`guard volume create`)")
            }
            ref = .number(number)
        } else {
            ref = .name(path)
        }
        guard let info = try dm.info(ref) else {
            throw SnapshotError(.originNotFound, operation, "no device-mapper device \(path)", hint: "check `dmsetup ls`")
        }
        guard info.hasLiveTable else {
            throw SnapshotError(.notAVolume, operation, "\(info.name) has no live table (it is not active)")
        }
        if info.isSuspended {
            throw SnapshotError(.inUse, operation, "\(info.name) is suspended", hint: "resume it (`dmsetup resume \(info.name)`) or run `guard recover`")
        }
        if info.hasInactiveTable {
            throw SnapshotError(
                .inUse, operation, "\(info.name) has an inactive table loaded (another tool is changing it)", hint: "run `guard recover` or `dmsetup clear \(info.name)`")
        }
        if let (identity, layer) = StackIdentity.parse(uuid: info.uuid) {
            throw SnapshotError(.alreadySnapshotted, operation, "\(info.name) is guard's own \(layer.rawValue) layer of run \(identity.runToken)")
        }
        let table = try dm.table(ref)
        for line in table.lines {
            switch line.target {
            case .snapshotOrigin:
                throw SnapshotError(
                    .alreadySnapshotted, operation, "\(info.name) already has a snapshot (its table is snapshot-origin)",
                    hint: "commit or roll back the earlier run (`guard status`), or remove the LVM snapshot (`lvs`)")
            case .snapshotMerge:
                throw SnapshotError(.mergeInProgress, operation, "\(info.name) is merging a snapshot", hint: "wait for it (`guard status --wait`)")
            case .writeFuse:
                throw SnapshotError(
                    .alreadySnapshotted, operation, "\(info.name) has a snapshot and refuses writes (guard's fuse)",
                    hint: "roll back or commit the earlier run (`guard status`)")
            case .snapshot:
                throw SnapshotError(.notAVolume, operation, "\(info.name) is itself a snapshot")
            default: continue
            }
        }
        // A classic snapshot's -real runs the origin's own table a second time: proven end to end
        // for these targets only (a guard thin volume takes thin snapshots in its pool instead).
        let unproven = table.unprovenTargets.filter { !($0 == "thin" && info.uuid.hasPrefix(DeviceMapper.uuidPrefix + "VOL-")) }
        if !unproven.isEmpty {
            throw SnapshotError(
                .notAVolume, operation,
                "\(info.name) is a \(unproven.joined(separator: "/")) volume: guard's snapshot is not proven on it (a target that keeps state of its own must never run twice over the same devices, and guard's suite has not shown that it does not)",
                hint: "snapshot it with lvm2 (`lvcreate -s`); guard snapshots linear, striped, crypt, raid1 and writecache volumes")
        }
        return Origin(info: info, table: table)
    }

    /// Whether `device` is a dm-crypt device or stacked on one: what it reads is decrypted, so a
    /// snapshot's COW of it holds plaintext.
    public func isOnEncryption(_ device: DeviceNumber) -> Bool {
        ([device] + BlockDevices.allLowerDevices(of: device)).contains { number in
            BlockDevices.deviceMapperName(of: number) != nil && (try? dm.table(.number(number)))?.lines.contains { $0.target.typeName == "crypt" } == true
        }
    }

    /// Whether what is written in `directory` may land on `origin` (its filesystem is on it or on
    /// something stacked over it). A filesystem whose devices cannot be told (FUSE, NFS) counts
    /// as on it: guard never puts what a merge would roll back where it cannot check.
    public static func isOnDevice(_ directory: String, _ origin: DeviceNumber) -> Bool {
        guard let devices = Mounts.backingDevices(of: directory) else { return true }
        return devices.contains { $0 == origin || BlockDevices.allLowerDevices(of: $0).contains(origin) }
    }
}
