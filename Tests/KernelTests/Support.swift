import BlockDevice
import DeviceMapper
import Foundation
import Testing

/// Whether this machine can run the kernel suite: root and a device-mapper driver that answers.
/// Asked of the driver itself: /dev/mapper/control can exist where the driver does not.
let kernelHasDeviceMapper: Bool = DeviceMapper.isAvailable

/// The kernel suite. Its tests run one at a time within a lane; Scripts/lib/kernel-suite.sh runs
/// two lanes at once, so a test checks only its own devices, loop devices and state directory.
@Suite("Kernel", .serialized, .enabled(if: kernelHasDeviceMapper, "needs root and device-mapper (run Scripts/test)"))
struct Kernel {}

/// A scratch directory under /tmp, removed at the end of the test along with anything
/// registered for cleanup (dm devices, loop devices, mounts), in reverse order.
final class Scratch {
    let directory: String
    private var cleanups: [() -> Void] = []

    init(_ label: String = #function) throws {
        let safe = label.filter { $0.isLetter || $0.isNumber }.prefix(24)
        directory = "/tmp/guard-kt-\(safe)-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    func path(_ name: String) -> String { "\(directory)/\(name)" }

    func defer_(_ body: @escaping () -> Void) { cleanups.append(body) }

    deinit {
        for cleanup in cleanups.reversed() { cleanup() }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// The result of a command.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs `argv` and waits for it: posix_spawn, both pipes read with poll(2) until they close,
/// waitpid(2) on the child itself. No Foundation Process, RunLoop or SIGCHLD source in the
/// way (a Process once waited forever here for a child that had exited). A command still
/// running after `hangSeconds` is killed and reported as hung: that bound only stops a hung
/// test, it is never a pass condition.
@discardableResult
func run(_ argv: [String], environment: [String: String]? = nil, input: String? = nil, hangSeconds: Double = 900) throws -> CommandResult {
    let program = argv[0].hasPrefix("/") ? argv[0] : "/usr/bin/env"
    let arguments = argv[0].hasPrefix("/") ? argv : ["/usr/bin/env"] + argv
    let variables = (environment ?? ProcessInfo.processInfo.environment).map { "\($0.key)=\($0.value)" }
    var outPipe: [Int32] = [0, 0]
    var errPipe: [Int32] = [0, 0]
    var inPipe: [Int32] = [0, 0]
    guard pipe(&outPipe) == 0, pipe(&errPipe) == 0, pipe(&inPipe) == 0 else {
        throw ShellError(command: argv.joined(separator: " "), status: -1, stderr: "pipe: \(String(cString: strerror(errno)))")
    }
    // Close-on-exec at once: a command another task spawns meanwhile must not inherit them.
    for fd in outPipe + errPipe + inPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    var pid: pid_t = 0
    let spawned = withCStrings(arguments) { argvPointer in
        withCStrings(variables) { envPointer in posix_spawn(&pid, program, &actions, nil, argvPointer, envPointer) }
    }
    for fd in [inPipe[0], outPipe[1], errPipe[1]] { close(fd) }
    guard spawned == 0 else {
        for fd in [inPipe[1], outPipe[0], errPipe[0]] { close(fd) }
        throw ShellError(command: argv.joined(separator: " "), status: -1, stderr: "posix_spawn \(program): \(String(cString: strerror(spawned)))")
    }
    if let input {
        let bytes = Array(input.utf8)
        _ = bytes.withUnsafeBytes { write(inPipe[1], $0.baseAddress, $0.count) }
    }
    close(inPipe[1])
    var outData = [UInt8]()
    var errData = [UInt8]()
    var openPipes: [Int32: Bool] = [outPipe[0]: true, errPipe[0]: true]
    let deadline = Date().addingTimeInterval(hangSeconds)
    var buffer = [UInt8](repeating: 0, count: 65536)
    while openPipes.values.contains(true) && Date() < deadline {
        var fds = openPipes.filter(\.value).keys.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let ready = poll(&fds, nfds_t(fds.count), 1000)
        if ready < 0 && errno != EINTR { break }
        for entry in fds where entry.revents != 0 {
            let count = read(entry.fd, &buffer, buffer.count)
            if count > 0 {
                if entry.fd == outPipe[0] { outData += buffer[0..<count] } else { errData += buffer[0..<count] }
            } else if count == 0 || errno != EINTR {
                openPipes[entry.fd] = false
            }
        }
    }
    close(outPipe[0])
    close(errPipe[0])
    var status: Int32 = 0
    if openPipes.values.contains(true) || Date() >= deadline {
        kill(pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
        Issue.record("`\(argv.joined(separator: " "))` still ran after \(Int(hangSeconds)) s: the machine is too slow or the test hung; it was killed")
        return CommandResult(status: -1, stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData, as: UTF8.self))
    }
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    // WIFEXITED: the low 7 bits are 0; the code is in bits 8-15. A signal gives 128 + its number.
    let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return CommandResult(status: code, stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData, as: UTF8.self))
}

/// A NULL-terminated C string array for the duration of `body`.
func withCStrings<T>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> T) -> T {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { pointers.forEach { free($0) } }
    return body(pointers)
}

/// Starts `argv` in a session of its own (setsid), detached from the test: no pipe to the
/// test (a shell's `cmd &` would hand it the test's pipes, and reading them would never end).
/// setsid forks (Process makes its child a group leader), so the command says its own pid.
func startDetached(_ argv: [String]) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/setsid")
    process.arguments = argv
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
}

