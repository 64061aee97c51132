import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

extension Kernel {
    /// Issue 20: thin guard volumes, a dm-thin pool guard makes over a file.
    @Suite("thin volumes")
    struct ThinKernelTests {
        /// The devices of a thin volume NAME, as `dmsetup table` shows them.
        func tables(_ name: String) throws -> (volume: String, pool: String) {
            (try sh("dmsetup table \(name)").trimmingCharacters(in: .whitespacesAndNewlines),
             try sh("dmsetup table guard-pool-\(name)").trimmingCharacters(in: .whitespacesAndNewlines))
        }

        /// Removes the volume's devices and detaches its loop device, as a reboot would.
        func powerOff(_ name: String, backing: String) throws {
            try sh("dmsetup remove \(name) && dmsetup remove guard-pool-\(name) && dmsetup remove guard-pool-\(name)-tdata && dmsetup remove guard-pool-\(name)-tmeta")
            for loop in LoopDevice.find(backingFile: backing) { try loop.detach() }
        }

        @Test("a thin volume: created over a file with its pool, the tutorial's bad migration rolled back and the good one committed on it, activated again after a reboot with thin_check, refused when its metadata is damaged, and removed")
        func thinVolumeLifecycle() throws {
            let scratch = try Scratch()
            let tool = GuardTool(stateDirectory: scratch.path("state"))
            let name = uniqueName("thin")
            let backing = scratch.path("thin.img")
            let device = "/dev/mapper/\(name)"
            let mount = scratch.path("website")
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
            scratch.defer_ {
                _ = try? run(["umount", mount])
                removeGuardStacks(onVolume: name)
                _ = try? tool("volume", "remove", name)
                for uuid in ["GUARD-VOL-\(name)", "GUARD-POOL-\(name)", "GUARD-POOL-\(name)-tdata", "GUARD-POOL-\(name)-tmeta"] {
                    _ = try? run(["dmsetup", "remove", "-u", uuid])
                }
                for loop in LoopDevice.find(backingFile: backing) { try? loop.detach() }
            }

            // Bad input first: touches nothing.
            let noThin = try tool("volume", "create", name, "--backing", backing, "--size", "64M", "--pool-size", "160M")
            #expect(noThin.status == 2 && noThin.stderr.contains("--pool-size is for a thin volume"), "\(noThin.stderr)")
            let tooSmall = try tool("volume", "create", name, "--backing", backing, "--size", "64M", "--thin", "--pool-size", "32M")
            #expect(tooSmall.status == 2 && tooSmall.stderr.contains("more than the pool's"), "\(tooSmall.stderr)")
            #expect(!FileManager.default.fileExists(atPath: backing), "a refused create leaves no file behind")

            // The volume: a thin device of a pool over the file.
            let created = try tool.json("volume", "create", name, "--backing", backing, "--size", "64M", "--thin", "--pool-size", "160M") as? [String: Any]
            let entry = created?["volume"] as? [String: Any], pool = entry?["thin"] as? [String: Any]
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

            // A reboot: the devices are gone; activation checks the metadata, then the data is there.
            try powerOff(name, backing: backing)
            let activated = try tool("volume", "activate")
            #expect(activated.status == 0 && activated.stdout.contains("activated \(name)"), "\(activated.stdout) \(activated.stderr)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            #expect(try manifest(mount) == migrated, "the committed data survives the reboot")
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
            #expect(try manifest(mount) == migrated, "the repaired pool holds the volume's data")
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
    }
}
