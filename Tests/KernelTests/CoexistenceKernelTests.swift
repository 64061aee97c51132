import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Snapshot
import Testing

/// An lvm2 command an admin runs on a guarded LV while its run is kept.
struct LVMCommand: CustomTestStringConvertible, Sendable {
    var name: String
    /// What the test does; `$VG`, `$LV`, `$MNT` and `$PV2` are replaced.
    var script: String
    /// Needs the filesystem unmounted around it (lvm2 refuses to deactivate a mounted LV).
    var unmounted = false
    /// The LV's name after it (lvrename).
    var renamedTo: String?
    /// Words the likely cause in guard's message holds.
    var cause: String
    var testDescription: String { name }
}

extension Kernel {
    /// Issue 39: lvm2 commands on a guarded LV never take the rollback away silently.
    @Suite("living beside lvm2")
    struct CoexistenceKernelTests {
        static let commands: [LVMCommand] = [
            LVMCommand(name: "lvextend", script: "lvextend -q -L +40M $VG/$LV", cause: "lvextend"),
            LVMCommand(name: "lvextend -r", script: "lvextend -q -r -L +40M $VG/$LV", cause: "lvextend"),
            LVMCommand(name: "lvchange --refresh", script: "lvchange -q --refresh $VG/$LV", cause: "lvchange --refresh"),
            LVMCommand(name: "lvrename", script: "lvrename -q $VG $LV site2", renamedTo: "site2", cause: "lvrename"),
            LVMCommand(name: "pvmove", script: "vgextend -q $VG $PV2 && pvmove -q -i0 -n $LV $PV1 $PV2", cause: "pvmove"),
            LVMCommand(name: "vgchange -an then -ay", script: "vgchange -q -an $VG && vgchange -q -ay $VG", unmounted: true, cause: "vgchange"),
            LVMCommand(name: "lvcreate -s", script: "lvcreate -q -y -s -L 40M -n lvmsnap $VG/$LV", cause: "lvcreate -s"),
        ]

        /// A kept run on the tutorial's LV whose step rewrote a page of the database in place.
        func keptRun(_ lvm: LVMFixture, tool: GuardTool) throws -> (run: String, before: String) {
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)
            let recipe = try writeRecipe(
                """
                name: pages
                volumes:
                  - device: \(lvm.device)
                    mount: \(lvm.mountPoint)
                    snapshot: { size: 24M }
                steps:
                  - name: rewrite a page in place
                    shell: printf 'migrated-page' | dd of=\(lvm.mountPoint)/database bs=4096 seek=0 conv=notrunc,fsync status=none
                on_success: keep
                on_failure: rollback
                """, in: lvm.scratch)
            let kept = try tool("run", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            return ("\(try #require(try tool.history()).first?["id"] as? Int ?? 0)", before)
        }

