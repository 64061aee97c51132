import BlockDevice
import Engine
import Foundation
import Journal
import Quantities
import Recipe

#if canImport(Glibc)
import Glibc
#endif

/// What a person sees: phases, steps with their output, COW fill and merge progress.
/// On a terminal, colors (never with NO_COLOR) and a status line updated in place;
/// otherwise plain lines. Everything also goes to the system log (`journalctl -t guard`).
final class TerminalReporter: Reporter, @unchecked Sendable {
    // @unchecked: mutable state is only touched under `lock`.
    enum Verbosity: Int { case quiet, normal, verbose }

    let verbosity: Verbosity
    let isTerminal: Bool
    let color: Bool
    private let lock = NSLock()
    private var lastFill: [String: Int] = [:]
    private var lastMerge: [String: Int] = [:]
    private var statusLineShown = false
    private var currentRun: Int64?
    private var currentRecipe: String?
    private var currentPhase: String?
    /// stderr is the journal (a systemd unit's output): what goes to the journal natively is
    /// not printed again, so no line is there twice.
    let standardErrorIsJournal: Bool

    init(verbosity: Verbosity, isTerminal: Bool = isatty(2) == 1, environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.verbosity = verbosity
        self.isTerminal = isTerminal
        self.color = isTerminal && environment["NO_COLOR"] == nil && environment["TERM"] != "dumb"
        self.standardErrorIsJournal = SystemLog.standardErrorIsJournal(environment)
    }

    private func style(_ text: String, _ code: String) -> String { color ? "\u{1B}[\(code)m\(text)\u{1B}[0m" : text }

    /// Progress goes to stderr so stdout stays data (`--json`, tables). A line the system log
    /// already has (`logged`) is not printed when stderr is the journal.
    private func emit(_ line: String, logged: Bool = true) {
        if logged && standardErrorIsJournal { return }
        lock.lock()
        defer { lock.unlock() }
        if statusLineShown {
            StandardStreams.error("\r\u{1B}[K")
            statusLineShown = false
        }
        StandardStreams.error(line + "\n")
    }

    private func status(_ line: String) {
        lock.lock()
        defer { lock.unlock() }
        StandardStreams.error("\r\u{1B}[K" + line)
        statusLineShown = true
    }

    /// Every line names its run ("run 12: phase steps"), once, and carries the run, recipe,
    /// phase and volume as fields where journald takes them.
    private func system(_ priority: SystemLog.Priority, _ text: String, volume: String? = nil, event: LogEvent? = nil) {
        let (run, recipe, phase) = lock.withLock { (currentRun, currentRecipe, currentPhase) }
        var fields: [(String, String)] = []
        if let run { fields.append(("GUARD_RUN_ID", "\(run)")) }
        if let recipe { fields.append(("GUARD_RECIPE", recipe)) }
        if let phase { fields.append(("GUARD_PHASE", phase)) }
        if let volume { fields.append(("GUARD_VOLUME", volume)) }
        if let event { fields.append(("MESSAGE_ID", event.messageID)) }
        guard let run, !text.hasPrefix("run \(run) "), !text.hasPrefix("run \(run):") else {
            return SystemLog.write(priority, text, fields: fields)
        }
        SystemLog.write(priority, "run \(run): " + text, fields: fields)
    }

    func context(run: Int64, recipe: String) {
        lock.withLock {
            currentRun = run
            currentRecipe = recipe
        }
    }

    func event(_ event: LogEvent, _ text: String) {
        switch event {
        case .runStarted:
            system(.notice, text, event: event)
            if verbosity != .quiet { emit(text) }
        case .needsReassembly:
            system(.warning, text, event: event)
        case .snapshotBypassed:
            system(.error, text, event: event)
            if verbosity != .quiet { emit(style("guard: ", "31") + text) }
        case .runSucceeded, .runKept:
            system(.notice, text, event: event)
            emit(text)
        case .runRolledBack, .runFailed:
            system(.error, text, event: event)
            emit(style("guard: ", "31") + text)
        }
    }

    func phase(_ name: String, run: Int64?) {
        lock.withLock {
            if let run { currentRun = run }
            currentPhase = name
        }
        system(.info, "phase \(name)")
        guard verbosity != .quiet else { return }
        emit(style("==> \(name)", "1"))
    }

    func note(_ text: String) {
        system(.notice, text)
        guard verbosity != .quiet else { return }
        emit(text)
    }

    func warning(_ text: String) {
        system(.warning, text)
        emit(style("warning: ", "33") + text)
    }

    func stepStarted(kind: String, index: Int, count: Int, name: String) {
        system(.info, "\(kind) \(index + 1)/\(count) '\(name)' started")
        guard verbosity != .quiet else { return }
        emit(style("--> \(kind) \(index + 1)/\(count): \(name)", "36"))
    }

    func stepOutput(_ output: StepOutput) {
        guard verbosity != .quiet else { return }
        let prefix = style("    [\(output.step)] ", "2")
        emit(prefix + (output.stream == .stderr ? style(output.text, "33") : output.text), logged: false)
    }

    func stepFinished(kind: String, result: StepResult) {
        let text = "\(kind) '\(result.name)': \(result.termination) after \(oneDecimal(result.duration))s"
        system(result.succeeded ? .info : .warning, text)
        if result.succeeded {
            if verbosity != .quiet { emit(style("    ok ", "32") + "(\(oneDecimal(result.duration))s)") }
        } else {
            emit(style("    FAILED ", "31") + "\(result.termination)" + (result.stderrTail.isEmpty ? "" : ": " + lastLine(result.stderrTail)))
        }
    }

    func cow(volume: String, usedBytes: UInt64, sizeBytes: UInt64) {
        guard sizeBytes > 0 else { return }
        let percent = Int(Double(usedBytes) * 100 / Double(sizeBytes))
        let changed = lock.withLock { () -> Bool in
            let last = lastFill[volume] ?? -100
            guard abs(percent - last) >= (isTerminal ? 1 : 10) else { return false }
            lastFill[volume] = percent
            return true
        }
        guard changed, verbosity != .quiet else { return }
        let text = "COW \(volume): \(percent)% of \(formatBytes(sizeBytes)) used"
        if isTerminal { status(style(text, "2")) } else { emit(text, logged: false) }
    }

    func merge(volume: String, fraction: Double) {
        let percent = Int(fraction * 100)
        let changed = lock.withLock { () -> Bool in
            let last = lastMerge[volume] ?? -100
            guard abs(percent - last) >= (isTerminal ? 1 : 25) || (percent == 100 && last != 100) else { return false }
            lastMerge[volume] = percent
            return true
        }
        if changed && percent == 100 { system(.info, "merge of \(volume) complete", volume: volume) }
        guard changed, verbosity != .quiet else { return }
        let text = "merging \(volume): \(percent)%"
        if isTerminal && percent < 100 { status(text) } else { emit(text, logged: false) }
    }

    func log(_ text: String) {
        system(.debug, text)
        guard verbosity == .verbose else { return }
        emit(style("    · \(text)", "2"))
    }

    func result(_ text: String, success: Bool) {
        system(success ? .notice : .error, text)
        if success {
            emit(text)
        } else {
            emit(style("guard: ", "31") + text)
        }
    }

    private func lastLine(_ text: String) -> String {
        text.split(separator: "\n").last.map(String.init) ?? ""
    }
}

extension NSLock {
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}
