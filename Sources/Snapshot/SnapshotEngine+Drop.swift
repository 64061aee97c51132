import BlockDevice
import DeviceMapper
import Foundation
import Quantities

extension SnapshotEngine {
    // MARK: Dropping a snapshot (commit, or undoing a preparation)

    /// Drops the snapshot and keeps the origin's current data: the origin goes back to its
    /// own table, then `-snap`, `-real`, `-cow` and the COW storage are removed.
    ///
    /// Idempotent, and correct for a stack in any state before a merge: never taken,
    /// half-built, live, or half-dropped by a crash.
    ///
    /// A stack that is not live is dropped only when its storage provably holds nothing of the
    /// old data (see `evidence`), or when `discarding` says the run decided to commit and the
    /// journal holds that decision. The label says `released` before the origin leaves the
    /// snapshot, so a reboot in between never brings the snapshot back.
    /// - Throws: `.mergeInProgress` when the origin is merging (finish that instead),
    ///   `.inUse` when the snapshot is mounted, `.needsReassembly` or `.stale` when the storage
    ///   of a snapshot that is not live may hold old blocks (nothing is touched).
    func drop(_ stack: SnapshotStack, discarding: Bool = false) throws {
        if let thin = stack.thin { return try dropThin(stack, thin) }
        let operation = "commit of \(stack.originName)"
        // One udev wait for the origin's resume and the layers' removal.
        let udev = UdevBatch()
        defer { udev.finish() }
        let real = try dm.info(stack.ref(.real))
        let snap = try dm.info(stack.ref(.snap))
        let origin = try dm.info(stack.originRef)
        let originTable = try origin.map { try dm.table(.number($0.number)) }
        // Before the label says released: a merging origin must finish, not be dropped.
        if let origin, originTable?.isOnly("snapshot-merge") == true {
            throw SnapshotError(.mergeInProgress, operation, "\(origin.name) is merging its snapshot back", hint: "wait for the merge (`guard status --wait`)")
        }
        if !(try liveState(stack).live) && !discarding { try requireReleasable(stack, operation) }
        if let snap { try waitUntilClosed(snap, operation: operation, hint: "unmount it first") }
        try markReleased(stack)
        if let origin, let live = originTable {
            if origin.hasInactiveTable {
                let inactive = try dm.table(.number(origin.number), inactive: true)
                if let real, inactive.devices.contains(real.number) || inactive.isOnly("snapshot-origin") {
                    try dm.clearInactiveTable(.number(origin.number))  // a swap that never happened
                }
            }
            // A fused origin too: the commit lifts the fuse with the snapshot.
            if let device = live.snapshotOriginDevice, real == nil || device == real?.number {
                let own: Table
                if let real {
                    own = try dm.table(.number(real.number))
                } else {
                    own = try Table(parsing: stack.originTable)
                    if own.isRedacted {
                        throw SnapshotError(
                            .layerMissing, operation, "\(origin.name)'s -real layer is gone and its own table holds a key guard does not keep",
                            hint: "load the volume's table again yourself (`cryptsetup open`, `dmsetup reload`), then run `guard recover`")
                    }
                }
                try executor.run(.drop(origin: origin, own: own, snap: snap, statefulReal: stack.delaysRealResume ? real : nil, name: operation), udev: udev)
                log?("\(origin.name) is back on its own table")
            } else if origin.isSuspended {
                try dm.resume(.number(origin.number))  // left suspended by a crash, own table
            }
        }
        CrashPoint.hit(.commitOriginRestored)
        try removeLayers(stack, [.snap, .real, .cow], udev: udev)
        CrashPoint.hit(.commitLayersRemoved)
        try releaseStorage(stack)
    }

    /// Makes the COW files of `stacks` (`stage`), ahead of `prepare`: a run does it before its
    /// quiesce hooks stop the service, so the service is not down while they are written. A
    /// staged file has no label: a crash leaves nothing recovery would keep.
    public func stage(_ stacks: [SnapshotStack]) throws {
        for stack in stacks where stack.storage.isFile {
            if try Self.isStaged(stack) { continue }
            _ = try Self.makeCowFile(stack, log: log)
        }
    }