        @Test(
            "an lvm2 command reloads a kept run's LV, then the admin writes in place: status names it, diff, restore and rollback refuse, commit releases it; no exit 0 ever leaves a mix",
            arguments: commands)
        func lvmCommandDuringKeptRun(_ command: LVMCommand) throws {
            try sh("modprobe dm-mirror 2>/dev/null; true")
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let (run, before) = try keptRun(lvm, tool: tool)
            let upgraded = try manifest(lvm.mountPoint)
            let second = lvm.scratch.path("pv2.img")
            try makeSparseFile(second, mebibytes: 300)
            let pv2 = try LoopDevice.attach(file: second).device
            lvm.scratch.defer_ { try? pv2.detach() }
            try sh("pvcreate -q \(pv2.path)")

            if command.unmounted { try Mounts.unmount(lvm.mountPoint) }
            let script = command.script.replacingOccurrences(of: "$VG", with: lvm.vg).replacingOccurrences(of: "$LV", with: "website")
                .replacingOccurrences(of: "$PV1", with: lvm.loop.path).replacingOccurrences(of: "$PV2", with: pv2.path)
            try sh("LVM_SUPPRESS_FD_WARNINGS=1 \(script)")
            let device = command.renamedTo.map { "/dev/mapper/\(lvm.vg)-\($0)" } ?? lvm.device
            if command.unmounted { try Mounts.mount(source: device, target: lvm.mountPoint, fileSystemType: "ext4") }
            // The admin's writes, in place, as a database writes its pages.
            try sh("printf 'admin-write-after-\(command.name.filter(\.isLetter))' | dd of=\(lvm.mountPoint)/database bs=4096 seek=1 conv=notrunc,fsync status=none && sync")
            let current = try manifest(lvm.mountPoint)
            #expect(current != upgraded && current != before)
            /// Every guard command that exits 0 leaves the pre-run files or the current ones.
            func check(_ result: CommandResult, _ what: String) throws {
                guard result.status == 0 else { return }
                let now = try manifest(lvm.mountPoint)
                #expect(now == current || now == before, "guard \(what) exited 0 and left files that are neither the pre-run nor the current ones")
            }

            let status = try tool("status")
            #expect(status.status == 3, "status is not silent: \(status.stdout) \(status.stderr)")
            #expect(status.stderr.contains("run \(run)") && status.stderr.contains("stale") && status.stderr.contains(command.cause), "\(status.stderr)")
            #expect(status.stderr.contains("`guard commit \(run)`"), "it says what to do: \(status.stderr)")
            let diff = try tool("diff", run)
            #expect(diff.status != 0 && diff.stderr.contains("stale"), "\(diff.stderr)")
            try check(diff, "diff")
            let restore = try tool("restore", run, "\(lvm.mountPoint)/database")
            #expect(restore.status != 0 && restore.stderr.contains("stale"), "\(restore.stderr)")
            try check(restore, "restore")
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status != 0 && rollback.stderr.contains("stale"), "\(rollback.stderr)")
            try check(rollback, "rollback")
            #expect(try manifest(lvm.mountPoint) == current, "the refusals touched nothing")
            let recover = try tool("recover")
            #expect(recover.status == 3 && recover.stderr.contains("stale"), "\(recover.stdout) \(recover.stderr)")
            try check(recover, "recover")

            // What guard advised: commit releases the stale snapshot, the volume keeps its data.
            let commit = try tool("commit", run)
            #expect(commit.status == 0, "\(commit.stderr)")
            try check(commit, "commit")
            #expect(try manifest(lvm.mountPoint) == current)
            let again = try tool("rollback", run)
            #expect(again.status == 2, "\(again.stderr)")
            #expect(try tool("status").status == 0)
            let events = try sh("sqlite3 '\(tool.stateDirectory)/journal.sqlite' \"SELECT action FROM events WHERE run_id = \(run)\"")
            #expect(events.contains("origin-bypassed"), "the journal says what was seen: \(events)")
            try expectNothingLeft(state: tool.stateDirectory)
            if command.name == "lvcreate -s" { try sh("lvremove -q -f \(lvm.vg)/lvmsnap") }
            try Mounts.unmount(lvm.mountPoint)
            #expect(try fsck(device))
            recordResult([
                "lvm2: \(command.name)", "`\(command.script.replacingOccurrences(of: "$", with: ""))` on a kept run's LV, then writes in place", "keep",
                "as written", "committed", "stale at once (status exit 3, the likely command named); diff, restore and rollback refused; commit released it",
            ])
        }

        @Test("lvchange --refresh with guard monitor running, writes in place, a power cut: the boot keeps the snapshot stale, never reassembled or merged")
        func refreshThenPowerCut() async throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let (run, _) = try keptRun(lvm, tool: tool)
            let cow = try #require(SnapshotEngine.cowFiles(in: lvm.scratch.path("state/cow")).first?.path)
            let monitor = try startGuard(["monitor", "--state-dir", tool.stateDirectory], output: lvm.scratch.path("monitor.log"))
            defer { monitor.terminate() }
            try await Task.sleep(for: .seconds(3))  // the monitor reads the journal and watches the run

