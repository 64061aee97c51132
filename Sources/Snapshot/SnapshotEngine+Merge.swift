import BlockDevice
import DeviceMapper
import Foundation
import Quantities

extension SnapshotEngine {
    // MARK: Status, watching and extending

    /// The snapshot's state as the kernel reports it.
    public func health(_ stack: SnapshotStack) throws -> SnapshotHealth {
        if let thin = stack.thin { return try thinHealth(thin) }
        return SnapshotHealth(status: try dm.snapshotStatus(stack.ref(.snap)))
    }

    /// Grows a file-backed COW to `storageBytes`: the file (preallocated), the loop device's
    /// capacity, then `-cow`'s table. The kernel's exception store sees the new size at once.
    ///
    /// - Returns: the stack with its new size.
    /// - Throws: `.notExtendable` for a block-device COW or a smaller size.
    public func extend(_ stack: SnapshotStack, to storageBytes: UInt64) throws -> SnapshotStack {
        let operation = "extension of the COW of \(stack.originName)"
        if let thin = stack.thin {
            guard storageBytes > stack.storageBytes else { return stack }
            return try extendThin(stack, thin, to: storageBytes)
        }
        guard case .file(let path) = stack.storage else {
            throw SnapshotError(.notExtendable, operation, "its COW is the block device \(stack.storage.path)")
        }
        guard storageBytes > stack.storageBytes else { return stack }
        let free = try freeSpace(at: (path as NSString).deletingLastPathComponent)
        guard free > storageBytes - stack.storageBytes + (16 << 20) else {
            throw SnapshotError(.noSpace, operation, "growing by \(formatBytes(storageBytes - stack.storageBytes)) needs more than the \(formatBytes(free)) free")
        }
        let file = try RawFile(path: path)
        _ = try Self.preallocate(file, from: stack.storageBytes, length: storageBytes - stack.storageBytes)
        if Self.cowFileIO == .directZeroed { try Self.zeroFill(file, from: stack.storageBytes, to: storageBytes) }
        let cowTable = try dm.table(stack.ref(.cow))
        guard case .linear(let loopNumber, let offset)? = cowTable.lines.first?.target else {
            throw SnapshotError(.layerMissing, operation, "\(stack.cowName) is not a linear device")
        }
        if let loop = LoopDevice.all().first(where: { $0.number == loopNumber }) {
            try loop.refreshCapacity()
        }
        var grown = stack
        grown.storageBytes = storageBytes
        // The label grows first: once -cow is larger the kernel may put exceptions past the old
        // end, and a reassembly from a label that still had the old size would cut them off.
        // A label larger than the area the kernel used is harmless (the file is that large).
        if var label = try CowLabel.read(from: path), label.identity == stack.identity {
            label.storageBytes = storageBytes
            try label.write(to: path)
        }
        try executor.run(.extend(cow: stack.ref(.cow), table: Table(.linear(device: loopNumber, offset: offset), length: grown.areaBytes / 512), stack: stack))
        log?("grew the COW of \(stack.originName) to \(formatBytes(grown.areaBytes))")
        return grown
    }

    // MARK: The write fuse

    /// Blows the write fuse: the origin's table becomes `flakey <-real> 0 0 1 1 error_writes`,
    /// so every later write fails with EIO, as on a failed disk, and reaches neither the origin
    /// nor the COW, while reads go on. For a run that will roll back, before a COW that cannot
    /// grow overflows: every write the fuse refuses would be undone by the merge anyway, and
    /// the snapshot stays valid. The merge (`startMerge`) or a commit (`drop`) replaces the
    /// table; a reboot forgets it (the label still says active: the merge runs at boot).
    ///
    /// The suspend neither flushes nor freezes the filesystem: that would write its dirty pages
    /// into the COW, the very thing the fuse prevents. Bios in flight complete; bios that
    /// arrive during the suspend are queued and fail after it.
    /// - Returns: how long the origin was suspended, in microseconds.
    @discardableResult
    public func blowFuse(_ stack: SnapshotStack) throws -> UInt64 {
        let operation = "write fuse of \(stack.originName)"
        // A full pool fails writes itself, and never at the cost of a snapshot's blocks.
        if stack.thin != nil { return 0 }
        let origin = try requireOrigin(stack, operation)
        let live = try dm.table(.number(origin.number))
        if live.isFused { return 0 }
        let real = try dm.requireInfo(stack.ref(.real))
        guard live.snapshotOriginDevice == real.number else {
            throw SnapshotError(.layerMissing, operation, "\(origin.name) has no live guard snapshot (its table is \(live.lines.first?.target.typeName ?? "empty"))")
        }
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        let window = try executor.run(.blowFuse(origin: origin, real: real.number, stack: stack))
        log?("\(origin.name) refuses writes (guard's fuse): its snapshot stays valid for the rollback")
        return window.microseconds
    }

