import BlockDevice
import Foundation
import Testing

@Suite("block devices (host)")
struct BlockDeviceTests {
    @Test("paths are normalised lexically and compared by component")
    func paths() {
        #expect(Mounts.normalize("/mnt//website/./db/../") == "/mnt/website")
        #expect(Mounts.isPath("/mnt/website/db", under: "/mnt/website"))
        #expect(!Mounts.isPath("/mnt/website2", under: "/mnt/website"))
        #expect(Mounts.isPath("/anything", under: "/"))
    }

    @Test("the mount table is read through libmount")
    func mountTable() throws {
        let mounts = try Mounts.current()
        let root = try #require(mounts.first { $0.target == "/" })
        #expect(!root.fileSystemType.isEmpty)
        #expect(Mounts.entry(containing: "/proc/self")?.fileSystemType == "proc")
        #expect(Mounts.entry(at: "/proc")?.target == "/proc")
    }

    @Test("errors name the call and errno")
    func errors() {
        do {
            _ = try BlockDevices.deviceNumber(of: "/nonexistent/device")
            Issue.record("must fail")
        } catch {
            #expect(error.code == .notFound)
            #expect(error.description == "look-up of block device /nonexistent/device failed: stat(/nonexistent/device) returned ENOENT (No such file or directory)")
        }
        do {
            _ = try BlockDevices.deviceNumber(of: "/etc/hostname")
            Issue.record("must fail")
        } catch {
            #expect(error.code == .notABlockDevice)
        }
    }

    @Test("a busy unmount would name who holds it: processes are found by the filesystem they use")
    func holders() throws {
        let device = try BlockDevices.filesystemDevice(of: FileManager.default.currentDirectoryPath)
        let me = Mounts.processes(using: device)
        #expect(me.allSatisfy { $0.pid != getpid() }, "guard never lists itself")
    }
}
