import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// Finds the guarded origins whose table another tool replaced (lvm2's `lvextend`,
/// `lvchange --refresh`, `pvmove`, `lvconvert`, `vgchange -an` then `-ay`, an lvm2 snapshot,
/// `dmsetup reload`), and makes what it saw durable at once: the COW label says `stale` first
/// (a reboot may bring the origin back with the very table and size the label recorded, and
/// nothing would tell then), then the journal (an `origin-bypassed` event with what was seen
/// and when, the run `stale`), then the system log. Such a snapshot is never merged,
/// reassembled, diffed or restored from again; `guard commit` releases it.
///
/// Every command that reads a run asks it first (status, rollback, commit, diff, restore,
/// recover, assess, metrics); `guard monitor` asks every second; the COW watcher of a run asks
/// at each reading.
struct OriginWatch {
    let context: GuardContext
    let journal: Journal
    let engine: SnapshotEngine
    var reporter: any Reporter { context.reporter }

    /// One bypassed origin, as recorded.
    struct Finding: Sendable {
        var runID: Int64
        var volume: String
        var bypass: OriginBypass
        /// What the journal and the system log say.
        var text: String
    }

    /// Checks the live snapshots of every kept or unfinished run; records each bypass found.
    /// A run whose volumes another guard command holds is left to that command (its own table
    /// changes look like a bypass for an instant).
    @discardableResult
    func sweep(where include: (RunRecord) -> Bool = { _ in true }) throws -> [Finding] {
        var findings: [Finding] = []
        for run in try journal.runs(in: [.kept, .running, .needsReassembly]) where include(run) {
            findings += try check(run, holdingLocks: false)
        }
        return findings
    }

    /// Checks one run's live snapshots. With `holdingLocks`, the caller holds the run's volume
    /// locks already (a `guard rollback`, `commit`, `diff` or `restore` of it).
    @discardableResult
    func check(_ run: RunRecord, holdingLocks: Bool) throws -> [Finding] {
        let runID = run.id!
        // A commit guard decided puts the origin back on its own table itself: a guard that
        // stopped in its middle leaves what looks like a bypass, which recovery finishes.
        guard run.decision != .commit else { return [] }
        let records = try journal.snapshots(runID: runID)
        let suspects = records.filter { record in
            guard record.state == .live, let stack = decodeStack(record.stack) else { return false }
            if case .bypassed? = try? engine.routing(stack) { return !Self.released(stack) }
            return false
        }
        guard !suspects.isEmpty else { return [] }
        var locks: [VolumeLock] = []
        if !holdingLocks {
            guard let taken = try? Maintenance(context: context).lock(records, runID: runID) else { return [] }
            locks = taken
        }
        defer { locks.forEach { $0.release() } }
        var findings: [Finding] = []
        for record in suspects {
            // Again under the lock: a commit or rollback that just ended changed the table itself.
            guard try journal.run(id: runID)?.decision != .commit,
                let current = try journal.snapshots(runID: runID).first(where: { $0.volumeIndex == record.volumeIndex }), current.state == .live,
                let stack = decodeStack(current.stack), case .bypassed(let bypass) = try engine.routing(stack), !Self.released(stack)
            else { continue }
            if let finding = try recordBypass(runID: runID, record: current, stack: stack, bypass: bypass) { findings.append(finding) }
        }
        return findings
    }

    /// Whether guard itself gave the snapshot up (its label says released: written before a
    /// commit or a merge's end puts the origin's own table back).
    static func released(_ stack: SnapshotStack) -> Bool {
        guard stack.thin == nil, let label = try? CowLabel.read(from: stack.storage.path), label.identity == stack.identity else { return false }
        return label.state == .released
    }

    /// Records one bypass: label, journal, system log, in that order. The caller holds the
    /// volume's lock (or is the run itself).
    /// - Returns: nil when it is guard's own doing (a commit decided, a label released).
    @discardableResult
    func recordBypass(runID: Int64, record: SnapshotRecord, stack: SnapshotStack, bypass: OriginBypass) throws -> Finding? {
        guard try journal.run(id: runID)?.decision != .commit, !Self.released(stack) else { return nil }
        let text = Self.describe(runID: runID, volume: record.volume, bypass: bypass, at: context.now().timeIntervalSince1970)
        try engine.markStale(stack)
        try journal.batch {
            try journal.event(runID, .error, JournalEvents.originBypassed, text, at: context.now().timeIntervalSince1970)
            guard var run = try journal.run(id: runID), run.state != .stale else { return }
            // A run still running (its own COW watcher found it) ends stale when it decides.
            if run.state != .running {
                run.state = .stale
                try journal.update(run)
            }
        }
        reporter.event(.snapshotBypassed, text)
        return Finding(runID: runID, volume: record.volume, bypass: bypass, text: text)
    }

    /// The sentence for the journal, the log and `guard status`.
    static func describe(runID: Int64, volume: String, bypass: OriginBypass, at: Double) -> String {
        "the snapshot of \(volume) is stale since \(formatDate(at)): \(bypass); writes since then went around the snapshot, so it no longer describes the volume's past and run \(runID) cannot be rolled back, diffed or restored from; `guard commit \(runID)` releases the snapshot (the volume keeps its current data)"
    }

    /// The newest bypass the journal holds for a run, in words, or nil.
    static func recorded(_ journal: Journal, runID: Int64) -> String? {
        (try? journal.events(runID: runID))?.last { $0.action == JournalEvents.originBypassed }?.detail
    }
}
