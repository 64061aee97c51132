import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Snapshot
import Testing

@testable import Engine

extension Kernel {
    /// Issue 17: what guard mounts stays guard's, and what it follows cannot be swapped under it.
    @Suite("isolation")
    struct IsolationKernelTests {
        @Test("a snapshot view never reaches another mount namespace: a service in a slave namespace never sees one, and the kept run commits while it lives")
        func viewsStayPrivate() async throws {
            let lvm = try LVMFixture()
            // The state directory on a shared mount, as on a systemd host, where / is shared.
            let shared = lvm.scratch.path("shared")
            let probe = "\(shared)/probe"
            try FileManager.default.createDirectory(atPath: probe, withIntermediateDirectories: true)
            try sh("mount --bind \(shared) \(shared) && mount --make-shared \(shared)")
            lvm.scratch.defer_ { _ = try? sh("umount -R -l \(shared)") }
            let tool = GuardTool(stateDirectory: "\(shared)/state")
            try writeDatabase(at: lvm.mountPoint)
            let recipe = try writeRecipe(
                """
                name: website-files
                volumes:
                  - device: \(lvm.device)
                    mount: \(lvm.mountPoint)
                    snapshot: 25M
                steps:
                  - name: new front page
                    shell: "printf '<html>v2</html>\\\\n' > \(lvm.mountPoint)/index.html"
                on_success: keep 1d
                """, in: lvm.scratch)
            let kept = try tool("run", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            let run = try #require((try tool.history())?.first?["id"] as? Int)

            // A service with a mount namespace of its own, a slave of the host's (PrivateTmp,
            // ProtectSystem, udevd, an indexer): it looks for views and holds any it sees open.
            let (pidFile, seen, probeSeen) = (lvm.scratch.path("ns.pid"), lvm.scratch.path("seen"), lvm.scratch.path("probe-seen"))
            let service = """
                echo $$ > \(pidFile); while :; do [ -e \(probe)/marker ] && touch \(probeSeen); \
                for d in \(shared)/state/views/*/; do [ -e "$d/database" ] && { echo "$d" >> \(seen); cd "$d"; exec sleep 600; }; done; sleep 0.02; done
                """
            try startDetached(["/usr/bin/unshare", "-m", "--propagation", "slave", "/bin/sh", "-c", service])
            try await waitUntil("the service to start") { FileManager.default.fileExists(atPath: pidFile) }
            lvm.scratch.defer_ { _ = try? sh("kill -KILL $(cat \(pidFile)) 2>/dev/null; true") }
            // The test can fail: a mount on the shared directory does reach the service.
            try sh("mount -t tmpfs probe \(probe) && touch \(probe)/marker")
            try await waitUntil("the service to see a mount made outside its namespace") { FileManager.default.fileExists(atPath: probeSeen) }
            try sh("umount \(probe)")

            for _ in 0..<3 {
                let diff = try tool("diff", "\(run)")
                #expect(diff.status == 0 && diff.stdout.contains("index.html"), "\(diff.stdout) \(diff.stderr)")
            }
            let restore = try tool("restore", "\(run)", "index.html")
            #expect(restore.status == 0, "\(restore.stderr)")
            #expect(!FileManager.default.fileExists(atPath: seen), "the service saw a view: \((try? String(contentsOfFile: seen, encoding: .utf8)) ?? "")")
            let commit = try tool("commit", "\(run)")
            #expect(commit.status == 0, "the commit is not held up by another namespace: \(commit.stderr)")
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test("a restore into a tree a user keeps swapping (the directory for a symlink, guard's temporary names for symlinks) never touches a file outside the tree")
        func restoreRacesStayInside() async throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let m = lvm.mountPoint
            // The snapshot's tree: a FIFO, a device node, a hard-linked pair, in a directory a user can write.
            try sh("mkdir -m 1777 \(m)/d && mkfifo -m 640 \(m)/d/fifo && mknod -m 640 \(m)/d/null c 1 3 && echo one > \(m)/d/a && ln \(m)/d/a \(m)/d/b && sync")
            // Outside the tree: what an attacker would like root to change, named like the entries.
            let outside = lvm.scratch.path("outside")
            try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
            let names = ["fifo", "null", "a", "b"]
            for name in names { try sh("echo secret-\(name) > \(outside)/\(name) && chmod 600 \(outside)/\(name)") }
            func outsideState() throws -> String { try names.map { try statLine("\(outside)/\($0)") + " " + sha256("\(outside)/\($0)") }.joined(separator: "\n") }
            let before = try outsideState()
            let recipe = try writeRecipe(
                """
                name: races
                volumes:
                  - device: \(lvm.device)
                    mount: \(m)
                    snapshot: 25M
                steps:
                  - name: lose them
                    shell: rm -f \(m)/d/fifo \(m)/d/null \(m)/d/a \(m)/d/b
                on_success: keep 1d
                """, in: lvm.scratch)
            let kept = try tool("run", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            let shown = try #require(try tool.json("status") as? [String: Any])
            let token = try #require((shown["runs"] as? [[String: Any]])?.first?["token"] as? String)
            let run = try #require((try tool.history())?.first?["id"] as? Int)

            // The attacker: swaps d for a symlink to the outside directory, and plants symlinks
            // to the outside files at guard's temporary names, in a loop.
            let pidFile = lvm.scratch.path("swapper.pid")
            let plant = names.map { "ln -sfn \(outside)/\($0) \(m)/d/.guard-restore.\(token).\($0) 2>/dev/null" }.joined(separator: "; ")
            let swapper =
                "echo $$ > \(pidFile); while :; do \(plant); mv \(m)/d \(m)/d.x 2>/dev/null && ln -sfn \(outside) \(m)/d 2>/dev/null; rm -f \(m)/d 2>/dev/null; mv \(m)/d.x \(m)/d 2>/dev/null; done"
            try startDetached(["/bin/sh", "-c", swapper])
            try await waitUntil("the swapper to start") { FileManager.default.fileExists(atPath: pidFile) }
            lvm.scratch.defer_ { _ = try? sh("kill -KILL $(cat \(pidFile)) 2>/dev/null; true") }
            var outcomes: [Int32] = []
            for _ in 0..<6 {
                let restore = try tool("restore", "\(run)", "d/fifo", "d/null", "d/a", "d/b")
                outcomes.append(restore.status)
                #expect(restore.status == 0 || restore.stderr.contains("d"), "a refusal names the path: \(restore.stderr)")
            }
            _ = try sh("kill -KILL $(cat \(pidFile)); sleep 0.2; [ -d \(m)/d.x ] && rm -f \(m)/d && mv \(m)/d.x \(m)/d; true")
            #expect(try outsideState() == before, "nothing outside the tree changed (mode, owner, content); restores exited \(outcomes)")
            // Without the attacker, the restore is exact: the pair is one inode again.
            _ = try sh("rm -f \(m)/d/.guard-restore.*")
            let calm = try tool("restore", "\(run)", "d/fifo", "d/null", "d/a", "d/b")
            #expect(calm.status == 0, "\(calm.stderr)")
            #expect(try sh("stat -c '%F %a' \(m)/d/fifo \(m)/d/null").split(separator: "\n") == ["fifo 640", "character special file 640"])
            #expect(try sh("stat -c %i \(m)/d/a").trimmingWhitespace() == sh("stat -c %i \(m)/d/b").trimmingWhitespace(), "a and b are one inode")
            #expect(try outsideState() == before)
            #expect(try tool("commit", "\(run)").status == 0)
        }

        @Test("a rollback mounts everything again as it was: a bind mount as a bind of its subtree, a filesystem mounted inside the volume after the volume, parents first")
        func remountAsItWas() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let m = lvm.mountPoint
            try sh("mkdir -p \(m)/static \(m)/uploads && echo v1 > \(m)/static/page && sync")
            // A subtree of the volume bound elsewhere, and another filesystem mounted inside the volume.
            let bound = lvm.scratch.path("static")
            let nested = lvm.scratch.path("nested.img")
            try FileManager.default.createDirectory(atPath: bound, withIntermediateDirectories: true)
            // A loop device of its own (`mount -o loop` would detach it at the unmount).
            try sh("truncate -s 16M \(nested) && mkfs.ext4 -q -F \(nested)")
            let loop = try LoopDevice.attach(file: nested).device
            try sh("mount --bind \(m)/static \(bound) && mount \(loop.path) \(m)/uploads && echo kept > \(m)/uploads/marker")
            lvm.scratch.defer_ {
                _ = try? sh("umount \(bound) 2>/dev/null; umount \(m)/uploads 2>/dev/null; true")
                try? loop.detach()
            }
            let recipe = try writeRecipe(
                """
                name: remount
                volumes:
                  - device: \(lvm.device)
                    mount: \(m)
                    snapshot: 25M
                steps:
                  - name: a bad page
                    shell: echo v2 > \(m)/static/page
                verify:
                  - name: fails
                    run: [/bin/false]
                """, in: lvm.scratch)
            let result = try tool("run", recipe)
            #expect(result.status == 1, "\(result.stderr)")
            // The volume, then what is inside it, then the bind of its subtree.
            #expect(try sh("findmnt -no FSROOT \(bound)").trimmingWhitespace() == "/static", "a bind of the subtree again, not the whole volume")
            #expect(try String(contentsOfFile: "\(bound)/page", encoding: .utf8) == "v1\n", "rolled back, through the bind too")
            #expect(try String(contentsOfFile: "\(m)/uploads/marker", encoding: .utf8) == "kept\n", "the nested filesystem is mounted over the volume, not under it")
            #expect(try sh("findmnt -no SOURCE \(m)/uploads").contains("loop"), "the nested mount is the other filesystem")
            #expect(try sh("findmnt -no FSROOT \(m)").trimmingWhitespace() == "/")
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test("a mount point replaced by a symbolic link while its volume was unmounted is not mounted through; the admin is told")
        func remountRefusesASwappedMountPoint() throws {
            let scratch = try Scratch()
            let image = scratch.path("fs.img")
            let (target, elsewhere) = (scratch.path("mnt"), scratch.path("elsewhere"))
            for directory in [target, elsewhere] { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
            try sh("truncate -s 16M \(image) && mkfs.ext4 -q -F \(image)")
            let loop = try LoopDevice.attach(file: image).device
            scratch.defer_ {
                _ = try? sh("umount \(target) 2>/dev/null; umount \(elsewhere) 2>/dev/null; true")
                try? loop.detach()
            }
            try Mounts.mount(source: loop.path, target: target, fileSystemType: "ext4")
            let entry = try #require(Mounts.entry(at: target))
            try Mounts.unmount(target)
            // What an attacker with write access to the parent directory does in the gap.
            try sh("rmdir \(target) && ln -s \(elsewhere) \(target)")
            let warnings = CollectingReporter()
            let context = GuardContext(stateDirectory: scratch.path("state"), reporter: warnings)
            let procedure = RollbackProcedure(context: context, journal: try Journal.inMemory(), engine: SnapshotEngine(dm: try DeviceMapper()))
            procedure.remountAll([entry], origins: [])
            #expect(Mounts.entry(at: elsewhere) == nil, "nothing was mounted through the symlink")
            #expect(warnings.lines.contains { $0.contains(target) && $0.contains("mount point changed") }, "\(warnings.lines)")
        }

        @Test(
            "a dm-crypt volume: its key reaches neither the journal, the COW, guard show --json nor the output; guard warns that the COW holds plaintext; the rollback restores it")
        func cryptKeyNeverStored() throws {
            let scratch = try Scratch()
            let image = scratch.path("secret.img")
            try makeRandomFile(image, mebibytes: 64)
            let loop = try LoopDevice.attach(file: image).device
            let name = uniqueName("crypt")
            let key = String((0..<64).map { _ in "0123456789abcdef".randomElement()! })
            try sh("modprobe dm-crypt 2>/dev/null; dmsetup create \(name) --table '0 \(64 * 2048) crypt aes-xts-plain64 \(key) 0 \(loop.path) 0'")
            scratch.defer_ {
                removeGuardStacks(onVolume: name)
                _ = try? sh("dmsetup remove \(name)")
                try? loop.detach()
            }
            let device = "/dev/mapper/\(name)"
            try dropCaches(device)
            let before = try sha256(device)
            let tool = GuardTool(stateDirectory: scratch.path("state"))
            let recipe = try writeRecipe(
                """
                name: secrets
                volumes:
                  - device: \(device)
                    snapshot: 8M
                steps:
                  - name: write
                    shell: dd if=/dev/urandom of=\(device) bs=1M count=1 seek=3 oflag=direct conv=notrunc status=none
                on_success: keep
                """, in: scratch)
            let kept = try tool("run", "-v", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            #expect(kept.stderr.contains("is encrypted (dm-crypt) but its COW") && kept.stderr.contains("decrypted"), "\(kept.stderr)")
            let run = try #require((try tool.history())?.first?["id"] as? Int)
            let show = try tool("show", "\(run)", "--json")
            #expect(show.stdout.contains(Table.redactedKey), "the table is shown without its key")
            var places = [kept.stdout, kept.stderr, show.stdout, try tool("show", "\(run)").stdout, try tool("status", "--json").stdout]
            for file in try FileManager.default.subpathsOfDirectory(atPath: tool.stateDirectory) {
                let path = "\(tool.stateDirectory)/\(file)"
                var isDirectory: ObjCBool = false
                guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue else { continue }
                places.append(try sh("grep -a -c \(key) '\(path)' || true").trimmingWhitespace() == "0" ? "" : "the key is in \(path)")
            }
            #expect(places.allSatisfy { !$0.contains(key) }, "the key was found: \(places.filter { $0.contains(key) }.map { String($0.prefix(200)) })")
            let rollback = try tool("rollback", "\(run)", "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            try dropCaches(device)
            #expect(try sha256(device) == before, "the encrypted volume reads as before the run")
            try expectNothingLeft(state: tool.stateDirectory)
        }
    }
}

/// A reporter that keeps its warnings and notes, for tests that read what guard said.
final class CollectingReporter: Reporter, @unchecked Sendable {
    // @unchecked: the lock guards `lines`.
    private let lock = NSLock()
    private var stored: [String] = []
    var lines: [String] { lock.withLock { stored } }
    private func add(_ line: String) { lock.withLock { stored.append(line) } }
    func phase(_ name: String, run: Int64?) {}
    func note(_ text: String) { add(text) }
    func warning(_ text: String) { add(text) }
    func stepStarted(kind: String, index: Int, count: Int, name: String) {}
    func stepOutput(_ output: StepOutput) {}
    func stepFinished(kind: String, result: StepResult) {}
    func cow(volume: String, usedBytes: UInt64, sizeBytes: UInt64) {}
    func merge(volume: String, fraction: Double) {}
    func log(_ text: String) {}
    func result(_ text: String, success: Bool) { add(text) }
}
