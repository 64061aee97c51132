import Foundation
import Testing

@testable import GuardCommands

/// Validates a `--json` document against Docs/schema/NAME.schema.json with python3-jsonschema:
/// the output of the validator (each violation with its place) when it is not valid.
/// Strict by default, as guard's own output must be: no field the schema does not document.
func schemaViolations(_ document: String, schema: String, strict: Bool = true) async throws -> String? {
    let file = FileManager.default.temporaryDirectory.appendingPathComponent("guard-doc-\(UInt32.random(in: 0...UInt32.max)).json").path
    try Data(document.utf8).write(to: URL(fileURLWithPath: file))
    defer { try? FileManager.default.removeItem(atPath: file) }
    let result = try await runProgram(
        "/usr/bin/python3", ["\(packageRoot)/Scripts/lib/validate-json.py"] + (strict ? ["--strict"] : []) + [schema, file], environment: ProcessInfo.processInfo.environment)
    return result.status == 0 ? nil : "exit \(result.status): \(result.stderr)\n\(document)"
}

/// Validates a file (a recipe: YAML) against a schema given by its path, strictly.
func schemaFileViolations(_ file: String, schema: String) async throws -> String? {
    let result = try await runProgram(
        "/usr/bin/python3", ["\(packageRoot)/Scripts/lib/validate-json.py", "--strict", schema, file], environment: ProcessInfo.processInfo.environment)
    return result.status == 0 ? nil : "exit \(result.status): \(result.stderr)"
}

/// Issue 21: every `--json` prints one object with schema_version, every key present (null
/// when it has no value), valid against its schema in Docs/schema/.
@Suite("the JSON contract")
struct JSONContractTests {
    struct Sample: Encodable {
        struct Inner: Encodable {
            var value: Int?
        }
        var name: String
        var missing: String?
        var count: UInt64?
        var ratio: Double
        var whole: Double
        var list: [Inner]
        var empty: [String]
        var nested: [String: Int]
    }

