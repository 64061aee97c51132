import BlockDevice
import DeviceMapper
import Engine
import Foundation
import Testing

@testable import Snapshot

/// A guard volume on a loop file with ext4, mounted, in a scratch state directory.
final class VolumeFixture {
    let scratch: Scratch
    let dm: DeviceMapper
    let engine: SnapshotEngine
    let volumes: GuardVolumes
    let stateDirectory: String
    let cowDirectory: String
    var volume: GuardVolume
    let mountPoint: String

    init(megabytes: Int = 100, label: String = #function, mount: Bool = true, fileSystem: Bool = true) throws {
        scratch = try Scratch(label)
        dm = try DeviceMapper()
        // Every suspend is armed: the watchdog guard runs, beside the binary under test.
        var engine = SnapshotEngine(dm: dm)
        engine.watchdog = ProcessWatchdog(executable: guardBinary, log: { _ in })
        self.engine = engine
        stateDirectory = scratch.path("state")
        cowDirectory = "\(stateDirectory)/cow"
        try FileManager.default.createDirectory(atPath: cowDirectory, withIntermediateDirectories: true)
        volumes = GuardVolumes(dm: dm, stateDirectory: stateDirectory)
        volume = try volumes.create(name: uniqueName("vol"), backing: scratch.path("website.img"), size: UInt64(megabytes) << 20)
        mountPoint = scratch.path("mnt")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let (volumes, name, mountPoint, dm, cow) = (volumes, volume.name, mountPoint, dm, cowDirectory)
        scratch.defer_ {
            // Whatever a failed test left: mounts, layers, the volume, COW files.
            try? Mounts.unmount(mountPoint)
            for device in (try? dm.guardDevices()) ?? [] where device.name.contains(name) {
                try? Mounts.unmount(device.name)
            }
            for device in ((try? dm.guardDevices()) ?? []).filter({ $0.name.hasPrefix("guard-") && $0.name.contains(name) }) {
                try? dm.remove(.name(device.name))
            }
            try? volumes.remove(name: name)
            for storage in SnapshotEngine.cowFiles(in: cow) {
                for loop in LoopDevice.find(backingFile: storage.path) { try? loop.detach() }
            }
        }
        if fileSystem {
            try sh("mkfs.ext4 -q -F '\(volume.path)'")
            if mount { try self.mount() }
        }
    }

    func mount() throws { try Mounts.mount(source: volume.path, target: mountPoint, fileSystemType: "ext4") }
    func unmount() throws { try Mounts.unmount(mountPoint) }

    func request(size: CowSize = .bytes(25 << 20), chunkSectors: UInt32 = 8) -> VolumeRequest {
        VolumeRequest(origin: volume.path, storage: .fileIn(directory: cowDirectory), size: size, chunkSectors: chunkSectors)
    }

    /// The tutorial's database: 2000 rows "name,email".
    func writeDatabase() throws {
        let rows = (1...2000).map { "user\($0),user\($0)@example.com" }.joined(separator: "\n") + "\n"
        try rows.write(toFile: "\(mountPoint)/database", atomically: false, encoding: .utf8)
        try "<html>v1</html>\n".write(toFile: "\(mountPoint)/index.html", atomically: false, encoding: .utf8)
        try sh("sync")
    }

    /// The tutorial's bad migration: a sed that mangles every row.
    func badMigration() throws {
        try sh("sed -i 's/@/ at /; s/,/;/' '\(mountPoint)/database' && head -c 3M /dev/urandom > '\(mountPoint)/new-assets.bin' && sync")
    }

    /// The good migration: every row gets an id.
    func goodMigration() throws {
        try sh(
            "nl -n rz -w 5 '\(mountPoint)/database' | sed 's/\\t/,/; s/^/id:/' > '\(mountPoint)/database.new' && mv '\(mountPoint)/database.new' '\(mountPoint)/database' && sync")
    }

    var cowFiles: [String] { SnapshotEngine.cowFiles(in: cowDirectory).map(\.path) }

    /// Layers of guard runs still in the kernel for this volume.
    func layers() throws -> [DeviceSummary] {
        try dm.guardDevices().filter { StackIdentity.parse(uuid: $0.uuid) != nil && $0.name.contains(volume.name) }
    }

