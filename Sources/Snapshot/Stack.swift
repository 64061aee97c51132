import BlockDevice
import DeviceMapper

/// Where a snapshot's COW storage lives.
public enum CowStorage: Hashable, Sendable, Codable, CustomStringConvertible {
    /// A preallocated file guard creates (and deletes), attached to a loop device.
    case file(path: String)
    /// A block device the admin named; guard writes its label on it and wipes it afterwards.
    case blockDevice(path: String)
    /// The snapshot is a thin device in the volume's own pool (`/dev/mapper/guard-pool-NAME`):
    /// guard never writes, wipes or deletes this storage; it only sends the pool messages.
    case thinPool(path: String)

    public var path: String {
        switch self {
        case .file(let path), .blockDevice(let path), .thinPool(let path): return path
        }
    }

    public var isThin: Bool {
        if case .thinPool = self { return true }
        return false
    }

    public var isFile: Bool {
        if case .file = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .file(let path): return "file \(path)"
        case .blockDevice(let path): return "device \(path)"
        case .thinPool(let path): return "thin pool \(path)"
        }
    }
}

/// Everything guard needs to find, extend, commit, merge or reassemble one snapshot stack.
/// Stored in the journal; the COW label holds the same facts on disk.
public struct SnapshotStack: Hashable, Sendable, Codable {
    public var identity: StackIdentity
    public var originName: String
    public var originUUID: String
    /// The origin's number when the snapshot was taken (it can change after a reboot).
    public var originNumber: DeviceNumber
    public var originSectors: UInt64
    /// The origin's own table when the snapshot was taken.
    public var originTable: String
    public var storage: CowStorage
    /// Size of the whole storage (label area included), in bytes.
    public var storageBytes: UInt64
    public var chunkSectors: UInt32
    /// A COW device's name that survives reboots (`BlockDevices.stableIdentity`), journaled
    /// with the stack and checked before guard writes to the device again.
    public var storageIdentity: String?
    public var realName: String
    public var cowName: String
    public var snapName: String
    /// The fuse reserve within the area (nil in stacks journaled before it existed: none).
    public var reserveBytes: UInt64?
    /// A snapshot inside a thin guard volume's pool (storage `.thinPool`); nil for the
    /// classic stack. Its size is the pool's data area (`storageBytes` is that plus
    /// `CowLabel.areaOffset`, so budget and fill are the pool's).
    public var thin: ThinSnapshot?

    public var geometry: CowGeometry { CowGeometry(chunkSectors: chunkSectors) }
    /// Whether the origin's own table keeps state of its own (raid, writecache, ...): its
    /// `-real` then goes live only inside the window, with the origin suspended, and is
    /// suspended before the origin's own table is live again (a table that cannot be read
    /// counts as one).
    public var delaysRealResume: Bool { thin == nil && ((try? Table(parsing: originTable))?.keepsState ?? true) }
    /// Bytes the kernel can use for the snapshot (storage minus guard's label area).
    public var areaBytes: UInt64 { storageBytes - CowLabel.areaOffset }
    /// The snapshot's size as the recipe gave it (grown by extensions): the area without the
    /// fuse reserve. Fill, `stop_at` and growth thresholds are fractions of it.
    public var budgetBytes: UInt64 { areaBytes - min(reserveBytes ?? 0, areaBytes) }

    /// How full the snapshot is against its size: allocated / budget (above 1 in the reserve).
    public func fill(_ usage: SnapshotUsage) -> Double {
        Double(usage.allocatedBytes) / Double(max(budgetBytes, 1))
    }
    public var originBytes: UInt64 { originSectors * 512 }
    public var originPath: String { "/dev/mapper/\(originName)" }
    public var snapPath: String { "/dev/mapper/\(snapName)" }

    public init(
        identity: StackIdentity, originName: String, originUUID: String, originNumber: DeviceNumber,
        originSectors: UInt64, originTable: String, storage: CowStorage, storageBytes: UInt64, chunkSectors: UInt32
    ) {
        self.identity = identity
        self.originName = originName
        self.originUUID = originUUID
        self.originNumber = originNumber
        self.originSectors = originSectors
        self.originTable = originTable
        self.storage = storage
        self.storageBytes = storageBytes
        self.chunkSectors = chunkSectors
        self.realName = identity.name(.real, originName: originName)
        self.cowName = identity.name(.cow, originName: originName)
        self.snapName = identity.name(.snap, originName: originName)
    }

