import ArgumentParser
import BlockDevice
import DeviceMapper
import Engine
import Foundation
import Recipe

/// The `guard` command: snapshot-guarded upgrades.
public struct GuardCommand: AsyncParsableCommand {
    public static let version = "0.1.0"

    public static let configuration = CommandConfiguration(
        commandName: "guard",
        abstract: "Run upgrades under a device-mapper snapshot: keep them, commit them, or roll them back.",
        discussion: """
            guard takes a copy-on-write snapshot of every volume a recipe names, runs the recipe's upgrade steps and verify checks, then commits the upgrade, keeps the snapshot for a later `guard rollback`, or merges the snapshot back. Every run is journaled in SQLite (`guard history`), and a crash or reboot at any moment leaves the volumes upgraded or restored (`guard recover`).

            Exit codes: 0 done (the upgrade is applied, or the command did what was asked); 1 the upgrade failed and the volumes were restored; 2 usage, recipe or preflight error, nothing was touched; 3 needs attention, the message says what to run; 4 a snapshot needs reassembly (its device or directory is missing, or it was not reassembled at boot): everything is kept, mount or activate what the message names and run `guard recover`; 75 busy, another guard command holds a volume or the journal: nothing was touched, try again once it has finished. `guard status` exits 3 or 4 when something needs a person.

            State: --state-dir, or GUARD_STATE_DIR, or state_dir in guard.conf, or /var/lib/guard (journal.sqlite, cow/, locks/, volumes/). It must not be on a volume guard snapshots.

            Configuration: /etc/guard/guard.conf (or --config, or GUARD_CONFIG) sets site defaults: state_dir, cow_dir, keep (how long `on_success: keep` keeps a run) and extend (how COW files grow when a recipe says nothing). Flags and GUARD_* variables win over it; recipes win over its defaults. `guard config` shows what is in effect.

            Examples:
              guard check /etc/guard/website-migration.recipe
              guard run --dry-run /etc/guard/website-migration.recipe
              guard run /etc/guard/website-migration.recipe
              guard history
              guard rollback 12
              man guard-run
            """,
        version: version,
        subcommands: [
            Run.self, Apt.self, Check.self, Rollback.self, Commit.self, Assess.self, Diff.self, Restore.self, History.self, Show.self, Status.self, Recover.self,
            Monitor.self, MetricsCommand.self, Volume.self, Config.self, WatchdogCommand.self,
        ]
    )

    public init() {}
}

/// Options every subcommand takes.
struct GlobalOptions: ParsableArguments {
    @Option(
        name: .customLong("state-dir"),
        help: ArgumentHelp("guard's state directory (journal, COW files, locks); default GUARD_STATE_DIR, guard.conf's state_dir, /var/lib/guard.", valueName: "dir"))
    var stateDirectory: String?

    @Option(name: .customLong("config"), help: ArgumentHelp("The configuration file; default GUARD_CONFIG, or /etc/guard/guard.conf if it exists.", valueName: "file"))
    var configuration: String?

    @Flag(name: .shortAndLong, help: "Show more: every kernel step, libdevmapper's messages.")
    var verbose = false

    @Flag(name: .shortAndLong, help: "Show only warnings, errors and the result.")
    var quiet = false

    @Option(name: .customLong("udev"), help: ArgumentHelp("How to wait for udev: automatic, cookies or none.", valueName: "mode", visibility: .hidden))
    var udev: String = ProcessInfo.processInfo.environment["GUARD_UDEV"] ?? "automatic"

    /// - Parameter keepingValid: use the valid lines of a guard.conf that has errors, with a
    ///   warning, instead of refusing (`guard recover`: a typo must not stop boot-time recovery).
    func context(keepingValid: Bool = false) throws -> GuardContext {
        guard let mode = UdevMode(rawValue: udev) else {
            throw GuardFailure(.refused, "--udev must be automatic, cookies or none, not '\(udev)'")
        }
        let settings = try self.settings(keepingValid: keepingValid)
        let reporter = TerminalReporter(verbosity: quiet ? .quiet : (verbose ? .verbose : .normal))
        if let errors = settings.fileErrors {
            reporter.warning("\(errors); going on with the file's valid settings (fix it: every other command refuses it)")
        }
        return GuardContext(stateDirectory: settings.stateDirectory.value, udev: mode, reporter: reporter, configuration: settings.file)
    }

