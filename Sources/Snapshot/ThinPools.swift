import BlockDevice
import DeviceMapper
import Foundation
import Quantities

/// Where a thin guard volume's pool lies in its backing, and which thin device is the volume.
///
/// The backing is laid out as `[1 MiB reserved][metadata][data]`: guard's pools are
/// dm-thin pools over two linear devices of that one file or block device.
public struct ThinLayout: Codable, Hashable, Sendable {
    /// The pool's metadata area, in bytes from the start of the backing.
    public var metadataOffset: UInt64
    public var metadataBytes: UInt64
    /// The pool's data area.
    public var dataOffset: UInt64
    public var dataBytes: UInt64
    /// Sectors per data block (the unit a snapshot shares or copies).
    public var blockSectors: UInt32
    /// The volume's thin device id in the pool's metadata.
    public var deviceID: UInt32
    /// The id a rollback replaced (the volume's id before it became a snapshot's), until it is
    /// deleted from the pool; nil otherwise.
    public var replacedID: UInt32?

    /// 64 KiB: dm-thin's own suggestion for snapshots (thin-provisioning.rst), as lvm2's default.
    public static let defaultBlockSectors: UInt32 = 128
    public static let reservedBytes: UInt64 = 1 << 20

    /// The layout of a new pool with `dataBytes` of data: metadata sized by the kernel's guide
    /// (48 bytes per data block) four times over, for the block maps of snapshots, at least 4 MiB.
    public static func new(dataBytes: UInt64, blockSectors: UInt32 = defaultBlockSectors) -> ThinLayout {
        let blockBytes = UInt64(blockSectors) * 512
        let data = dataBytes / blockBytes * blockBytes
        let guide = 48 * (data / blockBytes) * 4
        let metadata = min(max(roundUp(guide, to: 1 << 20), 4 << 20), 16 << 30)
        return ThinLayout(
            metadataOffset: reservedBytes, metadataBytes: metadata, dataOffset: reservedBytes + metadata, dataBytes: data,
            blockSectors: blockSectors, deviceID: 0)
    }

    /// The layout of a pool over `backingBytes` whole.
    public static func filling(backingBytes: UInt64, blockSectors: UInt32 = defaultBlockSectors) -> ThinLayout? {
        guard backingBytes > reservedBytes + (8 << 20) else { return nil }
        var layout = new(dataBytes: backingBytes - reservedBytes, blockSectors: blockSectors)
        let blockBytes = UInt64(blockSectors) * 512
        layout.dataBytes = (backingBytes - layout.dataOffset) / blockBytes * blockBytes
        return layout
    }

    /// Bytes of backing the layout needs.
    public var backingBytes: UInt64 { dataOffset + dataBytes }
    public var blockBytes: UInt64 { UInt64(blockSectors) * 512 }

    private static func roundUp(_ value: UInt64, to unit: UInt64) -> UInt64 { (value + unit - 1) / unit * unit }
}

/// The devices of a thin volume's pool: `guard-pool-NAME` over `-tmeta` and `-tdata`.
public struct ThinPoolNames: Sendable, Hashable {
    public let volume: String

    public init(volume: String) { self.volume = volume }

    public var pool: String { "guard-pool-\(volume)" }
    public var metadata: String { "\(pool)-tmeta" }
    public var data: String { "\(pool)-tdata" }
    /// "GUARD-POOL-NAME": a GUARD- device that is not a snapshot layer (nor is `-tmeta`, `-tdata`).
    public var poolUUID: String { "\(DeviceMapper.uuidPrefix)POOL-\(volume)" }
    public var metadataUUID: String { "\(poolUUID)-tmeta" }
    public var dataUUID: String { "\(poolUUID)-tdata" }
    public var metadataPath: String { "/dev/mapper/\(metadata)" }
}

