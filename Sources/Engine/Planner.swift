import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

/// One volume of a recipe, resolved against the running system.
public struct PlannedVolume: Sendable {
    public var index: Int
    public var spec: VolumeSpec
    /// /dev/mapper/NAME of the origin.
    public var originPath: String
    public var info: DeviceInfo
    public var originBytes: UInt64
    /// Where it is mounted now (the recipe's mount point first).
    public var mounts: [MountEntry]
    /// The mount point the recipe names, or the current one.
    public var mountPoint: String?
    public var storage: VolumeRequest.Storage
    /// The snapshot's size: COW space for changes, where `stop_at` and the fuse apply.
    public var cowBytes: UInt64
    /// COW space beyond it, so a burst between a reading and the fuse cannot overflow the COW
    /// (`CowGeometry.fuseReserve`); the COW file (or device) holds both.
    public var reserveBytes: UInt64
    public var chunkSectors: UInt32
    public var extensionPolicy: ExtensionPolicy?
    /// Free bytes where the COW file goes (nil for a device).
    public var freeBytes: UInt64?
    /// How the size was chosen ("25 MiB as written", "auto: 1.5 × peak 12 MiB of 3 runs").
    public var sizeNote: String
    /// The growth policy is guard.conf's `extend` (the recipe has none for this volume).
    public var extensionFromConfiguration: Bool
    /// What earlier runs of the same recipe saw on this volume (nil: no earlier run).
    public var history: PeakUse?

    public var request: VolumeRequest {
        VolumeRequest(origin: originPath, storage: storage, size: .bytes(cowBytes), chunkSectors: chunkSectors, reserveBytes: reserveBytes)
    }

    /// The key of this volume's lock: its dm UUID, or its name.
    public var lockKey: String { info.uuid.isEmpty ? info.name : info.uuid }
}

/// A recipe resolved into what a run will do.
public struct Plan: Sendable {
    public var recipe: Recipe
    public var volumes: [PlannedVolume]
    /// Problems that stop a run (preflight refusals), each naming the recipe line.
    public var problems: [String]
    /// Things worth knowing that do not stop a run.
    public var warnings: [String]
    /// The problems that are another guard command at work on a volume (a run's steps, a
    /// merge): the same run can be tried again once it is done.
    public var busy: Set<String> = []

    /// Every problem is another guard command at work: trying later is the fix (exit 75).
    public var onlyBusy: Bool { !problems.isEmpty && problems.allSatisfy(busy.contains) }
}

/// Resolves recipes against the system: devices, sizes, COW locations, free space.
public struct Planner {
    public let context: GuardContext

    public init(context: GuardContext) { self.context = context }

    /// How a COW of `cowBytes` (plus its fuse reserve) grows by `extend` on a volume of
    /// `originBytes`: the policy, or nil when the maximum size (never more than the whole origin
    /// once) is not above the size. The policy's maximum counts the storage: label and reserve
    /// included. The planner and `guard monitor` (for kept runs) resolve policies alike.
    public static func growth(_ extend: ExtendSpec, originBytes: UInt64, cowBytes: UInt64, reserveBytes: UInt64, geometry: CowGeometry) -> (
        policy: ExtensionPolicy?, maximum: UInt64
    ) {
        func bytes(_ size: SizeSpec) -> UInt64 { size.bytes(originBytes: originBytes, auto: cowBytes) }
        let maximum = min(geometry.roundUp(bytes(extend.max)), geometry.bytesForWholeOrigin(originBytes))
        guard maximum > cowBytes else { return (nil, maximum) }
        return (ExtensionPolicy(threshold: extend.at, stepBytes: geometry.roundUp(bytes(extend.by)), maximumBytes: maximum + reserveBytes + CowLabel.areaOffset), maximum)
    }

