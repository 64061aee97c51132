import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Snapshot
import Testing

/// Drives the built `guard` binary as an admin would, with its own state directory.
struct GuardTool {
    let stateDirectory: String
    var environment: [String: String] = [:]
    /// `guard-test` (the test hooks on) unless a test asks for the `guard` users run.
    var binary: String = guardBinary

    /// Runs `guard <arguments> --state-dir <dir>`.
    @discardableResult
    func callAsFunction(_ arguments: String..., now: Date? = nil, extra: [String: String] = [:]) throws -> CommandResult {
        var env = guardEnvironment().merging(environment) { $1 }.merging(extra) { $1 }
        if let now { env["GUARD_NOW"] = "\(now.timeIntervalSince1970)" }
        return try run([binary] + arguments + ["--state-dir", stateDirectory], environment: env)
    }

    /// Runs `guard <arguments> --json`: its document, checked against its schema in Docs/schema/
    /// (issue 21: every document the suite reads is validated, not only the contract test's).
    func json(_ arguments: String...) throws -> Any {
        let result = try run([binary] + arguments + ["--json", "--state-dir", stateDirectory], environment: guardEnvironment().merging(environment) { $1 })
        guard result.status == 0 else { throw ShellError(command: "guard \(arguments)", status: result.status, stderr: result.stderr) }
        try expectValid(result.stdout, arguments: arguments)
        return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8))
    }

    /// `guard history --json`'s runs, newest first.
    func history() throws -> [[String: Any]]? {
        (try json("history") as? [String: Any])?["runs"] as? [[String: Any]]
    }
}

/// The package's root (Scripts/, Docs/).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

/// The schema of what `guard <arguments> --json` prints (Docs/schema/NAME.schema.json).
func schemaName(_ arguments: [String]) -> String {
    switch arguments.first {
    case "show", "rollback", "commit": return "run"
    case "run": return arguments.contains("--dry-run") ? "plan" : "run"
    case "check": return "plan"
    case "volume": return ["create", "remove", "extend"].contains(arguments.dropFirst().first) ? "volume" : "volume-list"
    case let command?: return command
    case nil: return "error"
    }
}

/// Fails the test with every violation when `document` does not match the schema of the
/// command that printed it (or `schema`, when given).
func expectValid(_ document: String, arguments: [String], schema: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let name = schema ?? schemaName(arguments)
    let errors = try SchemaValidator.shared.violations(document, schema: name)
    #expect(errors == nil, "guard \(arguments.joined(separator: " ")) --json does not match \(name).schema.json:\n\(errors ?? "")\n\(document)", sourceLocation: sourceLocation)
}

/// One `validate-json.py --serve` for the whole suite: under emulation, starting Python and
/// loading jsonschema costs seconds, and the suite validates every document it reads.
final class SchemaValidator: @unchecked Sendable {
    // @unchecked: the process and its pipes are only used under `lock`.
    static let shared = SchemaValidator()
    private let lock = NSLock()
    private var process: Process?
    private var input: FileHandle?
    private var output: FileHandle?
    private var buffered = Data()

    /// The violations, or nil when the document is valid.
    func violations(_ document: String, schema: String) throws -> String? {
        try lock.withLock {
            let file = NSTemporaryDirectory() + "guard-doc-\(UInt32.random(in: 0...UInt32.max)).json"
            try Data(document.utf8).write(to: URL(fileURLWithPath: file))
            defer { try? FileManager.default.removeItem(atPath: file) }
            try start()
            input!.write(Data("\(schema)\t\(file)\n".utf8))
            let line = try readLine()
            guard let answer = try JSONSerialization.jsonObject(with: line) as? [String: Any], let valid = answer["valid"] as? Bool else {
                throw ShellError(command: "validate-json.py --serve", status: -1, stderr: String(decoding: line, as: UTF8.self))
            }
            return valid ? nil : answer["errors"] as? String ?? "invalid"
        }
    }

