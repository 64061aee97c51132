import BlockDevice
import DeviceMapper
import Foundation

/// What a snapshot's durable records say about its storage: the COW label's state, the
/// kernel's exception-store header and its first exception. The kernel's current tables
/// never decide alone: after a reboot without reassembly they show no snapshot at all.
public enum StorageEvidence: Sendable, Hashable {
    /// Provably nothing of the old data is in the storage: the snapshot was never
    /// initialised by the kernel, never activated, or the kernel recorded no changed block.
    case nothingToKeep(String)
    /// The release was decided and recorded (label `released`), or the storage is gone.
    case released
    /// The storage holds, or may hold, old blocks of a snapshot that is not live: keep
    /// everything and reassemble it. The text says what is missing and what to do.
    case needsReassembly(String)
    /// The origin was written while the snapshot was not live: the COW is kept for the admin.
    case stale(String)

    /// Whether dropping the storage could lose old blocks.
    public var mustKeep: Bool {
        switch self {
        case .needsReassembly, .stale: return true
        case .nothingToKeep, .released: return false
        }
    }

    public var reason: String {
        switch self {
        case .nothingToKeep(let why), .needsReassembly(let why), .stale(let why): return why
        case .released: return "released"
        }
    }
}

/// A file guard puts in every directory it writes COW files into. A COW file that is missing
/// from a directory that has the marker was released; missing from one without it (an empty
/// mount point whose filesystem is not mounted yet), it may come back and must be waited for.
public enum CowDirectoryMarker {
    public static let name = ".guard-cow-directory"

    public static func isPresent(in directory: String) -> Bool {
        FileManager.default.fileExists(atPath: "\(directory)/\(name)")
    }

    public static func place(in directory: String) throws {
        guard !isPresent(in: directory) else { return }
        let file = try RawFile(path: "\(directory)/\(name)", create: true)
        try file.write(Array("guard writes COW files here; see guard-recover(8)\n".utf8), at: 0)
        try file.sync()
    }
}

extension KernelCowHeader {
    /// Whether the persistent exception store holds at least one exception: the first entry
    /// of the first metadata area (chunk 1 of the snapshot area) has a nonzero new chunk.
    /// The kernel zeroes that area when it initialises the store and commits an exception
    /// there before it lets the origin's write through, so `false` proves the origin was
    /// never written while the snapshot was live.
    public static func hasExceptions(_ path: String, chunkSectors: UInt32, areaOffset: UInt64 = CowLabel.areaOffset) throws -> Bool {
        let file = try RawFile(path: path, readOnly: true)
        let entry = try file.read(at: areaOffset + UInt64(chunkSectors) * 512, count: 16)
        guard entry.count == 16 else { return false }
        return UInt64(littleEndianBytes: entry[8..<16]) != 0
    }
}

extension SnapshotEngine {
    /// Whether the kernel has this stack live on its origin, and merging.
    public func liveState(_ stack: SnapshotStack) throws -> (live: Bool, merging: Bool) {
        if let thin = stack.thin { return try thinLiveState(stack, thin) }
        guard let origin = try dm.info(stack.originRef), let real = try dm.info(stack.ref(.real)) else { return (false, false) }
        let table = try dm.table(.number(origin.number))
        // A restart of a failed merge that guard did not finish (killed between the end of the
        // failed merge and the new one: crash point restart.error-table): the origin on
        // `error`, `-real` and `-cow` still there. The merge is still the stack's, and
        // recovery restarts it (`mergeState` says `failed`), never reassembles over it.
        if table.isOnly("error"), try dm.info(stack.ref(.snap)) == nil, try dm.info(stack.ref(.cow)) != nil { return (true, true) }
        guard table.devices.contains(real.number) else { return (false, false) }
        if table.isOnly("snapshot-merge") { return (true, true) }
        return (table.snapshotOriginDevice == real.number, false)  // writable or fused
    }

    /// What the storage of a stack that is not live holds, from durable facts only.
    public func evidence(_ stack: SnapshotStack) -> StorageEvidence {
        if let thin = stack.thin { return thinEvidence(stack, thin) }
        return stack.storageEvidence()
    }

