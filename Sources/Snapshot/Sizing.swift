import Quantities

/// How much COW space a snapshot needs, following the kernel's persistent store layout
/// (drivers/md/dm-snap-persistent.c): chunk 0 is the header, then areas of one metadata
/// chunk followed by the data chunks it describes, each exception taking 16 bytes.
public struct CowGeometry: Hashable, Sendable {
    /// Chunk size in 512-byte sectors (a power of two, 8 = 4 KiB by default).
    public var chunkSectors: UInt32

    public init(chunkSectors: UInt32) {
        precondition(chunkSectors >= 8 && chunkSectors.nonzeroBitCount == 1, "chunk size must be a power of two >= 4 KiB")
        self.chunkSectors = chunkSectors
    }

    public var chunkBytes: UInt64 { UInt64(chunkSectors) * 512 }
    /// Exceptions one metadata chunk describes.
    public var exceptionsPerArea: UInt64 { chunkBytes / 16 }

    /// COW bytes needed to hold `changedBytes` of distinct changed origin data (rounded up to chunks),
    /// header and metadata included. The kernel allocates the next area's metadata chunk as
    /// soon as an area is full, so a full area costs two (observed: 1 MiB of 4 KiB chunks
    /// shows as 2072 allocated sectors, 259 chunks).
    public func bytesNeeded(forChanged changedBytes: UInt64) -> UInt64 {
        let dataChunks = (changedBytes + chunkBytes - 1) / chunkBytes
        let metadataChunks = dataChunks / exceptionsPerArea + 1
        return (1 + metadataChunks + dataChunks) * chunkBytes
    }

    /// COW bytes that can never fill up: every chunk of the origin changed.
    public func bytesForWholeOrigin(_ originBytes: UInt64) -> UInt64 {
        bytesNeeded(forChanged: originBytes)
    }

    /// The smallest COW the kernel accepts with room for at least one exception.
    public var minimumBytes: UInt64 { 3 * chunkBytes }

    /// Rounds `bytes` up to whole chunks.
    public func roundUp(_ bytes: UInt64) -> UInt64 { (bytes + chunkBytes - 1) / chunkBytes * chunkBytes }

    /// The least fuse reserve (32 MiB).
    public static let minimumFuseReserve: UInt64 = 32 << 20

    /// The fuse reserve of a snapshot of `size` bytes: COW space beyond its size, so that what
    /// is written between the reading that finds the COW at its stop point and the fuse taking
    /// effect (a database's burst, a checkpoint) lands in the COW instead of invalidating the
    /// snapshot. A quarter of the size, at least 32 MiB, never more than the whole origin needs.
    /// At 100 MB/s of new changes a 250 ms poll writes 25 MB: 32 MiB covers it
    /// (`Scripts/bench` measures the fastest writer the fuse stops in time).
    public func fuseReserve(forSize size: UInt64, originBytes: UInt64) -> UInt64 {
        let whole = bytesForWholeOrigin(originBytes)
        guard whole > size else { return 0 }
        return min(roundUp(max(size / 4, Self.minimumFuseReserve)), whole - size)
    }
}

/// A snapshot size as a recipe or caller gives it.
public enum CowSize: Hashable, Sendable, Codable, CustomStringConvertible {
    case bytes(UInt64)
    /// Percent of the origin's size (1...100).
    case percentOfOrigin(Double)

    /// The size in bytes for an origin of `originBytes`, rounded up to whole chunks and
    /// never below the minimum the kernel needs.
    public func resolve(originBytes: UInt64, geometry: CowGeometry) -> UInt64 {
        let raw: UInt64
        switch self {
        case .bytes(let bytes): raw = bytes
        case .percentOfOrigin(let percent): raw = UInt64((Double(originBytes) * percent / 100).rounded(.up))
        }
        return max(geometry.roundUp(raw), geometry.minimumBytes)
    }

    public var description: String {
        switch self {
        case .bytes(let bytes): return formatBytes(bytes)
        case .percentOfOrigin(let percent): return "\(oneDecimal(percent))% of the origin"
        }
    }
}

/// When and how far a file-backed COW grows while the steps run.
public struct ExtensionPolicy: Hashable, Sendable, Codable {
    /// Grow when the COW is this full (0...1).
    public var threshold: Double
    /// Grow by this many bytes each time.
    public var stepBytes: UInt64
    /// Never grow beyond this many bytes.
    public var maximumBytes: UInt64

    public init(threshold: Double, stepBytes: UInt64, maximumBytes: UInt64) {
        self.threshold = threshold
        self.stepBytes = stepBytes
        self.maximumBytes = maximumBytes
    }
}
