import Foundation
import GRDB
import Testing

@testable import Journal

func temporaryDirectory() throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("guard-journal-\(UInt32.random(in: 0...UInt32.max))").path
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// A finished run with one snapshot, as guard run writes it.
@discardableResult
func addRun(_ journal: Journal, recipe: String = "website", outcome: RunOutcome = .committed, peak: Int64 = 3 << 20, startedAt: Double = 1_700_000_000) throws -> RunRecord {
    var run = try journal.insert(
        RunRecord(
            token: String(format: "%08x", UInt32.random(in: 0...UInt32.max)), recipeName: recipe, recipePath: "/etc/guard/\(recipe).recipe", recipeSHA256: "abc",
            recipeText: "name: \(recipe)", host: "web1", user: "alice", pid: 42, startedAt: startedAt))
    let phase = try journal.beginPhase(run.id!, "steps", at: startedAt + 1)
    try journal.endPhase(phase, status: .done, at: startedAt + 2)
    var snapshot = try journal.insert(
        SnapshotRecord(
            runID: run.id!, volumeIndex: 0, volume: "/dev/mapper/vg-\(recipe)", mountPoint: "/srv/\(recipe)", originName: "vg-\(recipe)",
            originUUID: "LVM-1", originDevice: "254:0", originTable: "0 204800 linear 7:0 2048", originBytes: 100 << 20,
            cowPath: "/var/lib/guard/cow/x-0.cow", cowKind: "file", sizeBytes: 25 << 20, chunkBytes: 4096, state: .committed, stack: "{}"))
    snapshot.peakUsedBytes = peak
    try journal.update(snapshot)
    try journal.addSamples([
        CowSampleRecord(snapshotID: snapshot.id!, at: 1, usedBytes: peak / 2, sizeBytes: 25 << 20),
        CowSampleRecord(snapshotID: snapshot.id!, at: 3, usedBytes: peak, sizeBytes: 25 << 20),
    ])
    var step = try journal.insert(StepRecord(runID: run.id!, kind: "step", position: 0, name: "migrate", argv: ["/bin/sh", "-c", "x"], startedAt: startedAt + 1))
    step.exitCode = 0
    step.termination = "exit 0"
    try journal.update(step)
    try journal.event(run.id!, .intent, "commit", nil, at: startedAt + 3)
    run.outcome = outcome
    run.state = .finished
    run.exitCode = outcome == .rolledBack ? 1 : 0
    run.finishedAt = startedAt + 4
    run.suspendMicroseconds = 850
    try journal.update(run)
    return run
}

@Suite("journal")
struct JournalTests {
    @Test("metrics tallies only grow: a kept run stays counted as ended kept when it is committed, and enters the finished count once")
    func talliesOnlyGrow() throws {
        let journal = try Journal.open(path: "\(try temporaryDirectory())/journal.sqlite", check: true)
        #expect(try journal.tallies() == Journal.Tallies())
        try addRun(journal, recipe: "website", outcome: .rolledBack, startedAt: 1_700_000_000)
        // addRun writes no `done` phase (guard run writes one as it ends): give this one its end.
        try journal.endPhase(try journal.beginPhase(1, "done", at: 1_700_000_004), status: .done, detail: "rolled_back", at: 1_700_000_004)
        var kept = try journal.insert(
            RunRecord(token: "k", recipeName: "website", recipePath: "/r", recipeSHA256: "", recipeText: "", host: "h", user: "root", pid: 1, startedAt: 1_700_000_100))
        kept.state = .kept
        kept.outcome = .kept
        try journal.update(kept)
        try journal.endPhase(try journal.beginPhase(kept.id!, "done", at: 1_700_000_130), status: .done, detail: "kept", at: 1_700_000_130)
        let before = try journal.tallies()
        #expect(before.started == 2 && before.ended == ["rolled_back": 1, "kept": 1] && before.finished == [.rolledBack: 1], "\(before)")
        #expect(before.recipes["website"] == Journal.RecipeTally(lastEnd: 1_700_000_130, lastDuration: 30, lastSuccess: 1_700_000_130))
        // Committed days later (guard commit): the run's own end does not move.
        kept.state = .finished
        kept.outcome = .committed
        kept.finishedAt = 1_700_900_000
        try journal.update(kept)
        let after = try journal.tallies()
        #expect(after.ended == before.ended && after.started == before.started, "\(after)")
        #expect(after.finished == [.rolledBack: 1, .committed: 1], "\(after)")
        #expect(after.recipes == before.recipes, "the run's length is its guard run's, not its keep time")
    }

