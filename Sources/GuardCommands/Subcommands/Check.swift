import ArgumentParser
import BlockDevice
import DeviceMapper
import Engine
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

extension GuardCommand {
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "check",
            abstract: "Validate a recipe and print the plan: volumes, snapshot sizes, COW locations, steps.",
            discussion: """
                Every error of the recipe is reported at once, with its line and column. When the recipe is valid and guard runs as root on a kernel with device-mapper, the volumes are resolved too: each device and its size, where it is mounted, the snapshot size it gets (and why, for `auto`), where the COW lives and the free space there. Nothing is touched.

                Exit codes: 0 valid (and, as root, every preflight check passes), 2 invalid.

                Examples:
                  guard check /etc/guard/website-migration.recipe
                  guard check --syntax-only upgrade.recipe    # no root, no device-mapper needed
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The recipe file.", valueName: "recipe"), completion: Completions.recipes)
        var recipe: String

        @Flag(help: "Only validate the file; do not resolve the volumes.")
        var syntaxOnly = false

        @Flag(help: "Print the plan as JSON (/usr/share/doc/guard/schema/plan.schema.json); an invalid recipe's errors are in it, each with its line and column.")
        var json = false

        func run() throws {
            let parsed: Recipe
            let loaded = RecipeFile.load(recipe)
            let resolving = !syntaxOnly && geteuid() == 0
            switch loaded.recipe {
            case .success(let value): parsed = value
            case .failure(let errors):
                let failure = GuardFailure(.refused, "\(errors)\n\(errors.errors.count) error\(errors.errors.count == 1 ? "" : "s") in \(recipe)")
                guard json else { throw failure }
                try printJSON(PlanDocument(mode: resolving ? "check" : "syntax", path: recipe, errors: errors))
                throw DocumentPrinted(failure)
            }
            let unsafe = loaded.problem.map { "\($0); `guard run` refuses it: \(RecipeFile.unsafeAdvice(recipe))" }
            if !resolving {
                if json {
                    return try printJSON(PlanDocument(mode: "syntax", recipe: parsed, path: recipe, plan: nil, warnings: unsafe.map { [$0] } ?? [], problems: []))
                }
                say("recipe \(parsed.name) (\(recipe), sha256 \(parsed.sha256.prefix(12))) is valid")
                Self.printRecipe(parsed, plan: nil, configuration: nil)
                if !syntaxOnly { say("(run as root to resolve the volumes against this system)") }
                return
            }
            let context = try global.context()
            let plan = try Planner(context: context).plan(parsed)
            let failure = plan.problems.isEmpty ? nil : GuardFailure(.refused, plan.problems.joined(separator: "\n"))
            if json {
                try printJSON(PlanDocument(mode: "check", recipe: parsed, path: recipe, plan: plan, warnings: plan.warnings + (unsafe.map { [$0] } ?? []), problems: plan.problems))
                if let failure { throw DocumentPrinted(failure) }
                return
            }
            say("recipe \(parsed.name) (\(recipe), sha256 \(parsed.sha256.prefix(12))) is valid")
            Self.printRecipe(parsed, plan: plan, configuration: context.configuration)
            for warning in plan.warnings { say("warning: \(warning)") }
            if let failure { throw failure }
            if let unsafe { say("warning: \(unsafe)") }
        }

        /// The plan as `guard check` and `guard run --dry-run` print it.
        static func printRecipe(_ recipe: Recipe, plan: Plan?, configuration: GuardConfiguration?) {
            say("volumes:")
            for (index, volume) in recipe.volumes.enumerated() {
                if let planned = plan?.volumes.first(where: { $0.index == index }) {
                    say("  \(index + 1). \(volume.device) -> \(planned.originPath) (\(planned.info.number)), \(formatBytes(planned.originBytes))")
                    say("     mounted on: \(planned.mounts.map(\.target).joined(separator: ", ").ifEmpty("not mounted"))")
                    say("     snapshot: \(formatBytes(planned.cowBytes)) (\(planned.sizeNote)), chunk \(formatBytes(UInt64(planned.chunkSectors) * 512))")
                    switch planned.storage {
                    case .fileIn(let directory):
                        say("     COW: a preallocated file in \(directory)" + (planned.freeBytes.map { ", \(formatBytes($0)) free there" } ?? ""))
                        if planned.reserveBytes > 0 {
                            say("     fuse reserve: \(formatBytes(planned.reserveBytes)) more in the COW file, for what is written between stop_at and the fuse")
                        }
                    case .blockDevice(let path):
                        say("     COW: the device \(path) (overwritten)")
                    case .thinPool:
                        say("     COW: none: a thin snapshot in the volume's own pool (a rollback swaps the volume to it, no merge)")
                    }
                    if let policy = planned.extensionPolicy {
                        let source = planned.extensionFromConfiguration ? " (extend from \(configuration?.path ?? "guard.conf"))" : ""
                        say(
                            "     grows at \(Int(policy.threshold * 100))% by \(formatBytes(policy.stepBytes)) up to \(formatBytes(policy.maximumBytes - CowLabel.areaOffset - planned.reserveBytes))\(source)"
                        )
                    }
                    if let history = planned.history {
                        say("     earlier runs: peak COW use \(formatBytes(UInt64(history.peakBytes))) (\(history.runs) run\(history.runs == 1 ? "" : "s") of \(recipe.name))")
                    } else if plan != nil {
                        say("     earlier runs: none of \(recipe.name) in the journal")
                    }
                } else {
                    say("  \(index + 1). \(volume.device)" + (volume.mount.map { " on \($0)" } ?? "") + ", snapshot \(volume.size)" + (volume.cow.map { ", COW \($0)" } ?? ""))
                }
            }
            for (title, commands) in [
                ("quiesce", recipe.quiesce), ("resume", recipe.resume), ("steps", recipe.steps), ("verify", recipe.verify), ("rollback.stop", recipe.rollbackStop),
                ("rollback.start", recipe.rollbackStart),
            ] where !commands.isEmpty {
                say("\(title):")
                for (index, command) in commands.enumerated() {
                    var extras: [String] = []
                    if let timeout = command.timeout ?? (title == "steps" || title == "verify" ? recipe.defaultTimeout : nil) {
                        extras.append("timeout \(Units.formatDuration(timeout))")
                    }
                    if command.retries > 0 { extras.append("\(command.retries) retr\(command.retries == 1 ? "y" : "ies") every \(Units.formatDuration(command.interval))") }
                    if let user = command.user { extras.append("as \(user)") }
                    if let directory = command.workingDirectory { extras.append("in \(directory)") }
                    say("  \(index + 1). \(command.name): \(command.invocation)" + (extras.isEmpty ? "" : " (\(extras.joined(separator: ", ")))"))
                }
            }
            var success = recipe.onSuccess.description
            if case .keep(nil) = recipe.onSuccess, let configuration {
                success += configuration.keep.map { " (for \(Units.formatDuration($0)), guard.conf's keep)" } ?? " (until `guard commit` or `guard rollback`)"
            }
            let fuse = recipe.onFailure == .rollback ? ", and the volume refuses writes from there until the merge (the fuse)" : ""
            say("on success: \(success); on failure: \(recipe.onFailure); steps stop when a COW that cannot grow is \(Int(recipe.stopAtFill * 100))% full\(fuse)")
            say(
                RunCgroup.mountPoint.map { "steps run in a cgroup of the run's own under \($0)/guard" }
                    ?? "cgroup v2 is not mounted: steps are contained by their process group only")
        }
    }
}

extension String {
    func ifEmpty(_ replacement: String) -> String { isEmpty ? replacement : self }
}
