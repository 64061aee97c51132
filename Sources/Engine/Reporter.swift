import Journal
import Snapshot

/// What a guard command tells the person running it. The terminal view, plain lines and
/// the system log are implementations; the engine never prints itself.
public protocol Reporter: Sendable {
    /// A phase of a run starts.
    func phase(_ name: String, run: Int64?)
    /// Something happened that a person should read.
    func note(_ text: String)
    /// Something is wrong but guard carries on.
    func warning(_ text: String)
    /// A step, check or hook starts.
    func stepStarted(kind: String, index: Int, count: Int, name: String)
    /// A line of a step's output.
    func stepOutput(_ output: StepOutput)
    func stepFinished(kind: String, result: StepResult)
    /// COW use of one volume.
    func cow(volume: String, usedBytes: UInt64, sizeBytes: UInt64)
    /// Merge progress of one volume, 0...1.
    func merge(volume: String, fraction: Double)
    /// Detail for -v and the log file only.
    func log(_ text: String)
    /// How a run ended: shown even with -q, and logged (a failure at error priority).
    func result(_ text: String, success: Bool)
    /// The run the next lines belong to (the system log's GUARD_RUN_ID and GUARD_RECIPE).
    func context(run: Int64, recipe: String)
    /// An event with a MESSAGE_ID of its own (Units/guard.catalog): shown as a note, or as
    /// the result when it ends a run; `needsReassembly` is only logged (the command prints
    /// what to do its own way).
    func event(_ event: LogEvent, _ text: String)
}

extension Reporter {
    public func context(run: Int64, recipe: String) {}
    public func event(_ event: LogEvent, _ text: String) {
        switch event {
        case .runStarted: note(text)
        case .needsReassembly: break
        case .snapshotBypassed: warning(text)
        case .runSucceeded, .runKept: result(text, success: true)
        case .runRolledBack, .runFailed: result(text, success: false)
        }
    }
}

/// The events admins search the journal for, each with its MESSAGE_ID and an entry in
/// guard's journald catalog (Units/guard.catalog: `journalctl -x` explains them).
public enum LogEvent: String, Sendable, CaseIterable {
    case runStarted, runSucceeded, runKept, runRolledBack, runFailed, needsReassembly
    /// Another tool replaced a guarded origin's table: its snapshot is stale (issue 39).
    case snapshotBypassed

    /// 128-bit ids, as `systemd-id128 new` makes them; never change one.
    public var messageID: String {
        switch self {
        case .runStarted: return "fa73270cf1b64e9f976dff1259d5ebda"
        case .runSucceeded: return "d1ab3e2ffccf4db78abf6f332b3edf69"
        case .runKept: return "907ec7c42b0849eeb9b4ff7a8224bd0d"
        case .runRolledBack: return "0daef6f1528e45648b75728188725573"
        case .runFailed: return "fd2e29937af64cdda1d9b300bd2c5848"
        case .needsReassembly: return "e29528bd61ef4b89b30b985eea9580c1"
        case .snapshotBypassed: return "f510d6b5f0424183b9e2e4a1be9a908b"
        }
    }

    /// The event that ends a run with this outcome.
    public static func ending(_ outcome: RunOutcome) -> LogEvent {
        switch outcome {
        case .committed: return .runSucceeded
        case .kept: return .runKept
        case .rolledBack: return .runRolledBack
        case .failed, .recovered: return .runFailed
        }
    }
}

/// Reports nothing (tests, --quiet internals).
public struct SilentReporter: Reporter {
    public init() {}
    public func phase(_ name: String, run: Int64?) {}
    public func note(_ text: String) {}
    public func warning(_ text: String) {}
    public func stepStarted(kind: String, index: Int, count: Int, name: String) {}
    public func stepOutput(_ output: StepOutput) {}
    public func stepFinished(kind: String, result: StepResult) {}
    public func cow(volume: String, usedBytes: UInt64, sizeBytes: UInt64) {}
    public func merge(volume: String, fraction: Double) {}
    public func log(_ text: String) {}
    public func result(_ text: String, success: Bool) {}
}
