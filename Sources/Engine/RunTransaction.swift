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

/// Set when the run must stop its steps (Ctrl-C, a COW about to fill).
public final class StopFlag: Sendable {
    private let reason = LockedValue<String?>(nil)
    public init() {}
    public func set(_ text: String) { reason.withLock { if $0 == nil { $0 = text } } }
    public var value: String? { reason.withLock { $0 } }
}

/// Options of `guard run`.
public struct RunOptions: Sendable {
    /// Run a recipe writable by others than root (refused by default).
    public var allowUnsafeRecipe = false
    /// Set by the Ctrl-C handler.
    public var interrupt = StopFlag()
    public init() {}
}

/// How a run ended, for the command's exit code and last words.
public struct RunReport: Sendable {
    public var runID: Int64
    public var token: String
    public var outcome: RunOutcome
    public var exitCode: ExitCode
    public var message: String
}

/// `guard run RECIPE`: preflight → quiesce → snapshot → resume → steps → verify →
/// commit | keep | rollback → done, each transition journaled before the kernel is touched.
public final class RunTransaction {
    let context: GuardContext
    let options: RunOptions
    var reporter: any Reporter { context.reporter }

    public init(context: GuardContext, options: RunOptions) {
        self.context = context
        self.options = options
    }

    // MARK: Preflight

    /// Everything that can refuse the run, touching nothing: the recipe, root, device-mapper,
    /// the journal, unfinished runs, the volumes, COW space, the locks.
    public func preflight(recipePath: String) throws -> (Plan, Journal, [VolumeLock]) {
        let plan = try checks(recipePath: recipePath, dryRun: false).plan
        try context.prepareStateDirectory()
        let journal = try context.journal(check: true)
        DecisionReserve.ensure(stateDirectory: context.stateDirectory)
        var locks: [VolumeLock] = []
        for volume in plan.volumes {
            locks.append(try VolumeLock.acquire(directory: context.lockDirectory, key: volume.lockKey, holder: "guard run of \(plan.recipe.name) (pid \(getpid()))"))
        }
        return (plan, journal, locks)
    }

    /// What `guard run --dry-run` found: the plan, and every refusal a real run would meet.
    public struct DryRun: Sendable {
        public var plan: Plan
        /// Each would stop the run (a real run stops at the first).
        public var refusals: [String]
        /// What a real run would do first (finish a merge, commit a kept run whose time is up).
        public var housekeeping: [String]
        /// Every refusal is another guard command at work: the run can be tried again later.
        public var busy: Bool
    }

