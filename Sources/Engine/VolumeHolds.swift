import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// Volumes kept from the boot's mounts until guard has stacked their snapshot again.
///
/// With lvm2's event-based activation a volume group is activated when its last disk appears,
/// which can be after guard-reassemble.service has finished (an iSCSI disk, a LUKS container
/// unlocked late, a slow controller); systemd then mounts its volumes at once, and a write to
/// an origin without its snapshot-origin table makes the kept snapshot stale. guard's udev
/// rule (`90-guard-hold.rules`) marks such a volume not ready for systemd (`SYSTEMD_READY=0`:
/// nothing mounts, checks or swaps on it) while `/etc/guard/held/<DM UUID>` exists and
/// `/run/guard/ready/<DM UUID>` does not, and starts `guard-hold@<device>.service`, which
/// runs `guard recover --boot --device` and so marks it ready.
///
/// The held marker is on the root filesystem, there before any other volume: written when a
/// run's snapshot goes live, removed once no open run has a snapshot of the volume. The ready
/// marker is in /run, gone at each boot, and is written before the held one: a udev event on
/// a mounted volume during a run never takes it from systemd (which would unmount it).
public struct VolumeHolds: Sendable {
    /// The rule's file name, in one of udev's rule directories.
    public static let ruleName = "90-guard-hold.rules"
    static let ruleDirectories = ["/etc/udev/rules.d", "/run/udev/rules.d", "/usr/local/lib/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d"]

    public let heldDirectory: String
    public let readyDirectory: String
    /// The udev rule is installed: without it a marker holds nothing, and none is written.
    public let ruleInstalled: Bool

    public init(heldDirectory: String = "/etc/guard/held", readyDirectory: String = "/run/guard/ready", ruleInstalled: Bool? = nil) {
        self.heldDirectory = heldDirectory
        self.readyDirectory = readyDirectory
        self.ruleInstalled = ruleInstalled ?? Self.ruleDirectories.contains { FileManager.default.fileExists(atPath: "\($0)/\(Self.ruleName)") }
    }

    /// Whether the rule can hold the volume with this device-mapper UUID: a volume guard does
    /// not make itself (guard's own volumes appear only when guard activates them), with a
    /// UUID that is a file name.
    static func holdable(_ uuid: String) -> Bool {
        !uuid.isEmpty && !uuid.hasPrefix(DeviceMapper.uuidPrefix) && !uuid.contains("/") && !uuid.hasPrefix(".")
    }

    /// Whether a snapshot's origin is held at boot: not a thin snapshot (no stack to put back),
    /// a holdable volume, not / or /usr (the initramfs stacks those before it mounts them).
    static func isHeldAtBoot(_ stack: SnapshotStack, mountPoint: String?) -> Bool {
        stack.thin == nil && holdable(stack.originUUID) && !(mountPoint.map(Planner.earlyMountPoints.contains) ?? false)
    }

    /// The device-mapper UUID of `device` (a path, or a kernel name such as dm-7), for
    /// `guard recover --boot --device`.
    public static func volumeUUID(_ device: String, context: GuardContext) throws -> String {
        let path = device.hasPrefix("/") ? device : "/dev/\(device)"
        let number: DeviceNumber
        do {
            number = try BlockDevices.deviceNumber(of: path)
        } catch {
            throw GuardFailure(.refused, "\(path): \(error); nothing was touched")
        }
        guard let volume = try context.dm().info(.number(number)), !volume.uuid.isEmpty else {
            throw GuardFailure(.refused, "\(path) is not a device-mapper volume with a UUID; nothing was touched")
        }
        return volume.uuid
    }

    /// Whether the volume is held at this boot until guard marks it ready.
    public func isHeld(uuid: String) -> Bool {
        ruleInstalled && Self.holdable(uuid) && FileManager.default.fileExists(atPath: "\(heldDirectory)/\(uuid)")
            && !FileManager.default.fileExists(atPath: "\(readyDirectory)/\(uuid)")
    }

    /// A volume an open run needs held, and whether it may be released now.
    struct Need {
        var run: Int64
        var name: String
        /// Its snapshot is live again, and so is every other snapshot of a run whose outcome
        /// is not decided (or is a rollback): recovery may merge such a run at once when its
        /// last volume appears, so none of its volumes may be mounted before that.
        var ready: Bool
    }

