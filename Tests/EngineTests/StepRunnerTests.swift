import Engine
import Foundation
import Recipe
import Testing

func shellStep(_ script: String, name: String = "step", user: String? = nil, cwd: String? = nil) -> Command {
    Command(name: name, invocation: .shell(script), workingDirectory: cwd, user: user)
}

let plainEnvironment = StepRunner.environment(recipe: [:], command: [:], run: [:])

/// Lines a step printed, collected from the runner's threads.
final class Lines: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var lines: [StepOutput] = []
    func append(_ line: StepOutput) { lock.withLock { lines.append(line) } }
    var all: [StepOutput] { lock.withLock { lines } }
}

@Suite("step runner")
struct StepRunnerTests {
    @Test("exit codes are reported", arguments: [0, 1, 3, 42])
    func exitCodes(code: Int32) async {
        let result = await StepRunner().run(shellStep("exit \(code)"), environment: plainEnvironment, timeout: nil)
        #expect(result.termination == .exited(code))
        #expect(result.succeeded == (code == 0))
        #expect(result.exitCode == code)
    }

    @Test("a step gets SIGPIPE's default back although guard ignores it: a pipeline's writer dies quietly")
    func sigpipeDefault() async {
        signal(SIGPIPE, SIG_IGN)  // as guard's entry point does
        let result = await StepRunner().run(shellStep("yes | head -c 1 >/dev/null"), environment: plainEnvironment, timeout: nil)
        #expect(result.succeeded)
        #expect(!result.stderrTail.contains("Broken pipe"), "yes was not killed by SIGPIPE: \(result.stderrTail)")
    }

    @Test("a step killed by a signal reports the signal")
    func signals() async {
        let result = await StepRunner().run(shellStep("kill -SEGV $$"), environment: plainEnvironment, timeout: nil)
        #expect(result.termination == .signaled(SIGSEGV))
        #expect(result.termination.description == "killed by SIGSEGV")
        #expect(result.exitCode == 128 + SIGSEGV)
    }

    @Test("a timeout kills the whole process group, grandchildren included")
    func timeoutKillsGrandchildren() async throws {
        let marker = "\(Int.random(in: 100_000...999_999))"
        let survived = FileManager.default.temporaryDirectory.appendingPathComponent("guard-group-\(marker)").path
        defer { try? FileManager.default.removeItem(atPath: survived) }
        let script = "sleep 300.\(marker) & (sleep 301.\(marker) &) ; sleep 302.\(marker); wait; touch \(survived)"
        // No bound on the time: a shell not killed leaves its file; a grandchild not killed, pgrep finds.
        let result = await StepRunner(killGrace: .seconds(2)).run(shellStep(script), environment: plainEnvironment, timeout: .milliseconds(800))
        #expect(result.termination == .timedOut)
        #expect(!FileManager.default.fileExists(atPath: survived), "the step ran to its end: it was not killed")
        var survivors = pgrep(marker)
        for _ in 0..<600 where !survivors.isEmpty {  // a busy machine reaps late; only a hang reaches 60 s
            try await Task.sleep(for: .milliseconds(100))
            survivors = pgrep(marker)
        }
        #expect(survivors.isEmpty, "processes left behind: \(survivors)")
    }