    private func start() throws {
        if let process, process.isRunning { return }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["\(packageRoot)/Scripts/lib/validate-json.py", "--serve"]
        let toServer = Pipe()
        let fromServer = Pipe()
        process.standardInput = toServer
        process.standardOutput = fromServer
        try process.run()
        (self.process, input, output, buffered) = (process, toServer.fileHandleForWriting, fromServer.fileHandleForReading, Data())
    }

    private func readLine() throws -> Data {
        while true {
            if let newline = buffered.firstIndex(of: UInt8(ascii: "\n")) {
                let line = buffered[buffered.startIndex..<newline]
                buffered = Data(buffered[buffered.index(after: newline)...])
                return Data(line)
            }
            let chunk = output!.availableData
            if chunk.isEmpty {
                process = nil
                throw ShellError(command: "validate-json.py --serve", status: -1, stderr: "it exited (is python3-jsonschema installed? Scripts/setup installs it)")
            }
            buffered.append(chunk)
        }
    }
}

/// An LVM setup like the tutorial's: VG datadisks on a loop device, LV website 100M, ext4.
final class LVMFixture {
    let scratch: Scratch
    let loop: LoopDevice
    let vg: String
    let device: String
    let mountPoint: String

    init(label: String = #function) throws {
        scratch = try Scratch(label)
        let image = scratch.path("pv.img")
        try makeSparseFile(image, mebibytes: 300)
        loop = try LoopDevice.attach(file: image).device
        vg = "gt\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        let (loop, vg) = (loop, vg)
        setenv("LVM_SUPPRESS_FD_WARNINGS", "1", 1)
        try sh("pvcreate -q \(loop.path) && vgcreate -q \(vg) \(loop.path) && lvcreate -q -y -L 100M -n website \(vg)")
        device = "/dev/mapper/\(vg)-website"
        mountPoint = scratch.path("website")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let mountPoint = self.mountPoint
        scratch.defer_ {
            try? Mounts.unmount(mountPoint)
            removeGuardStacks(onVolume: "\(vg)-website")
            _ = try? sh("vgchange -q -an \(vg) && vgremove -q -f \(vg) && pvremove -q \(loop.path)")
            try? loop.detach()
        }
        // Inode tables and journal written now: otherwise ext4lazyinit writes them after the
        // mount, in the background, and a test's small COW (4 MiB) may fill with its blocks
        // instead of the test's own writes (the CI once saw it 96% full after one echo).
        try sh("mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 \(device)")
        try Mounts.mount(source: device, target: mountPoint, fileSystemType: "ext4")
    }
}

/// After a failed test: removes guard's layers stacked on `volume` and puts its own table back,
/// so the next test starts from a clean kernel.
func removeGuardStacks(onVolume volume: String) {
    guard let dm = try? DeviceMapper(), let devices = try? dm.guardDevices() else { return }
    let layers = devices.filter { StackIdentity.parse(uuid: $0.uuid) != nil && $0.name.contains(volume) }
    guard !layers.isEmpty else { return }
    if let real = layers.first(where: { $0.name.hasSuffix("-real") }), let own = try? dm.table(.number(real.number)),
        let origin = try? dm.info(.name(volume))
    {
        try? dm.load(.number(origin.number), table: own)
        try? dm.suspend(.number(origin.number))
        try? dm.resume(.number(origin.number))
    }
    for suffix in ["-snap", "-real", "-cow"] {
        for layer in layers where layer.name.hasSuffix(suffix) {
            // Never left suspended: it would hold every lvm2 command of the other tests.
            if (try? dm.info(.number(layer.number)))??.isSuspended == true { try? dm.retire(.number(layer.number)) }
            _ = try? dm.removeRetired(.number(layer.number))
            try? dm.remove(.number(layer.number))
        }
    }
}

/// A checksum of every file (path, mode, size, content) under a directory.
func manifest(_ directory: String) throws -> String {
    try sh(
        "cd '\(directory)' && find . -path ./lost+found -prune -o -type f -printf '%p %m %s\\n' | sort && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum"
    )
}