    /// The configuration file and the state directory in effect, each with where it came from.
    func settings(keepingValid: Bool = false) throws -> Settings {
        let environment = ProcessInfo.processInfo.environment
        let named = configuration.map { ($0, "--config") } ?? environment["GUARD_CONFIG"].map { ($0, "GUARD_CONFIG") }
        let path = named?.0 ?? GuardConfiguration.defaultPath
        var file: GuardConfiguration
        var fileErrors: RecipeErrors?
        if keepingValid {
            (file, fileErrors) = GuardConfiguration.loadKeepingValid(path: path, required: named != nil)
        } else {
            do {
                file = try GuardConfiguration.load(path: path, required: named != nil)
            } catch let errors as RecipeErrors {
                throw GuardFailure(.refused, "\(errors)\nfix the configuration file, or name another with --config; nothing was touched")
            }
        }
        // guard.conf names the state directory, whose journal drives what guard does as root.
        if let problem = Self.trustProblem(ofConfiguration: path) {
            guard keepingValid else {
                throw GuardFailure(.refused, "\(problem); guard refuses a configuration others could have changed (`chown root:root` it and `chmod go-w` it); nothing was touched")
            }
            // `guard recover` at boot goes on, with the built-in defaults.
            file = GuardConfiguration()
            fileErrors = RecipeErrors(errors: [RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: "\(problem); its settings are ignored")])
        }
        let fileSource = file.path ?? "built-in default"
        let state: Settings.Value
        if let stateDirectory {
            state = .init(value: stateDirectory, source: "--state-dir")
        } else if let variable = environment["GUARD_STATE_DIR"], !variable.isEmpty {
            state = .init(value: variable, source: "GUARD_STATE_DIR")
        } else if let configured = file.stateDirectory {
            state = .init(value: configured, source: fileSource)
        } else {
            state = .init(value: "/var/lib/guard", source: "built-in default")
        }
        return Settings(
            file: file, fileErrors: fileErrors, configurationSource: named?.1 ?? (file.path == nil ? "none" : "default location"), stateDirectory: state)
    }
}

extension GlobalOptions {
    /// Why the configuration file at `path` could have been changed by someone other than root
    /// (the file, or a directory above it or above what it links to), or nil. Only a regular
    /// file is checked: /dev/null (no settings) is none.
    static func trustProblem(ofConfiguration path: String) -> String? {
        let resolved = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: resolved, isDirectory: &isDirectory), !isDirectory.boolValue,
            (try? FileManager.default.attributesOfItem(atPath: resolved)[.type] as? FileAttributeType) == .typeRegular
        else { return nil }
        return TrustedFiles.fileProblem(resolved, what: "the configuration file")
            ?? TrustedFiles.ancestryProblem(of: resolved, what: "the configuration file")
            ?? (resolved == path ? nil : TrustedFiles.ancestryProblem(of: path, what: "the configuration file"))
    }
}

/// What `GlobalOptions` resolved, for `guard config`.
struct Settings {
    struct Value {
        var value: String
        var source: String
    }

    var file: GuardConfiguration
    /// The file's problems, when its valid settings were kept anyway (`keepingValid`).
    var fileErrors: RecipeErrors?
    /// How the file was named: --config, GUARD_CONFIG, default location, or none.
    var configurationSource: String
    var stateDirectory: Value
}