    /// The checks of preflight. A real run throws at the first refusal and tidies the journal
    /// first; a dry run collects every refusal and changes nothing: no device, no COW file, no
    /// journal row, no lock file.
    public func checks(recipePath: String, dryRun: Bool) throws -> DryRun {
        var refusals: [String] = []
        var busy: [String] = []
        var housekeeping: [String] = []
        func refuse(_ message: String, _ separator: String = "; ", busy isBusy: Bool = false) throws {
            if dryRun {
                refusals.append(message)
                if isBusy { busy.append(message) }
            } else {
                throw GuardFailure(isBusy ? .busy : .refused, message + separator + "nothing was touched")
            }
        }
        let recipe: Recipe
        let loaded = RecipeFile.load(recipePath)
        switch loaded.recipe {
        case .success(let value): recipe = value
        case .failure(let errors):
            throw GuardFailure(.refused, "\(errors)\n\(errors.errors.count) error\(errors.errors.count == 1 ? "" : "s") in \(recipePath); nothing was touched")
        }
        if geteuid() != 0 {
            throw GuardFailure(
                .refused,
                dryRun
                    ? "guard run --dry-run needs root to resolve the volumes (`guard check --syntax-only` validates the recipe without); nothing was touched"
                    : "guard run needs root (it suspends and snapshots volumes): run it with sudo; nothing was touched")
        }
        if !options.allowUnsafeRecipe, let problem = loaded.problem {
            try refuse("\(problem); guard runs its steps as root, so it refuses recipes others can change: \(RecipeFile.unsafeAdvice(recipePath))")
        }
        _ = try context.dm()
        // An existing journal first: it may hold kept runs to expire and merges to finish, and
        // unfinished runs that must be recovered before anything else touches a volume.
        if let existing = try context.existingJournal(check: true) {
            if dryRun {
                for (run, chore) in try Maintenance(context: context).chores(journal: existing) {
                    switch chore {
                    case .finishMerge: housekeeping.append("finish the merge of run \(run.id!) if it is complete")
                    case .commitExpired(let until): housekeeping.append("commit run \(run.id!) (kept until \(formatDate(until)))")
                    }
                }
            } else {
                try Maintenance(context: context).tidy(journal: existing)
            }
            // A run waiting for reassembly blocks only its own volumes (the planner refuses them).
            let unfinished = try Recovery(context: context).unfinishedRuns(journal: existing).filter { $0.state == .running }
            if !unfinished.isEmpty {
                try refuse(
                    "run \(unfinished.map { "\($0.id ?? 0)" }.joined(separator: ", ")) did not finish (guard was killed or the machine went down); run `guard recover` first")
            }
        }
        // The plan checks, among the rest, that the state directory is not on a volume the
        // recipe snapshots: nothing is written there before that is known.
        let plan = try Planner(context: context).plan(recipe)
        if !dryRun { for warning in plan.warnings { reporter.warning(warning) } }
        if !plan.problems.isEmpty {
            try refuse(plan.problems.joined(separator: "\n"), "\n", busy: plan.onlyBusy)
        }
        let stateFilesystem = Planner(context: context).nearestExisting(context.stateDirectory)
        if let free = try? freeSpace(at: stateFilesystem), free < 16 << 20 {
            try refuse("the state directory \(context.stateDirectory) has only \(formatBytes(free)) free; the journal and COW files need room")
        }
        if dryRun {
            for volume in plan.volumes {
                if let holder = VolumeLock.holder(directory: context.lockDirectory, key: volume.lockKey) {
                    try refuse("the volume \(volume.originPath) is in use by another guard command (\(holder)); wait for it to finish", busy: true)
                }
            }
        }
        return DryRun(plan: plan, refusals: refusals, housekeeping: housekeeping, busy: !refusals.isEmpty && refusals.allSatisfy(busy.contains))
    }

    // MARK: The run

    /// Runs the recipe; returns how it ended (never throws after the run is journaled).
    public func execute(recipePath: String) async throws -> RunReport {
        let (plan, journal, locks) = try preflight(recipePath: recipePath)
        defer { locks.forEach { $0.release() } }
        let reporter = self.reporter
        journal.onRebuilt = { reporter.warning($0) }
        let recipe = plan.recipe
        let now = context.now().timeIntervalSince1970
        // The run, its preflight and its volumes: one transaction, nothing happens in between.
        var (run, records) = try journal.batch {
            let run = try journal.insert(
                RunRecord(
                    token: StackIdentity.newToken(), recipeName: recipe.name, recipePath: recipePath, recipeSHA256: recipe.sha256,
                    recipeText: recipe.text, host: context.hostName, user: context.userName, pid: getpid(), startedAt: now))
            let preflightPhase = try journal.beginPhase(run.id!, "preflight", at: now)
            var records: [SnapshotRecord] = []
            for volume in plan.volumes {
                records.append(
                    try journal.insert(
                        SnapshotRecord(
                            runID: run.id!, volumeIndex: volume.index, volume: volume.spec.device, mountPoint: volume.mountPoint,
                            originName: volume.info.name, originUUID: volume.info.uuid, originDevice: volume.info.number.description,
                            originTable: "", originBytes: Int64(volume.originBytes), cowPath: Self.cowPath(volume, token: run.token),
                            cowKind: volume.storage.kind, sizeBytes: Int64(volume.cowBytes),
                            chunkBytes: Int64(volume.chunkSectors) * 512, state: .preparing, stack: "{}")))
            }
            try journal.endPhase(preflightPhase, status: .done, detail: "\(plan.volumes.count) volume(s)")
            return (run, records)
        }
        let runID = run.id!
        for lock in locks { lock.describe("run \(runID) (pid \(getpid()))") }
        for volume in plan.volumes {
            reporter.log("volume \(volume.index + 1): \(volume.originPath), snapshot \(formatBytes(volume.cowBytes)) (\(volume.sizeNote))")
        }
        reporter.context(run: runID, recipe: recipe.name)
        reporter.event(.runStarted, "run \(runID) of \(recipe.name) (\(recipePath), sha256 \(recipe.sha256.prefix(12)))")

        var state = RunBody(context: context, journal: journal, run: run, plan: plan, records: records)
        let report = await state.proceed(options: options)
        run = (try? journal.run(id: runID)) ?? run
        return report
    }

