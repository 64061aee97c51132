import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// A raw guard volume of `mebibytes` MiB, optionally over a test-controlled dm device (to
/// inject I/O errors under it), with a state directory of its own.
final class RawVolume {
    let scratch: Scratch
    let guardTool: GuardTool
    let name: String
    let device: String
    /// The dm device under the volume, when asked for: switchable to `error`.
    let under: String?
    let underTable: Table?
    let backing: String

    init(mebibytes: Int = 32, controllable: Bool = false, label: String = #function) throws {
        scratch = try Scratch(label)
        guardTool = GuardTool(stateDirectory: scratch.path("state"))
        name = uniqueName("raw")
        device = "/dev/mapper/\(name)"
        backing = scratch.path("volume.img")
        try makeRandomFile(backing, mebibytes: mebibytes)
        var source = backing
        if controllable {
            let dm = try DeviceMapper()
            let loop = try LoopDevice.attach(file: backing).device
            let table = Table(.linear(device: loop.number, offset: 0), length: UInt64(mebibytes) * 2048)
            let underName = uniqueName("under")
            try dm.create(name: underName, uuid: "TEST-\(underName)", table: table)
            under = underName
            underTable = table
            source = "/dev/mapper/\(underName)"
            scratch.defer_ {
                try? dm.remove(.name(underName))
                try? loop.detach()
            }
        } else {
            under = nil
            underTable = nil
        }
        let created = try guardTool("volume", "create", name, "--backing", source)
        guard created.status == 0 else { throw ShellError(command: "volume create", status: created.status, stderr: created.stderr) }
        let (tool, name) = (guardTool, name)
        scratch.defer_ {
            removeGuardStacks(onVolume: name)
            _ = try? tool("volume", "remove", name)
        }
    }

    var checksum: String {
        get throws {
            try dropCaches(device)
            return try sha256(device)
        }
    }

    /// The checksum the volume has after `dd if=patch seek=offsetMiB` on it.
    func checksum(after patch: String, atMiB offset: Int) throws -> String {
        let copy = scratch.path("expected.img")
        try sh("dd if='\(device)' of='\(copy)' bs=1M status=none iflag=direct && dd if='\(patch)' of='\(copy)' bs=1M seek=\(offset) conv=notrunc status=none")
        defer { try? FileManager.default.removeItem(atPath: copy) }
        return try sha256(copy)
    }

    /// Switches the device under the volume to `error` (every I/O fails) or back.
    func failUnderneath(_ failing: Bool) throws {
        guard let under, let underTable else { return }
        let dm = try DeviceMapper()
        try dm.load(.name(under), table: failing ? Table(.error, length: underTable.lengthSectors) : underTable)
        try dm.suspend(.name(under), flush: false, lockFileSystem: false)
        try dm.resume(.name(under))
    }

    func recipe(_ body: String, snapshot: String = "8M", extra: String = "") throws -> String {
        try writeRecipe("name: fault\nvolumes:\n  - device: \(device)\n    snapshot: \(snapshot)\n\(extra)\(body)", in: scratch)
    }
}

/// A recipe over two raw volumes whose one step writes 2 MiB into each (`before` runs first,
/// in the same shell line), then `tail` (verify, on_success, ...).
func twoVolumeRecipe(_ name: String, _ first: RawVolume, _ second: RawVolume, before: String = "", tail: String) throws -> String {
    let write = "for d in \(first.device) \(second.device); do dd if=/dev/urandom of=$d bs=1M count=2 seek=3 oflag=direct conv=notrunc status=none; done"
    return try writeRecipe(
        """
        name: \(name)
        volumes:
          - device: \(first.device)
            snapshot: 8M
          - device: \(second.device)
            snapshot: 8M
        steps:
          - name: write both
            shell: \(before)\(write)

        """ + tail, in: first.scratch)
}

/// Waits until `condition` holds (polling), or fails the test after `seconds`.
func waitUntil(_ what: String, seconds: Double = 600, sourceLocation: SourceLocation = #_sourceLocation, _ condition: () throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return }
        try await Task.sleep(for: .milliseconds(100))
    }
    if try condition() { return }  // a task resumed late (a busy pool) still sees the event
    Issue.record("waited \(Int(seconds)) s for \(what): the machine is too slow or the test hung", sourceLocation: sourceLocation)
}

