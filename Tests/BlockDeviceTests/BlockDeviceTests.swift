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

    @Test("Spawn.run runs a helper to its end: its status, its output, stderr kept or dropped, a signal as 128 + N")
    func spawnRun() throws {
        let both = try Spawn.run("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
        #expect(both.status == 3)
        #expect(both.text == "out\nerr")
        let quiet = try Spawn.run("/bin/sh", ["-c", "echo out; echo err >&2"], stderr: .discarded)
        #expect(quiet.status == 0)
        #expect(quiet.output == Array("out\n".utf8))
        // Output larger than a pipe's buffer is read while the program writes it.
        let large = try Spawn.run("/bin/sh", ["-c", "head -c 1000000 /dev/zero"])
        #expect(large.output.count == 1_000_000)
        #expect(try Spawn.run("/bin/sh", ["-c", "kill -TERM $$"]).status == 128 + SIGTERM)
        #expect(try Spawn.run("/bin/sh", ["-c", "echo $GUARD_SPAWN_TEST"], environment: ["GUARD_SPAWN_TEST": "given"]).text == "given")
        #expect(throws: SpawnError.child(path: "/nonexistent/program", errno: ENOENT)) { try Spawn.run("/nonexistent/program", []) }
    }

    @Test("RawFile.replace puts a whole new file in place with the mode asked for, and leaves no temporary file")
    func replaceFile() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-replace-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/guard.prom"
        try RawFile.replace(path, with: Array("old\n".utf8), mode: 0o644)
        try RawFile.replace(path, with: Array("new\n".utf8), mode: 0o644)
        #expect(FileManager.default.contents(atPath: path) == Data("new\n".utf8))
        let mode = try #require(try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int)
        #expect(mode & 0o077 == 0o044 & ~Int(umaskValue()), "readable by others (node_exporter) unless the umask says no: \(String(mode, radix: 8))")
        try RawFile.replace(directory + "/private", with: [1], mode: 0o600)
        #expect(try FileManager.default.attributesOfItem(atPath: directory + "/private")[.posixPermissions] as? Int == 0o600)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == ["guard.prom", "private"])
        #expect(throws: BlockDeviceError.self) { try RawFile.replace(directory + "/missing/file", with: [1]) }
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

@Suite("signatures")
struct SignatureTests {
    @Test("libblkid's probe names the filesystem, swap or partition table on an image, and nothing on random data")
    func probe() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-signatures-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func image(_ name: String, _ command: String) throws -> String {
            let path = "\(directory)/\(name)"
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", "head -c 16M /dev/urandom > '\(path)' && \(command.replacingOccurrences(of: "IMAGE", with: "'\(path)'")) >/dev/null 2>&1"]
            try process.run()
            process.waitUntilExit()
            #expect(process.terminationStatus == 0, "\(command)")
            return path
        }
        #expect(try BlockDevices.signatures(of: image("ext4", "mkfs.ext4 -q -F IMAGE")).contains("ext4"))
        #expect(try BlockDevices.signatures(of: image("swap", "PATH=$PATH:/sbin:/usr/sbin mkswap IMAGE")) == ["swap"])
        #expect(try BlockDevices.signatures(of: image("random", "true")) == [])
        #expect(throws: BlockDeviceError.self) { try BlockDevices.signatures(of: "\(directory)/missing") }
    }
}

/// This process's umask (read by setting it and putting it back).
func umaskValue() -> mode_t {
    let value = umask(0o022)
    umask(value)
    return value
}