    static func cowPath(_ volume: PlannedVolume, token: String) -> String {
        switch volume.storage {
        case .fileIn(let directory): return "\(directory)/\(token)-\(volume.index).cow"
        case .blockDevice(let path): return path
        case .thinPool: return "/dev/mapper/\(ThinPoolNames(volume: volume.info.name).pool)"
        }
    }
}

extension VolumeRequest.Storage {
    var isDevice: Bool {
        if case .blockDevice = self { return true }
        return false
    }

    /// Where the COW goes, in words.
    var place: String {
        switch self {
        case .fileIn(let directory): return "a file in \(directory)"
        case .blockDevice(let path): return "the device \(path)"
        case .thinPool: return "the volume's thin pool"
        }
    }

    /// The journal's `cow_kind`: file, device or thin.
    public var kind: String {
        switch self {
        case .fileIn: return "file"
        case .blockDevice: return "device"
        case .thinPool: return "thin"
        }
    }
}

/// The body of a run after preflight: each phase journaled, every failure leading to a
/// decided end (committed, kept, rolled back, or failed with what to do).
struct RunBody {
    let context: GuardContext
    let journal: Journal
    var run: RunRecord
    let plan: Plan
    var records: [SnapshotRecord]
    /// Where every step and hook of the run runs (nil without cgroup v2).
    let cgroup: RunCgroup?
    var reporter: any Reporter { context.reporter }
    var runID: Int64 { run.id! }
    var recipe: Recipe { plan.recipe }

    init(context: GuardContext, journal: Journal, run: RunRecord, plan: Plan, records: [SnapshotRecord]) {
        self.context = context
        self.journal = journal
        self.run = run
        self.plan = plan
        self.records = records
        do {
            cgroup = try RunCgroup.create(token: run.token)
            if cgroup == nil {
                context.reporter.warning(
                    "cgroup v2 is not mounted: the steps are contained by their process group only (a step that calls setsid or double-forks can outlive the run)")
            }
        } catch {
            cgroup = nil
            context.reporter.warning("\(error); the steps are contained by their process group only")
        }
    }

    func timestamp() -> Double { context.now().timeIntervalSince1970 }