    /// Waits for a merge to complete (polling the kernel's status) and tears it down.
    func finishMerge(_ stack: SnapshotStack, timeout: Double = 600) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            switch try engine.mergeState(stack) {
            case .complete, .finished:
                try engine.finishMerge(stack)
                return
            case .failed(let status):
                Issue.record("merge failed: \(status)")
                return
            case .needsReassembly(let why):
                Issue.record("the merge is not live: \(why)")
                return
            case .merging:
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
        Issue.record("merge did not complete in \(timeout) s: the machine is too slow or the test hung")
    }
}

extension Kernel {
    /// Issue 4: the snapshot engine on real dm-snapshot, loop devices and ext4.
    @Suite("snapshot engine")
    struct SnapshotKernelTests {
        @Test("the tutorial at library level: bad migration merged back byte for byte, good one committed")
        func tutorialScenario() throws {
            let fixture = try VolumeFixture()
            try fixture.writeDatabase()
            let databaseBefore = try sha256("\(fixture.mountPoint)/database")

            // Snapshot the mounted volume: 25 MiB, like `lvcreate -s -L 25M`.
            let live = try fixture.engine.prepare([fixture.request()], token: StackIdentity.newToken()).take()
            #expect(live.suspendMicroseconds > 0)
            let stack = live.stacks[0]
            let snapImage = try sha256(stack.snapPath)
            let originTable = try fixture.dm.table(.name(fixture.volume.name))
            #expect(originTable.lines.first?.target.typeName == "snapshot-origin")
            #expect(try fixture.dm.table(stack.ref(.snap)).lines.first?.target.typeName == "snapshot")
            let health = try fixture.engine.health(stack)
            #expect(health.isRestorable)
            #expect(health.usage?.totalSectors == stack.areaBytes / 512)

            // The migration corrupts the database.
            try fixture.badMigration()
            #expect(try sha256("\(fixture.mountPoint)/database") != databaseBefore)
            #expect(try sha256(stack.snapPath) == snapImage, "the snapshot keeps the old data while the origin changes")
            let used = try #require(try fixture.engine.health(stack).usage)
            #expect(used.dataSectors > 0)

            // Roll back: unmount, merge, every byte of the volume is the snapshot's.
            try fixture.unmount()
            let merging = try live.startMerges { _ in }.stacks
            try fixture.finishMerge(merging[0])
            #expect(try sha256(fixture.volume.path) == snapImage, "after the merge the whole volume equals the pre-migration image")
            #expect(try fixture.layers().isEmpty)
            #expect(fixture.cowFiles.isEmpty)
            #expect(try fixture.dm.table(.name(fixture.volume.name)).isOnly("linear"))
            try fixture.mount()
            #expect(try sha256("\(fixture.mountPoint)/database") == databaseBefore)
            #expect(!FileManager.default.fileExists(atPath: "\(fixture.mountPoint)/new-assets.bin"))

            // Later, the good migration, committed.
            let second = try fixture.engine.prepare([fixture.request()], token: StackIdentity.newToken()).take()
            try fixture.goodMigration()
            let migrated = try sha256("\(fixture.mountPoint)/database")
            try commitAll(second)
            #expect(try fixture.layers().isEmpty, "no GUARD- layer is left")
            #expect(fixture.cowFiles.isEmpty, "no COW file is left")
            #expect(try fixture.dm.table(.name(fixture.volume.name)).isOnly("linear"))
            #expect(try sha256("\(fixture.mountPoint)/database") == migrated)
            let firstRow = try String(contentsOfFile: "\(fixture.mountPoint)/database", encoding: .utf8).prefix(while: { $0 != "\n" })
            #expect(firstRow == "id:00001,user1,user1@example.com")
            // Committing left the origin's bytes as they were: unmount and compare with a fresh read.
            try fixture.unmount()
            let image = try sha256(fixture.volume.path)
            try dropCaches(fixture.volume.path)
            #expect(try sha256(fixture.volume.path) == image)
        }

