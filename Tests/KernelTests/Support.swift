import BlockDevice
import DeviceMapper
import Foundation
import Testing

/// Whether this machine can run the kernel suite: root and a device-mapper driver that answers.
/// Asked of the driver itself: /dev/mapper/control can exist where the driver does not.
let kernelHasDeviceMapper: Bool = DeviceMapper.isAvailable

/// The kernel suite. Its tests share the kernel's device list and loop devices, so they run one at a time.
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

/// Runs `argv` and waits for it.
@discardableResult
func run(_ argv: [String], environment: [String: String]? = nil, input: String? = nil) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: argv[0].hasPrefix("/") ? argv[0] : "/usr/bin/env")
    process.arguments = argv[0].hasPrefix("/") ? Array(argv.dropFirst()) : argv
    if let environment { process.environment = environment }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    let inPipe = Pipe()
    process.standardInput = input == nil ? FileHandle.nullDevice : inPipe
    try process.run()
    if let input {
        inPipe.fileHandleForWriting.write(Data(input.utf8))
        try inPipe.fileHandleForWriting.close()
    }
    // Read both pipes while the process runs, or a chatty process blocks on a full pipe.
    let group = DispatchGroup()
    nonisolated(unsafe) var outData = Data()
    nonisolated(unsafe) var errData = Data()
    group.enter()
    DispatchQueue.global().async {
        outData = out.fileHandleForReading.readDataToEndOfFile()
        group.leave()
    }
    errData = err.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    process.waitUntilExit()
    return CommandResult(
        status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
        stderr: String(decoding: errData, as: UTF8.self))
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

/// The `guard` binary built beside the test bundle.
var guardBinary: String {
    // Scripts/test copies the binary into the VM's memory: exec'ing it from the 9p root costs seconds.
    if let path = ProcessInfo.processInfo.environment["GUARD_BINARY"], FileManager.default.isExecutableFile(atPath: path) {
        return path
    }
    let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    let directory = URL(fileURLWithPath: executable).deletingLastPathComponent()
    for candidate in [directory.appendingPathComponent("guard").path, ".build/debug/guard"]
    where FileManager.default.isExecutableFile(atPath: candidate) {
        return candidate
    }
    return "guard"
}
