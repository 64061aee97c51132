import Foundation
import GRDB

#if canImport(Glibc)
import Glibc
#endif

/// An error opening or writing the journal, with what to do about it.
public struct JournalError: Error, Sendable, CustomStringConvertible {
    public var path: String
    public var reason: String
    public var hint: String?
    /// Another process holds the journal (SQLite's busy or locked): trying later can work.
    public var isBusy: Bool

    public init(path: String, reason: String, hint: String? = nil, isBusy: Bool = false) {
        self.path = path
        self.reason = reason
        self.hint = hint
        self.isBusy = isBusy
    }

    /// SQLite's error, explained, with what to do.
    init(path: String, _ error: DatabaseError) {
        let busy = error.resultCode == .SQLITE_BUSY || error.resultCode == .SQLITE_LOCKED
        self.init(path: path, reason: Journal.explain(error), hint: Journal.hint(error), isBusy: busy)
    }

    public var description: String { "journal \(path): \(reason)" + (hint.map { "; \($0)" } ?? "") }
}

/// guard's SQLite journal: every run, phase, step, snapshot, COW reading and intent.
///
/// WAL with synchronous=FULL, so a write that returned survives a power loss; the file is
/// root-only (0600) in a root-only directory; a locked journal is waited for (60 s).
public final class Journal: @unchecked Sendable {
    // @unchecked: DatabaseQueue serializes every access itself; `current` (replaced only when
    // the file was deleted under guard) is read and swapped under `lock`.
    public let path: String
    private let lock = NSLock()
    private var current: DatabaseQueue
    private var inode: UInt64
    /// Told when the journal file was deleted or replaced under a running guard and rebuilt.
    public var onRebuilt: (@Sendable (String) -> Void)?

    var queue: DatabaseQueue {
        lock.lock()
        defer { lock.unlock() }
        return current
    }

