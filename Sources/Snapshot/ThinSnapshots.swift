import BlockDevice
import DeviceMapper
import Foundation
import Quantities

#if canImport(Glibc)
import Glibc
#endif

// The thin backend: a snapshot of a thin guard volume is a thin device of its own pool.
// Taking it is one `create_snap` message with the volume suspended; nothing is copied on
// write. A rollback swaps the volume's table to the snapshot's id (no merge): the registry
// names the new id first, then the table changes, then the old id is deleted. A commit
// deletes the snapshot's id. guard never writes, wipes or deletes the pool's storage.
//
// The durable facts are the pool's metadata (which ids exist), the registry (which id the
// volume is) and the journal (what the run decided). They decide; the live table is
// evidence of how far a rollback went.

extension SnapshotEngine {
    /// The thin snapshot of a volume of guard's thin pools: its pool, the volume's id, a free id.
    /// - Throws: `SnapshotError` when the volume is not that volume, or its pool cannot take one.
    func planThin(origin: Origin, registry: String, operation: String) throws -> (ThinSnapshot, storage: CowStorage, dataBytes: UInt64) {
        let volume: GuardVolume
        do {
            volume = try GuardVolume.read(registry: registry)
        } catch {
            throw SnapshotError(.other, operation, "the registry \(registry) of the thin volume cannot be read: \(error)")
        }
        guard let layout = volume.thin, origin.table.lines.count == 1, case .thin(let pool, let id) = origin.table.lines[0].target else {
            throw SnapshotError(.other, operation, "\(origin.info.name) is not a thin guard volume (its table is \(origin.table))")
        }
        let names = ThinPoolNames(volume: volume.name)
        guard let poolInfo = try dm.info(.uuid(names.poolUUID)), poolInfo.number == pool else {
            throw SnapshotError(.other, operation, "\(origin.info.name)'s pool is not \(names.pool)")
        }
        guard id == layout.deviceID, layout.replacedID == nil else {
            let what =
                id != layout.deviceID
                ? "\(origin.info.name) is thin device \(id) of its pool, but its registry \(registry) says \(layout.deviceID)"
                : "a rollback of \(origin.info.name) has not finished (its registry \(registry) still names the replaced thin device \(layout.replacedID ?? 0))"
            throw SnapshotError(.other, operation, what, hint: "run `guard recover`: it finishes the rollback")
        }
        let status = try dm.thinPoolStatus(.number(pool))
        guard status.mode == .readWrite, !status.needsCheck else {
            throw SnapshotError(
                .noSpace, operation, "the pool of \(origin.info.name) is \(status.mode.rawValue)\(status.needsCheck ? ", needs_check" : ""): it cannot take a snapshot",
                hint: "see `guard volume list` and `dmesg`")
        }
        // The first free id after the volume's: ids of kept runs' snapshots exist and are skipped.
        var candidate = id
        repeat {
            candidate += 1
            guard candidate < 1 << 24 else { throw SnapshotError(.other, operation, "the pool of \(origin.info.name) has no free thin id") }
        } while try thinDeviceExists(pool: pool, id: candidate)
        let thin = ThinSnapshot(
            poolUUID: names.poolUUID, originID: id, snapshotID: candidate, registry: registry, blockSectors: layout.blockSectors,
            baseUsedBytes: status.usedDataBlocks * layout.blockBytes)
        return (thin, .thinPool(path: "/dev/mapper/\(names.pool)"), layout.dataBytes)
    }

    /// Whether thin device `id` exists in `pool`'s metadata: a table naming it is loaded into a
    /// device created for the question (never resumed, so nothing reads or writes it) and the
    /// kernel answers: the thin target's constructor fails with ENODATA for an id it lacks.
    func thinDeviceExists(pool: DeviceNumber, id: UInt32) throws -> Bool {
        let uuid = "\(DeviceMapper.uuidPrefix)PROBE-\(getpid())-\(id)"
        try dm.create(name: "guard-probe-\(getpid())-\(id)", uuid: uuid, readOnly: true)
        // Hidden: udev has nothing to do for a device that never had a live table.
        defer { try? dm.remove(.uuid(uuid), udevFlags: .hidden) }
        do {
            try dm.load(.uuid(uuid), table: Table(.thin(pool: pool, deviceID: id), length: 8), readOnly: true)
        } catch let error as DeviceMapperError where error.errno == ENODATA || (error.detail ?? "").contains("Couldn't open thin internal device") {
            return false
        }
        return true
    }

    /// The volume's live thin id, with its device; nil when the volume is not active or not thin.
    func thinState(_ stack: SnapshotStack) throws -> (origin: DeviceInfo, id: UInt32, pool: DeviceNumber)? {
        guard let origin = try dm.info(stack.originRef) else { return nil }
        let table = try dm.table(.number(origin.number))
        guard table.lines.count == 1, case .thin(let pool, let id) = table.lines[0].target else { return nil }
        return (origin, id, pool)
    }

