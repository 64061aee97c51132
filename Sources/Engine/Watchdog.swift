import BlockDevice
import DeviceMapper
import Foundation
import Snapshot

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
    private var process: Process?
    private var toChild: Int32 = -1
    private var fromChild: Int32 = -1

    public init(executable: String, log: @escaping @Sendable (String) -> Void) {
        self.executable = executable
        self.log = log
    }

    public func arm(resumeInOrder devices: [DeviceRef], timeout: Duration) throws {
        try startIfNeeded()
        let milliseconds = timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000
        let refs = devices.map(Self.encode).joined(separator: " ")
        try send("arm \(milliseconds) \(refs)")
        guard receive() == "armed" else {
            stop()
            throw GuardFailure(.attention, "the suspend watchdog (\(executable) __watchdog) did not answer; nothing was suspended")
        }
    }

    @discardableResult
    public func disarm() -> Bool {
        guard process != nil else { return true }
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

    private func launch() throws {
        if let process, process.isRunning { return }
        ready = false
        let input = Pipe()
        let output = Pipe()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["__watchdog"]
        process.standardInput = input
        process.standardOutput = output
        do {
            try process.run()
        } catch {
            throw GuardFailure(.attention, "cannot start the suspend watchdog \(executable): \(error)")
        }
        self.process = process
        toChild = input.fileHandleForWriting.fileDescriptor
        fromChild = output.fileHandleForReading.fileDescriptor
        // Keep the descriptors: the Pipe objects close them when released.
        pipes = (input, output)
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

    private var pipes: (Pipe, Pipe)?

    private func stop() {
        if process != nil {
            try? send("exit")
            process?.waitUntilExit()
        }
        process = nil
        pipes = nil
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

    static func encode(_ ref: DeviceRef) -> String {
        switch ref {
        case .name(let name): return "name=\(name)"
        case .uuid(let uuid): return "uuid=\(uuid)"
        case .number(let number): return "dev=\(number)"
        }
    }

    static func decode(_ text: Substring) -> DeviceRef? {
        let parts = text.split(separator: "=", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        switch parts[0] {
        case "name": return .name(String(parts[1]))
        case "uuid": return .uuid(String(parts[1]))
        case "dev": return DeviceNumber(parsing: parts[1]).map { .number($0) }
        default: return nil
        }
    }
}

/// The watchdog process itself (`guard __watchdog`).
public enum WatchdogServer {
    /// Serves the protocol on stdin/stdout until told to exit or guard goes away.
    /// - Returns: the exit status.
    public static func serve() -> Int32 {
        // Memory is locked when an arm names a device a page of the watchdog could have to be
        // read from (its program, libraries or swap there): most windows need no lock at all.
        var locked = false
        guard let dm = try? DeviceMapper(udev: .none) else {
            writeLine("error device-mapper unavailable")
            return 1
        }
        writeLine("ready")
        var armed: (deadline: ContinuousClock.Instant, devices: [DeviceRef])?
        var buffer: [UInt8] = []
        while true {
            var timeout: Int32 = -1
            if let armed {
                let remaining = ContinuousClock.now.duration(to: armed.deadline)
                timeout = max(0, Int32(remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000))
            }
            var descriptor = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, timeout)
            if ready < 0 && errno == EINTR { continue }
            if ready == 0, let current = armed {
                fire(dm, current.devices, reason: "guard did not finish its suspend window in time")
                return 2
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = read(0, &chunk, chunk.count)
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                if let current = armed {
                    fire(dm, current.devices, reason: "guard exited while devices were suspended")
                    return 2
                }
                return 0
            }
            buffer += chunk[0..<count]
            while let newline = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                let words = line.split(separator: " ")
                switch words.first {
                case "arm":
                    let milliseconds = words.count > 1 ? Int64(words[1]) ?? 30_000 : 30_000
                    let devices = words.dropFirst(2).compactMap(ProcessWatchdog.decode)
                    let numbers = Set(devices.compactMap { ref -> DeviceNumber? in if case .number(let number) = ref { return number } else { return nil } })
                    if !locked && Memory.mayFault(on: numbers) { locked = (try? Memory.lockAll()) != nil }
                    armed = (ContinuousClock.now + .milliseconds(milliseconds), devices)
                    writeLine("armed")
                case "disarm":
                    armed = nil
                    writeLine("disarmed")
                case "exit":
                    return 0
                default:
                    writeLine("error unknown command")
                }
            }
        }
    }

    private static func fire(_ dm: DeviceMapper, _ devices: [DeviceRef], reason: String) {
        var resumed: [String] = []
        for device in devices {
            if let info = try? dm.info(device), info.isSuspended || info.hasInactiveTable {
                if (try? dm.resume(device)) != nil { resumed.append(info.name) }
            }
        }
        let message = "guard watchdog: \(reason); resumed \(resumed.isEmpty ? "nothing (nothing was suspended)" : resumed.joined(separator: ", ")); run `guard recover`\n"
        _ = message.withCString { write(2, $0, strlen($0)) }
    }

    private static func writeLine(_ text: String) {
        let line = text + "\n"
        _ = line.withCString { write(1, $0, strlen($0)) }
    }
}