            let started = Date()
            try sh("LVM_SUPPRESS_FD_WARNINGS=1 lvchange -q --refresh \(lvm.vg)/website")
            try await waitUntil("guard monitor to mark the snapshot stale", seconds: 60) { try CowLabel.read(from: cow)?.state == .stale }
            let seconds = Date().timeIntervalSince(started)
            #expect(seconds < 10, "the monitor marked it stale in \(seconds) s")
            try sh("printf 'admin-write' | dd of=\(lvm.mountPoint)/database bs=4096 seek=1 conv=notrunc,fsync status=none && sync")
            let current = try manifest(lvm.mountPoint)
            monitor.terminate()

            // The power cut: every device gone; the boot activates the VG with lvm2's own tables.
            try Mounts.unmount(lvm.mountPoint)
            try sh("LVM_SUPPRESS_FD_WARNINGS=1 vgchange -q -an \(lvm.vg)")
            removeGuardStacks(onVolume: "\(lvm.vg)-website")
            for loop in LoopDevice.find(backingFile: cow) { try loop.detach() }
            try sh("LVM_SUPPRESS_FD_WARNINGS=1 vgchange -q -ay \(lvm.vg)")
            let boot = try tool("recover", "--boot")
            #expect(boot.status == 0 || boot.status == 3, "\(boot.stdout) \(boot.stderr)")
            #expect(try DeviceMapper().table(.name("\(lvm.vg)-website")).isOnly("linear"), "nothing was stacked on the LV")
            #expect(try CowLabel.read(from: cow)?.state == .stale)
            try Mounts.mount(source: lvm.device, target: lvm.mountPoint, fileSystemType: "ext4")
            #expect(try manifest(lvm.mountPoint) == current, "nothing was merged")
            let rollback = try tool("rollback", run)
            #expect(rollback.status != 0 && rollback.stderr.contains("stale"), "\(rollback.stderr)")
            #expect(try tool("commit", run).status == 0)
            #expect(try manifest(lvm.mountPoint) == current)
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "lvm2: refresh, power cut", "`lvchange --refresh` on a kept run's LV with guard monitor running, writes in place, a power cut", "keep",
                "as written", "committed", "the monitor marked the label stale within seconds; the boot kept it stale (never reassembled); commit released it",
            ])
        }
    }
}

/// Every live table that keeps state (raid, writecache, ...) whose devices another live one of
/// them shares: two instances of one stateful target, which corrupt its metadata. Empty is good.
func twoLiveStatefulTables() throws -> [String] {
    let dm = try DeviceMapper()
    var live: [(name: String, devices: Set<DeviceNumber>)] = []
    for device in try dm.list() {
        guard let info = try dm.info(.number(device.number)), info.hasLiveTable, !info.isSuspended else { continue }
        let table = try dm.table(.number(device.number))
        if table.keepsState { live.append((device.name, Set(table.devices))) }
    }
    var clashes: [String] = []
    for (index, one) in live.enumerated() {
        for other in live[(index + 1)...] where !one.devices.isDisjoint(with: other.devices) {
            clashes.append("\(one.name) and \(other.name) are both live over \(one.devices.intersection(other.devices).map(\.description).sorted())")
        }
    }
    return clashes
}

/// A VG on two loop PVs with the tutorial's LV made raid1 (lvm2's raid1, no initial sync) or
/// given lvm2's writecache on the second PV, ext4 mounted.
final class StatefulLVFixture {
    let scratch: Scratch
    let vg: String
    let device: String
    let mountPoint: String
    let pvs: [LoopDevice]