    /// Opens (creating it if needed) the journal at `path` and migrates it.
    ///
    /// A journal a newer guard migrated (it has migrations this guard does not know) is
    /// refused: this guard could misread its runs or write rows the newer one does not expect.
    /// That happens when guard is downgraded, or when a run of / that upgraded guard is rolled
    /// back while the journal lives on another filesystem. Recovery then works from the COW
    /// labels alone, as it does with a journal it cannot open.
    ///
    /// - Parameter check: run SQLite's quick_check first (before a run touches a volume).
    /// - Throws: `JournalError` when the file is corrupt, unreadable, on a read-only/full
    ///   filesystem, or migrated by a newer guard.
    public static func open(path: String, check: Bool = false, readOnly: Bool = false) throws -> Journal {
        let directory = (path as NSString).deletingLastPathComponent
        do {
            if !readOnly {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
                if !FileManager.default.fileExists(atPath: path) {
                    guard FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600]) else {
                        throw JournalError(path: path, reason: "cannot create it", hint: "check that \(directory) is writable and not full")
                    }
                }
            } else if !FileManager.default.fileExists(atPath: path) {
                throw JournalError(path: path, reason: "does not exist (no run has been journaled here)", hint: "check --state-dir")
            }
            let queue = try DatabaseQueue(path: path, configuration: Self.configuration())
            if check {
                let result = try queue.read { db in try String.fetchOne(db, sql: "PRAGMA quick_check") }
                if result != "ok" {
                    throw JournalError(
                        path: path, reason: "is corrupt (quick_check: \(result ?? "?"))",
                        hint: "move it aside and run `guard recover`, which rebuilds what it can from the COW labels")
                }
            }
            let newer = try queue.read { db in try Schema.unknownMigrations(db) }
            if !newer.isEmpty {
                throw JournalError(
                    path: path,
                    reason:
                        "was migrated by a newer guard (it has the schema change\(newer.count == 1 ? "" : "s") \(newer.map { "'\($0)'" }.joined(separator: ", ")), which this guard does not know)",
                    hint:
                        "use the guard that migrated it (install the newer guard again; `guard --version` shows this one); this guard would misread its runs, so it touched nothing"
                )
            }
            if !readOnly {
                try Schema.migrator.migrate(queue)
            }
            return Journal(path: path, queue: queue)
        } catch let error as JournalError {
            throw error
        } catch let error as DatabaseError {
            throw JournalError(path: path, error)
        } catch {
            throw JournalError(path: path, reason: "\(error)")
        }
    }

    /// A journal in memory, for tests.
    public static func inMemory() throws -> Journal {
        let queue = try DatabaseQueue()
        try Schema.migrator.migrate(queue)
        return Journal(path: ":memory:", queue: queue)
    }

    init(path: String, queue: DatabaseQueue) {
        self.path = path
        self.current = queue
        self.inode = Self.inode(of: path) ?? 0
    }

    /// The connection's settings: WAL with synchronous=FULL, so a write that returned survives
    /// a power loss; a locked journal is waited for (60 s).
    ///
    /// WAL is set here, not with GRDB's `journalMode = .wal`: that one also writes a table
    /// and drops it whenever the `-wal` file is absent (for its DatabasePool readers), so every
    /// guard command would begin with a write transaction and two fsyncs. The journal has one
    /// connection, a `DatabaseQueue`, and the mode is stored in the file.
    static func configuration() -> Configuration {
        var configuration = Configuration()
        configuration.busyMode = .timeout(60)
        configuration.prepareDatabase { db in
            let mode = try String.fetchOne(db, sql: "PRAGMA journal_mode = WAL")
            guard mode == "wal" else {
                throw DatabaseError(message: "could not switch the journal to WAL mode (it is \(mode ?? "?"))")
            }
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        return configuration
    }

    /// The file's inode number (a stat: no user or group lookups).
    static func inode(of path: String) -> UInt64? {
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        return UInt64(status.st_ino)
    }

    /// If the journal file was deleted (or replaced) while guard has it open, writes the
    /// open database to a new file at `path`, so nothing of the run is lost, and carries
    /// on with that one.
    /// - Returns: whether it had to.
    @discardableResult
    public func rebuildIfDeleted() throws -> Bool {
        guard path != ":memory:", Self.inode(of: path) != inode else { return false }
        let directory = (path as NSString).deletingLastPathComponent
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        if FileManager.default.fileExists(atPath: path) {
            try? FileManager.default.moveItem(atPath: path, toPath: path + ".replaced-\(Int(Date().timeIntervalSince1970))")
        }
        guard FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600]) else {
            throw JournalError(path: path, reason: "was deleted and cannot be created again")
        }
        do {
            let fresh = try DatabaseQueue(path: path, configuration: Self.configuration())
            try queue.backup(to: fresh)
            lock.lock()
            current = fresh
            inode = Self.inode(of: path) ?? 0
            lock.unlock()
        } catch let error as DatabaseError {
            throw JournalError(path: path, error)
        }
        onRebuilt?("the journal \(path) was deleted while guard was using it; guard wrote it again from its open copy")
        return true
    }

    static func explain(_ error: DatabaseError) -> String {
        switch error.resultCode {
        case .SQLITE_CORRUPT, .SQLITE_NOTADB: return "is corrupt or not a guard journal (\(error.message ?? ""))"
        case .SQLITE_FULL: return "its filesystem is full"
        case .SQLITE_READONLY: return "is read-only"
        case .SQLITE_BUSY, .SQLITE_LOCKED: return "is locked by another process"
        case .SQLITE_CANTOPEN: return "cannot be opened (\(error.message ?? ""))"
        case .SQLITE_IOERR: return "I/O error (\(error.message ?? ""))"
        default: return error.message ?? "\(error)"
        }
    }

    static func hint(_ error: DatabaseError) -> String? {
        switch error.resultCode {
        case .SQLITE_CORRUPT, .SQLITE_NOTADB: return "move it aside and run `guard recover`"
        case .SQLITE_FULL: return "free space on the state directory's filesystem"
        case .SQLITE_BUSY, .SQLITE_LOCKED: return "wait for the other guard command, or find it with `fuser`"
        default: return nil
        }
    }

    /// Runs `body` in one write transaction; SQLite errors become `JournalError`s. Inside a
    /// `batch` on the same thread, it joins the batch's transaction.
    @discardableResult
    public func write<T>(_ body: (Database) throws -> T) throws -> T {
        if let db = batchDatabase() { return try body(db) }
        do {
            return try queue.write(body)
        } catch let error as DatabaseError {
            throw JournalError(path: path, error)
        }
    }

    /// The transaction of the batch running on this thread, if any.
    private var batchTransaction: (thread: pthread_t, db: Database)?

    private func batchDatabase() -> Database? {
        lock.lock()
        defer { lock.unlock() }
        guard let batchTransaction, pthread_equal(batchTransaction.thread, pthread_self()) != 0 else { return nil }
        return batchTransaction.db
    }

    /// Runs `body` with every journal write inside it in one transaction, made durable by one
    /// fsync: for records that belong together with no kernel action between them (a run's row,
    /// its first phase and its snapshots; the end of one phase and the start of the next). If
    /// any write fails, none of them is kept and the error is thrown. Writes from other
    /// threads (the COW watcher's) wait for it.
    @discardableResult
    public func batch<T>(_ body: () throws -> T) throws -> T {
        if batchDatabase() != nil { return try body() }
        try rebuildIfDeleted()
        return try write { db in
            lock.lock()
            batchTransaction = (pthread_self(), db)
            lock.unlock()
            defer {
                lock.lock()
                batchTransaction = nil
                lock.unlock()
            }
            return try body()
        }
    }

    /// Runs `body` with a reading connection; inside a `batch` on the same thread it reads in
    /// the batch's transaction (what the batch wrote so far included), as GRDB's queue cannot be
    /// entered twice.
    public func read<T>(_ body: (Database) throws -> T) throws -> T {
        if let db = batchDatabase() { return try body(db) }
        do {
            return try queue.read(body)
        } catch let error as DatabaseError {
            throw JournalError(path: path, error)
        }
    }

    // MARK: Writing a run

    public func insert(_ run: RunRecord) throws -> RunRecord {
        try write { db in
            var run = run
            try run.insert(db)
            return run
        }
    }

    public func update(_ run: RunRecord) throws {
        try write { db in try run.update(db) }
    }

    /// Records an intent (before touching the kernel), a result (after), a note or an error.
    public func event(_ runID: Int64, _ kind: EventKind, _ action: String, _ detail: String? = nil, at: Double = Date().timeIntervalSince1970) throws {
        try write { db in
            var event = EventRecord(runID: runID, at: at, kind: kind, action: action, detail: detail)
            try event.insert(db)
        }
    }

    public func beginPhase(_ runID: Int64, _ name: String, at: Double = Date().timeIntervalSince1970) throws -> PhaseRecord {
        if batchDatabase() == nil { try rebuildIfDeleted() }  // a batch checked when it began
        return try write { db in
            var phase = PhaseRecord(runID: runID, name: name, startedAt: at)
            try phase.insert(db)
            try db.execute(sql: "UPDATE runs SET phase = ? WHERE id = ?", arguments: [name, runID])
            return phase
        }
    }

    public func endPhase(_ phase: PhaseRecord, status: PhaseStatus, detail: String? = nil, at: Double = Date().timeIntervalSince1970) throws {
        try write { db in
            var phase = phase
            phase.finishedAt = at
            phase.status = status
            phase.detail = detail
            try phase.update(db)
        }
    }

    public func insert(_ step: StepRecord) throws -> StepRecord {
        try write { db in
            var step = step
            try step.insert(db)
            return step
        }
    }

    public func update(_ step: StepRecord) throws {
        try write { db in try step.update(db) }
    }

    public func insert(_ snapshot: SnapshotRecord) throws -> SnapshotRecord {
        try write { db in
            var snapshot = snapshot
            try snapshot.insert(db)
            return snapshot
        }
    }

    public func update(_ snapshot: SnapshotRecord) throws {
        try write { db in try snapshot.update(db) }
    }

    public func setSnapshotState(runID: Int64, _ state: SnapshotState) throws {
        try write { db in
            try db.execute(sql: "UPDATE snapshots SET state = ? WHERE run_id = ?", arguments: [state, runID])
        }
    }

    public func addSamples(_ samples: [CowSampleRecord]) throws {
        guard !samples.isEmpty else { return }
        try write { db in
            for var sample in samples { try sample.insert(db) }
        }
    }
}