/// `waitUntil` for synchronous tests: polls `condition`; only a hung test (or a machine far too
/// slow) reaches the bound, and that is what the failure says.
func waitUntilNow(_ what: String, seconds: Double = 600, sourceLocation: SourceLocation = #_sourceLocation, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return }
        Thread.sleep(forTimeInterval: 0.05)
    }
    if try condition() { return }
    Issue.record("waited \(Int(seconds)) s for \(what): the machine is too slow or the test hung", sourceLocation: sourceLocation)
}

/// The kernel's throttle of dm-snapshot's copying (a merge's too), held by one test at a time.
/// It is one setting for the whole machine: a test of the other lane that set it back to 0
/// while a test here had a merge slowed down to interrupt it made that merge finish at once
/// (a CI failure). Holding it takes an exclusive lock both lanes share; `release()` puts the
/// throttle back to 0 and unlocks.
final class CopyThrottle {
    private let lock: Int32

    /// Waits for the other lane's test to release the throttle, then sets it.
    init(_ percent: Int) {
        lock = open("/tmp/guard-kt-copy-throttle.lock", O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        if lock >= 0 { _ = flock(lock, LOCK_EX) }
        set(percent)
    }

    /// The percentage of time the kernel may copy (0: no throttle).
    func set(_ percent: Int) {
        _ = try? sh("echo \(percent) > /sys/module/dm_snapshot/parameters/snapshot_copy_throttle")
    }

    func release() {
        set(0)
        if lock >= 0 { close(lock) }
    }
}

extension Kernel {
    /// Issue 7: full COWs, I/O errors, interrupts, timeouts and journal trouble.
    @Suite("faults")
    struct FaultKernelTests {
        @Test("a COW about to fill stops the steps and the run rolls back while that is still possible")
        func cowFullStopsSteps() throws {
            let volume = try RawVolume()
            let before = try volume.checksum
            let recipe = try volume.recipe(
                """
                stop_at: 60%
                steps:
                  - name: slow writer
                    shell: for i in $(seq 0 15); do dd if=/dev/urandom of=\(volume.device) bs=512K count=1 seek=$i oflag=direct conv=notrunc status=none; sleep 0.5; done
                """, snapshot: "4M")
            let result = try volume.guardTool("run", recipe)
            #expect(result.status == 1, "\(result.stderr)")
            #expect(result.stderr.contains("full and cannot grow"), "\(result.stderr)")
            #expect(result.stderr.contains("rolled back"), "\(result.stderr)")
            #expect(try volume.checksum == before)
            try expectNothingLeft(state: volume.guardTool.stateDirectory)
            recordResult(["cow-nearly-full", "COW without extension reaches stop_at during the steps", "rollback", "restored", "rolled_back", "steps stopped, merged back", ""])
        }

        @Test("the guard users run ignores the test hooks: GUARD_CRASH_AT does not kill it and GUARD_NOW does not set its clock; guard-test honours both")
        func testHooksOnlyInTestBuild() throws {
            let volume = try RawVolume()
            let recipe = try volume.recipe("steps:\n  - name: write\n    shell: dd if=/dev/urandom of=\(volume.device) bs=1M count=1 oflag=direct conv=notrunc status=none\n")
            let hooks = ["GUARD_CRASH_AT": "run.after-take", "GUARD_NOW": "86400"]  // 1970-01-02
            var plain = volume.guardTool
            plain.binary = plainGuardBinary
            #expect(plain.binary != volume.guardTool.binary, "two different programs: \(plain.binary)")
            let result = try plain("run", recipe, extra: hooks)
            #expect(result.status == 0, "not killed at run.after-take: exit \(result.status), \(result.stderr)")
            let history = try #require(try plain.history())
            #expect(history.first?["outcome"] as? String == "committed")
            let started = history.first?["started_at"] as? String ?? ""
            #expect(!started.hasPrefix("1970"), "the run's clock is the real one: \(started)")

            // The same variables on the test build: killed at the point, on the clock it was given.
            let killed = try volume.guardTool("run", recipe, extra: hooks)
            #expect(killed.status == 9 || killed.status == 137, "guard-test died at run.after-take: exit \(killed.status)")
            #expect(try volume.guardTool("recover").status == 0)
            let after = try #require(try volume.guardTool.history())
            let testClock = (after.first?["started_at"] as? String) ?? ""
            #expect(testClock.hasPrefix("1970-01-02"), "guard-test ran on GUARD_NOW's clock: \(testClock)")
            try expectNothingLeft(state: volume.guardTool.stateDirectory)
        }