    mutating func proceed(options: RunOptions) async -> RunReport {
        let runner = StepRunner(onOutput: { [reporter] in reporter.stepOutput($0) })

        // The snapshots are planned, journaled, and their COW files made (preallocated, their
        // extents written) before the quiesce hooks stop anything: the service is not down
        // while guard writes them.
        let engine: SnapshotEngine
        let stacks: [SnapshotStack]
        do {
            engine = try context.engine()
            // The watchdog process starts while the COW storage is prepared.
            (engine.watchdog as? ProcessWatchdog)?.start()
            stacks = try planSnapshots(engine)
        } catch {
            try? journal.setSnapshotState(runID: runID, .discarded)
            return finish(outcome: .failed, exit: .failedRestored, state: .finished, error: "the snapshot failed: \(error); nothing was changed")
        }

        // quiesce
        if !recipe.quiesce.isEmpty {
            reporter.phase("quiesce", run: runID)
            let phase = try? journal.beginPhase(runID, "quiesce", at: timestamp())
            if let failed = await runCommands(recipe.quiesce, kind: "quiesce", runner: runner) {
                if let phase { try? journal.endPhase(phase, status: .failed, detail: failed, at: timestamp()) }
                engine.unstage(stacks)
                try? journal.setSnapshotState(runID: runID, .discarded)
                await runResumeHooks(runner: runner)
                return finish(outcome: .failed, exit: .failedRestored, state: .finished, error: "quiesce failed: \(failed); no volume was touched")
            }
            if let phase { try? journal.endPhase(phase, status: .done, at: timestamp()) }
        }

        // snapshot
        reporter.phase("snapshot", run: runID)
        let snapshotPhase = try? journal.beginPhase(runID, "snapshot", at: timestamp())
        let live: LiveSnapshotSet
        do {
            live = try takeSnapshots(engine, stacks: stacks)
        } catch {
            if let snapshotPhase { try? journal.endPhase(snapshotPhase, status: .failed, detail: "\(error)", at: timestamp()) }
            try? journal.setSnapshotState(runID: runID, .discarded)
            await runResumeHooks(runner: runner)
            return finish(outcome: .failed, exit: .failedRestored, state: .finished, error: "the snapshot failed: \(error); nothing was changed")
        }
        CrashPoint.hit(.runAfterTake)
        run.suspendMicroseconds = Int64(live.suspendMicroseconds)
        run.phase = "snapshot"
        let window = live.suspendMicroseconds
        let windowParts = live.window.description
        let taken = run
        do {
            // No step runs unless the journal holds the take: recovery must know the snapshot is live.
            try journal.batch {
                try journal.update(taken)
                try journal.setSnapshotState(runID: runID, .live)
                try journal.event(runID, .result, "take", windowParts, at: timestamp())
                if let snapshotPhase { try journal.endPhase(snapshotPhase, status: .done, detail: "suspend window \(window) µs", at: timestamp()) }
            }
        } catch {
            // Nothing ran under the snapshots yet: dropping them changes nothing. Those a drop
            // leaves live stay as they are, for `guard recover`.
            let dropped: Bool
            switch live.commit() {
            case .committed: dropped = true
            case .incomplete: dropped = false
            }
            await runResumeHooks(runner: runner)
            return journalUnwritable(
                error,
                dropped
                    ? "the snapshots were dropped before any step ran; no volume was changed"
                    : "no step ran; the snapshots are still live: run `guard recover` once the journal is writable")
        }
        reporter.note("snapshot taken: \(plan.volumes.count) volume(s), suspended for \(formatMicroseconds(live.suspendMicroseconds))")
        // Before any step: a volume activated late at a boot is not mounted before guard has
        // stacked its snapshot again (guard's udev rule holds it).
        for volume in VolumeHolds().hold((try? journal.snapshots(runID: runID)) ?? []) {
            reporter.warning(
                "\(volume) is not marked to be held at boot (/etc/guard/held): if it is activated after guard-reassemble.service at a boot, it could be mounted before its snapshot is stacked again"
            )
        }

        await runResumeHooks(runner: runner)

        // steps, with the COW watched
        reporter.phase("steps", run: runID)
        let stop = options.interrupt
        let cowStop = StopFlag()
        let watcher = makeWatcher(engine: engine, stacks: live.stacks, cowStop: cowStop)
        // A run that will roll back on failure fuses a COW that reaches stop_at and cannot
        // grow: every write the fuse refuses from then on would be undone by the merge.
        if recipe.onFailure == .rollback { watcher.armFuse(volumes: Self.fusible(live.stacks, engine: engine)) }
        watcher.start()
        var failure: String?
        let stepsPhase: PhaseRecord?
        do { stepsPhase = try journal.beginPhase(runID, "steps", at: timestamp()) } catch {
            // The journal must say the steps may have run before the first one starts.
            stepsPhase = nil
            failure = "the journal \(journal.path) cannot be written (\(error)); no step was run"
        }
        for (index, step) in recipe.steps.enumerated() where stepsPhase != nil {
            if let reason = stop.value ?? cowStop.value {
                failure = reason
                break
            }
            if let problem = await runOne(step, kind: "step", index: index, count: recipe.steps.count, runner: runner, stop: { stop.value ?? cowStop.value }) {
                failure = "step \(index + 1) '\(step.name)' \(problem)"
                break
            }
        }
        if let stepsPhase { try? journal.endPhase(stepsPhase, status: failure == nil ? .done : .failed, detail: failure, at: timestamp()) }

        // verify
        if failure == nil && !recipe.verify.isEmpty {
            reporter.phase("verify", run: runID)
            let verifyPhase = try? journal.beginPhase(runID, "verify", at: timestamp())
            var failed: [String] = []
            for (index, check) in recipe.verify.enumerated() {
                if let reason = stop.value ?? cowStop.value {
                    failed.append(reason)
                    break
                }
                if let problem = await runOne(check, kind: "verify", index: index, count: recipe.verify.count, runner: runner, stop: { stop.value ?? cowStop.value }) {
                    failed.append("check '\(check.name)' \(problem)")
                }
            }
            if !failed.isEmpty { failure = "verify failed: " + failed.joined(separator: "; ") }
            if let verifyPhase { try? journal.endPhase(verifyPhase, status: failed.isEmpty ? .done : .failed, detail: failure, at: timestamp()) }
        }
        // decision: a rollback keeps the watcher (and its fuse) until the merge starts
        if failure == nil, let late = cowStop.value { failure = late }
        if failure == nil || (recipe.onFailure == .keep && stop.value == nil) {
            recordWatch(watcher, stacks: watcher.stop())
            if failure == nil, let late = cowStop.value { failure = late }
        }
        // A snapshot another tool took out of the write path during the run is stale: nothing
        // can be rolled back or kept of it (its label says so already).
        if let stale = Self.bypassed(live.stacks, engine: engine), !stale.isEmpty {
            recordWatch(watcher, stacks: watcher.stop())
            return staleEnd(stale, failure: failure)
        }
        if let failure {
            let interrupted = stop.value != nil
            if recipe.onFailure == .keep && !interrupted {
                return keep(live: live, until: nil, failure: failure)
            }
            return await rollback(live: live, engine: engine, failure: failure, watcher: watcher)
        }
        switch recipe.onSuccess {
        case .commit:
            return commit(live: live)
        case .keep(let duration):
            // A recipe without a duration gets guard.conf's `keep` (none: until commit or rollback).
            return keep(live: live, until: duration ?? context.configuration.keep, failure: nil)
        }
    }