/// The most COW space earlier runs of a recipe used on one of its volumes.
public struct PeakUse: Sendable, Hashable {
    public var peakBytes: Int64
    /// How many runs measured it.
    public var runs: Int

    public init(peakBytes: Int64, runs: Int) {
        self.peakBytes = peakBytes
        self.runs = runs
    }
}

/// One line of `guard history`: a run with its snapshots, without the recipe text.
public struct RunSummary: Sendable, Hashable {
    public struct Volume: Sendable, Hashable {
        public var volume: String
        public var sizeBytes: Int64
        public var peakUsedBytes: Int64
        public var state: SnapshotState
    }

    public var id: Int64
    public var token: String
    public var recipe: String
    /// The SHA-256 of the recipe's text as it ran.
    public var recipeSHA256: String
    public var startedAt: Double
    public var finishedAt: Double?
    public var state: RunState
    public var outcome: RunOutcome?
    public var exitCode: Int?
    public var error: String?
    public var suspendMicroseconds: Int64?
    public var keepUntil: Double?
    public var volumes: [Volume]
}

extension Journal {
    /// The newest runs first, at most `limit`, optionally of one recipe.
    /// Two queries whatever the journal's size: the runs, then their snapshots.
    public func history(limit: Int, recipe: String? = nil) throws -> [RunSummary] {
        try read { db in
            var sql = """
                SELECT id, token, recipe_name, recipe_sha256, started_at, finished_at, state, outcome, exit_code, error, suspend_us, keep_until
                FROM runs
                """
            var arguments: StatementArguments = []
            if let recipe {
                sql += " WHERE recipe_name = ?"
                arguments += [recipe]
            }
            sql += " ORDER BY id DESC LIMIT ?"
            arguments += [limit]
            var summaries: [RunSummary] = []
            var index: [Int64: Int] = [:]
            for row in try Row.fetchAll(db, sql: sql, arguments: arguments) {
                let id: Int64 = row["id"]
                index[id] = summaries.count
                summaries.append(
                    RunSummary(
                        id: id, token: row["token"], recipe: row["recipe_name"], recipeSHA256: row["recipe_sha256"], startedAt: row["started_at"],
                        finishedAt: row["finished_at"], state: row["state"], outcome: row["outcome"], exitCode: row["exit_code"],
                        error: row["error"], suspendMicroseconds: row["suspend_us"], keepUntil: row["keep_until"], volumes: []))
            }
            guard let newest = summaries.first?.id, let oldest = summaries.last?.id else { return [] }
            let rows = try Row.fetchAll(
                db,
                sql: """
                    SELECT run_id, volume, size_bytes, peak_used_bytes, state FROM snapshots
                    WHERE run_id BETWEEN ? AND ? ORDER BY run_id, volume_index
                    """, arguments: [oldest, newest])
            for row in rows {
                let runID: Int64 = row["run_id"]
                guard let position = index[runID] else { continue }
                summaries[position].volumes.append(
                    RunSummary.Volume(volume: row["volume"], sizeBytes: row["size_bytes"], peakUsedBytes: row["peak_used_bytes"], state: row["state"]))
            }
            return summaries
        }
    }
}
