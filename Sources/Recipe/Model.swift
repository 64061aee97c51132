import Quantities

/// A place in a recipe file, 1-based.
public struct SourceLocation: Hashable, Sendable, Codable, CustomStringConvertible {
    public var line: Int
    public var column: Int

    public init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }

    public var description: String { "\(line):\(column)" }
}

/// How a command runs: argv directly, or a shell when the recipe asks for one.
public enum Invocation: Hashable, Sendable, Codable, CustomStringConvertible {
    case argv([String])
    /// Run by `/bin/sh -c`, with `set -e` semantics left to the script (steps and hooks).
    case shell(String)
    /// Run by `/bin/sh -c` with errexit, and pipefail where the shell has it (verify checks,
    /// as CI systems run scripts): a check that fails in its middle fails.
    case strictShell(String)
    /// guard's own HTTP GET (verify checks): no process, no curl needed.
    case http(HTTPCheck)

    /// What a strict script runs first (the dash of Debian 12, its /bin/sh, has no pipefail).
    public static let strictPrologue = "set -e\n(set -o pipefail) 2>/dev/null && set -o pipefail\n"

    /// The argv actually executed.
    public var arguments: [String] {
        switch self {
        case .argv(let argv): return argv
        case .shell(let script): return ["/bin/sh", "-c", script]
        case .strictShell(let script): return ["/bin/sh", "-c", Self.strictPrologue + script]
        case .http(let check): return check.words
        }
    }

    public var description: String {
        switch self {
        case .argv(let argv): return argv.map { $0.contains(" ") || $0.isEmpty ? "'\($0)'" : $0 }.joined(separator: " ")
        case .shell(let script): return "sh -c '\(script)'"
        case .strictShell(let script): return "sh -ec '\(script)'"
        case .http(let check): return check.words.joined(separator: " ")
        }
    }
}

/// A built-in verify check: GET `url` (plain HTTP), wanted status, wanted text in the body.
public struct HTTPCheck: Hashable, Sendable, Codable {
    public var url: String
    /// nil: any 2xx.
    public var status: Int?
    /// Text the body must contain (within its first `HTTPCheck.bodyLimit` bytes).
    public var contains: String?

    /// How much of a body guard reads.
    public static let bodyLimit = 1 << 20

    public init(url: String, status: Int? = nil, contains: String? = nil) {
        self.url = url
        self.status = status
        self.contains = contains
    }

    /// How the journal shows it, as an argv: `http GET URL [status N] [contains TEXT]`.
    public var words: [String] {
        ["http", "GET", url] + (status.map { ["status", "\($0)"] } ?? []) + (contains.map { ["contains", $0] } ?? [])
    }

    /// An `http://` URL split for a request, or why it is not one.
    public static func parse(_ url: String) -> Result<(host: String, port: UInt16, target: String), UnitError> {
        let lowered = url.lowercased()
        if lowered.hasPrefix("https://") {
            return .failure(
                UnitError("guard's built-in check speaks plain HTTP, not HTTPS: '\(url)'", hint: "check the service on its local http:// port, or use `run: [curl, -fsS, \(url)]`"))
        }
        guard lowered.hasPrefix("http://") else {
            return .failure(UnitError("'\(url)' is not an http:// URL", hint: "for example http://127.0.0.1:8080/health"))
        }
        let rest = url.dropFirst("http://".count)
        let authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        var target = String(rest.dropFirst(authority.count).prefix { $0 != "#" })
        if target.isEmpty { target = "/" } else if target.hasPrefix("?") { target = "/" + target }
        guard !authority.contains("@") else {
            return .failure(UnitError("'\(url)' carries credentials", hint: "guard's check sends no credentials; use a health URL that needs none, or `run: [curl, ...]`"))
        }
        var host = String(authority)
        var port: UInt16 = 80
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return .failure(UnitError("'\(url)' has an unclosed [ in its host")) }
            let after = host[host.index(after: close)...]
            if after.hasPrefix(":") {
                guard let number = UInt16(after.dropFirst()), number > 0 else { return .failure(UnitError("'\(url)' has a bad port")) }
                port = number
            } else if !after.isEmpty {
                return .failure(UnitError("'\(url)' has text after its [host]"))
            }
            host = String(host[host.index(after: host.startIndex)..<close])
        } else if let colon = host.lastIndex(of: ":") {
            guard let number = UInt16(host[host.index(after: colon)...]), number > 0 else { return .failure(UnitError("'\(url)' has a bad port")) }
            port = number
            host = String(host[..<colon])
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) else {
            return .failure(UnitError("'\(url)' has no host"))
        }
        guard !target.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) else {
            return .failure(UnitError("'\(url)' has spaces or line breaks in its path", hint: "write them as %20"))
        }
        return .success((host, port, target))
    }
}

