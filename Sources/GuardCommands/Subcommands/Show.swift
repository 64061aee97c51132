import ArgumentParser
import Engine
import Foundation
import Journal
import Quantities
import Recipe

/// `show --json`: everything the journal knows about one run.
struct RunDetail: Encodable {
    struct Phase: Encodable {
        var name: String
        var status: String
        var startedAt: String?
        var finishedAt: String?
        var durationSeconds: Double?
        var detail: String?
        enum CodingKeys: String, CodingKey {
            case name, status, detail
            case startedAt = "started_at"
            case finishedAt = "finished_at"
            case durationSeconds = "duration_seconds"
        }
    }

    struct Step: Encodable {
        var kind: String
        var position: Int
        var name: String
        var argv: [String]
        var startedAt: String?
        var durationSeconds: Double?
        var termination: String?
        var exitCode: Int?
        var stdoutTail: String?
        var stderrTail: String?
        var outputBytes: Int64?
        enum CodingKeys: String, CodingKey {
            case kind, position, name, argv, termination
            case startedAt = "started_at"
            case durationSeconds = "duration_seconds"
            case exitCode = "exit_code"
            case stdoutTail = "stdout_tail"
            case stderrTail = "stderr_tail"
            case outputBytes = "output_bytes"
        }
    }

    struct Sample: Encodable {
        var at: Double
        var usedBytes: Int64
        var sizeBytes: Int64
        enum CodingKeys: String, CodingKey {
            case at
            case usedBytes = "used_bytes"
            case sizeBytes = "size_bytes"
        }
    }

    struct Snapshot: Encodable {
        var volume: String
        var mountPoint: String?
        var originName: String
        var originUUID: String
        var originDevice: String
        var originTable: String
        var originBytes: Int64
        var cowPath: String
        var cowKind: String
        var sizeBytes: Int64
        var chunkBytes: Int64
        var peakUsedBytes: Int64
        var suspendUs: Int64?
        /// The suspend window in seconds (`suspend_us`, its microseconds, is deprecated: schema 2 drops it).
        var suspendSeconds: Double?
        var state: String
        var cowSamples: [Sample]
        enum CodingKeys: String, CodingKey {
            case volume, state
            case mountPoint = "mount_point"
            case originName = "origin_name"
            case originUUID = "origin_uuid"
            case originDevice = "origin_device"
            case originTable = "origin_table"
            case originBytes = "origin_bytes"
            case cowPath = "cow_path"
            case cowKind = "cow_kind"
            case sizeBytes = "size_bytes"
            case chunkBytes = "chunk_bytes"
            case peakUsedBytes = "peak_used_bytes"
            case suspendUs = "suspend_us"
            case suspendSeconds = "suspend_seconds"
            case cowSamples = "cow_samples"
        }
    }

    struct Event: Encodable {
        var at: String?
        var kind: String
        var action: String
        var detail: String?
    }

    var id: Int64
    var token: String
    var recipe: String
    var recipePath: String
    var recipeSHA256: String
    var host: String
    var user: String
    var state: String
    var phase: String
    var decision: String?
    var outcome: String?
    var exitCode: Int?
    var error: String?
    var startedAt: String?
    var finishedAt: String?
    var durationSeconds: Double?
    var keepUntil: String?
    var suspendUs: Int64?
    /// The suspend window in seconds (`suspend_us`, its microseconds, is deprecated: schema 2 drops it).
    var suspendSeconds: Double?
    var phases: [Phase]
    var steps: [Step]
    var snapshots: [Snapshot]
    var events: [Event]
    var restores: [Restore]

    struct Restore: Encodable {
        var startedAt: String?
        var finishedAt: String?
        var user: String
        var paths: [String]
        var delete: Bool
        var status: String
        var files: Int64
        var bytes: Int64
        var removed: Int64
        var detail: String?
        enum CodingKeys: String, CodingKey {
            case user, paths, delete, status, files, bytes, removed, detail
            case startedAt = "started_at"
            case finishedAt = "finished_at"
        }
    }

