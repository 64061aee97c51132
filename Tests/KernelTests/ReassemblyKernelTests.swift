import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// What a reset does to the kernel's side of a guard volume and its snapshot, without any
/// guard code running: every device is gone, the COW files and their labels stay as they are.
/// The origin comes back with `activate` (as LVM activates an LV at boot), with fresh I/O
/// counters, like a new boot's device.
func powerCut(_ volume: RawVolume) throws {
    let dm = try DeviceMapper()
    let layers = try dm.guardDevices().filter { StackIdentity.parse(uuid: $0.uuid) != nil && $0.name.contains(volume.name) }
    if try dm.info(.name(volume.name)) != nil { try dm.remove(.name(volume.name)) }
    for suffix in ["-snap", "-real", "-cow"] {
        for layer in layers where layer.name.hasSuffix(suffix) { try dm.remove(.number(layer.number)) }
    }
    for cow in SnapshotEngine.cowFiles(in: volume.scratch.path("state/cow")) {
        for loop in LoopDevice.find(backingFile: cow.path) { try loop.detach() }
    }
    for loop in LoopDevice.find(backingFile: volume.backing) { try? loop.detach() }
}

/// Activates the guard volume the way a boot's LVM activation would: its own table, no guard.
func activateOnly(_ volume: RawVolume) throws {
    let volumes = GuardVolumes(dm: try DeviceMapper(), stateDirectory: volume.guardTool.stateDirectory)
    guard let (entry, _) = try volumes.list().first(where: { $0.0.name == volume.name }) else {
        Issue.record("no guard volume \(volume.name)")
        return
    }
    try volumes.activate(entry)
}

extension RawVolume {
    /// A kept run that writes 3 MiB of new bytes at 5 MiB, its snapshot as `snapshot` says:
    /// its id, and the volume's checksums before and after it.
    func keptRun(snapshot: String = "8M") throws -> (run: String, before: String, after: String) {
        let before = try checksum
        let patch = scratch.path("patch")
        try makeRandomFile(patch, mebibytes: 3)
        let after = try checksum(after: patch, atMiB: 5)
        let recipe = try recipe(
            "steps:\n  - name: write\n    shell: dd if=\(patch) of=\(device) bs=1M seek=5 oflag=direct conv=notrunc status=none\non_success: keep\n",
            snapshot: snapshot)
        let result = try guardTool("run", recipe)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(try checksum == after)
        let history = try #require(try guardTool.history())
        return ("\(history.first?["id"] as? Int ?? 0)", before, after)
    }
}

extension Kernel {
    /// Issue 15: recovery decides from durable facts (COW labels, the kernel's exception store,
    /// the journal), never from the kernel's tables alone.
    @Suite("reassembly from durable facts")
    struct ReassemblyKernelTests {
        func keptRun(_ volume: RawVolume) throws -> (run: String, before: String, after: String) {
            try volume.keptRun()
        }

        func runState(_ volume: RawVolume) throws -> String? {
            let history = try #require(try volume.guardTool.history())
            return history.first?["state"] as? String
        }

        @Test("a kept snapshot after a reset without reassembly, its COW directory missing: nothing removed, needs reassembly (exit 4) until it is back, then rollback restores")
        func missingCowDirectory() throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let (run, before, _) = try keptRun(volume)
            let cow = try #require(SnapshotEngine.cowFiles(in: volume.scratch.path("state/cow")).first?.path)
            let label = try #require(try CowLabel.read(from: cow))
            try powerCut(volume)
            // The filesystem that holds the COW directory is not there yet.
            try FileManager.default.moveItem(atPath: volume.scratch.path("state/cow"), toPath: volume.scratch.path("cow-elsewhere"))

