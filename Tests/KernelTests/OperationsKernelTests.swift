import BlockDevice
import DeviceMapper
import Engine
import Foundation
import Quantities
import Recipe
import Snapshot
import Testing

/// Runs guard with a guard.conf and no --state-dir, as an admin with /etc/guard/guard.conf would.
func guardWithConfiguration(_ file: String, _ arguments: String...) throws -> CommandResult {
    var environment = guardEnvironment()
    environment["GUARD_CONFIG"] = file
    environment.removeValue(forKey: "GUARD_STATE_DIR")
    return try run([guardBinary] + arguments, environment: environment)
}

/// Everything device-mapper has, tables included: what a dry run must leave as it was.
/// The kernel's tables of the devices named after `volume` (its dm name): the volume and any
/// layer guard named after it. Tests beside this one have their own devices.
func deviceMapperState(_ volume: String) throws -> String { try sh("dmsetup table | grep -F -- '\(volume)' | sort") }

/// What guard wrote to the system log while `body` ran, as syslog lines `<PRI>... guard[PID]: MESSAGE`.
/// Without a syslog on the machine (the VM), a listener of the test's own is /dev/log for that
/// time; with one, its journal is read back (`journalctl -t guard`).
func systemLogLines(scratch: Scratch, _ body: () throws -> Void) throws -> [String] {
    var devLog = stat()
    if lstat("/dev/log", &devLog) != 0 {
        let received = scratch.path("syslog.txt")
        let listener = Process()
        listener.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        listener.arguments = [
            "-c",
            """
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind("/dev/log")
            with open(sys.argv[1], "ab", buffering=0) as out:
                while True:
                    out.write(s.recv(65536) + b"\\n")
            """, received,
        ]
        try listener.run()
        defer {
            kill(listener.processIdentifier, SIGKILL)  // SIGTERM may be ignored, inherited from the test runner
            listener.waitUntilExit()
            unlink("/dev/log")
        }
        try waitUntilNow("the listener on /dev/log") { lstat("/dev/log", &devLog) == 0 }
        try body()
        // Datagrams are read in order: once the test's own last line is in, guard's lines are.
        let end = "guard-test-end-\(UUID().uuidString)"
        try sh("logger -d -u /dev/log \(end)")
        try waitUntilNow("the listener to write every line") { ((try? String(contentsOfFile: received, encoding: .utf8)) ?? "").contains(end) }
        return ((try? String(contentsOfFile: received, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init).filter { !$0.contains(end) }
    }
    let since = Int(Date().timeIntervalSince1970) - 1
    try body()
    Thread.sleep(forTimeInterval: 1)
    let journal = try run(["journalctl", "-t", "guard", "--since", "@\(since)", "-o", "json", "--no-pager"])
    #expect(journal.status == 0, "this machine has /dev/log but no journalctl to read it back: \(journal.stderr)")
    return journal.stdout.split(separator: "\n").compactMap { line in
        guard let entry = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
            let message = entry["MESSAGE"] as? String, let priority = (entry["PRIORITY"] as? String).flatMap(Int.init),
            let facility = (entry["SYSLOG_FACILITY"] as? String).flatMap(Int.init)
        else { return nil }
        return "<\(facility * 8 + priority)>journal guard[\(entry["SYSLOG_PID"] as? String ?? "?")]: \(message)"
    }
}

func listing(_ directory: String) -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted() }

extension Kernel {
    /// Issue 9: the dry run, sizing from history, guard.conf.
    @Suite("operations: dry run, auto sizing, guard.conf")
    struct OperationsKernelTests {
        @Test("run --dry-run runs every check and prints the plan, but makes no device, no COW file, no lock and no journal row")
        func dryRunTouchesNothing() throws {
            let lvm = try LVMFixture()
            let state = lvm.scratch.path("state")
            let tool = GuardTool(stateDirectory: state)
            try writeDatabase(at: lvm.mountPoint)
            let recipe = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: false), in: lvm.scratch)
            let dmName = "\(lvm.vg)-website"
            let tables = try deviceMapperState(dmName)
            // The files, not the device's bytes: a freshly made ext4 initialises its inode tables
            // in the background while mounted.
            let volume = try manifest(lvm.mountPoint)

            // No journal yet: not even the state directory is made.
            let first = try tool("run", "--dry-run", recipe)
            #expect(first.status == 0, "\(first.stderr)")
            #expect(first.stdout.contains("dry run of website-schema-v2"), "\(first.stdout)")
            #expect(first.stdout.contains("snapshot: \(formatBytes(25 << 20)) (\(formatBytes(25 << 20)) as written)"), "\(first.stdout)")
            #expect(first.stdout.contains("earlier runs: none of website-schema-v2"), "\(first.stdout)")
            #expect(first.stderr.contains("every preflight check passes; nothing was touched"), "\(first.stderr)")
            #expect(!FileManager.default.fileExists(atPath: state), "a dry run made \(state)")
            #expect(try deviceMapperState(dmName) == tables)
            #expect(try manifest(lvm.mountPoint) == volume)

            // After a real run, a dry run shows what it saw and adds nothing.
            let real = try tool("run", recipe)
            #expect(real.status == 0, "\(real.stderr)")
            let peak = try #require(((try tool.json("show", "1") as? [String: Any])?["snapshots"] as? [[String: Any]])?.first?["peak_used_bytes"] as? Int)
            #expect(peak > 0)
            let after = (
                try deviceMapperState(dmName), try manifest(lvm.mountPoint), listing(state + "/cow"), listing(state + "/locks"), try sh("ls -l --time-style=+%s.%N \(state)/locks")
            )
            let journalRows = try sh("sqlite3 \(state)/journal.sqlite 'SELECT (SELECT COUNT(*) FROM runs), (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM snapshots)'")
            let second = try tool("run", "--dry-run", recipe)
            #expect(second.status == 0, "\(second.stderr)")
            #expect(second.stdout.contains("earlier runs: peak COW use \(formatBytes(UInt64(peak))) (1 run of website-schema-v2)"), "\(second.stdout)")
            #expect(try deviceMapperState(dmName) == after.0, "no device")
            #expect(try manifest(lvm.mountPoint) == after.1)
            #expect(listing(state + "/cow") == after.2, "no COW file")
            #expect(listing(state + "/locks") == after.3, "no lock file made")
            #expect(try sh("ls -l --time-style=+%s.%N \(state)/locks") == after.4, "no lock file written")
            #expect(
                try sh("sqlite3 \(state)/journal.sqlite 'SELECT (SELECT COUNT(*) FROM runs), (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM snapshots)'") == journalRows,
                "no journal row")

            // Every refusal at once, exit 2, still nothing touched.
            chmod(recipe, 0o666)
            try (try String(contentsOfFile: recipe, encoding: .utf8)).replacingOccurrences(
                of: "snapshot: { size: 25M }", with: "snapshot: { size: 25M }\n  - device: /dev/mapper/no-such-volume\n    snapshot: { size: 25M }"
            )
            .write(toFile: recipe, atomically: false, encoding: .utf8)
            let refused = try tool("run", "--dry-run", recipe)
            #expect(refused.status == 2)
            #expect(refused.stderr.contains("a real run would be refused"), "\(refused.stderr)")
            #expect(refused.stderr.contains("writable"), "the unsafe recipe: \(refused.stderr)")
            #expect(refused.stderr.contains("/dev/mapper/no-such-volume does not exist"), "the missing volume: \(refused.stderr)")
            #expect(try deviceMapperState(dmName) == after.0)
            #expect(try sh("sqlite3 \(state)/journal.sqlite 'SELECT COUNT(*) FROM runs'").trimmingCharacters(in: .whitespacesAndNewlines) == "1")
        }

        @Test("size: auto learns from earlier runs: 20% of the volume first, then 1.5 × their peak COW use + 16 MiB, as the dry run says")
        func autoSizing() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let recipe = try writeRecipe(
                """
                name: website-auto
                volumes:
                  - device: \(lvm.device)
                    mount: \(lvm.mountPoint)
                    snapshot: { size: auto }
                steps:
                  - name: write 12 MiB
                    shell: head -c 12M /dev/urandom > \(lvm.mountPoint)/blob && sync
                on_success: commit
                """, in: lvm.scratch)
            let dry = try tool("run", "--dry-run", recipe)
            #expect(dry.stdout.contains("auto: no earlier run of website-auto to learn from, 20% of the volume"), "\(dry.stdout)")
            #expect(try tool("run", recipe).status == 0)
            func snapshot(_ run: Int) throws -> [String: Any] {
                try #require(((try tool.json("show", "\(run)") as? [String: Any])?["snapshots"] as? [[String: Any]])?.first)
            }
            let first = try snapshot(1)
            #expect(first["size_bytes"] as? Int == 20 << 20, "20% of 100 MiB")
            let peak = try #require(first["peak_used_bytes"] as? Int)
            #expect(peak >= 12 << 20 && peak < 20 << 20, "the steps wrote 12 MiB: peak \(peak)")

            // A fixed size smaller than what the recipe needed before: the dry run says so.
            let small = try writeRecipe(
                try String(contentsOfFile: recipe, encoding: .utf8).replacingOccurrences(of: "size: auto", with: "size: 4M"), in: lvm.scratch, name: "small.recipe")
            let warned = try tool("run", "--dry-run", small)
            #expect(warned.status == 0, "a warning, not a refusal: \(warned.stderr)")
            #expect(warned.stdout.contains("earlier runs: peak COW use \(formatBytes(UInt64(peak))) (1 run of website-auto)"), "\(warned.stdout)")
            #expect(
                warned.stderr.contains(
                    "earlier runs of website-auto used up to \(formatBytes(UInt64(peak))) of COW on \(lvm.device), more than this snapshot can hold (\(formatBytes(4 << 20)))"),
                "\(warned.stderr)")

            let learned = try tool("run", "--dry-run", recipe)
            #expect(learned.stdout.contains("auto: 1.5 × the peak use of earlier runs (\(formatBytes(UInt64(peak)))) + 16 MiB"), "\(learned.stdout)")
            #expect(try tool("run", recipe).status == 0)
            let expected = CowGeometry(chunkSectors: 8).roundUp(UInt64(Double(peak) * 1.5) + (16 << 20))
            #expect(try snapshot(2)["size_bytes"] as? Int == Int(expected), "run 2 sized from run 1's peak \(peak)")
        }

        @Test("guard.conf: state_dir and cow_dir are used, `keep` without a duration expires after keep, a recipe without extend grows by extend; flags win")
        func configurationFile() throws {
            let lvm = try LVMFixture()
            let state = lvm.scratch.path("state-from-conf")
            let cow = lvm.scratch.path("cow-from-conf")
            let file = lvm.scratch.path("guard.conf")
            try "state_dir = \(state)\ncow_dir = \(cow)\nkeep = 2d\nextend = at 50% by 8M max 64M\n".write(toFile: file, atomically: true, encoding: .utf8)
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)
            let recipe = try writeRecipe(
                """
                name: website-conf
                volumes:
                  - device: \(lvm.device)
                    mount: \(lvm.mountPoint)
                    snapshot: { size: 8M }
                steps:
                  - name: write 20 MiB, more than the snapshot's 8 MiB
                    shell: for i in 1 2 3 4 5; do head -c 4M /dev/urandom > \(lvm.mountPoint)/blob$i; sync; sleep 1; done
                on_success: keep
                """, in: lvm.scratch)
            let check = try guardWithConfiguration(file, "check", recipe)
            #expect(check.status == 0, "\(check.stderr)")
            #expect(check.stdout.contains("COW: a preallocated file in \(cow)"), "\(check.stdout)")
            #expect(check.stdout.contains("grows at 50% by \(formatBytes(8 << 20)) up to \(formatBytes(64 << 20)) (extend from \(file))"), "\(check.stdout)")
            #expect(check.stdout.contains("on success: keep (for 2d, guard.conf's keep)"), "\(check.stdout)")

            let started = Date()
            let result = try guardWithConfiguration(file, "run", recipe)
            #expect(result.status == 0, "the COW grew instead of filling: \(result.stderr)")
            let show = try #require(try JSONSerialization.jsonObject(with: Data(try guardWithConfiguration(file, "show", "1", "--json").stdout.utf8)) as? [String: Any])
            let snapshot = try #require((show["snapshots"] as? [[String: Any]])?.first)
            #expect((snapshot["cow_path"] as? String)?.hasPrefix(cow + "/") == true, "\(snapshot)")
            #expect((snapshot["peak_used_bytes"] as? Int ?? 0) > 8 << 20, "more than the first 8 MiB was used: \(snapshot)")
            let until = try #require((show["keep_until"] as? String).flatMap { ISO8601DateFormatter.withFractions.date(from: $0) })
            #expect(abs(until.timeIntervalSince(started) - 2 * 86400) < 600, "kept for guard.conf's 2d: \(until)")
            #expect(FileManager.default.fileExists(atPath: state + "/journal.sqlite"))
            #expect(listing(cow).filter { $0.hasSuffix(".cow") }.count == 1)
            #expect(listing(state + "/cow").filter { $0.hasSuffix(".cow") }.isEmpty, "no COW file in the state directory: they go to cow_dir")

            // --state-dir wins over state_dir: that directory has no run.
            let other = try guardWithConfiguration(file, "history", "--json", "--state-dir", lvm.scratch.path("other"))
            #expect(other.status == 0, "\(other.stderr)")
            #expect(((try JSONSerialization.jsonObject(with: Data(other.stdout.utf8)) as? [String: Any])?["runs"] as? [Any])?.isEmpty == true, "\(other.stdout)")

            // A typo in guard.conf: every command refuses it, but `guard recover` (the boot unit)
            // goes on with the valid lines, so it still finds the journal in state_dir and leaves
            // the kept run alone.
            let good = try String(contentsOfFile: file, encoding: .utf8)
            try (good + "kep = 1d\n").write(toFile: file, atomically: true, encoding: .utf8)
            let refused = try guardWithConfiguration(file, "status")
            #expect(refused.status == 2 && refused.stderr.contains("\(file):5:1: unknown setting 'kep'; did you mean 'keep'?"), "\(refused.stderr)")
            let recover = try guardWithConfiguration(file, "recover")
            #expect(recover.status == 0, "\(recover.stderr)")
            #expect(recover.stderr.contains("warning: \(file):5:1: unknown setting 'kep'"), "\(recover.stderr)")
            #expect(listing(cow).filter { $0.hasSuffix(".cow") }.count == 1, "recover kept the kept run's COW")
            try good.write(toFile: file, atomically: true, encoding: .utf8)
            let status = try #require(try JSONSerialization.jsonObject(with: Data(try guardWithConfiguration(file, "status", "--json").stdout.utf8)) as? [String: Any])
            #expect((status["runs"] as? [[String: Any]])?.first?["state"] as? String == "kept", "\(status)")

            // The kept run rolls back from its COW in cow_dir: the volume is as before the run.
            let rollback = try guardWithConfiguration(file, "rollback", "1", "--wait")
            #expect(rollback.status == 0, "\(rollback.stderr)")
            #expect(try manifest(lvm.mountPoint) == before)
            #expect(listing(cow).filter { $0.hasSuffix(".cow") }.isEmpty, "the COW file is gone after the merge")
        }

        @Test("a run's story reaches the system log as `guard[PID]: run N: ...`: phases, steps, checks and the outcome, a failure at error priority")
        func systemLog() throws {
            let lvm = try LVMFixture()
            try writeDatabase(at: lvm.mountPoint)
            let recipe = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: true), in: lvm.scratch)
            var result: CommandResult?
            let lines = try systemLogLines(scratch: lvm.scratch) {
                result = try run([guardBinary, "run", recipe, "--state-dir", lvm.scratch.path("state")], environment: guardEnvironment())
            }
            #expect(result?.status == 1, "the bad migration fails verify and is rolled back: \(result?.stderr ?? "")")
            // <PRI>... guard[PID]: MESSAGE, facility daemon (3): PRI = 24 + severity.
            func logged(_ text: String, severity: Int? = nil) -> Bool {
                lines.contains { line in
                    line.contains(" guard[") && line.contains("]: \(text)") && (severity.map { line.hasPrefix("<\(24 + $0)>") } ?? true)
                }
            }
            let story = lines.joined(separator: "\n")
            for phase in ["snapshot", "steps", "verify", "rollback"] {
                #expect(logged("run 1: phase \(phase)"), "phase \(phase) in:\n\(story)")
            }
            #expect(logged("run 1: step 1/1 'add id column' started"), "\(story)")
            #expect(logged("run 1: verify 'every row has an id and an email': exit 1", severity: 4), "\(story)")
            #expect(logged("run 1 failed (", severity: 3), "the outcome at error priority: \(story)")
        }

        @Test(
            "journald: every line natively with PRIORITY, GUARD_RUN_ID, GUARD_RECIPE, GUARD_PHASE (GUARD_VOLUME where one is named), the start and the outcome with their MESSAGE_ID; under a unit no line is printed twice"
        )
        func journaldFields() throws {
            let lvm = try LVMFixture()
            try writeDatabase(at: lvm.mountPoint)
            // The test is journald: a datagram socket at journald's path (the VM runs none).
            let path = SystemLogListener.path
            try #require(!FileManager.default.fileExists(atPath: path), "a journald is running here; this test plays journald itself")
            let listener = try SystemLogListener()
            defer { listener.close() }
            let state = lvm.scratch.path("state")
            let bad = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: true), in: lvm.scratch, name: "bad.recipe")
            let failed = try run([guardBinary, "run", bad, "--state-dir", state], environment: guardEnvironment())
            #expect(failed.status == 1, "\(failed.stderr)")
            let entries = listener.drain()
            #expect(entries.allSatisfy { $0["SYSLOG_IDENTIFIER"] == "guard" && $0["PRIORITY"] != nil && $0["MESSAGE"] != nil }, "\(entries)")
            let ofRun = entries.filter { $0["GUARD_RUN_ID"] == "1" && $0["GUARD_RECIPE"] == "website-schema-v2" }
            #expect(ofRun.count >= 8, "the run's story, each line with the run and recipe: \(entries.count) entries")
            #expect(ofRun.contains { $0["GUARD_PHASE"] == "steps" && $0["MESSAGE"]?.contains("step 1/1 'add id column' started") == true }, "\(ofRun)")
            #expect(ofRun.contains { $0["MESSAGE_ID"] == LogEvent.runStarted.messageID && $0["PRIORITY"] == "5" }, "\(ofRun)")
            #expect(ofRun.contains { $0["MESSAGE_ID"] == LogEvent.runRolledBack.messageID && $0["PRIORITY"] == "3" }, "the rollback at error priority with its id: \(ofRun)")
            #expect(ofRun.contains { $0["GUARD_VOLUME"] == lvm.device && $0["GUARD_PHASE"] == "rollback" }, "the merge names its volume: \(ofRun)")

            // Under a unit stderr is the journal (JOURNAL_STREAM names it): the lines guard sends
            // natively are not printed there again.
            let good = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: false), in: lvm.scratch, name: "good.recipe")
            let output = lvm.scratch.path("unit-stderr")
            let unit = try run(
                ["/bin/sh", "-c", "exec 2>\(output); JOURNAL_STREAM=$(stat -c %d:%i \(output)) exec \(guardBinary) run \(good) --state-dir \(state)"],
                environment: guardEnvironment())
            #expect(unit.status == 0, "\(unit.stderr)")
            let printed = try String(contentsOfFile: output, encoding: .utf8)
            let logged = listener.drain().filter { $0["GUARD_RUN_ID"] == "2" }
            #expect(logged.contains { $0["MESSAGE_ID"] == LogEvent.runSucceeded.messageID }, "\(logged)")
            for message in logged.compactMap({ $0["MESSAGE"] }) {
                let line = message.replacingOccurrences(of: "run 2: ", with: "")
                #expect(!printed.contains(line), "'\(line)' is in the journal twice (natively and on stderr):\n\(printed)")
            }
        }

        @Test("guard metrics --textfile: runs by outcome, the kept run, its COW use as `guard status` reads it, the last run's times; written whole")
        func metricsTextfile() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let recipe = try writeRecipe(tutorialRecipe(device: lvm.device, mount: lvm.mountPoint, bad: false, onSuccess: "keep 1d"), in: lvm.scratch)
            let kept = try tool("run", recipe)
            #expect(kept.status == 0, "\(kept.stderr)")
            let directory = lvm.scratch.path("textfile")
            let missing = try tool("metrics", "--textfile", directory)
            #expect(missing.status == 2 && missing.stderr.contains("--textfile \(directory) is not a directory"), "\(missing.stderr)")
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let written = try tool("metrics", "--textfile", directory)
            #expect(written.status == 0 && written.stdout.isEmpty, "\(written.stderr)")
            #expect(listing(directory) == ["guard.prom"], "no temporary file left: \(listing(directory))")
            let text = try String(contentsOfFile: "\(directory)/guard.prom", encoding: .utf8)
            var values: [String: Double] = [:]
            for line in text.split(separator: "\n") where !line.hasPrefix("#") {
                let parts = line.split(separator: " ")
                #expect(parts.count == 2, "one sample per line: \(line)")
                values[String(parts[0])] = Double(parts[1])
            }
            let status = try #require(try tool.json("status") as? [String: Any])
            let volume = try #require(((status["runs"] as? [[String: Any]])?.first?["volumes"] as? [[String: Any]])?.first)
            let labels = "{run=\"1\",recipe=\"website-schema-v2\",volume=\"\(lvm.device)\"}"
            #expect(values["guard_kept_runs"] == 1 && values["guard_open_runs{state=\"kept\"}"] == 1, "\(text)")
            #expect(values["guard_runs_started_total"] == 1 && values["guard_runs_ended_total{outcome=\"kept\"}"] == 1, "\(text)")
            #expect(values["guard_runs_ended_total{outcome=\"rolled_back\"}"] == 0 && values["guard_runs_finished_total{outcome=\"committed\"}"] == 0, "\(text)")
            let keepUntil = try #require(values["guard_run_keep_until_timestamp_seconds{run=\"1\",recipe=\"website-schema-v2\"}"], "\(text)")
            #expect(abs(keepUntil - Date().timeIntervalSince1970 - 86_400) < 600, "kept 1d: \(keepUntil)")
            let succeeded = try #require(values["guard_recipe_last_success_timestamp_seconds{recipe=\"website-schema-v2\"}"], "\(text)")
            #expect(abs(succeeded - Date().timeIntervalSince1970) < 600, "\(succeeded)")
            #expect(values["guard_recipe_last_duration_seconds{recipe=\"website-schema-v2\"}"].map { $0 > 0 && $0 < 600 } == true, "\(text)")
            #expect(values.contains { $0.key.hasPrefix("guard_build_info{version=\"") && $0.value == 1 }, "\(text)")
            let used = try #require(values["guard_snapshot_cow_used_bytes\(labels)"], "\(text)")
            #expect(used > 0 && used <= Double(volume["used_bytes"] as? Int ?? 0), "the COW use as status reads it (it can only grow in between): \(used) \(volume)")
            #expect(values["guard_snapshot_cow_size_bytes\(labels)"] == Double(volume["size_bytes"] as? Int ?? -1), "\(text)")
            #expect(values["guard_last_run_exit_code{run=\"1\",recipe=\"website-schema-v2\"}"] == 0, "\(text)")
            let started = try #require(values["guard_last_run_start_timestamp_seconds{run=\"1\",recipe=\"website-schema-v2\"}"])
            #expect(abs(started - Date().timeIntervalSince1970) < 600, "a Unix time: \(started)")
            #expect(values["guard_attention"] == 0 && values["guard_needs_reassembly"] == 0 && values["guard_merges_in_progress"] == 0, "\(text)")
            let printed = try tool("metrics")
            #expect(printed.stdout.contains("# TYPE guard_runs_ended_total counter"), "\(printed.stdout)")

            // guard-monitor writes the file itself, at once and then every minute, while the directory exists.
            try FileManager.default.removeItem(atPath: "\(directory)/guard.prom")
            let monitor = Process()
            monitor.executableURL = URL(fileURLWithPath: guardBinary)
            monitor.arguments = ["monitor", "--metrics-textfile", directory, "--state-dir", tool.stateDirectory]
            monitor.environment = guardEnvironment()
            monitor.standardOutput = FileHandle.nullDevice
            monitor.standardError = FileHandle.nullDevice
            try monitor.run()
            let deadline = Date().addingTimeInterval(60)
            while !FileManager.default.fileExists(atPath: "\(directory)/guard.prom") && Date() < deadline { usleep(200_000) }
            kill(monitor.processIdentifier, SIGTERM)
            monitor.waitUntilExit()
            let fromMonitor = (try? String(contentsOfFile: "\(directory)/guard.prom", encoding: .utf8)) ?? ""
            #expect(fromMonitor.contains("guard_kept_runs 1"), "guard monitor --metrics-textfile wrote no metrics within a minute: \(fromMonitor)")

            // guard status --watch shows the kept run again and again until it is stopped. Read
            // until it has begun a fourth view (under emulation one can take a second), then stop
            // it; the three before it are whole.
            let watch = Process()
            watch.executableURL = URL(fileURLWithPath: guardBinary)
            watch.arguments = ["status", "--watch", "--interval", "0.3", "--state-dir", tool.stateDirectory]
            watch.environment = guardEnvironment()
            let screen = Pipe()
            watch.standardOutput = screen
            try watch.run()
            let pid = watch.processIdentifier
            DispatchQueue.global().asyncAfter(deadline: .now() + 120) { kill(pid, SIGKILL) }  // only a hung watch
            let header = "guard status, every 0.3s: "
            var watched = ""
            while watched.components(separatedBy: header).count < 5 {
                let chunk = screen.fileHandleForReading.availableData
                if chunk.isEmpty { break }  // it exited
                watched += String(decoding: chunk, as: UTF8.self)
            }
            #expect(watch.isRunning, "it runs until stopped")
            kill(pid, SIGTERM)
            watch.waitUntilExit()
            #expect(watch.terminationReason == .uncaughtSignal && watch.terminationStatus == SIGTERM, "stopped by the signal, not by the 120 s bound")
            let views = watched.components(separatedBy: header)
            #expect(views.count >= 5 && views.dropFirst().dropLast().allSatisfy { $0.contains("run 1 (website-schema-v2): kept") }, "\(watched)")
            let refused = try tool("status", "--watch", "--tidy")
            #expect(refused.status == 2 && refused.stderr.contains("--watch shows the status only"), "\(refused.stderr)")

            // With --json, --watch prints JSON lines: one whole status document per line.
            let follow = Process()
            follow.executableURL = URL(fileURLWithPath: guardBinary)
            follow.arguments = ["status", "--watch", "--json", "--interval", "0.3", "--state-dir", tool.stateDirectory]
            follow.environment = guardEnvironment()
            let lines = Pipe()
            follow.standardOutput = lines
            try follow.run()
            let followed = follow.processIdentifier
            DispatchQueue.global().asyncAfter(deadline: .now() + 120) { kill(followed, SIGKILL) }
            var streamed = ""
            while streamed.filter({ $0 == "\n" }).count < 3 {
                let chunk = lines.fileHandleForReading.availableData
                if chunk.isEmpty { break }
                streamed += String(decoding: chunk, as: UTF8.self)
            }
            kill(followed, SIGTERM)
            follow.waitUntilExit()
            let documents = streamed.split(separator: "\n").prefix(3)
            #expect(documents.count == 3, "\(streamed)")
            for document in documents {
                try expectValid(String(document), arguments: ["status"])
                let parsed = try JSONSerialization.jsonObject(with: Data(document.utf8)) as? [String: Any]
                #expect(((parsed?["runs"] as? [[String: Any]])?.first?["state"] as? String) == "kept", "\(document)")
            }

            // The commit of the kept run: the counters move on, none goes down (Prometheus would read a reset).
            #expect(try tool("commit", "1").status == 0)
            let after = try tool("metrics").stdout
            func value(_ name: String) -> Double? {
                after.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
            }
            #expect(value("guard_runs_ended_total{outcome=\"kept\"}") == 1 && value("guard_runs_started_total") == 1, "\(after)")
            #expect(value("guard_runs_finished_total{outcome=\"committed\"}") == 1 && value("guard_kept_runs") == 0, "\(after)")
            #expect(!after.contains("guard_run_keep_until_timestamp_seconds{"), "no kept run, no keep-until: \(after)")
        }

        @Test("verify retries: a health URL that answers only after the step's restart passes on a later attempt; a check that never passes rolls back after its retries")
        func verifyRetriesAndHTTP() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let before = try manifest(lvm.mountPoint)
            // The "service": an HTTP server outside the volume that starts 2 s after the step
            // restarts it (the step creates the marker), as a restarted service is not ready at once.
            let site = lvm.scratch.path("site")
            try FileManager.default.createDirectory(atPath: site, withIntermediateDirectories: true)
            try "schema v3\n".write(toFile: "\(site)/health", atomically: true, encoding: .utf8)
            let marker = lvm.scratch.path("restarted")
            let port = Int.random(in: 20_000...40_000)
            let server = Process()
            server.executableURL = URL(fileURLWithPath: "/bin/sh")
            server.arguments = ["-c", "while [ ! -e \(marker) ]; do sleep 0.1; done; sleep 2; exec python3 -m http.server \(port) --bind 127.0.0.1 --directory \(site)"]
            server.standardOutput = FileHandle.nullDevice
            server.standardError = FileHandle.nullDevice
            try server.run()
            defer {
                kill(server.processIdentifier, SIGKILL)
                server.waitUntilExit()
            }
            func recipe(_ name: String, contains: String, retries: Int, interval: String) throws -> String {
                try writeRecipe(
                    """
                    name: \(name)
                    volumes:
                      - device: \(lvm.device)
                        snapshot: 20M
                    steps:
                      - name: migrate and restart
                        shell: echo migrated >> \(lvm.mountPoint)/database; touch \(marker)
                    verify:
                      - name: health
                        http: { url: "http://127.0.0.1:\(port)/health", contains: "\(contains)", timeout: 2s }
                        retries: \(retries)
                        interval: \(interval)

                    """, in: lvm.scratch, name: "\(name).recipe")
            }
            func verifyAttempts(_ run: Int) throws -> [String] {
                let shown = try #require(try tool.json("show", "\(run)") as? [String: Any])
                return (shown["steps"] as? [[String: Any]] ?? []).filter { $0["kind"] as? String == "verify" }.map { $0["termination"] as? String ?? "" }
            }

            let good = try tool("run", try recipe("ready-later", contains: "schema v3", retries: 20, interval: "500ms"))
            #expect(good.status == 0, "\(good.stderr)")
            #expect(good.stderr.contains("attempt 2 of 21"), "the check was retried: \(good.stderr)")
            let attempts = try verifyAttempts(1)
            #expect(attempts.count >= 2 && attempts.last == "exit 0", "\(attempts)")
            #expect(attempts.dropLast().allSatisfy { $0.hasPrefix("failed: cannot connect to 127.0.0.1 port \(port)") }, "the early attempts met no server: \(attempts)")
            #expect(try String(contentsOfFile: "\(lvm.mountPoint)/database", encoding: .utf8).hasSuffix("migrated\n"), "the upgrade stays")

            let afterGood = try manifest(lvm.mountPoint)
            let bad = try tool("run", try recipe("never-ready", contains: "schema v4", retries: 2, interval: "200ms"))
            #expect(bad.status == 1, "\(bad.stderr)")
            #expect(bad.stderr.contains("check 'health' failed: status 200, but the body does not contain 'schema v4' (attempt 3 of 3)"), "\(bad.stderr)")
            #expect(try verifyAttempts(2).count == 3, "one journal row per attempt")
            #expect(try manifest(lvm.mountPoint) == afterGood, "rolled back to the volume as before the second run")
            #expect(afterGood != before)
            let history = try #require(try tool.history())
            #expect(history.map { $0["outcome"] as? String ?? "" } == ["rolled_back", "committed"], "\(history)")
        }
    }
}

extension ISO8601DateFormatter {
    static var withFractions: ISO8601DateFormatter {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }
}
