import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// Commands on runs after `guard run` returned: commit and rollback of kept runs, the
/// teardown of finished merges, the expiry of kept runs, and status.
public struct Maintenance {
    public let context: GuardContext
    var reporter: any Reporter { context.reporter }

    public init(context: GuardContext) { self.context = context }

    func timestamp() -> Double { context.now().timeIntervalSince1970 }

    /// The stacks of a run's snapshots, from the journal.
    func stacks(_ records: [SnapshotRecord]) throws -> [SnapshotStack] {
        try records.map { record in
            guard let stack = decodeStack(record.stack) else {
                throw GuardFailure(.attention, "the journal has no snapshot description for \(record.volume) of run \(record.runID); run `guard recover`")
            }
            return stack
        }
    }

    func lock(_ records: [SnapshotRecord], runID: Int64) throws -> [VolumeLock] {
        try records.map { record in
            try VolumeLock.acquire(
                directory: context.lockDirectory, key: record.originUUID.isEmpty ? record.originName : record.originUUID, holder: "run \(runID) (pid \(getpid()))")
        }
    }

    /// Looks a run up by number or token, with a clear refusal when it does not exist.
    func requireRun(_ reference: String, journal: Journal) throws -> RunRecord {
        guard let run = try journal.run(reference) else {
            throw GuardFailure(.refused, "there is no run '\(reference)' in the journal \(journal.path) (see `guard history`)")
        }
        return run
    }

    /// Why a run cannot be committed or rolled back now, or nil.
    func refusal(_ run: RunRecord, _ verb: String) -> String? {
        let id = run.id ?? 0
        switch run.state {
        case .kept: return nil
        case .finished:
            let how = run.outcome.map { $0 == .rolledBack ? "rolled back" : $0.rawValue } ?? "finished"
            return "run \(id) is already \(how); there is nothing to \(verb)"
        case .merging: return "run \(id) is being rolled back (its merge is under way); see `guard status --wait`"
        case .running: return "run \(id) has not finished (it is running, or guard died during it); run `guard recover` first"
        case .needsReassembly:
            // Committing gives the old blocks up on purpose: the admin may, once told.
            if verb == "commit" { return nil }
            return "run \(id) needs reassembly: a snapshot that holds old blocks is not live (see `guard status`); mount or activate what it names and run `guard recover` first"
        case .stale:
            // A stale snapshot can only be discarded: committing keeps the volume as it is.
            return verb == "commit"
                ? nil
                : "run \(id)'s snapshot is stale (its volume was written while the snapshot was not live): it no longer describes the volume's past and cannot be rolled back; `guard commit \(id)` discards it"
        }
    }

    /// Records the bypasses of `run`'s origins (the caller holds its volume locks), then refuses
    /// to `verb` a run that is stale, saying why from the journal's record.
    func requireNotStale(_ run: RunRecord, _ verb: String, journal: Journal, engine: SnapshotEngine, holdingLocks: Bool = true) throws -> RunRecord {
        try OriginWatch(context: context, journal: journal, engine: engine).check(run, holdingLocks: holdingLocks)
        let current = try journal.run(id: run.id!) ?? run
        guard current.state == .stale else { return current }
        let id = current.id!
        let why = OriginWatch.recorded(journal, runID: id) ?? "its volume was written while its snapshot was not live"
        throw GuardFailure(.attention, "run \(id) cannot be \(verb): \(why)")
    }

    // MARK: guard commit

    /// Drops a kept run's snapshots: its upgrade becomes final.
    /// - Parameter reason: why, for the journal (a commit by `guard monitor`'s `on_full`).
    public func commit(_ reference: String, reason: String? = nil) throws -> String {
        let journal = try context.journal()
        let run = try requireRun(reference, journal: journal)
        if let refusal = refusal(run, "commit") { throw GuardFailure(.refused, refusal) }
        let records = try journal.snapshots(runID: run.id!)
        if records.contains(where: { $0.state == .merging }) {
            throw GuardFailure(
                .refused, "run \(run.id!) was being rolled back when it stopped: its merge must finish, not be given up; make its COW available and run `guard recover`")
        }
        let locks = try lock(records, runID: run.id!)
        defer { locks.forEach { $0.release() } }
        // A bypass is recorded (the history says why the snapshot went); the commit goes on.
        try OriginWatch(context: context, journal: journal, engine: try context.engine(watchdog: false)).check(run, holdingLocks: true)
        // Read again under the locks: another guard may have rolled it back meanwhile.
        let current = try journal.run(id: run.id!) ?? run
        if let refusal = refusal(current, "commit") { throw GuardFailure(.refused, refusal) }
        try commit(
            current, records: records, journal: journal,
            reason: reason ?? (current.state == .kept ? "commit" : "commit of a \(current.state.rawValue) run: its old blocks are given up"))
        return "run \(run.id!) committed: the upgrade is final, its snapshots are gone"
    }

