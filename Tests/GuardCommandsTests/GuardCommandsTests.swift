import Foundation
import Journal
import Testing

@testable import Engine
@testable import GuardCommands

/// The built `guard` executable next to the test bundle.
var guardExecutable: String {
    let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    return URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent("guard").path
}

struct Output {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a program to its end on a Dispatch thread, not on one of Swift's cooperative threads:
/// the tests run in parallel, and a cooperative thread blocked on a child process would delay
/// the other tests' timers (the step runner's timeouts are measured).
/// `input`: written to the program's stdin (which is otherwise empty); `directory`: its working directory.
func runProgram(_ path: String, _ arguments: [String], environment: [String: String], input: String? = nil, in directory: String? = nil) async throws -> Output {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async {
            continuation.resume(
                with: Result {
                    let process = Process()
                    process.executableURL = URL(fileURLWithPath: path)
                    process.arguments = arguments
                    process.environment = environment
                    let out = Pipe()
                    let err = Pipe()
                    process.standardOutput = out
                    process.standardError = err
                    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
                    let stdin = Pipe()
                    process.standardInput = input == nil ? FileHandle.nullDevice : stdin
                    try process.run()
                    if let input {
                        stdin.fileHandleForWriting.write(Data(input.utf8))
                        try stdin.fileHandleForWriting.close()
                    }
                    // Both pipes at once, or a chatty child blocks on a full one.
                    nonisolated(unsafe) var outData = Data()
                    let group = DispatchGroup()
                    group.enter()
                    DispatchQueue.global().async {
                        outData = out.fileHandleForReading.readDataToEndOfFile()
                        group.leave()
                    }
                    let errData = err.fileHandleForReading.readDataToEndOfFile()
                    group.wait()
                    process.waitUntilExit()
                    return Output(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData, as: UTF8.self))
                })
        }
    }
}

/// Runs the built guard. No site configuration unless a test names one: an
/// /etc/guard/guard.conf on this machine must not change the results.
func guardCommand(_ arguments: [String], environment: [String: String] = [:]) async throws -> Output {
    let merged = ProcessInfo.processInfo.environment.merging(["GUARD_CONFIG": "/dev/null"]) { $1 }.merging(environment) { $1 }
    return try await runProgram(guardExecutable, arguments, environment: merged)
}

func stateWithRuns() throws -> String {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-cli-\(UInt32.random(in: 0...UInt32.max))").path
    let journal = try Journal.open(path: "\(directory)/journal.sqlite")
    for (index, outcome) in [RunOutcome.rolledBack, .committed].enumerated() {
        var run = try journal.insert(
            RunRecord(
                token: "0000000\(index)", recipeName: "website-schema-v2", recipePath: "/r", recipeSHA256: "s", recipeText: "name: website-schema-v2", host: "h", user: "u", pid: 1,
                startedAt: 1_764_000_000 + Double(index) * 100))
        var snapshot = try journal.insert(
            SnapshotRecord(
                runID: run.id!, volumeIndex: 0, volume: "/dev/mapper/datadisks-website", mountPoint: "/mnt/website", originName: "datadisks-website", originUUID: "LVM-x",
                originDevice: "254:0", originTable: "0 204800 linear 7:0 2048", originBytes: 100 << 20, cowPath: "/var/lib/guard/cow/x.cow", cowKind: "file", sizeBytes: 25 << 20,
                chunkBytes: 4096, state: outcome == .committed ? .committed : .merged, stack: "{}"))
        snapshot.peakUsedBytes = 3 << 20
        try journal.update(snapshot)
        run.outcome = outcome
        run.state = .finished
        run.exitCode = outcome == .committed ? 0 : 1
        run.finishedAt = run.startedAt + 12.5
        run.suspendMicroseconds = 1234
        try journal.update(run)
    }
    return directory
}