    /// The loop device of a COW file: with direct I/O (`CowFileIO`) where the file's
    /// filesystem really does it, through the page cache where it does not (said in the log).
    func attachCowFile(_ path: String) throws -> LoopHandle {
        var direct = Self.cowFileIO != .buffered
        if direct && !LoopDevice.directIOWorks(on: path) {
            log?("\(path)'s filesystem refuses direct I/O: its loop device writes through the page cache")
            direct = false
        }
        return try LoopDevice.attach(file: path, autoclear: true, directIO: direct)
    }

    /// Removes COW files `stage` made that no `prepare` used (the quiesce hooks failed).
    public func unstage(_ stacks: [SnapshotStack]) {
        for stack in stacks where stack.storage.isFile && (try? Self.isStaged(stack)) == true {
            unlink(stack.storage.path)
        }
    }

    /// A COW file made for `stack`: created (it must not exist), preallocated, and, unless COW
    /// files are written through the page cache, its snapshot area written with zeros.
    static func makeCowFile(_ stack: SnapshotStack, log: (@Sendable (String) -> Void)?) throws -> RawFile {
        let path = stack.storage.path
        log?("creating COW file \(path) (\(formatBytes(stack.storageBytes)), preallocated)")
        try CowDirectoryMarker.place(in: (path as NSString).deletingLastPathComponent)
        let file = try RawFile(path: path, create: true, exclusive: true)
        do {
            if !(try Self.preallocate(file, from: 0, length: stack.storageBytes)) {
                log?("warning: \(path)'s filesystem cannot preallocate; the COW file is sparse")
            }
            if Self.cowFileIO == .directZeroed { try Self.zeroFill(file, from: CowLabel.areaOffset, to: stack.storageBytes) }
        } catch {
            unlink(path)
            throw error
        }
        return file
    }

    /// Whether `stage` made `stack`'s file: one of the run's own name (its token is in it), of
    /// the stack's size, with no label yet.
    static func isStaged(_ stack: SnapshotStack) throws -> Bool {
        guard case .file(let path) = stack.storage, FileManager.default.fileExists(atPath: path) else { return false }
        let file = try RawFile(path: path, readOnly: true)
        return try file.size() == stack.storageBytes && CowLabel.read(from: file) == nil
    }

    /// Writes zeros over `[from, to)` and syncs: the filesystem's extents are then written ones,
    /// so the kernel's copies into the COW convert no unwritten extent (a journaled change that
    /// each exception-store commit would have to wait for).
    static func zeroFill(_ file: borrowing RawFile, from start: UInt64, to end: UInt64) throws {
        let step: UInt64 = 1 << 20
        let zeros = [UInt8](repeating: 0, count: Int(step))
        var offset = start
        while offset < end {
            let count = Int(min(step, end - offset))
            try file.write(count == zeros.count ? zeros : Array(zeros.prefix(count)), at: offset)
            offset += UInt64(count)
        }
        try file.sync()
    }

    /// Reserves space for a COW file; where the filesystem cannot (EOPNOTSUPP) the file is
    /// only grown, sparse. Returns whether the space is reserved.
    static func preallocate(_ file: borrowing RawFile, from offset: UInt64, length: UInt64) throws -> Bool {
        do {
            try file.allocate(offset: offset, length: length)
            return true
        } catch {
            guard error.errno == EOPNOTSUPP else { throw error }
            try file.truncate(to: offset + length)
            return false
        }
    }

