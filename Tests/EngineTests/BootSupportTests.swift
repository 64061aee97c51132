import Foundation
@testable import Engine
import Recipe
import Testing

/// Issue 19: when guard may snapshot a volume the initramfs mounts (/, /usr).
@Suite("boot support: the initramfs stamp")
struct BootSupportTests {
    func scratch() throws -> String {
        let directory = NSTemporaryDirectory() + "guard-boot-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory + "/initramfs", withIntermediateDirectories: true)
        return directory
    }

    @Test("no stamp for the running kernel: refused, naming the kernel and the stamp")
    func noStamp() throws {
        let state = try scratch()
        defer { try? FileManager.default.removeItem(atPath: state) }
        let problem = try #require(BootSupport(stateDirectory: state).problem(target: "/", cow: .device("/dev/vg/rootcow")))
        #expect(problem.contains(BootSupport.kernelRelease))
        #expect(problem.contains("\(state)/initramfs/\(BootSupport.kernelRelease)"))
        #expect(problem.contains("the rollback would be lost"))
    }

    @Test("a stamp of this guard binary and a COW device: allowed; another binary or a COW file: refused, saying why")
    func stamp() throws {
        let state = try scratch()
        defer { try? FileManager.default.removeItem(atPath: state) }
        let stamp = "\(state)/initramfs/\(BootSupport.kernelRelease)"
        let own = try #require(BootSupport.ownBinary)
        try "guard=\(own)\nstate_device=/dev/mapper/vg-state\n".write(toFile: stamp, atomically: true, encoding: .utf8)
        let support = BootSupport(stateDirectory: state)
        #expect(support.problem(target: "/", cow: .device("/dev/vg/rootcow")) == nil)
        let file = try #require(support.problem(target: "/", cow: nil))
        #expect(file.contains("needs a COW device"))
        #expect(support.problem(target: "/usr", cow: .directory("/var/lib/guard/cow"))?.contains("needs a COW device") == true)

        try "guard=1:2\n".write(toFile: stamp, atomically: true, encoding: .utf8)
        let other = try #require(support.problem(target: "/", cow: .device("/dev/vg/rootcow")))
        #expect(other.contains("another guard binary") && other.contains("update-initramfs -u"))
    }
}

/// The marker the initramfs script leaves in /run: the booted system's `guard recover --boot`
/// leaves the work to the initramfs only when its recovery there succeeded.
@Suite("boot support: the initramfs marker")
struct InitramfsMarkerTests {
    @Test("status 0 and the state volume not mounted yet: done; a failure or no marker: recovery goes on, a failure is a problem")
    func marker() throws {
        let state = NSTemporaryDirectory() + "guard-marker-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: state) }
        let marker = state + "/initramfs-marker"
        let recovery = Recovery(context: GuardContext(stateDirectory: state + "/unmounted", reporter: SilentReporter()))

        var report = Recovery.Report()
        #expect(!recovery.initramfsDidTheWork(marker: marker, report: &report), "no marker: no guard in this boot's initramfs")
        #expect(report.actions.isEmpty && report.problems.isEmpty)

        try "0\n".write(toFile: marker, atomically: true, encoding: .utf8)
        #expect(recovery.initramfsDidTheWork(marker: marker, report: &report))
        #expect(report.actions.count == 1 && report.actions[0].contains("the initramfs reassembled guard's snapshots"))

        for status in ["1\n", "141\n", ""] {
            try status.write(toFile: marker, atomically: true, encoding: .utf8)
            var failed = Recovery.Report()
            #expect(!recovery.initramfsDidTheWork(marker: marker, report: &failed))
            #expect(failed.actions.isEmpty)
            #expect(failed.problems.count == 1 && failed.problems[0].contains("guard's recovery in the initramfs failed"), "\(failed.problems)")
            #expect(failed.problems[0].contains("holds exit status \(status.isEmpty ? "nothing" : String(status.dropLast()))"))
        }
    }
}