@Suite("guard command line")
struct GuardCommandsTests {
    @Test("completion of a run argument: the journal's runs, newest first, from the state directory the command line names; nothing without a journal")
    func runCompletion() throws {
        let state = try stateWithRuns()
        #expect(Completions.runNumbers(words: ["guard", "rollback", "--state-dir", state, ""]) == ["2", "1"])
        #expect(Completions.runNumbers(words: ["guard", "show", "--state-dir", "/nonexistent-\(UInt32.random(in: 0...UInt32.max))"]) == [])
    }

    @Test("a reader that is gone (a closed pipe) costs guard its output, never its exit status: no crash")
    func closedOutput() async throws {
        let state = try stateWithRuns()
        // Both ends of a pipe whose reader is closed, as after `guard … | head` or a killed tee:
        // every write fails with EPIPE (guard ignores SIGPIPE).
        func run(_ arguments: [String]) throws -> Process {
            let pipe = Pipe()
            try pipe.fileHandleForReading.close()
            let process = Process()
            process.executableURL = URL(fileURLWithPath: guardExecutable)
            process.arguments = arguments
            process.environment = ProcessInfo.processInfo.environment.merging(["GUARD_CONFIG": "/dev/null"]) { $1 }
            process.standardOutput = pipe
            process.standardError = pipe
            try process.run()
            process.waitUntilExit()
            return process
        }
        let history = try run(["history", "--state-dir", state])
        #expect(history.terminationReason == .exit && history.terminationStatus == 0, "history: \(history.terminationReason) \(history.terminationStatus)")
        let json = try run(["history", "--json", "--state-dir", state])
        #expect(json.terminationReason == .exit && json.terminationStatus == 0, "history --json: \(json.terminationReason) \(json.terminationStatus)")
        let refused = try run(["check", "/nonexistent/website.recipe"])
        #expect(refused.terminationReason == .exit && refused.terminationStatus == 2, "check: \(refused.terminationReason) \(refused.terminationStatus)")
    }