            let status = try tool("status")
            #expect(status.status == 4, "\(status.stdout) \(status.stderr)")
            #expect(status.stdout.contains("needs reassembly") && status.stderr.contains("does not exist"), "\(status.stdout) \(status.stderr)")
            let recover = try tool("recover")
            #expect(recover.status == 4, "\(recover.stdout) \(recover.stderr)")
            #expect(recover.stderr.contains("needs reassembly") && recover.stderr.contains("state/cow does not exist"), "\(recover.stderr)")
            #expect(!FileManager.default.fileExists(atPath: volume.scratch.path("state/cow")), "recovery does not make the missing COW directory")
            #expect(try runState(volume) == "needs_reassembly")
            // A new run on the volume would bury the old blocks: refused.
            let again = try tool("run", try volume.recipe("steps:\n  - name: nothing\n    run: [/bin/true]\n"))
            #expect(again.status == 2 && again.stderr.contains("not live"), "\(again.stderr)")

            // The directory is back: reassembled, kept again, and the rollback restores every byte.
            try FileManager.default.moveItem(atPath: volume.scratch.path("cow-elsewhere"), toPath: volume.scratch.path("state/cow"))
            #expect(try CowLabel.read(from: cow) == label, "the label is untouched")
            let recovered = try tool("recover")
            #expect(recovered.status == 0, "\(recovered.stdout) \(recovered.stderr)")
            #expect(recovered.stdout.contains("reassembled the snapshot of \(volume.name)"), "\(recovered.stdout)")
            #expect(try runState(volume) == "kept")
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try volume.checksum == before)
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "no-reassembly-cow-dir-missing", "reset with a kept snapshot; its COW directory missing at recovery", "keep", "restored", "rolled_back",
                "needs reassembly (exit 4), nothing removed; reassembled once the directory was back; rollback worked", "",
            ])
        }

        @Test("the origin is written before recovery: the snapshot is stale, its COW kept, nothing merged; commit discards it")
        func writtenBeforeRecovery() throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let (run, _, _) = try keptRun(volume)
            let cow = try #require(SnapshotEngine.cowFiles(in: volume.scratch.path("state/cow")).first?.path)
            try powerCut(volume)
            try activateOnly(volume)
            // Something mounts and writes the volume before guard runs.
            try sh("dd if=/dev/urandom of=\(volume.device) bs=64K count=4 seek=40 oflag=direct conv=notrunc status=none")
            let written = try volume.checksum

            let recover = try tool("recover")
            #expect(recover.status == 3, "\(recover.stdout) \(recover.stderr)")
            #expect(recover.stderr.contains("stale") && recover.stderr.contains("write requests"), "\(recover.stderr)")
            #expect(try DeviceMapper().table(.name(volume.name)).isOnly("linear"), "nothing was stacked on the written volume")
            #expect(try volume.checksum == written, "nothing merged")
            #expect(FileManager.default.fileExists(atPath: cow), "the COW is kept")
            #expect(try CowLabel.read(from: cow)?.state == .stale, "the label says stale: the next boot does not reassemble it")
            #expect(try runState(volume) == "stale")
            let second = try tool("recover")
            #expect(second.status == 3, "\(second.stderr)")
            #expect(try volume.checksum == written)
            let rollback = try tool("rollback", run)
            #expect(rollback.status == 2 && rollback.stderr.contains("stale"), "\(rollback.stderr)")

            let commit = try tool("commit", run)
            #expect(commit.status == 0, "\(commit.stderr)")
            #expect(try volume.checksum == written)
            let history = try #require(try tool.history())
            #expect(history.first?["outcome"] as? String == "committed")
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "written-before-recovery", "reset with a kept snapshot; the volume written before guard recover", "keep", "as written", "committed",
                "stale: COW kept, nothing merged, exit 3; guard commit discarded it", "",
            ])
        }

        @Test("guard killed mid-merge and a reset without reassembly: status --wait tears nothing down; recover finishes the merge")
        func mergeWithoutReassembly() async throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let before = try volume.checksum
            let patch = volume.scratch.path("patch")
            try makeRandomFile(patch, mebibytes: 12)
            let recipe = try volume.recipe(
                "steps:\n  - name: write\n    shell: dd if=\(patch) of=\(volume.device) bs=1M oflag=direct conv=notrunc status=none\nverify:\n  - name: fail\n    run: [/bin/false]\n",
                snapshot: "16M")
            let throttle = CopyThrottle(1)
            defer { throttle.release() }
            let runner = Task.detached { try tool("run", recipe) }
            let dm = try DeviceMapper()
            try await waitUntil("the merge to start") { (try? dm.table(.name(volume.name)).isOnly("snapshot-merge")) == true }
            #expect(killProcesses(argv: [guardBinary, "run", recipe]) == 1)
            _ = try await runner.value
            guard let usage = try dm.snapshotStatus(.name(volume.name)).usage, !usage.isMergeComplete else {
                Issue.record("the merge finished before the reset; nothing would be tested")
                return
            }
            try powerCut(volume)
            throttle.set(0)
            let cow = try #require(SnapshotEngine.cowFiles(in: volume.scratch.path("state/cow")).first?.path)
            #expect(try CowLabel.read(from: cow)?.state == .merging)

            // The volume comes up on its own table (no boot unit); the maintenance job runs.
            try activateOnly(volume)
            let wait = try tool("status", "--wait")
            #expect(wait.status == 4, "\(wait.stdout) \(wait.stderr)")
            #expect(wait.stderr.contains("needs reassembly"), "\(wait.stderr)")
            let status = try tool("status")
            #expect(status.status == 4)
            #expect(FileManager.default.fileExists(atPath: cow), "nothing torn down")
            #expect(try CowLabel.read(from: cow)?.state == .merging)

            let recover = try tool("recover")
            #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
            #expect(recover.stdout.contains("resumed the merge into \(volume.name)"), "\(recover.stdout)")
            #expect(try volume.checksum == before, "the merge finished: every byte as before the run")
            let history = try #require(try tool.history())
            #expect(["recovered", "rolled_back"].contains(history.first?["outcome"] as? String ?? ""), "\(history.first ?? [:])")
            #expect(history.first?["state"] as? String == "finished")
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "merge-without-reassembly", "guard killed mid-merge, reset, no reassembly at boot; status --wait before recover", "rollback", "restored",
                history.first?["outcome"] as? String ?? "?", "status --wait exit 4 and nothing torn down; recover resumed the merge", "",
            ])
        }

        @Test("a COW label that cannot be read for a moment: nothing is deleted, and the rollback still works once it can")
        func unreadableLabel() throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            // The COW directory on ext4 over a device the test can switch to `error`.
            let disk = try RawVolume(mebibytes: 96, controllable: true, label: "cow-disk")  // the COW with its fuse reserve, and room to spare
            try sh("dmsetup remove \(disk.name)")
            let under = "/dev/mapper/\(try #require(disk.under))"
            // No journal: a read error must not abort it into read-only (the test is about guard).
            try sh("mkfs.ext4 -q -F -O ^has_journal \(under)")
            let cowDirectory = volume.scratch.path("state/cow")
            try FileManager.default.createDirectory(atPath: cowDirectory, withIntermediateDirectories: true)
            try Mounts.mount(source: under, target: cowDirectory, fileSystemType: "ext4", options: "errors=continue")
            volume.scratch.defer_ { try? Mounts.unmount(cowDirectory) }
            let (run, before, _) = try keptRun(volume)
            let cow = try #require(SnapshotEngine.cowFiles(in: cowDirectory).first?.path)

            try sh("sync")
            try disk.failUnderneath(true)
            try sh("echo 3 > /proc/sys/vm/drop_caches")
            let recover = try tool("recover")
            #expect(recover.status == 3, "\(recover.stdout) \(recover.stderr)")
            #expect(recover.stderr.contains("cannot be read"), "\(recover.stderr)")
            _ = try tool("status")
            try disk.failUnderneath(false)

            #expect(FileManager.default.fileExists(atPath: cow), "the COW file is still there")
            #expect(try CowLabel.read(from: cow)?.state == .kept)
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try volume.checksum == before)
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "unreadable-label", "the COW directory's disk returns I/O errors during guard recover", "keep", "restored", "rolled_back",
                "label unreadable: reported, nothing deleted; rollback worked after the disk came back", "",
            ])
        }

        @Test("a guard volume whose backing file is missing does not stop boot reassembly of the others")
        func missingBackingFile() throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            let (run, before, _) = try keptRun(volume)
            // A second guard volume in the same state directory, its backing file gone at boot.
            let lost = uniqueName("lost")
            let lostBacking = volume.scratch.path("lost.img")
            try makeRandomFile(lostBacking, mebibytes: 8)
            let created = try tool("volume", "create", lost, "--backing", lostBacking)
            #expect(created.status == 0, "\(created.stderr)")
            volume.scratch.defer_ { _ = try? tool("volume", "remove", lost) }
            try powerCut(volume)
            try sh("dmsetup remove \(lost)")
            for loop in LoopDevice.find(backingFile: lostBacking) { try loop.detach() }
            try FileManager.default.moveItem(atPath: lostBacking, toPath: lostBacking + ".away")

            let boot = try tool("recover", "--boot")
            #expect(boot.status == 3, "\(boot.stdout) \(boot.stderr)")
            #expect(boot.stderr.contains("guard volume \(lost) cannot be activated"), "\(boot.stderr)")
            #expect(boot.stdout.contains("reassembled the snapshot of \(volume.name)"), "\(boot.stdout)")
            #expect(try DeviceMapper().table(.name(volume.name)).isOnly("snapshot-origin"))
            try FileManager.default.moveItem(atPath: lostBacking + ".away", toPath: lostBacking)
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try volume.checksum == before)
            recordResult([
                "boot-missing-backing-file", "reset; one guard volume's backing file missing at boot", "keep", "restored", "rolled_back",
                "that volume reported; the other reassembled at boot and rolled back", "",
            ])
        }

        @Test(
            "at boot, a COW device that appears a few seconds late is waited for (the boot unit has no udevadm settle): the snapshot is reassembled, and the rollback restores every byte"
        )
        func lateCowDevice() async throws {
            let volume = try RawVolume()
            let tool = volume.guardTool
            // The COW on a device-mapper device of its own, with a UUID: its name comes and goes
            // with it (as an LV's or a by-id link does), and its identity stays the same.
            let cowImage = volume.scratch.path("cow.img")
            try makeSparseFile(cowImage, mebibytes: 64)
            let loop = try LoopDevice.attach(file: cowImage).device
            let cowName = uniqueName("latecow")
            let cowUUID = "TEST-\(cowName)"
            let create = "dmsetup create \(cowName) --uuid \(cowUUID) --table '0 \(64 * 2048) linear \(loop.path) 0'"
            try sh(create)
            volume.scratch.defer_ {
                _ = try? sh("dmsetup remove \(cowName)")
                for loop in LoopDevice.find(backingFile: cowImage) { try? loop.detach() }
            }
            let (run, before, _) = try volume.keptRun(snapshot: "{ size: 16M, cow: /dev/mapper/\(cowName) }")

            // The reboot: the COW's device comes 3 s after the boot unit started.
            try powerCut(volume)
            try sh("dmsetup remove \(cowName)")
            try activateOnly(volume)
            let boot = Task.detached { try tool("recover", "--boot") }
            try await Task.sleep(for: .seconds(3))
            try sh(create)
            let recovered = try await boot.value
            #expect(recovered.status == 0, "\(recovered.stdout) \(recovered.stderr)")
            #expect(recovered.stdout.contains("reassembled the snapshot of \(volume.name)"), "\(recovered.stdout)")
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try volume.checksum == before)
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "boot-late-cow-device", "reset with a kept run whose COW device appears 3 s after the boot unit starts", "keep", "restored", "rolled_back",
                "waited for the device (no udevadm settle), reassembled; rollback restored", "",
            ])
        }
    }
}