/// The tutorial's recipes, pointed at a test's device and mount point.
func tutorialRecipe(device: String, mount: String, bad: Bool, onSuccess: String = "commit", extra: String = "", verify: String? = nil) -> String {
    let migration =
        bad
        ? "nl -n rz -w 5 \(mount)/database | cut -f1 | sed 's/^/id:/' > \(mount)/database.new && mv \(mount)/database.new \(mount)/database"
        : "nl -n rz -w 5 \(mount)/database | sed 's/\\t/,/; s/^/id:/' > \(mount)/database.new && mv \(mount)/database.new \(mount)/database"
    return """
        name: website-schema-v2
        volumes:
          - device: \(device)
            mount: \(mount)
            snapshot: { size: 25M }
        steps:
          - name: add id column
            shell: \(migration)
            timeout: 2m
        verify:
          - name: every row has an id and an email
            shell: \(verify ?? "\"! grep -v '^id:.*@' \(mount)/database\"")
        on_success: \(onSuccess)
        on_failure: rollback
        \(extra)
        """
}

func writeRecipe(_ text: String, in scratch: Scratch, name: String = "upgrade.recipe") throws -> String {
    let path = scratch.path(name)
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    chmod(path, 0o644)
    return path
}

func writeDatabase(at mount: String) throws {
    let rows = (1...2000).map { "user\($0),user\($0)@example.com" }.joined(separator: "\n") + "\n"
    try rows.write(toFile: "\(mount)/database", atomically: false, encoding: .utf8)
    try "<html>v1</html>\n".write(toFile: "\(mount)/index.html", atomically: false, encoding: .utf8)
    try sh("sync")
}

/// No layer, loop device or COW file of any run of the journal in `state` is left. (Layers of
/// other state directories' runs belong to tests running beside this one.)
func expectNothingLeft(state: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let dm = try DeviceMapper()
    // No journal: no run, so no layer of this state directory's. A journal that cannot be read:
    // every layer counts.
    let journal = "\(state)/journal.sqlite"
    let tokens = FileManager.default.fileExists(atPath: journal) ? try? Journal.open(path: journal, readOnly: true).allTokens() : []
    let layers = try dm.guardDevices().filter { device in
        guard let (identity, _) = StackIdentity.parse(uuid: device.uuid) else { return false }
        return tokens?.contains(identity.runToken) ?? true
    }
    #expect(layers.isEmpty, "GUARD- layers left: \(layers.map(\.name))", sourceLocation: sourceLocation)
    let cows = SnapshotEngine.cowFiles(in: "\(state)/cow")
    #expect(cows.isEmpty, "COW files left: \(cows)", sourceLocation: sourceLocation)
    let loops = LoopDevice.all().filter { $0.backingFile?.hasPrefix(state) == true }
    #expect(loops.isEmpty, "loop devices left: \(loops)", sourceLocation: sourceLocation)
}

/// libdevmapper's udev transactions open now (`dmsetup udevcookies`): a cookie's semaphore
/// lives until the command that made it waits for udev, so one left behind by a command that
/// returned is a wait it skipped. (A process killed mid-transaction leaves one too.)
func udevCookies() throws -> Set<String> {
    let listing = try sh("dmsetup udevcookies")
    return Set(listing.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map(String.init) })
}

extension Kernel {
    /// Issue 6: the guard command on real volumes.
    @Suite("guard run, rollback, commit, history, show")
    struct GuardCLIKernelTests {
        @Test("the tutorial on an LVM volume: the bad migration is rolled back (exit 1), the good one kept then committed")
        func tutorialOnLVM() throws {
            let lvm = try LVMFixture()
            let guardTool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)

            let bad = try writeRecipe(tutorialRecipe(device: "\(lvm.vg)/website", mount: lvm.mountPoint, bad: true), in: lvm.scratch, name: "bad.recipe")
            let first = try guardTool("run", bad)
            #expect(first.status == 1, "a failed verify ends rolled back with exit 1: \(first.stderr)")
            #expect(first.stderr.contains("verify failed"), "\(first.stderr)")
            #expect(first.stderr.contains("rolled back to their state before the run"), "\(first.stderr)")
            #expect(try manifest(lvm.mountPoint) == before, "every file is as before the run")
            #expect(Mounts.entry(at: lvm.mountPoint) != nil, "guard mounted the volume again")
            try expectNothingLeft(state: guardTool.stateDirectory)

