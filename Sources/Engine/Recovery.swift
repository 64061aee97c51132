import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// `guard recover`: brings the kernel, the COW labels and the journal back into agreement
/// after guard was killed or the machine went down. Idempotent.
public struct Recovery {
    public let context: GuardContext
    var reporter: any Reporter { context.reporter }

    public init(context: GuardContext) { self.context = context }

    func timestamp() -> Double { context.now().timeIntervalSince1970 }

    /// Runs marked running whose guard process is gone: their volume locks are free.
    public func unfinishedRuns(journal: Journal) throws -> [RunRecord] {
        try journal.runs(in: [.running]).filter { run in
            let records = (try? journal.snapshots(runID: run.id!)) ?? []
            if records.isEmpty { return kill(run.pid, 0) != 0 }
            return records.allSatisfy { !VolumeLock.isHeld(directory: context.lockDirectory, key: $0.originUUID.isEmpty ? $0.originName : $0.originUUID) }
        }
    }

    /// What recovery did, one line per action.
    public struct Report: Sendable {
        public var actions: [String] = []
        public var problems: [String] = []
    }

    /// Recovers everything it can.
    /// - Parameter boot: early boot, before local filesystems are mounted: reassemble
    ///   snapshots from their COW labels, merge back undecided runs at once (nothing is
    ///   mounted yet), run no hooks.
    public func recover(boot: Bool = false) async throws -> Report {
        var report = Report()
        try context.prepareStateDirectory()
        let dm = try context.dm()
        let engine = try context.engine()

        // Guard volumes first: snapshots are stacked on them.
        let activated = try GuardVolumes(dm: dm, stateDirectory: context.stateDirectory).activateAll()
        for volume in activated { report.actions.append("activated guard volume \(volume.name)") }

        // Reassembly from COW labels (after a reboot the kernel has none of guard's devices).
        let journal = try? context.journal()
        let files = cowFiles()
        for storage in files + journaledStorages(journal, besides: files) {
            guard let label = try? CowLabel.read(from: storage.path) else { continue }
            if try dm.info(.uuid(label.identity.uuid(.real))) != nil || dm.info(.uuid(label.identity.uuid(.cow))) != nil { continue }
            if boot && [.active, .kept, .merging].contains(label.state) {
                try await waitForOrigin(label, dm: dm, report: &report)
            }
            do {
                let result = try engine.reassemble(storage)
                switch result {
                case .reassembled(let stack, let merging):
                    report.actions.append(merging ? "resumed the merge into \(stack.originName) from \(storage.path)" : "reassembled the snapshot of \(stack.originName) from \(storage.path)")
                case .alreadyLive: break
                case .discarded(let why): report.actions.append("removed \(storage.path): \(why)")
                }
            } catch {
                report.problems.append("reassembly from \(storage.path): \(error)")
            }
        }

        guard let journal else {
            report.problems.append("the journal \(context.journalPath) cannot be opened; snapshots were reassembled from their labels only")
            return report
        }
        // Anything a crash left suspended is resumed first: nothing may stay frozen.
        for run in try journal.runs(in: [.running, .kept, .merging]) {
            for record in try journal.snapshots(runID: run.id!) {
                guard let stack = decodeStack(record.stack) else { continue }
                for name in (try? engine.resumeSuspended(stack)) ?? [] {
                    report.actions.append("resumed \(name), left suspended by run \(run.id!)")
                }
            }
        }
        for run in try unfinishedRuns(journal: journal) {
            do {
                report.actions.append(try await recover(run, journal: journal, engine: engine, boot: boot))
            } catch {
                report.problems.append("run \(run.id!): \(error)")
            }
        }
        // Rollbacks whose merge the kernel stopped (an I/O error since fixed): start them again.
        for run in try journal.runs(in: [.merging]) {
            let records = try journal.snapshots(runID: run.id!)
            guard let locks = try? Maintenance(context: context).lock(records, runID: run.id!) else { continue }
            defer { locks.forEach { $0.release() } }
            for record in records where record.state == .merging {
                guard let stack = decodeStack(record.stack), case .failed? = try? engine.mergeState(stack) else { continue }
                do {
                    let recipe = try? RecipeParser.parse(text: run.recipeText, path: run.recipePath).get()
                    try await RollbackProcedure(context: context, journal: journal, engine: engine).restartMerge(run: run, record: record, stack: stack, recipe: recipe)
                    report.actions.append("run \(run.id!): restarted the merge into \(record.volume)")
                } catch {
                    report.problems.append("run \(run.id!): the merge into \(record.volume) cannot restart: \(error)")
                }
            }
            if !boot {
                do {
                    try await Maintenance(context: context).waitForMerges(runID: run.id!, journal: journal, engine: engine)
                    report.actions.append("run \(run.id!): the rollback's merge is complete and torn down")
                } catch {
                    report.problems.append("run \(run.id!): \(error)")
                }
            }
        }
        if !boot {
            try? Maintenance(context: context).tidy(journal: journal)
            report.actions += try removeStrays(journal: journal, engine: engine)
        }
        return report
    }