        @Test("the origin reads the snapshot's data as soon as the merge starts, while a reader keeps reading")
        func mergeWhileReading() async throws {
            let fixture = try VolumeFixture()
            try makeRandomFile("\(fixture.mountPoint)/data", mebibytes: 40)
            try sh("sync")
            let before = try sha256("\(fixture.mountPoint)/data")
            // Slow the kernel's copying down so the reader really reads during the merge.
            let throttle = CopyThrottle(5)
            defer { throttle.release() }
            let live = try fixture.engine.prepare([fixture.request(size: .bytes(64 << 20))], token: StackIdentity.newToken()).take()
            try makeRandomFile("\(fixture.mountPoint)/data", mebibytes: 40)  // rewritten in place
            try sh("sync")
            try fixture.unmount()
            let stacks = try live.startMerges { _ in }.stacks
            try fixture.mount()  // at once: the origin already shows the old data
            var reads = 0
            var sawMerging = false
            let path = "\(fixture.mountPoint)/data"
            while true {
                let state = try fixture.engine.mergeState(stacks[0])
                if case .merging = state { sawMerging = true }
                try dropCaches(fixture.volume.path)
                #expect(try sha256(path) == before, "read \(reads) during the merge shows the old data")
                reads += 1
                if case .complete = state { break }
                if reads > 400 { break }
            }
            #expect(sawMerging, "the reader read while the kernel was still merging")
            try fixture.finishMerge(stacks[0])
            #expect(try sha256(path) == before)
            #expect(try fixture.layers().isEmpty)
        }

        @Test("a two-volume set is one instant: volume 2's sequence number is never above volume 1's nor more than one below")
        func twoVolumeSetIsOneInstant() throws {
            let first = try VolumeFixture(megabytes: 16, fileSystem: false)
            let second = try VolumeFixture(megabytes: 16, fileSystem: false)
            let writer = SequenceWriter(first: first.volume.path, second: second.volume.path)
            writer.start()
            defer { writer.stop() }
            // Each round starts once the writer has written since the last: the writer is live
            // at every snapshot however slow the machine.
            var seen: UInt64 = 0
            let engine = first.engine
            for round in 0..<5 {
                try waitUntilNow("the writer to write (round \(round))") { writer.count >= seen + 2 }
                seen = writer.count
                let requests = [first.request(size: .bytes(8 << 20)), second.request(size: .bytes(8 << 20))]
                let live = try engine.prepare(requests, token: StackIdentity.newToken()).take()
                let n1 = try SequenceWriter.read(live.stacks[0].snapPath)
                let n2 = try SequenceWriter.read(live.stacks[1].snapPath)
                #expect(n1 > 0 && n2 > 0, "the writer was writing (round \(round))")
                #expect(n2 <= n1 && n2 + 1 >= n1, "round \(round): volume 1 has \(n1), volume 2 has \(n2)")
                try commitAll(live)
            }
            try waitUntilNow("the writer to go on after the last commit") { writer.count > seen }
            #expect(try first.layers().isEmpty && second.layers().isEmpty)
        }

        @Test("the snapshot is the instant of the freeze: every number acknowledged before the suspend is in it, none written after the resume")
        func snapshotIsTheInstantOfTheFreeze() throws {
            let fixture = try VolumeFixture(megabytes: 64)
            let writer = AppendWriter(path: "\(fixture.mountPoint)/sequence")
            writer.start()
            defer { writer.stop() }
            let snapMount = fixture.scratch.path("snap")
            try FileManager.default.createDirectory(atPath: snapMount, withIntermediateDirectories: true)
            for round in 0..<3 {
                let before = writer.count
                try waitUntilNow("the writer to write (round \(round))") { writer.count >= before + 3 }
                let live = try fixture.engine.prepare([fixture.request(size: .bytes(16 << 20))], token: StackIdentity.newToken()).take()
                let window = live.window
                // Numbers whose write began after the last resume, so the check below is not empty.
                try waitUntilNow("the writer to write after the window (round \(round))") { writer.records.contains { $0.started > window.end } }
                let records = writer.records
                let stack = live.stacks[0]
                _ = try sh("e2fsck -fn '\(stack.snapPath)'")  // the frozen filesystem is clean: exit 0
                _ = try sh("mount -o ro '\(stack.snapPath)' '\(snapMount)'")
                let text = try String(contentsOfFile: "\(snapMount)/sequence", encoding: .utf8)
                _ = try sh("umount '\(snapMount)'")
                try commitAll(live)

                let numbers = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map { UInt64($0) }
                #expect(
                    text.hasSuffix("\n") && numbers.enumerated().allSatisfy { $0.element == UInt64($0.offset + 1) },
                    "round \(round): the snapshot's file is 1, 2, 3, ... with nothing torn")
                let inSnapshot = UInt64(numbers.count)
                let ackedBefore = records.filter { $0.acknowledged < window.start }.map(\.number).max() ?? 0
                let firstAfter = records.filter { $0.started > window.end }.map(\.number).min() ?? 0
                #expect(ackedBefore > 0 && firstAfter > 0, "round \(round): the writer wrote before the suspend and after the resume")
                #expect(inSnapshot >= ackedBefore, "round \(round): \(ackedBefore) was acknowledged before the suspend began; the snapshot ends at \(inSnapshot)")
                #expect(inSnapshot < firstAfter, "round \(round): \(firstAfter) was written after the resume; the snapshot ends at \(inSnapshot)")
            }
            #expect(try fixture.layers().isEmpty)
        }