            let good = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: false, onSuccess: "keep 24h"), in: lvm.scratch, name: "good.recipe")
            let second = try guardTool("run", good)
            #expect(second.status == 0, "\(second.stderr)")
            let firstRow = try String(contentsOfFile: "\(lvm.mountPoint)/database", encoding: .utf8).prefix { $0 != "\n" }
            #expect(firstRow == "id:00001,user1,user1@example.com")
            let migrated = try manifest(lvm.mountPoint)

            // The journal tells the story.
            let history = try #require(try guardTool.history())
            #expect(history.count == 2)
            let kept = history[0]
            let rolledBack = history[1]
            #expect(rolledBack["outcome"] as? String == "rolled_back")
            #expect(rolledBack["exit_code"] as? Int == 1)
            #expect(kept["outcome"] as? String == "kept")
            #expect(kept["exit_code"] as? Int == 0)
            #expect(kept["recipe"] as? String == "website-schema-v2")
            #expect(kept["started_at"] is String && kept["finished_at"] is String)
            #expect(kept["keep_until"] is String)
            let snapshots = try #require(kept["snapshots"] as? [[String: Any]])
            #expect(snapshots.count == 1)
            let size = try #require(snapshots[0]["size_bytes"] as? Int)
            let peak = try #require(snapshots[0]["peak_used_bytes"] as? Int)
            let suspend = try #require(snapshots[0]["suspend_us"] as? Int)
            #expect(size == 25 << 20)
            #expect(peak > 0 && peak <= size, "peak use \(peak) within the COW size \(size)")
            #expect(suspend > 0)
            #expect(snapshots[0]["volume"] as? String == lvm.device)

            let runID = try #require(kept["id"] as? Int)
            let show = try #require(try guardTool.json("show", "\(runID)") as? [String: Any])
            let phases = (show["phases"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
            #expect(phases.starts(with: ["preflight", "snapshot", "steps", "verify", "keep"]), "\(phases)")
            let steps = show["steps"] as? [[String: Any]] ?? []
            #expect(steps.first?["name"] as? String == "add id column")
            #expect(steps.first?["exit_code"] as? Int == 0)
            #expect(show["recipe_sha256"] as? String == (try sha256(good)))
            let human = try guardTool("show", "\(runID)")
            #expect(human.stdout.contains("suspend window"), "\(human.stdout)")

            // Status shows the kept snapshot; lvs still works with guard's stack in place.
            let status = try #require(try guardTool.json("status") as? [String: Any])
            let runs = status["runs"] as? [[String: Any]] ?? []
            #expect(runs.first?["state"] as? String == "kept")
            try sh("lvs \(lvm.vg)/website > /dev/null")

            // Commit: the upgrade is final.
            let commit = try guardTool("commit", "\(runID)")
            #expect(commit.status == 0, "\(commit.stderr)")
            #expect(try manifest(lvm.mountPoint) == migrated)
            try expectNothingLeft(state: guardTool.stateDirectory)
            let again = try guardTool("commit", "\(runID)")
            #expect(again.status == 2 && again.stderr.contains("already committed"), "\(again.stderr)")
            let rollback = try guardTool("rollback", "\(runID)")
            #expect(rollback.status == 2 && rollback.stderr.contains("already committed"), "\(rollback.stderr)")
            let unknown = try guardTool("rollback", "999")
            #expect(unknown.status == 2 && unknown.stderr.contains("there is no run '999'"), "\(unknown.stderr)")

            // LVM still manages the LV: deactivate and activate it.
            try Mounts.unmount(lvm.mountPoint)
            try sh("lvchange -an \(lvm.vg)/website && lvchange -ay \(lvm.vg)/website && lvs --noheadings -o lv_attr \(lvm.vg)/website | grep -q a")
            #expect(try fsck(lvm.device))
        }

        @Test("a byte-exact rollback on a guard volume: the whole volume equals its image before the run")
        func byteExactOnGuardVolume() throws {
            let scratch = try Scratch()
            let guardTool = GuardTool(stateDirectory: scratch.path("state"))
            let name = uniqueName("site")
            let created = try guardTool("volume", "create", name, "--backing", scratch.path("site.img"), "--size", "64M")
            #expect(created.status == 0, "\(created.stderr)")
            let device = "/dev/mapper/\(name)"
            defer { _ = try? guardTool("volume", "remove", name) }
            try sh("mkfs.ext4 -q -F \(device) && debugfs -w -R 'write /etc/services database' \(device) >/dev/null 2>&1")
            let image = try sha256(device)

            // The steps mount, change and unmount the volume; verify fails; guard merges back.
            let mount = scratch.path("m")
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
            let recipe = try writeRecipe(
                """
                name: exact
                volumes:
                  - device: \(device)
                    snapshot: 16M
                steps:
                  - name: migrate
                    shell: mount \(device) \(mount) && head -c 8M /dev/urandom > \(mount)/blob && echo broken > \(mount)/database && umount \(mount)
                verify:
                  - name: database intact
                    shell: debugfs -R 'cat /database' \(device) 2>/dev/null | grep -q tcpmux
                """, in: scratch)
            let result = try guardTool("run", recipe)
            #expect(result.status == 1, "\(result.stderr)")
            try dropCaches(device)
            #expect(try sha256(device) == image, "every byte of the volume is as before the run")
            try expectNothingLeft(state: guardTool.stateDirectory)
            let list = try guardTool("volume", "list")
            #expect(list.stdout.contains(name) && list.stdout.contains("active"))
        }

        @Test("a failing step and a failing verify both end rolled back with exit 1", arguments: ["step", "verify"])
        func failuresRollBack(what: String) throws {
            let lvm = try LVMFixture()
            let guardTool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)
            let steps =
                what == "step"
                ? "  - name: change\n    shell: echo changed > \(lvm.mountPoint)/index.html\n  - name: fail\n    run: [/bin/false]\n  - name: never\n    shell: touch \(lvm.mountPoint)/never"
                : "  - name: change\n    shell: echo changed > \(lvm.mountPoint)/index.html"
            let verify = what == "verify" ? "verify:\n  - name: fail\n    run: [/bin/false]\n" : ""
            let recipe = try writeRecipe(
                "name: fail-\(what)\nvolumes:\n  - device: \(lvm.device)\n    snapshot: 10M\nsteps:\n\(steps)\n\(verify)", in: lvm.scratch)
            let result = try guardTool("run", recipe)
            #expect(result.status == 1, "\(result.stderr)")
            #expect(result.stderr.contains(what == "step" ? "step 2 'fail' exit 1" : "check 'fail' exit 1"), "\(result.stderr)")
            #expect(try manifest(lvm.mountPoint) == before)
            #expect(!FileManager.default.fileExists(atPath: "\(lvm.mountPoint)/never"), "steps after the failing one do not run")
            try expectNothingLeft(state: guardTool.stateDirectory)
        }

        @Test(
            "a kept run is rolled back a day later, after more writes: the service's start hook finds the old data mounted while the merge goes on, and no udev transaction is left; an expired keep is committed"
        )
        func keptRunRolledBackLater() throws {
            let lvm = try LVMFixture()
            let guardTool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)
            let database = try sha256("\(lvm.mountPoint)/database")
            // The service starts again from the rollback's start hook, and notes what it finds.
            let seen = lvm.scratch.path("seen-by-service")
            let service = """
                rollback:
                  start:
                    - name: the service starts
                      shell: "mountpoint -q \(lvm.mountPoint) && sha256sum < \(lvm.mountPoint)/database | cut -d' ' -f1 > \(seen)"
                """
            let recipe = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: false, onSuccess: "keep 2d", extra: service), in: lvm.scratch)
            let start = Date()
            let result = try guardTool("run", recipe, now: start)
            #expect(result.status == 0, "\(result.stderr)")
            // The service keeps writing after the upgrade.
            try makeRandomFile("\(lvm.mountPoint)/uploads.bin", mebibytes: 4)
            try sh("sync")
            let tomorrow = start.addingTimeInterval(86_400)
            let cookies = try udevCookies()
            let rollback = try guardTool("rollback", "1", now: tomorrow)
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(rollback.stderr.contains("mounted again; the merge finishes in the background"), "\(rollback.stderr)")
            let seenDigest = try? String(contentsOfFile: seen, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(seenDigest == database, "the start hook ran with the volume mounted and the pre-run database on it")
            // guard waits for udev after the volume is mounted again, but before it returns.
            let left = try udevCookies().subtracting(cookies)
            #expect(left.isEmpty, "udev transactions of the rollback nobody waited for (dmsetup udevcookies): \(left)")
            let finished = try guardTool("status", "--wait")
            #expect(finished.status == 0, "\(finished.stderr)")
            #expect(try manifest(lvm.mountPoint) == before, "the volume is as before the run, later writes included")
            try expectNothingLeft(state: guardTool.stateDirectory)
            let twice = try guardTool("rollback", "1")
            #expect(twice.status == 2 && twice.stderr.contains("already rolled back"), "\(twice.stderr)")

            // Kept past its keep duration: `guard status` says so and changes nothing; the
            // maintenance job (`guard status --tidy`) commits it.
            let second = try guardTool("run", recipe, now: start)
            #expect(second.status == 0, "\(second.stderr)")
            let looked = try guardTool("status", now: start.addingTimeInterval(3 * 86_400))
            #expect(looked.status == 0, "\(looked.stderr)")
            #expect(looked.stderr.contains("guard status --tidy") && !looked.stderr.contains("committing it"), "\(looked.stderr)")
            #expect((try guardTool.history())?.first?["state"] as? String == "kept", "plain `guard status` committed nothing")
            #expect(try sh("dmsetup table \(lvm.vg)-website").contains("snapshot-origin"), "plain `guard status` left the snapshot in place")
            let later = try guardTool("status", "--tidy", now: start.addingTimeInterval(3 * 86_400))
            #expect(later.status == 0)
            #expect(later.stderr.contains("committing it"), "\(later.stderr)")
            let history = try #require(try guardTool.history())
            #expect(history.first?["outcome"] as? String == "committed")
            try expectNothingLeft(state: guardTool.stateDirectory)
        }

        @Test("another state directory's guard devices: status lists them as unknown and needs no attention, recover leaves them alone, and that directory's kept run rolls back")
        func otherStateDirectoryLeftAlone() throws {
            let lvm = try LVMFixture()
            let mine = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let other = GuardTool(stateDirectory: lvm.scratch.path("other-state"))
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)
            // A kept run of the other state directory, and a layer no journal here has ever had
            // that nothing uses (as one is, for a moment, while a snapshot is being set up).
            let recipe = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: false, onSuccess: "keep 2d"), in: lvm.scratch)
            let kept = try other("run", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            let dm = try DeviceMapper()
            let token = StackIdentity.newToken()
            let half = "guard-\(token)-\(uniqueName("elsewhere"))-cow"
            try dm.create(name: half, uuid: "GUARD-\(token)-0-cow", table: Table(.zero, length: 2048))
            lvm.scratch.defer_ { try? dm.remove(.name(half)) }

            let status = try mine("status", "--json")
            #expect(status.status == 0, "another directory's devices need no attention here: \(status.stderr)")
            try expectValid(status.stdout, arguments: ["status"])
            let document = try #require(try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any])
            let unknown = (document["unknown_devices"] as? [String]) ?? []
            #expect(unknown.contains { $0.hasPrefix(half + " ") }, "\(unknown)")
            let otherRuns = try #require((try other.json("status") as? [String: Any])?["runs"] as? [[String: Any]])
            let otherToken = try #require(otherRuns.first?["token"] as? String)
            #expect(unknown.contains { $0.hasSuffix("(GUARD-\(otherToken)-0-snap)") }, "the other directory's kept snapshot: \(unknown)")
            #expect((document["stray_devices"] as? [String]) == [], "\(status.stdout)")
            let recovered = try mine("recover")
            #expect(recovered.status == 0, "\(recovered.stderr)")
            #expect(!recovered.stdout.contains(half), "\(recovered.stdout)")
            #expect(try dm.info(.name(half)) != nil, "recover removed a device of a run its journal never had")
            try dm.remove(.name(half))

            // The other directory's run is as it was: its rollback restores the volume.
            let back = try other("rollback", "1")
            #expect(back.status == 0, "\(back.stderr)")
            #expect(try other("status", "--wait").status == 0)
            #expect(try manifest(lvm.mountPoint) == before)
            try expectNothingLeft(state: other.stateDirectory)
        }

        @Test("a second run on the same volume is refused with the first run's id; nothing is touched")
        func concurrentRunRefused() async throws {
            let lvm = try LVMFixture()
            let guardTool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let marker = lvm.scratch.path("started")
            // The first run's step waits for the test: the second run always meets a live first one.
            let release = lvm.scratch.path("release")
            let slow = try writeRecipe(
                "name: slow\nvolumes:\n  - device: \(lvm.device)\n    snapshot: 10M\nsteps:\n  - name: wait\n    shell: touch \(marker); while [ ! -e \(release) ]; do sleep 0.1; done\n",
                in: lvm.scratch, name: "slow.recipe")
            let fast = try writeRecipe(
                "name: fast\nvolumes:\n  - device: \(lvm.device)\n    snapshot: 10M\nsteps:\n  - name: nothing\n    run: [/bin/true]\n", in: lvm.scratch, name: "fast.recipe")
            let first = Task.detached { try guardTool("run", slow) }
            defer { _ = FileManager.default.createFile(atPath: release, contents: nil) }  // never leave it waiting
            try await waitUntil("the first run's step to start") { FileManager.default.fileExists(atPath: marker) }
            let second = try guardTool("run", fast)
            _ = FileManager.default.createFile(atPath: release, contents: nil)
            #expect(second.status == 75, "busy, try again later (EX_TEMPFAIL), not a bad recipe: \(second.stderr)")
            #expect(second.stderr.contains("run 1 (pid"), "the refusal names the first run: \(second.stderr)")
            #expect(second.stderr.contains("nothing was touched") || second.stderr.contains("in use by another guard command"), "\(second.stderr)")
            let firstResult = try await first.value
            #expect(firstResult.status == 0, "\(firstResult.stderr)")
            let history = try #require(try guardTool.history())
            #expect(history.count == 1, "the refused run left no journal row")
            try expectNothingLeft(state: guardTool.stateDirectory)
        }

        @Test("bad input is refused with one clear line and exit 2: no root, bad recipe, missing device")
        func badInput() throws {
            let scratch = try Scratch()
            let guardTool = GuardTool(stateDirectory: scratch.path("state"))
            let recipe = try writeRecipe(tutorialRecipe(device: "/dev/mapper/no-such-volume", mount: "/tmp", bad: false), in: scratch)
            let missing = try guardTool("run", recipe)
            #expect(missing.status == 2)
            #expect(missing.stderr.contains("the device /dev/mapper/no-such-volume does not exist"), "\(missing.stderr)")
            #expect(missing.stdout.isEmpty)

            let broken = try writeRecipe("name: x\nvolumes: []\nstpes: []\n", in: scratch, name: "broken.recipe")
            let invalid = try guardTool("run", broken)
            #expect(invalid.status == 2)
            #expect(invalid.stderr.contains("broken.recipe:3:1: unknown key 'stpes'"), "\(invalid.stderr)")

            let nobody = try run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", guardBinary, "volume", "list", "--state-dir", scratch.path("nobody")])
            #expect(nobody.status == 2)
            #expect(nobody.stderr.contains("device-mapper needs root"), "\(nobody.stderr)")
            #expect(nobody.stderr.split(separator: "\n").count == 1, "one line, no libdevmapper noise: \(nobody.stderr)")
            try expectNothingLeft(state: guardTool.stateDirectory)
        }
    }
}

/// Whether e2fsck finds the filesystem clean.
func fsck(_ device: String) throws -> Bool {
    try run(["/sbin/e2fsck", "-f", "-n", device]).status == 0
}