    @Test("history --json has the documented fields")
    func historyJSON() async throws {
        let state = try stateWithRuns()
        let output = try await guardCommand(["history", "--json", "--state-dir", state])
        #expect(output.status == 0, "\(output.stderr)")
        let document = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])
        let runs = try #require(document["runs"] as? [[String: Any]])
        #expect(runs.count == 2)
        let newest = runs[0]
        for key in ["id", "token", "recipe", "state", "outcome", "started_at", "finished_at", "duration_seconds", "exit_code", "suspend_us", "suspend_seconds", "snapshots"] {
            #expect(newest[key] != nil, "history --json has \(key)")
        }
        #expect(newest["outcome"] as? String == "committed")
        #expect(runs[1]["outcome"] as? String == "rolled_back")
        #expect(newest["duration_seconds"] as? Double == 12.5)
        #expect(newest["started_at"] as? String == "2025-11-24T16:01:40.000Z")
        let snapshot = try #require((newest["snapshots"] as? [[String: Any]])?.first)
        #expect(snapshot["volume"] as? String == "/dev/mapper/datadisks-website")
        #expect(snapshot["size_bytes"] as? Int == 25 << 20)
        #expect(snapshot["peak_used_bytes"] as? Int == 3 << 20)
        #expect(snapshot["suspend_us"] as? Int == 1234)
    }

    @Test("show --json has phases, steps, snapshots and events")
    func showJSON() async throws {
        let state = try stateWithRuns()
        let output = try await guardCommand(["show", "2", "--json", "--state-dir", state])
        #expect(output.status == 0, "\(output.stderr)")
        let run = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])
        for key in ["phases", "steps", "snapshots", "events", "recipe_sha256", "host", "user"] { #expect(run[key] != nil, "\(key)") }
        let byToken = try await guardCommand(["show", "00000001", "--state-dir", state])
        #expect(byToken.status == 0 && byToken.stdout.contains("run 2 (00000001)"), "\(byToken.stdout)")
    }

    @Test("plain output has no escape codes off a terminal or with NO_COLOR", arguments: [[:], ["NO_COLOR": "1"]])
    func noEscapes(environment: [String: String]) async throws {
        let state = try stateWithRuns()
        for arguments in [["history"], ["show", "1"], ["check", "--syntax-only", "Recipes/website-migration-good.recipe"]] {
            let output = try await guardCommand(arguments + ["--state-dir", state], environment: environment)
            #expect(output.status == 0, "\(arguments): \(output.stderr)")
            #expect(!output.stdout.contains("\u{1B}") && !output.stderr.contains("\u{1B}"), "\(arguments)")
        }
        let history = try await guardCommand(["history", "--state-dir", state])
        #expect(history.stdout.contains("website-schema-v2"))
        #expect(history.stdout.contains("rolled_back"))
        #expect(history.stdout.split(separator: "\n").first?.hasPrefix("RUN  RECIPE") == true)
    }

    @Test(
        "usage errors exit 2 with one clear line on stderr and nothing on stdout",
        arguments: [
            (["rollback", "999"], "there is no run '999'"),
            (["show", "42"], "there is no run '42'"),
            (["check", "/nonexistent.recipe"], "/nonexistent.recipe:1:1: the recipe does not exist"),
            (["history", "--limit", "x"], "--limit"),
            (["frobnicate"], "Unexpected argument 'frobnicate'"),
        ])
    func usageErrors(arguments: [String], message: String) async throws {
        let state = try stateWithRuns()
        let output = try await guardCommand(arguments.first == "frobnicate" ? arguments : arguments + ["--state-dir", state])
        #expect(output.status == 2, "\(arguments): \(output.stderr)")
        #expect(output.stderr.contains(message), "\(output.stderr)")
        #expect(output.stdout.isEmpty)
    }

    @Test("an invalid recipe exits 2 with every error and its line")
    func invalidRecipe() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UInt32.random(in: 0...UInt32.max)).recipe").path
        try "name: x\nvolumes:\n  - device: /dev/mapper/a\n    snapshot: 25\nstpes: []\n".write(toFile: path, atomically: true, encoding: .utf8)
        let output = try await guardCommand(["check", "--syntax-only", path])
        #expect(output.status == 2)
        #expect(output.stderr.contains("\(path):4:15: volumes[1].snapshot: the size '25' has no unit; did you mean 25M?"), "\(output.stderr)")
        #expect(output.stderr.contains("\(path):5:1: unknown key 'stpes'"), "\(output.stderr)")
        #expect(output.stderr.contains("3 errors in"), "\(output.stderr)")
    }

    @Test("guard.conf: flags win over GUARD_STATE_DIR, which wins over the file, which wins over the built-in default")
    func configurationPrecedence() async throws {
        let state = try stateWithRuns()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-conf-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let file = directory + "/guard.conf"
        try "state_dir = \(state)\nkeep = 3d\nextend = at 70% by 10% max 40%\n".write(toFile: file, atomically: true, encoding: .utf8)
        let clean = ["GUARD_STATE_DIR": ""]

        // The file's state_dir is where history finds the journal.
        let fromFile = try await guardCommand(["history", "--json", "--config", file], environment: clean)
        #expect(fromFile.status == 0, "\(fromFile.stderr)")
        #expect(((try JSONSerialization.jsonObject(with: Data(fromFile.stdout.utf8)) as? [String: Any])?["runs"] as? [Any])?.count == 2)
        let viaVariable = try await guardCommand(["history", "--json"], environment: ["GUARD_CONFIG": file, "GUARD_STATE_DIR": ""])
        #expect(viaVariable.stdout == fromFile.stdout)

        func settings(_ arguments: [String], _ environment: [String: String]) async throws -> [String: Any] {
            let output = try await guardCommand(["config", "--json"] + arguments, environment: environment)
            #expect(output.status == 0, "\(output.stderr)")
            return try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])
        }
        func value(_ object: [String: Any], _ key: String) -> (String?, String?) {
            let setting = object[key] as? [String: Any]
            return (setting?["value"] as? String, setting?["source"] as? String)
        }
        let file1 = try await settings(["--config", file], clean)
        #expect(value(file1, "state_dir") == (state, file))
        #expect(value(file1, "cow_dir") == (state + "/cow", "state_dir/cow"))
        #expect(value(file1, "keep") == ("3d", file))
        #expect(value(file1, "extend") == ("at 70% by 10% max 40%", file))
        #expect(file1["config_file"] as? String == file)
        let variable = try await settings(["--config", file], ["GUARD_STATE_DIR": directory + "/env"])
        #expect(value(variable, "state_dir") == (directory + "/env", "GUARD_STATE_DIR"))
        let flag = try await settings(["--config", file, "--state-dir", directory + "/flag"], ["GUARD_STATE_DIR": directory + "/env"])
        #expect(value(flag, "state_dir") == (directory + "/flag", "--state-dir"))
        #expect(value(flag, "keep") == ("3d", file), "a flag for one setting leaves the file's others in effect")
        let none = try await settings(["--config", "/dev/null"], clean)
        #expect(value(none, "state_dir") == ("/var/lib/guard", "built-in default"))
        #expect(value(none, "keep").0 == nil && value(none, "extend").0 == nil)
    }

    @Test("a bad guard.conf stops every command with exit 2, naming its line, and nothing on stdout")
    func badConfiguration() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-conf-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let file = directory + "/guard.conf"
        try "keep = 7d\nstate-dir = /srv\n".write(toFile: file, atomically: true, encoding: .utf8)
        for arguments in [["history"], ["config"], ["status"]] {
            let output = try await guardCommand(arguments, environment: ["GUARD_CONFIG": file])
            #expect(output.status == 2)
            #expect(output.stdout.isEmpty)
            #expect(output.stderr.contains("\(file):2:1: unknown setting 'state-dir'; did you mean 'state_dir'?"), "\(output.stderr)")
        }
        let missing = try await guardCommand(["history", "--config", directory + "/missing.conf"])
        #expect(missing.status == 2 && missing.stderr.contains("missing.conf:1:1: the configuration file does not exist"), "\(missing.stderr)")
    }

    @Test("--version and help answer")
    func versionAndHelp() async throws {
        let version = try await guardCommand(["--version"])
        #expect(version.status == 0 && version.stdout.hasPrefix("0."))
        let help = try await guardCommand(["help", "run"])
        #expect(help.status == 0)
        #expect(help.stdout.contains("Exit codes:") && help.stdout.contains("Examples:"))
    }
}

