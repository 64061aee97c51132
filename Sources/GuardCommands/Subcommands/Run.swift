import ArgumentParser
import BlockDevice
import Engine
import Foundation
import Journal
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

extension GuardCommand {
    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "run",
            abstract: "Run a recipe under snapshots: quiesce, snapshot, steps, verify, then commit, keep or roll back.",
            discussion: """
                Preflight checks everything first and touches nothing if any check fails: the recipe, root, device-mapper, the volumes (active, not already under a snapshot), COW space, the journal, and the volume locks (a second run on a volume is refused). Then guard runs the quiesce commands, snapshots every volume in one suspend window, runs the resume commands, the steps and the verify checks.

                On success the recipe's on_success applies (commit, or keep for a duration); on failure its on_failure (rollback, or keep). Ctrl-C during the steps stops them and rolls back. The COW is watched while the steps run: it grows as the recipe allows, and if it is about to fill the steps are stopped and the run rolled back while that is still possible.

                Exit codes:
                  0  the upgrade is applied (committed, or kept for a later rollback)
                  1  the upgrade failed and the volumes were restored
                  2  recipe, usage or preflight error: nothing was touched
                  3  needs attention (a rollback that could not complete); the message says what to run
                  75 busy: another guard command holds a volume or the journal; nothing was touched, try again later

                Examples:
                  guard run /etc/guard/website-migration.recipe
                  guard check upgrade.recipe && guard run upgrade.recipe
                  guard run --dry-run upgrade.recipe    # every check, the plan, earlier COW use; touches nothing
                  GUARD_STATE_DIR=/srv/guard guard run -q nightly.recipe
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The recipe file.", valueName: "recipe"), completion: Completions.recipes)
        var recipe: String

        @Flag(help: "Run a recipe that users other than root can modify (refused by default).")
        var allowUnsafeRecipe = false

        @Flag(name: .customLong("dry-run"), help: "Run every preflight check and print the plan, the snapshot sizes and the COW use of earlier runs; touch nothing.")
        var dryRun = false

        @Flag(
            help:
                "Print the run as `guard show --json` does (/usr/share/doc/guard/schema/run.schema.json), or with --dry-run the plan (plan.schema.json); the steps' output still goes to stderr."
        )
        var json = false

        func run() async throws {
            try await Self.perform(context: try global.context(), recipe: recipe, allowUnsafeRecipe: allowUnsafeRecipe, dryRun: dryRun, json: json)
        }

        /// `guard run` of the recipe file at `recipe` (also what `guard apt` runs).
        static func perform(context: GuardContext, recipe: String, allowUnsafeRecipe: Bool, dryRun: Bool, json: Bool) async throws {
            var options = RunOptions()
            options.allowUnsafeRecipe = allowUnsafeRecipe
            if dryRun {
                let result = try RunTransaction(context: context, options: options).checks(recipePath: recipe, dryRun: true)
                let failure =
                    result.refusals.isEmpty
                    ? nil : GuardFailure(result.busy ? .busy : .refused, "a real run would be refused:\n" + result.refusals.joined(separator: "\n") + "\nnothing was touched")
                if json {
                    try printJSON(
                        PlanDocument(
                            mode: "dry_run", recipe: result.plan.recipe, path: recipe, plan: result.plan, warnings: result.plan.warnings,
                            problems: result.refusals, housekeeping: result.housekeeping, busy: result.busy))
                    if let failure { throw DocumentPrinted(failure) }
                    return
                }
                say("dry run of \(result.plan.recipe.name) (\(recipe), sha256 \(result.plan.recipe.sha256.prefix(12)))")
                Check.printRecipe(result.plan.recipe, plan: result.plan, configuration: context.configuration)
                for warning in result.plan.warnings { context.reporter.warning(warning) }
                for chore in result.housekeeping { say("first, guard would \(chore)") }
                if let failure { throw failure }
                context.reporter.note("dry run: every preflight check passes; nothing was touched")
                return
            }
            let interrupt = options.interrupt
            let signals = InterruptHandler { interrupt.set("interrupted (Ctrl-C)") }
            defer { signals.cancel() }
            let report = try await RunTransaction(context: context, options: options).execute(recipePath: recipe)
            // A kept failure (on_failure: keep) is no success, though its outcome is kept.
            let ending = report.exitCode == .success ? LogEvent.ending(report.outcome) : (report.outcome == .rolledBack ? .runRolledBack : .runFailed)
            context.reporter.event(ending, report.message)
            if json {
                // The run is done, whatever happens here: its exit code stands.
                do {
                    try printRunDocument(report.token, context: context)
                } catch {
                    context.reporter.warning("cannot print run \(report.runID) as JSON: \(error); `guard show --json \(report.runID)` shows it")
                }
            }
            throw ExitCodeError(report.exitCode)
        }
    }
}

/// Ends the process with one of guard's exit codes (the message is already printed).
extension GuardCommand {
    struct Apt: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "apt",
            abstract: "Run apt-get under a recipe: snapshot what it names, upgrade, verify, then keep, commit or roll back.",
            discussion: """
                The recipe (default /etc/guard/apt.recipe; /usr/share/doc/guard/examples/system-apt-upgrade.recipe is an example) says what to snapshot and check: volumes (/ with its COW device), verify, verify_after_boot, on_success. guard apt replaces its steps with `apt-get update` and `apt-get -y ARGS`, non-interactive, writes the result into the state directory (apt/), and runs it as `guard run` does: the journal holds the recipe as it ran. A rollback of / happens at the next boot (guard-recover(8); "The root filesystem" in /usr/share/doc/guard/recovery.md).

