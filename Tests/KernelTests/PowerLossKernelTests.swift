import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// The persistent directory of the power-loss scenario (shared by both boots), when Scripts/test runs it.
let powerLossDirectory = ProcessInfo.processInfo.environment["GUARD_POWERLOSS_DIR"]

/// Issue 7, power loss: the first boot starts three runs and resets the machine without a clean
/// shutdown; the second boot, on the same disk images, runs `guard recover --boot` and checks.
/// Scripts/test boots the VM twice for it; the main kernel run skips this suite.
@Suite("PowerLoss", .serialized, .enabled(if: powerLossDirectory != nil && kernelHasDeviceMapper, "run by Scripts/test in two VM boots"))
struct PowerLoss {
    var directory: String { powerLossDirectory! }
    var stateMount: String { "/tmp/guard-powerloss-state" }
    var guardTool: GuardTool { GuardTool(stateDirectory: "\(stateMount)/guard") }

    /// The disk Scripts/test attaches (a file on the host, so it outlives the VM like a disk
    /// outlives a power loss): an LVM volume group with the three volumes and guard's state.
    var disk: String { ProcessInfo.processInfo.environment["GUARD_POWERLOSS_DISK"] ?? "/dev/vda" }

    /// Issue 15: a second state directory, on its own LV, whose runs keep their COW files on a
    /// filesystem (LV gpl-cowlate) that boot 2 mounts only late; boot 2 runs no reassembly for it.
    var lateStateMount: String { "/tmp/guard-powerloss-late-state" }
    var lateTool: GuardTool { GuardTool(stateDirectory: "\(lateStateMount)/guard") }
    var lateCowMount: String { "/tmp/guard-powerloss-late-cow" }
    /// The COW files go to the late filesystem's root: in boot 2 the directory exists (an empty
    /// mount point) before the filesystem is mounted, and only guard's marker tells them apart.
    var lateCowDirectory: String { lateCowMount }

    func prepareDisk(create: Bool) throws {
        if create {
            try sh("pvcreate -q -ff -y \(disk) && vgcreate -q gpl \(disk) && lvcreate -q -y -L 256M -n state gpl && mkfs.ext4 -q -F /dev/mapper/gpl-state")
            for name in ["steps", "kept", "merging", "late-steps", "late-merging"] { try sh("lvcreate -q -y -L 24M -n \(name) gpl") }
            try sh("lvcreate -q -y -L 48M -n late-state gpl && mkfs.ext4 -q -F /dev/mapper/gpl-late--state")
            try sh("lvcreate -q -y -L 96M -n cowlate gpl && mkfs.ext4 -q -F /dev/mapper/gpl-cowlate")
            // Issue 20: the backing of a thin guard volume's pool.
            try sh("lvcreate -q -y -L 96M -n thinback gpl")
        } else {
            // What LVM's activation does at boot (udev-triggered on a full system).
            try sh("vgchange -q -ay gpl")
        }
        try FileManager.default.createDirectory(atPath: stateMount, withIntermediateDirectories: true)
        try Mounts.mount(source: "/dev/mapper/gpl-state", target: stateMount, fileSystemType: "ext4")
        try FileManager.default.createDirectory(atPath: lateStateMount, withIntermediateDirectories: true)
        try Mounts.mount(source: "/dev/mapper/gpl-late--state", target: lateStateMount, fileSystemType: "ext4")
        // The late filesystem's mount point exists in both boots; boot 2 leaves it empty at first.
        try FileManager.default.createDirectory(atPath: lateCowMount, withIntermediateDirectories: true)
        if create {
            try Mounts.mount(source: "/dev/mapper/gpl-cowlate", target: lateCowMount, fileSystemType: "ext4")
        }
    }

    func volume(_ name: String) -> String { "/dev/mapper/gpl-\(name.replacingOccurrences(of: "-", with: "--"))" }

    func before(_ name: String) throws -> String {
        try String(contentsOfFile: "\(directory)/before-\(name)", encoding: .utf8).trimmingWhitespace()
    }

