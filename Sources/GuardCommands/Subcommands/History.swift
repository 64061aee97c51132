import ArgumentParser
import Engine
import Foundation
import Journal
import Quantities
import Recipe

/// Microseconds as seconds, for `--json` (durations are seconds).
func seconds(microseconds: Int64) -> Double { Double(microseconds) / 1_000_000 }

/// `history --json`: one run.
struct HistoryEntry: Encodable {
    struct Snapshot: Encodable {
        var volume: String
        var sizeBytes: Int64
        var peakUsedBytes: Int64
        var suspendUs: Int64?
        /// The suspend window in seconds (`suspend_us`, its microseconds, is deprecated: schema 2 drops it).
        var suspendSeconds: Double?
        var state: String

        enum CodingKeys: String, CodingKey {
            case volume, state
            case sizeBytes = "size_bytes"
            case peakUsedBytes = "peak_used_bytes"
            case suspendUs = "suspend_us"
            case suspendSeconds = "suspend_seconds"
        }
    }

    var id: Int64
    var token: String
    var recipe: String
    var recipeSHA256: String
    var state: String
    var outcome: String?
    var startedAt: String?
    var finishedAt: String?
    var durationSeconds: Double?
    var exitCode: Int?
    var error: String?
    var keepUntil: String?
    var suspendUs: Int64?
    /// The suspend window in seconds (`suspend_us`, its microseconds, is deprecated: schema 2 drops it).
    var suspendSeconds: Double?
    var snapshots: [Snapshot]

    enum CodingKeys: String, CodingKey {
        case id, token, recipe, state, outcome, error, snapshots
        case recipeSHA256 = "recipe_sha256"
        case startedAt = "started_at"
        case finishedAt = "finished_at"
        case durationSeconds = "duration_seconds"
        case exitCode = "exit_code"
        case keepUntil = "keep_until"
        case suspendUs = "suspend_us"
        case suspendSeconds = "suspend_seconds"
    }

    init(_ run: RunSummary) {
        id = run.id
        token = run.token
        recipe = run.recipe
        recipeSHA256 = run.recipeSHA256
        state = run.state.rawValue
        outcome = run.outcome?.rawValue
        startedAt = iso8601(run.startedAt)
        finishedAt = iso8601(run.finishedAt)
        durationSeconds = run.finishedAt.map { (($0 - run.startedAt) * 1000).rounded() / 1000 }
        exitCode = run.exitCode
        error = run.error
        keepUntil = iso8601(run.keepUntil)
        suspendUs = run.suspendMicroseconds
        suspendSeconds = run.suspendMicroseconds.map(seconds(microseconds:))
        snapshots = run.volumes.map {
            Snapshot(
                volume: $0.volume, sizeBytes: $0.sizeBytes, peakUsedBytes: $0.peakUsedBytes, suspendUs: run.suspendMicroseconds,
                suspendSeconds: run.suspendMicroseconds.map(seconds(microseconds:)), state: $0.state.rawValue)
        }
    }
}

extension GuardCommand {
    struct History: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "history",
            abstract: "The audit trail: every run, newest first.",
            discussion: """
                One line a run: its number, recipe, start, duration, volumes, snapshot size, peak COW use and outcome (committed, kept, rolled_back, failed, recovered). Reads only the journal: no root or device-mapper needed beyond reading it.

                --json prints {"runs": [...]} (/usr/share/doc/guard/schema/history.schema.json) with stable snake_case keys, every key present (null when it has no value): id, token, recipe, recipe_sha256, state, outcome, started_at, finished_at, duration_seconds, exit_code, error, keep_until, suspend_seconds (suspend_us: deprecated), snapshots (volume, size_bytes, peak_used_bytes, suspend_seconds, state). /usr/share/doc/guard/guide.md describes every field.

                Examples:
                  guard history
                  guard history --recipe website-schema-v2 --limit 5
                  guard history --json | jq '.runs[] | select(.outcome == "rolled_back")'
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "Print JSON.")
        var json = false

        @Option(help: "Show at most this many runs.")
        var limit: Int = 50

        @Option(help: ArgumentHelp("Only runs of this recipe (its name).", valueName: "name"))
        var recipe: String?

        func run() throws {
            let context = try global.context()
            let runs = try context.existingJournal()?.history(limit: max(limit, 0), recipe: recipe) ?? []
            if json {
                try printJSON(["runs": runs.map(HistoryEntry.init)])
                return
            }
            if runs.isEmpty {
                say("no runs in \(context.journalPath)")
                return
            }
            var rows = [["RUN", "RECIPE", "STARTED", "DURATION", "VOLUMES", "SNAPSHOT", "PEAK COW", "OUTCOME"]]
            for run in runs {
                let duration = run.finishedAt.map { Units.formatDuration(.milliseconds(Int64(($0 - run.startedAt) * 1000))) } ?? "-"
                let size = run.volumes.reduce(Int64(0)) { $0 + $1.sizeBytes }
                let peak = run.volumes.reduce(Int64(0)) { $0 + $1.peakUsedBytes }
                var outcome = run.outcome?.rawValue ?? run.state.rawValue
                if run.state == .kept, let until = run.keepUntil { outcome += " until \(formatDate(until))" }
                if run.state == .merging { outcome += " (merging)" }
                rows.append([
                    "\(run.id)", run.recipe, formatDate(run.startedAt), duration, "\(run.volumes.count)",
                    formatBytes(UInt64(size)), formatBytes(UInt64(peak)), outcome,
                ])
            }
            say(table(rows))
        }
    }
}

/// Left-aligned columns, two spaces apart.
func table(_ rows: [[String]]) -> String {
    guard let first = rows.first else { return "" }
    var widths = first.map(\.count)
    for row in rows { for (index, cell) in row.enumerated() where index < widths.count { widths[index] = max(widths[index], cell.count) } }
    return rows.map { row in
        row.enumerated().map { index, cell in
            index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
        }.joined(separator: "  ")
    }.joined(separator: "\n")
}