    @Test("the journal file is root-only, in WAL mode with synchronous FULL, and migrates once")
    func fileModes() throws {
        let directory = try temporaryDirectory()
        let path = "\(directory)/state/journal.sqlite"
        let journal = try Journal.open(path: path, check: true)
        try addRun(journal)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        let directoryAttributes = try FileManager.default.attributesOfItem(atPath: "\(directory)/state")
        #expect((directoryAttributes[.posixPermissions] as? NSNumber)?.intValue == 0o700)
        let (mode, synchronous, migrations) = try journal.read { db in
            (
                try String.fetchOne(db, sql: "PRAGMA journal_mode"), try Int.fetchOne(db, sql: "PRAGMA synchronous"),
                try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM grdb_migrations")
            )
        }
        #expect(mode == "wal")
        #expect(synchronous == 2, "FULL")
        #expect(migrations == 5, "v1, v2 restores, v3 closed sets, v4 verify_after_boot steps, v5 COW use at the run's end")
        let reopened = try Journal.open(path: path, check: true)
        #expect(try reopened.history(limit: 10).count == 1, "reopening keeps the data and migrates nothing twice")
    }

    @Test("opening a journal and reading it writes nothing: no transaction, no fsync before the command's first write")
    func openingWritesNothing() throws {
        let directory = try temporaryDirectory()
        let path = "\(directory)/state/journal.sqlite"
        do {
            let journal = try Journal.open(path: path, check: true)
            try addRun(journal)
        }
        // The last connection closed: SQLite checkpointed the WAL into the file and removed it.
        #expect(!FileManager.default.fileExists(atPath: path + "-wal"))
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let reopened = try Journal.open(path: path, check: true)
        #expect(try reopened.history(limit: 10).count == 1)
        let wal = try FileManager.default.attributesOfItem(atPath: path + "-wal")
        #expect((wal[.size] as? NSNumber)?.intValue == 0, "no frame was written to the WAL")
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
        let mode = try reopened.read { db in try String.fetchOne(db, sql: "PRAGMA journal_mode") }
        #expect(mode == "wal")
    }

    @Test("history: newest first, with snapshots, limit and recipe filter")
    func history() throws {
        let journal = try Journal.inMemory()
        try addRun(journal, recipe: "website", outcome: .rolledBack, startedAt: 1)
        try addRun(journal, recipe: "nginx", outcome: .committed, startedAt: 2)
        try addRun(journal, recipe: "website", outcome: .committed, peak: 9 << 20, startedAt: 3)
        let all = try journal.history(limit: 10)
        #expect(all.map(\.recipe) == ["website", "nginx", "website"])
        #expect(all[0].volumes.count == 1)
        #expect(all[0].volumes[0].peakUsedBytes == 9 << 20)
        #expect(all[0].volumes[0].sizeBytes == 25 << 20)
        #expect(all[0].suspendMicroseconds == 850)
        #expect(all[2].outcome == .rolledBack)
        #expect(try journal.history(limit: 1).count == 1)
        let websites = try journal.history(limit: 10, recipe: "website")
        #expect(websites.count == 2 && websites.allSatisfy { $0.recipe == "website" && $0.volumes.count == 1 })
        #expect(try journal.peakUse(recipe: "website") == [0: PeakUse(peakBytes: 9 << 20, runs: 2)])
        try addRun(journal, recipe: "website", outcome: .committed, peak: 5 << 20, startedAt: 4)
        #expect(try journal.peakUse(recipe: "website") == [0: PeakUse(peakBytes: 9 << 20, runs: 3)], "the largest peak, counted over the runs that measured one")
        #expect(try journal.peakUse(recipe: "none").isEmpty)
    }

    @Test("a run is found by number or token; its phases, steps, samples and events come back in order")
    func lookUp() throws {
        let journal = try Journal.inMemory()
        let run = try addRun(journal)
        #expect(try journal.run("\(run.id!)")?.token == run.token)
        #expect(try journal.run(run.token)?.id == run.id)
        #expect(try journal.run("nope") == nil)
        #expect(try journal.phases(runID: run.id!).map(\.name) == ["steps"])
        #expect(try journal.steps(runID: run.id!).first?.arguments == ["/bin/sh", "-c", "x"])
        let snapshot = try #require(try journal.snapshots(runID: run.id!).first)
        #expect(try journal.samples(snapshotID: snapshot.id!).map(\.at) == [1, 3])
        #expect(try journal.events(runID: run.id!).map(\.action) == ["commit"])
        #expect(try journal.runs(in: [.finished]).count == 1)
        #expect(try journal.runs(in: [.running, .kept]).isEmpty)
    }

    @Test("a corrupt journal is refused with what to do")
    func corrupt() throws {
        let directory = try temporaryDirectory()
        let path = "\(directory)/journal.sqlite"
        try Data(repeating: 0x42, count: 8192).write(to: URL(fileURLWithPath: path))
        do {
            _ = try Journal.open(path: path, check: true)
            Issue.record("a corrupt journal must be refused")
        } catch let error as JournalError {
            #expect(error.description.contains("corrupt"), "\(error)")
            #expect(error.description.contains(path))
        }
    }

