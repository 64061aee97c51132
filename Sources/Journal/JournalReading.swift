import Foundation
import GRDB

#if canImport(Glibc)
import Glibc
#endif

extension Journal {
    // MARK: Reading

    /// A run by its number or token.
    public func run(_ reference: String) throws -> RunRecord? {
        try read { db in
            // A token can be all digits: an exact token match wins over a run number.
            if let run = try RunRecord.filter(RunRecord.Columns.token == reference.lowercased()).fetchOne(db) { return run }
            if let id = Int64(reference) { return try RunRecord.fetchOne(db, key: id) }
            return nil
        }
    }

    public func run(id: Int64) throws -> RunRecord? {
        try read { db in try RunRecord.fetchOne(db, key: id) }
    }

    public func runs(in states: [RunState]) throws -> [RunRecord] {
        try read { db in
            try RunRecord.filter(states.contains(RunRecord.Columns.state)).order(RunRecord.Columns.id).fetchAll(db)
        }
    }

    /// What `guard metrics` counts, from rows that are only ever added: each number can only
    /// grow as long as the journal lives (Prometheus reads a counter that drops as a reset).
    public struct Tallies: Sendable, Equatable {
        /// Every run ever journaled.
        public var started = 0
        /// Runs whose `guard run` reached its end, by how it ended then (its `done` phase:
        /// committed, kept, rolled_back, failed); a later commit or rollback of a kept run does
        /// not move it.
        public var ended: [String: Int] = [:]
        /// Runs with nothing left to do, by their final outcome; a run enters once and stays.
        public var finished: [RunOutcome: Int] = [:]
        /// Per recipe: the newest run's end and its length, and the end of its newest run that
        /// applied the upgrade (committed or kept).
        public var recipes: [String: RecipeTally] = [:]

        public init() {}
    }

    public struct RecipeTally: Sendable, Equatable {
        public var lastEnd: Double
        public var lastDuration: Double
        public var lastSuccess: Double?

        public init(lastEnd: Double, lastDuration: Double, lastSuccess: Double? = nil) {
            self.lastEnd = lastEnd
            self.lastDuration = lastDuration
            self.lastSuccess = lastSuccess
        }
    }

    public func tallies() throws -> Tallies {
        try read { db in
            var tallies = Tallies()
            tallies.started = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM runs") ?? 0
            for row in try Row.fetchAll(
                db, sql: "SELECT outcome, COUNT(*) AS n FROM runs WHERE state = ? AND outcome IS NOT NULL GROUP BY outcome",
                arguments: [RunState.finished.rawValue])
            {
                if let outcome = RunOutcome(rawValue: row["outcome"]) { tallies.finished[outcome] = row["n"] }
            }
            // The first `done` phase of each run: the run's own end (one per run; MIN for safety).
            let ends = try Row.fetchAll(
                db,
                sql: """
                    SELECT r.recipe_name AS recipe, r.started_at AS started, p.started_at AS ended, p.detail AS how
                    FROM runs r JOIN phases p ON p.id = (SELECT MIN(id) FROM phases WHERE run_id = r.id AND name = 'done')
                    ORDER BY r.id
                    """)
            for row in ends {
                let how: String = row["how"] ?? "unknown"
                tallies.ended[how, default: 0] += 1
                let recipe: String = row["recipe"]
                let started: Double = row["started"]
                let ended: Double = row["ended"]
                var tally = tallies.recipes[recipe] ?? RecipeTally(lastEnd: ended, lastDuration: 0)
                tally.lastEnd = ended
                tally.lastDuration = max(0, ended - started)
                if how == RunOutcome.committed.rawValue || how == RunOutcome.kept.rawValue { tally.lastSuccess = ended }
                tallies.recipes[recipe] = tally
            }
            return tallies
        }
    }

    /// The newest run, if any.
    public func lastRun() throws -> RunRecord? {
        try read { db in try RunRecord.order(RunRecord.Columns.id.desc).fetchOne(db) }
    }

    public func snapshots(runID: Int64) throws -> [SnapshotRecord] {
        try read { db in
            try SnapshotRecord.filter(SnapshotRecord.Columns.runID == runID).order(Column("volume_index")).fetchAll(db)
        }
    }

    public func phases(runID: Int64) throws -> [PhaseRecord] {
        try read { db in try PhaseRecord.filter(PhaseRecord.Columns.runID == runID).order(Column("id")).fetchAll(db) }
    }

    public func steps(runID: Int64) throws -> [StepRecord] {
        try read { db in try StepRecord.filter(StepRecord.Columns.runID == runID).order(Column("id")).fetchAll(db) }
    }

    public func events(runID: Int64) throws -> [EventRecord] {
        try read { db in try EventRecord.filter(EventRecord.Columns.runID == runID).order(Column("id")).fetchAll(db) }
    }

    public func insert(_ restore: RestoreRecord) throws -> RestoreRecord {
        try write { db in
            var restore = restore
            try restore.insert(db)
            return restore
        }
    }

    public func update(_ restore: RestoreRecord) throws {
        try write { db in try restore.update(db) }
    }

    public func restores(runID: Int64) throws -> [RestoreRecord] {
        try read { db in try RestoreRecord.filter(RestoreRecord.Columns.runID == runID).order(Column("id")).fetchAll(db) }
    }

    public func samples(snapshotID: Int64) throws -> [CowSampleRecord] {
        try read { db in
            try CowSampleRecord.filter(CowSampleRecord.Columns.snapshotID == snapshotID).order(Column("at")).fetchAll(db)
        }
    }

    /// Every run token the journal has.
    public func allTokens() throws -> Set<String> {
        try read { db in Set(try String.fetchAll(db, sql: "SELECT token FROM runs")) }
    }

    /// The peak COW use of earlier runs of `recipe`, per volume index (for `size: auto`).
    public func peakUse(recipe: String) throws -> [Int: PeakUse] {
        try read { db in
            let rows = try Row.fetchAll(
                db,
                sql: """
                    SELECT snapshots.volume_index AS volume_index, MAX(snapshots.peak_used_bytes) AS peak,
                           COUNT(DISTINCT runs.id) AS runs
                    FROM snapshots JOIN runs ON runs.id = snapshots.run_id
                    WHERE runs.recipe_name = ? AND snapshots.peak_used_bytes > 0
                    GROUP BY snapshots.volume_index
                    """, arguments: [recipe])
            return Dictionary(uniqueKeysWithValues: rows.map { (Int($0["volume_index"] as Int64), PeakUse(peakBytes: $0["peak"], runs: $0["runs"])) })
        }
    }
}