    /// The volumes the journal's open runs need held: a snapshot that is, or may be, live or
    /// merging, of a volume that is not / or /usr (the initramfs stacks those before it mounts them).
    func needed(journal: Journal, engine: SnapshotEngine) throws -> [String: Need] {
        var needed: [String: Need] = [:]
        for run in try journal.runs(in: [.running, .kept, .merging, .needsReassembly]) {
            let stacks = try journal.snapshots(runID: run.id!).filter { [.preparing, .live, .merging].contains($0.state) }
                .compactMap { record in decodeStack(record.stack).map { (record, $0) } }
            let live = stacks.map { (try? engine.liveState($0.1))?.live == true }
            let undecided = run.decision == nil || run.decision == .rollback
            for ((record, stack), isLive) in zip(stacks, live) {
                guard Self.isHeldAtBoot(stack, mountPoint: record.mountPoint) else { continue }
                let ready = isLive && (!undecided || !live.contains(false))
                needed[stack.originUUID] = Need(run: run.id!, name: stack.originName, ready: ready && (needed[stack.originUUID]?.ready ?? true))
            }
        }
        return needed
    }

    /// At a take, once the snapshots are live and before any step: each volume is ready (this
    /// boot), then held (at the next). Without the rule installed, nothing.
    /// - Returns: the volumes whose marker could not be written (a warning: the hold is a
    ///   second line of defence, the boot units' order is the first).
    public func hold(_ records: [SnapshotRecord]) -> [String] {
        guard ruleInstalled else { return [] }
        var failed: [String] = []
        for record in records {
            guard let stack = decodeStack(record.stack), Self.isHeldAtBoot(stack, mountPoint: record.mountPoint) else { continue }
            do {
                try mark(readyDirectory, stack.originUUID, "")
                try mark(heldDirectory, stack.originUUID, "\(stack.originName)\n")
            } catch {
                failed.append("\(stack.originName) (\(error))")
            }
        }
        return failed
    }

    /// Brings the markers in line with the journal and the kernel: a needed volume whose
    /// snapshot is live is ready, and if it was held, udev is told again; a held marker that no
    /// open run needs goes, and its volume is released the same way.
    /// - Returns: what was done, for the report.
    public func reconcile(journal: Journal, engine: SnapshotEngine) throws -> [String] {
        guard ruleInstalled else { return [] }
        var actions: [String] = []
        let needed = try needed(journal: journal, engine: engine)
        for (uuid, need) in needed.sorted(by: { $0.key < $1.key }) {
            let wasHeld = isHeld(uuid: uuid)
            if need.ready { try mark(readyDirectory, uuid, "") }
            try mark(heldDirectory, uuid, "\(need.name)\n")
            if need.ready && wasHeld, try release(uuid, engine: engine) {
                actions.append("\(need.name) is ready for mounting: run \(need.run)'s snapshot of it is stacked again")
            }
        }
        let markers = (try? FileManager.default.contentsOfDirectory(atPath: heldDirectory)) ?? []
        for uuid in markers.sorted() where needed[uuid] == nil && Self.holdable(uuid) {
            let wasHeld = isHeld(uuid: uuid)
            let name = (try? String(contentsOfFile: "\(heldDirectory)/\(uuid)", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? uuid
            try FileManager.default.removeItem(atPath: "\(heldDirectory)/\(uuid)")
            if wasHeld, try release(uuid, engine: engine) {
                actions.append("\(name) is ready for mounting: no open run has a snapshot of it")
            }
        }
        return actions
    }

    /// Has udev look at the volume again (a synthetic `change` event), so that systemd sees
    /// it ready. - Returns: false when the volume is not active.
    func release(_ uuid: String, engine: SnapshotEngine) throws -> Bool {
        guard let info = try engine.dm.info(.uuid(uuid)) else { return false }
        let path = "/sys/dev/block/\(info.number.major):\(info.number.minor)/uevent"
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BlockDeviceError.syscall("open", errno: errno, operation: "the change event of \(info.name)") }
        defer { close(fd) }
        guard write(fd, "change", 6) == 6 else { throw BlockDeviceError.syscall("write", errno: errno, operation: "the change event of \(info.name)") }
        return true
    }

    /// Writes `directory/uuid` once (a marker that exists is left as it is), durably: the held
    /// marker must outlive a power cut right after the take.
    func mark(_ directory: String, _ uuid: String, _ text: String) throws {
        let path = "\(directory)/\(uuid)"
        if FileManager.default.fileExists(atPath: path) { return }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        try RawFile.replace(path, with: Array(text.utf8))
    }
}
