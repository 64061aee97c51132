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