        @Test("writing past the COW size: extension keeps the snapshot valid; without it the snapshot is Invalid and the origin intact")
        func cowOverflow() throws {
            // With extension: 8 MiB COW growing by 8 MiB at 60 % up to 64 MiB; 30 MiB written.
            do {
                let fixture = try VolumeFixture(megabytes: 64, fileSystem: false)
                let live = try fixture.engine.prepare([fixture.request(size: .bytes(8 << 20))], token: StackIdentity.newToken()).take()
                let image = try sha256(live.stacks[0].snapPath)
                let events = EventLog()
                let watcher = CowWatcher(
                    engine: fixture.engine, stacks: live.stacks,
                    policies: [ExtensionPolicy(threshold: 0.6, stepBytes: 8 << 20, maximumBytes: 64 << 20)],
                    interval: .milliseconds(50)
                ) { events.append($0) }
                watcher.start()
                try sh("for i in $(seq 0 14); do dd if=/dev/urandom of='\(fixture.volume.path)' bs=2M count=1 seek=$i oflag=direct conv=notrunc status=none; sleep 0.3; done")
                let stacks = watcher.stop()
                let health = try fixture.engine.health(stacks[0])
                #expect(health.isRestorable, "with extension the snapshot stays valid: \(health.status)")
                #expect(stacks[0].storageBytes > live.stacks[0].storageBytes, "the COW grew")
                #expect(events.extensions > 0)
                #expect(try sha256(stacks[0].snapPath) == image, "the snapshot still holds the old data")
                let attributes = try FileManager.default.attributesOfItem(atPath: stacks[0].storage.path)
                #expect((attributes[.size] as? NSNumber)?.uint64Value == stacks[0].storageBytes)
                try commitAll(LiveSnapshotSet.attach(stacks, engine: fixture.engine))
                _ = live.keep().stacks
            }
            // Without: 4 MiB COW, 12 MiB written: Invalid, reported as such; the origin has what was written.
            do {
                let fixture = try VolumeFixture(megabytes: 64, fileSystem: false)
                let live = try fixture.engine.prepare([fixture.request(size: .bytes(4 << 20))], token: StackIdentity.newToken()).take()
                let patch = fixture.scratch.path("patch")
                try makeRandomFile(patch, mebibytes: 12)
                try sh("dd if='\(patch)' of='\(fixture.volume.path)' bs=1M oflag=direct conv=notrunc status=none")
                let health = try fixture.engine.health(live.stacks[0])
                guard case .invalid = health.status else {
                    Issue.record("a full COW must make the snapshot Invalid, got \(health.status)")
                    try commitAll(live)
                    return
                }
                #expect(!health.isRestorable)
                #expect(try sha256(fixture.volume.path, offset: 0, length: 12 << 20) == sha256(patch), "the origin has every byte written")
                let header = try #require(try KernelCowHeader.read(from: live.stacks[0].storage.path))
                #expect(!header.valid, "the kernel persisted the invalid flag")
                let stacks = live.keep().stacks
                do {
                    try fixture.engine.startMerge(stacks[0])
                    Issue.record("merging an Invalid snapshot must be refused")
                } catch let error as SnapshotError {
                    #expect(error.code == .invalidSnapshot)
                    #expect(error.description.contains("Invalid"), "\(error)")
                    #expect(error.description.contains("keeps the upgraded data"), "\(error)")
                }
                try fixture.engine.drop(stacks[0])
                #expect(try fixture.layers().isEmpty)
                #expect(try sha256(fixture.volume.path, offset: 0, length: 12 << 20) == sha256(patch))
            }
        }

