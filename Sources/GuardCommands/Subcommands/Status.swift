import ArgumentParser
import BlockDevice
import Engine
import Foundation
import Journal
import Quantities
import Recipe

struct StatusOutput: Encodable {
    struct Volume: Encodable {
        var volume: String
        var origin: String
        var state: String
        var status: String
        /// `status` as one word (Maintenance.Condition), for programs.
        var condition: String
        var usedBytes: UInt64?
        var sizeBytes: UInt64?
        var fill: Double?
        var changedSinceEndBytes: UInt64?
        var mergeProgress: Double?
        var remainingBytes: UInt64?
        /// Why a volume needs reassembly, and what to mount or activate.
        var detail: String?
        enum CodingKeys: String, CodingKey {
            case volume, origin, state, status, condition, fill, detail
            case usedBytes = "used_bytes"
            case sizeBytes = "size_bytes"
            case changedSinceEndBytes = "changed_since_end_bytes"
            case mergeProgress = "merge_progress"
            case remainingBytes = "remaining_bytes"
        }
    }

    struct Run: Encodable {
        var id: Int64
        var token: String
        var recipe: String
        var state: String
        var outcome: String?
        var keepUntil: String?
        /// What the next boot does to the run (a scheduled rollback, a boot assessment).
        var pendingAtBoot: String?
        var volumes: [Volume]
        enum CodingKeys: String, CodingKey {
            case id, token, recipe, state, outcome, volumes
            case keepUntil = "keep_until"
            case pendingAtBoot = "pending_at_boot"
        }
    }

    var runs: [Run]
    var strayDevices: [String]
    /// guard devices of runs this journal never had (another state directory's): left alone.
    var unknownDevices: [String]
    /// What needs a person (exit 3), one line each; empty when nothing does.
    var attention: [String]
    enum CodingKeys: String, CodingKey {
        case runs, attention
        case strayDevices = "stray_devices"
        case unknownDevices = "unknown_devices"
    }
}

