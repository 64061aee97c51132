import BlockDevice
import DeviceMapper
import Foundation
import Testing
import Watchdog

@testable import Engine

/// Issue 18: guard starts `guard-watchdog` (small, no Foundation), found beside it or where
/// Scripts/install puts it; guard itself only where neither is there.
@Test("the watchdog program: beside guard, then ../lib/guard/, then guard __watchdog")
func watchdogLocation() throws {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("guard-watchdog-\(UInt32.random(in: 0...UInt32.max))").path
    defer { try? FileManager.default.removeItem(atPath: root) }
    let sbin = "\(root)/usr/sbin"
    let lib = "\(root)/usr/lib/guard"
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

/// Issue 39: the watchdog finishes a window guard left: the rest of its suspends, its resumes,
/// and the removal of a stateful -real that must never be live again.
@Test("the watchdog's arm line carries the window's suspends, resumes and removals; an arm without keywords resumes its refs")
func watchdogPlanOnTheWire() {
    let origin = DeviceRef.number(DeviceNumber(major: 254, minor: 3))
    let snap = DeviceRef.uuid("GUARD-t-0-snap")
    let real = DeviceRef.uuid("GUARD-t-0-real")
    let plan = WatchdogPlan(suspend: [origin, snap, real], resume: [origin], remove: [snap, real])
    let line = WatchdogProtocol.encode(plan)
    #expect(line == "suspend dev=254:3 uuid=GUARD-t-0-snap uuid=GUARD-t-0-real resume dev=254:3 remove uuid=GUARD-t-0-snap uuid=GUARD-t-0-real")
    #expect(WatchdogProtocol.decodePlan(line.split(separator: " ")) == plan)
    #expect(WatchdogProtocol.decodePlan("dev=254:3 dev=254:4".split(separator: " ")) == WatchdogPlan(resume: [origin, .number(DeviceNumber(major: 254, minor: 4))]))
}
