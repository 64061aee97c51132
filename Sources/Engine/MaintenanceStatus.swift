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

extension Maintenance {
    // MARK: guard status

    /// One volume of a run that still has snapshot state.
    /// What `guard status` found for a volume, as one word a program can compare (`status` says
    /// the same for people, with the details).
    public enum Condition: String, Sendable, CaseIterable {
        case preparing, live, fused, invalid, merging, merged, committed, discarded, missing, unknown
        case mergeFailed = "merge_failed"
        case needsReassembly = "needs_reassembly"
        case notRolledBack = "not_rolled_back"
    }

    public struct VolumeStatus: Sendable {
        public var volume: String
        public var origin: String
        public var state: SnapshotState
        public var status: String
        public var condition: Condition
        public var usedBytes: UInt64?
        public var sizeBytes: UInt64?
        /// Of `usedBytes`, what was first written after the run ended: a rollback throws at
        /// least this much away (a kept classic snapshot of a run that journaled its end).
        public var changedSinceEndBytes: UInt64?
        /// 0...1 while merging.
        public var mergeProgress: Double?
        public var remainingBytes: UInt64?
        /// Why the volume needs reassembly, and what to do.
        public var detail: String?
    }

    public struct RunStatus: Sendable {
        public var run: RunRecord
        public var volumes: [VolumeStatus]
        /// Its guard process is gone while the journal says it runs: `guard recover` finishes it.
        public var unfinished = false
        /// What the next boot does to the run (a scheduled rollback, a boot assessment), or nil.
        public var pendingAtBoot: String?
        /// Why a stale run is stale, from the journal (a bypassed origin), or nil.
        public var staleReason: String?

        /// A snapshot of the run holds old blocks but is not live (`guard status` exits 4).
        public var needsReassembly: Bool { run.state == .needsReassembly || volumes.contains { $0.condition == .needsReassembly } }
    }

    /// A COW this full needs a person: a commit, a rollback or a larger `extend`.
    public static let attentionFill = 0.8

    /// What needs a person in a status, one line each, naming the run, the volume and what to
    /// run. A volume that needs reassembly is not here: it has an exit code of its own (4).
    public static func attention(_ runs: [RunStatus], strays: [String]) -> [String] {
        var lines: [String] = []
        for status in runs {
            let id = status.run.id ?? 0
            if status.unfinished {
                lines.append("run \(id) did not finish (guard was killed or the machine went down during \(status.run.phase)); run `guard recover`")
            }
            if status.run.state == .stale {
                lines.append(
                    status.staleReason.map { "run \(id): \($0)" }
                        ?? "run \(id)'s snapshot is stale (its volume was written while the snapshot was not live); `guard commit \(id)` discards it")
            }
            for volume in status.volumes {
                let name = "run \(id), \(volume.volume)"
                switch volume.condition {
                case .live:
                    if let used = volume.usedBytes, let size = volume.sizeBytes, size > 0, Double(used) / Double(size) >= attentionFill {
                        lines.append(
                            "\(name): COW \(Int(Double(used) * 100 / Double(size)))% full (\(formatBytes(used)) of \(formatBytes(size))); when it fills, the snapshot is lost or the fuse stops writes: `guard commit \(id)` or `guard rollback \(id)`, or give the recipe an `extend:` and run `guard monitor`"
                        )
                    }
                case .needsReassembly, .merging, .merged, .preparing, .committed, .discarded: break
                default:
                    lines.append("\(name): \(volume.status)" + (volume.detail.map { ": \($0)" } ?? ""))
                }
            }
        }
        for stray in strays { lines.append("stray guard device (no open run): \(stray); `guard recover` removes it") }
        return lines
    }

