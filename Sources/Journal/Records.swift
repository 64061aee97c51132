import Foundation
import GRDB

/// Where a run stands.
public enum RunState: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    /// A guard process is working on it (or died working on it: see `guard recover`).
    case running
    /// The upgrade is in place and the snapshots are kept for a later commit or rollback.
    case kept
    /// A rollback started: the volumes show the old data, the kernel is merging.
    case merging
    /// Nothing is left to do.
    case finished
    /// The durable records (COW label, kernel header) say a snapshot holds old blocks, but it
    /// is not live: a reboot without reassembly, a late device or directory. Everything is
    /// kept; `guard recover` reassembles it once the device or directory is there.
    case needsReassembly = "needs_reassembly"
    /// An origin was written while its snapshot was not live: the snapshot no longer describes
    /// the volume's past. Its COW is kept; `guard commit` discards it. Nothing is merged.
    case stale

    /// The states of runs that still own snapshot storage.
    public static let open: [RunState] = [.running, .kept, .merging, .needsReassembly, .stale]
}

/// How a run ended, as `guard history` shows it.
public enum RunOutcome: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    case committed
    case kept
    case rolledBack = "rolled_back"
    case failed
    case recovered
}

/// The decision taken after verify (written before it is carried out).
public enum RunDecision: String, Codable, Sendable, DatabaseValueConvertible {
    case commit, keep, rollback
}

/// What a journal event records: an intent is written before its action, a result after it.
public enum EventKind: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    case intent, result, note, warning, error
}

/// Where a phase stands.
public enum PhaseStatus: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    case started, done, failed
}

/// One run of a recipe.
public struct RunRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "runs"
    public var id: Int64?
    public var token: String
    public var recipeName: String
    public var recipePath: String
    public var recipeSHA256: String
    public var recipeText: String
    public var host: String
    public var user: String
    public var pid: Int32
    public var startedAt: Double
    public var finishedAt: Double?
    public var phase: String
    public var state: RunState
    public var decision: RunDecision?
    public var outcome: RunOutcome?
    public var exitCode: Int?
    public var error: String?
    public var keepUntil: Double?
    public var suspendMicroseconds: Int64?

    public enum Columns {
        public static let id = Column(CodingKeys.id)
        public static let token = Column(CodingKeys.token)
        public static let recipeName = Column(CodingKeys.recipeName)
        public static let startedAt = Column(CodingKeys.startedAt)
        public static let state = Column(CodingKeys.state)
        public static let outcome = Column(CodingKeys.outcome)
    }

    enum CodingKeys: String, CodingKey {
        case id, token, host, user, pid, phase, state, decision, outcome, error
        case recipeName = "recipe_name"
        case recipePath = "recipe_path"
        case recipeSHA256 = "recipe_sha256"
        case recipeText = "recipe_text"
        case startedAt = "started_at"
        case finishedAt = "finished_at"
        case exitCode = "exit_code"
        case keepUntil = "keep_until"
        case suspendMicroseconds = "suspend_us"
    }

    public init(
        token: String, recipeName: String, recipePath: String, recipeSHA256: String, recipeText: String, host: String,
        user: String, pid: Int32, startedAt: Double
    ) {
        self.token = token
        self.recipeName = recipeName
        self.recipePath = recipePath
        self.recipeSHA256 = recipeSHA256
        self.recipeText = recipeText
        self.host = host
        self.user = user
        self.pid = pid
        self.startedAt = startedAt
        self.phase = "preflight"
        self.state = .running
    }

    public mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }
}

/// One phase of a run: preflight, quiesce, snapshot, resume, steps, verify, commit/keep/rollback, done.
public struct PhaseRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "phases"
    public var id: Int64?
    public var runID: Int64
    public var name: String
    public var startedAt: Double
    public var finishedAt: Double?
    public var status: PhaseStatus
    public var detail: String?

    public enum Columns {
        public static let runID = Column(CodingKeys.runID)
    }

    enum CodingKeys: String, CodingKey {
        case id, name, status, detail
        case runID = "run_id"
        case startedAt = "started_at"
        case finishedAt = "finished_at"
    }

    public init(runID: Int64, name: String, startedAt: Double) {
        self.runID = runID
        self.name = name
        self.startedAt = startedAt
        self.status = .started
    }

    public mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }
}