/// Issue 19: `guard assess`, the checks after the reboot into an upgrade (the failing path,
/// which rolls back, is in the boot suite).
@Suite("guard assess")
struct AssessTests {
    func keptRun(boots: Int, check: String = "test \\\"$GUARD_PHASE\\\" = verify_after_boot") throws -> (state: String, runID: Int64) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-assess-\(UInt32.random(in: 0...UInt32.max))").path
        let journal = try Journal.open(path: "\(directory)/journal.sqlite")
        let recipe = """
            name: system-upgrade
            volumes:
              - device: /dev/vg0/root
                mount: /
                snapshot: { size: 4G, cow: /dev/vg0/rootcow }
            steps: [[apt-get, -y, full-upgrade]]
            verify_after_boot:
              - name: the booted system answers
                run: [sh, -c, "\(check)"]
            on_success: keep

            """
        var run = try journal.insert(
            RunRecord(
                token: "00000aa1", recipeName: "system-upgrade", recipePath: "/r", recipeSHA256: "s", recipeText: recipe, host: "h", user: "u", pid: 1, startedAt: 1_764_000_000))
        run.state = .kept
        run.outcome = .kept
        run.decision = .keep
        try journal.update(run)
        try journal.event(run.id!, .intent, "boot-assessment", "pending", at: 1_764_000_100)
        for boot in 0..<boots { try journal.event(run.id!, .note, "boot-attempt", "boot \(boot + 1) of 2", at: 1_764_000_200) }
        return (directory, run.id!)
    }

    @Test("after a boot into the upgrade the checks run, pass, are journaled, and the run stays kept")
    func passes() async throws {
        let (state, id) = try keptRun(boots: 1)
        defer { try? FileManager.default.removeItem(atPath: state) }
        let output = try await guardCommand(["assess", "--state-dir", state])
        #expect(output.status == 0, "\(output.stderr)")
        #expect(output.stdout.contains("run \(id): verify_after_boot passed after boot 1"))
        let journal = try Journal.open(path: "\(state)/journal.sqlite")
        #expect(try journal.run(id: id)?.state == .kept)
        let assessed = try journal.events(runID: id).filter { $0.action == "boot-assessed" }
        #expect(assessed.map(\.detail) == ["passed: 1 check(s) after boot 1"])
        let steps = try journal.steps(runID: id).filter { $0.kind == "verify_after_boot" }
        #expect(steps.map(\.name) == ["the booted system answers"])
        #expect(steps.first?.exitCode == 0)
        // Assessed once: a second `guard assess` finds nothing to do.
        let again = try await guardCommand(["assess", "--state-dir", state])
        #expect(again.stdout.contains("no run waits for its boot assessment"))
    }

    @Test(
        "checks that fail while the rollback cannot be started: exit 3, the failure journaled once, the rollback retried by the next guard assess (without the checks) and decided by the next boot"
    )
    func failedRollbackRetried() async throws {
        // On this host guard cannot reach device-mapper, so the rollback fails to start.
        let (state, id) = try keptRun(boots: 1, check: "exit 7")
        defer { try? FileManager.default.removeItem(atPath: state) }
        let output = try await guardCommand(["assess", "--state-dir", state])
        #expect(output.status == 3, "\(output.stdout)\(output.stderr)")
        #expect(output.stdout.contains("run \(id): verify_after_boot failed ('the booted system answers' exit 7), and its rollback could not be started"), "\(output.stdout)")
        #expect(output.stdout.contains("the next `guard assess` or boot tries the rollback again"))
        let journal = try Journal.open(path: "\(state)/journal.sqlite")
        #expect(try journal.run(id: id)?.state == .kept)
        #expect(try journal.run(id: id)?.decision == .keep)

        let again = try await guardCommand(["assess", "--state-dir", state])
        #expect(again.status == 3)
        #expect(again.stdout.contains("run \(id): verify_after_boot failed ('the booted system answers' exit 7), and its rollback could not be started"), "\(again.stdout)")
        #expect(try journal.events(runID: id).filter { $0.action == "boot-assessed" }.map(\.detail) == ["failed: 'the booted system answers' exit 7"])
        #expect(try journal.steps(runID: id).filter { $0.kind == "verify_after_boot" }.count == 1, "the checks ran once")

        // The next boot's early recovery decides the rollback (and carries it out).
        let actions = try BootAssessment.countBoot(journal: journal, at: 1_764_001_000)
        #expect(actions == ["run \(id): its boot assessment failed earlier ('the booted system answers' exit 7); rolling it back"])
        #expect(try journal.run(id: id)?.decision == .rollback)
        #expect(try journal.events(runID: id).last?.action == "rollback-at-boot")
        #expect(try BootAssessment.awaiting(journal).isEmpty)
    }

    @Test("before the reboot into the upgrade: nothing runs, the run waits")
    func notRebooted() async throws {
        let (state, id) = try keptRun(boots: 0)
        defer { try? FileManager.default.removeItem(atPath: state) }
        let output = try await guardCommand(["assess", "--state-dir", state])
        #expect(output.status == 0, "\(output.stderr)")
        #expect(output.stdout.contains("run \(id): not rebooted into yet"))
        let journal = try Journal.open(path: "\(state)/journal.sqlite")
        #expect(try journal.events(runID: id).filter { $0.action == "boot-assessed" }.isEmpty)
    }
}