    @Test("a step that ignores TERM is killed after the grace period")
    func ignoresTerm() async {
        let survived = FileManager.default.temporaryDirectory.appendingPathComponent("guard-term-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: survived) }
        let started = Date()
        let result = await StepRunner(killGrace: .seconds(1)).run(
            shellStep("trap '' TERM; sleep 60 & wait; sleep 60; touch \(survived)"), environment: plainEnvironment, timeout: .milliseconds(500))
        let elapsed = Date().timeIntervalSince(started)
        #expect(result.termination == .timedOut)
        // The KILL came: a step that outlived TERM unkilled would have left its file. The lower
        // bound is the grace period (a slow machine only makes it longer).
        #expect(!FileManager.default.fileExists(atPath: survived), "the step ran to its end: no KILL came")
        #expect(elapsed >= 1.4, "TERM at 0.5 s, KILL 1 s later: \(elapsed)")
    }

    @Test("output far larger than the tail is streamed, and only the tail is kept")
    func hugeOutput() async {
        let result = await StepRunner(tailBytes: 4096).run(
            shellStep("head -c 64M /dev/zero | tr '\\\\0' x; echo; echo END; echo oops >&2"), environment: plainEnvironment, timeout: nil)
        #expect(result.succeeded)
        #expect(result.outputBytes > 64_000_000)
        #expect(result.stdoutTail.utf8.count <= 4096)
        #expect(result.stdoutTail.hasSuffix("END\n"))
        #expect(result.stderrTail == "oops\n")
    }

    @Test("output is streamed line by line with the step's name")
    func streaming() async {
        let lines = Lines()
        let runner = StepRunner(onOutput: { lines.append($0) })
        let result = await runner.run(shellStep("echo one; echo two >&2; echo three", name: "migrate"), environment: plainEnvironment, timeout: nil)
        #expect(result.succeeded)
        let out = lines.all.filter { $0.stream == .stdout }.map(\.text)
        #expect(out == ["one", "three"])
        #expect(lines.all.contains { $0.stream == .stderr && $0.text == "two" })
        #expect(lines.all.allSatisfy { $0.step == "migrate" })
    }

    @Test(
        "a step that cannot start is a failed step with the reason",
        arguments: [
            (
                Command(name: "missing", invocation: .argv(["no-such-program-guard"])),
                "program 'no-such-program-guard' not found in PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)"
            ),
            (Command(name: "missing path", invocation: .argv(["/opt/nothing/here"])), "program '/opt/nothing/here' not found"),
            (Command(name: "bad user", invocation: .argv(["true"]), user: "no-such-user-guard"), "user 'no-such-user-guard' does not exist"),
            (Command(name: "bad cwd", invocation: .argv(["true"]), workingDirectory: "/nonexistent/dir"), "working directory /nonexistent/dir does not exist"),
        ])
    func cannotStart(command: Command, reason: String) async {
        let result = await StepRunner().run(command, environment: plainEnvironment, timeout: nil)
        #expect(result.termination == .failedToStart(reason))
        #expect(!result.succeeded)
        #expect(result.exitCode == nil)
    }

    @Test("the environment is clean: guard's own variables do not leak, the recipe's are set")
    func cleanEnvironment() async {
        setenv("GUARD_LEAK_CHECK", "leaked", 1)
        let environment = StepRunner.environment(recipe: ["FROM_RECIPE": "r"], command: ["FROM_STEP": "s"], run: ["GUARD_RUN_ID": "7"])
        let result = await StepRunner().run(shellStep("env | sort"), environment: environment, timeout: nil)
        #expect(result.succeeded)
        #expect(!result.stdoutTail.contains("GUARD_LEAK_CHECK"))
        #expect(result.stdoutTail.contains("FROM_RECIPE=r\n"))
        #expect(result.stdoutTail.contains("FROM_STEP=s\n"))
        #expect(result.stdoutTail.contains("GUARD_RUN_ID=7\n"))
        #expect(result.stdoutTail.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"))
    }

    @Test("a step runs as the user the recipe names", .enabled(if: getuid() == 0, "needs root to switch user"))
    func runsAsUser() async {
        let result = await StepRunner().run(shellStep("id -u; echo $HOME", user: "nobody", cwd: "/"), environment: plainEnvironment, timeout: nil)
        #expect(result.succeeded, "\(result.stderrTail)")
        #expect(result.stdoutTail == "65534\n/nonexistent\n")
    }

    @Test("a stop request ends the step like a timeout, with its reason")
    func stopRequest() async {
        let survived = FileManager.default.temporaryDirectory.appendingPathComponent("guard-stop-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: survived) }
        let started = Date()
        let result = await StepRunner().run(
            shellStep("sleep 120; touch \(survived)"), environment: plainEnvironment, timeout: nil,
            stop: {
                Date().timeIntervalSince(started) > 0.5 ? "the COW is 91% full" : nil
            })
        #expect(result.termination == .stopped("the COW is 91% full"))
        #expect(!FileManager.default.fileExists(atPath: survived), "the step ran to its end: the stop did not end it")
    }

    @Test("steps start with default signal handling although guard ignores SIGINT and SIGTERM while it runs them")
    func stepsGetDefaultSignals() async {
        // `guard run` ignores both (its Ctrl-C handler stops the steps and rolls back); a step, and
        // a daemon a step starts, must not inherit that, or TERM would not stop them.
        let previousTerm = signal(SIGTERM, SIG_IGN)
        let previousInt = signal(SIGINT, SIG_IGN)
        let result = await StepRunner().run(shellStep("grep SigIgn /proc/self/status"), environment: plainEnvironment, timeout: nil)
        signal(SIGTERM, previousTerm)
        signal(SIGINT, previousInt)
        let mask = UInt64(result.stdoutTail.split(separator: "\t").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "", radix: 16)
        #expect(mask != nil, "\(result.stdoutTail)")
        #expect((mask ?? 0) & (1 << (UInt64(SIGTERM) - 1) | 1 << (UInt64(SIGINT) - 1)) == 0, "ignored in the step: \(result.stdoutTail)")
    }
}

func pgrep(_ pattern: String) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return names.filter { Int($0) != nil }.compactMap { pid in
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return nil }
        let line = String(decoding: data.map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
        return line.contains(pattern) ? "\(pid): \(line)" : nil
    }
}

@Suite("verify checks")
struct StrictVerifyTests {
    static let recipe = """
        name: strict
        volumes:
          - device: /dev/mapper/vg-www
            snapshot: 8M
        steps:
          - name: middle
            shell: |
              false
              echo carried on
        verify:
          - name: middle
            shell: |
              false
              echo carried on
          - name: pipe
            shell: false | cat
        """