    /// Whether the stack's origin is on guard's write fuse.
    public func isFused(_ stack: SnapshotStack) throws -> Bool {
        guard let origin = try dm.info(stack.originRef) else { return false }
        return try dm.table(.number(origin.number)).isFused
    }

    // MARK: Merging back (rollback)

    /// Starts merging the snapshot back into the origin. From the moment this returns, reads
    /// of the origin show the snapshot's data, so it can be mounted again while the kernel
    /// copies chunks back underneath.
    ///
    /// - Precondition: neither the origin nor the snapshot is mounted or open.
    /// - Parameter udev: the caller's batch for the resumes and the removal of `-snap`, which
    ///   it waits for itself (a rollback mounts the volume again first: the device node is
    ///   there all along, and udev's probe of the merging origin is slow); nil: waited for here.
    /// - Throws: `.invalidSnapshot` when the kernel invalidated the snapshot (the rollback is
    ///   impossible, the volume keeps the upgraded data); `.inUse` when mounted.
    /// - Parameter live: the caller holds the snapshot as live (a `LiveSnapshotSet`).
    func startMerge(_ stack: SnapshotStack, udev callerBatch: UdevBatch? = nil, live: Bool = false) throws {
        if let thin = stack.thin { return try startThinRollback(stack, thin, udev: callerBatch, live: live) }
        let operation = "rollback of \(stack.originName)"
        let origin = try requireOrigin(stack, operation)
        let live = try dm.table(.number(origin.number))
        if live.isOnly("snapshot-merge") {
            log?("\(origin.name) is already merging")
            return
        }
        guard let real = try dm.info(stack.ref(.real)), let snap = try dm.info(stack.ref(.snap)),
            let device = live.snapshotOriginDevice, device == real.number  // writable or fused
        else {
            throw SnapshotError(
                .layerMissing, operation, "\(origin.name) has no live guard snapshot (its table is \(live.lines.first?.target.typeName ?? "empty"))", hint: "run `guard recover`")
        }
        let status = try dm.snapshotStatus(.number(snap.number))
        guard status.isRestorable else {
            throw SnapshotError(
                .invalidSnapshot, operation,
                "the snapshot is \(status) (\(status == .overflow ? "written past its COW" : "its COW filled up or failed")); its old data is lost, so the volume keeps the upgraded data",
                hint: "restore from a backup if the upgraded data is bad")
        }
        try waitUntilClosed(origin, operation: operation, hint: "unmount it first: a merge must not start under a mounted filesystem")
        // A scan that opens every block device for an instant (lvm2's, blkid's) is waited out too.
        try waitUntilClosed(snap, operation: operation, hint: "unmount it first")
        let cow = try dm.requireInfo(stack.ref(.cow))
        // Tables a crashed command loaded and never made live would clash with the merge
        // (two snapshot targets claiming one COW): drop them first.
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        if snap.hasInactiveTable { try dm.clearInactiveTable(.number(snap.number)) }
        if var label = try CowLabel.read(from: stack.storage.path) {
            label.state = .merging
            try label.write(to: stack.storage.path)
        }
        CrashPoint.hit(.mergeLabelMerging)
        // Resuming the origin hands the exceptions over to the merge. A table that did not
        // load leaves nothing merging: the label goes back to active. One udev wait for the
        // resumes and the removal of -snap, here or by the caller.
        let udev = callerBatch ?? UdevBatch()
        defer { if callerBatch == nil { udev.finish() } }
        try executor.run(.startMerge(origin: origin, snap: snap, real: real.number, cow: cow.number, stack: stack), udev: udev) {
            if var label = try? CowLabel.read(from: stack.storage.path) {
                label.state = .active
                try? label.write(to: stack.storage.path)
            }
        }
        // `-snap` is on its error table now: a scan that opens it at this instant (lvm2's, blkid's)
        // defers its removal to its close, never turns a merge under way into a failed start.
        _ = try removeNowOrAtClose(snap, batch: udev)
        log?("\(origin.name) is merging its snapshot back")
    }

