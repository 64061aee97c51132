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