    @Test("history of 100,000 runs reads only what it shows")
    func bigHistory() throws {
        let journal = try Journal.inMemory()
        try journal.write { db in
            for index in 0..<100_000 {
                try db.execute(
                    sql:
                        "INSERT INTO runs (token, recipe_name, recipe_path, recipe_sha256, recipe_text, host, user, pid, started_at, phase, state, outcome) VALUES (?, ?, '/r', 'x', 'name: x', 'h', 'u', 1, ?, 'done', 'finished', 'committed')",
                    arguments: [String(format: "%08x", index), index % 2 == 0 ? "a" : "b", Double(index)])
            }
        }
        let newest = try journal.history(limit: 20)
        #expect(newest.count == 20)
        #expect(newest.first?.id == 100_000)
        #expect(try journal.history(limit: 20, recipe: "a").allSatisfy { $0.recipe == "a" })
    }
}

@Test("a journal of an older guard (schema v1) is migrated on open and keeps its runs; restores are journaled")
func migratesOlderJournal() throws {
    let directory = try temporaryDirectory()
    let path = "\(directory)/journal.sqlite"
    do {
        let queue = try DatabaseQueue(path: path)
        try Schema.migrator.migrate(queue, upTo: "v1 runs, phases, steps, snapshots, samples, events")
        try queue.write { db in
            try db.execute(
                sql: """
                    INSERT INTO runs (token, recipe_name, recipe_path, recipe_sha256, recipe_text, host, user, pid, started_at, phase, state)
                    VALUES ('0badc0de', 'old', '/r', 'x', 'name: old', 'h', 'root', 1, 1.0, 'done', 'kept')
                    """)
        }
    }
    let journal = try Journal.open(path: path, check: true)
    let run = try #require(try journal.run("0badc0de"))
    #expect(run.recipeName == "old")
    var restore = try journal.insert(RestoreRecord(runID: run.id!, startedAt: 2, user: "root", paths: ["/srv/www/db"], deleteCreated: false))
    restore.status = "done"
    restore.files = 1
    restore.bytes = 42
    try journal.update(restore)
    let stored = try journal.restores(runID: run.id!)
    #expect(stored.count == 1 && stored[0].pathList == ["/srv/www/db"] && stored[0].bytes == 42 && stored[0].status == "done")
}

@Test("a journal a newer guard migrated is refused, naming the migration and what to do; the file is not changed")
func refusesNewerJournal() throws {
    let directory = try temporaryDirectory()
    let path = "\(directory)/journal.sqlite"
    _ = try Journal.open(path: path)
    do {
        let queue = try DatabaseQueue(path: path)
        try queue.write { db in try db.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v9 from the future')") }
    }
    let before = try Data(contentsOf: URL(fileURLWithPath: path))
    do {
        _ = try Journal.open(path: path, check: true)
        Issue.record("a journal migrated by a newer guard must be refused")
    } catch let error as JournalError {
        #expect(error.description.contains(path))
        #expect(error.description.contains("newer guard"), "\(error)")
        #expect(error.description.contains("'v9 from the future'"), "\(error)")
        #expect(error.description.contains("touched nothing"), "\(error)")
    }
    #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
}

/// Issue 18: writes that belong together share one transaction (one fsync).
@Suite("journal batches")
struct JournalBatchTests {
    @Test("a batch is one transaction: its writes land together, or none of them when one fails")
    func batchIsAtomic() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let journal = try Journal.open(path: "\(directory)/journal.sqlite")
        let run = try addRun(journal)
        try journal.batch {
            try journal.event(run.id!, .intent, "one")
            try journal.batch { try journal.event(run.id!, .intent, "two") }  // nested: the same transaction
        }
        #expect(try journal.events(runID: run.id!).map(\.action).suffix(2) == ["one", "two"])
        // A read inside a batch reads the batch's own transaction (GRDB's queue cannot be entered twice).
        let seen = try journal.batch {
            try journal.event(run.id!, .intent, "read-back")
            return try journal.events(runID: run.id!).map(\.action).last
        }
        #expect(seen == "read-back")

        struct Refused: Error {}
        #expect(throws: Refused.self) {
            try journal.batch {
                try journal.event(run.id!, .intent, "three")
                throw Refused()
            }
        }
        #expect(try !journal.events(runID: run.id!).map(\.action).contains("three"), "rolled back with the batch")
    }

    @Test("a write from another thread during a batch waits for it and lands after it")
    func otherThreadsWait() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let journal = try Journal.open(path: "\(directory)/journal.sqlite")
        let run = try addRun(journal)
        let id = run.id!
        let other = Thread {
            try? journal.event(id, .result, "from-another-thread")
        }
        try journal.batch {
            try journal.event(id, .intent, "first")
            other.start()
            Thread.sleep(forTimeInterval: 0.2)
            try journal.event(id, .intent, "second")
        }
        // Bounded only against a hang: a busy machine may start the thread late.
        for _ in 0..<30_000 where try !journal.events(runID: id).contains(where: { $0.action == "from-another-thread" }) {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(try journal.events(runID: id).map(\.action).suffix(3) == ["first", "second", "from-another-thread"])
    }
}

