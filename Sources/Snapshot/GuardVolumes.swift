import BlockDevice
import DeviceMapper
import Foundation
import Quantities

/// A guard-owned linear device over a file or block device, so that machines without LVM
/// can snapshot too: `guard volume create website --backing /srv/website.img --size 100M`
/// gives /dev/mapper/website.
public struct GuardVolume: Codable, Hashable, Sendable {
    /// The dm name: /dev/mapper/NAME.
    public var name: String
    /// The backing file or block device.
    public var backing: String
    public var backingIsFile: Bool
    public var sizeBytes: UInt64
    /// For a thin volume: its pool's layout in the backing (nil: a linear volume).
    public var thin: ThinLayout?

    /// "GUARD-VOL-NAME": a GUARD- device that is not a snapshot layer.
    public var uuid: String { Self.uuid(name: name) }
    /// The dm UUID of guard volume `name` (also the key of its lock).
    public static func uuid(name: String) -> String { "\(DeviceMapper.uuidPrefix)VOL-\(name)" }
    public var path: String { "/dev/mapper/\(name)" }

    /// The volume a registry file describes (`<state dir>/volumes/NAME.json`).
    public static func read(registry path: String) throws -> GuardVolume {
        try JSONDecoder().decode(GuardVolume.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// Writes the volume to its registry file durably: a power loss leaves the old file or the
    /// new one, whole (`RawFile.replace`).
    public func write(registry path: String) throws {
        try RawFile.replace(path, with: Array(try JSONEncoder.sorted.encode(self)))
    }
}

/// Creates, lists, activates and removes guard volumes; their registry is
/// `<state dir>/volumes/NAME.json`, so the boot unit can activate them again.
public struct GuardVolumes {
    public let dm: DeviceMapper
    public let registry: String

    public init(dm: DeviceMapper, stateDirectory: String) {
        self.dm = dm
        self.registry = "\(stateDirectory)/volumes"
    }

    /// Checks a volume name: 1 to 64 of letters, digits, `.`, `_`, `+`, `-`, not starting with `-` or `.`.
    public static func validate(name: String) throws {
        let allowed = name.unicodeScalars.allSatisfy { ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0))) || "._+-".unicodeScalars.contains($0) }
        guard !name.isEmpty, name.count <= 64, allowed, !name.hasPrefix("-"), !name.hasPrefix("."), !name.hasPrefix("guard-") else {
            throw SnapshotError.refusal(
                .other, "volume create '\(name)'",
                "a volume name is 1 to 64 letters, digits, '.', '_', '+' or '-', not starting with '-', '.' or 'guard-'")
        }
    }

    /// Creates the volume: a backing file is created (preallocated) when missing, then attached to a
    /// loop device; a linear dm device NAME covers it, or with `thin` a thin device of a
    /// dm-thin pool over the whole backing.
    ///
    /// - Parameters:
    ///   - size: required for a new file; for an existing backing, at most its size (default: all
    ///     of it; for a thin volume, half its pool).
    ///   - thin: a thin volume; `poolSize` is its pool's data (default: twice `size`, for a new file).
    public func create(name: String, backing: String, size: UInt64?, thin: Bool = false, poolSize: UInt64? = nil) throws -> GuardVolume {
        try Self.validate(name: name)
        if thin { return try createThin(name: name, backing: backing, size: size, poolSize: poolSize) }
        if poolSize != nil {
            throw SnapshotError.refusal(.other, "volume create \(name)", "--pool-size is for a thin volume", hint: "add --thin, or leave --pool-size out")
        }
        let operation = "volume create \(name)"
        let isFile = try checkNew(name: name, backing: backing)
        var bytes: UInt64
        if isFile {
            if !FileManager.default.fileExists(atPath: backing) {
                guard let size else {
                    throw SnapshotError.refusal(.other, operation, "\(backing) does not exist", hint: "give --size to create it")
                }
                let file = try RawFile(path: backing, create: true, exclusive: true)
                _ = try SnapshotEngine.preallocate(file, from: 0, length: size)
            }
            let existing = try RawFile(path: backing, readOnly: true).size()
            bytes = size ?? existing
            if bytes > existing {
                throw SnapshotError.refusal(.other, operation, "\(backing) has \(formatBytes(existing)), less than --size \(formatBytes(bytes))")
            }
        } else {
            let existing = try BlockDevices.size(of: backing)
            bytes = size ?? existing
            if bytes > existing {
                throw SnapshotError.refusal(.other, operation, "\(backing) has \(formatBytes(existing)), less than --size \(formatBytes(bytes))")
            }
        }
        bytes = bytes / 512 * 512
        guard bytes >= 1 << 20 else { throw SnapshotError.refusal(.other, operation, "a volume needs at least 1 MiB") }
        let volume = GuardVolume(name: name, backing: backing, backingIsFile: isFile, sizeBytes: bytes)
        try FileManager.default.createDirectory(atPath: registry, withIntermediateDirectories: true)
        try activate(volume)
        try register(volume)
        return volume
    }

    /// Refuses a name guard or the kernel already has, and a backing device that is in use.
    /// - Returns: whether the backing is a file (existing or not) rather than a block device.
    func checkNew(name: String, backing: String) throws -> Bool {
        let operation = "volume create \(name)"
        if try dm.info(.name(name)) != nil {
            throw SnapshotError.refusal(.other, operation, "a device-mapper device named \(name) already exists")
        }
        if FileManager.default.fileExists(atPath: "\(registry)/\(name).json") {
            throw SnapshotError.refusal(.other, operation, "guard already has a volume \(name)", hint: "`guard volume list`")
        }
        guard let number = try? BlockDevices.deviceNumber(of: backing) else { return true }
        if !Mounts.mountPoints(of: number).isEmpty || !BlockDevices.holders(of: number).isEmpty {
            throw SnapshotError.refusal(.inUse, operation, "\(backing) is mounted or in use")
        }
        return false
    }

    func register(_ volume: GuardVolume) throws {
        try volume.write(registry: "\(registry)/\(volume.name).json")
    }

    /// Makes the volume's device exist (after a reboot): attach the backing file, create the
    /// linear device (or check and activate the thin pool, then the thin device).
    public func activate(_ volume: GuardVolume) throws {
        try activate(volume, fresh: false)
    }

    func activate(_ volume: GuardVolume, fresh: Bool) throws {
        if try dm.info(.uuid(volume.uuid)) != nil { return }
        let device: DeviceNumber
        if volume.backingIsFile {
            if let loop = LoopDevice.find(backingFile: volume.backing).first {
                device = loop.number
            } else {
                device = try LoopDevice.attach(file: volume.backing).device.number
            }
        } else {
            device = try BlockDevices.deviceNumber(of: volume.backing)
        }
        do {
            if let layout = volume.thin {
                try activateThin(volume, layout: layout, device: device, fresh: fresh)
            } else {
                try dm.create(name: volume.name, uuid: volume.uuid, table: Table(.linear(device: device, offset: 0), length: volume.sizeBytes / 512))
            }
        } catch {
            try? deactivate(volume)
            if volume.backingIsFile { for loop in LoopDevice.find(backingFile: volume.backing) { try? loop.detach() } }
            throw error
        }
    }

    /// Activates every registered volume that is not active, going on past one that fails
    /// (a missing backing, a pool whose metadata fails thin_check).
    /// - Returns: the volumes activated, and those that could not be, with why.
    public func activateAll() throws -> (activated: [GuardVolume], failed: [(GuardVolume, any Error)]) {
        var activated: [GuardVolume] = []
        var failed: [(GuardVolume, any Error)] = []
        for (volume, info) in try list() where info == nil {
            do {
                try activate(volume)
                activated.append(volume)
            } catch {
                failed.append((volume, error))
            }
        }
        return (activated, failed)
    }

    /// The registered volumes and their devices (nil when not active).
    public func list() throws -> [(GuardVolume, DeviceInfo?)] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: registry)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
        return try names.map { file in
            let volume = try GuardVolume.read(registry: "\(registry)/\(file)")
            return (volume, try dm.info(.uuid(volume.uuid)))
        }
    }

    /// Removes the volume's device and registry entry; the backing file or device keeps its data.
    public func remove(name: String) throws {
        let operation = "volume remove \(name)"
        guard let (volume, info) = try list().first(where: { $0.0.name == name }) else {
            throw SnapshotError.refusal(.other, operation, "guard has no volume \(name)", hint: "`guard volume list`")
        }
        if let info {
            if info.openCount > 0 {
                let mounts = Mounts.mountPoints(of: info.number).map(\.target)
                throw SnapshotError.refusal(
                    .inUse, operation, "\(info.path) is open" + (mounts.isEmpty ? "" : " (mounted on \(mounts.joined(separator: ", ")))"), hint: "unmount it first")
            }
            let table = try dm.table(.number(info.number))
            if volume.thin != nil, let pool = try dm.info(.uuid(ThinPoolNames(volume: name).poolUUID)) {
                let others = BlockDevices.holders(of: pool.number).filter { $0 != info.number }
                if !others.isEmpty {
                    let names = others.map { BlockDevices.deviceMapperName(of: $0) ?? $0.description }
                    throw SnapshotError.refusal(
                        .alreadySnapshotted, operation, "\(name)'s pool holds snapshots of kept runs (\(names.joined(separator: ", ")))",
                        hint: "commit or roll back those runs first (`guard status`)")
                }
            }
            if !table.isOnly(volume.thin == nil ? "linear" : "thin") {
                throw SnapshotError.refusal(
                    .alreadySnapshotted, operation, "\(name) has a snapshot (its table is \(table.lines.first?.target.typeName ?? "?"))", hint: "commit or roll back its run first")
            }
        }
        try deactivate(volume)
        if volume.backingIsFile { for loop in LoopDevice.find(backingFile: volume.backing) { try? loop.detach() } }
        try FileManager.default.removeItem(atPath: "\(registry)/\(name).json")
    }
}

extension JSONEncoder {
    /// Sorted keys, for files people diff.
    static var sorted: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return encoder
    }
}