/// A command of a recipe: a step, a verify check, or a hook.
public struct Command: Hashable, Sendable, Codable {
    public var name: String
    public var invocation: Invocation
    /// nil: the recipe's default timeout (or none for hooks).
    public var timeout: Duration?
    /// Added to the clean environment guard gives every command.
    public var environment: [String: String]
    public var workingDirectory: String?
    /// A user name or numeric uid to run as (guard runs as root).
    public var user: String?
    public var location: SourceLocation
    /// Verify checks: how many times a failed check runs again before it counts as failed
    /// (a service restarted by a step is often not ready at once).
    public var retries: Int
    /// Verify checks: the pause before each retry.
    public var interval: Duration

    /// The pause between a verify check's attempts when the recipe gives none.
    public static let defaultInterval: Duration = .seconds(2)

    public init(
        name: String, invocation: Invocation, timeout: Duration? = nil, environment: [String: String] = [:],
        workingDirectory: String? = nil, user: String? = nil, location: SourceLocation = SourceLocation(line: 0, column: 0),
        retries: Int = 0, interval: Duration = Command.defaultInterval
    ) {
        self.name = name
        self.invocation = invocation
        self.timeout = timeout
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.user = user
        self.location = location
        self.retries = retries
        self.interval = interval
    }
}

/// A snapshot size as written in a recipe.
public enum SizeSpec: Hashable, Sendable, Codable, CustomStringConvertible {
    case bytes(UInt64)
    /// Percent of the origin volume.
    case percent(Double)
    /// Sized from the peak COW use of earlier runs of the recipe, with a margin.
    case auto

    public var description: String {
        switch self {
        case .bytes(let bytes): return formatBytes(bytes)
        case .percent(let percent): return "\(oneDecimal(percent))%"
        case .auto: return "auto"
        }
    }

    /// The size in bytes on a volume of `originBytes`; `auto` stands for `autoBytes`.
    public func bytes(originBytes: UInt64, auto autoBytes: UInt64) -> UInt64 {
        switch self {
        case .bytes(let bytes): return bytes
        case .percent(let percent): return UInt64(Double(originBytes) * percent / 100)
        case .auto: return autoBytes
        }
    }
}

/// Where a volume's COW storage lives.
public enum CowLocation: Hashable, Sendable, Codable, CustomStringConvertible {
    /// A directory for the COW file (guard's state directory by default).
    case directory(String)
    /// A whole block device (its content is overwritten).
    case device(String)

    public var path: String {
        switch self {
        case .directory(let path), .device(let path): return path
        }
    }

    public var description: String {
        switch self {
        case .directory(let path): return "a file in \(path)"
        case .device(let path): return "the device \(path)"
        }
    }
}

/// When and by how much a file-backed COW grows during the steps.
public struct ExtendSpec: Hashable, Sendable, Codable {
    /// Fill fraction that triggers growth (0...1).
    public var at: Double
    public var by: SizeSpec
    public var max: SizeSpec