        @Test("the suspend watchdog is guard-watchdog, a small program of its own beside guard, not a second copy of guard")
        func watchdogProgram() throws {
            let volume = try RawVolume()
            let seen = volume.scratch.path("watchdog")
            // The watchdog outlives the window for the rest of the command: a step finds it.
            let recipe = try volume.recipe(
                "steps:\n  - name: look\n    shell: for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = guard-watchdog ] && echo \"$(cat $p/cmdline | tr '\\0' ' ') $(grep VmRSS $p/status)\"; done > \(seen); true\n"
            )
            let result = try volume.guardTool("run", recipe)
            #expect(result.status == 0, "\(result.stderr)")
            let found = try String(contentsOfFile: seen, encoding: .utf8)
            let expected = (volume.guardTool.binary as NSString).deletingLastPathComponent + "/guard-watchdog"
            #expect(found.hasPrefix(expected), "the watchdog is \(expected): \(found)")
            #expect(!found.contains("__watchdog"), "not guard itself: \(found)")
            try expectNothingLeft(state: volume.guardTool.stateDirectory)
        }

        @Test(
            "a single write larger than the COW and its fuse reserve: the fuse stops it and the run rolls back, or the snapshot is Invalid and the run says the volume holds the upgraded data"
        )
        func cowOverrun() throws {
            // 64 MiB: one write of 48 MiB is larger than the 4 MiB snapshot and its 32 MiB fuse reserve.
            let volume = try RawVolume(mebibytes: 64)
            let before = try volume.checksum
            let patch = volume.scratch.path("patch")
            try makeRandomFile(patch, mebibytes: 48)
            let after = try volume.checksum(after: patch, atMiB: 4)
            // One write(2) of 48 MiB, bigger than the whole COW: the kernel overruns the COW
            // inside that one request, before the COW watcher can stop the step.
            let recipe = try volume.recipe(
                "steps:\n  - name: big write\n    shell: dd if=\(patch) of=\(volume.device) bs=48M count=1 seek=4194304 oflag=direct,seek_bytes conv=notrunc status=none\n",
                snapshot: "4M")
            let result = try volume.guardTool("run", recipe)
            let history = try #require(try volume.guardTool.history())
            let outcome = history.first?["outcome"] as? String
            let checksum = try volume.checksum
            // The race it still has, stated: the watcher could stop the step before the kernel
            // saw the write past the COW (a machine slow enough to split the request across a
            // poll). Then the run must be rolled back with every byte as before.
            if outcome == "rolled_back" {
                #expect(result.status == 1, "\(result.stderr)")
                #expect(checksum == before, "stopped before the overrun: rolled back to the pre-run bytes")
            } else {
                #expect(result.status == 3, "\(result.stderr)")
                #expect(result.stderr.contains("cannot be rolled back"), "\(result.stderr)")
                #expect(result.stderr.contains("hold the upgraded data"), "\(result.stderr)")
                #expect(checksum == after, "the volume has exactly what the steps wrote")
                #expect(outcome == "failed")
                #expect((history.first?["snapshots"] as? [[String: Any]])?.first?["state"] as? String == "invalid")
            }
            try expectNothingLeft(state: volume.guardTool.stateDirectory)
            recordResult([
                "cow-overrun", "one write larger than the COW and its fuse reserve during the steps", "rollback", outcome == "rolled_back" ? "restored" : "upgraded",
                outcome ?? "?", outcome == "rolled_back" ? "stopped before the overrun: rolled back" : "snapshot Invalid: no rollback possible; says the data is the upgraded data",
                "",
            ])
        }

