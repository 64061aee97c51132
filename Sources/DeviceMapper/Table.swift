import BlockDevice

/// The persistence argument of a snapshot table: `P`, `PO` or `N`.
public enum Persistence: String, Hashable, Sendable, Codable {
    case persistent = "P"
    case persistentOverflow = "PO"
    case transient = "N"
}

/// A device-mapper target with its parameters, as guard builds and reads them.
///
/// Devices are always referred to by major:minor, as the kernel reports them.
public enum Target: Hashable, Sendable, CustomStringConvertible {
    case linear(device: DeviceNumber, offset: UInt64)
    case error
    case zero
    case snapshot(origin: DeviceNumber, cow: DeviceNumber, persistence: Persistence, chunkSectors: UInt32)
    case snapshotOrigin(device: DeviceNumber)
    case snapshotMerge(origin: DeviceNumber, cow: DeviceNumber, persistence: Persistence, chunkSectors: UInt32)
    /// guard's write fuse: dm-flakey over `device`, down for good (up 0 s, down 1 s) with
    /// `error_writes`, so every write fails with EIO and every read passes through.
    case writeFuse(device: DeviceNumber)
    /// A dm-thin pool: `metadata` and `data` devices, `blockSectors` per data block, an event
    /// when fewer than `lowWaterBlocks` are free; guard's pools fail writes when full
    /// (`error_if_no_space`) rather than queue them until someone adds space.
    case thinPool(metadata: DeviceNumber, data: DeviceNumber, blockSectors: UInt32, lowWaterBlocks: UInt64)
    /// One thin device of a pool, by its id in the pool's metadata.
    case thin(pool: DeviceNumber, deviceID: UInt32)
    /// Any other target, or one of the above with parameters guard does not model (feature args).
    case other(type: String, parameters: String)

    /// The kernel's target type name ("snapshot-origin").
    public var typeName: String {
        switch self {
        case .linear: return "linear"
        case .error: return "error"
        case .zero: return "zero"
        case .snapshot: return "snapshot"
        case .snapshotOrigin: return "snapshot-origin"
        case .snapshotMerge: return "snapshot-merge"
        case .writeFuse: return "flakey"
        case .thinPool: return "thin-pool"
        case .thin: return "thin"
        case .other(let type, _): return type
        }
    }

    /// The parameter string handed to the kernel.
    public var parameters: String {
        switch self {
        case .linear(let device, let offset): return "\(device) \(offset)"
        case .error, .zero: return ""
        case .snapshot(let origin, let cow, let persistence, let chunk),
            .snapshotMerge(let origin, let cow, let persistence, let chunk):
            return "\(origin) \(cow) \(persistence.rawValue) \(chunk)"
        case .snapshotOrigin(let device): return "\(device)"
        case .writeFuse(let device): return "\(device) 0 0 1 1 error_writes"
        case .thinPool(let metadata, let data, let block, let lowWater):
            return "\(metadata) \(data) \(block) \(lowWater) \(Self.thinPoolFeatures)"
        case .thin(let pool, let id): return "\(pool) \(id)"
        case .other(_, let parameters): return parameters
        }
    }

    /// The devices this target stacks on.
    public var devices: [DeviceNumber] {
        switch self {
        case .linear(let device, _), .snapshotOrigin(let device), .writeFuse(let device): return [device]
        case .snapshot(let origin, let cow, _, _), .snapshotMerge(let origin, let cow, _, _): return [origin, cow]
        case .thinPool(let metadata, let data, _, _): return [metadata, data]
        case .thin(let pool, _): return [pool]
        case .error, .zero: return []
        case .other(_, let parameters):
            return parameters.split(separator: " ").compactMap { DeviceNumber(parsing: $0) }
        }
    }

    public var description: String { parameters.isEmpty ? typeName : "\(typeName) \(parameters)" }

    /// The feature arguments of guard's pools, as the kernel reports them back.
    static let thinPoolFeatures = "1 error_if_no_space"