    /// Resolves every volume; collects every problem instead of stopping at the first.
    public func plan(_ recipe: Recipe) throws -> Plan {
        let dm = try context.dm()
        let engine = SnapshotEngine(dm: dm)
        var problems: [String] = []
        var warnings: [String] = []
        var busy: Set<String> = []
        var volumes: [PlannedVolume] = []
        let peaks = (try? context.existingJournal()?.peakUse(recipe: recipe.name)) ?? [:]
        let configuration = context.configuration
        func at(_ volume: VolumeSpec) -> String { "\(recipe.path):\(volume.location.line):\(volume.location.column)" }

        for (index, spec) in recipe.volumes.enumerated() {
            let path: String
            do {
                path = try resolveDevice(spec.device)
            } catch {
                problems.append("\(at(spec)): \(error)")
                continue
            }
            let origin: SnapshotEngine.Origin
            do {
                origin = try engine.inspectOrigin(path)
            } catch let error as SnapshotError where error.code == .alreadySnapshotted {
                var message = "\(at(spec)): \(error)"
                if let run = try? keptRun(onOrigin: path) {
                    let id = run.id ?? 0
                    switch run.state {
                    case .running:
                        message =
                            "\(at(spec)): \(path) is being upgraded by run \(id) (pid \(run.pid), started \(formatDate(run.startedAt))); wait for it to finish, or run `guard recover` if it died"
                        if kill(run.pid, 0) == 0 || errno == EPERM { busy.insert(message) }
                    case .merging:
                        message = "\(at(spec)): \(path) is being rolled back by run \(id); wait for the merge (`guard status --wait`)"
                        busy.insert(message)
                    default:
                        message = "\(at(spec)): \(path) has the kept snapshot of run \(id); `guard commit \(id)` or `guard rollback \(id)` first"
                    }
                }
                problems.append(message)
                continue
            } catch {
                problems.append("\(at(spec)): \(error)")
                continue
            }
            // btrfs knows its devices by the filesystem's UUID, which a snapshot shares: a mounted
            // snapshot can be taken for the volume (or the volume for it). Refused, by the mount
            // table (btrfs mounts show an anonymous device) or by the signature on the volume.
            let btrfs =
                ((try? Mounts.current()) ?? []).contains { $0.fileSystemType == "btrfs" && (try? BlockDevices.deviceNumber(of: $0.source)) == origin.info.number }
                || ((try? BlockDevices.signatures(of: origin.info.path)) ?? []).contains { $0.hasPrefix("btrfs") }
            if btrfs {
                problems.append(
                    "\(at(spec)): \(origin.info.path) holds btrfs, which tells its devices apart by the filesystem's UUID, which a snapshot shares; guard does not snapshot btrfs volumes: use btrfs's own snapshots (`btrfs subvolume snapshot`)"
                )
                continue
            }
            let mounts = Mounts.mountPoints(of: origin.info.number)
            // Mounted before guard-reassemble.service can run at boot: after a power loss the
            // volume is written before its snapshot is stacked again, and the rollback is lost,
            // unless guard's initramfs hook reassembles it before the initramfs mounts it.
            if let early = mounts.first(where: { Planner.earlyMountPoints.contains($0.target) }),
                let problem = BootSupport(stateDirectory: context.stateDirectory).problem(target: early.target, cow: spec.cow)
            {
                problems.append(
                    "\(at(spec)): \(origin.info.path) is mounted on \(early.target): \(problem); or snapshot the volumes that hold the data instead (/srv, /var/lib/...)")
                continue
            }
            // A thin volume's pool needs dm-thin-pool and thin_check, which the initramfs does not carry.
            if let early = mounts.first(where: { Planner.earlyMountPoints.contains($0.target) }), origin.table.lines.contains(where: { $0.target.typeName == "thin" }) {
                problems.append(
                    "\(at(spec)): \(origin.info.path) is a thin volume mounted on \(early.target): its snapshot would have to be handled in the initramfs, which carries neither dm-thin-pool nor thin_check; guard refuses it; snapshot the volumes that hold the data instead"
                )
                continue
            }
            // A snapshot of this volume that holds old blocks but is not live (no reassembly
            // after a reboot): a new snapshot would bury it.
            if let run = try? openRun(onOrigin: origin.info.uuid) {
                problems.append(
                    "\(at(spec)): run \(run.id ?? 0) (\(run.state.rawValue)) still owns a snapshot of \(origin.info.path) that is not live; run `guard recover` (or `guard status` to see what it needs) first"
                )
                continue
            }
            var mountPoint = spec.mount
            if let wanted = spec.mount {
                if !mounts.contains(where: { $0.target == Mounts.normalize(wanted) }) {
                    if mounts.isEmpty {
                        warnings.append("\(at(spec)): \(origin.info.path) is not mounted (the recipe names \(wanted)); guard will not mount it")
                    } else {
                        problems.append("\(at(spec)): \(origin.info.path) is mounted on \(mounts.map(\.target).joined(separator: ", ")), not on \(wanted) as the recipe says")
                    }
                }
            } else {
                mountPoint = mounts.first?.target
            }

            // A thin guard volume of this state directory: its snapshot is a thin device of its pool.
            if let (registry, layout, pool) = thinVolume(origin, dm: dm) {
                if spec.cow != nil {
                    warnings.append("\(at(spec)): \(origin.info.path) is a thin guard volume: its snapshot is in its pool, so `cow:` does not apply")
                }
                // `extend:` grows the pool (sizes in % are of the volume, as for a COW).
                var policy: ExtensionPolicy?
                if let extend = spec.extend {
                    let growth = Self.thinGrowth(extend, originBytes: origin.bytes, poolBytes: layout.dataBytes, blockBytes: layout.blockBytes)
                    policy = growth.policy
                    if policy == nil {
                        warnings.append("\(at(spec)): extend.max (\(formatBytes(growth.maximum))) is not above the pool's \(formatBytes(layout.dataBytes)); the pool will not grow")
                    }
                }
                // The size is the room the run needs in the pool. `size: auto` sizes the pool:
                // it grows before the snapshot where it has less free; a size as written is
                // refused instead (a run that changes that much would fill the pool).
                var poolBytes = layout.dataBytes
                var sizeNote = "thin: a snapshot in the volume's \(formatBytes(layout.dataBytes)) pool, nothing copied on write"
                if let status = try? dm.thinPoolStatus(.number(pool)) {
                    let room = Self.room(spec.size, originBytes: origin.bytes, history: peaks[index], recipe: recipe.name)
                    let used = status.usedDataBlocks * layout.blockBytes
                    let free = layout.dataBytes > used ? layout.dataBytes - used : 0
                    sizeNote += "; \(formatBytes(free)) free, the run needs \(formatBytes(room.bytes)) (\(room.note))"
                    if free < room.bytes {
                        let wanted = (used + room.bytes + layout.blockBytes - 1) / layout.blockBytes * layout.blockBytes
                        if case .auto = spec.size {
                            if let problem = GuardVolumes.poolGrowthProblem(registry: registry, to: wanted) {
                                problems.append(
                                    "\(at(spec)): the pool of \(origin.info.path) has \(formatBytes(free)) free and the run needs \(formatBytes(room.bytes)); it cannot grow to \(formatBytes(wanted)): \(problem)"
                                )
                            } else {
                                poolBytes = wanted
                                sizeNote += "; the pool grows to \(formatBytes(wanted)) before the snapshot"
                            }
                        } else {
                            problems.append(
                                "\(at(spec)): the pool of \(origin.info.path) has \(formatBytes(free)) free, less than the snapshot's \(formatBytes(room.bytes)): a run that changes that much fills the pool and fails the volume's writes; grow it (`guard volume extend \(origin.info.name) --pool-size \(formatBytes(wanted))`), give a smaller size, or size: auto (guard grows the pool)"
                            )
                        }
                    }
                }
                volumes.append(
                    PlannedVolume(
                        index: index, spec: spec, originPath: origin.info.path, info: origin.info, originBytes: origin.bytes,
                        mounts: mounts, mountPoint: mountPoint, storage: .thinPool(registry: registry), cowBytes: poolBytes, reserveBytes: 0,
                        chunkSectors: layout.blockSectors, extensionPolicy: policy, freeBytes: nil,
                        sizeNote: sizeNote, extensionFromConfiguration: false, history: peaks[index]))
                continue
            }

            let chunkBytes = spec.chunkBytes ?? UInt64(SnapshotEngine.defaultChunkSectors) * 512
            let chunkSectors = UInt32(chunkBytes / 512)
            let geometry = CowGeometry(chunkSectors: chunkSectors)
            let room = Self.room(spec.size, originBytes: origin.bytes, history: peaks[index], recipe: recipe.name)
            var sizeNote = room.note
            var cowBytes: UInt64
            if case .percent(let percent) = spec.size {
                cowBytes = CowSize.percentOfOrigin(percent).resolve(originBytes: origin.bytes, geometry: geometry)
            } else {
                cowBytes = CowSize.bytes(room.bytes).resolve(originBytes: origin.bytes, geometry: geometry)
            }
            // Never more than can ever be used: every chunk of the origin once.
            let ceiling = geometry.bytesForWholeOrigin(origin.bytes)
            if cowBytes > ceiling {
                cowBytes = ceiling
                sizeNote += ", capped at \(formatBytes(ceiling)) (the whole volume changed)"
            }

            var storage: VolumeRequest.Storage
            var freeBytes: UInt64?
            switch spec.cow {
            case .device(let device)?:
                storage = .blockDevice(path: device)
            case .directory(let directory)?:
                storage = .fileIn(directory: directory)
            case nil:
                storage = .fileIn(directory: context.cowDirectory)
            }
            if case .blockDevice(let device) = storage, let problem = SnapshotEngine.cowDeviceProblem(device) {
                problems.append("\(at(spec)): \(problem)")
            }
            // The COW holds the origin's blocks as the origin reads them: an encrypted origin's in
            // plaintext, unless the COW is on encrypted storage too.
            if engine.isOnEncryption(origin.info.number) {
                let cowDevice: DeviceNumber?
                switch storage {
                case .fileIn(let directory): cowDevice = try? BlockDevices.filesystemDevice(of: nearestExisting(directory))
                case .blockDevice(let path): cowDevice = try? BlockDevices.deviceNumber(of: path)
                case .thinPool: cowDevice = origin.info.number  // (thin volumes are planned above)
                }
                if !(cowDevice.map(engine.isOnEncryption) ?? false) {
                    warnings.append(
                        "\(at(spec)): \(origin.info.path) is encrypted (dm-crypt) but its COW (\(storage.place)) is not: the COW will hold the volume's old blocks decrypted; put it on encrypted storage (`cow:` in the recipe, or cow_dir in guard.conf)"
                    )
                }
            }
            // A COW file gets the fuse reserve on top; a device has what it has beyond the size.
            let reserveBytes = storage.isDevice ? 0 : geometry.fuseReserve(forSize: cowBytes, originBytes: origin.bytes)
            if case .fileIn(let directory) = storage {
                let existing = nearestExisting(directory)
                freeBytes = try? freeSpace(at: existing)
                let needed = cowBytes + reserveBytes + CowLabel.areaOffset
                if let freeBytes, freeBytes < needed + (16 << 20) {
                    problems.append(
                        "\(at(spec)): the COW needs \(formatBytes(needed)) in \(directory) (\(formatBytes(cowBytes)) and \(formatBytes(reserveBytes)) of fuse reserve), which has \(formatBytes(freeBytes)) free"
                    )
                }
            }

            var policy: ExtensionPolicy?
            // guard.conf's policy for a COW file whose recipe has none.
            let configured = spec.extend == nil && !storage.isDevice ? configuration.extend : nil
            if let extend = spec.extend ?? configured {
                let growth = Self.growth(extend, originBytes: origin.bytes, cowBytes: cowBytes, reserveBytes: reserveBytes, geometry: geometry)
                if growth.policy == nil && configured == nil {
                    // (guard.conf's policy that does not fit a volume is left out silently.)
                    warnings.append("\(at(spec)): extend.max (\(formatBytes(growth.maximum))) is not above the snapshot size; the COW will not grow")
                }
                policy = growth.policy
            }

            // What earlier runs needed, against the most this snapshot can ever hold.
            let capacity = policy.map { $0.maximumBytes - CowLabel.areaOffset - reserveBytes } ?? cowBytes
            if let history = peaks[index], UInt64(history.peakBytes) > capacity {
                warnings.append(
                    "\(at(spec)): earlier runs of \(recipe.name) used up to \(formatBytes(UInt64(history.peakBytes))) of COW on \(origin.info.path), more than this snapshot can hold (\(formatBytes(capacity))); it may fill: give a larger size, size: auto, or an extend policy"
                )
            }

            volumes.append(
                PlannedVolume(
                    index: index, spec: spec, originPath: origin.info.path, info: origin.info, originBytes: origin.bytes,
                    mounts: mounts, mountPoint: mountPoint, storage: storage, cowBytes: cowBytes, reserveBytes: reserveBytes, chunkSectors: chunkSectors,
                    extensionPolicy: policy, freeBytes: freeBytes, sizeNote: sizeNote, extensionFromConfiguration: policy != nil && configured != nil,
                    history: peaks[index]))
        }

        // The same device named twice under different spellings.
        var seen: [DeviceNumber: Int] = [:]
        for volume in volumes {
            if let first = seen[volume.info.number] {
                problems.append("\(at(volume.spec)): \(volume.originPath) is the same device as volume \(first + 1)")
            }
            seen[volume.info.number] = volume.index
        }
        // Nothing guard writes may live on a volume it snapshots: a merge would roll it back.
        for volume in volumes {
            let state = nearestExisting(context.stateDirectory)
            if SnapshotEngine.isOnDevice(state, volume.info.number) {
                let why = Mounts.backingDevices(of: state) == nil ? "may be on \(volume.originPath) (guard cannot tell which device holds it)" : "is on \(volume.originPath)"
                problems.append(
                    "\(at(volume.spec)): guard's state directory \(context.stateDirectory) (journal, COW files) \(why), which this recipe snapshots; use --state-dir on a filesystem on another block device"
                )
            }
            for other in volumes {
                if case .fileIn(let directory) = other.storage, SnapshotEngine.isOnDevice(nearestExisting(directory), volume.info.number) {
                    let why =
                        Mounts.backingDevices(of: nearestExisting(directory)) == nil
                        ? "may be on \(volume.originPath) (guard cannot tell which device holds it)" : "is on \(volume.originPath)"
                    problems.append("\(at(other.spec)): the COW directory \(directory) \(why), which this recipe snapshots; put it on a filesystem on another block device")
                }
            }
        }
        // After a power loss, the boot must reach the journal and the COW files before it mounts
        // a guarded volume (the initramfs does it for / and /usr, from the COW device).
        let later = volumes.filter { volume in !volume.mounts.contains { Planner.earlyMountPoints.contains($0.target) } }
        if !later.isEmpty {
            let directories =
                [context.stateDirectory]
                + later.compactMap { volume -> String? in
                    if case .fileIn(let directory) = volume.storage { return directory }
                    return nil
                }
            if let problem = BootSupport.bootReachabilityProblem(Array(Set(directories)).sorted()) {
                problems.append("\(recipe.path): \(problem)")
            }
        }
        // A separate /boot goes with /: a rolled-back root with the upgrade's kernels and
        // initramfs (or the reverse) may not boot.
        if volumes.contains(where: { $0.mounts.contains { $0.target == "/" } }),
            let boot = ((try? Mounts.current()) ?? []).first(where: { $0.target == "/boot" }),
            !volumes.contains(where: { $0.info.number == boot.device })
        {
            problems.append(
                "\(recipe.path): the recipe snapshots / but not /boot, which is a filesystem of its own (\(boot.source)): a rollback would bring back the old root with the new kernels and initramfs; add /boot's volume to the recipe"
            )
        }
        // Boot assessment: without the unit that runs the checks, every boot would count as one
        // that did not reach them, and a good upgrade would be rolled back.
        if !recipe.verifyAfterBoot.isEmpty && !Planner.isEnabled("guard-assess.service") {
            problems.append(
                "\(recipe.path): the recipe has verify_after_boot, but guard-assess.service is not enabled, so no boot would run the checks and the run would be rolled back after \(recipe.bootAttempts) boot(s); enable it (`systemctl enable guard-assess.service`)"
            )
        }
        // Snapshots that outlive guard's process must be reassembled at the next boot.
        if let unit = Planner.reassemblyUnitProblem() {
            if recipe.keepsSnapshots {
                problems.append("\(recipe.path): the recipe keeps snapshots (on_success or on_failure keep), but \(unit)")
            } else {
                warnings.append("\(recipe.path): \(unit); after a power loss during this run, run `guard recover` before mounting the volumes")
            }
        }
        return Plan(recipe: recipe, volumes: volumes, problems: problems, warnings: warnings, busy: busy)
    }