    /// Restarts a merge the kernel stopped (`Merge failed`, after an I/O error was fixed).
    ///
    /// The failed target cannot be replaced by a new merge while it exists (the kernel allows
    /// one merging snapshot per COW), and it keeps reporting `Merge failed`. So the origin
    /// goes to an `error` table for an instant, which ends the failed target, and then gets a
    /// fresh `snapshot-merge`, which reads the exceptions still in the COW and merges on.
    /// In that instant reads would fail, so the origin must not be open (unmounted).
    func restartMerge(_ stack: SnapshotStack) throws {
        if let thin = stack.thin { return try finishThin(stack, thin) }
        let operation = "restart of the merge into \(stack.originName)"
        let origin = try requireOrigin(stack, operation)
        let live = try dm.table(.number(origin.number))
        guard live.isOnly("snapshot-merge") || live.isOnly("error") else {
            throw SnapshotError(.layerMissing, operation, "\(origin.name) is not merging (its table is \(live.lines.first?.target.typeName ?? "empty"))")
        }
        try waitUntilClosed(origin, operation: operation, hint: "unmount it (stop what uses it) and run `guard recover` again")
        let real = try dm.requireInfo(stack.ref(.real))
        let cow = try dm.requireInfo(stack.ref(.cow))
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        if live.isOnly("snapshot-merge") {
            try executor.run(.endFailedMerge(origin: origin, stack: stack))
        }
        CrashPoint.hit(.restartErrorTable)
        try executor.run(.restartMerge(origin: origin, real: real.number, cow: cow.number, stack: stack))
        log?("restarted the merge into \(origin.name)")
    }

    /// Resumes whatever of this stack a crash left suspended (origin and layers), making a
    /// loaded inactive table live: every table guard loads before a suspend is the next
    /// step forward, so completing it is what the crashed command was doing.
    /// - Returns: the names resumed.
    ///
    /// A `-real` whose table keeps state (and the `-snap` over it) is never resumed onto its own
    /// table when the origin no longer routes through it (a commit or the end of a merge stopped
    /// between the origin's own table going live and their retirement): they are retired
    /// (an `error` table, never suspended again), and the teardown that follows removes them.
    public func resumeSuspended(_ stack: SnapshotStack) throws -> [String] {
        var resumed: [String] = []
        var retired: Set<DeviceRef> = []
        if stack.delaysRealResume, let real = try dm.info(stack.ref(.real)), real.isSuspended {
            let routes = try dm.info(stack.originRef).map { try dm.table(.number($0.number)).devices.contains(real.number) } ?? false
            if !routes {
                retired = [stack.ref(.real), stack.ref(.snap)]
                for ref in [stack.ref(.snap), stack.ref(.real)] {
                    guard let info = try dm.info(ref), info.isSuspended else { continue }
                    try dm.retire(.number(info.number))
                    resumed.append("\(info.name) (retired: an error table, its own never live again)")
                }
            }
        }
        for ref in [stack.ref(.cow), stack.ref(.real), stack.ref(.snap), stack.originRef] where !retired.contains(ref) {
            guard let info = try dm.info(ref), info.isSuspended else { continue }
            try dm.resume(.number(info.number))
            resumed.append(info.name)
        }
        return resumed
    }

    /// Waits (up to 30 s, said after 3) for a device to be closed: udev's probes and a process
    /// just killed hold it for an instant, and an lvm2 command keeps every device it scanned
    /// open until it ends (seconds on a slow or busy machine). A mount here refuses at once.
    /// The error names every user seen during the wait (`DeviceUsers`): a process, a mount left
    /// in another mount namespace, a device stacked on it; `hint` is for a mount here.
    func waitUntilClosed(_ device: DeviceInfo, operation: String, hint: String) throws {
        var info = device
        // Who had it open while guard waited: a user that lets go between two looks (an lvm2
        // command, a backup agent's scan) is still named when the wait runs out.
        var users: [String] = []
        for attempt in 0..<300 {
            guard info.openCount > 0, Mounts.mountPoints(of: info.number).isEmpty else { break }
            if attempt % 10 == 0 {
                for user in DeviceUsers.describe(info.number) where !users.contains(user) { users.append(user) }
            }
            if attempt == 30 {
                (notice ?? log)?("waiting up to 30 s for \(info.path) to be closed\(users.isEmpty ? "" : " (open by \(users.joined(separator: ", ")))")")
            }
            usleep(100_000)
            info = try dm.info(.number(device.number)) ?? info
        }
        guard info.openCount > 0 else { return }
        let mounts = Mounts.mountPoints(of: info.number).map(\.target)
        for user in DeviceUsers.describe(info.number) where !users.contains(user) { users.append(user) }
        var what = "\(info.path) is open"
        if !mounts.isEmpty {
            what += " (mounted on \(mounts.joined(separator: ", ")))"
        } else {
            what += " after 30 s of waiting"
        }
        if !users.isEmpty {
            what += " (by \(users.joined(separator: ", ")))"
        } else if mounts.isEmpty {
            what += " (by nothing guard can name: no process has it open, no mount namespace mounts it, nothing is stacked on it)"
        }
        throw SnapshotError(.inUse, operation, what, hint: mounts.isEmpty ? "stop what has it open" : hint)
    }

