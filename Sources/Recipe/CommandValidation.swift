import Foundation
import Quantities
import Yams

extension Validator {
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