/// Starts guard without waiting for it (a second blocking `run` would take the last thread of
/// the cooperative pool), its stdout and stderr into `output`, the test's environment plus `extra`.
@discardableResult
func startGuard(_ arguments: [String], output: String, extra: [String: String] = [:]) throws -> Process {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: guardBinary)
    process.arguments = arguments
    process.environment = guardEnvironment().merging(extra) { $1 }
    _ = FileManager.default.createFile(atPath: output, contents: nil)
    let log = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
    process.standardOutput = log
    process.standardError = log
    process.standardInput = FileHandle.nullDevice
    try process.run()
    return process
}

/// Runs a shell command line; fails the test with its stderr when it exits non-zero.
@discardableResult
func sh(_ command: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
    let result = try run(["/bin/sh", "-c", command])
    if result.status != 0 {
        Issue.record("`\(command)` exited \(result.status): \(result.stderr)", sourceLocation: sourceLocation)
        throw ShellError(command: command, status: result.status, stderr: result.stderr)
    }
    return result.stdout
}

struct ShellError: Error, CustomStringConvertible {
    var command: String
    var status: Int32
    var stderr: String
    var description: String { "`\(command)` exited \(status): \(stderr)" }
}

/// SHA-256 of a whole file or device, or of `length` bytes at `offset`.
func sha256(_ path: String, offset: UInt64? = nil, length: UInt64? = nil) throws -> String {
    let command: String
    if let offset, let length {
        command = "dd if='\(path)' bs=4096 iflag=skip_bytes,count_bytes skip=\(offset) count=\(length) status=none | sha256sum"
    } else {
        command = "sha256sum < '\(path)'"
    }
    return String(try sh(command).prefix(64))
}

/// Makes a file of `mebibytes` MiB of random bytes.
func makeRandomFile(_ path: String, mebibytes: Int) throws {
    try sh("head -c \(mebibytes)M /dev/urandom > '\(path)'")
}

/// Makes a sparse file of `mebibytes` MiB.
func makeSparseFile(_ path: String, mebibytes: Int) throws {
    try sh("truncate -s \(mebibytes)M '\(path)'")
}

/// A unique device name for this test run.
func uniqueName(_ base: String) -> String {
    "gt-\(base)-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
}

/// Flushes a block device's page cache so the next read comes from the device.
func dropCaches(_ path: String) throws {
    try sh("blockdev --flushbufs '\(path)' 2>/dev/null; echo 3 > /proc/sys/vm/drop_caches")
}

/// The environment guard runs in under test: no colors, and no site configuration unless a
/// test names one (an /etc/guard/guard.conf on the machine must not change what is tested).
func guardEnvironment() -> [String: String] {
    var environment = ProcessInfo.processInfo.environment
    environment["NO_COLOR"] = "1"
    if environment["GUARD_CONFIG"] == nil { environment["GUARD_CONFIG"] = "/dev/null" }
    return environment
}

/// `guard-test`, the `guard` program with its test hooks on (GUARD_CRASH_AT, GUARD_NOW), built
/// beside the test bundle: what the kernel suite runs.
var guardBinary: String { builtBinary("guard-test", variable: "GUARD_BINARY") }

/// `guard` as users run it (installed and packaged): it ignores the test hooks.
var plainGuardBinary: String { builtBinary("guard", variable: "GUARD_PLAIN_BINARY") }

func builtBinary(_ name: String, variable: String) -> String {
    // Scripts/test copies the binaries into the VM's memory: exec'ing one from the 9p root costs seconds.
    if let path = ProcessInfo.processInfo.environment[variable], FileManager.default.isExecutableFile(atPath: path) {
        return path
    }
    let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    let directory = URL(fileURLWithPath: executable).deletingLastPathComponent()
    for candidate in [directory.appendingPathComponent(name).path, ".build/debug/\(name)"]
    where FileManager.default.isExecutableFile(atPath: candidate) {
        return candidate
    }
    return name
}

/// journald's native socket, played by a test: every datagram guard sends, as fields, read
/// as it comes (as journald does: a sender never finds the queue full).
final class SystemLogListener: @unchecked Sendable {
    // @unchecked: `entries` is only touched under `lock`.
    static let path = "/run/systemd/journal/socket"
    let descriptor: Int32
    private let lock = NSLock()
    private var entries: [[String: String]] = []
    private var reader: Thread?

    init() throws {
        try FileManager.default.createDirectory(atPath: "/run/systemd/journal", withIntermediateDirectories: true)
        descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in Self.path.utf8.enumerated() { buffer[index] = byte }
        }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard bound == 0 else { throw ShellError(command: "bind \(Self.path)", status: errno, stderr: String(cString: strerror(errno))) }
        let socketFD = descriptor
        reader = Thread { [weak self] in
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let count = recv(socketFD, &buffer, buffer.count, 0)
                guard count > 0, let self else { return }
                let entry = SystemLog.fields(ofNativeEntry: Array(buffer[0..<count]))
                self.lock.withLock { self.entries.append(entry) }
            }
        }
        reader?.start()
    }

    /// Every entry received since the last drain.
    func drain() -> [[String: String]] {
        usleep(200_000)  // the last datagrams of a process that just exited
        return lock.withLock {
            defer { entries.removeAll() }
            return entries
        }
    }

    func close() {
        shutdown(descriptor, Int32(SHUT_RDWR))
        Glibc.close(descriptor)
        unlink(Self.path)
    }
}