    func commit(_ run: RunRecord, records: [SnapshotRecord], journal: Journal, reason: String) throws {
        let engine = try context.engine()
        SnapshotFiles.releaseStale(stateDirectory: context.stateDirectory, token: run.token)
        var run = run
        run.decision = .commit
        let decided = run
        let phase = try journal.batch {
            try journal.update(decided)
            let phase = try journal.beginPhase(decided.id!, "commit", at: timestamp())
            try journal.event(decided.id!, .intent, "commit", reason, at: timestamp())
            return phase
        }
        for (record, stack) in zip(records, try stacks(records)) where record.state == .live || record.state == .invalid {
            // The decision is in the journal: the old blocks may go even if the stack is not live.
            try engine.discard(stack, commitJournaled: true)
            var updated = record
            updated.state = .committed
            try journal.update(updated)
        }
        run = try journal.run(id: run.id!) ?? run
        run.state = .finished
        run.outcome = .committed
        run.finishedAt = timestamp()
        let committed = run
        try journal.batch {
            try journal.endPhase(phase, status: .done, detail: reason, at: timestamp())
            try journal.update(committed)
        }
        releaseHolds(journal: journal, engine: engine)
    }

    /// The volumes no open run needs held at boot any more are released (`VolumeHolds`);
    /// best effort: the next boot's units release what is left.
    func releaseHolds(journal: Journal, engine: SnapshotEngine) {
        do {
            for action in try VolumeHolds().reconcile(journal: journal, engine: engine) { reporter.note(action) }
        } catch {
            reporter.warning("the markers of the volumes held at boot (/etc/guard/held): \(error)")
        }
    }

    // MARK: guard rollback

    /// What `guard rollback` did.
    public struct RollbackOutcome: Sendable {
        public var message: String
        /// Journaled for the next boot (the run includes / or /usr), not merged now.
        public var atBoot: Bool
    }

    /// Rolls a kept run back. Returns once the volumes are mounted again, unless `wait`.
    /// - Parameter withoutHooks: go on without the recipe's rollback hooks when the journaled
    ///   recipe does not parse (refused otherwise).
    public func rollback(_ reference: String, wait: Bool, withoutHooks: Bool = false) async throws -> RollbackOutcome {
        let journal = try context.journal()
        let requested = try requireRun(reference, journal: journal)
        if let refusal = refusal(requested, "roll back") { throw GuardFailure(.refused, refusal) }
        let records = try journal.snapshots(runID: requested.id!)
        let locks = try lock(records, runID: requested.id!)
        defer { locks.forEach { $0.release() } }
        let engine = try context.engine()
        // Another tool may have replaced a volume's table since the run was kept: that snapshot
        // is stale, and rolling back to it would give a mix of old and new blocks.
        let run = try requireNotStale(requested, "rolled back", journal: journal, engine: engine)
        // As the journal has it under the locks: another guard may have committed it meanwhile.
        if let refusal = refusal(run, "roll back") { throw GuardFailure(.refused, refusal) }
        let recipe = try run.journaledRecipe(withoutHooks: withoutHooks)
        let stacks = try stacks(records)
        if let early = try earlyMount(of: stacks, engine: engine) {
            let message = try scheduleBootRollback(run, records: records, stacks: stacks, mountedOn: early, journal: journal, engine: engine)
            return RollbackOutcome(message: message, atBoot: true)
        }
        try await RollbackProcedure(context: context, journal: journal, engine: engine).perform(
            run: run, records: records, live: try LiveSnapshotSet.attach(stacks, engine: engine), recipe: recipe, wait: wait)
        if stacks.allSatisfy({ $0.thin != nil }) {
            return RollbackOutcome(message: "run \(run.id!) rolled back: the volumes are their thin snapshots from before the run, nothing to merge", atBoot: false)
        }
        return RollbackOutcome(
            message: wait
                ? "run \(run.id!) rolled back: the volumes are as before the run, the merge is complete"
                : "run \(run.id!) rolled back: the volumes are as before the run and mounted again; the merge finishes in the background (`guard status` shows it, `guard status --wait` waits for it)",
            atBoot: false)
    }

