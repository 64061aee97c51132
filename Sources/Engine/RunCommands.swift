import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

extension RunBody {
    // MARK: Commands

    /// Runs hooks in order; returns the first failure.
    func runCommands(_ commands: [Command], kind: String, runner: StepRunner) async -> String? {
        for (index, command) in commands.enumerated() {
            if let problem = await runOne(command, kind: kind, index: index, count: commands.count, runner: runner, stop: nil) {
                return "\(kind) '\(command.name)' \(problem)"
            }
        }
        return nil
    }

    func runResumeHooks(runner: StepRunner) async {
        guard !recipe.resume.isEmpty else { return }
        reporter.phase("resume", run: runID)
        let phase = try? journal.beginPhase(runID, "resume", at: timestamp())
        let failed = await runCommands(recipe.resume, kind: "resume", runner: runner)
        if let failed { reporter.warning("\(failed); carrying on") }
        if let phase { try? journal.endPhase(phase, status: failed == nil ? .done : .failed, detail: failed, at: timestamp()) }
    }

    /// Runs one command, journaling it; returns nil on success or how it failed. A verify
    /// check with `retries:` runs again after `interval:` until it passes or has no tries
    /// left; each attempt is a row of its own in the journal. A stopped run does not retry.
    func runOne(_ command: Command, kind: String, index: Int, count: Int, runner: StepRunner, stop: (@Sendable () -> String?)?) async -> String? {
        let attempts = kind == "verify" ? command.retries + 1 : 1
        var problem: String?
        for attempt in 1...attempts {
            if attempt > 1 {
                reporter.note("\(kind) '\(command.name)' \(problem ?? "failed"); attempt \(attempt) of \(attempts) in \(Units.formatDuration(command.interval))")
                let resume = ContinuousClock.now + command.interval
                while ContinuousClock.now < resume {
                    if let reason = stop?() { return "\(problem ?? "failed") (no more attempts: \(reason))" }
                    try? await Task.sleep(for: min(.milliseconds(100), resume - ContinuousClock.now))
                }
            }
            let (passed, termination) = await attemptOne(command, kind: kind, index: index, count: count, runner: runner, stop: stop)
            if passed { return nil }
            problem = attempts > 1 ? "\(termination.description) (attempt \(attempt) of \(attempts))" : termination.description
            if case .stopped = termination { break }
        }
        return problem
    }

    /// One attempt of a command, journaled as a step row.
    func attemptOne(_ command: Command, kind: String, index: Int, count: Int, runner: StepRunner, stop: (@Sendable () -> String?)?) async -> (Bool, StepTermination) {
        reporter.stepStarted(kind: kind, index: index, count: count, name: command.name)
        let record = try? journal.insert(StepRecord(runID: runID, kind: kind, position: index, name: command.name, argv: command.invocation.arguments, startedAt: timestamp()))
        let environment = StepRunner.environment(recipe: recipe.environment, command: command.environment, run: runEnvironment(phase: kind))
        let timeout = command.timeout ?? (kind == "step" || kind == "verify" ? recipe.defaultTimeout : nil)
        let result = await runner.run(command, environment: environment, timeout: timeout, stop: stop, cgroup: try? cgroup?.child("\(kind)-\(index + 1)"))
        if let started = record { try? journal.update(started.finished(result)) }
        reporter.stepFinished(kind: kind, result: result)
        return (result.succeeded, result.termination)
    }

    /// GUARD_* variables: the run, and each volume's device, mount point and snapshot.
    func runEnvironment(phase: String) -> [String: String] {
        var environment = ["GUARD_RUN_ID": "\(runID)", "GUARD_RUN_TOKEN": run.token, "GUARD_RECIPE": recipe.name, "GUARD_PHASE": phase]
        for volume in plan.volumes {
            environment["GUARD_VOLUME_\(volume.index)_DEVICE"] = volume.originPath
            if let mount = volume.mountPoint { environment["GUARD_VOLUME_\(volume.index)_MOUNT"] = mount }
            environment["GUARD_VOLUME_\(volume.index)_SNAPSHOT"] =
                "/dev/mapper/" + StackIdentity(runToken: run.token, volumeIndex: volume.index).name(.snap, originName: volume.info.name)
        }
        return environment
    }

    // MARK: COW watching

