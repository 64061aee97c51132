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
        if trimmed == "Overflow" {
            self = .overflow
            return
        }
        if trimmed == "Merge failed" {
            self = .mergeFailed
            return
        }
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

/// The state of a `thin-pool` target (Documentation/admin-guide/device-mapper/thin-provisioning.rst):
/// `<transaction id> <used>/<total metadata blocks> <used>/<total data blocks> <held root>
/// ro|rw|out_of_data_space [no_]discard_passdown error|queue_if_no_space needs_check|- ...`,
/// or `Fail` once the pool has failed.
public struct ThinPoolStatus: Hashable, Sendable, Codable {
    public enum Mode: String, Hashable, Sendable, Codable {
        case readWrite = "rw"
        case readOnly = "ro"
        case outOfDataSpace = "out_of_data_space"
        /// The kernel reports `Fail` (or `Error`): the pool stopped; its metadata needs thin_check.
        case failed = "fail"
    }

    public var transactionID: UInt64
    /// Metadata blocks are 4 KiB.
    public var usedMetadataBlocks: UInt64
    public var totalMetadataBlocks: UInt64
    /// Data blocks are the pool's block size.
    public var usedDataBlocks: UInt64
    public var totalDataBlocks: UInt64
    public var mode: Mode
    /// The kernel asks for thin_check before the pool is used read-write again.
    public var needsCheck: Bool

    public static let metadataBlockBytes: UInt64 = 4096

    public var dataFill: Double { totalDataBlocks == 0 ? 0 : Double(usedDataBlocks) / Double(totalDataBlocks) }
    public var metadataFill: Double { totalMetadataBlocks == 0 ? 0 : Double(usedMetadataBlocks) / Double(totalMetadataBlocks) }

    public init(
        transactionID: UInt64, usedMetadataBlocks: UInt64, totalMetadataBlocks: UInt64, usedDataBlocks: UInt64,
        totalDataBlocks: UInt64, mode: Mode, needsCheck: Bool
    ) {
        self.transactionID = transactionID
        self.usedMetadataBlocks = usedMetadataBlocks
        self.totalMetadataBlocks = totalMetadataBlocks
        self.usedDataBlocks = usedDataBlocks
        self.totalDataBlocks = totalDataBlocks
        self.mode = mode
        self.needsCheck = needsCheck
    }

    /// Parses the status text of a thin-pool line; nil for text that is neither a status nor `Fail`.
    public init?(parsing text: String) {
        let fields = text.split(separator: " ", omittingEmptySubsequences: true)
        if fields.first == "Fail" || fields.first == "Error" {
            self.init(transactionID: 0, usedMetadataBlocks: 0, totalMetadataBlocks: 0, usedDataBlocks: 0, totalDataBlocks: 0, mode: .failed, needsCheck: true)
            return
        }
        guard fields.count >= 5, let transaction = UInt64(fields[0]) else { return nil }
        func ratio(_ field: Substring) -> (UInt64, UInt64)? {
            let parts = field.split(separator: "/")
            guard parts.count == 2, let used = UInt64(parts[0]), let total = UInt64(parts[1]) else { return nil }
            return (used, total)
        }
        guard let metadata = ratio(fields[1]), let data = ratio(fields[2]), let mode = Mode(rawValue: String(fields[4])) else { return nil }
        self.init(
            transactionID: transaction, usedMetadataBlocks: metadata.0, totalMetadataBlocks: metadata.1, usedDataBlocks: data.0,
            totalDataBlocks: data.1, mode: mode, needsCheck: fields.dropFirst(5).contains("needs_check"))
    }
}