    /// Plans the snapshot set, journals everything its layers will be (the `prepare` intent)
    /// before the first one exists, and makes its COW files.
    mutating func planSnapshots(_ engine: SnapshotEngine) throws -> [SnapshotStack] {
        let stacks = try engine.plan(plan.volumes.map(\.request), token: run.token)
        for (index, stack) in stacks.enumerated() {
            records[index].stack = encode(stack)
            records[index].originTable = stack.originTable
            records[index].cowPath = stack.storage.path
            try journal.update(records[index])
        }
        try journal.event(runID, .intent, "prepare", stacks.map { "\($0.originPath) cow \($0.storage.path)" }.joined(separator: "; "), at: timestamp())
        let started = ContinuousClock.now
        try engine.stage(stacks)
        if stacks.contains(where: \.storage.isFile) { reporter.log("COW files made in \(formatMicroseconds(UInt64((ContinuousClock.now - started).inSeconds * 1_000_000)))") }
        return stacks
    }

    /// Prepares the layers and takes the snapshot set, journaling the intent of each.
    mutating func takeSnapshots(_ engine: SnapshotEngine, stacks: [SnapshotStack]) throws -> LiveSnapshotSet {
        CrashPoint.hit(.runBeforePrepare)
        let prepared = try engine.prepare(stacks)
        do {
            try journal.event(runID, .intent, "take", "suspend \(prepared.stacks.map(\.originName).joined(separator: ", "))", at: timestamp())
        } catch {
            prepared.abandon()
            throw error
        }
        CrashPoint.hit(.runBeforeTake)
        return try prepared.take()
    }
}