    enum CodingKeys: String, CodingKey {
        case id, token, recipe, host, user, state, phase, decision, outcome, error, phases, steps, snapshots, events, restores
        case recipePath = "recipe_path"
        case recipeSHA256 = "recipe_sha256"
        case exitCode = "exit_code"
        case startedAt = "started_at"
        case finishedAt = "finished_at"
        case durationSeconds = "duration_seconds"
        case keepUntil = "keep_until"
        case suspendUs = "suspend_us"
        case suspendSeconds = "suspend_seconds"
    }

    init(run: RunRecord, journal: Journal) throws {
        let runID = run.id!
        id = runID
        token = run.token
        recipe = run.recipeName
        recipePath = run.recipePath
        recipeSHA256 = run.recipeSHA256
        host = run.host
        user = run.user
        state = run.state.rawValue
        phase = run.phase
        decision = run.decision?.rawValue
        outcome = run.outcome?.rawValue
        exitCode = run.exitCode
        error = run.error
        startedAt = iso8601(run.startedAt)
        finishedAt = iso8601(run.finishedAt)
        durationSeconds = run.finishedAt.map { (($0 - run.startedAt) * 1000).rounded() / 1000 }
        keepUntil = iso8601(run.keepUntil)
        suspendUs = run.suspendMicroseconds
        suspendSeconds = run.suspendMicroseconds.map(seconds(microseconds:))
        phases = try journal.phases(runID: runID).map { phase in
            Phase(
                name: phase.name, status: phase.status.rawValue, startedAt: iso8601(phase.startedAt), finishedAt: iso8601(phase.finishedAt),
                durationSeconds: phase.finishedAt.map { ((($0 - phase.startedAt) * 1000).rounded()) / 1000 }, detail: phase.detail)
        }
        steps = try journal.steps(runID: runID).map {
            Step(
                kind: $0.kind, position: $0.position, name: $0.name, argv: $0.arguments, startedAt: iso8601($0.startedAt), durationSeconds: $0.duration,
                termination: $0.termination, exitCode: $0.exitCode, stdoutTail: $0.stdoutTail, stderrTail: $0.stderrTail, outputBytes: $0.outputBytes)
        }
        let suspend = run.suspendMicroseconds
        snapshots = try journal.snapshots(runID: runID).map { record in
            Snapshot(
                volume: record.volume, mountPoint: record.mountPoint, originName: record.originName, originUUID: record.originUUID,
                originDevice: record.originDevice, originTable: record.originTable, originBytes: record.originBytes, cowPath: record.cowPath,
                cowKind: record.cowKind, sizeBytes: record.sizeBytes, chunkBytes: record.chunkBytes, peakUsedBytes: record.peakUsedBytes,
                suspendUs: suspend, suspendSeconds: suspend.map(seconds(microseconds:)), state: record.state.rawValue,
                cowSamples: try journal.samples(snapshotID: record.id!).map { Sample(at: $0.at, usedBytes: $0.usedBytes, sizeBytes: $0.sizeBytes) })
        }
        events = try journal.events(runID: runID).map { Event(at: iso8601($0.at), kind: $0.kind.rawValue, action: $0.action, detail: $0.detail) }
        restores = try journal.restores(runID: runID).map {
            Restore(
                startedAt: iso8601($0.startedAt), finishedAt: iso8601($0.finishedAt), user: $0.user, paths: $0.pathList, delete: $0.deleteCreated,
                status: $0.status, files: $0.files, bytes: $0.bytes, removed: $0.removed, detail: $0.detail)
        }
    }
}

