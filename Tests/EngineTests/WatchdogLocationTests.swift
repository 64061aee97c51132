import Foundation
import Testing

@testable import Engine

/// Issue 18: guard starts `guard-watchdog` (small, no Foundation), found beside it or where
/// Scripts/install puts it; guard itself only where neither is there.
@Test("the watchdog program: beside guard, then ../lib/guard/, then guard __watchdog")
func watchdogLocation() throws {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("guard-watchdog-\(UInt32.random(in: 0...UInt32.max))").path
    defer { try? FileManager.default.removeItem(atPath: root) }
    let sbin = "\(root)/usr/sbin", lib = "\(root)/usr/lib/guard"
    try FileManager.default.createDirectory(atPath: sbin, withIntermediateDirectories: true)
    try FileManager.default.createDirectory(atPath: lib, withIntermediateDirectories: true)
    let executable = "\(sbin)/guard"
    #expect(ProcessWatchdog.server(for: executable) == (executable, ["__watchdog"]))
    #expect(FileManager.default.createFile(atPath: "\(lib)/guard-watchdog", contents: Data(), attributes: [.posixPermissions: 0o755]))
    #expect(ProcessWatchdog.server(for: executable) == ("\(lib)/guard-watchdog", []))
    #expect(FileManager.default.createFile(atPath: "\(sbin)/guard-watchdog", contents: Data(), attributes: [.posixPermissions: 0o644]))
    #expect(ProcessWatchdog.server(for: executable) == ("\(lib)/guard-watchdog", []), "a file that is not executable is passed over")
    try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: "\(sbin)/guard-watchdog")
    #expect(ProcessWatchdog.server(for: executable) == ("\(sbin)/guard-watchdog", []))
}
