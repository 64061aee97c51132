import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

extension Recovery {
    /// A kept run whose decision is `rollback`: carried out at a boot it was scheduled for, left
    /// for that boot otherwise; finished if a merge began; taken back if none did.
    /// - Returns: what was done, or nil when the run is left as it is.
    func decidedRollback(_ run: RunRecord, journal: Journal, engine: SnapshotEngine, boot: Bool) async throws -> String? {
        let runID = run.id!
        if JournalEvents.scheduledForBoot(try journal.events(runID: runID)) {
            return boot ? try await recover(run, journal: journal, engine: engine, boot: boot) : nil
        }
        let records = try journal.snapshots(runID: runID)
        // A `guard rollback` at work holds the volumes: its decision is its own to carry out.
        guard let locks = try? Maintenance(context: context).lock(records, runID: runID) else { return nil }
        let began = try records.contains { record in
            if record.state == .merging || record.state == .merged { return true }
            guard let stack = decodeStack(record.stack) else { return false }
            return try engine.liveState(stack).merging
        }
        if began {
            locks.forEach { $0.release() }
            return try await recover(run, journal: journal, engine: engine, boot: boot)
        }
        defer { locks.forEach { $0.release() } }
        try RollbackProcedure.takeBack(runID: runID, journal: journal, phase: nil, reason: "guard stopped after deciding the rollback, before its first merge", at: timestamp())
        return "run \(runID): its rollback was decided but never started (no merge began); the decision is taken back, the run stays kept (`guard rollback \(runID)` rolls it back)"
    }

    /// In the booted system: whether the initramfs did this boot's recovery and the state volume
    /// is not mounted yet (it is mounted with the other filesystems, after this unit), so that
    /// nothing is left to do. Only the exit status 0 in `marker` says so: after a failure the
    /// admin may have left the panic shell to boot anyway, and then nothing was reassembled,
    /// which is reported as a problem.
    func initramfsDidTheWork(marker: String, report: inout Report) -> Bool {
        guard let status = BootSupport.initramfsStatus(marker: marker) else { return false }
        guard status == "0" else {
            report.problems.append(
                "guard's recovery in the initramfs failed (\(marker) holds exit status \(status.isEmpty ? "nothing" : status)) and the boot went on: snapshots of volumes mounted before this unit may be stale; `guard status` and `guard recover` say what is left"
            )
            return false
        }
        guard !FileManager.default.fileExists(atPath: context.journalPath) else { return false }
        let others =
            BootSupport.lateUnitConfigured
            ? "guard-reassemble-late.service reassembles the other runs once it is, before the other filesystems are mounted"
            : "the other runs' snapshots (of volumes that are not / or /usr) are reassembled by the next `guard recover`: run it before their volumes are mounted (guard's generator, installed with guard, orders guard-reassemble-late.service for this)"
        report.actions.append(
            "the initramfs reassembled guard's snapshots of / and /usr and started the merges due at this boot (\(marker)); the state directory \(context.stateDirectory) is mounted later: \(others)"
        )
        return true
    }

    /// What the durable facts say of an open run.
    enum Classification {
        /// Its snapshots are live, or their storage provably holds nothing old: recovery may act.
        case ready
        /// Some snapshot holds old blocks and is not live: the run waits, nothing is touched.
        case needsReassembly([String])
        /// Some origin was written while its snapshot was not live.
        case stale([String])
    }

