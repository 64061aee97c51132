import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// The ids a thin volume's pool has, from its metadata (a metadata snapshot read by thin_dump while the pool is live).
func thinPoolIDs(_ name: String) throws -> [Int] {
    let pool = "guard-pool-\(name)"
    try sh("dmsetup message \(pool) 0 reserve_metadata_snap")
    defer { _ = try? run(["dmsetup", "message", pool, "0", "release_metadata_snap"]) }
    let dump = try sh("thin_dump -m /dev/mapper/\(pool)-tmeta")
    return dump.split(separator: "\n").compactMap { line -> Int? in
        guard let range = line.range(of: "dev_id=\"") else { return nil }
        return Int(line[range.upperBound...].prefix { $0.isNumber })
    }.sorted()
}

/// The thin id a volume's registry names.
func registeredThinID(_ state: String, _ name: String) throws -> Int? {
    let data = try Data(contentsOf: URL(fileURLWithPath: "\(state)/volumes/\(name).json"))
    return ((try JSONSerialization.jsonObject(with: data) as? [String: Any])?["thin"] as? [String: Any])?["deviceID"] as? Int
}

/// A thin guard volume NAME over a file, a mount point, and a state directory of its own;
/// everything is removed at the end (views of kept runs, the volume and its pool, the loop device).
final class ThinFixture {
    let scratch: Scratch
    let tool: GuardTool
    let name: String
    let backing: String
    let device: String
    let mount: String

    init(label: String = #function) throws {
        scratch = try Scratch(label)
        tool = GuardTool(stateDirectory: scratch.path("state"))
        name = uniqueName("thin")
        backing = scratch.path("thin.img")
        device = "/dev/mapper/\(name)"
        mount = scratch.path("website")
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        let (tool, name, backing, mount) = (tool, name, backing, mount)
        scratch.defer_ {
            _ = try? run(["umount", mount])
            for view in (try? DeviceMapper().guardDevices())?.filter({ $0.name.contains(name) && $0.name.hasSuffix("-snap") }) ?? [] {
                _ = try? run(["dmsetup", "remove", view.name])
            }
            _ = try? tool("volume", "remove", name)
            for uuid in ["GUARD-VOL-\(name)", "GUARD-POOL-\(name)", "GUARD-POOL-\(name)-tdata", "GUARD-POOL-\(name)-tmeta"] {
                _ = try? run(["dmsetup", "remove", "-u", uuid])
            }
            for loop in LoopDevice.find(backingFile: backing) { try? loop.detach() }
        }
    }

    /// `guard volume create NAME --thin`, then ext4 mounted on `mount`.
    func create(size: String, poolSize: String, filesystem: Bool = true) throws {
        let created = try tool("volume", "create", name, "--backing", backing, "--size", size, "--thin", "--pool-size", poolSize)
        #expect(created.status == 0, "\(created.stderr)")
        guard filesystem else { return }
        try sh("mkfs.ext4 -q -F -E nodiscard \(device)")
        try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
    }
}

extension Kernel {
    /// Issue 20: thin guard volumes, a dm-thin pool guard makes over a file.
    @Suite("thin volumes")
    struct ThinKernelTests {
        /// The devices of a thin volume NAME, as `dmsetup table` shows them.
        func tables(_ name: String) throws -> (volume: String, pool: String) {
            (
                try sh("dmsetup table \(name)").trimmingCharacters(in: .whitespacesAndNewlines),
                try sh("dmsetup table guard-pool-\(name)").trimmingCharacters(in: .whitespacesAndNewlines)
            )
        }

        /// Removes the volume's devices and detaches its loop device, as a reboot would.
        func powerOff(_ name: String, backing: String) throws {
            for view in try DeviceMapper().guardDevices().filter({ $0.name.contains(name) && $0.name.hasSuffix("-snap") }) {
                try removeOnceClosed(view.name)
            }
            for device in [name, "guard-pool-\(name)", "guard-pool-\(name)-tdata", "guard-pool-\(name)-tmeta"] {
                try removeOnceClosed(device)
            }
            for loop in LoopDevice.find(backingFile: backing) { try loop.detach() }
        }

