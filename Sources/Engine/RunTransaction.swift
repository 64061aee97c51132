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

    // MARK: Decisions

    mutating func commit(live: consuming LiveSnapshotSet) -> RunReport {
        reporter.phase("commit", run: runID)
        run.decision = .commit
        DecisionReserve.releaseIfLow(stateDirectory: context.stateDirectory)
        let phase: PhaseRecord
        do {
            phase = try journal.batch {
                try journal.update(run)
                let phase = try journal.beginPhase(runID, "commit", at: timestamp())
                try journal.event(runID, .intent, "commit", nil, at: timestamp())
                return phase
            }
        } catch {
            // Nothing is dropped without its intent in the journal; the upgrade stays, and the
            // labels say kept, which recovery reads as the run's decision.
            let unmarked = live.keep().unmarked
            let labels = unmarked.isEmpty ? "their COW labels say kept" : "\(unmarked.count) COW label(s) could not be marked kept"
            return journalUnwritable(
                error,
                "the upgrade is in place and nothing was committed: the snapshots are live and \(labels); once the journal is writable, `guard recover` records the run as kept, then `guard commit \(runID)` makes it final"
            )
        }
        CrashPoint.hit(.runBeforeCommit)
        switch live.commit() {
        case .committed:
            CrashPoint.hit(.runAfterCommit)
            try? journal.setSnapshotState(runID: runID, .committed)
            try? journal.endPhase(phase, status: .done, at: timestamp())
            return finish(outcome: .committed, exit: .success, state: .finished, error: nil, message: "run \(runID) committed: the upgrade is final")
        case .incomplete(let stillLive, let error):
            // The run is kept: the snapshots still live say so in their labels too (a reboot
            // reassembles them as a kept run's), and `guard commit` finishes the drop.
            let volumes = stillLive.stacks.map(\.originPath)
            for (stack, labelError) in stillLive.keep().unmarked {
                reporter.warning("could not mark the snapshot of \(stack.originName) as kept in its COW label: \(labelError)")
            }
            try? journal.endPhase(phase, status: .failed, detail: "\(error)", at: timestamp())
            let live = volumes.isEmpty ? "" : "; the snapshots of \(volumes.joined(separator: ", ")) are live and kept"
            return finish(
                outcome: .kept, exit: .attention, state: .kept, error: "the commit did not complete: \(error)",
                message: "run \(runID): the upgrade is applied but the commit did not complete (\(error))\(live); run `guard commit \(runID)` again")
        }
    }

    mutating func keep(live: consuming LiveSnapshotSet, until duration: Duration?, failure: String?) -> RunReport {
        reporter.phase("keep", run: runID)
        for (stack, error) in live.keep().unmarked {
            reporter.warning("could not mark the snapshot of \(stack.originName) as kept in its COW label: \(error)")
        }
        run.decision = .keep
        DecisionReserve.releaseIfLow(stateDirectory: context.stateDirectory)
        if let duration {
            run.keepUntil = timestamp() + Double(duration.components.seconds)
        }
        // Boot assessment: the checks after the reboot into the upgrade (BootAssessment).
        let assessing = failure == nil && !recipe.verifyAfterBoot.isEmpty
        do {
            let decided = run
            try journal.batch {
                try journal.update(decided)
                if assessing {
                    try journal.event(
                        runID, .intent, BootAssessment.pendingEvent,
                        "verify_after_boot: \(recipe.verifyAfterBoot.count) check(s) after the reboot, \(recipe.bootAttempts) boot(s) to reach them", at: timestamp())
                }
            }
        } catch {
            return journalUnwritable(
                error,
                "the upgrade is in place, the snapshots are live and their COW labels say kept; once the journal is writable, `guard recover` records the run as kept (`guard rollback \(runID)` and `guard commit \(runID)` then work)"
            )
        }
        let phase = try? journal.beginPhase(runID, "keep", at: timestamp())
        if let phase { try? journal.endPhase(phase, status: .done, detail: failure, at: timestamp()) }
        if let failure {
            return finish(
                outcome: .kept, exit: .attention, state: .kept, error: failure,
                message:
                    "run \(runID) failed (\(failure)); the recipe says keep: the volumes hold the failed upgrade and the snapshots are kept; `guard rollback \(runID)` restores them, `guard commit \(runID)` keeps the new state"
            )
        }
        let until = run.keepUntil.map { " until \(formatDate($0))" } ?? ""
        let assessment =
            assessing
            ? "; reboot into the upgrade: guard-assess.service runs its verify_after_boot checks after the boot, and a failure (or \(recipe.bootAttempts) boot(s) that do not reach them) rolls it back"
            : ""
        return finish(
            outcome: .kept, exit: .success, state: .kept, error: nil,
            message: "run \(runID) succeeded; the snapshots are kept\(until): `guard rollback \(runID)` undoes the upgrade, `guard commit \(runID)` makes it final\(assessment)")
    }

    /// - Parameter watcher: still watching: it fuses a COW that reaches stop_at while the stop
    ///   hooks run, and is stopped before the first suspend of the rollback.
    mutating func rollback(live: consuming LiveSnapshotSet, engine: SnapshotEngine, failure: String, watcher: CowWatcher) async -> RunReport {
        watcher.armFuse(volumes: Self.fusible(live.stacks, engine: engine))
        reporter.phase("rollback", run: runID)
        reporter.warning("\(failure); rolling back")
        let report = await rollingBack(live: live, engine: engine, failure: failure, watcher: watcher)
        recordWatch(watcher, stacks: watcher.stop())
        return report
    }

    mutating func rollingBack(live: consuming LiveSnapshotSet, engine: SnapshotEngine, failure: String, watcher: CowWatcher) async -> RunReport {
        let stacks = live.stacks
        run.decision = .rollback
        run.error = failure
        DecisionReserve.releaseIfLow(stateDirectory: context.stateDirectory)
        do { try journal.update(run) } catch {
            return journalUnwritable(error, "nothing was merged; the snapshots are live; run `guard recover` once the journal is writable")
        }
        // A snapshot the kernel invalidated holds nothing to go back to: say so, and release it.
        let invalid = stacks.filter { (try? engine.health($0).isRestorable) == false }
        if !invalid.isEmpty {
            watcher.stop()
            let which = invalid.map { "\($0.originPath) (\((try? engine.health($0).status.description) ?? "Invalid"))" }.joined(separator: ", ")
            do { try journal.event(runID, .error, JournalEvents.rollbackImpossible, which, at: timestamp()) } catch {
                return journalUnwritable(error, "the invalidated snapshots of \(which) are left as they are")
            }
            live.discard()
            try? journal.setSnapshotState(runID: runID, .invalid)
            return finish(
                outcome: .failed, exit: .attention, state: .finished, error: "\(failure); the snapshot of \(which) overflowed its COW, so a rollback is impossible",
                message:
                    "run \(runID) failed (\(failure)) and cannot be rolled back: the snapshot of \(which) was invalidated by the kernel when its COW filled up during the steps, so its old data is gone. The volumes hold the upgraded data (as the steps left it); restore from a backup if that data is bad, and give the recipe a larger snapshot size or an extend policy"
            )
        }
        // A volume the initramfs mounts (/, /usr) is never unmounted while the system runs: its
        // rollback is journaled for the next boot, whose initramfs merges it before mounting it.
        // No stop hook runs: nothing would follow it until the reboot.
        let maintenance = Maintenance(context: context)
        if let early = try? maintenance.earlyMount(of: stacks, engine: engine) {
            watcher.stop()
            do {
                let scheduled = try maintenance.scheduleBootRollback(
                    run, records: try journal.snapshots(runID: runID), stacks: stacks, mountedOn: early, journal: journal, engine: engine)
                _ = live.keep()
                return finish(
                    outcome: .failed, exit: .attention, state: .kept, error: failure,
                    message: "run \(runID) failed (\(failure)); \(early) is mounted, so it is rolled back at the next boot: \(scheduled)")
            } catch {
                let unmarked = live.keep().unmarked
                return finish(
                    outcome: .failed, exit: .attention, state: .kept, error: "\(failure); its rollback could not be scheduled: \(error)",
                    message:
                        "run \(runID) failed (\(failure)), and its rollback could not be scheduled for the next boot: \(error). The volumes hold what the steps left and the snapshots are kept\(unmarked.isEmpty ? "" : " (\(unmarked.count) label(s) not marked)"); fix that and run `guard rollback \(runID)`"
                )
            }
        }
        let procedure = RollbackProcedure(context: context, journal: journal, engine: engine)
        do {
            try await procedure.perform(run: run, records: try journal.snapshots(runID: runID), live: live, recipe: recipe, wait: true, beforeMerge: { watcher.stop() })
            run = (try? journal.run(id: runID)) ?? run
            return finish(
                outcome: .rolledBack, exit: .failedRestored, state: .finished, error: failure,
                message: "run \(runID) failed (\(failure)); the volumes were rolled back to their state before the run")
        } catch {
            // A refusal says what to do; any other error (an I/O error on the COW while the
            // merge was torn down) is for `guard recover`.
            let reason = (error as? GuardFailure)?.message ?? "\(error); run `guard recover`"
            run = (try? journal.run(id: runID)) ?? run
            let state: RunState = run.state == .merging ? .merging : .kept
            // The kernel's own status decides, not the message: an invalidated snapshot has nothing to merge.
            let invalidated = stacks.contains { (try? engine.health($0).isRestorable) == false }
            // Some volumes merging and some not is no rollback: the run stays open until `guard recover`.
            let unmerged = ((try? journal.snapshots(runID: runID)) ?? []).contains { $0.state == .live }
            let outcome: RunOutcome = state == .merging ? (unmerged ? .failed : .rolledBack) : (invalidated ? .failed : .kept)
            let fused = stacks.filter { (try? engine.isFused($0)) == true }.map(\.originPath)
            let fuse =
                fused.isEmpty || state == .merging
                ? ""
                : "; \(fused.joined(separator: ", ")) refuse\(fused.count == 1 ? "s" : "") writes (guard's fuse kept the snapshot valid) until `guard rollback \(runID)` or `guard commit \(runID)`"
            return finish(
                outcome: outcome, exit: .attention, state: state == .merging ? .merging : (outcome == .failed ? .finished : state), error: "\(failure); \(reason)",
                message: "run \(runID) failed (\(failure)) and the rollback did not complete: \(reason)\(fuse)")
        }
    }

    /// The volumes whose fuse may be armed: not / or /usr, which the running system cannot do
    /// without (a root that refuses writes stops the machine before the rollback at boot).
    static func fusible(_ stacks: [SnapshotStack], engine: SnapshotEngine) -> Set<Int> {
        let early = Set((try? Mounts.current())?.filter { Planner.earlyMountPoints.contains($0.target) }.map(\.device) ?? [])
        return Set(
            stacks.indices.filter { index in
                guard let number = try? engine.dm.info(stacks[index].originRef)?.number else { return true }
                return !early.contains(number)
            })
    }

    /// The origins of `stacks` whose table another tool replaced, by volume name; nil when none could be read.
    static func bypassed(_ stacks: [SnapshotStack], engine: SnapshotEngine) -> [String]? {
        stacks.compactMap { stack in
            if case .bypassed? = try? engine.routing(stack) { return stack.originName }
            return nil
        }
    }

    /// The end of a run one of whose snapshots another tool took out of the write path: no
    /// rollback is possible and nothing is released behind the admin's back. The run is stale
    /// until `guard commit` releases its snapshots.
    mutating func staleEnd(_ volumes: [String], failure: String?) -> RunReport {
        let why = OriginWatch.recorded(journal, runID: runID) ?? "the table of \(volumes.joined(separator: ", ")) was replaced by another tool during the run"
        return finish(
            outcome: .failed, exit: .attention, state: .stale, error: [failure, why].compactMap { $0 }.joined(separator: "; "),
            message: "run \(runID) cannot be rolled back: \(why). The volumes hold what the steps and the other tool left; restore from a backup if that is bad")
    }

    /// The end of a run whose journal cannot be written: the action it was about to take did
    /// not happen, and the report says what state the volumes are in.
    func journalUnwritable(_ error: any Error, _ state: String) -> RunReport {
        RunReport(
            runID: runID, token: run.token, outcome: .failed, exitCode: .attention,
            message: "run \(runID): the journal \(journal.path) cannot be written (\(error)), so guard stopped before its next action: \(state)")
    }

    /// Writes the run's end and returns its report.
    mutating func finish(outcome: RunOutcome, exit: ExitCode, state: RunState, error: String?, message: String? = nil) -> RunReport {
        run = (try? journal.run(id: runID)) ?? run
        run.outcome = outcome
        run.exitCode = Int(exit.rawValue)
        run.state = state
        if let error { run.error = error }
        if state == .finished || state == .kept { run.finishedAt = timestamp() }
        run.phase = "done"
        let ended = run
        do {
            try journal.batch {
                let done = try journal.beginPhase(runID, "done", at: timestamp())
                try journal.endPhase(done, status: .done, detail: outcome.rawValue, at: timestamp())
                try journal.update(ended)
            }
        } catch {
            try? journal.update(ended)  // the outcome, at least
        }
        cgroup?.removeIfEmpty()
        let text = message ?? "run \(runID): \(outcome.rawValue)" + (error.map { " (\($0))" } ?? "")
        return RunReport(runID: runID, token: run.token, outcome: outcome, exitCode: exit, message: text)
    }

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