    init(_ type: String, label: String = #function) throws {
        try sh("modprobe dm-raid 2>/dev/null; modprobe dm-writecache 2>/dev/null; true")
        scratch = try Scratch(label)
        var pvs: [LoopDevice] = []
        for name in ["pv1.img", "pv2.img"] {
            try makeSparseFile(scratch.path(name), mebibytes: 200)
            pvs.append(try LoopDevice.attach(file: scratch.path(name)).device)
        }
        self.pvs = pvs
        vg = "gs\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        device = "/dev/mapper/\(vg)-website"
        mountPoint = scratch.path("website")
        let (vg, mountPoint) = (self.vg, self.mountPoint)
        scratch.defer_ {
            try? Mounts.unmount(mountPoint)
            removeGuardStacks(onVolume: "\(vg)-website")
            _ = try? sh("LVM_SUPPRESS_FD_WARNINGS=1 vgchange -q -an \(vg); LVM_SUPPRESS_FD_WARNINGS=1 vgremove -q -f \(vg)")
            for pv in pvs { try? pv.detach() }
        }
        let (a, b) = (pvs[0].path, pvs[1].path)
        var script = "export LVM_SUPPRESS_FD_WARNINGS=1; pvcreate -q \(a) \(b) && vgcreate -q \(vg) \(a) \(b) && "
        if type == "raid1" {
            script += "lvcreate -q -y --type raid1 -m 1 --nosync -L 64M -n website \(vg) \(a) \(b)"
        } else {
            script +=
                "lvcreate -q -y -L 64M -n website \(vg) \(a) && lvcreate -q -y -an -Zn -ky -L 32M -n fast \(vg) \(b) && "
                // udev's event activation may activate `fast` for an instant (activation skip keeps it out of -aay): try again.
                + "for try in 1 2 3 4 5; do lvchange -q -an \(vg)/fast; lvconvert -q -y --type writecache --cachevol fast \(vg)/website && break; sleep 1; done && lvs -o segtype --noheadings \(vg)/website | grep -q writecache"
        }
        try sh(script)
        let table = try DeviceMapper().table(.name("\(vg)-website"))
        #expect(table.keepsState, "the LV's table keeps state: \(table)")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try sh("mkfs.ext4 -q -F \(device)")
        try mount()
    }

    func mount() throws { try Mounts.mount(source: device, target: mountPoint, fileSystemType: "ext4") }

    /// Unmounts, deactivates and activates the LV with lvm2, checks the filesystem, mounts it again.
    func cycle() throws {
        try Mounts.unmount(mountPoint)
        try sh("export LVM_SUPPRESS_FD_WARNINGS=1; lvchange -q -an \(vg)/website && lvchange -q -ay \(vg)/website")
        #expect(try fsck(device), "e2fsck after the LV was deactivated and activated")
        try mount()
    }

    func recipe(bad: Bool, onSuccess: String) throws -> String {
        try writeRecipe(
            tutorialRecipe(device: device, mount: mountPoint, bad: bad, onSuccess: onSuccess), in: scratch, name: "\(bad ? "bad" : "good")-\(onSuccess.filter(\.isLetter)).recipe")
    }
}

extension Kernel.CoexistenceKernelTests {
    @Test(
        "a raid1 LV and a writecache LV: a committed run, a run rolled back by verify and a kept run rolled back later, each followed by deactivating and activating the LV, files exact; never two live instances of the target",
        arguments: ["raid1", "writecache"])
    func statefulOrigins(_ type: String) throws {
        let lv = try StatefulLVFixture(type)
        let tool = GuardTool(stateDirectory: lv.scratch.path("state"))
        try writeDatabase(at: lv.mountPoint)
        let before = try manifest(lv.mountPoint)

        let bad = try tool("run", try lv.recipe(bad: true, onSuccess: "commit"))
        #expect(bad.status == 1, "\(bad.stdout) \(bad.stderr)")
        #expect(try manifest(lv.mountPoint) == before)
        #expect(try twoLiveStatefulTables().isEmpty)
        try lv.cycle()
        #expect(try manifest(lv.mountPoint) == before, "rolled back by verify, after deactivate and activate")

        let committed = try tool("run", try lv.recipe(bad: false, onSuccess: "commit"))
        #expect(committed.status == 0, "\(committed.stderr)")
        let upgraded = try manifest(lv.mountPoint)
        #expect(upgraded != before)
        #expect(try twoLiveStatefulTables().isEmpty)
        try lv.cycle()
        #expect(try manifest(lv.mountPoint) == upgraded, "committed, after deactivate and activate")

        let kept = try tool("run", try lv.recipe(bad: false, onSuccess: "keep"))
        #expect(kept.status == 0, "\(kept.stderr)")
        #expect(try twoLiveStatefulTables().isEmpty, "a kept snapshot: one live \(type) table")
        let run = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"
        try sh("dd if=/dev/urandom of=\(lv.mountPoint)/later bs=64K count=16 conv=fsync status=none")
        let rollback = try tool("rollback", run, "--wait")
        #expect(rollback.status == 0, "\(rollback.stderr)")
        #expect(try manifest(lv.mountPoint) == upgraded, "the kept run rolled back to the state before it")
        #expect(try twoLiveStatefulTables().isEmpty)
        try lv.cycle()
        #expect(try manifest(lv.mountPoint) == upgraded, "rolled back later, after deactivate and activate")
        try expectNothingLeft(state: tool.stateDirectory)
    }

