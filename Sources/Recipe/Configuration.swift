import Foundation

/// Site defaults from `/etc/guard/guard.conf` (Docs/guide.md, "Configuration").
///
/// One `key = value` per line; `#` starts a comment. Every key is optional; what a file does not
/// set keeps guard's built-in default, and command-line flags and GUARD_* variables win over it.
///
///     state_dir = /var/lib/guard          # journal, locks, views (and COW files unless cow_dir)
///     cow_dir   = /srv/guard-cow          # COW files of volumes whose recipe names no `cow:`
///     keep      = 7d                      # `on_success: keep` without a duration expires after this
///     extend    = at 80% by 10% max 50%   # COW files of volumes whose recipe has no `extend:` grow so
public struct GuardConfiguration: Hashable, Sendable {
    /// Where guard looks when neither --config nor GUARD_CONFIG names a file.
    public static let defaultPath = "/etc/guard/guard.conf"
    /// The keys a file may set.
    public static let keys = ["state_dir", "cow_dir", "keep", "extend"]

    /// The file these settings came from (nil: no file, built-in defaults only).
    public var path: String?
    public var stateDirectory: String?
    public var cowDirectory: String?
    public var keep: Duration?
    public var extend: ExtendSpec?

    public init(path: String? = nil, stateDirectory: String? = nil, cowDirectory: String? = nil, keep: Duration? = nil, extend: ExtendSpec? = nil) {
        self.path = path
        self.stateDirectory = stateDirectory
        self.cowDirectory = cowDirectory
        self.keep = keep
        self.extend = extend
    }

    /// Reads a configuration file. A missing file is no error unless `required` (named by the admin).
    /// - Throws: `RecipeErrors` naming the file, line and column of every problem.
    public static func load(path: String, required: Bool) throws -> GuardConfiguration {
        guard let text = try read(path: path, required: required) else { return GuardConfiguration() }
        return try parse(text, path: path)
    }

    /// Parses the text of a configuration file; collects every problem before throwing.
    public static func parse(_ text: String, path: String) throws -> GuardConfiguration {
        let (configuration, errors) = parseKeepingValid(text, path: path)
        if !errors.isEmpty { throw RecipeErrors(errors: errors) }
        return configuration
    }

