import DeviceMapper
import Foundation
import Journal
import Recipe

/// Boot assessment, after Android's Virtual A/B and greenboot: a run whose recipe has
/// `verify_after_boot` ends kept, and the system reboots into the upgrade with the snapshot
/// kept. Each boot's early recovery (the initramfs for /) counts the boot; `guard assess`
/// (guard-assess.service, once the system is up) runs the checks. Checks that fail, or
/// `boot_attempts` boots that never reach them, roll the run back at the next boot (a run
/// without / or /usr is rolled back at once by `guard assess`). The journal holds it all as
/// events: `boot-assessment` (pending), one `boot-attempt` per boot, `boot-assessed`.
public struct BootAssessment {
    public let context: GuardContext
    var reporter: any Reporter { context.reporter }

    public init(context: GuardContext) { self.context = context }

    static let pendingEvent = "boot-assessment"
    static let attemptEvent = "boot-attempt"
    static let assessedEvent = "boot-assessed"

    func timestamp() -> Double { context.now().timeIntervalSince1970 }

    /// A kept run waiting for its checks after a boot, with the boots counted so far.
    struct Awaiting {
        var run: RunRecord
        var recipe: Recipe
        var boots: Int
        /// The assessment already failed (journaled), but the rollback it decided is neither
        /// done nor scheduled (it could not be, then): it is retried, the checks are not rerun.
        var failed: String?
    }

    /// Kept runs whose assessment is pending (journaled as such, not assessed) or failed without
    /// its rollback decided, and not decided otherwise since (`guard commit` ends the wait).
    static func awaiting(_ journal: Journal) throws -> [Awaiting] {
        try journal.runs(in: [.kept]).compactMap { run in
            guard run.decision == .keep else { return nil }
            let events = try journal.events(runID: run.id!)
            let assessed = events.last { $0.action == assessedEvent }
            // A failed one is retried until its rollback is decided, unless that rollback proved
            // impossible (an Invalid snapshot: `guard status` says what to do).
            let retry = assessed.map { ($0.detail ?? "").hasPrefix("failed") && !events.contains { $0.action == JournalEvents.rollbackImpossible } }
            guard events.contains(where: { $0.action == pendingEvent }), retry ?? true,
                case .success(let recipe) = RecipeParser.parse(text: run.recipeText, path: run.recipePath), !recipe.verifyAfterBoot.isEmpty
            else { return nil }
            return Awaiting(
                run: run, recipe: recipe, boots: events.filter { $0.action == attemptEvent }.count,
                failed: assessed.map { String(($0.detail ?? "").dropFirst("failed: ".count)) })
        }
    }

    /// At boot, before anything is mounted: counts this boot for every run awaiting its
    /// checks. A run whose boots are used up (none reached the checks) is decided for a
    /// rollback, which the caller then carries out at once.
    /// - Returns: what it did, one line each.
    static func countBoot(journal: Journal, at now: Double, only include: (RunRecord) -> Bool = { _ in true }) throws -> [String] {
        var actions: [String] = []
        for waiting in try awaiting(journal) where include(waiting.run) {
            let id = waiting.run.id!
            if let failure = waiting.failed {
                var decided = waiting.run
                decided.decision = .rollback
                try journal.batch {
                    try journal.update(decided)
                    try journal.event(id, .intent, JournalEvents.rollbackAtBoot, "boot assessment failed earlier (\(failure)); its rollback could not be scheduled then", at: now)
                }
                actions.append("run \(id): its boot assessment failed earlier (\(failure)); rolling it back")
            } else if waiting.boots >= waiting.recipe.bootAttempts {
                var decided = waiting.run
                decided.decision = .rollback
                let why =
                    "failed: \(waiting.boots) boot\(waiting.boots == 1 ? "" : "s") into the upgrade did not reach the verify_after_boot checks (boot_attempts: \(waiting.recipe.bootAttempts))"
                try journal.batch {
                    try journal.update(decided)
                    try journal.event(id, .result, assessedEvent, why, at: now)
                    try journal.event(id, .intent, JournalEvents.rollbackAtBoot, "boot assessment \(why)", at: now)
                }
                actions.append("run \(id): boot assessment \(why); rolling it back")
            } else {
                try journal.event(id, .note, attemptEvent, "boot \(waiting.boots + 1) of \(waiting.recipe.bootAttempts)", at: now)
                actions.append("run \(id): boot \(waiting.boots + 1) of \(waiting.recipe.bootAttempts) into the upgrade; guard-assess.service runs its verify_after_boot checks")
            }
        }
        return actions
    }