    /// Decides from the COW labels, the kernel's exception-store headers and the journal, never
    /// from the current tables alone, whether a run can be recovered now. A run that cannot is
    /// set to `needs_reassembly` (or `stale`) in the journal, with an event saying why; one
    /// that can again goes back to the state it had.
    func classify(_ run: RunRecord, journal: Journal, engine: SnapshotEngine) throws -> Classification {
        let runID = run.id!
        let records = try journal.snapshots(runID: runID)
        var waiting: [String] = []
        var stale: [String] = []
        // `preparing` too: a take the journal never recorded may still have gone live.
        for record in records where [.preparing, .live, .merging, .invalid].contains(record.state) {
            guard let stack = decodeStack(record.stack), !(try engine.liveState(stack).live) else { continue }
            // A take the journal never recorded, whose COW was never created: nothing to wait for.
            if record.state == .preparing && !FileManager.default.fileExists(atPath: stack.storage.path) { continue }
            switch engine.evidence(stack) {
            case .needsReassembly(let why): waiting.append("\(record.volume): \(why)")
            case .stale(let why): stale.append("\(record.volume): \(why)")
            case .nothingToKeep, .released: break
            }
        }
        let target: RunState
        let result: Classification
        if !waiting.isEmpty {
            target = .needsReassembly
            result = .needsReassembly(waiting)
        } else if !stale.isEmpty {
            target = .stale
            result = .stale(stale)
        } else {
            guard run.state == .needsReassembly else { return .ready }
            // Reassembled: back to what it was (a kept run is kept again; anything else is
            // an unfinished run that recovery now finishes).
            target = run.decision == .keep && !records.contains(where: { $0.state == .merging }) ? .kept : .running
            result = .ready
        }
        guard run.state != target else { return result }
        var updated = run
        updated.state = target
        try journal.update(updated)
        let detail = (waiting + stale).joined(separator: "; ")
        let what = target == .needsReassembly ? "needs reassembly: \(detail)" : target == .stale ? "stale: \(detail)" : "reassembled; the run is \(target.rawValue) again"
        try journal.event(runID, .result, "recover", what, at: timestamp())
        return result
    }

    /// Whether every snapshot of `run` that is not live is of a volume that is not active and
    /// that guard's udev rule holds: the run waits for it, and its boot unit is not a failure.
    func awaitsHeldVolumes(_ run: RunRecord, journal: Journal, engine: SnapshotEngine) -> Bool {
        guard let records = try? journal.snapshots(runID: run.id!) else { return false }
        return records.allSatisfy { record in
            guard [.preparing, .live, .merging, .invalid].contains(record.state), let stack = decodeStack(record.stack),
                (try? engine.liveState(stack).live) != true
            else { return true }
            let absent: Bool
            do { absent = try engine.dm.info(stack.originRef) == nil } catch { return false }
            return absent && holds.isHeld(uuid: stack.originUUID)
        }
    }

    /// At boot, LVM may activate an origin a little after guard starts: wait up to 30 s.
    func waitForOrigin(_ label: CowLabel, dm: DeviceMapper, report: inout Report) async throws {
        if try await Self.poll(until: .now + .seconds(30), every: .milliseconds(500), { try dm.info(label.originRef) != nil }) { return }
        report.problems.append("the volume \(label.originName) did not appear within 30 s; activate it without mounting it and run `guard recover`")
    }

    /// Checks `ready` every `interval` until it holds or `deadline` has passed: whether it held.
    /// The boot's waits (for a COW device, for an origin) instead of `udevadm settle`.
    static func poll(until deadline: ContinuousClock.Instant, every interval: Duration, _ ready: () throws -> Bool) async throws -> Bool {
        while true {
            if try ready() { return true }
            if ContinuousClock.now >= deadline { return false }
            try await Task.sleep(for: interval)
        }
    }

    /// Whether the device at `path` is there and udev is done with it: its database entry is
    /// written, so its /dev/disk/by-id links (by which guard knows a COW device) are in place.
    /// Without udev (no /run/udev), that it is there.
    static func deviceReady(_ path: String) -> Bool {
        guard let number = try? BlockDevices.deviceNumber(of: path) else { return false }
        return !FileManager.default.fileExists(atPath: "/run/udev/data") || FileManager.default.fileExists(atPath: "/run/udev/data/b\(number)")
    }

