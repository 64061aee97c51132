import BlockDevice
import Foundation

/// guard's own label at the start of every COW storage (file or block device).
///
/// The first MiB of the storage is guard's: two label slots (at 0 and 256 KiB, written
/// alternately, the valid one with the higher generation wins, so a torn write never
/// loses the label), then the kernel's snapshot area starts at 1 MiB. With the label and
/// the kernel's persistent exception store, the whole stack can be reassembled after a
/// reboot: which origin, which table, which chunk size, whether a merge was under way.
public struct CowLabel: Codable, Hashable, Sendable {
    public enum State: String, Codable, Sendable {
        /// Layers being built; the snapshot never went live.
        case preparing
        /// The snapshot is live (or was, before a reboot) and its run has not decided yet:
        /// after a power loss the boot reassembly merges it back.
        case active
        /// The run decided to keep the snapshot for a later commit or rollback.
        case kept
        /// A merge back into the origin was started: reassembly resumes it.
        case merging
        /// Commit or merge finished; the storage is being released.
        case released
        /// The origin was written while the snapshot was not live (before guard could
        /// reassemble it): never reassembled again, kept until the admin discards it.
        case stale
    }

    public var formatVersion: Int = 1
    public var runToken: String
    public var volumeIndex: Int
    /// The origin's dm UUID (an LVM LV's `LVM-...`, a guard volume's `GUARD-VOL-...`).
    public var originUUID: String
    public var originName: String
    public var originSectors: UInt64
    /// The origin's own table when the snapshot was taken.
    public var originTable: String
    public var chunkSectors: UInt32
    /// Size of the whole storage, label area included.
    public var storageBytes: UInt64
    public var state: State
    public var generation: UInt64 = 0
    /// Seconds since 1970.
    public var createdAt: Int64

    public var identity: StackIdentity { StackIdentity(runToken: runToken, volumeIndex: volumeIndex) }

    /// Where the kernel's snapshot area starts, in bytes.
    public static let areaOffset: UInt64 = 1 << 20
    public static let areaOffsetSectors: UInt64 = areaOffset / 512
    static let magic: [UInt8] = Array("GUARDCOW".utf8)
    static let slotOffsets: [UInt64] = [0, 256 << 10]
    static let slotHeaderBytes = 32
    static let slotCapacity = 64 << 10

    public init(
        identity: StackIdentity, originUUID: String, originName: String, originSectors: UInt64, originTable: String,
        chunkSectors: UInt32, storageBytes: UInt64, state: State, createdAt: Int64
    ) {
        self.runToken = identity.runToken
        self.volumeIndex = identity.volumeIndex
        self.originUUID = originUUID
        self.originName = originName
        self.originSectors = originSectors
        self.originTable = originTable
        self.chunkSectors = chunkSectors
        self.storageBytes = storageBytes
        self.state = state
        self.createdAt = createdAt
    }

