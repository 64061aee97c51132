import BlockDevice
import Foundation
import Recipe
import Testing

@testable import Engine

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
        #expect(report.actions.count == 1 && report.actions[0].contains("the initramfs reassembled guard's snapshots of / and /usr"))

        for status in ["1\n", "141\n", ""] {
            try status.write(toFile: marker, atomically: true, encoding: .utf8)
            var failed = Recovery.Report()
            #expect(!recovery.initramfsDidTheWork(marker: marker, report: &failed))
            #expect(failed.actions.isEmpty)
            #expect(failed.problems.count == 1 && failed.problems[0].contains("guard's recovery in the initramfs failed"), "\(failed.problems)")
            #expect(failed.problems[0].contains("holds exit status \(status.isEmpty ? "nothing" : String(status.dropLast()))"))
        }
    }

    @Test(
        "the boot must reach the state and COW directories before the guarded volumes: on /, fine; on a filesystem /etc/fstab does not mount, refused; on one it mounts, only with guard's generator; without systemd, not asked"
    )
    func bootReachability() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-reach-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let fstab = directory + "/fstab"
        try "/dev/root / ext4 defaults 0 1\n".write(toFile: fstab, atomically: true, encoding: .utf8)
        // /proc is a filesystem of its own on any Linux machine: it stands for a separate /var.
        #expect(BootSupport.bootReachabilityProblem(["/proc/guard"], fstab: fstab, systemd: false) == nil, "without systemd guard orders nothing at boot")
        let unlisted = try #require(BootSupport.bootReachabilityProblem(["/proc/guard"], fstab: fstab, systemd: true))
        #expect(unlisted.contains("/proc/guard is on /proc, which /etc/fstab does not mount"), "\(unlisted)")
        try "/dev/root / ext4 defaults 0 1\nproc /proc proc defaults 0 0\n".write(toFile: fstab, atomically: true, encoding: .utf8)
        if !BootSupport.generatorPaths.contains(where: { FileManager.default.isExecutableFile(atPath: $0) }) {
            let noGenerator = try #require(BootSupport.bootReachabilityProblem(["/proc/guard"], fstab: fstab, systemd: true))
            #expect(noGenerator.contains("guard's systemd generator") && noGenerator.contains("is not installed"), "\(noGenerator)")
        }
        if Mounts.mountPoint(holding: directory) == "/" {
            #expect(BootSupport.bootReachabilityProblem([directory], fstab: fstab, systemd: true) == nil, "on the root filesystem: guard-reassemble.service reaches it")
        }
    }
}