    /// Finishes or undoes one unfinished run, following its last decision.
    func recover(_ run: RunRecord, journal: Journal, engine: SnapshotEngine, boot: Bool) async throws -> String {
        let runID = run.id!
        let records = try journal.snapshots(runID: runID)
        let locks = try Maintenance(context: context).lock(records, runID: runID)
        defer { locks.forEach { $0.release() } }
        let stacks = records.compactMap { decodeStack($0.stack) }
        // At boot no hook runs; otherwise a recipe that does not parse stops here, loudly.
        let recipe = try run.journaledRecipe(withoutHooks: withoutHooks || boot, verb: "recovered")
        try journal.event(runID, .intent, "recover", "phase \(run.phase), decision \(run.decision?.rawValue ?? "none")", at: timestamp())

        var updated = run
        func close(_ outcome: RunOutcome, _ state: RunState, _ what: String) throws -> String {
            updated = try journal.run(id: runID) ?? updated
            updated.outcome = outcome
            updated.state = state
            if state != .merging { updated.finishedAt = timestamp() }
            updated.error = [run.error, "recovered: \(what)"].compactMap { $0 }.joined(separator: "; ")
            let closed = updated
            try journal.batch {
                try journal.update(closed)
                try journal.event(runID, .result, "recover", what, at: timestamp())
            }
            RunCgroup.of(token: run.token)?.removeIfEmpty()
            return "run \(runID): \(what)"
        }

        // Which snapshots are live. `classify` has already set aside every run with a snapshot
        // that is not live but holds old blocks, so a stack that is not live here provably
        // holds nothing (never initialised, no exception recorded, or released).
        var taken = false
        var merging = false
        for stack in stacks {
            let state = try engine.liveState(stack)
            taken = taken || state.live
            merging = merging || state.merging
        }
        let stepsMayHaveRun = !["preflight", "quiesce", "snapshot"].contains(run.phase)

        // The last decision the journal holds comes first: it was written before any of its work.
        if merging || run.decision == .rollback {
            return try await rollBack(run, records: records, stacks: stacks, recipe: recipe, journal: journal, engine: engine, boot: boot, close: close)
        }
        if run.decision == .commit {
            for stack in stacks { try engine.discard(stack, commitJournaled: true) }
            try journal.setSnapshotState(runID: runID, .committed)
            return try close(.recovered, .finished, "finished the commit: the upgrade is in place, the snapshots are gone")
        }
        if run.decision == .keep && taken {
            for stack in stacks { try? engine.mark(stack, .kept) }
            return try close(.kept, .kept, "the run had decided to keep its snapshots; they are kept (`guard rollback \(runID)` or `guard commit \(runID)`)")
        }
        // Labels that all say kept are a decision too: a run marks them only once it decided to
        // keep its snapshots (or, succeeding, could not journal its commit), before the journal.
        if run.decision == nil && taken && Self.labelsSayKept(stacks) {
            var decided = run
            decided.decision = .keep
            try journal.update(decided)
            return try close(
                .kept, .kept,
                "the run had decided to keep its snapshots (their COW labels say kept; the journal could not record it then); they are kept (`guard rollback \(runID)` or `guard commit \(runID)`)"
            )
        }
        if records.isEmpty || stacks.isEmpty || !taken {
            for record in records {
                guard let stack = decodeStack(record.stack) else { continue }
                // A COW the journal never saw taken and that was never created holds nothing.
                let neverCreated = record.state == .preparing && !FileManager.default.fileExists(atPath: stack.storage.path)
                try engine.discard(stack, commitJournaled: neverCreated)
            }
            try journal.setSnapshotState(runID: runID, .discarded)
            return try close(
                .recovered, .finished, "no snapshot holds a changed block (COW labels and kernel headers checked); removed what the run had prepared; no volume was changed by it")
        }
        if !stepsMayHaveRun {
            // The snapshot was taken but no step ran: the volumes hold what they held before.
            for stack in stacks { try engine.discard(stack, commitJournaled: false) }
            try journal.setSnapshotState(runID: runID, .discarded)
            return try close(.recovered, .finished, "the run stopped before its steps; dropped its snapshots; no volume was changed by it")
        }
        if recipe?.onFailure == .keep {
            for stack in stacks { try? engine.mark(stack, .kept) }
            return try close(
                .kept, .kept, "the run stopped during \(run.phase); the recipe says keep on failure: snapshots kept (`guard rollback \(runID)` or `guard commit \(runID)`)")
        }
        return try await rollBack(run, records: records, stacks: stacks, recipe: recipe, journal: journal, engine: engine, boot: boot, close: close)
    }

