import BlockDevice
import DeviceMapper
import Foundation
import Testing

extension Kernel {
    /// Issue 3: the DeviceMapper and BlockDevice layers against a real kernel.
    @Suite("device-mapper and block devices")
    struct DeviceMapperKernelTests {
        /// A 16 MiB random file on a loop device, with a GUARD- linear device over all of it.
        struct LinearFixture {
            let scratch: Scratch
            let dm: DeviceMapper
            let loop: LoopDevice
            let name: String
            let file: String
            let sectors: UInt64 = 16 * 2048

            init(udev: UdevMode = .automatic, label: String = #function) throws {
                scratch = try Scratch(label)
                dm = try DeviceMapper(udev: udev)
                file = scratch.path("backing.img")
                try makeRandomFile(file, mebibytes: 16)
                let handle = try LoopDevice.attach(file: file)
                loop = handle.device
                let loop = self.loop
                scratch.defer_ { try? loop.detach() }
                name = uniqueName("linear")
                let name = self.name
                let dm = self.dm
                try dm.create(
                    name: name, uuid: "GUARD-test-\(name)", table: Table(.linear(device: loop.number, offset: 0), length: sectors))
                scratch.defer_ { try? dm.remove(.name(name)) }
            }

            var path: String { "/dev/mapper/\(name)" }
        }

        @Test("a linear device over a loop device reads and writes the loop device's bytes", arguments: [UdevMode.none, .cookies])
        func linearReadsAndWritesLoopBytes(udev: UdevMode) throws {
            let fixture = try LinearFixture(udev: udev)
            #expect(FileManager.default.fileExists(atPath: fixture.path), "the /dev/mapper node exists in \(udev) mode")
            #expect(try sha256(fixture.path) == sha256(fixture.loop.path))
            #expect(try sha256(fixture.path) == sha256(fixture.file))

            // Write 1 MiB of new bytes at 5 MiB through the dm device; the file shows them.
            let patch = fixture.scratch.path("patch")
            try makeRandomFile(patch, mebibytes: 1)
            try sh("dd if='\(patch)' of='\(fixture.path)' bs=1M seek=5 conv=fsync oflag=direct status=none")
            #expect(try sha256(fixture.file, offset: 5 << 20, length: 1 << 20) == sha256(patch))

            let info = try fixture.dm.requireInfo(.name(fixture.name))
            #expect(info.uuid == "GUARD-test-\(fixture.name)")
            #expect(info.hasLiveTable && !info.hasInactiveTable && !info.isSuspended)
            #expect(try fixture.dm.table(.name(fixture.name)) == Table(.linear(device: fixture.loop.number, offset: 0), length: fixture.sectors))

            try fixture.dm.remove(.name(fixture.name))
            #expect(try fixture.dm.info(.name(fixture.name)) == nil)
            #expect(!FileManager.default.fileExists(atPath: fixture.path), "the node is gone after remove in \(udev) mode")
        }