    /// Mount points the boot mounts (and writes) before guard-reassemble.service can run.
    static let earlyMountPoints: Set<String> = ["/", "/usr"]

    /// On a systemd host, why a snapshot would not be reassembled at boot (the boot unit is not
    /// enabled); nil when it is, or when systemd is not the init system.
    static func reassemblyUnitProblem() -> String? {
        guard !isEnabled("guard-reassemble.service") else { return nil }
        return
            "guard-reassemble.service is not enabled, so a reboot would not reassemble the snapshots; enable it (`systemctl enable guard-reassemble.service`; see guard-recover(8))"
    }

    /// Whether systemd (when it runs this machine) has `unit` enabled; true without systemd.
    static func isEnabled(_ unit: String) -> Bool {
        guard FileManager.default.fileExists(atPath: "/run/systemd/system") else { return true }
        let systemctl = ["/usr/bin/systemctl", "/bin/systemctl"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let systemctl else { return true }
        guard let finished = try? Spawn.run(systemctl, ["is-enabled", "--quiet", unit], stderr: .discarded) else { return true }
        return finished.status == 0
    }

    /// How `extend` grows a thin volume's pool of `poolBytes`: sizes in % are of the volume,
    /// `auto` is the pool's size; the policy counts the storage as a thin stack does (the
    /// pool's data plus `CowLabel.areaOffset`). Nil when `max` is not above the pool. The
    /// planner and `guard monitor` (for kept runs) resolve it alike.
    public static func thinGrowth(_ extend: ExtendSpec, originBytes: UInt64, poolBytes: UInt64, blockBytes: UInt64) -> (policy: ExtensionPolicy?, maximum: UInt64) {
        func bytes(_ size: SizeSpec) -> UInt64 { size.bytes(originBytes: originBytes, auto: poolBytes) }
        let maximum = bytes(extend.max) / blockBytes * blockBytes
        guard maximum > poolBytes else { return (nil, maximum) }
        return (ExtensionPolicy(threshold: extend.at, stepBytes: max(bytes(extend.by), blockBytes), maximumBytes: maximum + CowLabel.areaOffset), maximum)
    }

    /// The space a run needs for its changes: the recipe's size, or for `auto` what earlier
    /// runs of the recipe on the volume used (1.5 × their peak + 16 MiB; 20% of the volume
    /// without one), with how it was chosen.
    static func room(_ size: SizeSpec, originBytes: UInt64, history: PeakUse?, recipe: String) -> (bytes: UInt64, note: String) {
        switch size {
        case .bytes(let bytes):
            return (bytes, "\(formatBytes(bytes)) as written")
        case .percent(let percent):
            return (size.bytes(originBytes: originBytes, auto: 0), "\(oneDecimal(percent))% of \(formatBytes(originBytes))")
        case .auto:
            if let peak = history?.peakBytes, peak > 0 {
                return (UInt64(Double(peak) * 1.5) + (16 << 20), "auto: 1.5 × the peak use of earlier runs (\(formatBytes(UInt64(peak)))) + 16 MiB")
            }
            return (originBytes / 5, "auto: no earlier run of \(recipe) to learn from, 20% of the volume")
        }
    }

    /// The registry and pool layout of `origin` when it is a thin guard volume of this state
    /// directory (a thin device of a GUARD-POOL- pool, registered here); nil otherwise: another
    /// tool's thin volume (an LVM thin LV) gets guard's classic snapshot.
    func thinVolume(_ origin: SnapshotEngine.Origin, dm: DeviceMapper) -> (String, ThinLayout, pool: DeviceNumber)? {
        guard origin.table.lines.count == 1, case .thin(let pool, _) = origin.table.lines[0].target,
            let poolInfo = try? dm.info(.number(pool)), poolInfo.uuid == ThinPoolNames(volume: origin.info.name).poolUUID
        else { return nil }
        let registry = "\(context.stateDirectory)/volumes/\(origin.info.name).json"
        guard let volume = try? GuardVolume.read(registry: registry), let layout = volume.thin
        else { return nil }
        return (registry, layout, pool)
    }

    /// `/dev/...`, `VG/LV` or a mount point, as a device path.
    public func resolveDevice(_ device: String) throws -> String {
        if device.hasPrefix("/dev/") {
            guard FileManager.default.fileExists(atPath: device) else {
                throw GuardFailure(.refused, "the device \(device) does not exist (see `lvs` or `guard volume list`)")
            }
            return device
        }
        if !device.hasPrefix("/") {
            let parts = device.split(separator: "/")
            guard parts.count == 2 else { throw GuardFailure(.refused, "'\(device)' is not a device, VG/LV or mount point") }
            // lvm2 doubles dashes inside VG and LV names in dm names.
            let name = parts.map { $0.replacingOccurrences(of: "-", with: "--") }.joined(separator: "-")
            for candidate in ["/dev/mapper/\(name)", "/dev/\(device)"] where FileManager.default.fileExists(atPath: candidate) {
                return candidate
            }
            throw GuardFailure(.refused, "the logical volume \(device) is not active (no /dev/mapper/\(name)); activate it with `lvchange -ay \(device)`")
        }
        guard let entry = Mounts.entry(at: device) else {
            throw GuardFailure(.refused, "\(device) is not a mount point (name the device, e.g. /dev/mapper/vg-lv)")
        }
        guard let name = BlockDevices.deviceMapperName(of: entry.device) else {
            throw GuardFailure(.refused, "\(device) is mounted from \(entry.source), which is not a device-mapper volume")
        }
        return "/dev/mapper/\(name)"
    }

    /// The nearest existing ancestor of `path` (for free space and device checks of a directory still to be made).
    func nearestExisting(_ path: String) -> String {
        var current = path
        while !FileManager.default.fileExists(atPath: current), current != "/" {
            current = (current as NSString).deletingLastPathComponent
            if current.isEmpty { return "/" }
        }
        return current
    }

    /// An open run with a snapshot of the origin `uuid` (whether live or not).
    func openRun(onOrigin uuid: String) throws -> RunRecord? {
        guard !uuid.isEmpty, let journal = try context.existingJournal() else { return nil }
        for run in try journal.runs(in: RunState.open) {
            let records = try journal.snapshots(runID: run.id!)
            // A thin volume's kept snapshots are generations: a new run takes another beside them.
            if records.contains(where: { $0.originUUID == uuid && ($0.cowKind == "thin" ? [.merging] : [.live, .merging, .invalid]).contains($0.state) }) { return run }
        }
        return nil
    }

    func keptRun(onOrigin path: String) throws -> RunRecord? {
        guard let journal = try context.existingJournal(), let number = try? BlockDevices.deviceNumber(of: path) else { return nil }
        let uuid = BlockDevices.deviceMapperUUID(of: number) ?? ""
        for run in try journal.runs(in: RunState.open) {
            if try journal.snapshots(runID: run.id!).contains(where: { $0.originUUID == uuid && !uuid.isEmpty }) { return run }
        }
        return nil
    }
}
