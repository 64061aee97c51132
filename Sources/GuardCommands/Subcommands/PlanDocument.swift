import BlockDevice
import DeviceMapper
import Engine
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

/// `guard check --json` and `guard run --dry-run --json` (/usr/share/doc/guard/schema/plan.schema.json): the
/// recipe, every volume resolved against the system, the commands, and what would stop a run.
struct PlanDocument: Encodable {
    struct RecipeFacts: Encodable {
        var path: String
        var name: String?
        var description: String?
        var sha256: String?
    }

    struct ErrorLine: Encodable {
        var file: String
        var line: Int
        var column: Int
        var message: String
        var hint: String?
    }

    struct Growth: Encodable {
        var threshold: Double
        var stepBytes: UInt64
        /// What the snapshot may grow to (label and fuse reserve not counted).
        var maximumBytes: UInt64
        var fromConfiguration: Bool
        enum CodingKeys: String, CodingKey {
            case threshold
            case stepBytes = "step_bytes"
            case maximumBytes = "maximum_bytes"
            case fromConfiguration = "from_configuration"
        }
    }

    struct EarlierRuns: Encodable {
        var runs: Int
        var peakBytes: Int64
        enum CodingKeys: String, CodingKey {
            case runs
            case peakBytes = "peak_bytes"
        }
    }

    /// A volume as the recipe writes it, and, when guard resolved it, as the system has it.
    struct Volume: Encodable {
        var device: String
        var mount: String?
        var size: String
        var cow: String?
        var line: Int
        var originPath: String?
        var deviceNumber: String?
        var originBytes: UInt64?
        var mountedOn: [String]?
        var snapshotBytes: UInt64?
        var sizeNote: String?
        var chunkBytes: UInt64?
        /// "file" (a preallocated file in `cow_location`) or "device" (overwritten).
        var cowKind: String?
        var cowLocation: String?
        var freeBytes: UInt64?
        var reserveBytes: UInt64?
        var growth: Growth?
        var earlierRuns: EarlierRuns?
        enum CodingKeys: String, CodingKey {
            case device, mount, size, cow, line, growth
            case originPath = "origin_path"
            case deviceNumber = "device_number"
            case originBytes = "origin_bytes"
            case mountedOn = "mounted_on"
            case snapshotBytes = "snapshot_bytes"
            case sizeNote = "size_note"
            case chunkBytes = "chunk_bytes"
            case cowKind = "cow_kind"
            case cowLocation = "cow_location"
            case freeBytes = "free_bytes"
            case reserveBytes = "reserve_bytes"
            case earlierRuns = "earlier_runs"
        }
    }

    struct CommandFacts: Encodable {
        var name: String
        /// argv, shell, strict_shell or http.
        var kind: String
        var invocation: String
        var timeoutSeconds: Double?
        var retries: Int
        var intervalSeconds: Double?
        var user: String?
        var workingDirectory: String?
        var line: Int
        enum CodingKeys: String, CodingKey {
            case name, kind, invocation, retries, user, line
            case timeoutSeconds = "timeout_seconds"
            case intervalSeconds = "interval_seconds"
            case workingDirectory = "working_directory"
        }
    }

    struct Commands: Encodable {
        var quiesce: [CommandFacts]
        var resume: [CommandFacts]
        var steps: [CommandFacts]
        var verify: [CommandFacts]
        var rollbackStop: [CommandFacts]
        var rollbackStart: [CommandFacts]
        enum CodingKeys: String, CodingKey {
            case quiesce, resume, steps, verify
            case rollbackStop = "rollback_stop"
            case rollbackStart = "rollback_start"
        }
    }

    /// syntax (the file only), check (resolved against the system) or dry_run.
    var mode: String
    var valid: Bool
    var recipe: RecipeFacts
    var errors: [ErrorLine]
    var volumes: [Volume]
    var commands: Commands?
    var onSuccess: String?
    var onFailure: String?
    var stopAt: Double?
    var warnings: [String]
    /// What would stop a run (empty: a run would start).
    var problems: [String]
    /// What a real run would do first (dry run only).
    var housekeeping: [String]
    /// Every problem is another guard command at work (exit 75).
    var busy: Bool
    enum CodingKeys: String, CodingKey {
        case mode, valid, recipe, errors, volumes, commands, warnings, problems, housekeeping, busy
        case onSuccess = "on_success"
        case onFailure = "on_failure"
        case stopAt = "stop_at"
    }