        @Test("reloading to an error target gives EIO; back to linear restores the data")
        func errorTargetThenLinear() throws {
            let fixture = try LinearFixture()
            let before = try sha256(fixture.path)
            try fixture.dm.load(.name(fixture.name), table: Table(.error, length: fixture.sectors))
            #expect(try fixture.dm.requireInfo(.name(fixture.name)).hasInactiveTable)
            try fixture.dm.suspend(.name(fixture.name))
            try fixture.dm.resume(.name(fixture.name))
            #expect(try fixture.dm.table(.name(fixture.name)).lines.first?.target == .error)

            let read = try run(["/bin/dd", "if=\(fixture.path)", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"])
            #expect(read.status != 0)
            #expect(read.stderr.contains("Input/output error"), "dd said: \(read.stderr)")

            try fixture.dm.load(.name(fixture.name), table: Table(.linear(device: fixture.loop.number, offset: 0), length: fixture.sectors))
            try fixture.dm.suspend(.name(fixture.name))
            try fixture.dm.resume(.name(fixture.name))
            try dropCaches(fixture.path)
            #expect(try sha256(fixture.path) == before)
        }

        @Test("writes issued while suspended complete after resume")
        func writesWhileSuspended() async throws {
            let fixture = try LinearFixture()
            let patch = fixture.scratch.path("patch")
            try makeRandomFile(patch, mebibytes: 1)
            try fixture.dm.suspend(.name(fixture.name))
            let started = Date()
            let target = fixture.path
            let writer = Task.detached { @Sendable in
                try run(["/bin/dd", "if=\(patch)", "of=\(target)", "bs=1M", "seek=3", "oflag=direct", "conv=fsync", "status=none"])
            }
            try await Task.sleep(for: .milliseconds(800))
            let info = try fixture.dm.requireInfo(.name(fixture.name))
            #expect(info.isSuspended)
            // The write cannot have reached the loop file yet.
            #expect(try sha256(fixture.file, offset: 3 << 20, length: 1 << 20) != sha256(patch))
            try fixture.dm.resume(.name(fixture.name))
            let result = try await writer.value
            #expect(result.status == 0, "dd: \(result.stderr)")
            #expect(Date().timeIntervalSince(started) >= 0.8, "the write waited for the resume")
            #expect(try sha256(fixture.file, offset: 3 << 20, length: 1 << 20) == sha256(patch))
        }

        @Test("remove of an open device fails with a clear message and succeeds after close")
        func removeOpenDevice() throws {
            let fixture = try LinearFixture()
            let fd = open(fixture.path, O_RDONLY)
            #expect(fd >= 0)
            var failure: DeviceMapperError?
            do {
                try fixture.dm.remove(.name(fixture.name), attempts: 2)
            } catch let error as DeviceMapperError {
                failure = error
            }
            close(fd)
            let error = try #require(failure, "remove of an open device must fail")
            #expect(error.code == .busy)
            let text = error.description
            #expect(text.contains("remove of \(fixture.name) failed"), "\(text)")
            #expect(text.contains("EBUSY"), "\(text)")
            #expect(text.contains("open count 1"), "\(text)")
            #expect(text.contains("(guardPackageTes") || text.contains("opened by pid \(getpid())") || text.contains("open count"), "\(text)")
            try fixture.dm.remove(.name(fixture.name))
            #expect(try fixture.dm.info(.name(fixture.name)) == nil)
        }

        @Test("listing finds exactly the GUARD- devices")
        func listingFindsGuardDevices() throws {
            let fixture = try LinearFixture()
            let dm = fixture.dm
            let other = uniqueName("foreign")
            let second = uniqueName("second")
            try dm.create(name: other, uuid: "TEST-\(other)", table: Table(.zero, length: 2048))
            defer { try? dm.remove(.name(other)) }
            try dm.create(name: second, uuid: "GUARD-test-\(second)", table: Table(.error, length: 2048))
            defer { try? dm.remove(.name(second)) }

            let listed = try dm.list()
            var guardNames = Set(try dm.guardDevices().map(\.name))
            #expect(guardNames.contains(fixture.name) && guardNames.contains(second))
            #expect(!guardNames.contains(other))
            #expect(listed.contains { $0.name == other && $0.uuid == "TEST-\(other)" })
            // What dmsetup sees with a GUARD- UUID is exactly what guard lists. Tests running
            // beside this one create and remove devices: the two listings must agree once
            // nothing changed between them (a few tries), not on the first try.
            var expected: Set<String> = []
            for _ in 0..<5 {
                let dmsetup = try sh("dmsetup info -c --noheadings -o name,uuid --separator ' '")
                expected = Set(
                    dmsetup.split(separator: "\n").compactMap { line -> String? in
                        let fields = line.split(separator: " ")
                        return fields.count == 2 && fields[1].hasPrefix("GUARD-") ? String(fields[0]) : nil
                    })
                if guardNames == expected { break }
                guardNames = Set(try dm.guardDevices().map(\.name))
            }
            #expect(guardNames == expected)
            let numbers = Dictionary(uniqueKeysWithValues: listed.map { ($0.name, $0.number) })
            #expect(numbers[fixture.name] == (try BlockDevices.deviceNumber(of: fixture.path)))
        }

        @Test("mount and unmount through libmount; a held mount names the process")
        func mountUnmountAndHolders() throws {
            let fixture = try LinearFixture()
            try sh("mkfs.ext4 -q -F '\(fixture.path)'")
            let mountPoint = fixture.scratch.path("mnt")
            try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
            try Mounts.mount(source: fixture.path, target: mountPoint, fileSystemType: "ext4")
            let entry = try #require(Mounts.entry(at: mountPoint))
            #expect(entry.fileSystemType == "ext4")
            #expect(entry.device == (try BlockDevices.deviceNumber(of: fixture.path)))
            try "hello".write(toFile: "\(mountPoint)/file", atomically: false, encoding: .utf8)

            // A process holding a file open keeps the filesystem busy; the error names it.
            let holder = Process()
            holder.executableURL = URL(fileURLWithPath: "/bin/sh")
            // The file is open (fd 3) before tail runs; the test waits for the process to be tail.
            holder.arguments = ["-c", "exec 3<'\(mountPoint)/file'; exec tail -f '\(mountPoint)/file' > /dev/null"]
            try holder.run()
            try waitUntilNow("the holder to run tail") {
                (try? String(contentsOfFile: "/proc/\(holder.processIdentifier)/comm", encoding: .utf8)) == "tail\n"
            }
            var failure: BlockDeviceError?
            do { try Mounts.unmount(mountPoint) } catch { failure = error }
            kill(holder.processIdentifier, SIGKILL)  // SIGKILL: a child of a test thread may inherit a mask that blocks SIGTERM
            holder.waitUntilExit()
            let error = try #require(failure, "unmount must fail while tail holds a file")
            #expect(error.code == .busy)
            #expect(error.description.contains("pid \(holder.processIdentifier) (tail)"), "\(error)")
            #expect(error.description.contains("unmount of \(mountPoint) failed"), "\(error)")

            try Mounts.unmount(mountPoint)
            #expect(Mounts.entry(at: mountPoint) == nil)
        }

        @Test("a nonexistent device and a malformed table give one clear error naming the device")
        func badInput() throws {
            let fixture = try LinearFixture()
            let missing = uniqueName("missing")
            do {
                _ = try fixture.dm.table(.name(missing))
                Issue.record("a table query of a missing device must fail")
            } catch let error as DeviceMapperError {
                #expect(error.code == .notFound)
                #expect(error.description.contains("table query of \(missing) failed"), "\(error)")
                #expect(error.description.contains("ENXIO"), "\(error)")
            }
            #expect(try fixture.dm.info(.name(missing)) == nil)

            // A snapshot whose COW is the linear device and origin a nonexistent number: the kernel refuses.
            let bad = Table(.snapshot(origin: DeviceNumber(major: 7, minor: 250), cow: fixture.loop.number, persistence: .persistent, chunkSectors: 8), length: 2048)
            do {
                try fixture.dm.load(.name(fixture.name), table: bad)
                Issue.record("loading a snapshot of a missing origin must fail")
            } catch let error as DeviceMapperError {
                #expect(error.code == .invalidArgument || error.code == .notFound || error.code == .busy, "\(error)")
                #expect(error.description.contains("reload of \(fixture.name) failed: DM_DEVICE_RELOAD 'snapshot 7:250"), "\(error)")
                #expect(error.description.contains("kernel: device-mapper:"), "the kernel's reason is included: \(error)")
            }
            #expect(try fixture.dm.requireInfo(.name(fixture.name)).hasInactiveTable == false)
        }

        @Test("the driver and the snapshot targets report versions")
        func versions() throws {
            let dm = try DeviceMapper()
            let version = try dm.driverVersion()
            #expect(version.hasPrefix("4."))
            let targets = try dm.targetVersions()
            #expect(targets["linear"] != nil && targets["snapshot"] != nil && targets["snapshot-origin"] != nil && targets["snapshot-merge"] != nil, "\(targets)")
        }
    }
}