        @Test("a two-volume rollback whose second merge cannot start says which volume is not rolled back, stays open, and guard recover finishes it")
        func partialRollback() async throws {
            let first = try RawVolume()
            let second = try RawVolume(label: "partialRollback-2")
            let tool = first.guardTool
            let before = (try first.checksum, try second.checksum)
            // Something outside guard holds the second volume open (not mounted: no stop hook or
            // unmount frees it), so its merge cannot start.
            let pidFile = first.scratch.path("holder.pid")
            try startDetached(["/bin/sh", "-c", "echo $$ > \(pidFile); exec 3<\(second.device); exec sleep 600"])
            try await waitUntil("the holder to start") { FileManager.default.fileExists(atPath: pidFile) }
            first.scratch.defer_ { _ = try? sh("kill -KILL $(cat \(pidFile)) 2>/dev/null; true") }
            let recipe = try twoVolumeRecipe("partial", first, second, tail: "verify:\n  - name: fail\n    run: [/bin/false]\n")
            let result = try tool("run", recipe)
            #expect(result.status == 3, "\(result.stderr)")
            #expect(result.stderr.contains("\(second.device) is NOT rolled back"), "\(result.stderr)")
            #expect(result.stderr.contains("guard recover"), "\(result.stderr)")
            let history = try #require(try tool.history())
            #expect(history.first?["outcome"] as? String != "rolled_back", "not a rollback while a volume keeps the upgrade: \(history.first ?? [:])")
            let looked = try tool("status", "--json")
            #expect(looked.status == 3, "a volume not rolled back needs attention: \(looked.stderr)")
            #expect(looked.stderr.contains("needs attention") && looked.stderr.contains("\(second.device): not rolled back"), "\(looked.stderr)")
            let status = try #require(try JSONSerialization.jsonObject(with: Data(looked.stdout.utf8)) as? [String: Any])
            let volumes = ((status["runs"] as? [[String: Any]])?.first?["volumes"] as? [[String: Any]]) ?? []
            #expect(volumes.contains { $0["volume"] as? String == second.device && $0["status"] as? String == "not rolled back" }, "\(volumes)")
            #expect((status["attention"] as? [String] ?? []).count == 1, "\(status)")
            #expect(try second.checksum != before.1, "the second volume still holds the upgrade")

            let holder = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            _ = try sh("kill -KILL \(holder)")
            try await waitUntil("the holder to exit") { !isRunning(holder) }
            let recover = try tool("recover")
            #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
            #expect(try first.checksum == before.0, "the first volume as before the run")
            #expect(try second.checksum == before.1, "guard recover rolled the second volume back")
            let after = try #require(try tool.history())
            #expect(after.first?["outcome"] as? String == "recovered")
            #expect(after.first?["state"] as? String == "finished")
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "partial-rollback", "two volumes; the second's merge cannot start (held open outside guard)", "rollback", "restored", "recovered",
                "run says which volume is not rolled back, stays open (exit 3); guard recover rolled it back", "",
            ])
        }

