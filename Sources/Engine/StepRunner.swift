import BlockDevice
import Foundation
import Journal
import Quantities
import Recipe

#if canImport(Glibc)
import Glibc
#endif

/// How a step ended.
public enum StepTermination: Hashable, Sendable, Codable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)
    /// Killed after its timeout (TERM to its process group, KILL after the grace period).
    case timedOut
    /// Stopped because the run was interrupted (Ctrl-C) or the COW was about to fill.
    case stopped(String)
    /// Never started: missing program, unknown user, missing directory.
    case failedToStart(String)
    /// A built-in check (http:) ran and failed: why.
    case checkFailed(String)

    public var description: String {
        switch self {
        case .exited(let code): return "exit \(code)"
        case .signaled(let signal): return "killed by \(signalName(signal))"
        case .timedOut: return "timed out"
        case .stopped(let reason): return "stopped: \(reason)"
        case .failedToStart(let reason): return "failed to start: \(reason)"
        case .checkFailed(let reason): return "failed: \(reason)"
        }
    }
}

/// The result of one step, verify check or hook.
public struct StepResult: Hashable, Sendable, Codable {
    public var name: String
    public var argv: [String]
    public var termination: StepTermination
    /// Wall-clock seconds from start to the end of the process group.
    public var duration: Double
    /// The last part of standard output and standard error (at most `StepRunner.tailBytes` each).
    public var stdoutTail: String
    public var stderrTail: String
    public var outputBytes: UInt64

    public var succeeded: Bool { termination == .exited(0) }

    /// The exit code in the shell's convention: 128+signal for a signal, nil when it never ran.
    public var exitCode: Int32? {
        switch termination {
        case .exited(let code): return code
        case .signaled(let signal): return 128 + signal
        case .timedOut, .stopped: return nil
        case .failedToStart, .checkFailed: return nil
        }
    }
}

/// A line a step printed, for the live view.
public struct StepOutput: Sendable {
    public enum Stream: String, Sendable { case stdout, stderr }
    public var step: String
    public var stream: Stream
    public var text: String
}

/// Runs steps: argv directly (a shell only for `shell:`), in a session of their own so a
/// timeout or Ctrl-C reaches every process they started, with a clean environment.
public struct StepRunner: Sendable {
    /// Bytes of each stream kept for the journal.
    public var tailBytes = 16 << 10
    /// Time between TERM and KILL.
    public var killGrace: Duration = .seconds(5)
    /// Receives output lines as they come (the terminal view).
    public var onOutput: (@Sendable (StepOutput) -> Void)?

    public init(tailBytes: Int = 16 << 10, killGrace: Duration = .seconds(5), onOutput: (@Sendable (StepOutput) -> Void)? = nil) {
        self.tailBytes = tailBytes
        self.killGrace = killGrace
        self.onOutput = onOutput
    }

    /// The environment every command starts from: nothing of guard's own environment leaks in.
    public static let baseEnvironment: [String: String] = [
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "SHELL": "/bin/sh",
    ]