    /// The volume's registry entry.
    func registryEntry(_ thin: ThinSnapshot) throws -> GuardVolume {
        try GuardVolume.read(registry: thin.registry)
    }

    /// Live: the snapshot's id exists and the volume is not on it. Merging: a rollback to it
    /// is under way (the registry names it; the swap or the deletion of the replaced id is left).
    func thinLiveState(_ stack: SnapshotStack, _ thin: ThinSnapshot) throws -> (live: Bool, merging: Bool) {
        guard let (_, id, pool) = try thinState(stack) else { return (false, false) }
        let registry = try registryEntry(thin).thin
        if id == thin.snapshotID || registry?.deviceID == thin.snapshotID {
            // The registry's note of the replaced id is cleared only once it is deleted.
            let unfinished = id != thin.snapshotID || registry?.replacedID != nil
            return (unfinished, unfinished)
        }
        return (try thinDeviceExists(pool: pool, id: thin.snapshotID), false)
    }

    /// What the pool holds of a thin snapshot that is not live, from the pool's metadata and the registry.
    func thinEvidence(_ stack: SnapshotStack, _ thin: ThinSnapshot) -> StorageEvidence {
        guard let (_, id, pool) = try? thinState(stack) else {
            return .needsReassembly("the thin volume \(stack.originName) is not active; activate it (`guard volume activate`), then run `guard recover`")
        }
        guard let exists = try? thinDeviceExists(pool: pool, id: thin.snapshotID) else {
            return .needsReassembly("guard cannot tell whether thin device \(thin.snapshotID) of \(stack.originName)'s pool exists; run `guard recover` again")
        }
        if id == thin.snapshotID { return .released }  // rolled back to it
        return exists ? .needsReassembly("thin device \(thin.snapshotID) of \(stack.originName)'s pool exists; run `guard recover`") : .released
    }

    /// The pool's use as the snapshot's: a full pool is what stops a thin run. Its data use,
    /// or its metadata use where that is the fuller of the two (scaled to the data's size),
    /// so `stop_at` stops the steps before either runs out.
    func thinHealth(_ thin: ThinSnapshot) throws -> SnapshotHealth {
        let status = try dm.thinPoolStatus(thin.poolRef)
        guard status.mode != .failed else { return SnapshotHealth(status: .invalid(cause: "the thin pool failed")) }
        let total = status.totalDataBlocks * UInt64(thin.blockSectors)
        let fill = max(status.dataFill, status.metadataFill)
        return SnapshotHealth(status: .active(SnapshotUsage(allocatedSectors: UInt64((fill * Double(total)).rounded()), totalSectors: total, metadataSectors: 0)))
    }

    /// Grows a thin volume's pool, for the COW watcher's growth policy: `storageBytes` is the
    /// pool's data plus `CowLabel.areaOffset`, as the stack counts it.
    func extendThin(_ stack: SnapshotStack, _ thin: ThinSnapshot, to storageBytes: UInt64) throws -> SnapshotStack {
        var grown = stack
        grown.storageBytes = try growThinPool(stack.originName, registry: thin.registry, to: storageBytes - CowLabel.areaOffset) + CowLabel.areaOffset
        return grown
    }

