import Foundation
import Quantities
import Yams

/// One problem in a recipe, with where it is and how to fix it.
public struct RecipeError: Error, Hashable, Sendable, CustomStringConvertible {
    public var file: String
    public var location: SourceLocation
    public var message: String
    public var hint: String?

    public init(file: String, location: SourceLocation, message: String, hint: String? = nil) {
        self.file = file
        self.location = location
        self.message = message
        self.hint = hint
    }

    /// `website.recipe:4:5: unknown key 'stpes'; did you mean 'steps'?`
    public var description: String {
        "\(file):\(location.line):\(location.column): \(message)" + (hint.map { "; \($0)" } ?? "")
    }
}

/// Every problem found in a recipe file (all of them, not only the first).
public struct RecipeErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [RecipeError]
    public init(errors: [RecipeError]) { self.errors = errors }
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}

/// Reads and validates recipes.
public enum RecipeParser {
    /// Parses and validates a recipe file.
    /// - Returns: the recipe, or every error found, each with its line and column.
    public static func load(path: String) -> Result<Recipe, RecipeErrors> {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            let reason = FileManager.default.fileExists(atPath: path) ? "cannot be read as UTF-8 text" : "does not exist"
            return .failure(RecipeErrors(errors: [RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: "the recipe \(reason)")]))
        }
        return parse(text: text, path: path)
    }

    /// Parses and validates recipe text; `path` names it in errors.
    public static func parse(text: String, path: String) -> Result<Recipe, RecipeErrors> {
        let validator = Validator(file: path)
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            return .failure(RecipeErrors(errors: [validator.syntaxError(error)]))
        } catch {
            return .failure(RecipeErrors(errors: [RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: "not valid YAML: \(error)")]))
        }
        guard let root else {
            return .failure(
                RecipeErrors(errors: [
                    RecipeError(file: path, location: SourceLocation(line: 1, column: 1), message: "the recipe is empty", hint: "see guard.recipe(5) for the format")
                ]))
        }
        let recipe = validator.recipe(root, text: text, path: path)
        if let recipe, validator.errors.isEmpty { return .success(recipe) }
        return .failure(RecipeErrors(errors: validator.errors.sorted { ($0.location.line, $0.location.column) < ($1.location.line, $1.location.column) }))
    }

    /// The keys a recipe may have at the top level, for `guard help` and suggestions.
    public static let topLevelKeys = [
        "name", "description", "volumes", "quiesce", "resume", "steps", "verify", "on_success", "on_failure",
        "rollback", "env", "timeout", "cow", "chunk", "stop_at", "on_full", "verify_after_boot", "boot_attempts",
    ]
    static let volumeKeys = ["device", "mount", "snapshot"]
    static let snapshotKeys = ["size", "chunk", "cow", "extend"]
    static let extendKeys = ["at", "by", "max"]
    static let commandKeys = ["name", "run", "shell", "http", "timeout", "retries", "interval", "env", "cwd", "user"]
    static let httpKeys = ["url", "status", "contains", "timeout"]
    /// Keys only a verify check has: a step changes the system and runs once.
    static let verifyOnlyKeys = ["http", "retries", "interval"]
    static let rollbackKeys = ["stop", "start"]
}

/// Walks the YAML tree, collecting every error it finds.
final class Validator {
    let file: String
    var errors: [RecipeError] = []

    init(file: String) { self.file = file }

    func location(_ node: Node?) -> SourceLocation {
        guard let mark = node?.mark else { return SourceLocation(line: 1, column: 1) }
        return SourceLocation(line: mark.line, column: mark.column)
    }

    func error(_ node: Node?, _ message: String, hint: String? = nil) {
        errors.append(RecipeError(file: file, location: location(node), message: message, hint: hint))
    }