    func makeWatcher(engine: SnapshotEngine, stacks: [SnapshotStack], cowStop: StopFlag) -> CowWatcher {
        let reporter = self.reporter
        let journal = self.journal
        let runID = self.runID
        let records = self.records
        let names = plan.volumes.map { $0.spec.device }
        let context = self.context
        let dm = engine.dm
        let lastSampleAt = LockedValue<[Int: Double]>([:])
        return CowWatcher(
            engine: engine, stacks: stacks, policies: plan.volumes.map(\.extensionPolicy), stopThreshold: recipe.stopAtFill,
            interval: .milliseconds(250)
        ) { event in
            switch event {
            case .sample(let sample):
                guard let usage = sample.status.usage else { return }
                // Against the snapshot's size: the fuse reserve is not the admin's to plan with.
                let size = sample.sizeBytes
                reporter.cow(volume: names[sample.volumeIndex], usedBytes: usage.allocatedBytes, sizeBytes: size)
                let due = lastSampleAt.withLock { last -> Bool in
                    if let previous = last[sample.volumeIndex], sample.elapsed - previous < 2 { return false }
                    last[sample.volumeIndex] = sample.elapsed
                    return true
                }
                if due, let id = records[sample.volumeIndex].id {
                    try? journal.addSamples([CowSampleRecord(snapshotID: id, at: sample.elapsed, usedBytes: Int64(usage.allocatedBytes), sizeBytes: Int64(size))])
                }
            case .extended(let index, let grown):
                let size = grown.budgetBytes
                reporter.note("the snapshot of \(names[index]) grew to \(formatBytes(size))")
                try? journal.event(runID, .result, "extend", "\(names[index]) to \(size) bytes")
            case .nearlyFull(let index, let fill):
                let reason = "the snapshot of \(names[index]) is \(Int(fill * 100))% full and cannot grow"
                cowStop.set(reason)
                try? journal.event(runID, .error, "cow-full", reason)
            case .fusing(let index, let fill):
                // Journaled first, but never waited on: the fuse only refuses writes, recovery
                // reads it from the kernel's table, and a journal that fails must not cost the rollback.
                reporter.warning(
                    "the snapshot of \(names[index]) is \(Int(fill * 100))% full and cannot grow; \(names[index]) now refuses writes until the rollback (guard's fuse)")
                try? journal.event(runID, .intent, "fuse", "\(names[index]) at \(Int(fill * 100))%")
            case .fused(let index, let fill, let microseconds):
                cowStop.set("the snapshot of \(names[index]) is \(Int(fill * 100))% full and cannot grow")
                try? journal.event(runID, .result, "fuse", "\(names[index]) refuses writes (suspended \(microseconds) µs)")
            case .invalidated(let index, let status):
                let reason = "the snapshot of \(names[index]) became \(status) (its COW overflowed)"
                cowStop.set(reason)
                try? journal.event(runID, .error, "cow-invalid", reason)
            case .bypassed(let index, let bypass):
                cowStop.set("the snapshot of \(names[index]) went stale: \(bypass)")
                let watch = OriginWatch(context: context, journal: journal, engine: SnapshotEngine(dm: dm))
                do { _ = try watch.recordBypass(runID: runID, record: records[index], stack: stacks[index], bypass: bypass) } catch {
                    reporter.warning("the table of \(names[index]) was replaced by another tool (\(bypass)), and guard could not record it: \(error)")
                }
            case .error(let index, let message):
                reporter.log("COW watch of \(names[index]): \(message)")
            }
        }
    }

    mutating func recordWatch(_ watcher: CowWatcher, stacks: [SnapshotStack]) {
        let peaks = watcher.peakBytes
        for index in records.indices {
            records[index] = (try? journal.snapshots(runID: runID).first { $0.volumeIndex == index }) ?? records[index]
            records[index].peakUsedBytes = Int64(stacks[index].changedBytes(used: peaks[index]))
            records[index].usedAtEndBytes = records[index].peakUsedBytes
            records[index].sizeBytes = Int64(stacks[index].budgetBytes)
            records[index].stack = encode(stacks[index])
            try? journal.update(records[index])
        }
    }
}

/// A recipe read as guard runs it: once, through one descriptor that follows no symbolic link
/// in its last component, so the text checked is the text parsed, run and journaled; with the
/// reason, if any, someone other than root could have changed it (guard runs it as root).
public enum RecipeFile {
    /// The largest recipe guard reads (1 MiB).
    public static let sizeLimit = 1 << 20

    /// What to do about a recipe others could change (a checkout owned by a normal user is the
    /// usual case): commands that work as written, a copy only root can change, or the flag.
    public static func unsafeAdvice(_ path: String) -> String {
        let name = path.split(separator: "/").last.map(String.init) ?? "upgrade.recipe"
        return
            "copy it where only root can change it (`sudo install -D -o root -g root -m 0644 \(path) /etc/guard/\(name)`) and run that copy, or pass --allow-unsafe-recipe if everyone who can write it is trusted"
    }

    /// - Returns: the recipe or every error in it, and why it is unsafe to run as root (nil: only
    ///   root can change the file and the directories above it).
    public static func load(_ path: String) -> (recipe: Result<Recipe, RecipeErrors>, problem: String?) {
        func failure(_ message: String) -> Result<Recipe, RecipeErrors> {
            .failure(RecipeErrors(errors: [RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: message)]))
        }
        let contents: TrustedFiles.Contents
        do {
            contents = try TrustedFiles.read(path, what: "the recipe", limit: sizeLimit)
        } catch {
            let reason = error.code == .notFound ? "the recipe does not exist" : "the recipe cannot be read: \(error)"
            return (failure(reason), nil)
        }
        guard let text = String(validating: contents.bytes, as: UTF8.self) else {
            return (failure("the recipe cannot be read as UTF-8 text"), contents.problem)
        }
        return (RecipeParser.parse(text: text, path: path), contents.problem)
    }
}

func encode(_ stack: SnapshotStack) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return String(decoding: (try? encoder.encode(stack)) ?? Data("{}".utf8), as: UTF8.self)
}

func decodeStack(_ text: String) -> SnapshotStack? {
    try? JSONDecoder().decode(SnapshotStack.self, from: Data(text.utf8))
}

/// "850 µs", "12.3 ms", "1.20 s".
public func formatMicroseconds(_ value: UInt64) -> String {
    if value < 1000 { return "\(value) µs" }
    if value < 1_000_000 { return "\(oneDecimal(Double(value) / 1000)) ms" }
    return "\(oneDecimal(Double(value) / 1_000_000)) s"
}

/// "2026-11-25 20:14:03" in local time.
public func formatDate(_ seconds: Double) -> String {
    let formatter = DateFormatter()
    formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
    return formatter.string(from: Date(timeIntervalSince1970: seconds))
}