extension GuardCommand {
    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status",
            abstract: "Live snapshots, their COW fill, merges and their progress.",
            discussion: """
                Changes nothing, unless told to: --tidy tears down merges the kernel has completed and commits kept runs whose keep duration has passed (guard-maintenance.timer runs `guard status --tidy --wait`); --wait waits for every merge under way and tears it down.

                Exits 0 when all is well, 4 when a run needs reassembly, and 3 when something else needs a person: a run that did not finish, a stale snapshot, a fuse that has blown, a merge that failed, a volume not rolled back, a COW 80% full or more, a stray guard device. Each is named on stderr with what to run, so a monitoring check can run `guard status --quiet`.

                A guard device of a run this journal never had (another state directory's, or a replaced journal's) is listed, left alone, and needs no attention.

                --json prints {"runs": [...], "stray_devices": [...], "unknown_devices": [...], "attention": [...]} (/usr/share/doc/guard/schema/status.schema.json); each run has id, token, recipe, state, outcome, keep_until and volumes (volume, origin, state, status, condition, used_bytes, size_bytes, fill, changed_since_end_bytes, merge_progress, remaining_bytes, detail).

                Examples:
                  guard status
                  guard status --tidy --wait
                  guard status --watch
                  guard status --watch --json   # one status document per line (JSON lines)
                  guard status --json
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "Print JSON.")
        var json = false

        @Flag(help: "Wait for merges under way to complete and tear them down.")
        var wait = false

        @Flag(help: "Tear down completed merges and commit kept runs whose keep duration has passed (the maintenance job).")
        var tidy = false

        @Flag(help: "Show the status again every --interval seconds until Ctrl-C, in place on a terminal; with --json, one document per line. Changes nothing.")
        var watch = false

        @Option(help: ArgumentHelp("Seconds between two views with --watch.", valueName: "seconds"))
        var interval: Double = 2

        func validate() throws {
            if watch && (tidy || wait) { throw ValidationError("--watch shows the status only: leave out --tidy and --wait") }
            if !(0.2...3600).contains(interval) { throw ValidationError("--interval must be between 0.2 and 3600 seconds, not \(interval)") }
        }

        func run() async throws {
            let context = try global.context()
            let maintenance = Maintenance(context: context)
            if watch { try await Self.watch(maintenance, every: interval, json: json) }
            if tidy, let journal = try context.existingJournal() {
                if let wait = try maintenance.tidyWaitsForReassembly(journal: journal) {
                    context.reporter.warning(wait)
                } else {
                    try maintenance.tidy(journal: journal)
                }
            }
            // A merge that needs reassembly cannot be waited for: the others are, then status says why.
            var waitFailure: GuardFailure?
            if wait {
                do { try await maintenance.waitForAllMerges() } catch let failure as GuardFailure where failure.kind == .needsReassembly {
                    waitFailure = failure
                }
            }
            let (runs, strays, unknown) = try maintenance.status()
            if !tidy, let journal = try context.existingJournal() { Self.noteChores(maintenance, journal: journal, runs: runs, reporter: context.reporter) }
            let attention = Maintenance.attention(runs, strays: strays)
            let output = Self.output(runs, strays: strays, unknown: unknown, attention: attention)
            let waiting = runs.flatMap { status in
                status.volumes.filter { $0.condition == .needsReassembly }.map { "run \(status.run.id!), \($0.volume): \($0.detail ?? "not live")" }
            }
            let needsReassembly = waitFailure != nil || runs.contains(where: \.needsReassembly)
            let exitCode: Engine.ExitCode = needsReassembly ? .needsReassembly : (attention.isEmpty ? .success : .attention)
            for line in waiting { context.reporter.event(.needsReassembly, "needs reassembly: \(line)") }
            defer {
                if needsReassembly {
                    let lines = waiting.isEmpty ? [waitFailure?.message ?? "a run needs reassembly; run `guard recover`"] : waiting
                    StandardStreams.error("guard: needs reassembly (nothing is torn down or removed):\n" + lines.map { "guard:   \($0)\n" }.joined())
                }
                if !attention.isEmpty {
                    StandardStreams.error("guard: needs attention:\n" + attention.map { "guard:   \($0)\n" }.joined())
                }
            }
            if json {
                try printJSON(output)
                if exitCode != .success { throw ExitCodeError(exitCode) }
                return
            }
            for line in Self.lines(output, runs: runs) { say(line) }
            if exitCode != .success { throw ExitCodeError(exitCode) }
        }

        /// `--watch`: the human view again and again; on a terminal the screen is cleared and
        /// redrawn in place, elsewhere each view follows the last after a time line. Ctrl-C ends it.
        /// With --json: one status document per view, each on one line (JSON lines), for a
        /// program that follows the status. It ends (exit 0) when its reader is gone
        /// (`guard status --watch --json | head -n 3`).
        static func watch(_ maintenance: Maintenance, every seconds: Double, json: Bool = false) async throws -> Never {
            let terminal = isatty(STDOUT_FILENO) == 1
            while true {
                let (runs, strays, unknown) = try maintenance.status()
                if json {
                    let document = Self.output(runs, strays: strays, unknown: unknown, attention: Maintenance.attention(runs, strays: strays))
                    guard try writeJSON(document, compact: true) else { throw ExitCodeError(.success) }
                    try await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
                    continue
                }
                let text = Self.watchView(
                    runs, strays: strays, unknown: unknown, header: "guard status, every \(oneDecimal(seconds))s: \(formatDate(Date().timeIntervalSince1970))")
                // Home, the view, then erase what an older, longer view left below it.
                let shown = StandardStreams.out(terminal ? "\u{1B}[H" + text.replacingOccurrences(of: "\n", with: "\u{1B}[K\n") + "\u{1B}[J" : text + "\n")
                guard shown else { throw ExitCodeError(.success) }
                try await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
            }
        }

        /// One view of `--watch`: the header, the status, and what needs attention that the
        /// status lines do not already say (a stray device is one of them: it is not repeated).
        static func watchView(_ runs: [Maintenance.RunStatus], strays: [String], unknown: [String] = [], header: String) -> String {
            let attention = Maintenance.attention(runs, strays: strays)
            var lines = [header, ""] + Self.lines(Self.output(runs, strays: strays, unknown: unknown, attention: attention), runs: runs)
            let unsaid = attention.filter { !lines.contains($0) }
            if !unsaid.isEmpty { lines += ["", "needs attention:"] + unsaid.map { "  \($0)" } }
            return lines.joined(separator: "\n") + "\n"
        }

        /// The status as data (`--json`, and the lines of the human view).
        static func output(_ runs: [Maintenance.RunStatus], strays: [String], unknown: [String], attention: [String]) -> StatusOutput {
            StatusOutput(
                runs: runs.map { status in
                    StatusOutput.Run(
                        id: status.run.id!, token: status.run.token, recipe: status.run.recipeName, state: status.run.state.rawValue,
                        outcome: status.run.outcome?.rawValue, keepUntil: iso8601(status.run.keepUntil), pendingAtBoot: status.pendingAtBoot,
                        volumes: status.volumes.map { volume in
                            StatusOutput.Volume(
                                volume: volume.volume, origin: volume.origin, state: volume.state.rawValue, status: volume.status, condition: volume.condition.rawValue,
                                usedBytes: volume.usedBytes,
                                sizeBytes: volume.sizeBytes, fill: volume.usedBytes.flatMap { used in volume.sizeBytes.map { Double(used) / Double(max($0, 1)) } },
                                changedSinceEndBytes: volume.changedSinceEndBytes, mergeProgress: volume.mergeProgress, remainingBytes: volume.remainingBytes, detail: volume.detail
                            )
                        })
                }, strayDevices: strays, unknownDevices: unknown, attention: attention)
        }

        /// The human view of a status.
        static func lines(_ output: StatusOutput, runs: [Maintenance.RunStatus]) -> [String] {
            var lines: [String] = []
            if output.runs.isEmpty { lines.append("no live snapshots or merges") }
            for run in output.runs {
                var header = "run \(run.id) (\(run.recipe)): \(run.state)"
                if let until = runs.first(where: { $0.run.id == run.id })?.run.keepUntil { header += " until \(formatDate(until))" }
                lines.append(header)
                if let pending = run.pendingAtBoot { lines.append("  at the next boot: \(pending)") }
                for volume in run.volumes {
                    var line = "  \(volume.volume): \(volume.status)"
                    if let used = volume.usedBytes, let size = volume.sizeBytes {
                        line += ", COW \(formatBytes(used)) of \(formatBytes(size)) (\(Int((volume.fill ?? 0) * 100))%)"
                    }
                    if let since = volume.changedSinceEndBytes, since > 0 {
                        line += "; \(formatBytes(since)) written since the run ended (`guard rollback \(run.id)` would throw it away)"
                    }
                    if let progress = volume.mergeProgress, volume.condition == Maintenance.Condition.merging.rawValue {
                        line += " \(Int(progress * 100))%, \(formatBytes(volume.remainingBytes ?? 0)) to go"
                    }
                    lines.append(line)
                    if let detail = volume.detail { lines.append("    \(detail)") }
                }
            }
            for stray in output.strayDevices { lines.append("stray guard device (no open run): \(stray); `guard recover` removes it") }
            for device in output.unknownDevices {
                lines.append("guard device of a run this journal does not know: \(device); another state directory's, or a replaced journal's; guard leaves it alone")
            }
            return lines
        }

        /// Says what the housekeeping would do, without doing it.
        static func noteChores(_ maintenance: Maintenance, journal: Journal, runs: [Maintenance.RunStatus], reporter: any Reporter) {
            for (run, chore) in (try? maintenance.chores(journal: journal)) ?? [] {
                switch chore {
                case .commitExpired(let until):
                    reporter.note("run \(run.id!) was kept until \(formatDate(until)); the maintenance job (or `guard status --tidy`) commits it")
                case .finishMerge:
                    let volumes = runs.first { $0.run.id == run.id }?.volumes ?? []
                    if !volumes.isEmpty, volumes.allSatisfy({ $0.condition == .merged }) {
                        reporter.note("run \(run.id!): the merge is complete; the maintenance job (or `guard status --tidy`) tears it down")
                    }
                }
            }
        }
    }
}