/// What thin_check said about a pool's metadata.
public struct ThinCheckFailure: Error, CustomStringConvertible, Sendable {
    public var volume: String
    public var output: String
    public var description: String {
        "thin_check found the metadata of \(volume)'s pool damaged, so guard left the pool inactive: \(output); "
            + "`guard volume repair \(volume)` rebuilds it with thin_repair (the damaged copy is kept)"
    }
}

extension GuardVolumes {
    /// The thin-provisioning-tools program `name` (thin_check, thin_repair), or nil.
    static func thinTool(_ name: String) -> String? {
        ["/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"].map { $0 + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Runs a program to its end: its exit status and its output (stdout and stderr). Not
    /// Foundation's `Process`, which hangs in an initramfs, where thin_check runs too.
    static func runTool(_ path: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let finished = try Spawn.run(path, arguments)
        return (finished.status, finished.text)
    }

    /// Checks a pool's metadata with thin_check (the pool must not be active).
    /// - Throws: `ThinCheckFailure` with thin_check's words; a SnapshotError when thin_check is missing.
    func checkThinMetadata(_ volume: GuardVolume, names: ThinPoolNames) throws {
        guard let tool = Self.thinTool("thin_check") else {
            throw SnapshotError.refusal(
                .other, "activation of \(volume.name)", "thin_check is not installed: guard checks a thin pool's metadata before it activates it",
                hint: "install thin-provisioning-tools (`apt install thin-provisioning-tools`)")
        }
        // As lvm2 runs it: a pool the kernel flagged needs_check is cleared once it passes.
        let result = try Self.runTool(tool, ["-q", "--clear-needs-check-flag", names.metadataPath])
        guard result.status == 0 else {
            let detail = try Self.runTool(tool, [names.metadataPath]).output
            throw ThinCheckFailure(volume: volume.name, output: detail.isEmpty ? "exit status \(result.status)" : detail)
        }
    }

    /// Makes a thin volume's devices exist: the backing attached, `-tmeta` and `-tdata` over
    /// it, thin_check of the metadata (unless `fresh`: a pool guard just zeroed, which the
    /// kernel formats), the pool, and the volume's thin device.
    func activateThin(_ volume: GuardVolume, layout: ThinLayout, device: DeviceNumber, fresh: Bool) throws {
        let names = ThinPoolNames(volume: volume.name)
        let batch = UdevBatch()
        defer { batch.finish() }
        func linear(_ name: String, _ uuid: String, offset: UInt64, bytes: UInt64) throws -> DeviceNumber {
            if let info = try dm.info(.uuid(uuid)) { return info.number }
            return try dm.create(
                name: name, uuid: uuid, table: Table(.linear(device: device, offset: offset / 512), length: bytes / 512),
                udevFlags: .hidden, batch: batch
            ).number
        }
        let metadata = try linear(names.metadata, names.metadataUUID, offset: layout.metadataOffset, bytes: layout.metadataBytes)
        let data = try linear(names.data, names.dataUUID, offset: layout.dataOffset, bytes: layout.dataBytes)
        let pool: DeviceNumber
        if let info = try dm.info(.uuid(names.poolUUID)) {
            pool = info.number
        } else {
            batch.finish()
            if !fresh {
                do { try checkThinMetadata(volume, names: names) } catch {
                    // The metadata stays as it is, for thin_repair; only guard's linear layers go.
                    try? dm.remove(.uuid(names.dataUUID))
                    try? dm.remove(.uuid(names.metadataUUID))
                    throw error
                }
            }
            // Low water: an event when a tenth of the data is left (guard polls the fill too).
            let blocks = layout.dataBytes / layout.blockBytes
            pool = try dm.create(
                name: names.pool, uuid: names.poolUUID,
                table: Table(
                    .thinPool(metadata: metadata, data: data, blockSectors: layout.blockSectors, lowWaterBlocks: max(blocks / 10, 1)),
                    length: layout.dataBytes / 512),
                udevFlags: .hidden, batch: batch
            ).number
        }
        if fresh { try dm.message(.number(pool), "create_thin \(layout.deviceID)") }
        try dm.create(name: volume.name, uuid: volume.uuid, table: Table(.thin(pool: pool, deviceID: layout.deviceID), length: volume.sizeBytes / 512), batch: batch)
    }

    /// Removes a volume's devices, top down (for a thin volume: the thin device, the pool, its
    /// two areas); the backing keeps the data (and a pool's metadata).
    func deactivate(_ volume: GuardVolume) throws {
        let names = ThinPoolNames(volume: volume.name)
        for uuid in [volume.uuid, names.poolUUID, names.dataUUID, names.metadataUUID] where try dm.info(.uuid(uuid)) != nil {
            try dm.remove(.uuid(uuid))
        }
    }

    /// Grows a thin volume's pool to `poolSize` of data: the backing file first (a device must
    /// already be large enough), then the registry (so a reboot activates the larger pool),
    /// then `-tdata` and the pool's tables. The metadata area does not move: a pool larger than
    /// its metadata can map is refused.
    /// - Returns: the volume as registered now.
    /// - Parameter engine: the engine whose executor (and watchdog) suspends the pool. The
    ///   caller holds the volume's lock (`guard volume extend`, or the run that grows it), so the
    ///   registry's read, change and write are one step.
    public func extendPool(name: String, poolSize: UInt64, engine: SnapshotEngine) throws -> GuardVolume {
        let operation = "volume extend \(name)"
        guard var (volume, _) = try list().first(where: { $0.0.name == name }) else {
            throw SnapshotError.refusal(.other, operation, "guard has no volume \(name)", hint: "`guard volume list`")
        }
        guard var layout = volume.thin else {
            throw SnapshotError.refusal(.notExtendable, operation, "\(name) is not a thin volume: it has no pool to grow")
        }
        let names = ThinPoolNames(volume: name)
        guard let pool = try dm.info(.uuid(names.poolUUID)), let data = try dm.info(.uuid(names.dataUUID)) else {
            throw SnapshotError.refusal(.other, operation, "\(name)'s pool is not active", hint: "`guard volume activate` first")
        }
        let bytes = poolSize / layout.blockBytes * layout.blockBytes
        guard bytes > layout.dataBytes else {
            throw SnapshotError.refusal(
                .notExtendable, operation, "the pool has \(formatBytes(layout.dataBytes)); \(formatBytes(poolSize)) does not grow it (a pool does not shrink)")
        }
        if let problem = try Self.growthProblem(volume, layout, to: bytes) { throw SnapshotError.refusal(problem.kind, operation, problem.message, hint: problem.hint) }
        let needed = layout.dataOffset + bytes
        if volume.backingIsFile {
            let file = try RawFile(path: volume.backing)
            let size = try file.size()
            if size < needed {
                _ = try SnapshotEngine.preallocate(file, from: size, length: needed - size)
                try file.sync()
            }
            for loop in LoopDevice.find(backingFile: volume.backing) { try loop.refreshCapacity() }
        }
        guard case .linear(let device, let offset)? = try dm.table(.number(data.number)).lines.first?.target,
            case .thinPool(let metadata, _, let block, _)? = try dm.table(.number(pool.number)).lines.first?.target
        else {
            throw SnapshotError.refusal(.layerMissing, operation, "\(names.pool) or \(names.data) does not have the tables guard gave them")
        }
        layout.dataBytes = bytes
        volume.thin = layout
        try register(volume)
        let blocks = bytes / layout.blockBytes
        try engine.executor.run(
            .growPool(
                pool: pool.number,
                poolTable: Table(.thinPool(metadata: metadata, data: data.number, blockSectors: block, lowWaterBlocks: max(blocks / 10, 1)), length: bytes / 512),
                data: data.number, dataTable: Table(.linear(device: device, offset: offset), length: bytes / 512), name: "growth of \(name)'s pool"))
        return volume
    }

    /// Why a thin volume's pool cannot grow to `bytes` of data (nil: it can): its metadata,
    /// sized at creation, maps no more; or the backing file's filesystem or the backing
    /// device has no room for it.
    static func growthProblem(_ volume: GuardVolume, _ layout: ThinLayout, to bytes: UInt64) throws -> (kind: SnapshotError.Code, message: String, hint: String?)? {
        // As sized at creation: 48 bytes per data block, four times over.
        let mappable = layout.metadataBytes / (48 * 4) * layout.blockBytes
        guard bytes <= mappable else {
            return (
                .notExtendable, "its \(formatBytes(layout.metadataBytes)) of metadata maps at most \(formatBytes(mappable)) of data with room for snapshots",
                "make a new volume of the size you need and copy the data"
            )
        }
        let needed = layout.dataOffset + bytes
        if volume.backingIsFile {
            let size = try RawFile(path: volume.backing, readOnly: true).size()
            guard size < needed else { return nil }
            let free = try freeSpace(at: (volume.backing as NSString).deletingLastPathComponent)
            guard free > needed - size + (16 << 20) else {
                return (.noSpace, "growing \(volume.backing) by \(formatBytes(needed - size)) needs more than the \(formatBytes(free)) free", nil)
            }
        } else if case let size = try BlockDevices.size(of: volume.backing), size < needed {
            return (.noSpace, "\(volume.backing) has \(formatBytes(size)); a pool of \(formatBytes(bytes)) needs \(formatBytes(needed))", nil)
        }
        return nil
    }

    /// Why the pool of the thin volume `registry` describes cannot grow to `bytes` (nil: it can).
    public static func poolGrowthProblem(registry: String, to bytes: UInt64) -> String? {
        do {
            let volume = try GuardVolume.read(registry: registry)
            guard let layout = volume.thin else { return "\(volume.name) is not a thin volume" }
            return try growthProblem(volume, layout, to: bytes).map { [$0.message, $0.hint].compactMap { $0 }.joined(separator: "; ") }
        } catch {
            return "\(error)"
        }
    }

    /// The pool's data and metadata use; nil when the pool is not active.
    public func poolStatus(_ volume: GuardVolume) throws -> ThinPoolStatus? {
        guard volume.thin != nil else { return nil }
        let names = ThinPoolNames(volume: volume.name)
        guard try dm.info(.uuid(names.poolUUID)) != nil else { return nil }
        return try dm.thinPoolStatus(.uuid(names.poolUUID))
    }

    /// Rebuilds a thin volume's pool metadata with thin_repair: the pool must be inactive
    /// (`guard volume activate` refused it). The damaged metadata is first copied to
    /// `<state dir>/volumes/NAME.tmeta.<time>` and kept; the repaired copy must pass
    /// thin_check before it replaces the damaged one.
    /// - Returns: the path of the kept copy of the damaged metadata.
    public func repair(name: String) throws -> String {
        let operation = "volume repair \(name)"
        guard let (volume, info) = try list().first(where: { $0.0.name == name }) else {
            throw SnapshotError.refusal(.other, operation, "guard has no volume \(name)", hint: "`guard volume list`")
        }
        guard let layout = volume.thin else {
            throw SnapshotError.refusal(.other, operation, "\(name) is not a thin volume: it has no pool metadata to repair")
        }
        let names = ThinPoolNames(volume: name)
        let poolActive = try dm.info(.uuid(names.poolUUID)) != nil
        if info != nil || poolActive {
            throw SnapshotError.refusal(
                .inUse, operation, "\(name)'s pool is active: its metadata passed thin_check", hint: "remove the volume's devices first only if `guard status` shows no run on it")
        }
        guard let repairTool = Self.thinTool("thin_repair"), let checkTool = Self.thinTool("thin_check") else {
            throw SnapshotError.refusal(.other, operation, "thin_repair or thin_check is not installed", hint: "install thin-provisioning-tools")
        }
        let stamp = Int(Date().timeIntervalSince1970)
        let kept = "\(registry)/\(name).tmeta.\(stamp)"
        let repaired = "\(registry)/\(name).tmeta.\(stamp).repaired"
        // The damaged metadata, byte for byte, before anything writes over it.
        try Self.copy(
            layout.metadataBytes, from: RawFile(path: volume.backing, readOnly: true), at: layout.metadataOffset, to: RawFile(path: kept, create: true, exclusive: true), at: 0)
        let output = try RawFile(path: repaired, create: true, exclusive: true)
        try output.truncate(to: layout.metadataBytes)
        // thin-provisioning-tools open with O_DIRECT, which files on tmpfs refuse: both
        // copies go through loop devices (autoclear: they go when guard closes them).
        let input = try LoopDevice.attach(file: kept, readOnly: true, autoclear: true)
        let outputLoop = try LoopDevice.attach(file: repaired, autoclear: true)
        var repair = try Self.runTool(repairTool, ["-i", input.device.path, "-o", outputLoop.device.path])
        if repair.status != 0 && repair.output.contains("needs to be provided") {
            // A damaged superblock: what it held, from guard's layout (guard's pools keep
            // transaction id 0: guard sends no set_transaction_id).
            repair = try Self.runTool(
                repairTool,
                [
                    "-i", input.device.path, "-o", outputLoop.device.path, "--transaction-id", "0",
                    "--data-block-size", "\(layout.blockSectors)", "--nr-data-blocks", "\(layout.dataBytes / layout.blockBytes)",
                ])
        }
        let check = repair.status == 0 ? try Self.runTool(checkTool, [outputLoop.device.path]) : repair
        input.release()
        outputLoop.release()
        guard repair.status == 0 else {
            try? FileManager.default.removeItem(atPath: repaired)
            throw SnapshotError(
                .other, operation, "thin_repair could not rebuild the metadata: \(repair.output)", hint: "the damaged metadata is kept in \(kept); see thin_repair(8)")
        }
        guard check.status == 0 else {
            throw SnapshotError(.other, operation, "the repaired metadata fails thin_check too: \(check.output)", hint: "both copies are kept: \(kept), \(repaired)")
        }
        try Self.copy(layout.metadataBytes, from: RawFile(path: repaired, readOnly: true), at: 0, to: RawFile(path: volume.backing), at: layout.metadataOffset)
        try? FileManager.default.removeItem(atPath: repaired)
        return kept
    }

    /// Copies `length` bytes, 1 MiB at a time, and syncs the target.
    private static func copy(_ length: UInt64, from source: borrowing RawFile, at sourceOffset: UInt64, to target: borrowing RawFile, at targetOffset: UInt64) throws {
        var offset: UInt64 = 0
        while offset < length {
            let count = Int(min(UInt64(1 << 20), length - offset))
            try target.write(try source.read(at: sourceOffset + offset, count: count), at: targetOffset + offset)
            offset += UInt64(count)
        }
        try target.sync()
    }

}

// MARK: - Creating a thin volume

extension GuardVolumes {
    /// The label at the start of a thin volume's backing: which volume's pool it holds, and where.
    struct ThinLabel: Codable {
        static let magic = "GUARD-THIN-POOL 1\n"
        var volume: String
        var layout: ThinLayout
        var sizeBytes: UInt64
    }

    /// The kernel's magic in a thin pool's metadata superblock (le64 at byte 32).
    static let thinMetadataMagic: UInt64 = 27_022_010

    /// What already lives on `backing` where a new pool would go: a filesystem, guard's label,
    /// a thin pool's metadata. Empty when the area is blank.
    func existingContents(of backing: String, layout: ThinLayout) throws -> [String] {
        var found = try BlockDevices.signatures(of: backing)
        let file = try RawFile(path: backing, readOnly: true)
        let head = try file.read(at: 0, count: 4096)
        if head.starts(with: Array(ThinLabel.magic.utf8)) {
            let json = head.dropFirst(ThinLabel.magic.utf8.count).prefix { $0 != 0 }
            let label = try? JSONDecoder().decode(ThinLabel.self, from: Data(json))
            found.append("guard's thin pool of the volume \(label?.volume ?? "?")")
        }
        let superblock = try file.read(at: layout.metadataOffset, count: 4096)
        let magic = superblock[32..<40].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        if magic == Self.thinMetadataMagic { found.append("a thin pool's metadata") }
        return found
    }

    /// A thin volume: a pool over the whole backing (`[label][metadata][data]`), with the
    /// volume as its thin device 0. A backing that holds anything (a filesystem, a partition
    /// table, a pool) is refused: creating a pool writes over it.
    func createThin(name: String, backing: String, size: UInt64?, poolSize: UInt64?) throws -> GuardVolume {
        let operation = "volume create \(name)"
        let isFile = try checkNew(name: name, backing: backing)
        var layout: ThinLayout
        var created = false
        if isFile && !FileManager.default.fileExists(atPath: backing) {
            guard let size else { throw SnapshotError.refusal(.other, operation, "\(backing) does not exist", hint: "give --size to create it") }
            layout = ThinLayout.new(dataBytes: poolSize ?? size * 2)
            let file = try RawFile(path: backing, create: true, exclusive: true)
            _ = try SnapshotEngine.preallocate(file, from: 0, length: layout.backingBytes)
            created = true
        } else {
            let existing = isFile ? try RawFile(path: backing, readOnly: true).size() : try BlockDevices.size(of: backing)
            guard let whole = ThinLayout.filling(backingBytes: existing) else {
                throw SnapshotError.refusal(.other, operation, "\(backing) has \(formatBytes(existing)): a thin pool needs more than 9 MiB")
            }
            layout = whole
            if let poolSize {
                guard poolSize <= whole.dataBytes else {
                    throw SnapshotError.refusal(
                        .other, operation, "\(backing) has room for a pool of \(formatBytes(whole.dataBytes)), less than --pool-size \(formatBytes(poolSize))")
                }
                layout = ThinLayout.new(dataBytes: poolSize)
            }
            let contents = try existingContents(of: backing, layout: layout)
            if !contents.isEmpty {
                throw SnapshotError.refusal(
                    .inUse, operation, "\(backing) holds \(contents.joined(separator: ", ")): a thin pool would be written over it",
                    hint: "give an empty file or device (guard does not wipe one that holds data; `wipefs` lists what is there)")
            }
        }
        let bytes = (size ?? layout.dataBytes / 2) / 512 * 512
        guard bytes >= 1 << 20 else {
            if created { try? FileManager.default.removeItem(atPath: backing) }
            throw SnapshotError.refusal(.other, operation, "a volume needs at least 1 MiB")
        }
        guard bytes <= layout.dataBytes else {
            if created { try? FileManager.default.removeItem(atPath: backing) }
            throw SnapshotError.refusal(
                .other, operation, "--size \(formatBytes(bytes)) is more than the pool's \(formatBytes(layout.dataBytes))",
                hint: "give a larger --pool-size: the pool holds the volume and the blocks its snapshots keep")
        }
        // guard's label, and a zeroed metadata superblock, which the kernel formats.
        let volume = GuardVolume(name: name, backing: backing, backingIsFile: isFile, sizeBytes: bytes, thin: layout)
        do {
            let file = try RawFile(path: backing)
            let label = Array(ThinLabel.magic.utf8) + Array(try JSONEncoder.sorted.encode(ThinLabel(volume: name, layout: layout, sizeBytes: bytes)))
            guard label.count < 4096 else { throw SnapshotError(.other, operation, "guard's label does not fit in 4 KiB (a bug)") }
            try file.write(label + [UInt8](repeating: 0, count: 4096 - label.count), at: 0)
            try file.write([UInt8](repeating: 0, count: 4096), at: layout.metadataOffset)
            try file.sync()
            try FileManager.default.createDirectory(atPath: registry, withIntermediateDirectories: true)
            try activate(volume, fresh: true)
        } catch {
            if created { try? FileManager.default.removeItem(atPath: backing) }
            throw error
        }
        try register(volume)
        return volume
    }
}