    /// Runs `command` and waits for it and every process of its session.
    ///
    /// - Parameters:
    ///   - environment: the full environment (base + recipe + step), see `environment(for:)`.
    ///   - timeout: nil for none.
    ///   - stop: polled while it runs; a non-nil reason stops the step (TERM, then KILL).
    ///   - cgroup: the command's own cgroup: it runs inside from its first instruction, and
    ///     when it is stopped or times out everything in it is killed, escapees of the
    ///     process group (setsid, double fork) included.
    /// - Returns: the result; a step that cannot start is a failed result, not an error.
    public func run(
        _ command: Command, environment: [String: String], timeout: Duration?,
        stop: (@Sendable () -> String?)? = nil, cgroup: RunCgroup? = nil
    ) async -> StepResult {
        if case .http(let check) = command.invocation {
            return await HTTPProbe.run(check, name: command.name, timeout: timeout, stop: stop, tailBytes: tailBytes)
        }
        let argv = command.invocation.arguments
        let started = ContinuousClock.now
        func failed(_ reason: String) -> StepResult {
            StepResult(name: command.name, argv: argv, termination: .failedToStart(reason), duration: 0, stdoutTail: "", stderrTail: reason, outputBytes: 0)
        }
        if let directory = command.workingDirectory {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
                return failed("working directory \(directory) does not exist")
            }
        }
        var environment = environment
        var launch = argv
        guard let program = Self.resolve(argv[0], path: environment["PATH"] ?? "") else {
            return failed("program '\(argv[0])' not found" + (argv[0].contains("/") ? "" : " in PATH (\(environment["PATH"] ?? ""))"))
        }
        launch[0] = program
        if let user = command.user {
            guard let account = Account.lookUp(user) else { return failed("user '\(user)' does not exist") }
            // The credentials are switched by setpriv, a single-threaded exec, not in the child of
            // this multi-threaded process: glibc's setuid/setgroups there would wait for threads
            // that only exist in the parent.
            guard let setpriv = Self.resolve("setpriv", path: Self.baseEnvironment["PATH"]!) else {
                return failed("running as '\(user)' needs setpriv (util-linux), which is not installed")
            }
            launch = [setpriv, "--reuid=\(account.uid)", "--regid=\(account.gid)", "--init-groups", "--"] + launch
            environment["HOME"] = account.home
            environment["USER"] = account.name
            environment["LOGNAME"] = account.name
        }