    /// Reads a target as the kernel reports it in a table (DM_DEVICE_TABLE).
    /// Anything guard does not model exactly becomes `.other`, so it round-trips unchanged.
    public static func parse(type: String, parameters: String) -> Target {
        let fields = parameters.split(separator: " ", omittingEmptySubsequences: true)
        switch type {
        case "linear":
            if fields.count == 2, let device = DeviceNumber(parsing: fields[0]), let offset = UInt64(fields[1]) {
                return .linear(device: device, offset: offset)
            }
        case "error" where fields.isEmpty: return .error
        case "zero" where fields.isEmpty: return .zero
        case "snapshot-origin":
            if fields.count == 1, let device = DeviceNumber(parsing: fields[0]) { return .snapshotOrigin(device: device) }
        case "snapshot", "snapshot-merge":
            if fields.count == 4, let origin = DeviceNumber(parsing: fields[0]), let cow = DeviceNumber(parsing: fields[1]),
                let persistence = Persistence(rawValue: String(fields[2])), let chunk = UInt32(fields[3])
            {
                return type == "snapshot"
                    ? .snapshot(origin: origin, cow: cow, persistence: persistence, chunkSectors: chunk)
                    : .snapshotMerge(origin: origin, cow: cow, persistence: persistence, chunkSectors: chunk)
            }
        case "flakey":
            if fields.count == 6, let device = DeviceNumber(parsing: fields[0]), fields[1...].joined(separator: " ") == "0 0 1 1 error_writes" {
                return .writeFuse(device: device)
            }
        case "thin-pool":
            if fields.count == 6, fields[4...].joined(separator: " ") == thinPoolFeatures,
                let metadata = DeviceNumber(parsing: fields[0]), let data = DeviceNumber(parsing: fields[1]),
                let block = UInt32(fields[2]), let lowWater = UInt64(fields[3])
            {
                return .thinPool(metadata: metadata, data: data, blockSectors: block, lowWaterBlocks: lowWater)
            }
        case "thin":
            if fields.count == 2, let pool = DeviceNumber(parsing: fields[0]), let id = UInt32(fields[1]) {
                return .thin(pool: pool, deviceID: id)
            }
        default: break
        }
        return .other(type: type, parameters: fields.joined(separator: " "))
    }
}

/// A device-mapper table: targets covering consecutive sector ranges.
public struct Table: Hashable, Sendable, CustomStringConvertible {
    /// One line of a table: `start length type parameters`, in 512-byte sectors.
    public struct Line: Hashable, Sendable, CustomStringConvertible {
        public var start: UInt64
        public var length: UInt64
        public var target: Target

        public init(start: UInt64, length: UInt64, target: Target) {
            self.start = start
            self.length = length
            self.target = target
        }

        public var description: String { "\(start) \(length) \(target)" }
    }

    public var lines: [Line]

    public init(_ lines: [Line]) { self.lines = lines }

    /// A one-target table covering `length` sectors.
    public init(_ target: Target, length: UInt64) {
        self.lines = [Line(start: 0, length: length, target: target)]
    }