    /// An invalid recipe: its errors, nothing else.
    init(mode: String, path: String, errors: RecipeErrors) {
        self.mode = mode
        valid = false
        recipe = RecipeFacts(path: path)
        self.errors = errors.errors.map { ErrorLine(file: $0.file, line: $0.location.line, column: $0.location.column, message: $0.message, hint: $0.hint) }
        volumes = []
        warnings = []
        problems = []
        housekeeping = []
        busy = false
    }

    init(mode: String, recipe: Recipe, path: String, plan: Plan?, warnings: [String], problems: [String], housekeeping: [String] = [], busy: Bool = false) {
        self.mode = mode
        valid = true
        self.recipe = RecipeFacts(path: path, name: recipe.name, description: recipe.description, sha256: recipe.sha256)
        errors = []
        volumes = recipe.volumes.enumerated().map { index, spec in
            var volume = Volume(device: spec.device, mount: spec.mount, size: spec.size.description, cow: spec.cow?.description, line: spec.location.line)
            guard let planned = plan?.volumes.first(where: { $0.index == index }) else { return volume }
            volume.originPath = planned.originPath
            volume.deviceNumber = planned.info.number.description
            volume.originBytes = planned.originBytes
            volume.mountedOn = planned.mounts.map(\.target)
            volume.snapshotBytes = planned.cowBytes
            volume.sizeNote = planned.sizeNote
            volume.chunkBytes = UInt64(planned.chunkSectors) * 512
            switch planned.storage {
            case .fileIn(let directory): (volume.cowKind, volume.cowLocation) = ("file", directory)
            case .blockDevice(let path): (volume.cowKind, volume.cowLocation) = ("device", path)
            case .thinPool: (volume.cowKind, volume.cowLocation) = ("thin", "/dev/mapper/\(ThinPoolNames(volume: planned.info.name).pool)")
            }
            volume.freeBytes = planned.freeBytes
            volume.reserveBytes = planned.reserveBytes
            volume.growth = planned.extensionPolicy.map {
                Growth(
                    threshold: $0.threshold, stepBytes: $0.stepBytes, maximumBytes: $0.maximumBytes - CowLabel.areaOffset - planned.reserveBytes,
                    fromConfiguration: planned.extensionFromConfiguration)
            }
            volume.earlierRuns = planned.history.map { EarlierRuns(runs: $0.runs, peakBytes: $0.peakBytes) }
            return volume
        }
        func facts(_ commands: [Command], timed: Bool) -> [CommandFacts] {
            commands.map { command in
                let kind =
                    switch command.invocation {
                    case .argv: "argv"
                    case .shell: "shell"
                    case .strictShell: "strict_shell"
                    case .http: "http"
                    }
                return CommandFacts(
                    name: command.name, kind: kind, invocation: command.invocation.description,
                    timeoutSeconds: (command.timeout ?? (timed ? recipe.defaultTimeout : nil)).map(\.inSeconds),
                    retries: command.retries, intervalSeconds: command.retries > 0 ? command.interval.inSeconds : nil,
                    user: command.user, workingDirectory: command.workingDirectory, line: command.location.line)
            }
        }
        commands = Commands(
            quiesce: facts(recipe.quiesce, timed: false), resume: facts(recipe.resume, timed: false),
            steps: facts(recipe.steps, timed: true), verify: facts(recipe.verify, timed: true),
            rollbackStop: facts(recipe.rollbackStop, timed: false), rollbackStart: facts(recipe.rollbackStart, timed: false))
        onSuccess = recipe.onSuccess.description
        onFailure = recipe.onFailure.description
        stopAt = recipe.stopAtFill
        self.warnings = warnings
        self.problems = problems
        self.housekeeping = housekeeping
        self.busy = busy
    }
}
