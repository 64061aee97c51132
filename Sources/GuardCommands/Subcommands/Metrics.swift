import ArgumentParser
import Engine
import Foundation
import Journal

/// guard's state as Prometheus metrics, in the text exposition format node_exporter's
/// textfile collector reads. Docs/guide.md, "Metrics", lists the names.
struct Metrics {
    var outcomes: [RunOutcome: Int] = [:]
    var open: [RunState: Int] = [:]
    var lastRun: RunRecord?
    var runs: [Maintenance.RunStatus] = []
    var attention = 0

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
        family("guard_runs_total", "counter", "Runs journaled, by their outcome (a kept run counts as kept until it is committed or rolled back).",
               RunOutcome.allCases.map { (label([("outcome", $0.rawValue)]), "\(outcomes[$0] ?? 0)") })
        family("guard_open_runs", "gauge", "Runs that still hold snapshot state, by state.",
               RunState.open.map { (label([("state", $0.rawValue)]), "\(open[$0] ?? 0)") })
        family("guard_kept_runs", "gauge", "Runs whose snapshots are kept for a later rollback or commit.", [("", "\(open[.kept] ?? 0)")])
        let live = runs.flatMap { status in status.volumes.compactMap { volume -> (String, Maintenance.VolumeStatus)? in
            volume.usedBytes == nil ? nil : (label([("run", "\(status.run.id ?? 0)"), ("recipe", status.run.recipeName), ("volume", volume.volume)]), volume)
        } }
        family("guard_snapshot_cow_used_bytes", "gauge", "COW space in use, per live snapshot.", live.map { ($0.0, "\($0.1.usedBytes ?? 0)") })
        family("guard_snapshot_cow_size_bytes", "gauge", "COW size (without guard's fuse reserve), per live snapshot.", live.map { ($0.0, "\($0.1.sizeBytes ?? 0)") })
        let merging = runs.flatMap { status in status.volumes.filter { $0.status == "merging" }.map {
            (label([("run", "\(status.run.id ?? 0)"), ("recipe", status.run.recipeName), ("volume", $0.volume)]), $0)
        } }
        family("guard_merges_in_progress", "gauge", "Rollbacks whose merge is under way, one per volume.", [("", "\(merging.count)")])
        family("guard_merge_remaining_bytes", "gauge", "Bytes a merge still has to copy back, per merging volume.", merging.map { ($0.0, "\($0.1.remainingBytes ?? 0)") })
        family("guard_attention", "gauge", "Things that need a person (`guard status` exits 3): unfinished runs, stale snapshots, blown fuses, failed merges, COWs 80% full, stray devices.", [("", "\(attention)")])
        let reassembly = runs.filter(\.needsReassembly).count
        family("guard_needs_reassembly", "gauge", "Runs whose snapshot holds old blocks but is not live (`guard status` exits 4).", [("", "\(reassembly)")])
        let last = lastRun.map { label([("run", "\($0.id ?? 0)"), ("recipe", $0.recipeName)]) } ?? ""
        family("guard_last_run_start_timestamp_seconds", "gauge", "When the newest run started (Unix time).", lastRun.map { [(last, seconds($0.startedAt))] } ?? [])
        family("guard_last_run_end_timestamp_seconds", "gauge", "When the newest run finished (Unix time); absent while it runs.", lastRun.flatMap { run in run.finishedAt.map { [(last, seconds($0))] } } ?? [])
        family("guard_last_run_exit_code", "gauge", "The exit code of the newest run (0 applied, 1 rolled back, 3 attention, ...); absent while it runs.", lastRun.flatMap { run in run.exitCode.map { [(last, "\($0)")] } } ?? [])
        return lines.joined(separator: "\n") + "\n"
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
                Prints the metrics in Prometheus's text format, or with --textfile DIR writes them to DIR/guard.prom for node_exporter's textfile collector (written to a temporary file in DIR, synced, then renamed, so the collector never reads half a file). guard-maintenance.service writes them to /var/lib/prometheus/node-exporter every 15 minutes when that directory exists (Debian's prometheus-node-exporter reads it).

                Families: guard_runs_total{outcome}, guard_open_runs{state}, guard_kept_runs, guard_snapshot_cow_used_bytes and guard_snapshot_cow_size_bytes{run,recipe,volume}, guard_merges_in_progress, guard_merge_remaining_bytes{run,recipe,volume}, guard_attention, guard_needs_reassembly, guard_last_run_start_timestamp_seconds, guard_last_run_end_timestamp_seconds and guard_last_run_exit_code{run,recipe}. Changes nothing.

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
                    throw GuardFailure(.refused, "--textfile \(textfile) is not a directory; name node_exporter's --collector.textfile.directory (Debian: /var/lib/prometheus/node-exporter); nothing was written")
                }
            }
            let context = try global.context()
            var metrics = Metrics()
            if let journal = try context.existingJournal() {
                metrics.outcomes = try journal.outcomeCounts()
                for run in try journal.runs(in: RunState.open) { metrics.open[run.state, default: 0] += 1 }
                metrics.lastRun = try journal.lastRun()
            }
            let (runs, strays, _) = try Maintenance(context: context).status()
            metrics.runs = runs
            metrics.attention = Maintenance.attention(runs, strays: strays).count
            let text = metrics.text()
            guard let textfile else {
                FileHandle.standardOutput.write(Data(text.utf8))
                return
            }
            try Self.writeAtomically(text, to: "\(textfile)/guard.prom")
        }

        /// A temporary file beside the target, synced, renamed over it.
        static func writeAtomically(_ text: String, to path: String) throws {
            let temporary = path + ".\(getpid()).tmp"
            let descriptor = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
            guard descriptor >= 0 else { throw GuardFailure(.attention, "cannot write \(temporary): \(String(cString: strerror(errno)))") }
            let bytes = Array(text.utf8)
            let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
            let synced = fsync(descriptor) == 0
            close(descriptor)
            guard written == bytes.count, synced, rename(temporary, path) == 0 else {
                let reason = String(cString: strerror(errno))
                unlink(temporary)
                throw GuardFailure(.attention, "cannot write \(path): \(reason)")
            }
        }
    }
}