    // MARK: Rollback at the next boot

    /// Where one of the stacks' origins is mounted by the initramfs (/, /usr), or nil: such a
    /// volume is never unmounted while the system runs, so it is merged at the next boot.
    func earlyMount(of stacks: [SnapshotStack], engine: SnapshotEngine) throws -> String? {
        let origins = Set(try stacks.filter { $0.thin == nil }.compactMap { try engine.dm.info($0.originRef)?.number })
        return try Mounts.current().first { origins.contains($0.device) && Planner.earlyMountPoints.contains($0.target) }?.target
    }

    /// Refuses a rollback at the next boot that guard's initramfs could not carry out.
    func requireInitramfsRollback(runID: Int64, target: String) throws {
        if let problem = BootSupport(stateDirectory: context.stateDirectory).initramfsProblem(target: target) {
            throw GuardFailure(.refused, "run \(runID) cannot be rolled back at the next boot: \(problem); nothing was changed")
        }
    }

    /// Journals the decision to roll `run` back and leaves the merge to the initramfs of the next
    /// boot (`guard recover --boot --initramfs`), which starts it before it mounts the root.
    func scheduleBootRollback(
        _ run: RunRecord, records: [SnapshotRecord], stacks: [SnapshotStack], mountedOn target: String, journal: Journal, engine: SnapshotEngine
    ) throws -> String {
        let runID = run.id!
        try requireInitramfsRollback(runID: runID, target: target)
        try RollbackProcedure(context: context, journal: journal, engine: engine).requireRestorable(runID: runID, records: records, stacks: stacks)
        var decided = run
        decided.decision = .rollback
        let scheduled = decided
        try journal.batch {
            try journal.update(scheduled)
            try journal.event(runID, .intent, JournalEvents.rollbackAtBoot, records.map(\.volume).joined(separator: ", "), at: timestamp())
        }
        return
            "run \(runID) will be rolled back at the next boot: \(target) is mounted, so the initramfs starts the merge before it mounts \(target); reboot to roll back (`guard rollback --reboot \(runID)` reboots now). Until then the run stays kept, and `guard commit \(runID)` cancels the rollback"
    }

    // MARK: Merges

    /// Waits for the merges of a run, reporting progress, and tears each down when the
    /// kernel says it is complete.
    func waitForMerges(runID: Int64, journal: Journal, engine: SnapshotEngine) async throws {
        var initial: [Int: UInt64] = [:]
        while true {
            let done = try finishMerges(runID: runID, journal: journal, engine: engine, initial: &initial)
            if done { return }
            try await Task.sleep(for: .milliseconds(200))
        }
    }

    /// One pass over a run's merging snapshots: tears down the complete ones.
    /// - Returns: whether the run has no merge left.
    @discardableResult
    func finishMerges(runID: Int64, journal: Journal, engine: SnapshotEngine, initial: inout [Int: UInt64]) throws -> Bool {
        var remaining = 0
        let records = try journal.snapshots(runID: runID)
        let merging = MergingSnapshotSet.attach(records.filter { $0.state == .merging }.compactMap { decodeStack($0.stack) }, engine: engine)
        for record in records where record.state == .merging {
            guard let stack = decodeStack(record.stack) else { continue }
            switch try merging.state(stack) {
            case .merging(let left, _):
                let start = initial[record.volumeIndex] ?? max(left, UInt64(record.peakUsedBytes / 512), 1)
                initial[record.volumeIndex] = start
                reporter.merge(volume: record.volume, fraction: 1 - Double(left) / Double(max(start, left)))
                remaining += 1
            case .complete, .finished:
                try journal.event(runID, .intent, "finish-merge", record.volume, at: timestamp())
                try merging.finish(stack)
                var updated = record
                updated.state = .merged
                try journal.update(updated)
                try journal.event(runID, .result, "merged", record.volume, at: timestamp())
                reporter.merge(volume: record.volume, fraction: 1)
            case .failed(let status):
                throw GuardFailure(
                    .attention, "the merge of \(record.volume) (run \(runID)) failed: the kernel reports \(status); check `dmesg` for I/O errors, fix them and run `guard recover`")
            case .needsReassembly(let why):
                throw GuardFailure(.needsReassembly, "the merge of \(record.volume) (run \(runID)) is not live and did not finish: \(why); nothing was torn down")
            }
        }
        // A volume whose merge never started keeps the run open, whatever the others did.
        let unmerged = records.filter { $0.state == .live }.map(\.volume)
        if remaining == 0, !unmerged.isEmpty {
            throw GuardFailure(
                .attention,
                "run \(runID): \(unmerged.joined(separator: ", ")) \(unmerged.count == 1 ? "was" : "were") not rolled back (the merge did not start) while the other volumes were; run `guard recover`, which rolls \(unmerged.count == 1 ? "it" : "them") back"
            )
        }
        if remaining == 0, var run = try journal.run(id: runID), run.state == .merging {
            run.state = .finished
            run.finishedAt = timestamp()
            if run.outcome == nil { run.outcome = .rolledBack }
            try journal.update(run)
            releaseHolds(journal: journal, engine: engine)
        }
        return remaining == 0
    }

