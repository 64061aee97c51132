import ArgumentParser
import BlockDevice
import Engine
import Foundation
import Journal

/// guard's state as Prometheus metrics, in the text exposition format node_exporter's
/// textfile collector reads. Docs/guide.md, "Metrics", lists the names.
///
/// Counters (`_total`) are counted from journal rows that are only ever added, so they never go
/// down; what is true now (kept runs, COW use, merges) is a gauge.
struct Metrics {
    var version = GuardCommand.version
    var tallies = Journal.Tallies()
    var open: [RunState: Int] = [:]
    var lastRun: RunRecord?
    var runs: [Maintenance.RunStatus] = []
    var attention = 0

    /// How a `guard run` can end (its `done` phase), always exported so no series appears late.
    static let endings: [RunOutcome] = [.committed, .kept, .rolledBack, .failed]
    /// How a run with nothing left to do ended.
    static let finals: [RunOutcome] = [.committed, .rolledBack, .failed, .recovered]

    /// The exposition text: HELP and TYPE for every family, every family present (zeros
    /// included) so a dashboard never sees a series vanish and come back.
    func text() -> String {
        var lines: [String] = []
        func family(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: String)]) {
            lines.append("# HELP \(name) \(help)")
            lines.append("# TYPE \(name) \(type)")
            for sample in samples { lines.append("\(name)\(sample.labels.isEmpty ? "" : "{\(sample.labels)}") \(sample.value)") }
        }
        func label(_ pairs: [(String, String)]) -> String {
            pairs.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",")
        }
        func runLabels(_ run: RunRecord, _ extra: [(String, String)] = []) -> String {
            label([("run", "\(run.id ?? 0)"), ("recipe", run.recipeName)] + extra)
        }
        family("guard_build_info", "gauge", "Always 1; the version of guard that wrote these metrics.", [(label([("version", version)]), "1")])
        family("guard_runs_started_total", "counter", "Runs started (every run the journal holds).", [("", "\(tallies.started)")])
        let endings = Self.endings.map(\.rawValue) + tallies.ended.keys.filter { key in !Self.endings.contains { $0.rawValue == key } }.sorted()
        family(
            "guard_runs_ended_total", "counter",
            "Runs whose guard run reached its end, by how it ended then (a kept run stays counted as kept when it is later committed or rolled back).",
            endings.map { (label([("outcome", $0)]), "\(tallies.ended[$0] ?? 0)") })
        family(
            "guard_runs_finished_total", "counter", "Runs with nothing left to do (no snapshot state), by their final outcome.",
            Self.finals.map { (label([("outcome", $0.rawValue)]), "\(tallies.finished[$0] ?? 0)") })
        family(
            "guard_open_runs", "gauge", "Runs that still hold snapshot state, by state.",
            RunState.open.map { (label([("state", $0.rawValue)]), "\(open[$0] ?? 0)") })
        family("guard_kept_runs", "gauge", "Runs whose snapshots are kept for a later rollback or commit.", [("", "\(open[.kept] ?? 0)")])
        let keeps = runs.compactMap { status in status.run.keepUntil.map { (status.run, $0) } }.filter { $0.0.state == .kept }
        family(
            "guard_run_keep_until_timestamp_seconds", "gauge", "When a kept run is committed by the maintenance timer (Unix time), per kept run with a keep duration.",
            keeps.map { (runLabels($0.0), seconds($0.1)) })
        let live = runs.flatMap { status in
            status.volumes.compactMap { volume -> (String, Maintenance.VolumeStatus)? in
                volume.usedBytes == nil ? nil : (runLabels(status.run, [("volume", volume.volume)]), volume)
            }
        }
        family("guard_snapshot_cow_used_bytes", "gauge", "COW space in use, per live snapshot.", live.map { ($0.0, "\($0.1.usedBytes ?? 0)") })
        family("guard_snapshot_cow_size_bytes", "gauge", "COW size (without guard's fuse reserve), per live snapshot.", live.map { ($0.0, "\($0.1.sizeBytes ?? 0)") })
        let merging = runs.flatMap { status in
            status.volumes.filter { $0.condition == .merging }.map {
                (runLabels(status.run, [("volume", $0.volume)]), $0)
            }
        }
        family("guard_merges_in_progress", "gauge", "Rollbacks whose merge is under way, one per volume.", [("", "\(merging.count)")])
        family("guard_merge_remaining_bytes", "gauge", "Bytes a merge still has to copy back, per merging volume.", merging.map { ($0.0, "\($0.1.remainingBytes ?? 0)") })
        family(
            "guard_attention", "gauge",
            "Things that need a person (`guard status` exits 3): unfinished runs, stale snapshots, blown fuses, failed merges, COWs 80% full, stray devices.",
            [("", "\(attention)")])
        let reassembly = runs.filter(\.needsReassembly).count
        family("guard_needs_reassembly", "gauge", "Runs whose snapshot holds old blocks but is not live (`guard status` exits 4).", [("", "\(reassembly)")])
        let recipes = tallies.recipes.sorted { $0.key < $1.key }
        family(
            "guard_recipe_last_end_timestamp_seconds", "gauge", "When the newest run of a recipe reached its end (Unix time).",
            recipes.map { (label([("recipe", $0.key)]), seconds($0.value.lastEnd)) })
        family(
            "guard_recipe_last_duration_seconds", "gauge", "How long the newest run of a recipe took, from its start to its end (seconds).",
            recipes.map { (label([("recipe", $0.key)]), seconds($0.value.lastDuration)) })
        family(
            "guard_recipe_last_success_timestamp_seconds", "gauge", "When a run of a recipe last applied its upgrade (committed or kept; Unix time).",
            recipes.compactMap { entry in entry.value.lastSuccess.map { (label([("recipe", entry.key)]), seconds($0)) } })
        let last = lastRun.map { runLabels($0) } ?? ""
        family("guard_last_run_start_timestamp_seconds", "gauge", "When the newest run started (Unix time).", lastRun.map { [(last, seconds($0.startedAt))] } ?? [])
        family(
            "guard_last_run_end_timestamp_seconds", "gauge", "When the newest run finished (Unix time); absent while it runs.",
            lastRun.flatMap { run in run.finishedAt.map { [(last, seconds($0))] } } ?? [])
        family(
            "guard_last_run_exit_code", "gauge", "The exit code of the newest run (0 applied, 1 rolled back, 3 attention, ...); absent while it runs.",
            lastRun.flatMap { run in run.exitCode.map { [(last, "\($0)")] } } ?? [])
        return lines.joined(separator: "\n") + "\n"
    }

    /// The metrics as they are now: the journal's tallies and open runs, and what the kernel
    /// says of every live snapshot and merge. Changes nothing.
    static func collect(context: GuardContext) throws -> Metrics {
        var metrics = Metrics()
        if let journal = try context.existingJournal() {
            metrics.tallies = try journal.tallies()
            for run in try journal.runs(in: RunState.open) { metrics.open[run.state, default: 0] += 1 }
            metrics.lastRun = try journal.lastRun()
        }
        let (runs, strays, _) = try Maintenance(context: context).status()
        metrics.runs = runs
        metrics.attention = Maintenance.attention(runs, strays: strays).count
        return metrics
    }

    func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }

    func seconds(_ value: Double) -> String { String(format: "%.3f", value) }
}

