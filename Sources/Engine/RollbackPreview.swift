import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Recipe
import Snapshot

/// What `guard rollback RUN` would do and what it would throw away, without doing it
/// (`guard rollback --dry-run RUN`).
public struct RollbackPreview: Sendable {
    public struct Volume: Sendable {
        public var volume: String
        /// What the rollback unmounts (and mounts again once the merge started), deepest first.
        public var unmounts: [String]
        /// The processes using those filesystems: stopped by `rollback.stop` or by the kill of
        /// the run's own processes, or the rollback stops before anything is merged.
        public var users: [String]
        /// Bytes of the volume that differ from before the run (the COW's use now): all of it
        /// goes back. nil for a thin volume (its pool has no such count) or a snapshot that is
        /// not readable.
        public var changedBytes: UInt64?
        /// The same when the run ended (the journal's count; nil for runs of older guards).
        public var changedAtEndBytes: UInt64?
        /// Bytes first changed after the run ended: at least this much written since it was
        /// kept is thrown away (a block the run had already changed counts once).
        public var changedSinceEndBytes: UInt64?
    }

    public var run: Int64
    /// When the run ended and was kept (seconds since the epoch).
    public var keptAt: Double?
    /// Merged by the initramfs at the next boot (the run holds / or /usr), not now.
    public var atBoot: Bool
    public var stopHooks: [String]
    public var startHooks: [String]
    public var volumes: [Volume]
}

extension Maintenance {
    /// `guard rollback --dry-run`: the checks the rollback makes first (refused the same way),
    /// then what it would unmount, which hooks it would run, who uses the volumes, and how much
    /// it would throw away. Touches no volume, takes no lock; like `guard status`, it journals
    /// a snapshot it finds stale.
    public func rollbackPreview(_ reference: String, withoutHooks: Bool = false) throws -> RollbackPreview {
        let journal = try context.journal()
        let requested = try requireRun(reference, journal: journal)
        if let refusal = refusal(requested, "roll back") { throw GuardFailure(.refused, refusal) }
        let runID = requested.id!
        let records = try journal.snapshots(runID: runID)
        let engine = SnapshotEngine(dm: try context.dm())
        let run = try requireNotStale(requested, "rolled back", journal: journal, engine: engine, holdingLocks: false)
        let recipe = try run.journaledRecipe(withoutHooks: withoutHooks)
        let stacks = try stacks(records)
        let early = try earlyMount(of: stacks, engine: engine)
        if let early { try requireInitramfsRollback(runID: runID, target: early) }
        try RollbackProcedure(context: context, journal: journal, engine: engine).requireRestorable(runID: runID, records: records, stacks: stacks)
        // At the next boot nothing is unmounted: the initramfs merges before it mounts.
        let table = early == nil ? try Mounts.current() : []
        var volumes: [RollbackPreview.Volume] = []
        for (record, stack) in zip(records, stacks) {
            let origin = try engine.dm.info(stack.originRef)?.number
            let unmounts = try origin.map { try RollbackProcedure.mountsToUnmount(origins: [$0], table: table) } ?? []
            var users: [String] = []
            for device in Set(unmounts.map(\.device)) {
                for user in Mounts.processes(using: device).map(\.description) where !users.contains(user) { users.append(user) }
            }
            let changed = stack.thin == nil ? (try? engine.health(stack).status.usage?.allocatedBytes).map { stack.changedBytes(used: $0) } : nil
            let atEnd = record.usedAtEndBytes.map { UInt64(max($0, 0)) }
            volumes.append(
                RollbackPreview.Volume(
                    volume: record.volume, unmounts: unmounts.map(\.target), users: users, changedBytes: changed, changedAtEndBytes: atEnd,
                    changedSinceEndBytes: changed.flatMap { now in atEnd.map { now > $0 ? now - $0 : 0 } }))
        }
        return RollbackPreview(
            run: runID, keptAt: run.finishedAt, atBoot: early != nil,
            stopHooks: recipe?.rollbackStop.map(\.name) ?? [], startHooks: recipe?.rollbackStart.map(\.name) ?? [], volumes: volumes)
    }
}
