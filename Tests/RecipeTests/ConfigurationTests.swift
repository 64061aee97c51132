import Foundation
import Recipe
import Testing

@Suite("guard.conf")
struct ConfigurationTests {
    @Test("every key, comments and blank lines")
    func everyKey() throws {
        let text = """
            # site defaults
            state_dir = /srv/guard      # on the system disk

            cow_dir=/srv/guard-cow
            keep = 7d
            extend = at 70% by 10% max 2G
            """
        let configuration = try GuardConfiguration.parse(text, path: "/etc/guard/guard.conf")
        #expect(configuration.path == "/etc/guard/guard.conf")
        #expect(configuration.stateDirectory == "/srv/guard")
        #expect(configuration.cowDirectory == "/srv/guard-cow")
        #expect(configuration.keep == .seconds(7 * 86400))
        #expect(configuration.extend == ExtendSpec(at: 0.7, by: .percent(10), max: .bytes(2 << 30)))
    }

    @Test("'forever' and 'none' are the built-in defaults, written out")
    func explicitDefaults() throws {
        let configuration = try GuardConfiguration.parse("keep = forever\nextend = none\n", path: "g.conf")
        #expect(configuration.keep == nil && configuration.extend == nil)
        #expect(try GuardConfiguration.parse("extend = by 25M max 200M", path: "g.conf").extend == ExtendSpec(at: 0.8, by: .bytes(25 << 20), max: .bytes(200 << 20)))
    }

    @Test(
        "each bad line names the file, its line and column, and says what to write",
        arguments: [
            ("stat_dir = /x", "g.conf:1:1: unknown setting 'stat_dir'; did you mean 'state_dir'?"),
            ("state_dir /x", "g.conf:1:1: 'state_dir /x' is not a setting"),
            ("cow_dir = srv", "g.conf:1:11: cow_dir must be an absolute path, not 'srv'"),
            ("keep = 7", "g.conf:1:8: keep: the duration '7' has no unit"),
            ("keep = 0s", "g.conf:1:8: keep must be longer than zero"),
            ("extend = by 10M", "g.conf:1:10: extend: 'by 10M' needs both by and max"),
            ("extend = at 5% by 1M max 2M", "g.conf:1:10: extend: at must be a percentage between 10% and 99%"),
            ("extend = by 10Q max 1G", "g.conf:1:10: extend: by: unknown size unit 'q'"),
            ("extend = by 0M max 1G", "g.conf:1:10: extend: by must be larger than zero"),
            ("extend = by 10% max 150%", "g.conf:1:10: extend: max: '150%' is not a percentage between 0 and 100"),
            ("keep =", "g.conf:1:7: keep has no value"),
            ("keep = 1d\nkeep = 2d", "g.conf:2:1: keep is set twice (first on line 1)"),
        ])
    func badLines(text: String, expected: String) {
        #expect(throws: RecipeErrors.self) { try GuardConfiguration.parse(text, path: "g.conf") }
        do {
            _ = try GuardConfiguration.parse(text, path: "g.conf")
        } catch {
            #expect("\(error)".hasPrefix(expected), "\(error)")
        }
    }

    @Test("every error of a file at once")
    func allErrors() {
        do {
            _ = try GuardConfiguration.parse("kep = 1d\ncow_dir = x\nextend = sometimes\n", path: "g.conf")
            Issue.record("parsed")
        } catch let errors as RecipeErrors {
            #expect(errors.errors.map(\.location.line) == [1, 2, 3])
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test("a missing file: defaults when looked for, an error when named")
    func missingFile() throws {
        let path = "/nonexistent-\(UInt32.random(in: 0...UInt32.max))/guard.conf"
        #expect(try GuardConfiguration.load(path: path, required: false) == GuardConfiguration())
        #expect(throws: RecipeErrors.self) { try GuardConfiguration.load(path: path, required: true) }
    }

    @Test("for guard recover: the valid settings of a file with errors, and the errors")
    func keepingValid() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("guard-\(UInt32.random(in: 0...UInt32.max)).conf").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try "state_dir = /srv/guard\nkeep = soon\ncow_dir = /srv/cow\n".write(toFile: path, atomically: true, encoding: .utf8)
        let (configuration, errors) = GuardConfiguration.loadKeepingValid(path: path, required: true)
        #expect(configuration.stateDirectory == "/srv/guard" && configuration.cowDirectory == "/srv/cow" && configuration.keep == nil)
        #expect(errors?.errors.map(\.location.line) == [2])
        #expect(throws: RecipeErrors.self) { try GuardConfiguration.load(path: path, required: true) }
        let missing = GuardConfiguration.loadKeepingValid(path: path + ".missing", required: true)
        #expect(missing.0 == GuardConfiguration() && missing.1 != nil)
    }
}