    /// Reads what can be read: the valid settings, and the problems of the rest. For `guard
    /// recover`, which must not be stopped at boot by a typo in an unrelated line.
    public static func loadKeepingValid(path: String, required: Bool) -> (GuardConfiguration, RecipeErrors?) {
        do {
            guard let text = try read(path: path, required: required) else { return (GuardConfiguration(), nil) }
            let (configuration, errors) = parseKeepingValid(text, path: path)
            return (configuration, errors.isEmpty ? nil : RecipeErrors(errors: errors))
        } catch let errors as RecipeErrors {
            return (GuardConfiguration(), errors)
        } catch {
            return (GuardConfiguration(), RecipeErrors(errors: [RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: "\(error)")]))
        }
    }

    /// The file's text; nil when it is missing and not `required`.
    static func read(path: String, required: Bool) throws -> String? {
        guard FileManager.default.fileExists(atPath: path) else {
            if required {
                throw RecipeErrors(errors: [
                    RecipeError(
                        file: path, location: SourceLocation(line: 1, column: 1), message: "the configuration file does not exist",
                        hint: "create it (see guard.conf(5)) or leave --config/GUARD_CONFIG unset")
                ])
            }
            return nil
        }
        // Read through a file handle: /dev/null (no settings at all) reads as empty.
        guard let handle = FileHandle(forReadingAtPath: path), let data = try? handle.readToEnd() ?? Data(), let text = String(data: data, encoding: .utf8) else {
            throw RecipeErrors(errors: [
                RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: "cannot read the configuration file (permissions, or not UTF-8 text)")
            ])
        }
        return text
    }

    static func parseKeepingValid(_ text: String, path: String) -> (GuardConfiguration, [RecipeError]) {
        var configuration = GuardConfiguration(path: path)
        var errors: [RecipeError] = []
        var seen: [String: Int] = [:]
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let lineNumber = index + 1
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            if line.trimmed.isEmpty { continue }
            func fail(_ message: String, column: Int = 1, hint: String? = nil) {
                errors.append(RecipeError(file: path, location: SourceLocation(line: lineNumber, column: column), message: message, hint: hint))
            }
            guard let equals = line.firstIndex(of: "=") else {
                fail("'\(line.trimmed)' is not a setting", hint: "write key = value (keys: \(keys.joined(separator: ", ")))")
                continue
            }
            let key = line[..<equals].trimmed
            let value = line[line.index(after: equals)...].trimmed
            let valueStart = line[line.index(after: equals)...].firstIndex { !$0.isWhitespace } ?? line.endIndex
            let valueColumn = line.distance(from: line.startIndex, to: valueStart) + 1
            guard keys.contains(key) else {
                let hint = suggestion(for: key, among: keys).map { "did you mean '\($0)'?" } ?? "the keys are \(keys.joined(separator: ", "))"
                fail("unknown setting '\(key)'", hint: hint)
                continue
            }
            if let first = seen[key] {
                fail("\(key) is set twice (first on line \(first))", hint: "keep one")
                continue
            }
            seen[key] = lineNumber
            if value.isEmpty {
                fail("\(key) has no value", column: valueColumn)
                continue
            }
            switch key {
            case "state_dir", "cow_dir":
                guard value.hasPrefix("/") else {
                    fail("\(key) must be an absolute path, not '\(value)'", column: valueColumn)
                    continue
                }
                if key == "state_dir" { configuration.stateDirectory = value } else { configuration.cowDirectory = value }
            case "keep":
                if value == "forever" { continue }
                switch Units.parseDuration(value) {
                case .success(let duration) where duration > .zero: configuration.keep = duration
                case .success: fail("keep must be longer than zero", column: valueColumn, hint: "write it like 7d, or 'forever'")
                case .failure(let error): fail("keep: \(error.message)", column: valueColumn, hint: error.hint ?? "write it like 7d, or 'forever'")
                }
            default:  // extend
                if value == "none" { continue }
                switch parseExtend(value) {
                case .success(let spec): configuration.extend = spec
                case .failure(let error): fail("extend: \(error.message)", column: valueColumn, hint: error.hint)
                }
            }
        }
        return (configuration, errors)
    }

    /// `at 80% by 10% max 50%` (`at` optional, 80% by default), as a recipe's `snapshot.extend`.
    static func parseExtend(_ text: String) -> Result<ExtendSpec, UnitError> {
        let hint = "write it like 'at 80% by 25M max 200M' (by and max also as % of the volume), or 'none'"
        let words = text.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard words.count % 2 == 0 else { return .failure(UnitError("'\(text)' is not a growth policy", hint: hint)) }
        var at = 0.8
        var by: SizeSpec?
        var max: SizeSpec?
        for pair in stride(from: 0, to: words.count, by: 2) {
            let (name, value) = (words[pair], words[pair + 1])
            switch name {
            case "at":
                guard let threshold = Units.parseGrowthThreshold(value) else {
                    return .failure(UnitError("at must be a percentage between 10% and 99%, not '\(value)'", hint: hint))
                }
                at = threshold
            case "by", "max":
                switch Units.parseSizeSpec(value, context: name, allowPercent: true, allowAuto: false) {
                case .success(let spec): if name == "by" { by = spec } else { max = spec }
                case .failure(let error): return .failure(UnitError(error.message, hint: error.hint ?? hint))
                }
            default:
                return .failure(UnitError("unknown word '\(name)'", hint: hint))
            }
        }
        guard let by, let max else { return .failure(UnitError("'\(text)' needs both by and max", hint: hint)) }
        return .success(ExtendSpec(at: at, by: by, max: max))
    }
}