    /// Whether every stack has a COW label of its own that says kept (thin snapshots have none).
    static func labelsSayKept(_ stacks: [SnapshotStack]) -> Bool {
        !stacks.isEmpty
            && stacks.allSatisfy { stack in
                guard stack.thin == nil, let label = try? CowLabel.read(from: stack.storage.path) else { return false }
                return label.identity == stack.identity && label.state == .kept
            }
    }

    func rollBack(
        _ run: RunRecord, records: [SnapshotRecord], stacks: [SnapshotStack], recipe: Recipe?, journal: Journal, engine: SnapshotEngine,
        boot: Bool, close: (RunOutcome, RunState, String) throws -> String
    ) async throws -> String {
        let runID = run.id!
        var pending: [(SnapshotRecord, SnapshotStack)] = []
        for (record, stack) in zip(records, stacks) {
            switch try? engine.mergeState(stack) {
            case .merging?, .complete?, .finished?:
                continue
            case .needsReassembly(let why)?:
                // `classify` sets such runs aside; a reboot raced with this recovery: touch nothing.
                throw GuardFailure(.needsReassembly, "\(record.volume): \(why)")
            case .failed?:
                // The kernel stopped (an I/O error that is now fixed): start it again.
                try await RollbackProcedure(context: context, journal: journal, engine: engine).restartMerge(run: run, record: record, stack: stack, recipe: recipe)
                continue
            case nil:
                pending.append((record, stack))
            }
        }
        if !pending.isEmpty {
            var marked = run
            marked.decision = .rollback
            try journal.update(marked)
            if boot {
                // Nothing is mounted yet: merge at once, before anything writes to the origins.
                // A mounted origin (/ without guard in the initramfs) is never merged under its
                // filesystem: the snapshot is kept and the admin told.
                let mounted = Set(try Mounts.current().map(\.device))
                for (record, stack) in pending {
                    if let number = try engine.dm.info(stack.originRef)?.number, mounted.contains(number) {
                        throw GuardFailure(
                            .attention,
                            "\(record.volume) is already mounted, so it cannot be merged at this boot (the initramfs did not do it: is guard's initramfs hook installed, and `update-initramfs -u` run?); the snapshot is kept"
                        )
                    }
                }
                let live = try LiveSnapshotSet.attach(pending.map(\.1), engine: engine)
                do {
                    _ = try live.startMerges { index in
                        var updated = pending[index].0
                        updated.state = .merging
                        try journal.update(updated)
                    }
                } catch {
                    throw error.underlying
                }
            } else {
                try await RollbackProcedure(context: context, journal: journal, engine: engine).perform(
                    run: marked, records: pending.map(\.0), live: try LiveSnapshotSet.attach(pending.map(\.1), engine: engine), recipe: recipe, wait: false)
            }
        }
        for record in records where record.state != .merging && record.state != .merged {
            var updated = record
            updated.state = .merging
            try journal.update(updated)
        }
        if boot {
            if run.state == .kept {
                // Asked for by `guard rollback`, carried out at this boot.
                return try close(
                    .rolledBack, .merging,
                    "rolled back at boot, as `guard rollback` asked, before the volumes were mounted (the merge continues; the volumes read as before the run)")
            }
            return try close(.recovered, .merging, "rolled back (the merge continues; the volumes read as before the run)")
        }
        try await Maintenance(context: context).waitForMerges(runID: runID, journal: journal, engine: engine)
        return try close(.recovered, .finished, "rolled back: the volumes are as before the run")
    }