extension GuardCommand {
    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "show",
            abstract: "One run in detail: phases with timings, the suspend window, steps with output, COW use over time.",
            discussion: """
                --json prints one object (/usr/share/doc/guard/schema/run.schema.json) with stable snake_case keys: the run's fields (as in `guard history --json`, plus recipe_path, recipe_sha256, host, user, phase, decision), phases, steps (argv, exit_code, termination, duration_seconds, stdout_tail, stderr_tail), snapshots (origin, COW, sizes, state, cow_samples), events (the intents and results guard journaled) and restores (each `guard restore`: started_at, finished_at, user, paths, delete, status, files, bytes, removed, detail).

                Examples:
                  guard show 12
                  guard show --json 3f9a2c1e | jq .steps
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The run: its number or token.", valueName: "run"), completion: Completions.runs)
        var target: String

        @Flag(help: "Print JSON.")
        var json = false

        @Flag(help: "Also print the recipe as it was run.")
        var recipe = false

        func run() throws {
            let context = try global.context()
            guard let journal = try context.existingJournal(), let record = try journal.run(target) else {
                throw GuardFailure(.refused, "there is no run '\(target)' in \(context.journalPath) (see `guard history`)")
            }
            let detail = try RunDetail(run: record, journal: journal)
            if json {
                try printJSON(detail)
                return
            }
            say("run \(detail.id) (\(detail.token)): \(detail.recipe), \(detail.outcome ?? detail.state)" + (detail.exitCode.map { ", exit \($0)" } ?? ""))
            say("  recipe \(detail.recipePath), sha256 \(detail.recipeSHA256)")
            say("  by \(detail.user) on \(detail.host), started \(formatDate(record.startedAt))" + (record.finishedAt.map { ", finished \(formatDate($0))" } ?? ""))
            if let until = record.keepUntil, record.state == .kept { say("  snapshots kept until \(formatDate(until))") }
            if let suspend = detail.suspendUs { say("  suspend window: \(formatMicroseconds(UInt64(suspend)))") }
            if let error = detail.error { say("  error: \(error)") }
            say("phases:")
            for phase in detail.phases {
                say(
                    "  \(phase.name.padding(toLength: 10, withPad: " ", startingAt: 0)) \(phase.status.padding(toLength: 8, withPad: " ", startingAt: 0)) \(phase.durationSeconds.map { "\(oneDecimal($0))s" } ?? "-")"
                        + (phase.detail.map { "  \($0)" } ?? ""))
            }
            if !detail.steps.isEmpty { say("steps:") }
            for step in detail.steps {
                say("  \(step.kind) \(step.position + 1): \(step.name): \(step.termination ?? "running")" + (step.durationSeconds.map { " after \(oneDecimal($0))s" } ?? ""))
                for (label, tail) in [("stdout", step.stdoutTail), ("stderr", step.stderrTail)] {
                    guard let tail, !tail.isEmpty else { continue }
                    let lines = tail.split(separator: "\n", omittingEmptySubsequences: false).suffix(6)
                    for line in lines where !line.isEmpty { say("      \(label)| \(line)") }
                }
            }
            say("snapshots:")
            for snapshot in detail.snapshots {
                say("  \(snapshot.volume) (\(snapshot.originName), \(formatBytes(UInt64(snapshot.originBytes)))): \(snapshot.state)")
                say(
                    "    COW \(snapshot.cowKind) \(snapshot.cowPath): \(formatBytes(UInt64(snapshot.sizeBytes))), chunk \(formatBytes(UInt64(snapshot.chunkBytes))), peak use \(formatBytes(UInt64(snapshot.peakUsedBytes)))"
                )
                for line in Sparkline.plot(snapshot.cowSamples.map { (at: $0.at, used: UInt64(max($0.usedBytes, 0)), size: UInt64(max($0.sizeBytes, 0))) }) {
                    say(line)
                }
            }
            if !detail.restores.isEmpty { say("file restores:") }
            for restore in detail.restores {
                say(
                    "  \(restore.startedAt ?? "-") by \(restore.user): \(restore.status), \(restore.files) entries, \(formatBytes(UInt64(max(restore.bytes, 0))))"
                        + (restore.removed > 0 ? ", \(restore.removed) removed" : "") + ": " + restore.paths.joined(separator: " "))
                if let detail = restore.detail { say("    \(detail)") }
            }
            if recipe { say("recipe:\n\(record.recipeText)") }
        }
    }
}

/// `guard run`, `rollback` and `commit --json`: the run as `guard show --json` prints it.
func printRunDocument(_ reference: String, context: GuardContext) throws {
    guard let journal = try context.existingJournal(), let record = try journal.run(reference) else {
        throw GuardFailure(.attention, "run \(reference) is not in \(context.journalPath); `guard history` lists the runs")
    }
    try printJSON(try RunDetail(run: record, journal: journal))
}
