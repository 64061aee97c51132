import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Watchdog

#if canImport(Glibc)
import Glibc
#endif

/// The suspend-window watchdog as a separate process (`guard __watchdog`): it does not
/// depend on any suspended volume (started, and its memory locked, before the first
/// suspend) and outlives guard. If guard dies (its pipe closes) or stalls (the timeout
/// passes) while armed, it resumes the devices in the order given.
public final class ProcessWatchdog: WindowWatchdog {
    private let executable: String
    private let log: @Sendable (String) -> Void
    /// The watchdog's pid while it runs. It is started with guard's own spawn, not Foundation's
    /// Process: in an initramfs (no loopback interface) Process's child monitoring cannot set
    /// itself up, and Process.run never returned there.
    private var pid: pid_t?
    private var toChild: Int32 = -1
    private var fromChild: Int32 = -1

    public init(executable: String, log: @escaping @Sendable (String) -> Void) {
        self.executable = executable
        self.log = log
    }

    public func arm(_ plan: WatchdogPlan, timeout: Duration) throws {
        try startIfNeeded()
        let milliseconds = timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000
        try send("arm \(milliseconds) \(WatchdogProtocol.encode(plan))")
        guard receive() == "armed" else {
            stop()
            throw GuardFailure(.attention, "the suspend watchdog (\(executable) __watchdog) did not answer; nothing was suspended")
        }
    }

    @discardableResult
    public func disarm() -> Bool {
        guard pid != nil else { return true }
        if (try? send("disarm")) != nil, receive() == "disarmed" { return true }
        // It fired (and exited) or died: the next arm starts a new one.
        log("the watchdog did not confirm disarming: it fired or died")
        stop()
        return false
    }

    deinit { stop() }

    /// Starts the watchdog process without waiting for it: it starts (a second on a slow
    /// machine) while guard prepares, and `arm` then finds it ready.
    public func start() {
        try? launch()
    }

    private var ready = false

    /// Whether the watchdog still runs (one that exited is reaped).
    private var isRunning: Bool {
        guard let pid else { return false }
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == 0
    }

    private func launch() throws {
        if isRunning { return }
        closePipes()
        pid = nil
        ready = false
        let server = Self.server(for: executable)
        do {
            let input = try Spawn.pipe()
            let output: (read: Int32, write: Int32)
            do { output = try Spawn.pipe() } catch {
                close(input.read)
                close(input.write)
                throw error
            }
            defer {
                close(input.read)
                close(output.write)
            }
            toChild = input.write
            fromChild = output.read
            pid = try Spawn.start(
                path: server.path, arguments: [server.path] + server.arguments, environment: ProcessInfo.processInfo.environment,
                directory: nil, cgroup: nil, stdin: input.read, stdout: output.write, stderr: STDERR_FILENO)
        } catch {
            closePipes()
            throw GuardFailure(.attention, "cannot start the suspend watchdog \(server.path): \(error)")
        }
    }

    private func closePipes() {
        if toChild >= 0 { close(toChild) }
        if fromChild >= 0 { close(fromChild) }
        toChild = -1
        fromChild = -1
    }

    private func startIfNeeded() throws {
        try launch()
        if ready { return }
        // A fresh process takes a moment on a slow or busy machine (longer when its first arm
        // must lock its memory). Nothing is suspended yet, so waiting is harmless.
        guard receive(timeoutMilliseconds: 60_000) == "ready" else {
            stop()
            throw GuardFailure(.attention, "the suspend watchdog \(executable) did not start within 60 s; nothing was suspended")
        }
        ready = true
    }

    /// The watchdog program for the guard at `executable`: `guard-watchdog` beside it (the
    /// build directory, the test VM) or in `../lib/guard/` (installed: /usr/sbin/guard and
    /// /usr/lib/guard/guard-watchdog); where neither is, guard itself (`guard __watchdog`),
    /// which works the same but locks its whole program when it must lock memory.
    static func server(for executable: String) -> (path: String, arguments: [String]) {
        let directory = (executable as NSString).deletingLastPathComponent
        for candidate in ["\(directory)/guard-watchdog", "\(directory)/../lib/guard/guard-watchdog"]
        where FileManager.default.isExecutableFile(atPath: candidate) {
            return ((candidate as NSString).standardizingPath, [])
        }
        return (executable, ["__watchdog"])
    }

    private func stop() {
        if let pid {
            try? send("exit")
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
        pid = nil
        closePipes()
        ready = false
    }

    private func send(_ line: String) throws {
        let bytes = Array((line + "\n").utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { write(toChild, $0.baseAddress! + written, bytes.count - written) }
            if n < 0 {
                if errno == EINTR { continue }
                throw GuardFailure(.attention, "the suspend watchdog is gone: \(String(cString: strerror(errno)))")
            }
            written += n
        }
    }

    private func receive(timeoutMilliseconds: Int32 = 10_000) -> String? {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            var pollDescriptor = pollfd(fd: fromChild, events: Int16(POLLIN), revents: 0)
            guard poll(&pollDescriptor, 1, timeoutMilliseconds) > 0 else { return nil }
            let n = read(fromChild, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            if byte == 10 { return String(decoding: line, as: UTF8.self) }
            line.append(byte)
        }
    }
}