    /// At boot, LVM may activate an origin a little after guard starts: wait up to 30 s.
    private func waitForOrigin(_ label: CowLabel, dm: DeviceMapper, report: inout Report) async throws {
        let ref: DeviceRef = label.originUUID.isEmpty ? .name(label.originName) : .uuid(label.originUUID)
        for _ in 0..<60 {
            if try dm.info(ref) != nil { return }
            try await Task.sleep(for: .milliseconds(500))
        }
        report.problems.append("the volume \(label.originName) did not appear within 30 s; activate it without mounting it and run `guard recover`")
    }

    /// Finishes or undoes one unfinished run, following its last decision.
    func recover(_ run: RunRecord, journal: Journal, engine: SnapshotEngine, boot: Bool) async throws -> String {
        let runID = run.id!
        let records = try journal.snapshots(runID: runID)
        let locks = try Maintenance(context: context).lock(records, runID: runID)
        defer { locks.forEach { $0.release() } }
        let stacks = records.compactMap { decodeStack($0.stack) }
        let recipe = try? RecipeParser.parse(text: run.recipeText, path: run.recipePath).get()
        try journal.event(runID, "intent", "recover", "phase \(run.phase), decision \(run.decision?.rawValue ?? "none")", at: timestamp())

        var updated = run
        func close(_ outcome: RunOutcome, _ state: RunState, _ what: String) throws -> String {
            updated = try journal.run(id: runID) ?? updated
            updated.outcome = outcome
            updated.state = state
            if state != .merging { updated.finishedAt = timestamp() }
            updated.error = [run.error, "recovered: \(what)"].compactMap { $0 }.joined(separator: "; ")
            try journal.update(updated)
            try journal.event(runID, "result", "recover", what, at: timestamp())
            return "run \(runID): \(what)"
        }

        // Which snapshots were ever taken: the origin's table says so, or a merge is under way.
        var taken = false
        var merging = false
        for stack in stacks {
            guard let origin = try engine.dm.info(stack.originRef) else { continue }
            let live = try engine.dm.table(.number(origin.number))
            if live.isOnly("snapshot-merge") { merging = true }
            if live.isOnly("snapshot-origin") || live.isOnly("snapshot-merge") { taken = true }
        }
        let stepsMayHaveRun = !["preflight", "quiesce", "snapshot"].contains(run.phase)

        // The last decision the journal holds comes first: it was written before any of its work.
        if merging || run.decision == .rollback {
            return try await rollBack(run, records: records, stacks: stacks, recipe: recipe, journal: journal, engine: engine, boot: boot, close: close)
        }
        if run.decision == .commit {
            for stack in stacks { try engine.drop(stack) }
            try journal.setSnapshotState(runID: runID, .committed)
            return try close(.recovered, .finished, "finished the commit: the upgrade is in place, the snapshots are gone")
        }
        if run.decision == .keep && taken {
            for stack in stacks { try? engine.mark(stack, .kept) }
            return try close(.kept, .kept, "the run had decided to keep its snapshots; they are kept (`guard rollback \(runID)` or `guard commit \(runID)`)")
        }
        if records.isEmpty || stacks.isEmpty || !taken {
            for stack in stacks { try engine.drop(stack) }
            try journal.setSnapshotState(runID: runID, .discarded)
            return try close(.recovered, .finished, "no snapshot was ever live; removed what the run had prepared; no volume was changed")
        }
        if !stepsMayHaveRun {
            // The snapshot was taken but no step ran: the volumes hold what they held before.
            for stack in stacks { try engine.drop(stack) }
            try journal.setSnapshotState(runID: runID, .discarded)
            return try close(.recovered, .finished, "the run stopped before its steps; dropped its snapshots; no volume was changed by it")
        }
        if recipe?.onFailure == .keep {
            for stack in stacks { try? engine.mark(stack, .kept) }
            return try close(.kept, .kept, "the run stopped during \(run.phase); the recipe says keep on failure: snapshots kept (`guard rollback \(runID)` or `guard commit \(runID)`)")
        }
        return try await rollBack(run, records: records, stacks: stacks, recipe: recipe, journal: journal, engine: engine, boot: boot, close: close)
    }