    /// Parses table text (`dmsetup table` format, one target per line).
    /// - Throws: `TableParseError` naming the line that is wrong.
    public init(parsing text: String) throws(TableParseError) {
        var lines: [Line] = []
        for (index, raw) in text.split(separator: "\n").enumerated() {
            let line = raw.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") { continue }
            let fields = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: true)
            guard fields.count >= 3, let start = UInt64(fields[0]), let length = UInt64(fields[1]), length > 0 else {
                throw TableParseError(line: index + 1, text: line, reason: "expected `start length type [parameters]`")
            }
            let parameters = fields.count > 3 ? String(fields[3]) : ""
            lines.append(Line(start: start, length: length, target: .parse(type: String(fields[2]), parameters: parameters)))
        }
        guard !lines.isEmpty else { throw TableParseError(line: 1, text: text, reason: "the table is empty") }
        var next: UInt64 = 0
        for (index, line) in lines.enumerated() {
            guard line.start == next else {
                throw TableParseError(
                    line: index + 1, text: line.description,
                    reason: "starts at sector \(line.start), expected \(next) (targets must be contiguous)")
            }
            next = line.start + line.length
        }
        self.lines = lines
    }

    /// Total length in 512-byte sectors.
    public var lengthSectors: UInt64 { lines.last.map { $0.start + $0.length } ?? 0 }

    /// The devices the table stacks on.
    public var devices: [DeviceNumber] { lines.flatMap(\.target.devices) }

    /// Whether every line has the given target type.
    public func isOnly(_ typeName: String) -> Bool { lines.allSatisfy { $0.target.typeName == typeName } }

    /// The device a one-line `snapshot-origin` or write-fuse table stacks on: a live snapshot's
    /// origin, writable or fused.
    public var snapshotOriginDevice: DeviceNumber? {
        guard lines.count == 1 else { return nil }
        switch lines[0].target {
        case .snapshotOrigin(let device), .writeFuse(let device): return device
        default: return nil
        }
    }

    /// Targets that keep state and metadata of their own (md's raid superblocks and bitmaps, a
    /// mirror's log, dm-cache's and dm-writecache's metadata, dm-integrity's journal, vdo's
    /// index): two live instances over the same devices corrupt it. lvm2 resumes a snapshot
    /// origin's new `-real` only once the origin is suspended (`delay_resume_if_new` in
    /// libdm/libdm-deptree.c) for this reason.
    public static let statefulTargetTypes: Set<String> = ["raid", "mirror", "cache", "writecache", "integrity", "vdo", "era", "clone"]

    /// Whether a target of this table keeps state of its own (see `statefulTargetTypes`).
    public var keepsState: Bool { lines.contains { Self.statefulTargetTypes.contains($0.target.typeName) } }

    /// The targets guard's classic snapshot has been proven on, end to end, in the kernel suite
    /// (take, commit, rollback, a kept run rolled back later, the LV deactivated and activated
    /// again): stateless ones, raid1 and lvm2's writecache.
    public static let provenTargetTypes: Set<String> = ["linear", "striped", "crypt", "zero", "error", "writecache"]

    /// The targets of this table guard's classic snapshot is not proven on ("raid5", "cache"),
    /// each once, in table order; empty when it may snapshot it.
    public var unprovenTargets: [String] {
        var found: [String] = []
        for line in lines {
            let type = line.target.typeName
            let name: String
            if type == "raid" {
                let level = line.target.description.split(separator: " ").dropFirst().first.map(String.init) ?? "raid"
                if level == "raid1" { continue }
                name = level
            } else if Self.provenTargetTypes.contains(type) {
                continue
            } else {
                name = type
            }
            if !found.contains(name) { found.append(name) }
        }
        return found
    }

    /// Whether this is guard's write fuse.
    public var isFused: Bool {
        if lines.count == 1, case .writeFuse = lines[0].target { return true }
        return false
    }

    public var description: String { lines.map(\.description).joined(separator: "\n") }

    /// What stands in for a key guard does not keep.
    public static let redactedKey = "<key-not-kept>"

    /// The table without secrets, as guard stores it (journal, COW label, output): a `crypt`
    /// target's key (`<cipher> <key> <iv_offset> ...`) becomes `<key-not-kept>`, unless it is
    /// a reference to a kernel keyring key (`:64:logon:...`), which holds no secret itself.
    public var redacted: Table {
        Table(
            lines.map { line in
                guard case .other("crypt", let parameters) = line.target else { return line }
                var fields = parameters.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
                guard fields.count > 1, !fields[1].hasPrefix(":") else { return line }
                fields[1] = Self.redactedKey
                return Line(start: line.start, length: line.length, target: .other(type: "crypt", parameters: fields.joined(separator: " ")))
            })
    }

    /// Whether a key was taken out of this table (it cannot be loaded as it is).
    public var isRedacted: Bool {
        lines.contains { line in
            guard case .other("crypt", let parameters) = line.target else { return false }
            return parameters.split(separator: " ").dropFirst().first == Substring(Self.redactedKey)
        }
    }
}

/// A table text that does not parse.
public struct TableParseError: Error, Sendable, CustomStringConvertible, Equatable {
    public var line: Int
    public var text: String
    public var reason: String
    public var description: String { "table line \(line) '\(text)': \(reason)" }
}
