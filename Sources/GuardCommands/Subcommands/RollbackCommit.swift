import ArgumentParser
import BlockDevice
import Engine
import Foundation
import Quantities
import Recipe
import Watchdog

extension GuardCommand {
    struct Rollback: AsyncParsableCommand {
        func printPreview(_ preview: RollbackPreview) {
            for line in GuardCommand.describe(preview) { say(line) }
            say("dry run: nothing was touched; `guard diff \(preview.run)` lists the files that differ")
        }

        static let configuration = CommandConfiguration(
            commandName: "rollback",
            abstract: "Undo a kept run: merge its snapshots back into the volumes.",
            discussion: """
                Runs the recipe's rollback.stop commands, unmounts the volumes, starts the kernel's merge, mounts the volumes again and runs rollback.start. The volumes read as before the run from the moment the merge starts, so the service is back at once; the merge finishes in the background (`guard status` shows its progress; the next guard command or `guard status --wait` tears it down).

                Refused for a run that was committed, rolled back, is unknown or unfinished, and when a snapshot is Invalid (its COW filled up: the old data is gone).

                A run that includes / or /usr (mounted by the initramfs, never unmounted while the system runs) is rolled back at the next boot: the decision is journaled, and guard's initramfs script starts the merge before it mounts the root. --reboot reboots at once; `guard commit` before the reboot cancels the rollback.

                --dry-run makes the same checks and says what the rollback would do (the hooks, the unmounts, the processes that use the volumes) and what it would throw away: the bytes of each volume that differ from before the run, and of those the ones first written after the run ended (at least that much of what was written while the run was kept is lost). Nothing is touched.

                Examples:
                  guard rollback --dry-run 12
                  guard rollback 12
                  guard rollback --wait 3f9a2c1e
                  guard rollback --reboot 14
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The run: its number or token (see `guard history`).", valueName: "run"), completion: Completions.runs)
        var target: String

        @Flag(help: "Wait until the merge is complete and torn down.")
        var wait = false

        @Flag(help: "For a run that includes / or /usr (merged at the next boot, by the initramfs): reboot now.")
        var reboot = false

        @Flag(
            help:
                "Roll back even though the recipe journaled with the run does not parse (its rollback.stop and rollback.start hooks are then not run: stop what uses the volumes first)."
        )
        var withoutHooks = false

        @Flag(name: .customLong("dry-run"), help: "Say what the rollback would do and what it would throw away; touch nothing.")
        var dryRun = false

        @Flag(
            help:
                "Print the run afterwards as `guard show --json` does (/usr/share/doc/guard/schema/run.schema.json); with --dry-run, the preview (/usr/share/doc/guard/schema/rollback-plan.schema.json)."
        )
        var json = false

        func run() async throws {
            let context = try global.context()
            if dryRun {
                let preview = try Maintenance(context: context).rollbackPreview(target, withoutHooks: withoutHooks)
                if json { try printJSON(RollbackPlanDocument(preview)) } else { printPreview(preview) }
                return
            }
            let outcome = try await Maintenance(context: context).rollback(target, wait: wait, withoutHooks: withoutHooks)
            context.reporter.note(outcome.message)
            if json { try printRunDocument(target, context: context) }
            if outcome.atBoot && reboot {
                context.reporter.note("rebooting")
                try systemReboot()
            }
        }
    }

    /// The dry run for people: what happens in order, then what is thrown away.
    static func describe(_ preview: RollbackPreview) -> [String] {
        var lines = ["run \(preview.run): a rollback would" + (preview.atBoot ? " be done at the next boot (the initramfs merges the volumes before it mounts the root)" : "")]
        for hook in preview.stopHooks { lines.append("  run rollback.stop: \(hook)") }
        for volume in preview.volumes {
            for target in volume.unmounts { lines.append("  unmount \(target)") }
            if !volume.users.isEmpty {
                lines.append(
                    "    in use by \(volume.users.joined(separator: ", ")): unless rollback.stop stops \(volume.users.count == 1 ? "it" : "them") (or \(volume.users.count == 1 ? "it is" : "they are") the run's own), the unmount fails and nothing is merged"
                )
            }
        }
        for volume in preview.volumes {
            var line = "  merge \(volume.volume) back"
            if let changed = volume.changedBytes {
                line += ": \(formatBytes(changed)) differ from before the run"
                if let since = volume.changedSinceEndBytes {
                    line += "; \(formatBytes(since)) of them first written after the run ended (thrown away: at least that much of what was written since)"
                } else {
                    line += " (how much of it since the run ended is not journaled for this run)"
                }
            }
            lines.append(line)
        }
        for volume in preview.volumes { for target in volume.unmounts.reversed() { lines.append("  mount \(target) again") } }
        for hook in preview.startHooks { lines.append("  run rollback.start: \(hook)") }
        return lines
    }

    struct Commit: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "commit",
            abstract: "Make a kept run final: drop its snapshots.",
            discussion: """
                The volumes keep their current data; the snapshot devices and COW files are removed. Kept runs past their keep duration are committed by `guard run`, `guard status` and the guard-maintenance timer.

                Examples:
                  guard commit 12
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The run: its number or token.", valueName: "run"), completion: Completions.runs)
        var target: String

        @Flag(help: "Print the run afterwards as `guard show --json` does (/usr/share/doc/guard/schema/run.schema.json).")
        var json = false

        func run() throws {
            let context = try global.context()
            let message = try Maintenance(context: context).commit(target)
            context.reporter.note(message)
            if json { try printRunDocument(target, context: context) }
        }
    }

