import Foundation

/// `guard apt -- ARGS`: an apt run under a recipe that says what to snapshot and check
/// (volumes, verify, verify_after_boot, on_success, ...). Its steps, if it has any, are
/// replaced by `apt-get update` and `apt-get -y ARGS`, non-interactive; the result is an
/// ordinary recipe text, journaled as the run's recipe (so `guard show` and recovery read
/// exactly what ran).
public enum AptRecipe {
    /// The recipe text for `apt-get ARGS` under `base`, or why not.
    public static func compose(base: String, arguments: [String]) -> Result<String, AptRecipeError> {
        guard !arguments.isEmpty else { return .failure(AptRecipeError("give apt-get's arguments after --, e.g. `guard apt -- full-upgrade`")) }
        var lines = base.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        // The top-level `steps:` entry, to its next top-level key (block or flow style).
        if let start = lines.firstIndex(where: { $0.hasPrefix("steps:") }) {
            var end = start + 1
            while end < lines.count, lines[end].isEmpty || lines[end].first == " " || lines[end].first == "\t" || lines[end].first == "-" { end += 1 }
            lines.removeSubrange(start..<end)
        }
        while lines.last?.isEmpty == true { lines.removeLast() }
        // JSON strings are YAML flow scalars: each argument arrives as written.
        func quoted(_ text: String) -> String {
            let data = try? JSONEncoder().encode(text)
            return data.map { String(decoding: $0, as: UTF8.self) } ?? "\"\""
        }
        let argv = (["apt-get", "-y", "-q"] + arguments).map(quoted).joined(separator: ", ")
        let name = quoted("apt-get " + arguments.joined(separator: " "))
        lines += [
            "# Steps written by `guard apt` (the recipe's own, if any, were replaced):",
            "steps:",
            "  - name: apt-get update",
            "    run: [\"apt-get\", \"update\", \"-q\"]",
            "    env: { DEBIAN_FRONTEND: noninteractive }",
            "  - name: \(name)",
            "    run: [\(argv)]",
            "    env: { DEBIAN_FRONTEND: noninteractive }",
            "",
        ]
        return .success(lines.joined(separator: "\n"))
    }
}

public struct AptRecipeError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}