                guard ships this wrapper, not an APT hook: a DPkg::Pre-Invoke hook runs inside apt's own transaction, so it could snapshot but neither verify after the upgrade nor roll it back as one run, and it would fire for every small install.

                Exit codes are guard run's.

                Examples:
                  guard apt -- full-upgrade
                  guard apt --recipe /etc/guard/nginx.recipe -- install --only-upgrade nginx
                  guard apt --dry-run -- upgrade
                """)

        @OptionGroup var global: GlobalOptions

        @Option(help: ArgumentHelp("The recipe that says what to snapshot and check; its steps are replaced.", valueName: "file"))
        var recipe = "/etc/guard/apt.recipe"

        @Flag(help: "Run a recipe that users other than root can modify (refused by default).")
        var allowUnsafeRecipe = false

        @Flag(name: .customLong("dry-run"), help: "Run every preflight check and print the plan; touch nothing (the recipe is still written to the state directory).")
        var dryRun = false

        @Flag(help: "Print the run as `guard show --json` does (/usr/share/doc/guard/schema/run.schema.json), or with --dry-run the plan.")
        var json = false

        @Argument(parsing: .postTerminator, help: ArgumentHelp("apt-get's arguments, after --.", valueName: "apt-get arguments"))
        var arguments: [String] = []

        func run() async throws {
            let context = try global.context()
            let file = try AptRun.prepare(context: context, base: recipe, arguments: arguments, allowUnsafe: allowUnsafeRecipe)
            context.reporter.note("apt-get \(arguments.joined(separator: " ")) under \(recipe), as \(file)")
            try await Run.perform(context: context, recipe: file, allowUnsafeRecipe: false, dryRun: dryRun, json: json)
        }
    }
}

struct ExitCodeError: Error {
    let code: Engine.ExitCode
    init(_ code: Engine.ExitCode) { self.code = code }
}

/// Turns SIGINT and SIGTERM into a stop request instead of killing guard mid-transaction.
final class InterruptHandler: @unchecked Sendable {
    // @unchecked: the sources are created and cancelled on the same thread.
    private var sources: [any DispatchSourceSignal] = []

    /// - Parameter message: written to stderr when a signal arrives.
    init(message: String? = "\nguard: stopping the steps and rolling back; please wait\n", _ action: @escaping @Sendable () -> Void) {
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler {
                if let message { StandardStreams.error(message) }
                action()
            }
            source.resume()
            sources.append(source)
        }
    }

    func cancel() {
        sources.forEach { $0.cancel() }
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
    }
}