    /// The thin guard volume (its pool over LV gpl-thinback).
    var thinVolume: String { "/dev/mapper/plthin" }

    func recipe(_ name: String, step: String, verify: Bool, keep: Bool, cow: String? = nil, device: String? = nil) throws -> String {
        let path = "\(directory)/\(name).recipe"
        try """
        name: powerloss-\(name)
        volumes:
          - device: \(device ?? volume(name))
            snapshot: \(cow.map { "{ size: 24M, cow: \($0) }" } ?? "24M")
        steps:
          - name: write
            shell: \(step)
        verify:
          - name: check
            run: [\(verify ? "/bin/true" : "/bin/false")]
        on_success: \(keep ? "keep 2d" : "commit")
        on_failure: rollback
        """.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o644)
        return path
    }

    @Test("boot 1: a run in its steps, a kept run, a rollback mid-merge, then reset")
    func phase1() async throws {
        setenv("LVM_SUPPRESS_FD_WARNINGS", "1", 1)
        try prepareDisk(create: true)
        let tool = guardTool
        for name in ["steps", "kept", "merging", "late-steps", "late-merging"] {
            try sh("dd if=/dev/urandom of=\(volume(name)) bs=1M count=24 oflag=direct status=none")
            try sh("sha256sum < \(volume(name)) | cut -c1-64 > '\(directory)/before-\(name)'")
            try makeRandomFile("\(directory)/patch-\(name)", mebibytes: name.hasSuffix("merging") ? 16 : 8)
        }
        func write(_ name: String) -> String {
            "dd if=\(directory)/patch-\(name) of=\(volume(name)) bs=1M seek=4 oflag=direct conv=notrunc,fsync status=none"
        }
        // Kept: the upgrade applied, its snapshot kept for two days.
        let kept = try tool("run", try recipe("kept", step: write("kept"), verify: true, keep: true))
        #expect(kept.status == 0, "\(kept.stderr)")
        // Steps: the power goes while a step runs.
        let marker = "\(directory)/step-started"
        let stepsRecipe = try recipe("steps", step: write("steps") + "; touch \(marker); sleep 600", verify: true, keep: false)
        let steps = Task.detached { try tool("run", stepsRecipe) }
        try await waitUntil("the step to run") { FileManager.default.fileExists(atPath: marker) }
        // Started without waiting (a shell's `&` would not do: the test waits for its pipes to close).
        func start(_ recipe: String, state: String, output: String) throws {
            try startGuard(["run", "-v", recipe, "--state-dir", state], output: output)
        }
        // The same in the late state directory, its COW on the late filesystem. A process of
        // its own: a second blocking run() would take the last thread of the cooperative pool.
        let late = lateTool
        let lateMarker = "\(directory)/late-step-started"
        let lateStepsRecipe = try recipe("late-steps", step: write("late-steps") + "; touch \(lateMarker); sleep 600", verify: true, keep: false, cow: lateCowDirectory)
        try start(lateStepsRecipe, state: late.stateDirectory, output: "\(directory)/late-steps.out")
        try await waitUntil("the late step to run") { FileManager.default.fileExists(atPath: lateMarker) }
        try await thinPhase1()
        // Merging: a failed verify, the rollback's merge slowed down so the reset lands in it.
        _ = CopyThrottle(1)  // held until the reset
        let mergingRecipe = try recipe("merging", step: write("merging"), verify: false, keep: false)
        let dm = try DeviceMapper()
        let lateMergingRecipe = try recipe("late-merging", step: write("late-merging"), verify: false, keep: false, cow: lateCowDirectory)
        // Both at once, so that neither merge is over while the other one is still coming.
        try start(mergingRecipe, state: tool.stateDirectory, output: "\(directory)/merging.out")
        try start(lateMergingRecipe, state: late.stateDirectory, output: "\(directory)/late-merging.out")
        // Each merge is held where it is as soon as it starts: a suspended merging origin stops
        // its merge (dm-snapshot's presuspend), so the reset lands mid-merge however fast the
        // machine is (the merges used to be raced against the reset, and a fast one finished).
        for device in ["gpl-merging", "gpl-late--merging"] {
            try await waitUntil("the merge into \(device) to start") { (try? dm.table(.name(device)).isOnly("snapshot-merge")) == true }
            try dm.suspend(.name(device), flush: false, lockFileSystem: false)
        }
        for device in ["gpl-merging", "gpl-late--merging"] {
            guard let usage = (try? dm.snapshotStatus(.name(device)))?.usage, !usage.isMergeComplete else {
                let output = (try? String(contentsOfFile: "\(directory)/merging.out", encoding: .utf8)) ?? ""
                Issue.record("the merge into \(device) finished before the reset, or never started; nothing would be tested: \(output)")
                return
            }
        }
        try "ready".write(toFile: "\(directory)/phase1-ready", atomically: true, encoding: .utf8)
        // Power loss: no sync, no unmount, no shutdown.
        try sh("echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger")
        try await Task.sleep(for: .seconds(600))
        _ = steps
        Issue.record("the machine did not reset")
    }

    /// Issue 20: a thin guard volume with a kept run, and on top of it (a second generation) a
    /// run that is in its steps when the power goes.
    func thinPhase1() async throws {
        let tool = guardTool
        let created = try tool("volume", "create", "plthin", "--backing", "/dev/mapper/gpl-thinback", "--size", "24M", "--thin", "--pool-size", "64M")
        #expect(created.status == 0, "\(created.stderr)")
        try sh("dd if=/dev/urandom of=\(thinVolume) bs=1M count=24 oflag=direct status=none")
        try sh("sha256sum < \(thinVolume) | cut -c1-64 > '\(directory)/before-thin'")
        try makeRandomFile("\(directory)/patch-thin", mebibytes: 8)
        let write = { (seek: Int) in "dd if=\(directory)/patch-thin of=\(thinVolume) bs=1M seek=\(seek) oflag=direct conv=notrunc,fsync status=none" }
        let kept = try tool("run", try recipe("thin-kept", step: write(2), verify: true, keep: true, device: thinVolume))
        #expect(kept.status == 0, "\(kept.stderr)")
        try sh("sha256sum < \(thinVolume) | cut -c1-64 > '\(directory)/before-thin-steps'")
        let marker = "\(directory)/thin-step-started"
        let steps = try recipe("thin-steps", step: write(12) + "; touch \(marker); sleep 600", verify: true, keep: false, device: thinVolume)
        try startGuard(["run", "-v", steps, "--state-dir", tool.stateDirectory], output: "\(directory)/thin-steps.out")
        try await waitUntil("the thin volume's step to run") { FileManager.default.fileExists(atPath: marker) }
    }

    @Test("boot 2: reassembly restores the volume of the interrupted run, finishes the merge, keeps the kept snapshot rollbackable")
    func phase2() async throws {
        setenv("LVM_SUPPRESS_FD_WARNINGS", "1", 1)
        #expect(FileManager.default.fileExists(atPath: "\(directory)/phase1-ready"), "boot 1 reached the reset")
        let dm = try DeviceMapper()
        #expect(try dm.guardDevices().isEmpty, "a fresh boot has no guard device")
        try prepareDisk(create: false)
        try lateStateWithoutReassembly()
        let tool = guardTool

        // What the boot unit runs, before anything mounts the volumes.
        let boot = try tool("recover", "--boot")
        #expect(boot.status == 0, "\(boot.stdout) \(boot.stderr)")
        #expect(boot.stdout.contains("resumed the merge into gpl-merging"), "\(boot.stdout)")
        #expect(boot.stdout.contains("reassembled the snapshot of gpl-kept"), "\(boot.stdout)")
        #expect(try dm.table(.name("gpl-steps")).isOnly("snapshot-merge"), "the interrupted run is merged back at once")
        #expect(try dm.table(.name("gpl-merging")).isOnly("snapshot-merge"))
        #expect(try dm.table(.name("gpl-kept")).isOnly("snapshot-origin"), "the kept snapshot is a snapshot again")

        // The thin volume: activated (thin_check) from its registry; the run in its steps rolled
        // back to its snapshot, which is the kept run's upgrade; the kept run can still be rolled back.
        #expect(boot.stdout.contains("activated guard volume plthin"), "\(boot.stdout)")
        #expect(try sha256(thinVolume) == before("thin-steps"), "the thin run interrupted in its steps is rolled back at boot")

        // Reads show the old data as soon as the merges run.
        #expect(try sha256(volume("steps")) == before("steps"))
        #expect(try sha256(volume("merging")) == before("merging"))

        let wait = try tool("status", "--wait")
        #expect(wait.status == 0, "\(wait.stderr)")
        try dropCaches(volume("steps"))
        try dropCaches(volume("merging"))
        #expect(try sha256(volume("steps")) == before("steps"), "the run interrupted in its steps is rolled back")
        #expect(try sha256(volume("merging")) == before("merging"), "the interrupted merge finished")
        #expect(try dm.table(.name("gpl-steps")).isOnly("linear") && dm.table(.name("gpl-merging")).isOnly("linear"))

        // The kept run survived the reset and can still be rolled back.
        let history = try #require(try tool.history())
        let keptRun = try #require(history.first { ($0["recipe"] as? String) == "powerloss-kept" })
        #expect(keptRun["state"] as? String == "kept")
        let rollback = try tool("rollback", "\(keptRun["id"] as! Int)", "--wait")
        #expect(rollback.status == 0, "\(rollback.stderr)")
        try dropCaches(volume("kept"))
        #expect(try sha256(volume("kept")) == before("kept"))

        let keptThin = try #require(history.first { ($0["recipe"] as? String) == "powerloss-thin-kept" })
        #expect(keptThin["state"] as? String == "kept")
        let thinRollback = try tool("rollback", "\(keptThin["id"] as! Int)", "--wait")
        #expect(thinRollback.status == 0, "\(thinRollback.stderr)")
        try dropCaches(thinVolume)
        #expect(try sha256(thinVolume) == before("thin"), "the kept thin run is rolled back after the reset")

        let after = try #require(try tool.history())
        let outcomes = Dictionary(uniqueKeysWithValues: after.map { ($0["recipe"] as! String, $0["outcome"] as? String ?? "") })
        #expect(outcomes["powerloss-steps"] == "recovered")
        // Its guard process died mid-merge: recovery finished the rollback and says so.
        #expect(outcomes["powerloss-merging"] == "recovered")
        let mergingRun = try #require(after.first { ($0["recipe"] as? String) == "powerloss-merging" })
        #expect((mergingRun["error"] as? String ?? "").contains("rolled back"), "\(mergingRun)")
        #expect(outcomes["powerloss-kept"] == "rolled_back")
        #expect(outcomes["powerloss-thin-steps"] == "recovered")
        #expect(outcomes["powerloss-thin-kept"] == "rolled_back")
        try expectNothingLeft(state: tool.stateDirectory)
        recordResult([
            "power-loss-steps", "reset while a step runs; next boot runs guard recover --boot", "rollback", "restored", "recovered",
            "snapshot reassembled from its label and merged back at boot, before any mount", "",
        ])
        recordResult([
            "power-loss-merge", "reset during a rollback's merge", "rollback", "restored", "recovered",
            "merge resumed at boot from the COW's exceptions; the run's error says it was rolled back", "",
        ])
        recordResult(["power-loss-kept", "reset with a kept snapshot", "keep", "restored", "rolled_back", "snapshot reassembled at boot; guard rollback worked afterwards", ""])
        recordResult([
            "power-loss-thin", "thin: reset while a step runs, a kept run beneath it", "rollback", "restored", "recovered",
            "the thin volume activated from its registry after thin_check; the run swapped back to its snapshot at boot; the kept run rolled back afterwards", "",
        ])
        // The thin volume and its pool hold gpl-thinback: guard removes them (the LV keeps the pool).
        let removed = try tool("volume", "remove", "plthin")
        #expect(removed.status == 0, "\(removed.stderr)")
        try? Mounts.unmount(stateMount)
        _ = try? sh("vgchange -q -an gpl")
    }

    /// Boot 2 for the late state directory: no boot unit ran for it, its COW filesystem is not
    /// mounted. status, the maintenance job and recover keep everything and say it needs
    /// reassembly; once the filesystem is mounted, recover restores both volumes.
    func lateStateWithoutReassembly() throws {
        let late = lateTool
        let dm = try DeviceMapper()
        #expect(Mounts.entry(at: lateCowMount) == nil, "the late filesystem is not mounted yet")

        let status = try late("status")
        #expect(status.status == 4, "\(status.stdout) \(status.stderr)")
        #expect(status.stdout.contains("needs reassembly"), "\(status.stdout)")
        // The maintenance job (guard-maintenance.service runs `guard status --tidy --wait --quiet`).
        let maintenance = try late("status", "--tidy", "--wait", "--quiet")
        #expect(maintenance.status == 4, "\(maintenance.stdout) \(maintenance.stderr)")
        let early = try late("recover")
        #expect(early.status == 4, "\(early.stdout) \(early.stderr)")
        #expect(early.stderr.contains("marker"), "the message says the COW directory is not the one guard wrote into: \(early.stderr)")
        let waiting = try #require(try late.history())
        #expect(waiting.allSatisfy { $0["state"] as? String == "needs_reassembly" }, "\(waiting.map { $0["state"] ?? "" })")
        for name in ["late-steps", "late-merging"] {
            #expect(try dm.table(.name("gpl-\(name.replacingOccurrences(of: "-", with: "--"))")).isOnly("linear"), "nothing was stacked or torn down")
        }

        // The filesystem comes: the labels are as the reset left them.
        try Mounts.mount(source: "/dev/mapper/gpl-cowlate", target: lateCowMount, fileSystemType: "ext4")
        let states = try SnapshotEngine.cowFiles(in: lateCowDirectory).compactMap { try CowLabel.read(from: $0.path)?.state }
        #expect(Set(states) == [.active, .merging], "\(states)")
        let recover = try late("recover")
        #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
        #expect(recover.stdout.contains("reassembled the snapshot of gpl-late--steps"), "\(recover.stdout)")
        #expect(recover.stdout.contains("resumed the merge into gpl-late--merging"), "\(recover.stdout)")
        for name in ["late-steps", "late-merging"] {
            try dropCaches(volume(name))
            #expect(try sha256(volume(name)) == before(name), "\(name): every byte as before the run")
        }
        let history = try #require(try late.history())
        #expect(history.allSatisfy { $0["state"] as? String == "finished" && $0["outcome"] as? String == "recovered" }, "\(history)")
        #expect(SnapshotEngine.cowFiles(in: lateCowDirectory).isEmpty, "the COW files are released once merged")
        #expect(try dm.guardDevices().filter { StackIdentity.parse(uuid: $0.uuid) != nil }.isEmpty)
        recordResult([
            "power-loss-no-reassembly-steps", "reset while a step runs; no boot unit; the COW filesystem mounted late", "rollback", "restored", "recovered",
            "status, maintenance and recover exit 4 and keep everything; recover after the mount rolled back", "",
        ])
        recordResult([
            "power-loss-no-reassembly-merge", "reset mid-merge; no boot unit; the COW filesystem mounted late", "rollback", "restored", "recovered",
            "status --wait tore nothing down; recover after the mount finished the merge", "",
        ])
        try Mounts.unmount(lateCowMount)
        try Mounts.unmount(lateStateMount)
    }
}