    /// The COW devices of open runs, and their COW files outside the directories `cowFiles()` scans
    /// (a recipe's own `cow:` directory, or a cow_dir guard.conf no longer names).
    func journaledStorages(_ journal: Journal?, besides files: [CowStorage]) -> [CowStorage] {
        guard let journal, let runs = try? journal.runs(in: RunState.open) else { return [] }
        let scanned = Set(files.map(\.path))
        return runs.flatMap { run in
            ((try? journal.snapshots(runID: run.id!)) ?? []).compactMap { record -> CowStorage? in
                if record.cowKind == "thin" { return nil }  // no COW: the pool's metadata holds the snapshot
                if record.cowKind == "device" { return .blockDevice(path: record.cowPath) }
                guard !record.cowPath.isEmpty, !scanned.contains(record.cowPath), FileManager.default.fileExists(atPath: record.cowPath) else { return nil }
                return .file(path: record.cowPath)
            }
        }
    }

    /// COW files in guard.conf's cow_dir and in the state directory's cow/ (they differ when
    /// cow_dir is set; files made before it was set are still found).
    func cowFiles() -> [CowStorage] {
        var directories = [context.cowDirectory]
        if context.stateDirectory + "/cow" != context.cowDirectory { directories.append(context.stateDirectory + "/cow") }
        return directories.flatMap { SnapshotEngine.cowFiles(in: $0) }
    }

    /// Removes GUARD- layers of runs the journal has closed, and COW files of no open run. A stray
    /// stack an origin still uses live (a snapshot-origin table on it) is left alone and
    /// reported: it may hold data. Layers of runs the journal never had are left alone.
    func removeStrays(journal: Journal, engine: SnapshotEngine) throws -> (actions: [String], problems: [String]) {
        var actions: [String] = []
        var problems: [String] = []
        let open = Set(try journal.runs(in: RunState.open).map(\.token))
        let known = try journal.allTokens()
        let devices = try engine.dm.list()
        var strays: [String: [(DeviceSummary, StackIdentity.Layer)]] = [:]
        for device in devices {
            // A run this journal never had is another state directory's (it may be inside its
            // snapshot window now) or a replaced journal's: not this recovery's to remove.
            // `guard status` lists its devices.
            guard let (identity, layer) = StackIdentity.parse(uuid: device.uuid), !open.contains(identity.runToken),
                known.contains(identity.runToken)
            else { continue }
            strays["\(identity.runToken)-\(identity.volumeIndex)", default: []].append((device, layer))
        }
        for (key, layers) in strays.sorted(by: { $0.key < $1.key }) {
            let numbers = Set(layers.map(\.0.number))
            var inUse = false
            for device in devices where !numbers.contains(device.number) {
                if let live = try? engine.dm.table(.number(device.number)), !Set(live.devices).isDisjoint(with: numbers) {
                    inUse = true
                    actions.append("left the stray stack \(key) alone: \(device.name) uses it live (see `guard status`)")
                }
                if let info = try? engine.dm.info(.number(device.number)), info.hasInactiveTable,
                    let inactive = try? engine.dm.table(.number(device.number), inactive: true), !Set(inactive.devices).isDisjoint(with: numbers)
                {
                    try? engine.dm.clearInactiveTable(.number(device.number))
                    actions.append("cleared \(device.name)'s half-loaded table")
                }
            }
            if inUse { continue }
            for layer in [StackIdentity.Layer.snap, .real, .cow] {
                for (device, kind) in layers where kind == layer {
                    if (try? engine.dm.remove(.number(device.number))) != nil { actions.append("removed stray device \(device.name)") }
                }
            }
        }
        for storage in cowFiles() {
            // A label that cannot be read (an I/O error, maybe for a moment) is never a stray.
            let label: CowLabel?
            do { label = try CowLabel.read(from: storage.path) } catch {
                problems.append("kept \(storage.path): its label cannot be read (\(error)); nothing is removed until it can")
                continue
            }
            if label == nil, (try? KernelCowHeader.read(from: storage.path)) != nil {
                problems.append("kept \(storage.path): it has a kernel snapshot header but no guard label; delete it yourself once you know it holds nothing you need")
                continue
            }
            if let label, open.contains(label.runToken) { continue }
            if let label, try engine.dm.info(.uuid(label.identity.uuid(.cow))) != nil { continue }
            if let label, [.active, .kept, .merging, .stale].contains(label.state), !known.contains(label.runToken) {
                // A snapshot the journal does not know (a journal replaced or lost): keep it.
                actions.append(
                    "kept \(storage.path): it holds a \(label.state.rawValue) snapshot of \(label.originName) from run \(label.runToken), unknown to the journal; `guard recover` reassembles it once its volume is active"
                )
                continue
            }
            if let label, label.state != .released, label.state != .preparing {
                // The journal knows the run and has closed it: only a provably empty COW goes.
                let stack = try engine.stackFromLabel(label, storage: storage, originNumber: DeviceNumber(major: 0, minor: 0))
                let evidence = engine.evidence(stack)
                if evidence.mustKeep {
                    problems.append("kept \(storage.path) of run \(label.runToken), which the journal has closed: \(evidence.reason)")
                    continue
                }
            }
            for loop in LoopDevice.find(backingFile: storage.path) { try? loop.detach() }
            try? CowLabel.wipe(storage.path)
            try? FileManager.default.removeItem(atPath: storage.path)
            actions.append("removed stray COW file \(storage.path)")
        }
        return (actions, problems)
    }
}

