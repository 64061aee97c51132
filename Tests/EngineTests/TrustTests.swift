import BlockDevice
import Engine
import Foundation
import Recipe
import Testing

/// Issue 17: what guard runs as root is read once and checked on that descriptor.
@Suite("trust: recipes, state and input read as root")
struct TrustTests {
    /// A root-only directory (0755, owned by whoever runs the tests) under a fresh /tmp path.
    func directory(_ mode: mode_t = 0o755) throws -> String {
        let path = "/tmp/guard-trust-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        chmod(path, mode)
        return path
    }

    let recipeText = "name: trust\nvolumes:\n  - device: /dev/mapper/x\n    snapshot: 8M\nsteps:\n  - name: s\n    run: [/bin/true]\n"

    func write(_ text: String, to path: String, mode: mode_t = 0o644) throws {
        try text.write(toFile: path, atomically: false, encoding: .utf8)
        chmod(path, mode)
    }

    @Test("a safe recipe reads as it is, with no problem")
    func safeRecipe() throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try write(recipeText, to: "\(dir)/r.recipe")
        let loaded = RecipeFile.load("\(dir)/r.recipe")
        #expect(loaded.problem == nil, "\(loaded.problem ?? "")")
        guard case .success(let recipe) = loaded.recipe else {
            Issue.record("\(loaded.recipe)")
            return
        }
        #expect(recipe.text == recipeText, "the text checked is the text parsed and journaled")
    }

    @Test("a symbolic link, a FIFO and a recipe over 1 MiB are refused with the file named; nothing is run", arguments: ["symlink", "fifo", "large"])
    func refusedFiles(kind: String) throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = "\(dir)/r.recipe"
        switch kind {
        case "symlink":
            try write(recipeText, to: "\(dir)/real.recipe")
            try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: "\(dir)/real.recipe")
        case "fifo":
            #expect(mkfifo(path, 0o644) == 0)
        default:
            try write(recipeText + "# " + String(repeating: "x", count: RecipeFile.sizeLimit) + "\n", to: path)
        }
        let loaded = RecipeFile.load(path)
        guard case .failure(let errors) = loaded.recipe else {
            Issue.record("\(kind) was accepted")
            return
        }
        let text = "\(errors)"
        #expect(text.contains(path), "\(text)")
        let expected = ["symlink": "symbolic link", "fifo": "not a regular file", "large": "more than the"][kind]!
        #expect(text.contains(expected), "\(text)")
    }

    @Test("a recipe others could change is unsafe: group-writable, or in a directory others can write (a sticky one is fine)", arguments: ["file", "directory", "sticky"])
    func unsafeRecipes(kind: String) throws {
        let dir = try directory(kind == "directory" ? 0o777 : kind == "sticky" ? 0o1777 : 0o755)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = "\(dir)/r.recipe"
        try write(recipeText, to: path, mode: kind == "file" ? 0o664 : 0o644)
        chmod(dir, kind == "directory" ? 0o777 : kind == "sticky" ? 0o1777 : 0o755)  // past the umask
        let problem = RecipeFile.load(path).problem
        switch kind {
        case "file": #expect(problem?.contains("writable by its group") == true, "\(problem ?? "nil")")
        case "directory": #expect(problem?.contains("directory \(dir) is writable by others") == true, "\(problem ?? "nil")")
        default: #expect(problem == nil, "a sticky directory: nobody else can replace root's file: \(problem ?? "")")
        }
    }

    @Test("the advice for an unsafe recipe is a command that makes a copy guard accepts (a checkout owned by a normal user)")
    func unsafeAdviceWorks() throws {
        let checkout = try directory(0o777)
        let safe = try directory()
        defer { for d in [checkout, safe] { try? FileManager.default.removeItem(atPath: d) } }
        chmod(checkout, 0o777)
        let path = "\(checkout)/website.recipe"
        try write(recipeText, to: path)
        #expect(RecipeFile.load(path).problem != nil)
        let advice = RecipeFile.unsafeAdvice(path)
        let parts = advice.split(separator: "`", omittingEmptySubsequences: false)
        guard parts.count >= 3, parts[1].hasPrefix("sudo ") else {
            Issue.record("no command in: \(advice)")
            return
        }
        // As written, but into a directory of this test instead of /etc/guard, and as root already.
        let command = String(parts[1].dropFirst("sudo ".count)).replacingOccurrences(of: " /etc/guard/", with: " \(safe)/guard/")
        #expect(command.hasSuffix("/guard/website.recipe"), "\(command)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(command)")
        let copy = RecipeFile.load("\(safe)/guard/website.recipe")
        #expect(copy.problem == nil, "\(copy.problem ?? "")")
        guard case .success(let recipe) = copy.recipe else {
            Issue.record("\(copy.recipe)")
            return
        }
        #expect(recipe.text == recipeText)
    }

    @Test("a state directory or journal others can write is refused before the journal is opened")
    func untrustedState() throws {
        let dir = try directory(0o777)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o777)
        let context = GuardContext(stateDirectory: dir, reporter: SilentReporter())
        #expect(throws: GuardFailure.self) { try context.journal() }
        do { _ = try context.journal() } catch let failure as GuardFailure {
            #expect(failure.kind == .refused)
            #expect(failure.message.contains(dir) && failure.message.contains("writable"), "\(failure.message)")
        }
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/journal.sqlite"), "nothing was created")
        chmod(dir, 0o700)
        try write("", to: "\(dir)/journal.sqlite", mode: 0o666)
        chmod("\(dir)/journal.sqlite", 0o666)
        #expect(TrustedFiles.fileProblem("\(dir)/journal.sqlite", what: "the journal")?.contains("writable") == true)
    }

    @Test("input that used to trap gives a clear error: a duration past a century, an infinite one")
    func overflowingDurations() {
        for text in ["99999999999999999999d", String(repeating: "9", count: 400) + "s", "36501d"] {
            guard case .failure(let error) = Units.parseDuration(text) else {
                Issue.record("\(text) parsed")
                continue
            }
            #expect(error.message.contains("too long"), "\(error.message)")
        }
        guard case .success = Units.parseDuration("36500d") else {
            Issue.record("100 years is allowed")
            return
        }
    }
}