        let tails = TailBuffers(limit: tailBytes)
        let lines = onOutput.map { LineSplitter(step: command.name, onOutput: $0) }
        let launched = await Launcher.run(
            launch, environment: environment, directory: command.workingDirectory, cgroup: cgroup, timeout: timeout, stop: stop, grace: killGrace
        ) { stream, bytes in
            tails.append(Array(bytes), to: stream)
            lines?.append(bytes, from: stream)
        }
        switch launched {
        case .failure(let error):
            return failed("\(error)")
        case .success(let result):
            lines?.flush()
            // Members of the session that outlived the leader are killed too.
            kill(-result.pid, SIGKILL)
            if result.forced != nil, let cgroup { await cgroup.killAll() }
            let (out, err, bytes) = tails.snapshot()
            return StepResult(
                name: command.name, argv: argv, termination: result.termination, duration: seconds(since: started), stdoutTail: out, stderrTail: err, outputBytes: bytes)
        }
    }

    /// The program to execute: a path as given, or the first match in `path`.
    static func resolve(_ program: String, path: String) -> String? {
        if program.contains("/") { return access(program, X_OK) == 0 ? program : nil }
        for directory in path.split(separator: ":") {
            let candidate = "\(directory)/\(program)"
            var info = stat()
            if stat(candidate, &info) == 0, info.st_mode & S_IFMT == S_IFREG, access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// The environment of a command: guard's clean base, the recipe's, then the command's own,
    /// then guard's facts about the run (GUARD_*).
    public static func environment(recipe: [String: String], command: [String: String], run: [String: String]) -> [String: String] {
        baseEnvironment.merging(recipe) { $1 }.merging(command) { $1 }.merging(run) { $1 }
    }
}

func seconds(since start: ContinuousClock.Instant) -> Double {
    (ContinuousClock.now - start).inSeconds
}

/// The last bytes of stdout and stderr, bounded whatever a step prints.
final class TailBuffers: Sendable {
    private struct State {
        var out: [UInt8] = []
        var err: [UInt8] = []
        var total: UInt64 = 0
    }
    private let state = LockedValue(State())
    private let limit: Int

    init(limit: Int) { self.limit = limit }

    func append(_ bytes: [UInt8], to stream: StepOutput.Stream) {
        state.withLock { state in
            state.total += UInt64(bytes.count)
            switch stream {
            case .stdout: Self.keep(&state.out, bytes, limit)
            case .stderr: Self.keep(&state.err, bytes, limit)
            }
        }
    }

    private static func keep(_ buffer: inout [UInt8], _ bytes: [UInt8], _ limit: Int) {
        if bytes.count >= limit {
            buffer = Array(bytes.suffix(limit))
        } else {
            buffer.append(contentsOf: bytes)
            if buffer.count > 2 * limit { buffer.removeFirst(buffer.count - limit) }
        }
    }

    func snapshot() -> (String, String, UInt64) {
        state.withLock { state in
            (String(decoding: state.out.suffix(limit), as: UTF8.self), String(decoding: state.err.suffix(limit), as: UTF8.self), state.total)
        }
    }
}

/// Cuts a command's output into lines for the live view (a line longer than 4 KiB goes in parts).
final class LineSplitter: Sendable {
    private let pending = LockedValue<[StepOutput.Stream: [UInt8]]>([:])
    private let step: String
    private let onOutput: @Sendable (StepOutput) -> Void

    init(step: String, onOutput: @escaping @Sendable (StepOutput) -> Void) {
        self.step = step
        self.onOutput = onOutput
    }

    func append(_ bytes: ArraySlice<UInt8>, from stream: StepOutput.Stream) {
        let texts = pending.withLock { pending -> [String] in
            var buffer = pending[stream, default: []] + bytes
            var texts: [String] = []
            while let newline = buffer.firstIndex(of: 10) {
                texts.append(String(decoding: buffer[..<newline], as: UTF8.self))
                buffer.removeSubrange(...newline)
            }
            if buffer.count > 4096 {
                texts.append(String(decoding: buffer, as: UTF8.self))
                buffer.removeAll()
            }
            pending[stream] = buffer
            return texts
        }
        for text in texts { onOutput(StepOutput(step: step, stream: stream, text: text)) }
    }

    /// What is left of an unfinished last line.
    func flush() {
        let left = pending.withLock { pending in
            defer { pending = [:] }
            return pending.filter { !$0.value.isEmpty }
        }
        for stream in [StepOutput.Stream.stdout, .stderr] {
            if let bytes = left[stream] { onOutput(StepOutput(step: step, stream: stream, text: String(decoding: bytes, as: UTF8.self))) }
        }
    }
}

/// A user to run a step as.
struct Account {
    var name: String
    var uid: uid_t
    var gid: gid_t
    var home: String

    /// By name or numeric uid, from the passwd database.
    static func lookUp(_ user: String) -> Account? {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        if let uid = uid_t(user) {
            getpwuid_r(uid, &entry, &buffer, buffer.count, &result)
        } else {
            getpwnam_r(user, &entry, &buffer, buffer.count, &result)
        }
        guard let found = result?.pointee else { return nil }
        return Account(name: String(cString: found.pw_name), uid: found.pw_uid, gid: found.pw_gid, home: String(cString: found.pw_dir))
    }
}

/// "SIGTERM".
public func signalName(_ signal: Int32) -> String {
    let names: [Int32: String] = [
        SIGHUP: "SIGHUP", SIGINT: "SIGINT", SIGQUIT: "SIGQUIT", SIGILL: "SIGILL", SIGABRT: "SIGABRT", SIGBUS: "SIGBUS",
        SIGFPE: "SIGFPE", SIGKILL: "SIGKILL", SIGSEGV: "SIGSEGV", SIGPIPE: "SIGPIPE", SIGALRM: "SIGALRM", SIGTERM: "SIGTERM",
        SIGUSR1: "SIGUSR1", SIGUSR2: "SIGUSR2",
    ]
    return names[signal] ?? "signal \(signal)"
}

extension StepRecord {
    /// The record of a command that ran: how it ended, its output's tails.
    func finished(_ result: StepResult) -> StepRecord {
        var record = self
        record.duration = result.duration
        record.termination = result.termination.description
        record.exitCode = result.exitCode.map(Int.init)
        record.stdoutTail = result.stdoutTail
        record.stderrTail = result.stderrTail
        record.outputBytes = Int64(result.outputBytes)
        return record
    }
}