/// One step, verify check or hook of a run.
public struct StepRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "steps"
    public var id: Int64?
    public var runID: Int64
    /// step, verify, quiesce, resume, rollback-stop, rollback-start.
    public var kind: String
    public var position: Int
    public var name: String
    /// JSON array of strings.
    public var argv: String
    public var startedAt: Double
    public var duration: Double?
    /// "exit 0", "killed by SIGKILL", "timed out", "failed to start: ...".
    public var termination: String?
    public var exitCode: Int?
    public var stdoutTail: String?
    public var stderrTail: String?
    public var outputBytes: Int64?

    public enum Columns {
        public static let runID = Column(CodingKeys.runID)
    }

    enum CodingKeys: String, CodingKey {
        case id, kind, position, name, argv, duration, termination
        case runID = "run_id"
        case startedAt = "started_at"
        case exitCode = "exit_code"
        case stdoutTail = "stdout_tail"
        case stderrTail = "stderr_tail"
        case outputBytes = "output_bytes"
    }

    public init(runID: Int64, kind: String, position: Int, name: String, argv: [String], startedAt: Double) {
        self.runID = runID
        self.kind = kind
        self.position = position
        self.name = name
        self.argv = String(decoding: (try? JSONEncoder().encode(argv)) ?? Data("[]".utf8), as: UTF8.self)
        self.startedAt = startedAt
    }

    public var arguments: [String] { (try? JSONDecoder().decode([String].self, from: Data(argv.utf8))) ?? [] }

    public mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }
}

/// The state of one snapshot of a run.
public enum SnapshotState: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    /// Layers being built; not taken yet.
    case preparing
    /// Taken and live.
    case live
    /// Being merged back into the origin.
    case merging
    /// Merged back and torn down: the origin has the old data.
    case merged
    /// Dropped: the origin keeps the new data.
    case committed
    /// Never taken (preparation undone).
    case discarded
    /// The kernel invalidated it (COW full or I/O error): no rollback possible.
    case invalid
}

/// One protected volume of a run and its snapshot.
public struct SnapshotRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "snapshots"
    public var id: Int64?
    public var runID: Int64
    public var volumeIndex: Int
    /// As the recipe names it.
    public var volume: String
    public var mountPoint: String?
    public var originName: String
    public var originUUID: String
    public var originDevice: String
    public var originTable: String
    public var originBytes: Int64
    public var cowPath: String
    /// file or device.
    public var cowKind: String
    /// Size of the COW the kernel uses (after any extension).
    public var sizeBytes: Int64
    public var chunkBytes: Int64
    public var peakUsedBytes: Int64
    /// The bytes that differed from before the run when the run ended (its decision); nil
    /// for runs journaled before guard recorded it. Against the COW's use later, what was
    /// written after the run (a rollback throws it away).
    public var usedAtEndBytes: Int64?
    public var state: SnapshotState
    /// The Snapshot module's description of the stack, JSON.
    public var stack: String

    public enum Columns {
        public static let runID = Column(CodingKeys.runID)
        public static let state = Column(CodingKeys.state)
    }

    enum CodingKeys: String, CodingKey {
        case id, volume, state, stack
        case runID = "run_id"
        case volumeIndex = "volume_index"
        case mountPoint = "mount_point"
        case originName = "origin_name"
        case originUUID = "origin_uuid"
        case originDevice = "origin_device"
        case originTable = "origin_table"
        case originBytes = "origin_bytes"
        case cowPath = "cow_path"
        case cowKind = "cow_kind"
        case sizeBytes = "size_bytes"
        case chunkBytes = "chunk_bytes"
        case peakUsedBytes = "peak_used_bytes"
        case usedAtEndBytes = "used_at_end_bytes"
    }

    public init(
        runID: Int64, volumeIndex: Int, volume: String, mountPoint: String?, originName: String, originUUID: String,
        originDevice: String, originTable: String, originBytes: Int64, cowPath: String, cowKind: String, sizeBytes: Int64,
        chunkBytes: Int64, state: SnapshotState, stack: String
    ) {
        self.runID = runID
        self.volumeIndex = volumeIndex
        self.volume = volume
        self.mountPoint = mountPoint
        self.originName = originName
        self.originUUID = originUUID
        self.originDevice = originDevice
        self.originTable = originTable
        self.originBytes = originBytes
        self.cowPath = cowPath
        self.cowKind = cowKind
        self.sizeBytes = sizeBytes
        self.chunkBytes = chunkBytes
        self.peakUsedBytes = 0
        self.state = state
        self.stack = stack
    }

    public mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }
}