/// Which runs one recovery pass handles at boot: the initramfs only those of / and /usr; the
/// boot unit after a successful initramfs only the others; every other pass all of them.
struct RecoveryScope {
    enum Part { case all, early, late }
    let part: Part
    /// Tokens of the open runs with a volume mounted on / or /usr (from the journal).
    let early: Set<String>
    let journalAvailable: Bool
    /// With `origin`: the tokens of the open runs with a snapshot of that volume; nil: every run.
    let only: Set<String>?

    init(journal: Journal?, initramfs: Bool, afterInitramfs: Bool, origin: String? = nil) {
        journalAvailable = journal != nil
        var tokens: Set<String> = []
        var ofOrigin: Set<String> = []
        for run in (try? journal?.runs(in: RunState.open)) ?? [] {
            let records = (try? journal?.snapshots(runID: run.id!)) ?? []
            if records.contains(where: { $0.mountPoint.map(Planner.earlyMountPoints.contains) == true }) { tokens.insert(run.token) }
            if let origin, records.contains(where: { $0.originUUID == origin }) { ofOrigin.insert(run.token) }
        }
        early = tokens
        only = origin == nil ? nil : ofOrigin
        part = initramfs ? .early : (afterInitramfs ? .late : .all)
    }

    func includes(_ token: String) -> Bool {
        if let only, !only.contains(token) { return false }
        switch part {
        case .all: return true
        case .early: return early.contains(token)
        case .late: return !early.contains(token)
        }
    }

    /// For a COW storage: without a journal, the initramfs takes COW devices only (a run of /
    /// has one; a COW file would keep the state volume busy).
    func includes(_ token: String, storage: CowStorage) -> Bool {
        if part == .early && !journalAvailable { return !storage.isFile }
        return includes(token)
    }
}

extension CowLabel {
    /// The origin as the kernel knows it: by its UUID when it has one.
    var originRef: DeviceRef { originUUID.isEmpty ? .name(originName) : .uuid(originUUID) }
}