        @Test(
            "a two-volume commit whose first drop cannot be made (its snapshot held open outside guard): the run is kept, both snapshots stay live and their labels say kept, the message says to commit again, and that commit works once the holder is gone"
        )
        func partialCommit() async throws {
            let first = try RawVolume()
            let second = try RawVolume(label: "partialCommit-2")
            let tool = first.guardTool
            // Outside guard, something opens the first volume's snapshot while the steps run
            // (a backup reading it, say) and keeps it open.
            let (pidFile, held) = (first.scratch.path("holder.pid"), first.scratch.path("held"))
            try startDetached([
                "/bin/sh", "-c",
                "echo $$ > \(pidFile); while :; do for f in /dev/mapper/guard-*-\(first.name)-snap; do [ -e \"$f\" ] && break 2; done; sleep 0.05; done; exec 3<\"$f\"; touch \(held); exec sleep 600",
            ])
            first.scratch.defer_ { _ = try? sh("kill -KILL $(cat \(pidFile)) 2>/dev/null; true") }
            let recipe = try twoVolumeRecipe(
                "partial-commit", first, second, before: "for i in $(seq 600); do [ -e \(held) ] && break; sleep 0.1; done; [ -e \(held) ] && ", tail: "on_success: commit\n")
            let result = try tool("run", recipe)
            let said = result.stdout + result.stderr
            #expect(result.status == 3, "\(said)")
            let runID = try #require(try tool.history()?.first?["id"] as? Int)
            #expect(said.contains("commit did not complete") && said.contains("guard commit \(runID)"), "\(said)")
            #expect(said.contains(first.device) && said.contains(second.device) && said.contains("live and kept"), "names the volumes whose snapshots are live: \(said)")
            #expect(try tool.history()?.first?["state"] as? String == "kept")
            let labels = try SnapshotEngine.cowFiles(in: "\(tool.stateDirectory)/cow").compactMap { try CowLabel.read(from: $0.path)?.state }
            #expect(labels == [.kept, .kept], "both snapshots are live, their labels say kept: \(labels)")
            let upgraded = (try first.checksum, try second.checksum)

            let holder = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            _ = try sh("kill -KILL \(holder)")
            try await waitUntil("the holder to exit") { !isRunning(holder) }
            let commit = try tool("commit", "\(runID)")
            #expect(commit.status == 0, "\(commit.stdout) \(commit.stderr)")
            #expect(try first.checksum == upgraded.0 && second.checksum == upgraded.1, "the upgrade stays on both volumes")
            #expect(try tool.history()?.first?["state"] as? String == "finished")
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test(
            "a step double-forks a writer into a session of its own, then guard is killed with -9: guard recover kills the writer before the rollback, and the volume is as before the run"
        )
        func escapedWriterKilledByRecover() async throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let before = try volume.checksum
            let pidFile = volume.scratch.path("writer.pid")
            // 64 KiB direct writes over 100 places: at most 6.25 MiB of COW, less than the 16 MiB.
            let writer =
                "echo $$ > \(pidFile); while :; do dd if=/dev/urandom of=\(volume.device) bs=64K count=1 seek=$(( $(od -An -N2 -tu2 /dev/urandom) % 100 )) oflag=direct conv=notrunc status=none; sleep 0.05; done"
            let recipe = try volume.recipe(
                """
                steps:
                  - name: start a writer and wait
                    shell: (setsid sh -c '\(writer)' </dev/null >/dev/null 2>&1 &); sleep 600
                """, snapshot: "16M")
            volume.scratch.defer_ { _ = try? sh("kill -KILL $(cat \(pidFile)) 2>/dev/null; true") }
            let runner = Task.detached { try tool("run", recipe) }
            try await waitUntil("the writer to start") { FileManager.default.fileExists(atPath: pidFile) }
            try await Task.sleep(for: .seconds(1))
            #expect(killProcesses(argv: [guardBinary, "run", recipe]) == 1, "one guard run to kill")
            let killed = try await runner.value
            #expect(killed.status == 9 || killed.status == 137, "\(killed.stderr)")
            let pid = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(isRunning(pid), "the writer outlived guard")

            let recover = try tool("recover")
            #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
            #expect(!isRunning(pid), "guard recover killed the writer")
            #expect(try volume.checksum == before, "rolled back with no write after it")
            try await Task.sleep(for: .seconds(1))
            #expect(try volume.checksum == before, "and nothing writes afterwards")
            let history = try #require(try tool.history())
            let events = try lastRunEvents(tool)
            #expect(events.contains("result kill-cgroup"), "\(events)")
            #expect(history.first?["outcome"] as? String == "recovered")
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "escaped-writer", "a step double-forks a writer (setsid), then kill -9 of guard", "rollback", "restored", "recovered",
                "guard recover killed the run's cgroup before the merge; nothing writes after it", "",
            ])
        }

        @Test(
            "a COW device that holds something is refused before any write: a disk whose partition is mounted, an ext4, LVM or swap signature",
            arguments: ["partition-mounted", "ext4", "lvm", "swap"])
        func cowDeviceRefusals(content: String) throws {
            let volume = try RawVolume()
            let image = volume.scratch.path("cow-disk.img")
            try makeSparseFile(image, mebibytes: 64)
            let path = try sh("losetup -f --show \(content == "partition-mounted" ? "-P " : "")\(image)").trimmingWhitespace()
            volume.scratch.defer_ { _ = try? sh("losetup -d \(path)") }
            struct Disk { let path: String }
            let loop = Disk(path: path)
            let expected: String
            switch content {
            case "partition-mounted":
                try sh("echo 'type=83' | sfdisk -q \(loop.path) >/dev/null; partx -u \(loop.path) 2>/dev/null; udevadm settle 2>/dev/null; mkfs.ext4 -q -F \(loop.path)p1")
                let mount = volume.scratch.path("p1")
                try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
                try Mounts.mount(source: "\(loop.path)p1", target: mount, fileSystemType: "ext4")
                volume.scratch.defer_ { try? Mounts.unmount(mount) }
                expected = "partitions"
            case "ext4":
                try sh("mkfs.ext4 -q -F \(loop.path)")
                expected = "ext4"
            case "lvm":
                try sh("LVM_SUPPRESS_FD_WARNINGS=1 pvcreate -q -ff -y \(loop.path)")
                volume.scratch.defer_ { _ = try? sh("LVM_SUPPRESS_FD_WARNINGS=1 pvremove -q -ff -y \(loop.path)") }
                expected = "LVM2_member"
            default:
                try sh("mkswap -q \(loop.path) >/dev/null")
                expected = "swap"
            }
            let firstMiB = try sha256(loop.path, offset: 0, length: 1 << 20)
            let before = try volume.checksum
            let recipe = try writeRecipe(
                "name: cow-device\nvolumes:\n  - device: \(volume.device)\n    snapshot: { size: 16M, cow: \(loop.path) }\nsteps:\n  - name: write\n    shell: dd if=/dev/urandom of=\(volume.device) bs=1M count=1 oflag=direct conv=notrunc status=none\n",
                in: volume.scratch)
            let result = try volume.guardTool("run", recipe)
            #expect(result.status == 2, "\(result.stderr)")
            #expect(result.stderr.contains(loop.path) && result.stderr.contains(expected), "\(result.stderr)")
            #expect(result.stderr.contains("nothing was touched"), "\(result.stderr)")
            #expect(try sha256(loop.path, offset: 0, length: 1 << 20) == firstMiB, "the COW device's first MiB is unchanged")
            #expect(try volume.checksum == before, "the volume is unchanged: no step ran")
            #expect(try expectLayers(volume.name) == 0)
            recordResult([
                "cow-device-\(content)", "`cow:` names a device that holds \(content == "partition-mounted" ? "a disk with a mounted partition" : "an \(expected) signature")", "-",
                "untouched", "(no run)", "refused in preflight (exit 2); the device's first MiB unchanged", "",
            ])
        }

        @Test("an I/O error mid-merge stops it with a clear error; once the device heals, guard recover finishes it", arguments: ["cow", "origin"])
        func ioErrorMidMerge(where failing: String) async throws {
            let volume = try RawVolume(controllable: failing == "origin")
            let before = try volume.checksum
            var extra = ""
            var cowControl: RawVolume?
            if failing == "cow" {
                // The COW on a device the test controls.
                let cow = try RawVolume(mebibytes: 24, controllable: true, label: "cow-device")
                cowControl = cow
                try sh("dmsetup remove \(cow.name)")
                extra = "    snapshot: { size: 16M, cow: /dev/mapper/\(cow.under!) }\n"
            }
            let patch = volume.scratch.path("patch")
            try makeRandomFile(patch, mebibytes: 12)
            let body =
                "steps:\n  - name: write\n    shell: dd if=\(patch) of=\(volume.device) bs=1M oflag=direct conv=notrunc status=none\nverify:\n  - name: fail\n    run: [/bin/false]\n"
            let recipe =
                failing == "cow"
                ? try writeRecipe("name: fault\nvolumes:\n  - device: \(volume.device)\n\(extra)\(body)", in: volume.scratch)
                : try volume.recipe(body, snapshot: "16M")
            let throttle = CopyThrottle(1)
            defer { throttle.release() }
            let tool = volume.guardTool
            let runner = Task.detached { try tool("run", recipe) }
            let dm = try DeviceMapper()
            try await waitUntil("the merge to start") { (try? dm.table(.name(volume.name)).isOnly("snapshot-merge")) == true }
            try await Task.sleep(for: .milliseconds(300))
            guard let usage = try dm.snapshotStatus(.name(volume.name)).usage, !usage.isMergeComplete else {
                Issue.record("the merge finished before the I/O error; nothing would be tested (the copy throttle was not held)")
                return
            }
            if let cowControl { try cowControl.failUnderneath(true) } else { try volume.failUnderneath(true) }
            let result = try await runner.value
            #expect(result.status == 3, "\(result.stderr)")
            #expect(result.stderr.contains("Merge failed") || result.stderr.contains("merge"), "\(result.stderr)")
            #expect(result.stderr.contains("guard recover"), "\(result.stderr)")
            // Nothing still needed was torn down.
            #expect(try dm.table(.name(volume.name)).isOnly("snapshot-merge"), "the origin still merges")
            #expect(try expectLayers(volume.name) >= 2, "-real and -cow are still there")

            if let cowControl { try cowControl.failUnderneath(false) } else { try volume.failUnderneath(false) }
            throttle.set(0)
            if failing == "origin" {
                // Crash point restart.error-table: guard killed while it restarts the merge (the
                // failed merge ended, the new one not loaded); the next recover restarts it.
                let killed = try tool("recover", extra: ["GUARD_CRASH_AT": CrashPoint.restartErrorTable.rawValue])
                #expect(killed.status == 9 || killed.status == 137, "guard recover was killed at restart.error-table: \(killed.status) \(killed.stderr)")
                #expect(try tool("status").status != 0, "status is not silent about the merge that did not restart")
            }
            let recover = try tool("recover")
            #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
            #expect(recover.stdout.contains("restarted the merge"), "\(recover.stdout)")
            #expect(try volume.checksum == before, "every byte merged back after the device healed")
            try expectNothingLeft(state: tool.stateDirectory)
            let history = try #require(try tool.history())
            #expect(history.first?["outcome"] as? String == "rolled_back")
            recordResult([
                "io-error-\(failing)-mid-merge", "the \(failing == "cow" ? "COW" : "origin's") device fails during the merge, then heals", "rollback", "restored", "rolled_back",
                "merge stopped (Merge failed), layers kept; guard recover restarted it after the fix"
                    + (failing == "origin" ? " (a first guard recover killed at restart.error-table; the next one restarted it)" : ""), "",
            ])
        }

        @Test("Ctrl-C during the steps stops them and rolls back")
        func interrupt() async throws {
            let volume = try RawVolume()
            let before = try volume.checksum
            let marker = volume.scratch.path("marker")
            let recipe = try volume.recipe(
                "steps:\n  - name: write then wait\n    shell: dd if=/dev/urandom of=\(volume.device) bs=1M count=2 oflag=direct conv=notrunc status=none; touch \(marker); sleep 60\n"
            )
            let tool = volume.guardTool
            let runner = Task.detached { try tool("run", recipe) }
            try await waitUntil("the step to start") { FileManager.default.fileExists(atPath: marker) }
            #expect(killProcesses(argv: [guardBinary, "run", recipe], signal: SIGINT) == 1)
            let result = try await runner.value
            #expect(result.status == 1, "\(result.stderr)")
            #expect(result.stderr.contains("interrupted (Ctrl-C)"), "\(result.stderr)")
            #expect(try volume.checksum == before)
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult(["ctrl-c", "SIGINT while a step runs", "rollback", "restored", "rolled_back", "step stopped, merged back", ""])
        }

        @Test("a step that hangs past its timeout, or ignores TERM, is killed and the run rolled back", arguments: ["sleep 120", "trap '' TERM; sleep 120"])
        func hangingStep(script: String) throws {
            let volume = try RawVolume()
            let before = try volume.checksum
            let recipe = try volume.recipe(
                "steps:\n  - name: hang\n    shell: dd if=/dev/urandom of=\(volume.device) bs=1M count=1 oflag=direct conv=notrunc status=none; \(script)\n    timeout: 2s\n")
            // No bound on the time: a step not killed would sleep its 120 s out and the run succeed.
            let result = try volume.guardTool("run", recipe)
            #expect(result.status == 1, "\(result.stderr)")
            #expect(result.stderr.contains("timed out"), "\(result.stderr)")
            #expect(try volume.checksum == before)
            try expectNothingLeft(state: volume.guardTool.stateDirectory)
            recordResult([
                script.contains("trap") ? "step-ignores-term" : "step-timeout", "a step past its timeout\(script.contains("trap") ? " that ignores SIGTERM" : "")", "rollback",
                "restored", "rolled_back", "TERM then KILL to the step's process group, merged back", "",
            ])
        }

        @Test("a journal locked by another process is waited for")
        func journalLocked() async throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let recipe = try volume.recipe("steps:\n  - name: nothing\n    run: [/bin/true]\n")
            #expect(try tool("run", recipe).status == 0, "creates the journal")
            let journal = "\(tool.stateDirectory)/journal.sqlite"
            let holder = Process()
            holder.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            holder.arguments = [
                "-c",
                "import sqlite3,time,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30); c.execute('BEGIN EXCLUSIVE'); open(sys.argv[2],'w').close(); time.sleep(4); c.execute('COMMIT')",
                journal, volume.scratch.path("locked"),
            ]
            try holder.run()
            try await waitUntil("the lock") { FileManager.default.fileExists(atPath: volume.scratch.path("locked")) }
            let started = Date()
            let result = try tool("run", recipe)
            #expect(result.status == 0, "\(result.stderr)")
            #expect(Date().timeIntervalSince(started) >= 2, "guard waited for the lock")
            holder.waitUntilExit()
            let history = try #require(try tool.history())
            #expect(history.count == 2)
            recordResult(["journal-locked", "another process holds the journal's write lock", "commit", "upgraded", "committed", "guard waited for the lock, then ran", ""])
        }

        @Test("the journal deleted mid-run is written again from guard's open copy")
        func journalDeleted() throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let recipe = try volume.recipe(
                "steps:\n  - name: delete the journal\n    shell: rm -f \(tool.stateDirectory)/journal.sqlite \(tool.stateDirectory)/journal.sqlite-wal \(tool.stateDirectory)/journal.sqlite-shm\n"
            )
            let result = try tool("run", recipe)
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stderr.contains("was deleted while guard was using it"), "\(result.stderr)")
            let history = try #require(try tool.history())
            #expect(history.first?["outcome"] as? String == "committed", "\(history)")
            let show = try #require(try tool.json("show", "1") as? [String: Any])
            #expect((show["phases"] as? [[String: Any]])?.contains { $0["name"] as? String == "steps" } == true, "phases from before the deletion are kept")
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult(["journal-deleted", "a step deletes journal.sqlite", "commit", "upgraded", "committed", "journal rebuilt from the open copy at the next phase", ""])
        }

        @Test(
            "a corrupt journal, a state directory on the snapshotted volume, a full state filesystem: refused before any volume is touched",
            arguments: ["corrupt", "on-volume", "full"])
        func journalRefusals(problem: String) throws {
            let volume = try RawVolume()
            var tool = volume.guardTool
            let recipe: String
            switch problem {
            case "corrupt":
                try FileManager.default.createDirectory(atPath: tool.stateDirectory, withIntermediateDirectories: true)
                try Data(repeating: 0x5A, count: 16384).write(to: URL(fileURLWithPath: "\(tool.stateDirectory)/journal.sqlite"))
                recipe = try volume.recipe("steps:\n  - name: nothing\n    run: [/bin/true]\n")
            case "on-volume":
                try sh("mkfs.ext4 -q -F \(volume.device)")
                let mount = volume.scratch.path("m")
                try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
                try Mounts.mount(source: volume.device, target: mount, fileSystemType: "ext4")
                volume.scratch.defer_ { try? Mounts.unmount(mount) }
                tool = GuardTool(stateDirectory: "\(mount)/guard-state")
                recipe = try volume.recipe("steps:\n  - name: nothing\n    run: [/bin/true]\n")
            default:
                let small = volume.scratch.path("small")
                try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
                try sh("mount -t tmpfs -o size=4m tmpfs '\(small)' && dd if=/dev/zero of='\(small)/fill' bs=1M count=3 status=none")
                volume.scratch.defer_ { try? Mounts.unmount(small) }
                tool = GuardTool(stateDirectory: "\(small)/state")
                recipe = try volume.recipe("steps:\n  - name: nothing\n    run: [/bin/true]\n")
            }
            let before = try volume.checksum
            let result = try tool("run", recipe)
            #expect(result.status == 2, "\(result.stderr)")
            let expected = ["corrupt": "corrupt", "on-volume": "which this recipe snapshots", "full": "free"][problem]!
            #expect(result.stderr.contains(expected), "\(result.stderr)")
            #expect(result.stderr.contains("nothing was touched") || problem == "corrupt", "\(result.stderr)")
            #expect(try expectLayers(volume.name) == 0)
            #expect(try DeviceMapper().table(.name(volume.name)).isOnly("linear"))
            if problem == "on-volume" {
                #expect(!FileManager.default.fileExists(atPath: tool.stateDirectory), "nothing was written on the volume")
            }
            if problem != "on-volume" { #expect(try volume.checksum == before) }
            recordResult([
                "journal-\(problem)",
                ["corrupt": "the journal is corrupt", "on-volume": "the state directory is on the volume to snapshot", "full": "the state filesystem is full"][problem]!, "-",
                "untouched", "(no run)", "refused in preflight, exit 2", "",
            ])
        }
    }
}

/// The journal's events of the latest run, as "kind action" (`guard show --json`).
func lastRunEvents(_ tool: GuardTool) throws -> [String] {
    let history = try #require(try tool.history())
    let show = try #require(try tool.json("show", "\(history.first?["id"] as? Int ?? 0)") as? [String: Any])
    return (show["events"] as? [[String: Any]] ?? []).map { "\($0["kind"] ?? "") \($0["action"] ?? "")" }
}

/// Whether process `pid` exists and is not a zombie.
func isRunning(_ pid: String) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
    return stat[stat.index(close, offsetBy: 2)...].first != "Z"
}

/// How many guard layers stack on the volume named `volume`.
func expectLayers(_ volume: String) throws -> Int {
    try DeviceMapper().guardDevices().filter { StackIdentity.parse(uuid: $0.uuid) != nil && $0.name.contains(volume) }.count
}