        @Test("a COW file on the volume being snapshotted is refused and nothing is touched")
        func cowOnOriginRefused() throws {
            let fixture = try VolumeFixture()
            let request = VolumeRequest(origin: fixture.volume.path, storage: .fileIn(directory: fixture.mountPoint), size: .bytes(8 << 20))
            do {
                _ = try fixture.engine.prepare([request], token: StackIdentity.newToken())
                Issue.record("a COW on the origin must be refused")
            } catch let error as SnapshotError {
                #expect(error.code == .cowOnOrigin)
                #expect(error.description.contains(fixture.mountPoint), "\(error)")
            }
            #expect(try fixture.layers().isEmpty)
            #expect(try fixture.dm.table(.name(fixture.volume.name)).isOnly("linear"))
            #expect(try FileManager.default.contentsOfDirectory(atPath: fixture.mountPoint).filter { $0.hasSuffix(".cow") }.isEmpty)
        }

        @Test("rediscovery after every device is gone: a kept snapshot and a merge under way are reassembled")
        func rediscovery() throws {
            // A kept snapshot.
            do {
                let fixture = try VolumeFixture()
                try fixture.writeDatabase()
                let live = try fixture.engine.prepare([fixture.request()], token: StackIdentity.newToken()).take()
                let image = try sha256(live.stacks[0].snapPath)
                try fixture.badMigration()
                try fixture.unmount()
                let stacks = live.keep().stacks
                try simulateReboot(fixture, stacks)
                let result = try fixture.engine.reassemble(stacks[0].storage)
                guard case .reassembled(let stack, merging: false) = result else {
                    Issue.record("expected a reassembled snapshot, got \(result)")
                    return
                }
                #expect(try sha256(stack.snapPath) == image, "the reassembled snapshot has the old data")
                #expect(try fixture.engine.reassemble(stack.storage) == .alreadyLive(stack), "a second reassembly changes nothing")
                try fixture.engine.startMerge(stack)
                try fixture.finishMerge(stack)
                #expect(try sha256(fixture.volume.path) == image)
                #expect(try fixture.layers().isEmpty && fixture.cowFiles.isEmpty)
            }
            // A merge under way.
            do {
                let fixture = try VolumeFixture()
                try makeRandomFile("\(fixture.mountPoint)/data", mebibytes: 24)
                try sh("sync")
                let live = try fixture.engine.prepare([fixture.request(size: .bytes(40 << 20))], token: StackIdentity.newToken()).take()
                let image = try sha256(live.stacks[0].snapPath)
                try makeRandomFile("\(fixture.mountPoint)/data", mebibytes: 24)
                try sh("sync")
                try fixture.unmount()
                let throttle = CopyThrottle(1)
                defer { throttle.release() }
                let stacks = try live.startMerges { _ in }.stacks
                Thread.sleep(forTimeInterval: 0.3)
                guard case .merging(let remaining, _) = try fixture.engine.mergeState(stacks[0]) else {
                    Issue.record("the merge finished too fast to interrupt")
                    return
                }
                try simulateReboot(fixture, stacks)
                throttle.set(0)
                let result = try fixture.engine.reassemble(stacks[0].storage)
                guard case .reassembled(let stack, merging: true) = result else {
                    Issue.record("expected a resumed merge, got \(result)")
                    return
                }
                if case .merging(let left, _) = try fixture.engine.mergeState(stack) {
                    #expect(left <= remaining, "the merge resumed where it stopped, not from the start")
                }
                #expect(try sha256(fixture.volume.path) == image, "reads show the snapshot's data at once")
                try fixture.finishMerge(stack)
                try dropCaches(fixture.volume.path)
                #expect(try sha256(fixture.volume.path) == image, "every byte merged")
                #expect(try fixture.layers().isEmpty && fixture.cowFiles.isEmpty)
            }
        }

        /// Tears every device down the way a reboot does (no commit, no teardown), then
        /// activates the origin again with its own table, as LVM or guard's boot unit would.
        func simulateReboot(_ fixture: VolumeFixture, _ stacks: [SnapshotStack]) throws {
            let dm = fixture.dm
            for stack in stacks {
                for layer in [StackIdentity.Layer.snap] where try dm.info(stack.ref(layer)) != nil {
                    try dm.remove(stack.ref(layer))
                }
            }
            try dm.remove(.name(fixture.volume.name))
            for stack in stacks {
                for layer in [StackIdentity.Layer.real, .cow] where try dm.info(stack.ref(layer)) != nil {
                    try dm.remove(stack.ref(layer))
                }
                for loop in LoopDevice.find(backingFile: stack.storage.path) { try loop.detach() }
            }
            for loop in LoopDevice.find(backingFile: fixture.volume.backing) { try loop.detach() }
            Thread.sleep(forTimeInterval: 0.3)  // autoclear detaches asynchronously
            #expect(try fixture.dm.info(.name(fixture.volume.name)) == nil)
            #expect(try fixture.layers().isEmpty)
            try fixture.volumes.activate(fixture.volume)
        }
    }
}

