import BlockDevice

/// One line of a device's status (DM_DEVICE_STATUS): the target type and its status text.
public struct StatusLine: Hashable, Sendable, CustomStringConvertible {
    public var start: UInt64
    public var length: UInt64
    public var type: String
    public var text: String

    public init(start: UInt64, length: UInt64, type: String, text: String) {
        self.start = start
        self.length = length
        self.type = type
        self.text = text
    }

    public var description: String { "\(start) \(length) \(type)" + (text.isEmpty ? "" : " \(text)") }

    /// The status of a `snapshot` or `snapshot-merge` line; nil for other targets.
    public var snapshot: SnapshotStatus? {
        type == "snapshot" || type == "snapshot-merge" ? SnapshotStatus(parsing: text) : nil
    }
}

/// COW use of a snapshot, in 512-byte sectors, as the kernel reports it.
public struct SnapshotUsage: Hashable, Sendable, Codable {
    /// Sectors of the COW in use, data and metadata.
    public var allocatedSectors: UInt64
    /// Size of the COW device.
    public var totalSectors: UInt64
    /// Sectors holding metadata (the header and exception tables).
    public var metadataSectors: UInt64

    public init(allocatedSectors: UInt64, totalSectors: UInt64, metadataSectors: UInt64) {
        self.allocatedSectors = allocatedSectors
        self.totalSectors = totalSectors
        self.metadataSectors = metadataSectors
    }

    /// Fraction of the COW in use, 0...1.
    public var fill: Double { totalSectors == 0 ? 0 : Double(allocatedSectors) / Double(totalSectors) }
    /// Bytes in use.
    public var allocatedBytes: UInt64 { allocatedSectors * 512 }
    public var totalBytes: UInt64 { totalSectors * 512 }
    /// Sectors of data chunks still to merge (snapshot-merge) or saved (snapshot).
    public var dataSectors: UInt64 { allocatedSectors >= metadataSectors ? allocatedSectors - metadataSectors : 0 }
    /// A merge is complete when no data chunk remains: allocated == metadata
    /// (Documentation/admin-guide/device-mapper/snapshot.rst).
    public var isMergeComplete: Bool { allocatedSectors == metadataSectors }
}

/// The state of a `snapshot` or `snapshot-merge` target.
public enum SnapshotStatus: Hashable, Sendable, CustomStringConvertible {
    /// In use: "allocated/total metadata".
    case active(SnapshotUsage)
    /// The snapshot was invalidated (COW full or an I/O error); its data is gone for good.
    /// Newer kernels append a cause.
    case invalid(cause: String?)
    /// Writes to the snapshot device itself overflowed the COW (store type PO).
    case overflow
    /// The kernel stopped merging after an error.
    case mergeFailed
    /// The store does not report usage.
    case unknown(String)

    /// Parses the status text of a snapshot or snapshot-merge target (after the type).
    public init(parsing text: String) {
        let trimmed = text.trimmingWhitespace()
        if trimmed == "Invalid" || trimmed.hasPrefix("Invalid ") {
            let cause = trimmed.dropFirst("Invalid".count).trimmingWhitespace()
            self = .invalid(cause: cause.isEmpty ? nil : cause)
            return
        }
        if trimmed == "Overflow" { self = .overflow; return }
        if trimmed == "Merge failed" { self = .mergeFailed; return }
        // "<allocated>/<total> <metadata>"
        let fields = trimmed.split(separator: " ")
        if fields.count == 2 {
            let ratio = fields[0].split(separator: "/")
            if ratio.count == 2, let allocated = UInt64(ratio[0]), let total = UInt64(ratio[1]),
                let metadata = UInt64(fields[1])
            {
                self = .active(SnapshotUsage(allocatedSectors: allocated, totalSectors: total, metadataSectors: metadata))
                return
            }
        }
        self = .unknown(trimmed)
    }

    public var usage: SnapshotUsage? {
        if case .active(let usage) = self { return usage }
        return nil
    }

    /// Whether the snapshot still holds the pre-upgrade data (and can be merged back).
    public var isRestorable: Bool { usage != nil }

    public var description: String {
        switch self {
        case .active(let usage): return "\(usage.allocatedSectors)/\(usage.totalSectors) \(usage.metadataSectors)"
        case .invalid(let cause): return "Invalid" + (cause.map { " \($0)" } ?? "")
        case .overflow: return "Overflow"
        case .mergeFailed: return "Merge failed"
        case .unknown(let text): return text
        }
    }
}