    /// Live snapshots, their fill, merges and their progress. Changes nothing: finished merges
    /// and expired kept runs are left to `tidy` (`guard status --tidy`, the maintenance job).
    ///
    /// `strays` are guard's layers of runs this journal has closed (`guard recover` removes
    /// them); `unknown` are layers of runs it never had: another state directory's (a second
    /// guard.conf, a container) or a journal that was replaced. guard leaves those alone.
    public func status() throws -> (runs: [RunStatus], strays: [String], unknown: [String]) {
        guard let journal = try context.existingJournal() else {
            let devices = try layerDevices(open: []) { [] }
            return ([], devices.strays, devices.unknown)
        }
        let dm = try context.dm()
        let engine = SnapshotEngine(dm: dm)
        // The one thing status writes: a bypass it sees is made durable before it is shown.
        try OriginWatch(context: context, journal: journal, engine: engine).sweep()
        var result: [RunStatus] = []
        let unfinished = Set(try Recovery(context: context).unfinishedRuns(journal: journal).compactMap(\.id))
        for run in try journal.runs(in: RunState.open) {
            var volumes: [VolumeStatus] = []
            for record in try journal.snapshots(runID: run.id!) {
                var volume = VolumeStatus(
                    volume: record.volume, origin: record.originName, state: record.state, status: record.state.rawValue,
                    condition: Condition(rawValue: record.state.rawValue) ?? .unknown)
                if let stack = decodeStack(record.stack) {
                    switch record.state {
                    case .live where run.state == .merging:
                        volume.status = "not rolled back"
                        volume.condition = .notRolledBack
                        volume.detail =
                            "\(record.volume) holds the upgraded data and its snapshot is live: its merge did not start while the other volumes of run \(run.id!) merge back; run `guard recover`, which rolls it back"
                    case .live:
                        if let status = try? engine.health(stack).status {
                            volume.status = status.usage == nil ? "\(status)" : "live"
                            volume.condition = status.usage == nil ? .invalid : .live
                            volume.usedBytes = status.usage?.allocatedBytes
                            if stack.thin == nil, let used = status.usage?.allocatedBytes, let atEnd = record.usedAtEndBytes {
                                volume.changedSinceEndBytes = used > UInt64(max(atEnd, 0)) ? used - UInt64(max(atEnd, 0)) : 0
                            }
                            volume.sizeBytes = status.usage == nil ? nil : stack.budgetBytes  // the size, without the fuse reserve
                            if let thin = stack.thin, let pool = try? dm.thinPoolStatus(thin.poolRef) {
                                volume.detail =
                                    "thin snapshot \(thin.snapshotID) in \(stack.storage.path): pool data \(Int((pool.dataFill * 100).rounded()))% used, metadata \(Int((pool.metadataFill * 100).rounded()))%"
                            }
                            if status.usage != nil, (try? engine.isFused(stack)) == true {
                                volume.status = "fused"
                                volume.condition = .fused
                                volume.detail =
                                    "\(record.volume) refuses writes (guard's fuse kept its snapshot valid): `guard rollback \(run.id!)` merges it back, `guard commit \(run.id!)` keeps the volume as it is and lifts the fuse"
                            }
                        } else if case let evidence = engine.evidence(stack), evidence.mustKeep {
                            volume.status = "needs reassembly"
                            volume.condition = .needsReassembly
                            volume.detail = evidence.reason
                        } else {
                            volume.status = "missing (run `guard recover`)"
                            volume.condition = .missing
                        }
                    case .merging:
                        switch try? engine.mergeState(stack) {
                        case .merging(let left, _)?:
                            let start = max(UInt64(record.peakUsedBytes / 512), left, 1)
                            volume.mergeProgress = 1 - Double(left) / Double(start)
                            volume.remainingBytes = left * 512
                            volume.status = "merging"
                            volume.condition = .merging
                        case .complete?, .finished?:
                            volume.status = "merged"
                            volume.condition = .merged
                            volume.mergeProgress = 1
                        case .failed(let status)?:
                            volume.status = "merge failed (\(status))"
                            volume.condition = .mergeFailed
                        case .needsReassembly(let why)?:
                            volume.status = "needs reassembly"
                            volume.condition = .needsReassembly
                            volume.detail = why
                        case nil:
                            volume.status = "unknown (run `guard recover`)"
                            volume.condition = .unknown
                        }
                    default: break
                    }
                }
                volumes.append(volume)
            }
            result.append(
                RunStatus(
                    run: run, volumes: volumes, unfinished: unfinished.contains(run.id!) && run.state == .running,
                    pendingAtBoot: try pendingAtBoot(run, journal: journal),
                    staleReason: run.state == .stale ? OriginWatch.recorded(journal, runID: run.id!) : nil))
        }
        let open = Set(try journal.runs(in: RunState.open).map(\.token))
        let devices = try layerDevices(open: open) { try journal.allTokens() }
        return (result, devices.strays, devices.unknown)
    }

    /// What the next boot will do to `run`, in words, or nil: a rollback journaled for it (only
    /// such a rollback is ever carried out at a boot), or the boot assessment's next count.
    func pendingAtBoot(_ run: RunRecord, journal: Journal) throws -> String? {
        guard run.state == .kept else { return nil }
        let id = run.id!
        let events = try journal.events(runID: id)
        if run.decision == .rollback, let scheduled = events.last(where: { $0.kind == .intent && $0.action == JournalEvents.rollbackAtBoot }) {
            return
                "rollback at the next boot (journaled \(formatDate(scheduled.at)): \(scheduled.detail ?? "")): the initramfs merges the snapshots back before it mounts the volumes; `guard commit \(id)` cancels it"
        }
        if run.decision == .keep, events.contains(where: { $0.action == BootAssessment.pendingEvent }),
            !events.contains(where: { $0.action == BootAssessment.assessedEvent })
        {
            let boots = events.filter { $0.action == BootAssessment.attemptEvent }.count
            return "boot assessment: the next boot is counted (\(boots) so far) and guard-assess.service runs the verify_after_boot checks once the system is up"
        }
        return nil
    }

    /// GUARD- layers in the kernel that belong to no open run: those of runs the journal knows
    /// (strays), and those of runs it does not know (unknown), each as "name (uuid)". `known`
    /// (every token the journal has) is read only when there is such a layer.
    func layerDevices(open: Set<String>, known: () throws -> Set<String>) throws -> (strays: [String], unknown: [String]) {
        guard DeviceMapper.isAvailable else { return ([], []) }
        let layers = try context.dm().guardDevices().compactMap { device -> (DeviceSummary, String)? in
            guard let (identity, _) = StackIdentity.parse(uuid: device.uuid), !open.contains(identity.runToken) else { return nil }
            return (device, identity.runToken)
        }
        guard !layers.isEmpty else { return ([], []) }
        let tokens = try known()
        var strays: [String] = []
        var unknown: [String] = []
        for (device, token) in layers {
            if tokens.contains(token) { strays.append("\(device.name) (\(device.uuid))") } else { unknown.append("\(device.name) (\(device.uuid))") }
        }
        return (strays, unknown)
    }

    /// `guard status --wait`: finishes every merge, waiting for the kernel.
    public func waitForAllMerges() async throws {
        let journal = try context.journal()
        let engine = try context.engine()
        for run in try journal.runs(in: [.merging]) {
            let records = try journal.snapshots(runID: run.id!)
            let locks = try lock(records, runID: run.id!)
            defer { locks.forEach { $0.release() } }
            try await waitForMerges(runID: run.id!, journal: journal, engine: engine)
        }
    }
}