    @Test("a shell check that fails in its middle fails (errexit); a step's script keeps its own semantics")
    func errexit() async throws {
        let recipe = try RecipeParser.parse(text: Self.recipe, path: "strict.recipe").get()
        let check = await StepRunner().run(recipe.verify[0], environment: plainEnvironment, timeout: nil)
        #expect(check.termination == .exited(1), "the check stopped at `false`")
        #expect(!check.stdoutTail.contains("carried on"), "\(check.stdoutTail)")
        let step = await StepRunner().run(recipe.steps[0], environment: plainEnvironment, timeout: nil)
        #expect(step.termination == .exited(0), "a step's script is run as written")
        #expect(step.stdoutTail.contains("carried on"))
    }

    @Test("a failing pipeline fails a check where the shell has pipefail")
    func pipefail() async throws {
        let recipe = try RecipeParser.parse(text: Self.recipe, path: "strict.recipe").get()
        let probe = await StepRunner().run(shellStep("set -o pipefail"), environment: plainEnvironment, timeout: nil)
        let check = await StepRunner().run(recipe.verify[1], environment: plainEnvironment, timeout: nil)
        // Debian 12's dash has no pipefail: there the pipeline's status is cat's, as the shell defines.
        #expect(check.succeeded == !probe.succeeded, "pipefail \(probe.succeeded ? "available" : "absent"): \(check.termination)")
    }
}

@Suite("run cgroup", .enabled(if: RunCgroup.mountPoint != nil && getuid() == 0, "needs cgroup v2 and root"))
struct RunCgroupTests {
    @Test("a step that escapes its process group (setsid) is still in the run's cgroup: killed when the step is stopped, or with the cgroup")
    func escapees() async throws {
        let token = "test\(UInt32.random(in: 0...UInt32.max))"
        let cgroup = try #require(try RunCgroup.create(token: token))
        defer {
            for pid in cgroup.processes { kill(pid, SIGKILL) }
            cgroup.removeIfEmpty()
        }
        let marker = "\(Int.random(in: 100_000...999_999))"
        // Stopped by its timeout: the setsid'd sleep goes with it.
        let stopped = await StepRunner(killGrace: .seconds(1)).run(
            shellStep("setsid sleep 310.\(marker) </dev/null >/dev/null 2>&1 & sleep 311.\(marker)"), environment: plainEnvironment, timeout: .milliseconds(800),
            cgroup: try cgroup.child("step-1"))
        #expect(stopped.termination == .timedOut)
        #expect(pgrep("310.\(marker)").isEmpty, "the escapee was killed with the step's cgroup")
        // Finished normally: what it left in a session of its own lives on (a daemon it started)
        // until the run's cgroup is killed, as a rollback does.
        let finished = await StepRunner().run(
            shellStep("setsid sleep 312.\(marker) </dev/null >/dev/null 2>&1 & sleep 0.3"), environment: plainEnvironment, timeout: nil, cgroup: try cgroup.child("step-2"))
        #expect(finished.succeeded)
        try await Task.sleep(for: .milliseconds(200))
        #expect(!pgrep("312.\(marker)").isEmpty, "a finished step's daemon is left alone")
        #expect(cgroup.processes.count == 1)
        // A program run without a shell is in its cgroup from its first instruction: created there.
        let direct = await StepRunner().run(
            Command(name: "where", invocation: .argv(["cat", "/proc/self/cgroup"])), environment: plainEnvironment, timeout: nil, cgroup: try cgroup.child("step-3"))
        #expect(direct.succeeded, "\(direct.stderrTail)")
        #expect(direct.stdoutTail.split(separator: "\n").contains { $0.hasPrefix("0::") && $0.hasSuffix("/guard/\(token)/step-3") }, "\(direct.stdoutTail)")
        #expect(await cgroup.killAll() == 1)
        #expect(pgrep("312.\(marker)").isEmpty)
        cgroup.removeIfEmpty()
        #expect(!FileManager.default.fileExists(atPath: cgroup.path))
    }
}