        /// Removes a device as a shutdown would, once nothing has it open: udev's blkid after
        /// e2fsck, or the other lane's lvm2 scan, may hold it for seconds under emulation (the
        /// CI saw the volume busy for more than dmsetup's own five seconds of retries). After a
        /// minute it fails and names who holds it.
        func removeOnceClosed(_ device: String) throws {
            for _ in 0..<120 {
                if (try sh("dmsetup info -c --noheadings -o open \(device)")).trimmingCharacters(in: .whitespacesAndNewlines) == "0" { break }
                usleep(500_000)
            }
            do {
                try sh("dmsetup remove --retry \(device)")
            } catch {
                let holders =
                    (try? sh(
                        "fuser -v /dev/mapper/\(device) 2>&1; ls /sys/block/$(basename $(readlink -f /dev/mapper/\(device)))/holders; grep -l \"$(readlink -f /dev/mapper/\(device))\\|/dev/mapper/\(device) \" /proc/[0-9]*/mountinfo 2>/dev/null | head -n 5; true"
                    )) ?? "(nobody found)"
                Issue.record("\(device) is still open after a minute: \(holders)")
                throw error
            }
        }

        @Test(
            "a thin volume: created over a file with its pool, the tutorial's bad migration rolled back and the good one committed on it, activated again after a reboot with thin_check, refused when its metadata is damaged, and removed"
        )
        func thinVolumeLifecycle() throws {
            let fixture = try ThinFixture()
            let (scratch, tool, name, backing, device, mount) = (fixture.scratch, fixture.tool, fixture.name, fixture.backing, fixture.device, fixture.mount)

            // Bad input first: touches nothing.
            let noThin = try tool("volume", "create", name, "--backing", backing, "--size", "64M", "--pool-size", "160M")
            #expect(noThin.status == 2 && noThin.stderr.contains("--pool-size is for a thin volume"), "\(noThin.stderr)")
            let tooSmall = try tool("volume", "create", name, "--backing", backing, "--size", "64M", "--thin", "--pool-size", "32M")
            #expect(tooSmall.status == 2 && tooSmall.stderr.contains("more than the pool's"), "\(tooSmall.stderr)")
            #expect(!FileManager.default.fileExists(atPath: backing), "a refused create leaves no file behind")

            // The volume: a thin device of a pool over the file.
            let created = try tool.json("volume", "create", name, "--backing", backing, "--size", "64M", "--thin", "--pool-size", "160M") as? [String: Any]
            let entry = created?["volume"] as? [String: Any]
            let pool = entry?["thin"] as? [String: Any]
            #expect(entry?["size_bytes"] as? Int == 64 << 20)
            #expect(pool?["pool_bytes"] as? Int == 160 << 20 && pool?["block_bytes"] as? Int == 65536, "\(String(describing: pool))")
            #expect(pool?["mode"] as? String == "rw" && (pool?["data_used_bytes"] as? Int) == 0, "\(String(describing: pool))")
            var (volumeTable, poolTable) = try tables(name)
            #expect(volumeTable.hasPrefix("0 131072 thin ") && volumeTable.hasSuffix(" 0"), "\(volumeTable)")
            #expect(poolTable.contains(" thin-pool ") && poolTable.hasSuffix(" 128 256 1 error_if_no_space"), "\(poolTable)")
            #expect(try sh("dmsetup info -c --noheadings -o uuid \(name)").trimmingCharacters(in: .whitespacesAndNewlines) == "GUARD-VOL-\(name)")

            // The tutorial on it: the bad migration is rolled back, the good one committed.
            try sh("mkfs.ext4 -q -F \(device)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            try writeDatabase(at: mount)
            let before = try manifest(mount)
            let bad = try tool("run", try writeRecipe(tutorialRecipe(device: device, mount: mount, bad: true), in: scratch, name: "bad.recipe"))
            #expect(bad.status == 1, "\(bad.stderr)")
            #expect(try manifest(mount) == before, "the bad migration is rolled back on the thin volume")
            let good = try tool("run", try writeRecipe(tutorialRecipe(device: device, mount: mount, bad: false), in: scratch, name: "good.recipe"))
            #expect(good.status == 0, "\(good.stderr)")
            let migrated = try manifest(mount)
            let firstRow = try sh("head -1 \(mount)/database")
            #expect(migrated != before && firstRow.hasPrefix("id:00001,"), "the good migration is committed: \(firstRow)")
            try expectNothingLeft(state: tool.stateDirectory)
            (volumeTable, poolTable) = try tables(name)
            #expect(volumeTable.contains(" thin "), "the volume is back on its thin table: \(volumeTable)")
            let list = try tool.json("volume", "list") as? [String: Any]
            let used = ((list?["volumes"] as? [[String: Any]])?.first?["thin"] as? [String: Any])?["data_used_bytes"] as? Int ?? 0
            #expect(used > 0, "the pool's data use is reported once the volume holds a filesystem: \(String(describing: list))")
            try Mounts.unmount(mount)
            #expect(try fsck(device))

            // The pool grows online, with the volume in use; it does not shrink.
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            let grown = try tool.json("volume", "extend", name, "--pool-size", "240M") as? [String: Any]
            #expect(((grown?["volume"] as? [String: Any])?["thin"] as? [String: Any])?["pool_bytes"] as? Int == 240 << 20, "\(String(describing: grown))")
            let poolLength = try sh("dmsetup table guard-pool-\(name)").split(separator: " ")[1]
            #expect(poolLength == "491520", "the pool's table is 240 MiB: \(poolLength)")
            let shrink = try tool("volume", "extend", name, "--pool-size", "100M")
            #expect(shrink.status == 2 && shrink.stderr.contains("does not shrink"), "\(shrink.stderr)")
            try makeRandomFile("\(mount)/after-growth.bin", mebibytes: 8)
            try sh("sync")
            let grownManifest = try manifest(mount)
            try Mounts.unmount(mount)

            // A reboot: the devices are gone; activation checks the metadata, then the data is there.
            try powerOff(name, backing: backing)
            let activated = try tool("volume", "activate")
            #expect(activated.status == 0 && activated.stdout.contains("activated \(name)"), "\(activated.stdout) \(activated.stderr)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            #expect(try manifest(mount) == grownManifest, "the committed data and what was written after the growth survive the reboot")
            #expect(try sh("dmsetup table guard-pool-\(name)").split(separator: " ")[1] == "491520", "the pool comes back at its grown size")
            try Mounts.unmount(mount)

            // Damaged metadata: the pool is not activated, the admin is told how to repair it.
            // The damage is to the data space map's index (its block number is at byte 80 of the
            // superblock, le64): thin_repair rebuilds space maps from the block mappings.
            try powerOff(name, backing: backing)
            let metadata: UInt64 = 1 << 20
            let file = try RawFile(path: backing)
            let index = try file.read(at: metadata + 80, count: 8).reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            #expect(index > 0 && index < 1024, "the data space map's index block: \(index)")
            try file.write(Array("damaged".utf8), at: metadata + index * 4096 + 100)
            try file.sync()
            let refused = try tool("volume", "activate")
            #expect(refused.status == 2, "\(refused.stdout) \(refused.stderr)")
            #expect(refused.stderr.contains("thin_check") && refused.stderr.contains("guard volume repair \(name)"), "\(refused.stderr)")
            #expect(try run(["dmsetup", "info", "guard-pool-\(name)"]).status != 0, "no pool over damaged metadata")
            #expect(try run(["dmsetup", "info", "guard-pool-\(name)-tmeta"]).status != 0, "guard's layers of the refused pool are gone")
            let recovered = try tool("recover")
            #expect(recovered.stdout.contains("\(name) cannot be activated") || recovered.stderr.contains("\(name) cannot be activated"), "\(recovered.stdout) \(recovered.stderr)")
            // Repair: the damaged copy is kept, the repaired one passes thin_check, activation works.
            let repaired = try tool("volume", "repair", name)
            #expect(repaired.status == 0, "\(repaired.stdout) \(repaired.stderr)")
            let kept = try FileManager.default.contentsOfDirectory(atPath: "\(tool.stateDirectory)/volumes").filter { $0.hasPrefix("\(name).tmeta.") }
            #expect(kept.count == 1, "the damaged metadata is kept: \(kept)")
            let again = try tool("volume", "activate")
            #expect(again.status == 0, "\(again.stderr)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            #expect(try manifest(mount) == grownManifest, "the repaired pool holds the volume's data")
            try Mounts.unmount(mount)

            // The backing holds a pool now: a second volume over it is refused.
            let other = uniqueName("thin")
            let overPool = try tool("volume", "create", other, "--backing", backing, "--thin")
            #expect(overPool.status == 2 && overPool.stderr.contains("guard's thin pool of the volume \(name)"), "\(overPool.stderr)")

            // Remove: every device of the volume goes, the file keeps the pool.
            let removed = try tool("volume", "remove", name)
            #expect(removed.status == 0, "\(removed.stderr)")
            #expect(!(try sh("dmsetup ls")).contains(name), "no device of \(name) is left")
            #expect(LoopDevice.find(backingFile: backing).isEmpty)
            #expect(FileManager.default.fileExists(atPath: backing))
        }

        @Test(
            "thin snapshots: the tutorial's bad migration rolled back by swapping thin ids (no COW, no merge), a good one committed, two kept generations each rolled back to, diff and restore on a kept run; the pool's ids and the registry agree"
        )
        func thinSnapshots() throws {
            let fixture = try ThinFixture()
            let (scratch, tool, name, backing, device, mount) = (fixture.scratch, fixture.tool, fixture.name, fixture.backing, fixture.device, fixture.mount)
            try fixture.create(size: "64M", poolSize: "256M")
            try writeDatabase(at: mount)
            let before = try manifest(mount)
            #expect(try thinPoolIDs(name) == [0])

            // The bad migration: rolled back, the volume is the snapshot's id now, the old id is gone.
            let bad = try tool("run", try writeRecipe(tutorialRecipe(device: device, mount: mount, bad: true), in: scratch, name: "bad.recipe"))
            #expect(bad.status == 1, "\(bad.stderr)")
            #expect(try manifest(mount) == before, "the bad migration is rolled back")
            let show = try tool.json("show", "1") as? [String: Any]
            let snapshot = (show?["snapshots"] as? [[String: Any]])?.first
            #expect(snapshot?["cow_kind"] as? String == "thin", "\(String(describing: snapshot))")
            #expect(try thinPoolIDs(name) == [1], "the volume is thin device 1, device 0 is deleted")
            #expect(try registeredThinID(tool.stateDirectory, name) == 1)
            #expect(try sh("dmsetup table \(name)").trimmingCharacters(in: .whitespacesAndNewlines).hasSuffix(" 1"))
            #expect(!FileManager.default.fileExists(atPath: "\(tool.stateDirectory)/cow/\((show?["token"] as? String) ?? "x")-0.cow"), "no COW file")
            try expectNothingLeft(state: tool.stateDirectory)

            // The good migration, kept: its snapshot is thin device 2; diff sees the change.
            // `guard check` says where the snapshot goes: the volume's pool.
            let goodRecipe = try writeRecipe(tutorialRecipe(device: device, mount: mount, bad: false, onSuccess: "keep"), in: scratch, name: "good.recipe")
            let plan = (try tool.json("check", goodRecipe) as? [String: Any])?["volumes"] as? [[String: Any]]
            #expect(plan?.first?["cow_kind"] as? String == "thin" && plan?.first?["cow_location"] as? String == "/dev/mapper/guard-pool-\(name)", "\(String(describing: plan))")
            let good = try tool("run", goodRecipe)
            #expect(good.status == 0, "\(good.stderr)")
            let migrated = try manifest(mount)
            #expect(migrated != before)
            #expect(try thinPoolIDs(name) == [1, 2])
            let diff = try tool("diff", "2")
            #expect(diff.status == 0 && diff.stdout.contains("database"), "\(diff.stdout) \(diff.stderr)")
            // A second generation on top, kept too: thin device 3.
            let gen2 = try writeRecipe(
                "name: gen2\nvolumes:\n  - device: \(device)\n    mount: \(mount)\n    snapshot: 10M\nsteps:\n  - name: upload\n    shell: echo two > \(mount)/gen2\non_success: keep\n",
                in: scratch, name: "gen2.recipe")
            let second = try tool("run", gen2)
            #expect(second.status == 0, "\(second.stderr)")
            let afterSecond = try manifest(mount)
            #expect(try thinPoolIDs(name) == [1, 2, 3])
            let status = try tool.json("status") as? [String: Any]
            #expect((status?["runs"] as? [[String: Any]])?.count == 2, "two kept runs: \(String(describing: status))")
            let detail = ((status?["runs"] as? [[String: Any]])?.first?["volumes"] as? [[String: Any]])?.first?["detail"] as? String ?? ""
            #expect(detail.contains("pool data") && detail.contains("metadata"), "status shows the pool's data and metadata use: \(detail)")

            // Roll back the newer generation: the volume is as after the good migration.
            let back3 = try tool("rollback", "3")
            #expect(back3.status == 0, "\(back3.stderr)")
            _ = try tool("status", "--wait")
            #expect(try manifest(mount) == migrated, "rolled back to before the second generation")
            #expect(try thinPoolIDs(name) == [2, 3], "the volume is device 3; device 1 (its state before) is deleted; run 2's snapshot is kept")
            #expect(try registeredThinID(tool.stateDirectory, name) == 3)
            // Then the older one: the volume is as before the good migration.
            let back2 = try tool("rollback", "2")
            #expect(back2.status == 0, "\(back2.stderr)")
            _ = try tool("status", "--wait")
            #expect(try manifest(mount) == before, "rolled back to before the good migration")
            #expect(try thinPoolIDs(name) == [2])
            #expect(try registeredThinID(tool.stateDirectory, name) == 2)
            _ = afterSecond

            // A good run committed: its snapshot's id is deleted, the volume keeps the change.
            let committed = try tool("run", try writeRecipe(tutorialRecipe(device: device, mount: mount, bad: false), in: scratch, name: "commit.recipe"))
            #expect(committed.status == 0, "\(committed.stderr)")
            #expect(try thinPoolIDs(name) == [2])
            #expect(try manifest(mount) == migrated)
            try expectNothingLeft(state: tool.stateDirectory)
            let history = try tool.history()
            #expect(history?.map { $0["outcome"] as? String } == ["committed", "rolled_back", "rolled_back", "rolled_back"], "\(String(describing: history))")

            // A kept run, then a reboot: the volume comes back on its registered id with its
            // data, `guard recover` makes the kept snapshot's view again, diff and rollback work.
            let kept = try tool("run", gen2)
            #expect(kept.status == 0, "\(kept.stderr)")
            let upgraded = try manifest(mount)
            try Mounts.unmount(mount)
            #expect(try fsck(device))
            try powerOff(name, backing: backing)
            let activated = try tool("volume", "activate")
            #expect(activated.status == 0, "\(activated.stderr)")
            let recovered = try tool("recover")
            #expect(recovered.status == 0 && recovered.stdout.contains("made the view of run 5's thin snapshot"), "\(recovered.stdout) \(recovered.stderr)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            #expect(try manifest(mount) == upgraded, "after a reboot the volume holds the kept run's upgrade")
            let keptDiff = try tool("diff", "5")
            #expect(keptDiff.status == 0 && keptDiff.stdout.contains("gen2"), "\(keptDiff.stdout) \(keptDiff.stderr)")
            try Mounts.unmount(mount)
            let removeRefused = try tool("volume", "remove", name)
            #expect(removeRefused.status == 2 && removeRefused.stderr.contains("holds snapshots of kept runs"), "\(removeRefused.stderr)")
            #expect(FileManager.default.fileExists(atPath: device), "a refused remove leaves the volume")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            // File-level restore from the thin snapshot's view: a file damaged since comes back
            // byte for byte, the rest of the volume as it is; the journal has it.
            let database = try sha256("\(mount)/database")
            try "damaged after the run\n".write(toFile: "\(mount)/database", atomically: false, encoding: .utf8)
            let restore = try tool("restore", "5", "database")
            #expect(restore.status == 0, "\(restore.stdout) \(restore.stderr)")
            #expect(try sha256("\(mount)/database") == database, "the database is back from the thin snapshot")
            #expect(FileManager.default.fileExists(atPath: "\(mount)/gen2"), "the run's own change stays")
            let restores = (try tool.json("show", "5") as? [String: Any])?["restores"] as? [[String: Any]]
            #expect(restores?.first?["paths"] as? [String] == ["database"] && restores?.first?["status"] as? String == "done", "\(String(describing: restores))")
            let rolledBack = try tool("rollback", "5")
            #expect(rolledBack.status == 0, "\(rolledBack.stderr)")
            _ = try tool("status", "--wait")
            #expect(try manifest(mount) == migrated, "the kept run is rolled back after the reboot")
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test(
            "a thin run that fills its pool: guard stops it at stop_at of the pool (or the writes fail), rolls back by the swap, the files are as before, the filesystem clean, the pool writable; with extend: the pool grows and the run commits"
        )
        func fullPool() throws {
            let fixture = try ThinFixture()
            let (scratch, tool, device, mount) = (fixture.scratch, fixture.tool, fixture.device, fixture.mount)
            try fixture.create(size: "64M", poolSize: "72M")
            try writeDatabase(at: mount)
            try makeRandomFile("\(mount)/media.bin", mebibytes: 16)
            try sh("sync")
            let before = try manifest(mount)
            // The step rewrites the media and adds more than the pool has left: the snapshot
            // keeps the old blocks, so the pool runs out of data space.
            let recipe = try writeRecipe(
                """
                name: fill-the-pool
                volumes:
                  - device: \(device)
                    mount: \(mount)
                    snapshot: 10M
                steps:
                  - name: rewrite everything
                    shell: dd if=/dev/urandom of=\(mount)/media.bin bs=1M count=16 conv=fsync status=none && dd if=/dev/urandom of=\(mount)/more.bin bs=1M count=60 conv=fsync status=none
                on_success: commit
                on_failure: rollback
                """, in: scratch)
            let result = try tool("run", recipe)
            #expect(result.status == 1, "\(result.stdout) \(result.stderr)")
            #expect(try manifest(mount) == before, "the volume is as before the run: \(result.stderr)")
            try Mounts.unmount(mount)
            #expect(try fsck(device), "the rolled-back filesystem is clean")
            let list = try tool.json("volume", "list") as? [String: Any]
            let pool = (list?["volumes"] as? [[String: Any]])?.first?["thin"] as? [String: Any]
            #expect(pool?["mode"] as? String == "rw", "the pool is writable again once the run's blocks are deleted: \(String(describing: pool))")
            try expectNothingLeft(state: tool.stateDirectory)

            // The same upgrade with `extend:`: the pool grows while the step writes, the run commits.
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            let growing = try writeRecipe(
                """
                name: grow-the-pool
                volumes:
                  - device: \(device)
                    mount: \(mount)
                    snapshot: { size: 10M, extend: { at: 50%, by: 32M, max: 200M } }
                steps:
                  - name: rewrite everything
                    shell: dd if=/dev/urandom of=\(mount)/media.bin bs=1M count=16 conv=fsync status=none; for i in 1 2 3; do dd if=/dev/urandom of=\(mount)/more$i.bin bs=1M count=8 conv=fsync status=none; sleep 0.5; done
                on_success: commit
                on_failure: rollback
                """, in: scratch, name: "grow.recipe")
            let grown = try tool("run", growing)
            #expect(grown.status == 0, "\(grown.stdout) \(grown.stderr)")
            let after = (try tool.json("volume", "list") as? [String: Any])?["volumes"] as? [[String: Any]]
            let poolBytes = (after?.first?["thin"] as? [String: Any])?["pool_bytes"] as? Int ?? 0
            #expect(poolBytes > 72 << 20 && poolBytes <= 200 << 20, "the pool grew by the recipe's extend: \(poolBytes)")
            #expect(grown.stderr.contains("grew to"), "the run says the snapshot's pool grew: \(grown.stderr)")
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test("a kept run on a thin volume: guard monitor grows the pool by the recipe's extend as the volume's writes fill it; the rollback then restores the pre-run bytes")
        func monitorGrowsAKeptPool() async throws {
            let fixture = try ThinFixture()
            let (scratch, tool, device) = (fixture.scratch, fixture.tool, fixture.device)
            try fixture.create(size: "40M", poolSize: "48M", filesystem: false)
            try sh("dd if=/dev/urandom of=\(device) bs=1M count=16 oflag=direct status=none")
            let before = try sha256(device)
            let recipe = try writeRecipe(
                """
                name: kept-thin
                volumes:
                  - device: \(device)
                    snapshot: { size: 8M, extend: { at: 50%, by: 32M, max: 160M } }
                steps:
                  - name: a small upgrade
                    shell: dd if=/dev/urandom of=\(device) bs=64K count=8 oflag=direct conv=notrunc status=none
                on_success: keep
                """, in: scratch)
            let kept = try tool("run", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            let log = scratch.path("monitor.log")
            let monitor = try startGuard(["monitor", "--state-dir", tool.stateDirectory], output: log)
            scratch.defer_ { if monitor.isRunning { monitor.terminate() } }
            try await waitUntil("the monitor to start") { ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("watching") }
            // The service's writes after the run, to blocks the pool has not allocated yet: past
            // half of the 48 MiB pool.
            try sh("dd if=/dev/urandom of=\(device) bs=1M count=16 seek=20 oflag=direct conv=notrunc status=none")
            func poolBytes() throws -> Int {
                (((try tool.json("volume", "list") as? [String: Any])?["volumes"] as? [[String: Any]])?.first?["thin"] as? [String: Any])?["pool_bytes"] as? Int ?? 0
            }
            try await waitUntil("the monitor to grow the pool", seconds: 120) { try poolBytes() > 48 << 20 }
            let monitorLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            #expect(try poolBytes() == 80 << 20, "grown by extend.by: \(monitorLog)")
            #expect(try lastRunEvents(tool).contains("result extend"), "the journal has the growth: \(monitorLog)")
            monitor.terminate()
            try await waitUntil("the monitor to stop on SIGTERM") { !monitor.isRunning }
            let rollback = try tool("rollback", "1")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try sha256(device) == before, "every byte as before the run")
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test(
            "size on a thin volume is the room the run needs in the pool: auto learns it from earlier runs (what they added to the pool) and grows the pool before the snapshot; a size as written that the pool lacks is refused, touching nothing"
        )
        func poolSizing() throws {
            let fixture = try ThinFixture()
            let (scratch, tool, name, device, mount) = (fixture.scratch, fixture.tool, fixture.name, fixture.device, fixture.mount)
            try fixture.create(size: "64M", poolSize: "72M")
            func pool() throws -> (bytes: Int, used: Int) {
                let entry = ((try tool.json("volume", "list") as? [String: Any])?["volumes"] as? [[String: Any]])?.first?["thin"] as? [String: Any]
                return (entry?["pool_bytes"] as? Int ?? 0, entry?["data_used_bytes"] as? Int ?? 0)
            }
            let auto = try writeRecipe(
                """
                name: auto-pool
                volumes:
                  - device: \(device)
                    mount: \(mount)
                    snapshot: auto
                steps:
                  - name: upload
                    shell: dd if=/dev/urandom of=\(mount)/upload-$(date +%s%N).bin bs=1M count=24 conv=fsync status=none
                on_success: commit
                """, in: scratch, name: "auto.recipe")
            // First run: nothing to learn from, 20% of the volume, which the pool has.
            let first = try tool("run", auto)
            #expect(first.status == 0, "\(first.stderr)")
            #expect(try pool().bytes == 72 << 20, "the pool had room: it did not grow")
            let peak = ((try tool.json("show", "1") as? [String: Any])?["snapshots"] as? [[String: Any]])?.first?["peak_used_bytes"] as? Int ?? 0
            #expect(peak >= 20 << 20 && peak <= 40 << 20, "the run's peak is what it added to the pool (24 MiB written), not the pool's use: \(peak)")

            // Second run: 1.5 × that peak + 16 MiB is more than the pool has free: the plan says
            // the pool grows, and the run grows it before the snapshot.
            let (poolBefore, used) = try pool()
            let plan = try tool("check", auto)
            #expect(plan.status == 0 && plan.stdout.contains("the pool grows to"), "\(plan.stdout) \(plan.stderr)")
            let second = try tool("run", auto)
            #expect(second.status == 0, "\(second.stderr)")
            let grown = try pool().bytes
            let room = Int(Double(peak) * 1.5) + (16 << 20)
            #expect(grown > poolBefore && grown >= used + room, "the pool grew to hold the run's room: \(poolBefore) → \(grown) (used \(used), room \(room))")
            try expectNothingLeft(state: tool.stateDirectory)

            // A size as written that the pool does not have free: refused, nothing touched.
            let runs = try tool.history()?.count
            let big = try writeRecipe(
                "name: too-big\nvolumes:\n  - device: \(device)\n    mount: \(mount)\n    snapshot: 500M\nsteps:\n  - name: write\n    shell: touch \(mount)/never\n",
                in: scratch, name: "big.recipe")
            let refused = try tool("run", big)
            #expect(refused.status == 2, "\(refused.stderr)")
            #expect(
                refused.stderr.contains(big) && refused.stderr.contains("free, less than the snapshot's") && refused.stderr.contains("guard volume extend \(name)"),
                "\(refused.stderr)")
            #expect(try pool().bytes == grown, "the pool is as it was")
            #expect(!FileManager.default.fileExists(atPath: "\(mount)/never"), "no step ran")
            #expect(try tool.history()?.count == runs, "no run was journaled")
        }
    }
}