    struct Assess: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "assess",
            abstract: "After the reboot into an upgrade: run the verify_after_boot checks of the runs kept across it.",
            discussion: """
                A run whose recipe has verify_after_boot ends kept, and the system reboots into the upgrade. Each boot is counted before the volumes are mounted (in the initramfs for /); guard-assess.service runs this command once the system is up. Checks that pass leave the run kept, as the recipe says. Checks that fail roll the run back: at the next boot for a run that includes / or /usr (--reboot reboots at once), at once for the others. A run whose boot_attempts boots never reach the checks is rolled back at the next boot by the early recovery.

                Exit status 0 when every check passed (or no run waits), 3 when a run failed its checks.

                Examples:
                  guard assess
                  guard assess --reboot
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "When a failed run is rolled back at the next boot, reboot now.")
        var reboot = false

        func run() async throws {
            let context = try global.context()
            let outcome = try await BootAssessment(context: context).assess()
            for line in outcome.lines { say(line) }
            if outcome.rollbackAtBoot && reboot {
                context.reporter.note("rebooting")
                try systemReboot()
            }
            if !outcome.failed.isEmpty {
                throw GuardFailure(.attention, "verify_after_boot failed for run \(outcome.failed.map(String.init).joined(separator: ", ")); see `guard show`")
            }
        }
    }

    struct Recover: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "recover",
            abstract: "After a crash or reboot: bring the kernel, the COW labels and the journal back into agreement.",
            discussion: """
                Activates guard volumes, reassembles snapshots and merges from their COW labels, and finishes or undoes every run that did not finish: a commit that was under way is completed, a run that stopped during its steps is rolled back (or kept, if its recipe says so), a merge is continued and torn down when the kernel reports it complete. Stray guard devices and COW files are removed. Running it again changes nothing.

                --boot is for the guard-reassemble unit, before local filesystems are mounted: it reassembles and starts merges at once, and runs no hooks.

                --boot --device DEVICE is for guard-hold@.service: a volume with a kept snapshot that is activated after the boot units (a volume group whose disk appears late) is held by guard's udev rule, unmounted, until this has stacked its snapshot again; then udev and systemd see it ready and mount it. Only the runs with a snapshot of DEVICE are recovered.

                Examples:
                  guard recover
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "Early boot mode (the systemd unit uses it).")
        var boot = false

        @Flag(help: "With --boot: in the initramfs, before the root is mounted (guard's initramfs script uses it).")
        var initramfs = false

        @Option(help: ArgumentHelp("With --boot: only the runs with a snapshot of this volume (guard-hold@.service uses it).", valueName: "device"))
        var device: String?

        @Flag(help: "Finish runs even when the recipe journaled with them does not parse (their rollback hooks are then not run: stop what uses the volumes first).")
        var withoutHooks = false

        @Flag(help: "Print what was done as JSON (/usr/share/doc/guard/schema/recover.schema.json): actions, problems, needs_reassembly.")
        var json = false

        struct Document: Encodable {
            var actions: [String]
            var problems: [String]
            var needsReassembly: [String]
            enum CodingKeys: String, CodingKey {
                case actions, problems
                case needsReassembly = "needs_reassembly"
            }
        }

        func run() async throws {
            let context = try global.context(keepingValid: true)
            var recovery = Recovery(context: context)
            recovery.withoutHooks = withoutHooks
            if let device {
                guard boot, !initramfs else { throw GuardFailure(.refused, "--device is for `guard recover --boot --device DEVICE` (guard-hold@.service); nothing was touched") }
                recovery.onlyOrigin = try VolumeHolds.volumeUUID(device, context: context)
            }
            let report = try await recovery.recover(boot: boot || initramfs, initramfs: initramfs)
            if json {
                try printJSON(Document(actions: report.actions, problems: report.problems, needsReassembly: report.needsReassembly))
            } else {
                for action in report.actions { say(action) }
                if report.actions.isEmpty && report.problems.isEmpty && report.needsReassembly.isEmpty { say("nothing to recover") }
            }
            var failure: GuardFailure?
            if !report.needsReassembly.isEmpty {
                for line in report.needsReassembly { context.reporter.event(.needsReassembly, "needs reassembly: \(line)") }
                let lines = report.problems + report.needsReassembly.map { "needs reassembly: \($0)" }
                failure = GuardFailure(.needsReassembly, lines.joined(separator: "\nguard: ") + "\nguard: nothing was removed; once that is there, run `guard recover`")
            } else if !report.problems.isEmpty {
                failure = GuardFailure(.attention, report.problems.joined(separator: "\nguard: "))
            }
            if let failure { throw json ? DocumentPrinted(failure) : failure }
        }
    }

    struct WatchdogCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "__watchdog", abstract: "Internal: the suspend-window watchdog.", shouldDisplay: false)

        func run() throws {
            throw ExitCodeError(WatchdogServer.serve() == 0 ? .success : .attention)
        }
    }
}

/// `systemctl reboot`, for a rollback journaled for the next boot.
func systemReboot() throws {
    let finished: Spawn.Finished
    do { finished = try Spawn.run("/bin/systemctl", ["reboot"]) } catch {
        throw GuardFailure(.attention, "`systemctl reboot` did not start (\(error)); the rollback is journaled for the next boot: reboot by hand")
    }
    guard finished.status == 0 else {
        let words = finished.text.isEmpty ? "" : ": \(finished.text)"
        throw GuardFailure(.attention, "`systemctl reboot` failed (status \(finished.status))\(words); the rollback is journaled for the next boot: reboot by hand")
    }
}