    /// Encodes one slot: magic, version, payload length, generation, CRC-32 of the payload, JSON payload.
    /// - Throws: `SnapshotError` when the label does not fit its slot (an origin whose table
    ///   has thousands of segments): the planner asks before anything is written.
    func encodedSlot() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let payload = [UInt8]((try? encoder.encode(self)) ?? Data())
        guard payload.count + Self.slotHeaderBytes <= Self.slotCapacity else {
            throw SnapshotError(
                .other, "snapshot of \(originName)",
                "guard's COW label would need \(payload.count + Self.slotHeaderBytes) bytes, more than its \(Self.slotCapacity) (the volume's table has \(originTable.split(separator: "\n").count) segments, \(originTable.utf8.count) bytes)",
                hint: "move the volume to fewer segments (`lvconvert`, `pvmove`), or snapshot it with lvm2")
        }
        var bytes = Self.magic
        bytes += UInt32(1).littleEndianBytes
        bytes += UInt32(payload.count).littleEndianBytes
        bytes += generation.littleEndianBytes
        bytes += CRC32.checksum(payload).littleEndianBytes
        bytes += [UInt8](repeating: 0, count: Self.slotHeaderBytes - bytes.count)
        return bytes + payload
    }

    static func decodeSlot(_ bytes: [UInt8]) -> CowLabel? {
        guard bytes.count >= slotHeaderBytes, Array(bytes[0..<8]) == magic else { return nil }
        let length = Int(UInt32(littleEndianBytes: bytes[12..<16]))
        let generation = UInt64(littleEndianBytes: bytes[16..<24])
        let crc = UInt32(littleEndianBytes: bytes[24..<28])
        guard length > 0, slotHeaderBytes + length <= bytes.count else { return nil }
        let payload = Array(bytes[slotHeaderBytes..<(slotHeaderBytes + length)])
        guard CRC32.checksum(payload) == crc, var label = try? JSONDecoder().decode(CowLabel.self, from: Data(payload))
        else { return nil }
        label.generation = generation
        return label
    }

    /// Reads the label of a COW storage; nil when it has none (or only damaged slots).
    /// - Note: pread(2) of both slots.
    public static func read(from path: String) throws -> CowLabel? {
        let file = try RawFile(path: path, readOnly: true)
        return try read(from: file)
    }

    static func read(from file: borrowing RawFile) throws -> CowLabel? {
        let labels = try slotOffsets.compactMap { offset in
            decodeSlot(try file.read(at: offset, count: slotCapacity))
        }
        return labels.max { $0.generation < $1.generation }
    }

    /// Writes the label with the next generation into the older slot and syncs it.
    /// - Note: pwrite(2) + fsync(2).
    public mutating func write(to path: String) throws {
        let file = try RawFile(path: path)
        try write(to: file)
    }

    mutating func write(to file: borrowing RawFile) throws {
        generation += 1
        try file.write(try encodedSlot(), at: Self.slotOffsets[Int(generation % 2)])
        try file.sync()
    }

    /// Erases both label slots and the kernel's snapshot header, so the storage is never
    /// mistaken for a live COW again.
    public static func wipe(_ path: String) throws {
        let file = try RawFile(path: path)
        let zeros = [UInt8](repeating: 0, count: slotCapacity)
        for offset in slotOffsets { try file.write(zeros, at: offset) }
        if try file.size() >= areaOffset + 4096 {
            try file.write([UInt8](repeating: 0, count: 4096), at: areaOffset)
        }
        try file.sync()
    }
}

/// The kernel's persistent snapshot header (chunk 0 of the snapshot area):
/// le32 magic 0x70416e53 ("SnAp"), le32 valid, le32 version, le32 chunk size in sectors.
public struct KernelCowHeader: Hashable, Sendable {
    public static let magic: UInt32 = 0x7041_6e53
    public var valid: Bool
    public var version: UInt32
    public var chunkSectors: UInt32

    public init(valid: Bool, version: UInt32, chunkSectors: UInt32) {
        self.valid = valid
        self.version = version
        self.chunkSectors = chunkSectors
    }

    /// Reads the header at the snapshot area of `path`; nil when the area has none (never used, or zeroed).
    public static func read(from path: String, areaOffset: UInt64 = CowLabel.areaOffset) throws -> KernelCowHeader? {
        let file = try RawFile(path: path, readOnly: true)
        let bytes = try file.read(at: areaOffset, count: 16)
        return parse(bytes)
    }

    public static func parse(_ bytes: [UInt8]) -> KernelCowHeader? {
        guard bytes.count >= 16, UInt32(littleEndianBytes: bytes[0..<4]) == magic else { return nil }
        return KernelCowHeader(
            valid: UInt32(littleEndianBytes: bytes[4..<8]) != 0, version: UInt32(littleEndianBytes: bytes[8..<12]),
            chunkSectors: UInt32(littleEndianBytes: bytes[12..<16]))
    }
}

/// CRC-32 (IEEE 802.3), for the label slots.
enum CRC32 {
    static let table: [UInt32] = (0..<256).map { index in
        var value = UInt32(index)
        for _ in 0..<8 { value = value & 1 == 1 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1 }
        return value
    }

    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}

extension FixedWidthInteger {
    var littleEndianBytes: [UInt8] {
        withUnsafeBytes(of: self.littleEndian) { Array($0) }
    }

    init(littleEndianBytes bytes: ArraySlice<UInt8>) {
        var value: Self = 0
        for (shift, byte) in bytes.enumerated() { value |= Self(byte) << (shift * 8) }
        self = value
    }
}