    /// Refuses to release storage that may hold old blocks of a snapshot that is not live.
    func requireReleasable(_ stack: SnapshotStack, _ operation: String) throws {
        let evidence = evidence(stack)
        switch evidence {
        case .needsReassembly(let why): throw SnapshotError(.needsReassembly, operation, why, hint: "run `guard recover` once the device or directory is there")
        case .stale(let why): throw SnapshotError(.stale, operation, why, hint: "`guard commit` discards it")
        case .nothingToKeep, .released: return
        }
    }
}

extension SnapshotStack {
    /// What this stack's storage holds, from durable facts only (label, kernel header, first
    /// exception; fstab for a missing directory). Reads; never writes.
    public func storageEvidence(fstab: String = "/etc/fstab") -> StorageEvidence {
        let stack = self
        let path = stack.storage.path
        // A COW device is the one the run wrote only while its stable identity is the journaled
        // one: another disk under the same name (renumbered, replaced) proves nothing.
        if case .blockDevice = stack.storage, let journaled = stack.storageIdentity, FileManager.default.fileExists(atPath: path) {
            let now = BlockDevices.stableIdentity(of: path)
            if now != journaled {
                return .needsReassembly(
                    "the COW device \(path) is \(now ?? "a device guard cannot identify") now, not the run's (\(journaled)): nothing is read from or removed on it; make the run's device appear under \(path) again, then run `guard recover`"
                )
            }
        }
        guard FileManager.default.fileExists(atPath: path) else {
            guard stack.storage.isFile else {
                return .needsReassembly("its COW device \(path) is not there; attach or activate it, then run `guard recover`")
            }
            let directory = (path as NSString).deletingLastPathComponent
            if let late = Mounts.unmountedFileSystem(holding: directory, fstab: fstab) {
                return .needsReassembly("its COW file \(path) is on \(late), which is not mounted; mount \(late), then run `guard recover`")
            }
            if !FileManager.default.fileExists(atPath: directory) {
                return .needsReassembly("its COW directory \(directory) does not exist (is the filesystem that holds it mounted?); mount it, then run `guard recover`")
            }
            // An empty mount point is not the directory guard wrote the COW into.
            guard CowDirectoryMarker.isPresent(in: directory) else {
                return .needsReassembly(
                    "its COW file \(path) is missing and \(directory) is not the directory guard wrote it into (guard's marker \(CowDirectoryMarker.name) is not there: is its filesystem mounted?); mount it, then run `guard recover`"
                )
            }
            return .released
        }
        let label: CowLabel?
        do { label = try CowLabel.read(from: path) } catch {
            return .needsReassembly("its COW label in \(path) cannot be read (\(error)); nothing is removed; fix the device, then run `guard recover`")
        }
        let header: KernelCowHeader?
        do { header = try KernelCowHeader.read(from: path) } catch {
            return .needsReassembly("the snapshot header in \(path) cannot be read (\(error)); nothing is removed; fix the device, then run `guard recover`")
        }
        guard let label else {
            return header == nil ? .released : .needsReassembly("\(path) has a kernel snapshot header but no guard label; it is kept for you to inspect")
        }
        guard label.identity == stack.identity else {
            return .needsReassembly("\(path) holds a label of run \(label.runToken), not of this run; it is left alone")
        }
        switch label.state {
        case .released: return .released
        case .preparing: return .nothingToKeep("its snapshot was never taken")
        case .stale: return .stale("\(label.originName) was written while its snapshot was not live; the COW \(path) is kept")
        case .active, .kept, .merging: break
        }
        guard let header else { return .nothingToKeep("the kernel never initialised its snapshot") }
        if label.state != .merging, header.valid {
            do {
                if try !KernelCowHeader.hasExceptions(path, chunkSectors: header.chunkSectors) {
                    return .nothingToKeep("the kernel recorded no changed block in it")
                }
            } catch {
                return .needsReassembly("the exception store in \(path) cannot be read (\(error)); nothing is removed")
            }
        }
        let what = label.state == .merging ? "a merge that did not finish" : "the old blocks of \(label.originName)"
        return .needsReassembly("\(path) holds \(what), but the snapshot is not live; run `guard recover` with \(label.originName) active and unmounted")
    }
}
