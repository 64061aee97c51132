import ArgumentParser
import Engine
import Journal

/// Shell completion of the words guard cannot know statically.
enum Completions {
    /// A run argument: the journal's runs, open ones (kept, stale, needing reassembly) first,
    /// then the newest, by number. The state directory is the one the command line names
    /// (--state-dir, --config) or the default; nothing when the journal cannot be read (a
    /// user who is not root). The journal is opened as `guard history` opens it.
    static let runs = CompletionKind.custom { words, _, prefix in
        runNumbers(words: words).filter { $0.hasPrefix(prefix) }
    }

    /// A recipe argument: files ending in .recipe (and directories to reach them).
    static let recipes = CompletionKind.file(extensions: ["recipe"])

    static func runNumbers(words: [String]) -> [String] {
        var arguments: [String] = []
        for name in ["--state-dir", "--config"] {
            if let index = words.firstIndex(of: name), index + 1 < words.count { arguments += [name, words[index + 1]] }
        }
        guard let options = try? GlobalOptions.parse(arguments), let settings = try? options.settings() else { return [] }
        let context = GuardContext(stateDirectory: settings.stateDirectory.value, reporter: SilentReporter(), configuration: settings.file)
        guard let journal = try? context.existingJournal() else { return [] }
        let open = ((try? journal.runs(in: RunState.open)) ?? []).reversed().compactMap(\.id)
        let newest = ((try? journal.history(limit: 50)) ?? []).map(\.id)
        var seen: Set<Int64> = []
        return (open + newest).filter { seen.insert($0).inserted }.map { "\($0)" }
    }
}