/// Runs guard: parses the arguments, runs the command, prints its error to stderr and exits
/// with guard's exit codes (argument errors exit 2, like other usage errors).
public enum GuardMain {
    public static func run() async {
        // A closed pipe (the watchdog gone, a reader of `guard history | head` gone) is an
        // error to report, never a reason to die, least of all with a volume suspended.
        // Steps get the default back (Spawn resets every signal in the child).
        signal(SIGPIPE, SIG_IGN)
        var command: any ParsableCommand
        do {
            command = try GuardCommand.parseAsRoot()
        } catch {
            // A usage error before there is a command: --json still gets its one document.
            if CommandLine.arguments.dropFirst().contains("--json"), GuardCommand.exitCode(for: error) != .success {
                try? printJSON(ErrorDocument(code: .usage, message: GuardCommand.message(for: error)))
            }
            usageError(error)
        }
        let json = (command as? any JSONOutputCommand)?.json == true
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            exit(0)
        } catch let done as ExitCodeError {
            exit(done.code.rawValue)
        } catch let printed as DocumentPrinted {
            // The command's own document is on stdout: the message goes to stderr alone.
            let status = ExitStatus.of(printed.error) ?? ExitStatus.unmapped(printed.error)
            StandardStreams.error("guard: " + status.message + "\n")
            exit(status.code.rawValue)
        } catch {
            if let status = ExitStatus.of(error) {
                StandardStreams.error("guard: " + status.message + "\n")
                if json { try? printJSON(ErrorDocument(code: status.code, message: status.message)) }
                exit(status.code.rawValue)
            }
            // A usage error found while running (ValidationError): exit 2, like one of parsing.
            let parser = GuardCommand.exitCode(for: error)
            guard parser == .success || parser == .validationFailure else {
                // Any other error may come after a change: 3, never 2 ("nothing was touched").
                let status = ExitStatus.unmapped(error)
                StandardStreams.error("guard: " + status.message + "\n")
                if json { try? printJSON(ErrorDocument(code: status.code, message: status.message)) }
                exit(status.code.rawValue)
            }
            if json, parser != .success {
                try? printJSON(ErrorDocument(code: .usage, message: GuardCommand.message(for: error)))
            }
            usageError(error)
        }
    }

    /// --help and --version exit 0 as argument-parser has it; a usage error exits 2, guard's
    /// code for "nothing was touched", not argument-parser's 64.
    static func usageError(_ error: any Error) -> Never {
        if GuardCommand.exitCode(for: error) == .success {
            GuardCommand.exit(withError: error)
        }
        StandardStreams.error(GuardCommand.fullMessage(for: error) + "\n")
        exit(ExitCode.usage.rawValue)
    }
}

/// Writes one JSON document to stdout: the value's fields (an absent one as null), sorted,
/// with `schema_version` (/usr/share/doc/guard/schema/ has the schema of every document).
/// `compact`: on one line (JSON lines, as `guard status --watch --json` prints them).
func printJSON<T: Encodable>(_ value: T, compact: Bool = false) throws {
    _ = try writeJSON(value, compact: compact)
}

/// `printJSON`, saying whether the document reached stdout: false when its reader is gone.
func writeJSON<T: Encodable>(_ value: T, compact: Bool = false) throws -> Bool {
    guard case .object(var members) = try DocumentEncoder().encode(value) else {
        preconditionFailure("a JSON document is an object")
    }
    members["schema_version"] = .integer(Int64(JSONContract.schemaVersion))
    let document = JSONValue.object(members)
    return StandardStreams.out((compact ? document.compactText() : document.text()) + "\n")
}

/// A command with `--json`: when it fails, stdout gets the error document
/// (/usr/share/doc/guard/schema/error.schema.json) as well as stderr the message, so a script that parses
/// stdout always gets one document.
protocol JSONOutputCommand {
    var json: Bool { get }
}

/// A failure of a `--json` command that has printed its own document (a check's errors, a
/// dry run's refusals): stderr gets the message, stdout no error document.
struct DocumentPrinted: Error {
    let error: any Error
    init(_ error: any Error) { self.error = error }
}

/// The error document of a command that failed with `--json`.
struct ErrorDocument: Encodable {
    struct Failure: Encodable {
        var exitCode: Int32
        var kind: String
        var message: String
        enum CodingKeys: String, CodingKey {
            case kind, message
            case exitCode = "exit_code"
        }
    }
    var error: Failure

    init(code: Engine.ExitCode, message: String) {
        let kind =
            switch code {
            case .success, .usage: "refused"
            case .failedRestored: "failed"
            case .attention: "attention"
            case .needsReassembly: "needs_reassembly"
            case .busy: "busy"
            }
        error = Failure(exitCode: code.rawValue, kind: kind, message: message)
    }
}

/// Standard output, for data.
func say(_ text: String) {
    StandardStreams.out(text + "\n")
}

/// ISO 8601 in UTC, for JSON.
func iso8601(_ seconds: Double?) -> String? {
    guard let seconds else { return nil }
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return formatter.string(from: Date(timeIntervalSince1970: seconds))
}