    /// The origin as the kernel knows it now: by UUID when it has one, else by name.
    public var originRef: DeviceRef { originUUID.isEmpty ? .name(originName) : .uuid(originUUID) }

    public func ref(_ layer: StackIdentity.Layer) -> DeviceRef { .uuid(identity.uuid(layer)) }

    /// A label describing this stack in `state`.
    public func label(state: CowLabel.State, createdAt: Int64) -> CowLabel {
        CowLabel(
            identity: identity, originUUID: originUUID, originName: originName, originSectors: originSectors,
            originTable: originTable, chunkSectors: chunkSectors, storageBytes: storageBytes, state: state,
            createdAt: createdAt)
    }
}

/// A thin snapshot: the pool's id of the volume when it was taken (`originID`), and the id
/// of the snapshot (`snapshotID`), which a rollback makes the volume.
public struct ThinSnapshot: Hashable, Sendable, Codable {
    public var poolUUID: String
    public var originID: UInt32
    public var snapshotID: UInt32
    /// The volume's registry file (`<state dir>/volumes/NAME.json`): a rollback writes the
    /// snapshot's id there before the volume's table changes, so a reboot activates the
    /// volume on the id the rollback chose.
    public var registry: String
    public var blockSectors: UInt32
    /// The pool's data in use before the snapshot (nil in journals from before it was kept):
    /// what the run added is the pool's use beyond it.
    public var baseUsedBytes: UInt64?

    public init(poolUUID: String, originID: UInt32, snapshotID: UInt32, registry: String, blockSectors: UInt32, baseUsedBytes: UInt64? = nil) {
        self.poolUUID = poolUUID
        self.originID = originID
        self.snapshotID = snapshotID
        self.registry = registry
        self.blockSectors = blockSectors
        self.baseUsedBytes = baseUsedBytes
    }

    public var poolRef: DeviceRef { .uuid(poolUUID) }
}

extension SnapshotStack {
    /// The space the run's changes took, from a reading of the snapshot's use: a COW's use is
    /// all the run's; a thin snapshot's use is its pool's, of which the run's is what lies
    /// beyond the pool's use before the snapshot. (`size: auto` learns from it.)
    public func changedBytes(used: UInt64) -> UInt64 {
        guard let base = thin?.baseUsedBytes else { return used }
        return used > base ? used - base : 0
    }
}

/// What a caller asks for one volume of a snapshot set.
public struct VolumeRequest: Sendable, Hashable {
    public enum Storage: Sendable, Hashable {
        /// A file in this directory (guard's state directory by default).
        case fileIn(directory: String)
        /// This block device, used whole.
        case blockDevice(path: String)
        /// A thin snapshot in the pool of the guard thin volume whose registry file this is.
        case thinPool(registry: String)
    }

    /// The origin: /dev/mapper/NAME, /dev/VG/LV, /dev/dm-N, or a dm name.
    public var origin: String
    public var storage: Storage
    public var size: CowSize
    public var chunkSectors: UInt32
    /// COW space beyond `size` for the fuse (see `CowGeometry.fuseReserve`); 0: none.
    public var reserveBytes: UInt64

    public init(origin: String, storage: Storage, size: CowSize, chunkSectors: UInt32 = SnapshotEngine.defaultChunkSectors, reserveBytes: UInt64 = 0) {
        self.origin = origin
        self.storage = storage
        self.size = size
        self.chunkSectors = chunkSectors
        self.reserveBytes = reserveBytes
    }
}

/// A snapshot's state as the kernel reports it, with what it means for a rollback.
public struct SnapshotHealth: Sendable, Hashable {
    public var status: SnapshotStatus
    public var usage: SnapshotUsage? { status.usage }
    public var isRestorable: Bool { status.isRestorable }
}

/// Progress of a merge back into the origin.
public enum MergeState: Sendable, Hashable {
    /// Still merging: `remainingSectors` of data chunks left of `initialSectors`.
    case merging(remainingSectors: UInt64, usage: SnapshotUsage)
    /// The kernel reports every chunk merged (allocated == metadata).
    case complete
    /// The kernel stopped: `Merge failed` or `Invalid`.
    case failed(SnapshotStatus)
    /// The origin is back on its own table: the merge was finished and torn down.
    case finished
    /// The origin is off the merge but the label says merging: a reboot tore the stack down
    /// mid-merge. Reassemble it (`guard recover`); nothing may be torn down.
    case needsReassembly(String)
}