extension GuardCommand {
    struct MetricsCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "metrics",
            abstract: "guard's runs, kept snapshots, COW use and merges as Prometheus metrics.",
            discussion: """
                Prints the metrics in Prometheus's text format, or with --textfile DIR writes them to DIR/guard.prom for node_exporter's textfile collector (written to a temporary file in DIR, synced, then renamed, so the collector never reads half a file). guard-monitor.service writes them to /var/lib/prometheus/node-exporter every minute when that directory exists (Debian's prometheus-node-exporter reads it), and guard-maintenance.service after each housekeeping pass. Counters (_total) never go down; alert rules and a Grafana dashboard are in /usr/share/guard/monitoring.

                Families: guard_build_info{version}, guard_runs_started_total, guard_runs_ended_total{outcome}, guard_runs_finished_total{outcome}, guard_open_runs{state}, guard_kept_runs, guard_run_keep_until_timestamp_seconds{run,recipe}, guard_snapshot_cow_used_bytes and guard_snapshot_cow_size_bytes{run,recipe,volume}, guard_merges_in_progress, guard_merge_remaining_bytes{run,recipe,volume}, guard_attention, guard_needs_reassembly, guard_recipe_last_end_timestamp_seconds, guard_recipe_last_duration_seconds and guard_recipe_last_success_timestamp_seconds{recipe}, guard_last_run_start_timestamp_seconds, guard_last_run_end_timestamp_seconds and guard_last_run_exit_code{run,recipe}. Changes nothing.

                Examples:
                  guard metrics
                  guard metrics --textfile /var/lib/prometheus/node-exporter
                """)

        @OptionGroup var global: GlobalOptions

        @Option(help: ArgumentHelp("Write DIR/guard.prom (node_exporter's --collector.textfile.directory) instead of printing.", valueName: "dir"))
        var textfile: String?

        func run() async throws {
            if let textfile {
                var isDirectory: ObjCBool = false
                guard FileManager.default.fileExists(atPath: textfile, isDirectory: &isDirectory), isDirectory.boolValue else {
                    throw GuardFailure(
                        .refused,
                        "--textfile \(textfile) is not a directory; name node_exporter's --collector.textfile.directory (Debian: /var/lib/prometheus/node-exporter); nothing was written"
                    )
                }
            }
            let text = try Metrics.collect(context: try global.context()).text()
            guard let textfile else {
                StandardStreams.out(text)
                return
            }
            try Self.writeAtomically(text, to: "\(textfile)/guard.prom")
        }

        /// A temporary file beside the target, synced, renamed over it.
        static func writeAtomically(_ text: String, to path: String) throws {
            do { try RawFile.replace(path, with: Array(text.utf8), mode: 0o644) } catch {
                throw GuardFailure(.attention, "cannot write \(path): \(error)")
            }
        }
    }
}