    /// Grows the pool of the thin volume `name` (whose registry file is `registry`) to
    /// `dataBytes`; returns the pool's data size now.
    /// A pool already that large (grown for another kept run of the volume, which shares it)
    /// is left as it is.
    func growThinPool(_ name: String, registry: String, to dataBytes: UInt64) throws -> UInt64 {
        if let current = try GuardVolume.read(registry: registry).thin?.dataBytes, current >= dataBytes { return current }
        let stateDirectory = ((registry as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent
        let volume = try GuardVolumes(dm: dm, stateDirectory: stateDirectory).extendPool(name: name, poolSize: dataBytes, engine: self)
        let bytes = volume.thin?.dataBytes ?? dataBytes
        log?("grew the pool of \(name) to \(formatBytes(bytes))")
        return bytes
    }

    /// Checks, before the window, that the snapshot's id is still free and the pool writable.
    func prepareThin(_ stack: SnapshotStack, _ thin: ThinSnapshot) throws {
        let operation = "snapshot of \(stack.originPath)"
        guard let (_, id, pool) = try thinState(stack), id == thin.originID else {
            throw SnapshotError(.other, operation, "\(stack.originName) is no longer thin device \(thin.originID)")
        }
        if try thinDeviceExists(pool: pool, id: thin.snapshotID) {
            throw SnapshotError(.other, operation, "thin id \(thin.snapshotID) of \(stack.originName)'s pool is taken since it was planned")
        }
    }

    /// After the window: the snapshot as a read-only device (`-snap`), for diff and restore.
    func activateThinView(_ stack: SnapshotStack, _ thin: ThinSnapshot, udev: UdevBatch?) throws {
        guard try dm.info(stack.ref(.snap)) == nil, let (_, _, pool) = try thinState(stack) else { return }
        try dm.create(
            name: stack.snapName, uuid: stack.identity.uuid(.snap), table: Table(.thin(pool: pool, deviceID: thin.snapshotID), length: stack.originSectors),
            readOnly: true, udevFlags: [.hidden, .lowPriority], batch: udev)
    }

    /// Makes a live thin snapshot's read-only view again (after a reboot).
    /// - Returns: whether it was missing and is made.
    public func restoreThinView(_ stack: SnapshotStack) throws -> Bool {
        guard let thin = stack.thin, try dm.info(stack.ref(.snap)) == nil, try thinLiveState(stack, thin) == (true, false) else { return false }
        try activateThinView(stack, thin, udev: nil)
        return true
    }

    /// The snapshot's read-only view goes; refused while it is mounted.
    private func removeThinView(_ stack: SnapshotStack, operation: String) throws {
        guard let snap = try dm.info(stack.ref(.snap)) else { return }
        try waitUntilClosed(snap, operation: operation, hint: "unmount it first")
        try dm.remove(.number(snap.number))
    }

    /// Sends `delete ID`; a pool that has no such id (deleted before a crash) answers ENODATA.
    /// The pool answers EBUSY while any table names the id: another guard (the monitor,
    /// `guard status`) may be asking whether it exists (`thinDeviceExists` holds it open for
    /// a moment), so a busy id is asked again for up to five seconds before the error stands.
    private func deleteThin(_ id: UInt32, pool: DeviceNumber, of stack: SnapshotStack) throws {
        var attempt = 0
        while true {
            do {
                try dm.message(.number(pool), "delete \(id)")
                break
            } catch let error as DeviceMapperError where error.errno == ENODATA {
                return
            } catch let error as DeviceMapperError where error.errno == EBUSY && attempt < 50 {
                attempt += 1
                usleep(100_000)
            }
        }
        log?("deleted thin device \(id) of \(stack.originName)'s pool")
    }

    /// The commit (or the undoing of a take): the snapshot's id is deleted; the volume keeps its data.
    func dropThin(_ stack: SnapshotStack, _ thin: ThinSnapshot) throws {
        let operation = "commit of \(stack.originName)"
        guard let (_, id, pool) = try thinState(stack) else {
            throw SnapshotError(
                .needsReassembly, operation, "the thin volume \(stack.originName) is not active, so guard cannot tell what its pool holds",
                hint: "activate it (`guard volume activate`), then run `guard recover`")
        }
        let registered = try registryEntry(thin).thin?.deviceID
        if id == thin.snapshotID || registered == thin.snapshotID {
            throw SnapshotError(.mergeInProgress, operation, "\(stack.originName) was rolled back to this snapshot", hint: "run `guard recover` to finish the rollback")
        }
        try removeThinView(stack, operation: operation)
        CrashPoint.hit(.thinViewRemoved)
        try deleteThin(thin.snapshotID, pool: pool, of: stack)
        CrashPoint.hit(.thinSnapshotDeleted)
    }

    /// The rollback: the registry names the snapshot's id (and the id it replaces), then the
    /// volume's table changes to it. `finishThin` deletes the replaced id. Any kept snapshot
    /// of the volume can be rolled back to, newer or older: each is a point in time.
    /// The volume must be unmounted.
    /// - Parameter live: the caller holds the snapshot as live (taken by this run, or attached
    ///   under the run's locks, which asked the pool): its id is not asked for again.
    func startThinRollback(_ stack: SnapshotStack, _ thin: ThinSnapshot, udev: UdevBatch?, live: Bool = false) throws {
        let operation = "rollback of \(stack.originName)"
        guard let (origin, id, pool) = try thinState(stack) else {
            throw SnapshotError(
                .originNotFound, operation, "the thin volume \(stack.originName) is not active", hint: "activate it (`guard volume activate`) and run `guard recover`")
        }
        if id == thin.snapshotID {
            log?("\(origin.name) is already on its snapshot")
            return
        }
        let registered = try registryEntry(thin).thin
        let resuming = registered?.deviceID == thin.snapshotID
        guard resuming || registered?.deviceID == id else {
            throw SnapshotError(
                .other, operation, "\(origin.name) is thin device \(id), but its registry \(thin.registry) says \(registered.map { "\($0.deviceID)" } ?? "nothing")",
                hint: "run `guard recover`")
        }
        guard try live || thinDeviceExists(pool: pool, id: thin.snapshotID) else {
            throw SnapshotError(.layerMissing, operation, "the pool of \(origin.name) has no thin device \(thin.snapshotID) (the run's snapshot)", hint: "run `guard recover`")
        }
        let status = try dm.thinPoolStatus(.number(pool))
        guard status.mode != .failed else {
            throw SnapshotError(.invalidSnapshot, operation, "the thin pool of \(origin.name) failed", hint: "see `dmesg`; `guard volume repair` once the pool is inactive")
        }
        try waitUntilClosed(origin, operation: operation, hint: "unmount it first: the volume's blocks change under it")
        try removeThinView(stack, operation: operation)
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        if !resuming { try writeRegistry(thin.registry, id: thin.snapshotID, replaced: id) }
        CrashPoint.hit(.thinRegistryWritten)
        do {
            try executor.run(.thinSwap(origin: origin, table: Table(.thin(pool: pool, deviceID: thin.snapshotID), length: stack.originSectors), stack: stack), udev: udev)
        } catch {
            // A swap that failed (rather than a crash in it): the registry names the id the
            // volume really uses now, or the next boot would activate the snapshot silently.
            if let (_, now, _) = try? thinState(stack), now != thin.snapshotID {
                try? writeRegistry(thin.registry, id: now, replaced: nil)
            }
            throw error
        }
        log?("\(origin.name) is its snapshot now (thin device \(thin.snapshotID)); nothing to merge")
        // The replaced id goes with `finishThin`, after the service is back; at once where the
        // upgrade filled the pool, which needs its blocks back before the mount's first write.
        let after = try dm.thinPoolStatus(.number(pool))
        if after.mode == .outOfDataSpace || max(after.dataFill, after.metadataFill) >= 0.8 {
            try deleteReplaced(stack, thin, pool: pool)
        }
    }

    /// Deletes the id a rollback replaced, clears the registry's note of it, and brings a pool
    /// that ran out of data space back to writing (a resume makes the kernel count free blocks).
    private func deleteReplaced(_ stack: SnapshotStack, _ thin: ThinSnapshot, pool: DeviceNumber) throws {
        if let replaced = try registryEntry(thin).thin?.replacedID, replaced != thin.snapshotID {
            try deleteThin(replaced, pool: pool, of: stack)
            CrashPoint.hit(.thinReplacedDeleted)
        }
        try writeRegistry(thin.registry, id: thin.snapshotID, replaced: nil)
        if try dm.thinPoolStatus(.number(pool)).mode == .outOfDataSpace {
            try executor.run(.revivePool(pool, name: "resume of \(stack.originName)'s pool"))
            log?("\(stack.originName)'s pool has free blocks again: resumed it out of its out-of-data-space mode")
        }
    }

    /// How far a thin rollback is: complete when what is left is the swap or the deletion of
    /// the replaced id, finished when neither is.
    func thinMergeState(_ stack: SnapshotStack, _ thin: ThinSnapshot) throws -> MergeState {
        guard try thinState(stack) != nil else {
            return .needsReassembly("the thin volume \(stack.originName) is not active; activate it (`guard volume activate`), then run `guard recover`")
        }
        let state = try thinLiveState(stack, thin)
        if state.merging { return .complete }
        guard let (_, id, _) = try thinState(stack), id == thin.snapshotID else {
            throw SnapshotError(.layerMissing, "rollback status of \(stack.originName)", "\(stack.originName) is not rolled back to thin device \(thin.snapshotID)")
        }
        return .finished
    }

    /// Ends a thin rollback: the volume on the snapshot's id (a swap a crash left undone), the
    /// replaced id deleted, the registry's note of it cleared.
    func finishThin(_ stack: SnapshotStack, _ thin: ThinSnapshot) throws {
        let operation = "end of the rollback of \(stack.originName)"
        guard let (_, id, pool) = try thinState(stack) else {
            throw SnapshotError(
                .needsReassembly, operation, "the thin volume \(stack.originName) is not active", hint: "activate it (`guard volume activate`), then run `guard recover`")
        }
        if id != thin.snapshotID { try startThinRollback(stack, thin, udev: nil) }
        try? removeThinView(stack, operation: operation)
        try deleteReplaced(stack, thin, pool: pool)
    }

    /// Writes the volume's thin id (and the id it replaced) into its registry durably:
    /// a temporary file, fsync, rename, fsync of the directory.
    func writeRegistry(_ registry: String, id: UInt32, replaced: UInt32?) throws {
        var volume = try GuardVolume.read(registry: registry)
        guard volume.thin?.deviceID != id || volume.thin?.replacedID != replaced else { return }
        volume.thin?.deviceID = id
        volume.thin?.replacedID = replaced
        try volume.write(registry: registry)
    }
}