    private func rollBack(
        _ run: RunRecord, records: [SnapshotRecord], stacks: [SnapshotStack], recipe: Recipe?, journal: Journal, engine: SnapshotEngine,
        boot: Bool, close: (RunOutcome, RunState, String) throws -> String
    ) async throws -> String {
        let runID = run.id!
        var pending: [(SnapshotRecord, SnapshotStack)] = []
        for (record, stack) in zip(records, stacks) {
            switch try? engine.mergeState(stack) {
            case .merging?, .complete?, .finished?:
                continue
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
                for (record, stack) in pending {
                    try engine.startMerge(stack)
                    var updated = record
                    updated.state = .merging
                    try journal.update(updated)
                }
            } else {
                try await RollbackProcedure(context: context, journal: journal, engine: engine).perform(
                    run: marked, records: pending.map(\.0), stacks: pending.map(\.1), recipe: recipe, wait: false)
            }
        }
        for record in records where record.state != .merging && record.state != .merged {
            var updated = record
            updated.state = .merging
            try journal.update(updated)
        }
        if boot {
            return try close(.recovered, .merging, "rolled back (the merge continues; the volumes read as before the run)")
        }
        try await Maintenance(context: context).waitForMerges(runID: runID, journal: journal, engine: engine)
        return try close(.recovered, .finished, "rolled back: the volumes are as before the run")
    }

    /// The COW devices of open runs, and their COW files outside the directories `cowFiles()` scans
    /// (a recipe's own `cow:` directory, or a cow_dir guard.conf no longer names).
    func journaledStorages(_ journal: Journal?, besides files: [CowStorage]) -> [CowStorage] {
        guard let journal, let runs = try? journal.runs(in: [.running, .kept, .merging]) else { return [] }
        let scanned = Set(files.map(\.path))
        return runs.flatMap { run in
            ((try? journal.snapshots(runID: run.id!)) ?? []).compactMap { record -> CowStorage? in
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

    /// Removes GUARD- layers and COW files of no open run. A stray stack an origin still uses
    /// live (a snapshot-origin table on it) is left alone and reported: it may hold data.
    func removeStrays(journal: Journal, engine: SnapshotEngine) throws -> [String] {
        var actions: [String] = []
        let open = Set(try journal.runs(in: [.running, .kept, .merging]).map(\.token))
        let devices = try engine.dm.list()
        var strays: [String: [(DeviceSummary, StackIdentity.Layer)]] = [:]
        for device in devices {
            guard let (identity, layer) = StackIdentity.parse(uuid: device.uuid), !open.contains(identity.runToken) else { continue }
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
        let known = try journal.allTokens()
        for storage in cowFiles() {
            let label = try? CowLabel.read(from: storage.path)
            if let label, open.contains(label.runToken) { continue }
            if let label, try engine.dm.info(.uuid(label.identity.uuid(.cow))) != nil { continue }
            if let label, [.active, .kept, .merging].contains(label.state), !known.contains(label.runToken) {
                // A snapshot the journal does not know (a journal replaced or lost): keep it.
                actions.append("kept \(storage.path): it holds a \(label.state.rawValue) snapshot of \(label.originName) from run \(label.runToken), unknown to the journal; `guard recover` reassembles it once its volume is active")
                continue
            }
            for loop in LoopDevice.find(backingFile: storage.path) { try? loop.detach() }
            try? CowLabel.wipe(storage.path)
            try? FileManager.default.removeItem(atPath: storage.path)
            actions.append("removed stray COW file \(storage.path)")
        }
        return actions
    }
}