/// Records watcher events from its thread.
final class EventLog: @unchecked Sendable {
    // @unchecked: every access holds `lock`.
    private let lock = NSLock()
    private var events: [CowWatcher.Event] = []

    func append(_ event: CowWatcher.Event) { lock.withLock { events.append(event) } }

    var extensions: Int {
        lock.withLock { events.filter { if case .extended = $0 { return true } else { return false } }.count }
    }

    var all: [CowWatcher.Event] { lock.withLock { events } }
}

/// Appends "1\n", "2\n", ... to a file with an fsync after each, and remembers when each
/// number's write began and when its fsync returned.
final class AppendWriter: @unchecked Sendable {
    // @unchecked: `running` and `written` are only touched under `lock`.
    struct Record: Sendable {
        var number: UInt64
        var started: ContinuousClock.Instant
        var acknowledged: ContinuousClock.Instant
    }

    private let lock = NSLock()
    private var running = true
    private var written: [Record] = []
    private let path: String
    private let finished = DispatchSemaphore(value: 0)

    init(path: String) { self.path = path }

    var count: Int { lock.withLock { written.count } }
    var records: [Record] { lock.withLock { written } }

    func start() {
        Thread.detachNewThread { [self] in
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            defer {
                if fd >= 0 { close(fd) }
                finished.signal()
            }
            var n: UInt64 = 0
            while fd >= 0, lock.withLock({ running }) {
                n += 1
                let line = Array("\(n)\n".utf8)
                let started = ContinuousClock.now
                guard write(fd, line, line.count) == line.count, fsync(fd) == 0 else { return }
                let record = Record(number: n, started: started, acknowledged: .now)
                lock.withLock { written.append(record) }
            }
        }
    }

    func stop() {
        lock.withLock { running = false }
        finished.wait()
    }
}

/// Writes an increasing sequence number durably to volume 1, then to volume 2, over and over.
final class SequenceWriter: @unchecked Sendable {
    // @unchecked: `running` and `written` are only touched under `lock`.
    private let lock = NSLock()
    private var running = true
    private var written: UInt64 = 0
    private let first: String
    private let second: String
    private let finished = DispatchSemaphore(value: 0)

    init(first: String, second: String) {
        self.first = first
        self.second = second
    }

    var count: UInt64 { lock.withLock { written } }

    func start() {
        Thread.detachNewThread { [self] in
            let a = open(first, O_RDWR | O_SYNC)
            let b = open(second, O_RDWR | O_SYNC)
            defer {
                close(a)
                close(b)
                finished.signal()
            }
            var n: UInt64 = 0
            while lock.withLock({ running }) {
                n += 1
                var block = [UInt8](repeating: 0, count: 4096)
                withUnsafeBytes(of: n.littleEndian) { block.replaceSubrange(0..<8, with: $0) }
                guard pwrite(a, block, 4096, 0) == 4096, fsync(a) == 0, pwrite(b, block, 4096, 0) == 4096, fsync(b) == 0 else { return }
                lock.withLock { written = n }
            }
        }
    }

    func stop() {
        lock.withLock { running = false }
        finished.wait()
    }

    /// The sequence number at the start of `path`.
    static func read(_ path: String) throws -> UInt64 {
        let fd = open(path, O_RDONLY | 0o40000)  // O_DIRECT (not exported by Glibc for Swift)
        guard fd >= 0 else { throw ShellError(command: "open \(path)", status: errno, stderr: "") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        guard pread(fd, buffer, 4096, 0) == 4096 else { throw ShellError(command: "pread \(path)", status: errno, stderr: "") }
        return UInt64(littleEndian: buffer.load(as: UInt64.self))
    }
}

/// Commits the set; a drop that failed is the test's error.
func commitAll(_ live: consuming LiveSnapshotSet) throws {
    switch live.commit() {
    case .committed: return
    case .incomplete(_, let error): throw error
    }
}