    /// What `guard assess` did.
    public struct Outcome: Sendable {
        public var lines: [String] = []
        /// Runs whose checks failed.
        public var failed: [Int64] = []
        /// Whether a failed run waits for the next boot to be rolled back.
        public var rollbackAtBoot = false
    }

    /// `guard assess`: runs the verify_after_boot checks of every run kept across this boot.
    /// A run not yet rebooted into (no boot counted) is left for later. A run whose checks failed
    /// but whose rollback could not be started or scheduled is retried, without its checks.
    public func assess() async throws -> Outcome {
        let journal = try context.journal()
        var outcome = Outcome()
        // A run whose origin another tool took out of the snapshot's write path is stale: it is
        // neither assessed nor rolled back.
        if DeviceMapper.isAvailable {
            for finding in try OriginWatch(context: context, journal: journal, engine: try context.engine(watchdog: false)).sweep() {
                outcome.lines.append("run \(finding.runID): \(finding.text)")
            }
        }
        for waiting in try Self.awaiting(journal) {
            let id = waiting.run.id!
            guard waiting.boots > 0 || waiting.failed != nil else {
                outcome.lines.append("run \(id): not rebooted into yet; its verify_after_boot checks run after the next boot")
                continue
            }
            let failure: String?
            if let earlier = waiting.failed {
                failure = earlier
            } else {
                failure = try await runChecks(waiting, journal: journal)
                // The decision first: should the rollback fail, the next `guard assess` or boot
                // retries it.
                if let failure { try journal.event(id, .result, Self.assessedEvent, "failed: \(failure)", at: timestamp()) }
            }
            if let failure {
                outcome.failed.append(id)
                do {
                    let rollback = try await Maintenance(context: context).rollback("\(id)", wait: false)
                    outcome.rollbackAtBoot = outcome.rollbackAtBoot || rollback.atBoot
                    outcome.lines.append("run \(id): verify_after_boot failed (\(failure)); \(rollback.message)")
                } catch {
                    outcome.lines.append(
                        "run \(id): verify_after_boot failed (\(failure)), and its rollback could not be started: \(error). The run stays kept; the next `guard assess` or boot tries the rollback again (`guard rollback \(id)` does it by hand)"
                    )
                }
            } else {
                let keep = waiting.run.keepUntil.map { "kept until \(formatDate($0))" } ?? "kept until `guard commit \(id)`"
                try journal.event(id, .result, Self.assessedEvent, "passed: \(waiting.recipe.verifyAfterBoot.count) check(s) after boot \(waiting.boots)", at: timestamp())
                outcome.lines.append("run \(id): verify_after_boot passed after boot \(waiting.boots); the upgrade stays, its snapshot \(keep), as the recipe says")
            }
        }
        if outcome.lines.isEmpty { outcome.lines.append("no run waits for its boot assessment") }
        return outcome
    }

    /// Runs the checks in order, each journaled as a step of kind verify_after_boot; returns
    /// the first failure.
    func runChecks(_ waiting: Awaiting, journal: Journal) async throws -> String? {
        let runner = StepRunner(onOutput: { [reporter] in reporter.stepOutput($0) })
        let id = waiting.run.id!
        let checks = waiting.recipe.verifyAfterBoot
        for (index, check) in checks.enumerated() {
            var problem: String?
            for attempt in 1...(check.retries + 1) {
                if attempt > 1 { try? await Task.sleep(for: check.interval) }
                reporter.stepStarted(kind: "verify_after_boot", index: index, count: checks.count, name: check.name)
                // The journal comes first: a check it cannot record does not run.
                let record = try journal.insert(
                    StepRecord(runID: id, kind: "verify_after_boot", position: index, name: check.name, argv: check.invocation.arguments, startedAt: timestamp()))
                let environment = StepRunner.environment(
                    recipe: waiting.recipe.environment, command: check.environment,
                    run: ["GUARD_RUN_ID": "\(id)", "GUARD_RUN_TOKEN": waiting.run.token, "GUARD_RECIPE": waiting.recipe.name, "GUARD_PHASE": "verify_after_boot"])
                let result = await runner.run(check, environment: environment, timeout: check.timeout ?? waiting.recipe.defaultTimeout)
                try journal.update(record.finished(result))
                reporter.stepFinished(kind: "verify_after_boot", result: result)
                if result.succeeded {
                    problem = nil
                    break
                }
                problem = "'\(check.name)' \(result.termination.description)"
            }
            if let problem { return problem }
        }
        return nil
    }
}