/// A reading of a snapshot's COW use during a run.
public struct CowSampleRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "cow_samples"
    public var id: Int64?
    public var snapshotID: Int64
    /// Seconds since the snapshot was taken.
    public var at: Double
    public var usedBytes: Int64
    public var sizeBytes: Int64

    public enum Columns {
        public static let snapshotID = Column(CodingKeys.snapshotID)
    }

    enum CodingKeys: String, CodingKey {
        case id, at
        case snapshotID = "snapshot_id"
        case usedBytes = "used_bytes"
        case sizeBytes = "size_bytes"
    }

    public init(snapshotID: Int64, at: Double, usedBytes: Int64, sizeBytes: Int64) {
        self.snapshotID = snapshotID
        self.at = at
        self.usedBytes = usedBytes
        self.sizeBytes = sizeBytes
    }
}

/// An intent (written before a kernel action), a result (after it) or a note.
public struct EventRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "events"
    public var id: Int64?
    public var runID: Int64
    public var at: Double
    public var kind: EventKind
    public var action: String
    public var detail: String?

    public enum Columns {
        public static let runID = Column(CodingKeys.runID)
    }

    enum CodingKeys: String, CodingKey {
        case id, at, kind, action, detail
        case runID = "run_id"
    }

    public init(runID: Int64, at: Double, kind: EventKind, action: String, detail: String?) {
        self.runID = runID
        self.at = at
        self.kind = kind
        self.action = action
        self.detail = detail
    }
}

/// A file-level restore from a kept snapshot (`guard restore`): written as `running`
/// before the first file is touched, then `done` or `failed` with what it did.
public struct RestoreRecord: Codable, Sendable, Hashable, FetchableRecord, MutablePersistableRecord {
    public static let databaseTableName = "restores"
    public var id: Int64?
    public var runID: Int64
    public var startedAt: Double
    public var finishedAt: Double?
    public var user: String
    /// The paths asked for, as a JSON array.
    public var paths: String
    public var deleteCreated: Bool
    /// running, done, failed.
    public var status: String
    public var files: Int64
    public var bytes: Int64
    public var removed: Int64
    public var detail: String?

    public enum Columns {
        public static let runID = Column(CodingKeys.runID)
    }

    enum CodingKeys: String, CodingKey {
        case id, user, paths, status, files, bytes, removed, detail
        case runID = "run_id"
        case startedAt = "started_at"
        case finishedAt = "finished_at"
        case deleteCreated = "delete_created"
    }

    public init(runID: Int64, startedAt: Double, user: String, paths: [String], deleteCreated: Bool) {
        self.runID = runID
        self.startedAt = startedAt
        self.user = user
        self.paths = (try? String(decoding: JSONEncoder().encode(paths), as: UTF8.self)) ?? "[]"
        self.deleteCreated = deleteCreated
        self.status = "running"
        self.files = 0
        self.bytes = 0
        self.removed = 0
    }

    public mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }

    /// The paths asked for.
    public var pathList: [String] { (try? JSONDecoder().decode([String].self, from: Data(paths.utf8))) ?? [paths] }
}