    func syntaxError(_ error: YamlError) -> RecipeError {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _), .composer(_, let problem, let mark, _):
            return RecipeError(
                file: file, location: SourceLocation(line: mark.line, column: mark.column), message: "YAML syntax error: \(problem)",
                hint: "check the indentation and quoting around here")
        case .duplicatedKeysInMapping(let duplicates, let context):
            return RecipeError(
                file: file, location: SourceLocation(line: context.mark.line, column: context.mark.column),
                message: "duplicate key \(duplicates.map { "'\($0)'" }.joined(separator: ", ")) in a mapping", hint: "each key may appear once")
        case .reader(let problem, _, _, _):
            return RecipeError(file: file, location: SourceLocation(line: 1, column: 1), message: "cannot read the recipe: \(problem)")
        default:
            return RecipeError(file: file, location: SourceLocation(line: 1, column: 1), message: "not valid YAML: \(error)")
        }
    }

    // MARK: Shapes

    /// The mapping's entries by key; reports unknown keys (with a suggestion) and missing required ones.
    func mapping(_ node: Node, _ context: String, allowed: [String], required: [String] = []) -> [String: (key: Node, value: Node)]? {
        guard case .mapping(let mapping) = node else {
            error(node, "\(context) must be a mapping of keys (\(allowed.joined(separator: ", "))), not \(describe(node))")
            return nil
        }
        var entries: [String: (Node, Node)] = [:]
        for (key, value) in mapping {
            guard let name = key.scalar?.string else {
                error(key, "\(context) has a key that is not a plain word")
                continue
            }
            if !allowed.contains(name) {
                let hint = suggestion(for: name, among: allowed).map { "did you mean '\($0)'?" } ?? "allowed: \(allowed.joined(separator: ", "))"
                error(key, "unknown key '\(name)' in \(context)", hint: hint)
                continue
            }
            entries[name] = (key, value)
        }
        for name in required where entries[name] == nil {
            error(node, "\(context) is missing '\(name)'")
        }
        return entries
    }

    func describe(_ node: Node) -> String {
        switch node {
        case .scalar(let scalar): return scalar.string.isEmpty ? "an empty value" : "the text '\(scalar.string)'"
        case .sequence: return "a list"
        case .mapping: return "a mapping"
        case .alias: return "an alias"
        }
    }

    func string(_ node: Node, _ context: String, allowEmpty: Bool = false) -> String? {
        guard case .scalar(let scalar) = node else {
            error(node, "\(context) must be text, not \(describe(node))")
            return nil
        }
        if node.null != nil || (!allowEmpty && scalar.string.trimmed.isEmpty) {
            error(node, "\(context) is empty")
            return nil
        }
        return scalar.string
    }

    func environment(_ node: Node, _ context: String) -> [String: String] {
        guard let entries = mappingAny(node, context) else { return [:] }
        var result: [String: String] = [:]
        for (key, value) in entries {
            guard let name = key.scalar?.string, isValidEnvironmentName(name) else {
                error(key, "\(context): '\(key.scalar?.string ?? "?")' is not a valid variable name", hint: "letters, digits and '_', not starting with a digit")
                continue
            }
            guard case .scalar(let scalar) = value else {
                error(value, "\(context).\(name) must be text, not \(describe(value))")
                continue
            }
            result[name] = value.null != nil ? "" : scalar.string
        }
        return result
    }

    private func mappingAny(_ node: Node, _ context: String) -> [(Node, Node)]? {
        guard case .mapping(let mapping) = node else {
            error(node, "\(context) must be a mapping of NAME: value, not \(describe(node))")
            return nil
        }
        return Array(mapping)
    }

    func isValidEnvironmentName(_ name: String) -> Bool {
        guard let first = name.unicodeScalars.first, first == "_" || (first.isASCII && first.properties.isAlphabetic) else { return false }
        return name.unicodeScalars.allSatisfy { $0 == "_" || ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0))) }
    }

    func duration(_ node: Node, _ context: String) -> Duration? {
        guard let text = string(node, context) else { return nil }
        switch Units.parseDuration(text) {
        case .success(let duration):
            if duration <= .zero { error(node, "\(context) must be longer than zero") }
            return duration
        case .failure(let failure):
            error(node, "\(context): \(failure.message)", hint: failure.hint)
            return nil
        }
    }

    func size(_ node: Node, _ context: String, allowPercent: Bool, allowAuto: Bool) -> SizeSpec? {
        guard let text = string(node, context) else { return nil }
        switch Units.parseSizeSpec(text, context: context, allowPercent: allowPercent, allowAuto: allowAuto) {
        case .success(let size): return size
        case .failure(let failure):
            error(node, failure.message, hint: failure.hint)
            return nil
        }
    }

    func absolutePath(_ node: Node, _ context: String) -> String? {
        guard let path = string(node, context) else { return nil }
        guard path.hasPrefix("/") else {
            error(node, "\(context) must be an absolute path, not '\(path)'")
            return nil
        }
        return path
    }

    // MARK: The recipe

    func recipe(_ root: Node, text: String, path: String) -> Recipe? {
        guard let top = mapping(root, "the recipe", allowed: RecipeParser.topLevelKeys, required: ["name", "volumes", "steps"]) else { return nil }

        var name = ""
        if let entry = top["name"], let value = string(entry.value, "name") {
            name = value.trimmed
            if name.contains(where: { $0 == "\n" || $0 == "/" }) {
                error(entry.value, "name must be one line without '/'")
            }
        }
        let description = top["description"].flatMap { string($0.value, "description", allowEmpty: true) }
        let environment = top["env"].map { self.environment($0.value, "env") } ?? [:]
        let defaultTimeout = top["timeout"].flatMap { duration($0.value, "timeout") }
        let defaultCow = top["cow"].flatMap { cowLocation($0.value, "cow") }
        let defaultChunk = top["chunk"].flatMap { chunk($0.value, "chunk") }
        var stopAtFill = 0.9
        if let entry = top["stop_at"], let text = string(entry.value, "stop_at") {
            if let percent = Units.parsePercent(text), percent >= 50, percent < 100 {
                stopAtFill = percent / 100
            } else {
                error(entry.value, "stop_at must be a percentage between 50% and 99%, not '\(text)'")
            }
        }

        var volumes: [VolumeSpec] = []
        if let entry = top["volumes"] {
            volumes = volumeList(entry.value, defaultCow: defaultCow, defaultChunk: defaultChunk)
        }
        let quiesce = top["quiesce"].map { hookCommands($0.value, "quiesce") } ?? []
        let resume = top["resume"].map { hookCommands($0.value, "resume") } ?? []
        let steps = top["steps"].map { stepList($0.value, "steps", requireOne: true) } ?? []
        let verify = top["verify"].map { stepList($0.value, "verify", requireOne: false, strict: true) } ?? []
        var rollbackStop: [Command] = []
        var rollbackStart: [Command] = []
        if let entry = top["rollback"], let hooks = mapping(entry.value, "rollback", allowed: RecipeParser.rollbackKeys) {
            rollbackStop = hooks["stop"].map { hookCommands($0.value, "rollback.stop") } ?? []
            rollbackStart = hooks["start"].map { hookCommands($0.value, "rollback.start") } ?? []
        }
        let onSuccess = top["on_success"].flatMap { successAction($0.value) } ?? .commit
        let onFailure = top["on_failure"].flatMap { failureAction($0.value) } ?? .rollback
        let onFull = top["on_full"].flatMap { fullAction($0.value) } ?? .fuse
        // Boot assessment: checks for the booted upgraded system, so the snapshot must outlive
        // the reboot (on_success: keep).
        let verifyAfterBoot = top["verify_after_boot"].map { stepList($0.value, "verify_after_boot", requireOne: false, strict: true) } ?? []
        if let entry = top["verify_after_boot"], !verifyAfterBoot.isEmpty, case .commit = onSuccess {
            error(entry.key, "verify_after_boot needs on_success: keep: the snapshot must outlive the reboot for the checks to roll it back", hint: "on_success: keep 3d")
        }
        var bootAttempts = Recipe.defaultBootAttempts
        if let entry = top["boot_attempts"], let text = string(entry.value, "boot_attempts") {
            if let number = Int(text.trimmed), (1...10).contains(number) {
                bootAttempts = number
            } else {
                error(
                    entry.value, "boot_attempts must be a whole number from 1 to 10, not '\(text)'",
                    hint: "boot_attempts: 2 rolls back when two boots in a row do not reach the checks")
            }
            if top["verify_after_boot"] == nil {
                error(entry.key, "boot_attempts without verify_after_boot", hint: "add verify_after_boot: the checks the booted system must pass")
            }
        }

        var recipe = Recipe(
            name: name, description: description, volumes: volumes, quiesce: quiesce, resume: resume, steps: steps,
            verify: verify, onSuccess: onSuccess, onFailure: onFailure, rollbackStop: rollbackStop,
            rollbackStart: rollbackStart, environment: environment, defaultTimeout: defaultTimeout, stopAtFill: stopAtFill,
            text: text, sha256: SHA256.hex(text), path: path)
        recipe.onFull = onFull
        recipe.verifyAfterBoot = verifyAfterBoot
        recipe.bootAttempts = bootAttempts
        return recipe
    }

    func chunk(_ node: Node, _ context: String) -> UInt64? {
        guard case .bytes(let bytes)? = size(node, context, allowPercent: false, allowAuto: false) else { return nil }
        guard bytes >= 4096, bytes <= 1 << 20, bytes.nonzeroBitCount == 1 else {
            error(node, "\(context) must be a power of two from 4K to 1M, not \(formatBytes(bytes))")
            return nil
        }
        return bytes
    }

    func cowLocation(_ node: Node, _ context: String) -> CowLocation? {
        guard let path = absolutePath(node, context) else { return nil }
        if path.hasPrefix("/dev/") && !path.hasPrefix("/dev/shm") { return .device(path) }
        return .directory(path)
    }

    func volumeList(_ node: Node, defaultCow: CowLocation?, defaultChunk: UInt64?) -> [VolumeSpec] {
        guard case .sequence(let sequence) = node else {
            error(node, "volumes must be a list of volumes (- device: ...), not \(describe(node))")
            return []
        }
        if sequence.isEmpty {
            error(node, "volumes is empty", hint: "name at least one volume to protect")
        }
        var volumes: [VolumeSpec] = []
        for (index, item) in sequence.enumerated() {
            let context = "volumes[\(index + 1)]"
            guard let entries = mapping(item, context, allowed: RecipeParser.volumeKeys, required: ["device", "snapshot"]) else { continue }
            var device: String?
            if let entry = entries["device"], let value = string(entry.value, "\(context).device") {
                device = value.trimmed
                if !(value.hasPrefix("/") || value.split(separator: "/").count == 2) {
                    error(
                        entry.value, "\(context).device '\(value)' is not a device path, VG/LV name or mount point", hint: "e.g. /dev/mapper/vg-website, vg/website or /srv/website"
                    )
                }
            }
            let mount = entries["mount"].flatMap { absolutePath($0.value, "\(context).mount") }
            var size: SizeSpec?
            var chunkBytes = defaultChunk
            var cow = defaultCow
            var extend: ExtendSpec?
            if let entry = entries["snapshot"] {
                if case .scalar = entry.value {
                    size = self.size(entry.value, "\(context).snapshot", allowPercent: true, allowAuto: true)
                } else if let snapshot = mapping(entry.value, "\(context).snapshot", allowed: RecipeParser.snapshotKeys, required: ["size"]) {
                    size = snapshot["size"].flatMap { self.size($0.value, "\(context).snapshot.size", allowPercent: true, allowAuto: true) }
                    if let value = snapshot["chunk"] { chunkBytes = chunk(value.value, "\(context).snapshot.chunk") }
                    if let value = snapshot["cow"] { cow = cowLocation(value.value, "\(context).snapshot.cow") }
                    if let value = snapshot["extend"] {
                        extend = extendSpec(value.value, "\(context).snapshot.extend")
                        if case .device? = cow {
                            error(value.key, "\(context).snapshot.extend needs a COW file; a COW device cannot grow", hint: "remove extend, or use a directory for cow")
                        }
                    }
                }
            }
            guard let device, let size else { continue }
            if volumes.contains(where: { $0.device == device }) {
                error(entries["device"]?.value, "\(context).device '\(device)' is listed twice", hint: "each volume once")
                continue
            }
            if let mount, volumes.contains(where: { $0.mount == mount }) {
                error(entries["mount"]?.value, "\(context).mount '\(mount)' is the mount point of another volume")
            }
            volumes.append(VolumeSpec(device: device, mount: mount, size: size, chunkBytes: chunkBytes, cow: cow, extend: extend, location: location(item)))
        }
        // A COW inside a protected volume would be rolled back with it.
        for volume in volumes {
            guard case .directory(let directory)? = volume.cow else { continue }
            for other in volumes {
                // "/" holds every path lexically; whether the COW's filesystem is really on the
                // root volume is checked against the devices when the run is planned.
                if let mount = other.mount, mount != "/", isPath(directory, under: mount) {
                    errors.append(
                        RecipeError(
                            file: file, location: volume.location,
                            message: "the COW location \(directory) is on the protected volume mounted at \(mount)",
                            hint: "put the COW on a filesystem that is not snapshotted (e.g. /var/lib/guard/cow)"))
                }
                if other.device.hasPrefix("/") && !other.device.hasPrefix("/dev/") && isPath(directory, under: other.device) {
                    errors.append(RecipeError(file: file, location: volume.location, message: "the COW location \(directory) is on the protected volume \(other.device)"))
                }
            }
        }
        return volumes
    }

    func isPath(_ path: String, under base: String) -> Bool {
        let trimmedBase = base.count > 1 && base.hasSuffix("/") ? String(base.dropLast()) : base
        return path == trimmedBase || path.hasPrefix(trimmedBase == "/" ? "/" : trimmedBase + "/")
    }

    func extendSpec(_ node: Node, _ context: String) -> ExtendSpec? {
        guard let entries = mapping(node, context, allowed: RecipeParser.extendKeys, required: ["by", "max"]) else { return nil }
        var at = 0.8
        if let entry = entries["at"], let text = string(entry.value, "\(context).at") {
            if let threshold = Units.parseGrowthThreshold(text) {
                at = threshold
            } else {
                error(entry.value, "\(context).at must be a percentage between 10% and 99%, not '\(text)'")
            }
        }
        let by = entries["by"].flatMap { size($0.value, "\(context).by", allowPercent: true, allowAuto: false) }
        let max = entries["max"].flatMap { size($0.value, "\(context).max", allowPercent: true, allowAuto: false) }
        guard let by, let max else { return nil }
        return ExtendSpec(at: at, by: by, max: max)
    }
}

/// The closest of `candidates` to `word` when it is close enough to be a typo.
func suggestion(for word: String, among candidates: [String]) -> String? {
    let scored = candidates.map { ($0, editDistance(word.lowercased(), $0)) }.min { $0.1 < $1.1 }
    guard let (best, distance) = scored, distance <= (best.count >= 4 ? 2 : 1) else { return nil }
    return best
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// neighbours each cost one ("stpes" is one swap from "steps").
func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a)
    let b = Array(b)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var beforePrevious = [Int](repeating: 0, count: b.count + 1)
    var previous = Array(0...b.count)
    for i in 1...a.count {
        var current = [i] + [Int](repeating: 0, count: b.count)
        for j in 1...b.count {
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] {
                current[j] = min(current[j], beforePrevious[j - 2] + 1)
            }
        }
        beforePrevious = previous
        previous = current
    }
    return previous[b.count]
}