    // MARK: Housekeeping done by every command

    /// What the housekeeping of every command would do to a run.
    public enum Chore: Sendable {
        /// A merge under way: tear it down if the kernel reports it complete.
        case finishMerge
        /// A kept run past its keep duration: commit it.
        case commitExpired(until: Double)
    }

    /// The runs `tidy` acts on, and what it does to each (the dry run reports them).
    public func chores(journal: Journal) throws -> [(run: RunRecord, chore: Chore)] {
        try journal.runs(in: [.merging, .kept]).compactMap { run in chore(for: run).map { (run, $0) } }
    }

    /// What the housekeeping does to `run` as the journal has it now, or nil.
    func chore(for run: RunRecord) -> Chore? {
        switch run.state {
        case .merging: return .finishMerge
        case .kept:
            // A rollback waiting for the next boot is not committed behind the admin's back.
            guard run.decision != .rollback, let until = run.keepUntil, until <= timestamp() else { return nil }
            return .commitExpired(until: until)
        default: return nil
        }
    }

    /// Why the housekeeping waits, or nil: this boot's reassembly has not run (guard-reassemble.service
    /// or the initramfs), and a snapshot that holds old blocks is not live. Instead of a
    /// `Requisite=` on the boot unit, which would fail the maintenance unit on a system the
    /// package was just installed on.
    public func tidyWaitsForReassembly(journal: Journal) throws -> String? {
        guard !BootSupport.reassemblyRanThisBoot else { return nil }
        let engine = SnapshotEngine(dm: try context.dm())
        for run in try journal.runs(in: [.kept, .merging, .needsReassembly]) {
            for record in try journal.snapshots(runID: run.id!) where record.state == .live || record.state == .merging {
                guard let stack = decodeStack(record.stack), !(try engine.liveState(stack).live), engine.evidence(stack).mustKeep else { continue }
                return
                    "run \(run.id!)'s snapshot of \(record.volume) holds old blocks and is not live, and this boot's reassembly has not run (guard-reassemble.service); the housekeeping waits: run `guard recover`"
            }
        }
        return nil
    }

    /// Tears down finished merges and commits kept runs past their keep duration.
    /// Runs another guard process holds (locked volumes) are left alone.
    public func tidy(journal: Journal) throws {
        let due = try chores(journal: journal)
        guard !due.isEmpty else { return }
        let engine = try context.engine()
        for (listed, _) in due {
            let records = try journal.snapshots(runID: listed.id!)
            guard let locks = try? lock(records, runID: listed.id!) else { continue }
            defer { locks.forEach { $0.release() } }
            // Read again under the locks: between the listing and the locks another guard may
            // have rolled the run back, scheduled its rollback for the boot, or extended its keep.
            guard let run = try journal.run(id: listed.id!), let chore = chore(for: run) else { continue }
            switch chore {
            case .finishMerge:
                var initial: [Int: UInt64] = [:]
                if (try? finishMerges(runID: run.id!, journal: journal, engine: engine, initial: &initial)) == true {
                    reporter.note("run \(run.id!): the merge is complete and torn down")
                }
            case .commitExpired(let until):
                reporter.note("run \(run.id!) was kept until \(formatDate(until)); committing it")
                do {
                    try commit(run, records: records, journal: journal, reason: "keep duration passed")
                } catch {
                    reporter.warning("run \(run.id!): the automatic commit failed: \(error)")
                }
            }
        }
    }
}
