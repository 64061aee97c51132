import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// A guard volume with ext4 mounted in its scratch directory, the tutorial's database on it.
final class MountedVolume {
    let volume: RawVolume
    let mountPoint: String
    var tool: GuardTool { volume.guardTool }

    init(mebibytes: Int = 64, label: String = #function) throws {
        volume = try RawVolume(mebibytes: mebibytes, label: label)
        mountPoint = volume.scratch.path("mnt")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try sh("mkfs.ext4 -q -F \(volume.device)")
        try mount()
        let mountPoint = self.mountPoint
        volume.scratch.defer_ { _ = try? Mounts.unmount(mountPoint) }
        try writeDatabase(at: mountPoint)
    }

    func mount() throws { try Mounts.mount(source: volume.device, target: mountPoint, fileSystemType: "ext4") }

    /// A recipe for the mounted volume whose step rewrites the database's first page in place,
    /// as a database server writes its pages (the same blocks, not a new file).
    func recipe(onSuccess: String = "keep", extra: String = "") throws -> String {
        try writeRecipe(
            """
            name: pages
            volumes:
              - device: \(volume.device)
                mount: \(mountPoint)
                snapshot: { size: 16M }
            steps:
              - name: rewrite a page in place
                shell: printf 'migrated-page' | dd of=\(mountPoint)/database bs=4096 seek=0 conv=notrunc,fsync status=none
            on_success: \(onSuccess)
            on_failure: rollback
            \(extra)
            """, in: volume.scratch)
    }

    /// Writes `text` into the database's second page in place and syncs: the admin's own writes.
    func writeInPlace(_ text: String) throws {
        try sh("printf '\(text)' | dd of=\(mountPoint)/database bs=4096 seek=1 conv=notrunc,fsync status=none && sync")
    }

    /// A power cut: the filesystem is gone without guard, every device of the volume removed.
    /// (The filesystem is unmounted first: the kernel cannot remove a device a mount holds.)
    func powerCutAndBoot() throws -> CommandResult {
        try sh("sync")
        try Mounts.unmount(mountPoint)
        try powerCut(volume)
        // The boot: guard-reassemble.service's recovery, before anything mounts the volume.
        let boot = try tool("recover", "--boot")
        try mount()
        return boot
    }