/// Issue 14: states, kinds and outcomes are closed sets in Swift (enums) and in SQLite (v3's triggers).
@Suite("journal closed sets")
struct JournalClosedSetTests {
    static func sqlite(_ journal: Journal, _ sql: String) -> String? {
        do {
            try journal.write { try $0.execute(sql: sql) }
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test("a value outside a column's set is refused on insert and update, naming the set; NULL stays allowed where it was")
    func refusesOutside() throws {
        let journal = try Journal.inMemory()
        let run = try addRun(journal)
        let id = run.id!
        let refused = [
            "UPDATE runs SET state = 'done' WHERE id = \(id)",
            "UPDATE runs SET decision = 'merge' WHERE id = \(id)",
            "UPDATE runs SET outcome = 'rolledBack' WHERE id = \(id)",
            "UPDATE phases SET status = 'ok' WHERE run_id = \(id)",
            "UPDATE steps SET kind = 'hook' WHERE run_id = \(id)",
            "UPDATE snapshots SET state = 'kept' WHERE run_id = \(id)",
            "INSERT INTO events (run_id, at, kind, action) VALUES (\(id), 1, 'intention', 'commit')",
        ]
        for sql in refused {
            let error = Self.sqlite(journal, sql)
            #expect(error?.contains("must be one of") == true, "\(sql): \(error ?? "accepted")")
        }
        #expect(Self.sqlite(journal, "UPDATE runs SET decision = NULL, outcome = NULL WHERE id = \(id)") == nil)
        #expect(Self.sqlite(journal, "UPDATE runs SET state = 'needs_reassembly' WHERE id = \(id)") == nil)
        #expect(try journal.run(id: id)?.state == .needsReassembly)
        try journal.event(id, .warning, "cow-fill", "50%")
        #expect(try journal.events(runID: id).map(\.kind) == [.intent, .warning])
    }

    @Test("the sets in the schema are the Swift enums' cases: a new case needs a new migration")
    func setsMatchEnums() throws {
        let journal = try Journal.inMemory()
        let triggers = try journal.read { try String.fetchAll($0, sql: "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%_insert'") }
        func values(_ table: String, _ column: String) -> Set<String> {
            guard let sql = triggers.first(where: { $0.contains("ON \(table)\n") && $0.contains("NEW.\(column) NOT IN") }),
                let open = sql.range(of: "NOT IN ("), let close = sql[open.upperBound...].firstIndex(of: ")")
            else { return [] }
            return Set(sql[open.upperBound..<close].split(separator: ",").map { $0.trimmingCharacters(in: CharacterSet(charactersIn: " '")) })
        }
        #expect(values("runs", "state") == Set(RunState.allCases.map(\.rawValue)))
        #expect(values("runs", "outcome") == Set(RunOutcome.allCases.map(\.rawValue)))
        #expect(values("runs", "decision") == ["commit", "keep", "rollback"])
        #expect(values("phases", "status") == Set(PhaseStatus.allCases.map(\.rawValue)))
        #expect(values("snapshots", "state") == Set(SnapshotState.allCases.map(\.rawValue)))
        #expect(values("events", "kind") == Set(EventKind.allCases.map(\.rawValue)))
        #expect(values("steps", "kind").count == 7)
        #expect(values("steps", "kind").contains("verify_after_boot"))
    }

    @Test("rows an older guard wrote are kept as they are by the migration, whatever they hold")
    func keepsOldRows() throws {
        let directory = try temporaryDirectory()
        let path = "\(directory)/journal.sqlite"
        do {
            let queue = try DatabaseQueue(path: path)
            try Schema.migrator.migrate(queue, upTo: "v2 restores")
            try queue.write { db in
                try db.execute(
                    sql: """
                        INSERT INTO runs (token, recipe_name, recipe_path, recipe_sha256, recipe_text, host, user, pid, started_at, phase, state)
                        VALUES ('0badc0de', 'old', '/r', 'x', 'name: old', 'h', 'root', 1, 1.0, 'done', 'kept');
                        INSERT INTO events (run_id, at, kind, action) VALUES (1, 1.0, 'odd', 'take');
                        """)
            }
        }
        let journal = try Journal.open(path: path, check: true)
        #expect(try journal.run("0badc0de")?.state == .kept)
        #expect(try journal.read { try String.fetchOne($0, sql: "SELECT kind FROM events") } == "odd")
    }
}