    /// Removes the layers in order, waiting for udev once for all of them (and for what
    /// `udev` already holds: the commit's resumes).
    func removeLayers(_ stack: SnapshotStack, _ layers: [StackIdentity.Layer], udev: UdevBatch? = nil) throws {
        let batch = udev ?? UdevBatch()
        defer { batch.finish() }
        for layer in layers {
            guard let info = try dm.info(stack.ref(layer)) else { continue }
            let ref = DeviceRef.number(info.number)
            // A layer a crash left suspended (a stateful `-real` between the origin's own table
            // and its removal) that no device uses any more is retired first: a suspended device
            // holds every reader, and a held reader would keep it from being removed.
            if info.isSuspended && BlockDevices.holders(of: info.number).isEmpty {
                try dm.retire(ref, batch: batch)
            }
            if try removeNowOrAtClose(info, batch: batch) { log?("removed \(stack.identity.uuid(layer))") }
        }
    }

    /// Removes a layer now; a retired one (on an `error` table) that a process still holds open
    /// is left to the kernel, which removes it at its last close (said in the log).
    /// - Returns: whether it was removed now.
    func removeNowOrAtClose(_ info: DeviceInfo, batch: UdevBatch) throws -> Bool {
        guard try dm.removeRetired(.number(info.number), batch: batch) else {
            log?("\(info.name) is still open (an error device now); the kernel removes it when its last opener closes it")
            return false
        }
        return true
    }

    /// Writes `released` into the stack's label (the durable decision that its old blocks may
    /// go). A storage without this stack's label is left as it is.
    func markReleased(_ stack: SnapshotStack) throws {
        guard stack.thin == nil else { return }  // a pool has no label; guard never writes it
        let path = stack.storage.path
        guard FileManager.default.fileExists(atPath: path), var label = try CowLabel.read(from: path),
            label.identity == stack.identity, label.state != .released
        else { return }
        label.state = .released
        try label.write(to: path)
    }

    /// Wipes the label and the kernel header, detaches a loop device still bound to the
    /// file and deletes it. Idempotent. Only storage whose label says released, or that
    /// provably holds no old block, is released; anything else is refused and kept.
    func releaseStorage(_ stack: SnapshotStack) throws {
        guard stack.thin == nil else { return }  // a pool is the volume's storage: never released
        let path = stack.storage.path
        guard FileManager.default.fileExists(atPath: path) else { return }
        try requireReleasable(stack, "release of \(path)")
        try markReleased(stack)
        if stack.storage.isFile {
            for loop in LoopDevice.find(backingFile: path) { try? loop.detach() }
        }
        if !stack.storage.isFile {
            // A device is wiped only while it carries this run's label: a device that took its
            // path since (a replaced disk, renumbering) or was reused by hand is left alone.
            guard let label = try? CowLabel.read(from: path), label.identity == stack.identity else {
                log?("left \(path) as it is: it does not carry the label of run \(stack.identity.runToken)")
                return
            }
            if let journaled = stack.storageIdentity, let now = BlockDevices.stableIdentity(of: path), now != journaled {
                log?("left \(path) as it is: it is \(now) now, the run used \(journaled)")
                return
            }
        }
        try CowLabel.wipe(path)
        if stack.storage.isFile {
            try FileManager.default.removeItem(atPath: path)
            log?("deleted COW file \(path)")
        }
    }

    /// Records in the COW label what the run decided, so a reboot reassembles it right
    /// (`.kept`: a snapshot again; `.active`: an undecided run, merged back at boot).
    public func mark(_ stack: SnapshotStack, _ state: CowLabel.State) throws {
        guard stack.thin == nil else { return }  // the pool's metadata and the journal say it all
        guard var label = try CowLabel.read(from: stack.storage.path), label.identity == stack.identity else {
            throw SnapshotError(.labelMismatch, "label update of \(stack.storage.path)", "it has no label of run \(stack.identity.runToken)")
        }
        guard label.state != state else { return }
        // Stale is final: such a snapshot is never kept, merged or reassembled again, only released.
        if label.state == .stale && state != .released {
            throw SnapshotError(
                .stale, "label update of \(stack.storage.path)", "the snapshot of \(label.originName) is stale (its volume was written around it)",
                hint: "`guard commit` releases it")
        }
        label.state = state
        try label.write(to: stack.storage.path)
    }
}