    /// The run's `decision` column, from the journal.
    func decision(_ run: String) throws -> String {
        try sh("sqlite3 '\(tool.stateDirectory)/journal.sqlite' \"SELECT ifnull(decision, '') FROM runs WHERE id = \(run)\"").trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

extension Kernel {
    /// Issue 40: what guard says will happen is what happens.
    @Suite("what guard says will happen")
    struct DecisionKernelTests {
        @Test(
            "a rollback refused because the volume is busy is taken back: the admin's later writes survive a power cut and a boot, and a later rollback still restores the pre-run files"
        )
        func refusedRollbackIsTakenBack() async throws {
            let fixture = try MountedVolume()
            let tool = fixture.tool
            let before = try manifest(fixture.mountPoint)
            let kept = try tool("run", try fixture.recipe())
            #expect(kept.status == 0, "\(kept.stderr)")
            let run = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"

            // A process keeps the volume busy (its working directory is in it): the unmount fails.
            let pidFile = fixture.volume.scratch.path("holder.pid")
            try startDetached(["/bin/sh", "-c", "cd '\(fixture.mountPoint)' && echo $$ > '\(pidFile)' && exec sleep 600"])
            try await waitUntil("the holder to start", seconds: 60) { FileManager.default.fileExists(atPath: pidFile) }
            let holder = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            let refused = try tool("rollback", run)
            #expect(refused.status == 3, "\(refused.stderr)")
            #expect(refused.stderr.contains("did not start") && refused.stderr.contains("stays kept"), "\(refused.stderr)")
            #expect(try fixture.decision(run) == "keep", "the decision is taken back")
            let status = try tool("status", "--json")
            #expect(status.status == 0, "\(status.stdout) \(status.stderr)")
            #expect(
                status.stdout.contains("\"pending_at_boot\" : null") || status.stdout.contains("\"pending_at_boot\":null"), "nothing is pending at the next boot: \(status.stdout)")
            try sh("kill -9 \(holder)")
            try await waitUntil("the holder to exit", seconds: 60) {
                // Gone, or a zombie nobody reaped (it holds nothing then): no working directory.
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(holder)/cwd")) == nil
            }

            // Days of writes the admin keeps, in place; then the power goes and the machine boots.
            try fixture.writeInPlace("admin-write-after-the-refusal")
            let written = try manifest(fixture.mountPoint)
            let boot = try fixture.powerCutAndBoot()
            #expect(boot.status == 0, "\(boot.stdout) \(boot.stderr)")
            #expect(!boot.stdout.contains("rolled back"), "the boot rolled nothing back: \(boot.stdout)")
            #expect(try manifest(fixture.mountPoint) == written, "the writes after the refused rollback are still there")
            #expect(try tool.history()?.first?["state"] as? String == "kept")

            // The snapshot is intact: a rollback now restores the files as before the run.
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try manifest(fixture.mountPoint) == before)
            try Mounts.unmount(fixture.mountPoint)
            #expect(try fsck(fixture.volume.device))
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "refused-rollback-then-power-cut", "a kept run's rollback refused (busy mount), writes, a power cut, a boot", "keep", "as written",
                "kept", "the refusal took the decision back; the boot merged nothing; a later rollback restored the pre-run files",
            ])
        }

        @Test(
            "the volume is still mounted in another mount namespace (a private one, as `unshare -m` or a container makes): the rollback unmounts it here, waits, then refuses and names that namespace's process and the command that unmounts it there; the run stays kept, and after that command a rollback restores the pre-run files"
        )
        func mountInAnotherNamespace() async throws {
            let fixture = try MountedVolume()
            let tool = fixture.tool
            let before = try manifest(fixture.mountPoint)
            let kept = try tool("run", try fixture.recipe())
            #expect(kept.status == 0, "\(kept.stderr)")
            let run = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"

            let pidFile = fixture.volume.scratch.path("namespace.pid")
            try startDetached(["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", "echo $$ > '\(pidFile)' && exec sleep 600"])
            try await waitUntil("the namespace's process to start", seconds: 60) { FileManager.default.fileExists(atPath: pidFile) }
            let holder = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            fixture.volume.scratch.defer_ { _ = try? sh("kill -9 \(holder) 2>/dev/null; true") }
            let refused = try tool("rollback", run)
            #expect(refused.status == 3, "\(refused.stderr)")
            #expect(
                refused.stderr.contains("a mount on \(fixture.mountPoint) in the mount namespace of pid \(holder) (sleep)") && refused.stderr.contains("stays kept"),
                "the refusal names the namespace: \(refused.stderr)")
            #expect(refused.stderr.contains("waiting up to 30 s for"), "guard says what it waits for: \(refused.stderr)")
            #expect(try fixture.decision(run) == "keep", "the decision is taken back")
            #expect(Mounts.entry(at: fixture.mountPoint) != nil, "the volume is mounted here again")
            #expect(try manifest(fixture.mountPoint) != before, "nothing was merged")
            // guard's advice, as printed: unmount it in that namespace (its process lives on).
            let advice = "nsenter -t \(holder) -m umount \(fixture.mountPoint)"
            #expect(refused.stderr.contains("`\(advice)`"), "\(refused.stderr)")
            try sh(advice)

            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try manifest(fixture.mountPoint) == before)
            try Mounts.unmount(fixture.mountPoint)
            #expect(try fsck(fixture.volume.device))
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test(
            "rollback --dry-run of a kept run after 10 MiB of new writes: it says at least 10 MiB written since the run would be thrown away, names the process that would stop the unmount, touches nothing (files, journal, state); the rollback then restores the pre-run files; a committed run's dry run is refused as its rollback is"
        )
        func rollbackDryRun() async throws {
            let fixture = try MountedVolume()
            let tool = fixture.tool
            let before = try manifest(fixture.mountPoint)
            let kept = try tool("run", try fixture.recipe())
            #expect(kept.status == 0, "\(kept.stderr)")
            let run = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"
            try sh("dd if=/dev/urandom of=\(fixture.mountPoint)/uploads.bin bs=1M count=10 oflag=direct status=none && sync")
            let pidFile = fixture.volume.scratch.path("holder.pid")
            try startDetached(["/bin/sh", "-c", "cd '\(fixture.mountPoint)' && echo $$ > '\(pidFile)' && exec sleep 600"])
            try await waitUntil("the holder to start", seconds: 60) { FileManager.default.fileExists(atPath: pidFile) }
            let holder = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            fixture.volume.scratch.defer_ { _ = try? sh("kill -9 \(holder) 2>/dev/null; true") }
            let written = try manifest(fixture.mountPoint)
            let events = { try sh("sqlite3 '\(tool.stateDirectory)/journal.sqlite' 'SELECT count(*) FROM events'") }
            let eventsBefore = try events()

            // (It may exit 3: the COW is near full, which is guard's attention, not this test's.)
            let statusRun = try tool("status", "--json")
            let status = try #require(try JSONSerialization.jsonObject(with: Data(statusRun.stdout.utf8)) as? [String: Any], "\(statusRun.stderr)")
            let live = try #require(((status["runs"] as? [[String: Any]])?.first?["volumes"] as? [[String: Any]])?.first, "\(status)")
            #expect((live["changed_since_end_bytes"] as? Int ?? 0) >= 10 << 20, "guard status shows it too: \(live)")
            let statusText = try tool("status")
            #expect(statusText.stdout.contains("written since the run ended (`guard rollback \(run)` would throw it away)"), "\(statusText.stdout)")

            let preview = try tool("rollback", "--dry-run", "--json", run)
            #expect(preview.status == 0, "\(preview.stderr)")
            let document = try #require(try JSONSerialization.jsonObject(with: Data(preview.stdout.utf8)) as? [String: Any], "\(preview.stdout)")
            let volume = try #require((document["volumes"] as? [[String: Any]])?.first, "\(document)")
            let since = volume["changed_since_end_bytes"] as? Int ?? 0
            #expect(since >= 10 << 20, "at least the 10 MiB written since the run: \(volume)")
            #expect((volume["changed_bytes"] as? Int ?? 0) >= since + (volume["changed_at_end_bytes"] as? Int ?? -1), "\(volume)")
            #expect(volume["unmounts"] as? [String] == [fixture.mountPoint], "\(volume)")
            #expect(volume["users"] as? [String] == ["pid \(holder) (sleep)"], "\(volume)")
            #expect(document["at_boot"] as? Bool == false && document["kept_at"] is String, "\(document)")
            let text = try tool("rollback", "--dry-run", run)
            #expect(text.status == 0, "\(text.stderr)")
            #expect(text.stdout.contains("in use by pid \(holder) (sleep)") && text.stdout.contains("first written after the run ended"), "\(text.stdout)")
            #expect(text.stdout.contains("nothing was touched"), "\(text.stdout)")
            #expect(try manifest(fixture.mountPoint) == written, "the dry runs touched no file")
            #expect(try events() == eventsBefore, "nor the journal")
            #expect(try tool.history()?.first?["state"] as? String == "kept")
            #expect(Mounts.entry(at: fixture.mountPoint) != nil)

            try sh("kill -9 \(holder)")
            try await waitUntil("the holder to exit", seconds: 60) { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(holder)/cwd")) == nil }
            let rollback = try tool("rollback", "--wait", run)
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try manifest(fixture.mountPoint) == before, "the pre-run files; the 10 MiB are gone, as the dry run said")
            let again = try tool("rollback", "--dry-run", run)
            let real = try tool("rollback", run)
            #expect(again.status == 2 && real.status == 2 && again.stderr == real.stderr, "refused as the rollback is: \(again.stderr) | \(real.stderr)")
            try Mounts.unmount(fixture.mountPoint)
            #expect(try fsck(fixture.volume.device))
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test(
            "the state filesystem fills during the steps of a successful run: the decision still fits (the reserve); and without the reserve the upgrade stays, and guard's advice (recover, then commit) keeps it",
            arguments: [true, false])
        func stateFilesystemFullAtDecision(reserve: Bool) throws {
            let lvm = try LVMFixture()
            // The state directory on a small filesystem of its own, as /var often is.
            let image = lvm.scratch.path("state.img")
            let stateFS = lvm.scratch.path("statefs")
            try makeSparseFile(image, mebibytes: 160)
            try FileManager.default.createDirectory(atPath: stateFS, withIntermediateDirectories: true)
            let loop = try LoopDevice.attach(file: image).device
            try sh("mkfs.ext4 -q -F \(loop.path)")
            try Mounts.mount(source: loop.path, target: stateFS, fileSystemType: "ext4")
            lvm.scratch.defer_ {
                try? Mounts.unmount(stateFS)
                try? loop.detach()
            }
            let tool = GuardTool(stateDirectory: stateFS + "/state")
            try writeDatabase(at: lvm.mountPoint)
            let drop = reserve ? "" : "rm -f \(tool.stateDirectory)/decision.reserve; "
            let recipe = try writeRecipe(
                """
                name: full-var
                volumes:
                  - device: \(lvm.device)
                    mount: \(lvm.mountPoint)
                    snapshot: { size: 8M }
                steps:
                  - name: migrate
                    shell: printf 'migrated-page' | dd of=\(lvm.mountPoint)/database bs=4096 seek=0 conv=notrunc,fsync status=none
                  - name: logs fill the state filesystem
                    shell: "\(drop)dd if=/dev/zero of=\(stateFS)/filler bs=1M status=none; sync; true"
                on_success: commit
                on_failure: rollback
                """, in: lvm.scratch)
            let result = try tool("run", recipe)
            let upgraded = try manifest(lvm.mountPoint)
            #expect(upgraded.contains("database"))
            let firstPage = try sh("head -c 13 \(lvm.mountPoint)/database")
            #expect(firstPage == "migrated-page", "the upgrade is in place")
            if reserve {
                #expect(result.status == 0, "the decision fit: \(result.stderr)")
                #expect(try tool.history()?.first?["outcome"] as? String == "committed")
            } else {
                #expect(result.status == 3, "\(result.stderr)")
                #expect(result.stderr.contains("cannot be written") && result.stderr.contains("`guard recover` records the run as kept"), "\(result.stderr)")
                // What guard advised, once there is room: recover, then commit.
                try FileManager.default.removeItem(atPath: stateFS + "/filler")
                let recover = try tool("recover")
                #expect(recover.status == 0, "\(recover.stdout) \(recover.stderr)")
                #expect(recover.stdout.contains("labels say kept"), "\(recover.stdout)")
                #expect(try manifest(lvm.mountPoint) == upgraded, "recovery kept the upgrade")
                let run = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"
                let commit = try tool("commit", run)
                #expect(commit.status == 0, "\(commit.stderr)")
            }
            #expect(try manifest(lvm.mountPoint) == upgraded, "the upgrade stays")
            try? FileManager.default.removeItem(atPath: stateFS + "/filler")
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                reserve ? "state-full-at-decision" : "state-full-at-decision-no-reserve",
                "the state filesystem filled by a step of a successful run\(reserve ? "" : ", the reserve gone too")", "commit", "upgraded", "committed",
                reserve ? "guard gave its reserve back and wrote the decision" : "the labels said kept; guard recover kept the run, guard commit made it final",
            ])
        }

        @Test("guard killed after deciding a rollback and before its first merge: recovery takes the decision back, the run stays kept and the boot merges nothing")
        func killedBeforeTheMergeIsTakenBack() throws {
            let fixture = try MountedVolume()
            let tool = fixture.tool
            let before = try manifest(fixture.mountPoint)
            #expect(try tool("run", try fixture.recipe()).status == 0)
            let run = "\(try #require(try tool.history()).first?["id"] as? Int ?? 0)"
            let killed = try tool("rollback", run, extra: ["GUARD_CRASH_AT": "rollback.before-merge"])
            #expect(killed.status == 137, "guard was killed at the crash point: \(killed.stderr)")
            #expect(try fixture.decision(run) == "rollback")
            // The rollback had unmounted the volume; the admin mounts it and goes on.
            if Mounts.entry(at: fixture.mountPoint) == nil { try fixture.mount() }
            try fixture.writeInPlace("admin-write-after-the-crash")
            let written = try manifest(fixture.mountPoint)

            let boot = try fixture.powerCutAndBoot()
            #expect(boot.status == 0, "\(boot.stdout) \(boot.stderr)")
            #expect(boot.stdout.contains("never started") && boot.stdout.contains("taken back"), "\(boot.stdout)")
            #expect(try fixture.decision(run) == "keep")
            #expect(try manifest(fixture.mountPoint) == written, "the boot merged nothing")
            let rollback = try tool("rollback", run, "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try manifest(fixture.mountPoint) == before)
            try expectNothingLeft(state: tool.stateDirectory)
            recordResult([
                "rollback.before-merge-then-boot", "guard rollback killed after its decision, before the first merge; writes, a power cut, a boot", "rollback",
                "as written", "kept", "the boot took the decision back (no merge had begun); a later rollback restored the pre-run files",
            ])
        }
    }
}