    @Test(
        "a process holds the raid1 LV's -real open (as lvm2's scan and blkid do) through the end of a merge and through a commit: no guard device is left suspended, -real is retired onto an error table and gone once closed, lvm2's commands never hang, files exact"
    )
    func statefulRealHeldOpen() throws {
        let lv = try StatefulLVFixture("raid1")
        let tool = GuardTool(stateDirectory: lv.scratch.path("state"))
        try writeDatabase(at: lv.mountPoint)
        for ending in ["rollback", "commit"] {
            let before = try manifest(lv.mountPoint)
            let kept = try tool("run", try lv.recipe(bad: false, onSuccess: "keep"))
            #expect(kept.status == 0, "\(kept.stdout) \(kept.stderr)")
            let upgraded = try manifest(lv.mountPoint)
            let runID = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"
            let dm = try DeviceMapper()
            let real = try #require(try dm.guardDevices().first { $0.name.contains("\(lv.vg)-website") && $0.name.hasSuffix("-real") })
            let held = open("/dev/mapper/\(real.name)", O_RDONLY)
            #expect(held >= 0, "opened \(real.name)")
            let result = ending == "commit" ? try tool("commit", runID) : try tool("rollback", runID, "--wait")
            #expect(result.status == 0, "\(ending) with -real held open: \(result.stdout) \(result.stderr)")
            let suspended = try dm.guardDevices().filter { (try? dm.info(.number($0.number)))??.isSuspended == true }.map(\.name)
            #expect(suspended.isEmpty, "no guard device is left suspended after the \(ending): \(suspended)")
            if let info = try dm.info(.number(real.number)) {
                #expect(try dm.table(.number(real.number)).isOnly("error"), "-real is retired onto an error table while it is held")
                #expect(info.removalDeferred, "the kernel removes it when it is closed")
            }
            let lvs = try run(["timeout", "120", "lvs", "-a", "--noheadings", "-o", "lv_name", lv.vg], hangSeconds: 180)
            #expect(lvs.status != 124 && lvs.stdout.contains("website"), "lvs does not hang on guard's devices: \(lvs.status) \(lvs.stderr)")
            if held >= 0 { close(held) }
            var gone = false
            for _ in 0..<50 where !gone {
                gone = try dm.info(.number(real.number)) == nil
                if !gone { usleep(100_000) }
            }
            #expect(gone, "-real is gone once its last opener closed it")
            #expect(try twoLiveStatefulTables().isEmpty)
            let expected = ending == "commit" ? upgraded : before
            #expect(try manifest(lv.mountPoint) == expected, "after the \(ending)")
            try lv.cycle()
            #expect(try manifest(lv.mountPoint) == expected, "after the \(ending), deactivated and activated")
            try expectNothingLeft(state: tool.stateDirectory)
        }
    }