    @Test("an absent optional is null, keys are sorted, strings escaped, numbers in their shortest form")
    func encoder() throws {
        let sample = Sample(
            name: "a \"b\"\\\n\u{01}/é", missing: nil, count: 7, ratio: 0.25, whole: 3, list: [.init(value: nil), .init(value: -2)], empty: [], nested: ["z": 1, "a": 2])
        let text = try DocumentEncoder().encode(sample).text()
        #expect(
            text == """
                {
                  "count" : 7,
                  "empty" : [],
                  "list" : [
                    {
                      "value" : null
                    },
                    {
                      "value" : -2
                    }
                  ],
                  "missing" : null,
                  "name" : "a \\"b\\"\\\\\\n\\u0001/é",
                  "nested" : {
                    "a" : 2,
                    "z" : 1
                  },
                  "ratio" : 0.25,
                  "whole" : 3
                }
                """)
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(parsed["name"] as? String == sample.name)
        #expect(parsed["missing"] is NSNull)
    }

    @Test("a number JSON cannot hold is an error, not a broken document")
    func nonFinite() {
        #expect(throws: EncodingError.self) { try DocumentEncoder().encode(["fill": Double.nan]) }
    }

    @Test("every schema in Docs/schema is a valid Draft 2020-12 schema, and every command with --json names its schema")
    func schemasCoverCommands() async throws {
        let directory = "\(packageRoot)/Docs/schema"
        let names = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".schema.json") }.sorted()
        #expect(names.count >= 11)
        var printedBy = ""
        for name in names {
            let schema = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(directory)/\(name)"))) as? [String: Any])
            #expect(schema["$schema"] as? String == "https://json-schema.org/draft/2020-12/schema", "\(name)")
            #expect((schema["required"] as? [String])?.contains("schema_version") == true, "\(name) requires schema_version")
            printedBy += schema["description"] as? String ?? ""
            // The schema is itself checked by the validator (check_schema) on a minimal document.
            let violations = try await schemaViolations("{}", schema: String(name.dropLast(".schema.json".count)))
            #expect(violations?.contains("is a required property") == true, "\(name): \(violations ?? "valid")")
        }
        let withJSON = try await commandTree().filter { $0.longNames.contains("json") }
        #expect(withJSON.count >= 15, "\(withJSON.map(\.words))")
        for command in withJSON {
            let words = "guard " + command.words.joined(separator: " ")
            #expect(printedBy.contains("`\(words) --json") || printedBy.contains("`\(words) --dry-run --json"), "\(words) --json is in no schema's 'Printed by'")
        }
    }

    @Test("a field a newer guard adds still validates against the shipped schemas (a strict validator would break); guard's own tests refuse undocumented fields")
    func newFieldsValidate() async throws {
        let state = try stateWithRuns()
        for name in try FileManager.default.contentsOfDirectory(atPath: "\(packageRoot)/Docs/schema") where name.hasSuffix(".schema.json") {
            let text = try String(contentsOfFile: "\(packageRoot)/Docs/schema/\(name)", encoding: .utf8)
            #expect(!text.contains("\"additionalProperties\": false"), "\(name) closes an object to new fields")
        }
        for (arguments, schema) in [(["show", "1", "--json"], "run"), (["history", "--json"], "history"), (["config", "--json"], "config")] {
            let output = try await guardCommand(arguments + ["--state-dir", state])
            var document = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any], "\(arguments)")
            // A new field at the top and one inside the first nested object, as a later version might add.
            document["added_in_a_later_version"] = "x"
            if let key = document.keys.sorted().first(where: { document[$0] is [String: Any] }), var inner = document[key] as? [String: Any] {
                inner["also_added"] = 1
                document[key] = inner
            } else if let key = document.keys.sorted().first(where: { (document[$0] as? [[String: Any]])?.isEmpty == false }), var list = document[key] as? [[String: Any]] {
                list[0]["also_added"] = 1
                document[key] = list
            }
            let extended = String(decoding: try JSONSerialization.data(withJSONObject: document, options: [.sortedKeys]), as: UTF8.self)
            let lenient = try await schemaViolations(extended, schema: schema, strict: false)
            #expect(lenient == nil, "\(arguments): \(lenient ?? "")")
            let strict = try await schemaViolations(extended, schema: schema)
            #expect(strict?.contains("added_in_a_later_version") == true && strict?.contains("also_added") == true, "\(arguments): \(strict ?? "valid")")
        }
    }

    @Test("the recipe schema (for editors) accepts every example recipe and the reference's example, and refuses what guard check refuses: an unknown key, a bare number as a size")
    func recipeSchema() async throws {
        let schema = "\(packageRoot)/Docs/schema/input/recipe.schema.json"
        let recipes = try FileManager.default.contentsOfDirectory(atPath: "\(packageRoot)/Recipes").filter { $0.hasSuffix(".recipe") }.sorted()
        #expect(recipes.count >= 5)
        for recipe in recipes {
            let path = "\(packageRoot)/Recipes/\(recipe)"
            let text = try String(contentsOfFile: path, encoding: .utf8)
            #expect(text.hasPrefix("# yaml-language-server: $schema=/usr/share/doc/guard/schema/input/recipe.schema.json\n"), "\(recipe) names the schema for editors")
            let violations = try await schemaFileViolations(path, schema: schema)
            #expect(violations == nil, "\(recipe): \(violations ?? "")")
        }
        let reference = try String(contentsOfFile: "\(packageRoot)/Docs/recipes.md", encoding: .utf8)
        let example = try #require(reference.components(separatedBy: "```yaml\n").dropFirst().first?.components(separatedBy: "```").first)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-recipe-schema-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try example.write(toFile: "\(directory)/example.recipe", atomically: true, encoding: .utf8)
        let exampleViolations = try await schemaFileViolations("\(directory)/example.recipe", schema: schema)
        #expect(exampleViolations == nil, "Docs/recipes.md's example: \(exampleViolations ?? "")")
        let valid = "name: x\nvolumes:\n  - device: /dev/vg/x\n    snapshot: 8M\nsteps:\n  - name: s\n    run: [/bin/true]\n"
        for (name, text, expected) in [
            ("typo", valid.replacingOccurrences(of: "steps:", with: "stpes:"), "'stpes' was unexpected"),
            ("bare size", valid.replacingOccurrences(of: "snapshot: 8M", with: "snapshot: 8"), "snapshot"),
        ] {
            let path = "\(directory)/\(name.replacingOccurrences(of: " ", with: "-")).recipe"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let violations = try await schemaFileViolations(path, schema: schema)
            #expect(violations?.contains(expected) == true, "\(name): \(violations ?? "valid")")
            let checked = try await guardCommand(["check", "--syntax-only", path])
            #expect(checked.status == 2, "guard check refuses the \(name) too: \(checked.stderr)")
        }
    }

    @Test("documents guard prints without device-mapper are valid: config, check, history, show, errors")
    func hostDocuments() async throws {
        let state = try stateWithRuns()
        var documents: [([String], String)] = [
            (["config", "--json"], "config"),
            (["history", "--json"], "history"),
            (["history", "--json", "--limit", "0"], "history"),
            (["show", "1", "--json"], "run"),
            (["show", "00000001", "--json"], "run"),
        ]
        let recipes = try FileManager.default.contentsOfDirectory(atPath: "\(packageRoot)/Recipes").filter { $0.hasSuffix(".recipe") }
        #expect(!recipes.isEmpty)
        for recipe in recipes { documents.append((["check", "--syntax-only", "--json", "\(packageRoot)/Recipes/\(recipe)"], "plan")) }
        for (arguments, schema) in documents {
            let output = try await guardCommand(arguments + ["--state-dir", state])
            #expect(output.status == 0, "\(arguments): \(output.stderr)")
            let parsed = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any], "\(arguments)")
            #expect(parsed["schema_version"] as? Int == JSONContract.schemaVersion, "\(arguments)")
            let violations = try await schemaViolations(output.stdout, schema: schema)
            #expect(violations == nil, "\(arguments): \(violations ?? "")")
        }
        let plan = try #require(
            try JSONSerialization.jsonObject(
                with: Data(try await guardCommand(["check", "--syntax-only", "--json", "\(packageRoot)/Recipes/website-migration-good.recipe"]).stdout.utf8)) as? [String: Any])
        #expect(plan["valid"] as? Bool == true && plan["mode"] as? String == "syntax")
        #expect((plan["volumes"] as? [[String: Any]])?.first?["origin_path"] is NSNull, "a volume not resolved has null, not a missing key")
        let history = try #require(try JSONSerialization.jsonObject(with: Data(try await guardCommand(["history", "--json", "--state-dir", state]).stdout.utf8)) as? [String: Any])
        #expect((history["runs"] as? [[String: Any]])?.map { $0["keep_until"] is NSNull } == [true, true])
    }

    @Test("an invalid recipe: check --json gives its errors with line and column, exit 2, the message on stderr")
    func invalidRecipe() async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UInt32.random(in: 0...UInt32.max)).recipe").path
        try "name: x\nvolumes: 3\nstpes: []\n".write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let output = try await guardCommand(["check", "--syntax-only", "--json", file])
        #expect(output.status == 2)
        #expect(output.stderr.contains("\(file):3:1: unknown key 'stpes'"), "\(output.stderr)")
        #expect(try await schemaViolations(output.stdout, schema: "plan") == nil)
        let plan = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])
        #expect(plan["valid"] as? Bool == false)
        let errors = plan["errors"] as? [[String: Any]] ?? []
        #expect(errors.contains { $0["line"] as? Int == 3 && $0["column"] as? Int == 1 && $0["hint"] as? String == "did you mean 'steps'?" }, "\(errors)")
        #expect(plan["commands"] is NSNull && plan["on_success"] is NSNull)
    }

    @Test(
        "a --json command that fails prints the error document on stdout and the message on stderr",
        arguments: [
            (["show", "42", "--json"], 2, "refused"),
            (["rollback", "999", "--json"], 2, "refused"),
            (["status", "--watch", "--json"], 2, "refused"),
        ])
    func errorDocument(arguments: [String], code: Int32, kind: String) async throws {
        let output = try await guardCommand(arguments + ["--state-dir", try stateWithRuns()])
        #expect(output.status == code, "\(output.stderr)")
        #expect(!output.stderr.isEmpty)
        #expect(try await schemaViolations(output.stdout, schema: "error") == nil)
        let error = try #require((try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])?["error"] as? [String: Any])
        #expect(error["exit_code"] as? Int32 == code && error["kind"] as? String == kind)
        #expect(output.stderr.contains(error["message"] as? String ?? "-"), "the same message on both")
        let plain = try await guardCommand(Array(arguments.filter { $0 != "--json" }) + ["--state-dir", try stateWithRuns()])
        #expect(plain.stdout.isEmpty, "without --json, stdout stays empty on failure")
    }
}
