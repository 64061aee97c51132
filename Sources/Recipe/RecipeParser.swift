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

    // MARK: Commands

    /// `steps:` or `verify:`: a list of mappings with a name and `run` or `shell`.
    /// - Parameter strict: `shell:` scripts run with errexit and pipefail (verify checks).
    func stepList(_ node: Node, _ context: String, requireOne: Bool, strict: Bool = false) -> [Command] {
        guard case .sequence(let sequence) = node else {
            error(node, "\(context) must be a list (- name: ...), not \(describe(node))")
            return []
        }
        if requireOne && sequence.isEmpty {
            error(node, "\(context) is empty", hint: "a recipe needs at least one step")
        }
        var commands: [Command] = []
        for (index, item) in sequence.enumerated() {
            if var command = command(item, "\(context)[\(index + 1)]", requireName: true, defaultName: "\(context) \(index + 1)", verify: strict) {
                if strict, case .shell(let script) = command.invocation { command.invocation = .strictShell(script) }
                if commands.contains(where: { $0.name == command.name }) {
                    error(item, "\(context)[\(index + 1)] repeats the name '\(command.name)'", hint: "names identify steps in the journal; make them unique")
                }
                commands.append(command)
            }
        }
        return commands
    }

    /// A hook: one argv list, a command line, a mapping, or a list of those.
    func hookCommands(_ node: Node, _ context: String) -> [Command] {
        switch node {
        case .sequence(let sequence) where sequence.allSatisfy({ if case .scalar = $0 { return true } else { return false } }):
            return command(node, context, requireName: false, defaultName: context).map { [$0] } ?? []
        case .sequence(let sequence):
            return sequence.enumerated().compactMap { index, item in
                command(item, "\(context)[\(index + 1)]", requireName: false, defaultName: "\(context) \(index + 1)")
            }
        default:
            return command(node, context, requireName: false, defaultName: context).map { [$0] } ?? []
        }
    }

    /// One command in any of its forms.
    /// - Parameter verify: a verify check, which may be `http:` and may have `retries:` and `interval:`.
    func command(_ node: Node, _ context: String, requireName: Bool, defaultName: String, verify: Bool = false) -> Command? {
        switch node {
        case .scalar:
            guard let line = string(node, context) else { return nil }
            guard let argv = splitCommandLine(line, node, context) else { return nil }
            return Command(name: argv.joined(separator: " "), invocation: .argv(argv), location: location(node))
        case .sequence:
            guard let argv = argvList(node, context) else { return nil }
            return Command(name: argv.joined(separator: " "), invocation: .argv(argv), location: location(node))
        case .mapping:
            guard let entries = mapping(node, context, allowed: RecipeParser.commandKeys, required: requireName ? ["name"] : []) else { return nil }
            var name: String?
            if let entry = entries["name"], let value = string(entry.value, "\(context).name") { name = value.trimmed }
            if !verify {
                for key in RecipeParser.verifyOnlyKeys {
                    if let entry = entries[key] {
                        error(
                            entry.key, "'\(key)' in \(context): only verify checks have it",
                            hint: "a step changes the system and runs once; put checks that may need to wait under verify:")
                    }
                }
            }
            var invocation: Invocation?
            var httpTimeout: Duration?
            let given = ["run", "shell", "http"].filter { entries[$0] != nil }
            switch (entries["run"], entries["shell"]) {
            case _ where given.count > 1:
                error(entries[given[1]]!.key, "\(context) has both '\(given[0])' and '\(given[1])'", hint: "keep one")
            case (nil, nil) where verify && entries["http"] != nil:
                if let check = httpCheck(entries["http"]!.value, "\(context).http", timeout: &httpTimeout) { invocation = .http(check) }
            case (nil, nil):
                error(
                    node,
                    verify ? "\(context) needs 'run' (a command), 'shell' (a shell script) or 'http' (a URL)" : "\(context) needs 'run' (a command) or 'shell' (a shell script)")
            case (.some, .some):
                break
            case (let run?, nil):
                if case .sequence = run.value {
                    invocation = argvList(run.value, "\(context).run").map { .argv($0) }
                } else if let line = string(run.value, "\(context).run") {
                    invocation = splitCommandLine(line, run.value, "\(context).run").map { .argv($0) }
                }
            case (nil, let shell?):
                invocation = string(shell.value, "\(context).shell").map { .shell($0) }
            }
            var timeout = entries["timeout"].flatMap { duration($0.value, "\(context).timeout") }
            if let httpTimeout {
                if let entry = entries["timeout"] { error(entry.key, "\(context) has a timeout twice, here and in http:", hint: "keep one") }
                timeout = httpTimeout
            }
            var retries = 0
            if let entry = entries["retries"], let text = string(entry.value, "\(context).retries") {
                if let number = Int(text.trimmed), (0...1000).contains(number) {
                    retries = number
                } else {
                    error(entry.value, "\(context).retries must be a whole number from 0 to 1000, not '\(text)'", hint: "retries: 5 runs the check up to 6 times")
                }
            }
            var interval = Command.defaultInterval
            if let entry = entries["interval"], let value = duration(entry.value, "\(context).interval") {
                interval = value
                if retries == 0 && entries["retries"] == nil {
                    error(entry.key, "\(context) has an interval but no retries", hint: "add retries: N (how many times it runs again)")
                }
            }
            let environment = entries["env"].map { self.environment($0.value, "\(context).env") } ?? [:]
            let workingDirectory = entries["cwd"].flatMap { absolutePath($0.value, "\(context).cwd") }
            let user = entries["user"].flatMap { string($0.value, "\(context).user") }
            guard let invocation else { return nil }
            return Command(
                name: name ?? (requireName ? defaultName : invocation.description), invocation: invocation, timeout: timeout, environment: environment,
                workingDirectory: workingDirectory, user: user?.trimmed, location: location(node), retries: retries, interval: interval)
        case .alias:
            error(node, "\(context) cannot be an alias")
            return nil
        }
    }

    /// `http: URL` or `http: {url, status, contains, timeout}`.
    func httpCheck(_ node: Node, _ context: String, timeout: inout Duration?) -> HTTPCheck? {
        var url: String?
        var check = HTTPCheck(url: "")
        var urlNode = node
        if case .mapping = node {
            guard let entries = mapping(node, context, allowed: RecipeParser.httpKeys, required: ["url"]) else { return nil }
            if let entry = entries["url"] {
                url = string(entry.value, "\(context).url")
                urlNode = entry.value
            }
            if let entry = entries["status"], let text = string(entry.value, "\(context).status") {
                if let status = Int(text.trimmed), (100...599).contains(status) {
                    check.status = status
                } else {
                    error(entry.value, "\(context).status must be an HTTP status from 100 to 599, not '\(text)'", hint: "leave it out to accept any 2xx")
                }
            }
            if let entry = entries["contains"], let text = string(entry.value, "\(context).contains") { check.contains = text }
            timeout = entries["timeout"].flatMap { duration($0.value, "\(context).timeout") }
        } else {
            url = string(node, context)
        }
        guard let url = url?.trimmed else { return nil }
        switch HTTPCheck.parse(url) {
        case .success:
            check.url = url
            return check
        case .failure(let failure):
            error(urlNode, "\(context): \(failure.message)", hint: failure.hint)
            return nil
        }
    }

    func argvList(_ node: Node, _ context: String) -> [String]? {
        guard case .sequence(let sequence) = node else { return nil }
        guard !sequence.isEmpty else {
            error(node, "\(context) is an empty command")
            return nil
        }
        var argv: [String] = []
        for item in sequence {
            guard case .scalar(let scalar) = item else {
                error(item, "\(context): every word of a command must be text, not \(describe(item))")
                return nil
            }
            argv.append(scalar.string)
        }
        if argv[0].trimmed.isEmpty {
            error(node, "\(context) has an empty program name")
            return nil
        }
        return argv
    }

    /// Splits `run: systemctl stop web` into words; refuses shell syntax, which needs `shell:`.
    func splitCommandLine(_ line: String, _ node: Node, _ context: String) -> [String]? {
        let special: Set<Character> = ["|", "&", ";", "<", ">", "(", ")", "$", "`", "\\", "\"", "'", "*", "?", "[", "]", "#", "~", "\n"]
        if let character = line.first(where: { special.contains($0) }) {
            error(
                node, "\(context) '\(line)' uses shell syntax ('\(character == "\n" ? "newline" : String(character))') but runs without a shell",
                hint: "write it as `shell: ...`, or as a list of words")
            return nil
        }
        let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard !words.isEmpty else {
            error(node, "\(context) is an empty command")
            return nil
        }
        return words
    }

    func successAction(_ node: Node) -> SuccessAction? {
        if case .mapping = node {
            guard let entries = mapping(node, "on_success", allowed: ["keep"], required: ["keep"]) else { return nil }
            return entries["keep"].flatMap { duration($0.value, "on_success.keep") }.map { .keep($0) }
        }
        guard let text = string(node, "on_success") else { return nil }
        let words = text.split(separator: " ", omittingEmptySubsequences: true)
        switch words.first.map(String.init) {
        case "commit" where words.count == 1: return .commit
        case "keep" where words.count == 1: return .keep(nil)
        case "keep" where words.count >= 2:  // `keep 24h`, `keep 1h 30min`
            switch Units.parseDuration(words.dropFirst().joined(separator: " ")) {
            case .success(let duration): return .keep(duration)
            case .failure(let failure):
                error(node, "on_success: \(failure.message)", hint: failure.hint)
                return nil
            }
        default:
            let hint = suggestion(for: String(words.first ?? ""), among: ["commit", "keep"]).map { "did you mean '\($0)'?" } ?? "use 'commit', 'keep' or 'keep 24h'"
            error(node, "on_success must be 'commit', 'keep' or 'keep DURATION', not '\(text)'", hint: hint)
            return nil
        }
    }

    func fullAction(_ node: Node) -> FullAction? {
        guard let text = string(node, "on_full") else { return nil }
        if let action = FullAction(rawValue: text.trimmed) { return action }
        let names = FullAction.allCases.map(\.rawValue)
        let hint = suggestion(for: text.trimmed, among: names).map { "did you mean '\($0)'?" } ?? "use 'fuse', 'commit' or 'rollback'"
        error(node, "on_full must be 'fuse', 'commit' or 'rollback', not '\(text)'", hint: hint)
        return nil
    }

    func failureAction(_ node: Node) -> FailureAction? {
        guard let text = string(node, "on_failure") else { return nil }
        if let action = FailureAction(rawValue: text.trimmed) { return action }
        let hint = suggestion(for: text.trimmed, among: ["rollback", "keep"]).map { "did you mean '\($0)'?" } ?? "use 'rollback' or 'keep'"
        error(node, "on_failure must be 'rollback' or 'keep', not '\(text)'", hint: hint)
        return nil
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