    @Test(
        "guard killed in the take, the commit and the end of a merge of a writecache LV: never two live writecache tables, before or after recovery, files exact",
        arguments: ["prepare.origin-loaded", "window.suspended", "commit.suspended", "finish.origin-loaded"])
    func statefulCrashPoints(_ point: String) throws {
        let lv = try StatefulLVFixture("writecache")
        let tool = GuardTool(stateDirectory: lv.scratch.path("state"))
        try writeDatabase(at: lv.mountPoint)
        let before = try manifest(lv.mountPoint)
        let merging = point.hasPrefix("finish")
        // A run that commits (take and commit points) or fails its verify (the merge's end).
        let recipe = try lv.recipe(bad: merging, onSuccess: "commit")
        let killed = try tool("run", recipe, extra: ["GUARD_CRASH_AT": point])
        #expect(killed.status == 137, "guard was killed at \(point): \(killed.stdout) \(killed.stderr)")
        #expect(try twoLiveStatefulTables().isEmpty, "right after the kill at \(point)")
        if Mounts.entry(at: lv.mountPoint) != nil { try Mounts.unmount(lv.mountPoint) }
        let recover = try tool("recover")
        #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
        #expect(try twoLiveStatefulTables().isEmpty, "after recovery from \(point)")
        try lv.mount()
        let files = try manifest(lv.mountPoint)
        if merging || point.hasPrefix("prepare") || point.hasPrefix("window") {
            #expect(files == before, "\(point): recovery restored the files as before the run")
        } else {
            #expect(files != before, "\(point): the commit was finished")
        }
        try lv.cycle()
        #expect(try manifest(lv.mountPoint) == files)
        try expectNothingLeft(state: tool.stateDirectory)
    }
}

extension Kernel.CoexistenceKernelTests {
    @Test(
        "the COW device's name is another device after a reboot (renumbered): nothing is read from or wiped on it, the run needs reassembly; the right device under that name again, the rollback restores every byte"
    )
    func renamedCowDevice() throws {
        let volume = try RawVolume()
        let tool = volume.guardTool
        let cowImage = volume.scratch.path("cow.img")
        let blankImage = volume.scratch.path("blank.img")
        try makeSparseFile(cowImage, mebibytes: 64)
        try makeRandomFile(blankImage, mebibytes: 8)
        let blankBefore = try sha256(blankImage)
        let cow = try LoopDevice.attach(file: cowImage).device
        let cowPath = cow.path
        volume.scratch.defer_ {
            for image in [cowImage, blankImage] { for loop in LoopDevice.find(backingFile: image) { try? loop.detach() } }
        }
        let (run, before, _) = try volume.keptRun(snapshot: "{ size: 16M, cow: \(cowPath) }")

        // The reboot: the devices are gone; the disks come back in another order.
        try powerCut(volume)
        try cow.detach()
        try sh("losetup \(cowPath) '\(blankImage)'")
        let moved = try LoopDevice.attach(file: cowImage).device
        #expect(moved.path != cowPath)
        try activateOnly(volume)
        let recover = try tool("recover", "--boot")
        #expect(recover.status == 4, "needs reassembly, not released: \(recover.stdout) \(recover.stderr)")
        #expect(recover.stderr.contains("not the run's"), "\(recover.stderr)")
        #expect(try sha256(blankImage) == blankBefore, "nothing was written on the other disk")
        #expect(try CowLabel.read(from: cowImage)?.state == .kept, "the run's COW is untouched")
        #expect(try tool("status").status == 4)

        // The run's disk under its name again.
        try sh("losetup -d \(cowPath) && losetup -d \(moved.path) && losetup \(cowPath) '\(cowImage)'")
        let again = try tool("recover")
        #expect(again.status == 0, "\(again.stdout) \(again.stderr)")
        let rollback = try tool("rollback", run, "--wait")
        #expect(rollback.status == 0, "\(rollback.stderr)")
        #expect(try volume.checksum == before)
        #expect(try sha256(blankImage) == blankBefore)
        recordResult([
            "cow-device-renamed", "reset with a kept run whose COW device's name is another disk at boot", "keep", "restored", "rolled_back",
            "needs reassembly (exit 4); the other disk untouched; recovered and rolled back once the run's disk was under its name",
        ])
    }
}