    /// Where a merge stands, from the origin's snapshot-merge status.
    public func mergeState(_ stack: SnapshotStack) throws -> MergeState {
        if let thin = stack.thin { return try thinMergeState(stack, thin) }
        guard try dm.info(stack.originRef) != nil || !evidence(stack).mustKeep else {
            return .needsReassembly("its origin \(stack.originName) is not active; activate it without mounting it, then run `guard recover`")
        }
        let origin = try requireOrigin(stack, "merge status of \(stack.originName)")
        let live = try dm.table(.number(origin.number))
        if live.isOnly("snapshot-merge") {
            let status = try dm.snapshotStatus(.number(origin.number))
            switch status {
            case .active(let usage):
                return usage.isMergeComplete ? .complete : .merging(remainingSectors: usage.dataSectors, usage: usage)
            default:
                return .failed(status)
            }
        }
        // An `error` table with the layers still there: a restart of a failed merge was interrupted.
        if live.isOnly("error"), try dm.info(stack.ref(.real)) != nil {
            return .failed(.unknown("restart interrupted"))
        }
        // Off the merge: finished only if the label says released (written once the kernel
        // reported the merge complete, before the swap). A label still `merging` means the
        // stack was torn down by a reboot: it must be reassembled, never torn down.
        if !live.isOnly("snapshot-origin") {
            let evidence = evidence(stack)
            return evidence.mustKeep ? .needsReassembly(evidence.reason) : .finished
        }
        throw SnapshotError(.layerMissing, "merge status of \(stack.originName)", "\(origin.name) is not merging (its table is \(live.lines.first?.target.typeName ?? "empty"))")
    }

    /// Tears a finished merge down: the origin back on its own table, `-real`, `-cow` and the
    /// COW storage removed. Refuses unless the kernel reports the merge complete.
    func finishMerge(_ stack: SnapshotStack) throws {
        if let thin = stack.thin { return try finishThin(stack, thin) }
        let operation = "teardown of the merge into \(stack.originName)"
        switch try mergeState(stack) {
        case .finished:
            try removeLayers(stack, [.snap, .real, .cow])
            try releaseStorage(stack)
            return
        case .merging(let remaining, _):
            throw SnapshotError(.mergeInProgress, operation, "\(formatBytes(remaining * 512)) are still to merge")
        case .failed(let status):
            throw SnapshotError(.mergeFailed, operation, "the kernel reports the merge as \(status)", hint: "see `dmesg`; fix the I/O error, then run `guard recover`")
        case .needsReassembly(let why):
            throw SnapshotError(.needsReassembly, operation, why, hint: "run `guard recover` with \(stack.originName) active and unmounted: the merge resumes")
        case .complete:
            break
        }
        let origin = try requireOrigin(stack, operation)
        let real = try dm.requireInfo(stack.ref(.real))
        let own = try dm.table(.number(real.number))
        // The kernel reports the merge complete: the label says so before the origin leaves the
        // merge target, so "own table, label merging" always means a reboot interrupted it.
        try markReleased(stack)
        CrashPoint.hit(.finishLabelReleased)
        do {
            // Checked again with the origin quiet: the merge must really be complete, or the
            // origin stays on the merge.
            try executor.run(
                .finishMerge(origin: origin, own: own, statefulReal: stack.delaysRealResume ? real : nil, stack: stack) { [dm] in
                    if case .active(let usage) = try dm.snapshotStatus(.number(origin.number)), !usage.isMergeComplete {
                        throw SnapshotError(.mergeInProgress, operation, "the merge is not complete")
                    }
                })
        } catch {
            if try liveState(stack).merging { try? mark(stack, .merging) }
            throw error
        }
        CrashPoint.hit(.finishOriginRestored)
        try removeLayers(stack, [.snap, .real, .cow])
        CrashPoint.hit(.finishLayersRemoved)
        try releaseStorage(stack)
        log?("the merge into \(origin.name) is complete and torn down")
    }

    func requireOrigin(_ stack: SnapshotStack, _ operation: String) throws -> DeviceInfo {
        guard let origin = try dm.info(stack.originRef) else {
            throw SnapshotError(
                .originNotFound, operation, "the origin \(stack.originName) (\(stack.originUUID)) is not active",
                hint: "activate it (`lvchange -ay`, `guard volume activate`) and run `guard recover`")
        }
        return origin
    }
}