    public init(at: Double, by: SizeSpec, max: SizeSpec) {
        self.at = at
        self.by = by
        self.max = max
    }
}

/// One volume the recipe protects.
public struct VolumeSpec: Hashable, Sendable, Codable {
    /// As written: /dev/mapper/NAME, /dev/VG/LV, VG/LV, or a mount point.
    public var device: String
    /// Where the volume is mounted; nil: wherever it is mounted now (if at all).
    public var mount: String?
    public var size: SizeSpec
    /// Chunk size in bytes; nil: guard's default (4 KiB).
    public var chunkBytes: UInt64?
    public var cow: CowLocation?
    public var extend: ExtendSpec?
    public var location: SourceLocation
}

/// What to do when the steps and verify checks succeed.
public enum SuccessAction: Hashable, Sendable, Codable, CustomStringConvertible {
    /// Drop the snapshots: the upgrade is final.
    case commit
    /// Keep the snapshots for a later `guard rollback`; commit automatically after the duration (nil: never).
    case keep(Duration?)

    public var description: String {
        switch self {
        case .commit: return "commit"
        case .keep(nil): return "keep"
        case .keep(let duration?): return "keep \(Units.formatDuration(duration))"
        }
    }
}

/// What to do when a step or verify check fails.
public enum FailureAction: String, Hashable, Sendable, Codable, CustomStringConvertible {
    /// Merge the snapshots back: the volumes are as before the run.
    case rollback
    /// Keep the snapshots and the failed state for inspection; `guard rollback` or `guard commit` later.
    case keep

    public var description: String { rawValue }
}

/// What `guard monitor` does when a kept run's COW reaches `stop_at` and cannot grow.
public enum FullAction: String, Hashable, Sendable, Codable, CaseIterable, CustomStringConvertible {
    /// The volume refuses writes (they fail with EIO) until `guard rollback` or `guard commit`:
    /// the rollback stays possible, the service on the volume sees a failed disk.
    case fuse
    /// Drop the snapshots: the upgrade becomes final, the service keeps writing.
    case commit
    /// Roll back now (the rollback's stop and start hooks run); a fuse if it cannot start.
    case rollback

    public var description: String { rawValue }
}

/// A validated recipe.
public struct Recipe: Hashable, Sendable, Codable {
    public var name: String
    public var description: String?
    public var volumes: [VolumeSpec]
    /// Run before the snapshot instant (stop or flush the service).
    public var quiesce: [Command]
    /// Run right after the snapshot instant, even if the snapshot failed.
    public var resume: [Command]
    public var steps: [Command]
    public var verify: [Command]
    public var onSuccess: SuccessAction
    public var onFailure: FailureAction
    /// What guard monitor does when a kept snapshot fills up and cannot grow.
    public var onFull: FullAction = .fuse
    /// Boot assessment: checks the booted system must pass after the reboot into the upgrade
    /// (`guard assess`, run by guard-assess.service); when they fail, or when `bootAttempts`
    /// boots in a row do not reach them, the run is rolled back at the next boot.
    public var verifyAfterBoot: [Command] = []
    public var bootAttempts = Recipe.defaultBootAttempts
    public static let defaultBootAttempts = 2
    /// Whether a run may end with its snapshots kept (they must survive a reboot).
    public var keepsSnapshots: Bool {
        if case .keep = onSuccess { return true }
        return onFailure == .keep
    }
    /// Around a rollback: stop the services using the volumes, start them once remounted.
    public var rollbackStop: [Command]
    public var rollbackStart: [Command]
    /// Given to every command of the recipe.
    public var environment: [String: String]
    /// For steps and verify checks without a timeout of their own.
    public var defaultTimeout: Duration?
    /// Fill at which a COW that cannot grow stops the steps (0...1).
    public var stopAtFill: Double

    /// The file's text and its SHA-256, for the journal.
    public var text: String
    public var sha256: String
    public var path: String
}
