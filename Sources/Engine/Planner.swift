import BlockDevice
import DeviceMapper
import Foundation
import Journal
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
    /// Size of the COW area the kernel uses.
    public var cowBytes: UInt64
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
        VolumeRequest(origin: originPath, storage: storage, size: .bytes(cowBytes), chunkSectors: chunkSectors)
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
}

/// Resolves recipes against the system: devices, sizes, COW locations, free space.
public struct Planner {
    public let context: GuardContext

    public init(context: GuardContext) { self.context = context }

    /// Resolves every volume; collects every problem instead of stopping at the first.
    public func plan(_ recipe: Recipe) throws -> Plan {
        let dm = try context.dm()
        let engine = SnapshotEngine(dm: dm)
        var problems: [String] = []
        var warnings: [String] = []
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
                        message = "\(at(spec)): \(path) is being upgraded by run \(id) (pid \(run.pid), started \(formatDate(run.startedAt))); wait for it to finish, or run `guard recover` if it died"
                    case .merging:
                        message = "\(at(spec)): \(path) is being rolled back by run \(id); wait for the merge (`guard status --wait`)"
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
            let mounts = Mounts.mountPoints(of: origin.info.number)
            // Mounted before guard-reassemble.service can run at boot: after a power loss the
            // volume is written before its snapshot is stacked again, and the rollback is lost.
            if let early = mounts.first(where: { Planner.earlyMountPoints.contains($0.target) }) {
                problems.append(
                    "\(at(spec)): \(origin.info.path) is mounted on \(early.target), which is mounted and written before guard-reassemble.service runs at boot: after a power loss its snapshot could not be reassembled in time and the rollback would be lost. guard refuses it until it can reassemble in the initramfs; snapshot the volumes that hold the data instead (/srv, /var/lib/...)")
                continue
            }
            // A snapshot of this volume that holds old blocks but is not live (no reassembly
            // after a reboot): a new snapshot would bury it.
            if let run = try? openRun(onOrigin: origin.info.uuid) {
                problems.append("\(at(spec)): run \(run.id ?? 0) (\(run.state.rawValue)) still owns a snapshot of \(origin.info.path) that is not live; run `guard recover` (or `guard status` to see what it needs) first")
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

            let chunkBytes = spec.chunkBytes ?? UInt64(SnapshotEngine.defaultChunkSectors) * 512
            let chunkSectors = UInt32(chunkBytes / 512)
            let geometry = CowGeometry(chunkSectors: chunkSectors)
            var sizeNote: String
            var cowBytes: UInt64
            switch spec.size {
            case .bytes(let bytes):
                cowBytes = CowSize.bytes(bytes).resolve(originBytes: origin.bytes, geometry: geometry)
                sizeNote = "\(Units.formatBytes(bytes)) as written"
            case .percent(let percent):
                cowBytes = CowSize.percentOfOrigin(percent).resolve(originBytes: origin.bytes, geometry: geometry)
                sizeNote = "\(Units.trim(percent))% of \(Units.formatBytes(origin.bytes))"
            case .auto:
                if let peak = peaks[index]?.peakBytes, peak > 0 {
                    let wanted = UInt64(Double(peak) * 1.5) + (16 << 20)
                    cowBytes = CowSize.bytes(wanted).resolve(originBytes: origin.bytes, geometry: geometry)
                    sizeNote = "auto: 1.5 × the peak use of earlier runs (\(Units.formatBytes(UInt64(peak)))) + 16 MiB"
                } else {
                    cowBytes = CowSize.percentOfOrigin(20).resolve(originBytes: origin.bytes, geometry: geometry)
                    sizeNote = "auto: no earlier run of \(recipe.name) to learn from, 20% of the volume"
                }
            }
            // Never more than can ever be used: every chunk of the origin once.
            let ceiling = geometry.bytesForWholeOrigin(origin.bytes)
            if cowBytes > ceiling {
                cowBytes = ceiling
                sizeNote += ", capped at \(Units.formatBytes(ceiling)) (the whole volume changed)"
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
            if case .fileIn(let directory) = storage {
                let existing = nearestExisting(directory)
                freeBytes = try? freeSpace(at: existing)
                if let freeBytes, freeBytes < cowBytes + CowLabel.areaOffset + (16 << 20) {
                    problems.append("\(at(spec)): the COW needs \(Units.formatBytes(cowBytes + CowLabel.areaOffset)) in \(directory), which has \(Units.formatBytes(freeBytes)) free")
                }
            }

            var policy: ExtensionPolicy?
            // guard.conf's policy for a COW file whose recipe has none.
            let configured = spec.extend == nil && !storage.isDevice ? configuration.extend : nil
            if let extend = spec.extend ?? configured {
                func bytes(_ size: SizeSpec) -> UInt64 {
                    switch size {
                    case .bytes(let bytes): return bytes
                    case .percent(let percent): return UInt64(Double(origin.bytes) * percent / 100)
                    case .auto: return cowBytes
                    }
                }
                let maximum = min(geometry.roundUp(bytes(extend.max)), ceiling)
                if maximum <= cowBytes && configured != nil {
                    // guard.conf's policy does not fit this volume: no growth, no warning.
                } else if maximum <= cowBytes {
                    warnings.append("\(at(spec)): extend.max (\(Units.formatBytes(maximum))) is not above the snapshot size; the COW will not grow")
                } else {
                    policy = ExtensionPolicy(threshold: extend.at, stepBytes: geometry.roundUp(bytes(extend.by)), maximumBytes: maximum + CowLabel.areaOffset)
                }
            }

            // What earlier runs needed, against the most this snapshot can ever hold.
            let capacity = policy.map { $0.maximumBytes - CowLabel.areaOffset } ?? cowBytes
            if let history = peaks[index], UInt64(history.peakBytes) > capacity {
                warnings.append("\(at(spec)): earlier runs of \(recipe.name) used up to \(Units.formatBytes(UInt64(history.peakBytes))) of COW on \(origin.info.path), more than this snapshot can hold (\(Units.formatBytes(capacity))); it may fill: give a larger size, size: auto, or an extend policy")
            }

            volumes.append(
                PlannedVolume(
                    index: index, spec: spec, originPath: origin.info.path, info: origin.info, originBytes: origin.bytes,
                    mounts: mounts, mountPoint: mountPoint, storage: storage, cowBytes: cowBytes, chunkSectors: chunkSectors,
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
            if SnapshotEngine.isOnDevice(nearestExisting(context.stateDirectory), volume.info.number) {
                problems.append("\(at(volume.spec)): guard's state directory \(context.stateDirectory) (journal, COW files) is on \(volume.originPath), which this recipe snapshots; use --state-dir on another filesystem")
            }
            for other in volumes {
                if case .fileIn(let directory) = other.storage, SnapshotEngine.isOnDevice(nearestExisting(directory), volume.info.number) {
                    problems.append("\(at(other.spec)): the COW directory \(directory) is on \(volume.originPath), which this recipe snapshots; put it on another filesystem")
                }
            }
        }
        // Snapshots that outlive guard's process must be reassembled at the next boot.
        if let unit = Planner.reassemblyUnitProblem() {
            if recipe.keepsSnapshots {
                problems.append("\(recipe.path): the recipe keeps snapshots (on_success or on_failure keep), but \(unit)")
            } else {
                warnings.append("\(recipe.path): \(unit); after a power loss during this run, run `guard recover` before mounting the volumes")
            }
        }
        return Plan(recipe: recipe, volumes: volumes, problems: problems, warnings: warnings)
    }

    /// Mount points the boot mounts (and writes) before guard-reassemble.service can run.
    static let earlyMountPoints: Set<String> = ["/", "/usr"]

    /// On a systemd host, why a snapshot would not be reassembled at boot (the boot unit is not
    /// enabled); nil when it is, or when systemd is not the init system.
    static func reassemblyUnitProblem() -> String? {
        guard FileManager.default.fileExists(atPath: "/run/systemd/system") else { return nil }
        let systemctl = ["/usr/bin/systemctl", "/bin/systemctl"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let systemctl else { return nil }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: systemctl)
        process.arguments = ["is-enabled", "--quiet", "guard-reassemble.service"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return nil }
        process.waitUntilExit()
        if process.terminationStatus == 0 { return nil }
        return "guard-reassemble.service is not enabled, so a reboot would not reassemble the snapshots; enable it (`systemctl enable guard-reassemble.service`, see Docs/install.md)"
    }

    /// `/dev/...`, `VG/LV` or a mount point, as a device path.
    public func resolveDevice(_ device: String) throws -> String {
        if device.hasPrefix("/dev/") {
            guard FileManager.default.fileExists(atPath: device) else {
                throw GuardFailure(.usage, "the device \(device) does not exist (see `lvs` or `guard volume list`)")
            }
            return device
        }
        if !device.hasPrefix("/") {
            let parts = device.split(separator: "/")
            guard parts.count == 2 else { throw GuardFailure(.usage, "'\(device)' is not a device, VG/LV or mount point") }
            // lvm2 doubles dashes inside VG and LV names in dm names.
            let name = parts.map { $0.replacingOccurrences(of: "-", with: "--") }.joined(separator: "-")
            for candidate in ["/dev/mapper/\(name)", "/dev/\(device)"] where FileManager.default.fileExists(atPath: candidate) {
                return candidate
            }
            throw GuardFailure(.usage, "the logical volume \(device) is not active (no /dev/mapper/\(name)); activate it with `lvchange -ay \(device)`")
        }
        guard let entry = Mounts.entry(at: device) else {
            throw GuardFailure(.usage, "\(device) is not a mount point (name the device, e.g. /dev/mapper/vg-lv)")
        }
        guard let name = BlockDevices.deviceMapperName(of: entry.device) else {
            throw GuardFailure(.usage, "\(device) is mounted from \(entry.source), which is not a device-mapper volume")
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
            if records.contains(where: { $0.originUUID == uuid && [.live, .merging, .invalid].contains($0.state) }) { return run }
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
