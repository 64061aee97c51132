import Foundation
import Quantities
import Recipe
import Testing

/// A minimal valid recipe; cases below change one part of it.
let validRecipe = """
    name: website-schema-v2
    volumes:
      - device: /dev/mapper/datadisks-website
        mount: /mnt/website
        snapshot: { size: 25M, extend: { at: 80%, by: 25M, max: 200M } }
    quiesce: [systemctl, stop, website]
    resume:  [systemctl, start, website]
    steps:
      - name: add id column
        shell: nl -n rz -w 5 /mnt/website/database > /tmp/x
        timeout: 10m
    verify:
      - name: every row has an id
        shell: "! grep -v '^id:' /mnt/website/database"
    on_success: keep 24h
    on_failure: rollback

    """

func parse(_ text: String) -> Result<Recipe, RecipeErrors> {
    RecipeParser.parse(text: text, path: "test.recipe")
}

func errors(_ text: String) -> [RecipeError] {
    switch parse(text) {
    case .success: return []
    case .failure(let failure): return failure.errors
    }
}

@Suite("recipes")
struct RecipeTests {
    @Test("the design's sketch parses into typed values")
    func sketchParses() throws {
        let recipe = try parse(validRecipe).get()
        #expect(recipe.name == "website-schema-v2")
        #expect(recipe.volumes.count == 1)
        let volume = recipe.volumes[0]
        #expect(volume.device == "/dev/mapper/datadisks-website")
        #expect(volume.mount == "/mnt/website")
        #expect(volume.size == .bytes(25 << 20))
        #expect(volume.extend == ExtendSpec(at: 0.8, by: .bytes(25 << 20), max: .bytes(200 << 20)))
        #expect(volume.location.line == 3)
        #expect(recipe.quiesce.map(\.invocation) == [.argv(["systemctl", "stop", "website"])])
        #expect(recipe.resume.map(\.invocation) == [.argv(["systemctl", "start", "website"])])
        #expect(recipe.steps.count == 1)
        #expect(recipe.steps[0].name == "add id column")
        #expect(recipe.steps[0].invocation == .shell("nl -n rz -w 5 /mnt/website/database > /tmp/x"))
        #expect(recipe.steps[0].timeout == .seconds(600))
        #expect(recipe.steps[0].location.line == 9)
        #expect(recipe.verify[0].invocation == .strictShell("! grep -v '^id:' /mnt/website/database"), "a check's script runs with errexit")
        #expect(recipe.verify[0].invocation.arguments == ["/bin/sh", "-c", Invocation.strictPrologue + "! grep -v '^id:' /mnt/website/database"])
        #expect(recipe.onSuccess == .keep(.seconds(86400)))
        #expect(recipe.onFailure == .rollback)
        #expect(recipe.sha256 == SHA256.hex(validRecipe))
        #expect(recipe.stopAtFill == 0.9)
    }

    @Test(
        "snapshot sizes in every form",
        arguments: [
            ("snapshot: 20%", SizeSpec.percent(20)),
            ("snapshot: auto", SizeSpec.auto),
            ("snapshot: { size: 1.5G }", SizeSpec.bytes(1_610_612_736)),
            ("snapshot: { size: 100MB }", SizeSpec.bytes(100_000_000)),
            ("snapshot: { size: 4096B }", SizeSpec.bytes(4096)),
        ])
    func sizes(snapshot: String, expected: SizeSpec) throws {
        let text = validRecipe.replacingOccurrences(of: "snapshot: { size: 25M, extend: { at: 80%, by: 25M, max: 200M } }", with: snapshot)
        let recipe = try parse(text).get()
        #expect(recipe.volumes[0].size == expected)
    }

    @Test("optional fields: cow, chunk, env, cwd, user, run as a list or a line, hooks, defaults")
    func optionalFields() throws {
        let text = """
            name: full
            description: everything
            env: { A: "1", B: two }
            timeout: 1h30m
            cow: /var/lib/guard-cow
            chunk: 16K
            stop_at: 85%
            volumes:
              - device: vg0/website
                snapshot: { size: 10%, chunk: 64K }
              - device: /srv/data
                snapshot: { size: 1G, cow: /dev/sdc }
            quiesce:
              - [systemctl, stop, a]
              - run: systemctl stop b
                timeout: 2m
            steps:
              - name: one
                run: [/usr/bin/migrate, --to, "042"]
                env: { PGDATABASE: billing }
                cwd: /var/lib/postgresql
                user: postgres
              - name: two
                run: systemctl restart web
            on_success: commit
            on_failure: keep
            rollback:
              stop: systemctl stop web
              start: [systemctl, start, web]
            """
        let recipe = try parse(text).get()
        #expect(recipe.description == "everything")
        #expect(recipe.environment == ["A": "1", "B": "two"])
        #expect(recipe.defaultTimeout == .seconds(5400))
        #expect(recipe.stopAtFill == 0.85)
        #expect(recipe.volumes[0].cow == .directory("/var/lib/guard-cow"))
        #expect(recipe.volumes[0].chunkBytes == 64 << 10)
        #expect(recipe.volumes[0].size == .percent(10))
        #expect(recipe.volumes[1].cow == .device("/dev/sdc"))
        #expect(recipe.volumes[1].chunkBytes == 16 << 10)
        #expect(recipe.quiesce.count == 2)
        #expect(recipe.quiesce[1].invocation == .argv(["systemctl", "stop", "b"]))
        #expect(recipe.quiesce[1].timeout == .seconds(120))
        #expect(recipe.steps[0].invocation == .argv(["/usr/bin/migrate", "--to", "042"]))
        #expect(recipe.steps[0].environment == ["PGDATABASE": "billing"])
        #expect(recipe.steps[0].workingDirectory == "/var/lib/postgresql")
        #expect(recipe.steps[0].user == "postgres")
        #expect(recipe.steps[1].invocation == .argv(["systemctl", "restart", "web"]))
        #expect(recipe.onSuccess == .commit)
        #expect(recipe.onFailure == .keep)
        #expect(recipe.rollbackStop.map(\.invocation) == [.argv(["systemctl", "stop", "web"])])
        #expect(recipe.rollbackStart.map(\.invocation) == [.argv(["systemctl", "start", "web"])])
    }

    /// One bad part of a recipe: what replaces what, the line the error must name, and words of its message.
    struct BadCase: CustomTestStringConvertible, Sendable {
        var label: String
        var find: String
        var replace: String
        var line: Int
        var message: [String]
        var testDescription: String { label }
    }

    static let badCases: [BadCase] = [
        BadCase(label: "missing name", find: "name: website-schema-v2\n", replace: "", line: 1, message: ["missing 'name'"]),
        BadCase(
            label: "missing steps", find: "steps:\n  - name: add id column\n    shell: nl -n rz -w 5 /mnt/website/database > /tmp/x\n    timeout: 10m\n", replace: "", line: 1,
            message: ["missing 'steps'"]),
        BadCase(
            label: "empty steps", find: "steps:\n  - name: add id column\n    shell: nl -n rz -w 5 /mnt/website/database > /tmp/x\n    timeout: 10m\n", replace: "steps: []\n",
            line: 8, message: ["steps is empty"]),
        BadCase(
            label: "wrong type for volumes",
            find: "volumes:\n  - device: /dev/mapper/datadisks-website\n    mount: /mnt/website\n    snapshot: { size: 25M, extend: { at: 80%, by: 25M, max: 200M } }\n",
            replace: "volumes: /dev/mapper/x\n", line: 2, message: ["volumes must be a list"]),
        BadCase(
            label: "wrong type for steps", find: "steps:\n  - name: add id column\n    shell: nl -n rz -w 5 /mnt/website/database > /tmp/x\n    timeout: 10m\n",
            replace: "steps: add id column\n", line: 8, message: ["steps must be a list"]),
        BadCase(label: "unknown key with a suggestion", find: "verify:", replace: "verfiy:", line: 12, message: ["unknown key 'verfiy'", "did you mean 'verify'"]),
        BadCase(label: "swapped letters", find: "steps:", replace: "stpes:", line: 8, message: ["unknown key 'stpes'", "did you mean 'steps'"]),
        BadCase(
            label: "unknown volume key", find: "    mount: /mnt/website", replace: "    mont: /mnt/website", line: 4,
            message: ["unknown key 'mont' in volumes[1]", "did you mean 'mount'"]),
        BadCase(label: "size without a unit", find: "size: 25M,", replace: "size: 25,", line: 5, message: ["has no unit", "did you mean 25M"]),
        BadCase(label: "bad size unit", find: "size: 25M,", replace: "size: 25X,", line: 5, message: ["unknown size unit 'x'"]),
        BadCase(label: "bad percentage", find: "size: 25M,", replace: "size: 150%,", line: 5, message: ["not a percentage"]),
        BadCase(label: "bad duration", find: "timeout: 10m", replace: "timeout: 10", line: 11, message: ["has no unit", "10s or 10min"]),
        BadCase(label: "bad duration unit", find: "timeout: 10m", replace: "timeout: 10q", line: 11, message: ["unknown duration unit 'q'"]),
        BadCase(label: "bad keep duration", find: "on_success: keep 24h", replace: "on_success: keep 24", line: 15, message: ["on_success", "has no unit"]),
        BadCase(label: "bad on_success", find: "on_success: keep 24h", replace: "on_success: comit", line: 15, message: ["on_success must be", "did you mean 'commit'"]),
        BadCase(label: "bad on_failure", find: "on_failure: rollback", replace: "on_failure: rolback", line: 16, message: ["on_failure must be", "did you mean 'rollback'"]),
        BadCase(label: "run and shell together", find: "    timeout: 10m", replace: "    run: [ls]\n    timeout: 10m", line: 10, message: ["both 'run' and 'shell'"]),
        BadCase(label: "neither run nor shell", find: "    shell: nl -n rz -w 5 /mnt/website/database > /tmp/x\n", replace: "", line: 9, message: ["needs 'run'"]),
        BadCase(
            label: "shell syntax in run", find: "shell: nl -n rz -w 5 /mnt/website/database > /tmp/x", replace: "run: nl /mnt/website/database > /tmp/x", line: 10,
            message: ["uses shell syntax", "shell:"]),
        BadCase(label: "step without a name", find: "  - name: add id column\n", replace: "  - cwd: /tmp\n", line: 9, message: ["missing 'name'"]),
        BadCase(label: "relative cwd", find: "    timeout: 10m", replace: "    cwd: srv\n    timeout: 10m", line: 11, message: ["cwd must be an absolute path"]),
        BadCase(label: "bad env name", find: "    timeout: 10m", replace: "    env: { 1BAD: x }\n    timeout: 10m", line: 11, message: ["not a valid variable name"]),
        BadCase(label: "duplicate volume", find: "quiesce:", replace: "  - device: /dev/mapper/datadisks-website\n    snapshot: 10M\nquiesce:", line: 6, message: ["listed twice"]),
        BadCase(
            label: "COW on a protected volume", find: "size: 25M, extend", replace: "size: 25M, cow: /mnt/website/cow, extend", line: 3,
            message: ["COW location /mnt/website/cow is on the protected volume"]),
        BadCase(label: "extend with a COW device", find: "size: 25M, extend", replace: "size: 25M, cow: /dev/sdz, extend", line: 5, message: ["a COW device cannot grow"]),
        BadCase(label: "missing snapshot", find: "    snapshot: { size: 25M, extend: { at: 80%, by: 25M, max: 200M } }\n", replace: "", line: 3, message: ["missing 'snapshot'"]),
        BadCase(label: "chunk not a power of two", find: "size: 25M,", replace: "size: 25M, chunk: 12K,", line: 5, message: ["power of two"]),
        BadCase(label: "duplicate key", find: "on_failure: rollback", replace: "on_failure: rollback\non_failure: keep", line: 16, message: ["duplicate key 'on_failure'"]),
        BadCase(label: "YAML syntax", find: "quiesce: [systemctl, stop, website]", replace: "quiesce: [systemctl, stop, website", line: 7, message: ["YAML syntax error"]),
        BadCase(label: "duplicate step name", find: "verify:", replace: "  - name: add id column\n    run: ls\nverify:", line: 12, message: ["repeats the name 'add id column'"]),
        BadCase(
            label: "retries on a step", find: "    timeout: 10m", replace: "    retries: 3\n    timeout: 10m", line: 11,
            message: ["'retries' in steps[1]: only verify checks have it"]),
        BadCase(
            label: "http on a step", find: "    shell: nl -n rz -w 5 /mnt/website/database > /tmp/x\n", replace: "    http: http://127.0.0.1/\n", line: 10,
            message: ["'http' in steps[1]: only verify checks have it"]),
        BadCase(
            label: "retries not a number", find: "  - name: every row has an id\n", replace: "  - name: every row has an id\n    retries: many\n", line: 14,
            message: ["verify[1].retries must be a whole number"]),
        BadCase(
            label: "interval without retries", find: "  - name: every row has an id\n", replace: "  - name: every row has an id\n    interval: 5s\n", line: 14,
            message: ["has an interval but no retries"]),
        BadCase(
            label: "bad interval", find: "  - name: every row has an id\n", replace: "  - name: every row has an id\n    retries: 2\n    interval: 5\n", line: 15,
            message: ["verify[1].interval", "has no unit"]),
        BadCase(
            label: "http and shell together", find: "  - name: every row has an id\n", replace: "  - name: every row has an id\n    http: http://127.0.0.1/\n", line: 14,
            message: ["both 'shell' and 'http'"]),
        BadCase(
            label: "https URL", find: "    shell: \"! grep -v '^id:' /mnt/website/database\"", replace: "    http: https://example.org/health", line: 14,
            message: ["plain HTTP, not HTTPS", "curl"]),
        BadCase(
            label: "not a URL", find: "    shell: \"! grep -v '^id:' /mnt/website/database\"", replace: "    http: localhost:8080/health", line: 14,
            message: ["is not an http:// URL"]),
        BadCase(
            label: "bad HTTP status", find: "    shell: \"! grep -v '^id:' /mnt/website/database\"", replace: "    http: { url: http://127.0.0.1/, status: 2000 }", line: 14,
            message: ["status must be an HTTP status"]),
        BadCase(
            label: "unknown http key", find: "    shell: \"! grep -v '^id:' /mnt/website/database\"", replace: "    http: { url: http://127.0.0.1/, contain: ok }", line: 14,
            message: ["unknown key 'contain'", "did you mean 'contains'"]),
        BadCase(
            label: "two timeouts", find: "    shell: \"! grep -v '^id:' /mnt/website/database\"", replace: "    http: { url: http://127.0.0.1/, timeout: 5s }\n    timeout: 3s",
            line: 15, message: ["timeout twice"]),
        BadCase(
            label: "device that is no path", find: "device: /dev/mapper/datadisks-website", replace: "device: website", line: 3,
            message: ["not a device path, VG/LV name or mount point"]),
    ]

    @Test("verify checks: http in both forms, retries and interval")
    func verifyChecks() throws {
        let text = validRecipe.replacingOccurrences(
            of: "    shell: \"! grep -v '^id:' /mnt/website/database\"\n",
            with: """
                    shell: "! grep -v '^id:' /mnt/website/database"
                    retries: 3
                  - name: health
                    http: http://127.0.0.1:8080/health?full=1
                  - name: ready
                    http: { url: "http://[::1]/ready", status: 204, contains: ok, timeout: 5s }
                    retries: 10
                    interval: 500ms

                """)
        let recipe = try parse(text).get()
        #expect(recipe.verify.count == 3)
        #expect(recipe.verify[0].retries == 3 && recipe.verify[0].interval == Command.defaultInterval)
        #expect(recipe.verify[1].invocation == .http(HTTPCheck(url: "http://127.0.0.1:8080/health?full=1")))
        #expect(recipe.verify[1].retries == 0)
        #expect(recipe.verify[2].invocation == .http(HTTPCheck(url: "http://[::1]/ready", status: 204, contains: "ok")))
        #expect(recipe.verify[2].timeout == .seconds(5) && recipe.verify[2].retries == 10 && recipe.verify[2].interval == .milliseconds(500))
        #expect(recipe.verify[2].invocation.arguments == ["http", "GET", "http://[::1]/ready", "status", "204", "contains", "ok"])
        let parts = try HTTPCheck.parse("http://[::1]/ready").get()
        #expect(parts.host == "::1" && parts.port == 80 && parts.target == "/ready")
        let query = try HTTPCheck.parse("http://web.local:8080?x=1").get()
        #expect(query.host == "web.local" && query.port == 8080 && query.target == "/?x=1")
    }

    @Test("each bad input gives its error, naming the line", arguments: badCases)
    func badInput(_ bad: BadCase) throws {
        #expect(validRecipe.contains(bad.find), "the case's text must be in the valid recipe")
        let found = errors(validRecipe.replacingOccurrences(of: bad.find, with: bad.replace))
        let first = try #require(found.first, "\(bad.label) must be an error")
        let matching = found.first { error in bad.message.allSatisfy { error.description.contains($0) } }
        #expect(matching != nil, "\(bad.label): got \(found.map(\.description))")
        if let matching {
            #expect(matching.location.line == bad.line, "\(bad.label): \(matching)")
            #expect(matching.description.hasPrefix("test.recipe:\(bad.line):"), "\(matching)")
        }
        _ = first
    }

    @Test("all errors of a file are reported at once")
    func allErrorsAtOnce() {
        let text =
            validRecipe
            .replacingOccurrences(of: "steps:", with: "stpes:")
            .replacingOccurrences(of: "size: 25M,", with: "size: 25,")
            .replacingOccurrences(of: "on_failure: rollback", with: "on_failure: maybe")
        let found = errors(text)
        #expect(found.count >= 4, "\(found.map(\.description))")
        #expect(found.contains { $0.description.contains("stpes") })
        #expect(found.contains { $0.description.contains("no unit") })
        #expect(found.contains { $0.description.contains("on_failure") })
        #expect(found.contains { $0.description.contains("missing 'steps'") })
        #expect(found.map(\.location.line) == found.map(\.location.line).sorted(), "sorted by line")
    }

    @Test("the example recipes are valid", arguments: ["website-migration-bad", "website-migration-good", "nginx-apt-upgrade", "postgres-schema-migration", "system-apt-upgrade"])
    func examples(name: String) throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Recipes/\(name).recipe").path
        switch RecipeParser.load(path: path) {
        case .success(let recipe): #expect(!recipe.steps.isEmpty)
        case .failure(let failure): Issue.record("\(failure)")
        }
    }

    @Test("a missing file is one clear error")
    func missingFile() {
        guard case .failure(let failure) = RecipeParser.load(path: "/nonexistent/x.recipe") else {
            Issue.record("must fail")
            return
        }
        #expect(failure.description == "/nonexistent/x.recipe:1:1: the recipe does not exist")
    }

    @Test("a few thousand mutated recipes each give an error or a recipe, never a crash")
    func fuzz() {
        var generator = SeededGenerator(seed: 42)
        let alphabet = Array("abc:{}[],-#'\"%\n  \t0123456789MGK&|!*&@?>|")
        let base = Array(validRecipe)
        var parsed = 0
        var rejected = 0
        for round in 0..<3000 {
            var text = base
            for _ in 0..<(1 + round % 6) {
                let position = Int.random(in: 0..<text.count, using: &generator)
                switch Int.random(in: 0..<4, using: &generator) {
                case 0: text.remove(at: position)
                case 1: text.insert(alphabet.randomElement(using: &generator)!, at: position)
                case 2: text[position] = alphabet.randomElement(using: &generator)!
                default:
                    let end = min(text.count, position + Int.random(in: 1...40, using: &generator))
                    let slice = text[position..<end]
                    text.insert(contentsOf: slice, at: min(text.count, end + Int.random(in: 0...20, using: &generator)))
                }
                if text.isEmpty { text = ["x"] }
            }
            switch parse(String(text)) {
            case .success(let recipe):
                parsed += 1
                #expect(!recipe.steps.isEmpty && !recipe.volumes.isEmpty)
            case .failure(let failure):
                rejected += 1
                #expect(!failure.errors.isEmpty)
                #expect(failure.errors.allSatisfy { $0.location.line >= 1 && $0.description.hasPrefix("test.recipe:") })
            }
        }
        #expect(parsed + rejected == 3000)
        #expect(rejected > 1000, "most mutations break the recipe")
    }

    @Test("durations in systemd's syntax: spaces, words, months and years; 'M' refused as ambiguous, with the fix")
    func systemdDurations() throws {
        #expect(try Units.parseDuration("1h 30min").get() == .seconds(5400))
        #expect(try Units.parseDuration("2weeks").get() == .seconds(2 * 604_800))
        #expect(try Units.parseDuration("1month").get() == .seconds(2_629_800))
        #expect(try Units.parseDuration("1y 12month").get() == .seconds(31_557_600 + 12 * 2_629_800))
        #expect(try Units.parseDuration("2 h").get() == .seconds(7200))
        #expect(try Units.parseDuration("48hr").get() == .seconds(172_800))
        #expect(try Units.parseDuration("55s500ms").get() == .milliseconds(55_500))
        #expect(try Units.parseDuration("10m").get() == .seconds(600), "a lower-case m is a minute, in systemd too")
        #expect(try Units.parseDuration("2H").get() == .seconds(7200), "other units in any case")
        for text in ["1M", "30M", "1h 5M"] {
            guard case .failure(let error) = Units.parseDuration(text) else {
                Issue.record("\(text) parsed")
                continue
            }
            #expect(error.message.contains("ambiguous") && error.message.contains(text), "\(error.message)")
            #expect(error.hint?.contains("min for minutes") == true && error.hint?.contains("month for months") == true, "\(error.hint ?? "")")
        }
        for text in ["1h 30", "5 parsecs", "h"] {
            guard case .failure = Units.parseDuration(text) else {
                Issue.record("\(text) parsed")
                continue
            }
        }
        // In a recipe, with the line and the fix.
        let keep = try parse(validRecipe.replacingOccurrences(of: "on_success: keep 24h", with: "on_success: keep 1d 12h")).get()
        #expect(keep.onSuccess == .keep(.seconds(129_600)))
        let refused = errors(validRecipe.replacingOccurrences(of: "timeout: 10m", with: "timeout: 10M"))
        #expect(refused.count == 1 && refused[0].description.hasPrefix("test.recipe:11:") && refused[0].description.contains("ambiguous"), "\(refused)")
        #expect(refused.first?.hint?.contains("10min") == true, "\(refused.first?.hint ?? "")")
    }

    @Test("sizes, durations and SHA-256")
    func units() throws {
        #expect(try Units.parseSize("25M").get() == 25 << 20)
        #expect(try Units.parseSize("2GiB").get() == 2 << 30)
        #expect(try Units.parseSize("512k").get() == 512 << 10)
        #expect(try Units.parseDuration("1h30m").get() == .seconds(5400))
        #expect(try Units.parseDuration("250ms").get() == .milliseconds(250))
        #expect(Units.formatDuration(.seconds(90061)) == "1d1h1m1s")
        #expect(formatBytes(25 << 20) == "25 MiB")
        #expect(SHA256.hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256.hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let long = String(repeating: "a", count: 1_000)
        #expect(SHA256.hex(long) == "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }
}

/// A deterministic generator, so a fuzz failure can be replayed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite("COW use plot")
struct SparklineTests {
    @Test("bars rise with the use, scaled to the size; empty slices carry the last value; nothing used is blank")
    func bars() {
        let mib: UInt64 = 1 << 20
        let samples: [(at: Double, used: UInt64)] = [(0, 0), (1, 3 * mib), (2, 6 * mib), (8, 24 * mib)]
        #expect(Sparkline.bars(samples, scale: 24 * mib, width: 8) == " ▁▂▂▂▂▂█")
        #expect(Sparkline.bars([(at: 5.0, used: 12 * mib)], scale: 24 * mib, width: 8) == "▄", "one sample: one column")
        #expect(Sparkline.bars(samples, scale: 0, width: 8) == "")
    }

    @Test("the plot has a caption with the scale and the peak, the bars, and a time axis as wide as the bars")
    func plot() {
        let mib: UInt64 = 1 << 20
        let lines = Sparkline.plot([(0, 0, 20 * mib), (6, 10 * mib, 20 * mib), (12.5, 15 * mib, 25 * mib)], width: 20)
        #expect(lines.count == 3)
        #expect(lines[0] == "    COW use over time, █ = 25 MiB (the snapshot's size at its largest; it grew from 20 MiB), peak 15 MiB (60%):")
        #expect(lines[1].count == 6 + 20 && lines[1].hasSuffix("▅"), "\(lines[1])")
        #expect(lines[2] == "      0s" + String(repeating: " ", count: 20 - 2 - 5) + "12.5s")
        #expect(Sparkline.plot([]).isEmpty)
    }
}

/// Issue 19: boot assessment's keys.
@Suite("recipes: verify_after_boot")
struct BootAssessmentRecipeTests {
    @Test("verify_after_boot and boot_attempts parse; the default is two boots")
    func parses() throws {
        let recipe = try parse(validRecipe + "verify_after_boot:\n  - name: the site answers\n    run: [curl, -sf, http://127.0.0.1/]\n    retries: 3\nboot_attempts: 3\n").get()
        #expect(recipe.verifyAfterBoot.map(\.name) == ["the site answers"])
        #expect(recipe.verifyAfterBoot.first?.retries == 3)
        #expect(recipe.bootAttempts == 3)
        let plain = try parse(validRecipe + "verify_after_boot: [[true]]\n").get()
        #expect(plain.bootAttempts == 2)
        #expect(try parse(validRecipe).get().verifyAfterBoot.isEmpty)
    }

    @Test("verify_after_boot with on_success: commit, boot_attempts out of range or alone: errors that name the line and say what to do")
    func refused() {
        let text = validRecipe.replacingOccurrences(of: "on_success: keep 24h", with: "on_success: commit") + "verify_after_boot: [[true]]\n"
        let commit = errors(text)
        #expect(commit.count == 1)
        #expect(commit.first.map { "\($0)" }?.contains("verify_after_boot needs on_success: keep") == true)
        let line = text.split(separator: "\n", omittingEmptySubsequences: false).firstIndex { $0.hasPrefix("verify_after_boot") }.map { $0 + 1 }
        #expect(commit.first?.location.line == line)
        let range = errors(validRecipe + "verify_after_boot: [[true]]\nboot_attempts: 0\n")
        #expect(range.map { "\($0)" }.contains { $0.contains("boot_attempts must be a whole number from 1 to 10, not '0'") })
        let alone = errors(validRecipe + "boot_attempts: 2\n")
        #expect(alone.map { "\($0)" }.contains { $0.contains("boot_attempts without verify_after_boot") })
    }
}

/// Issue 19: `guard apt -- ARGS` puts apt-get's steps into a recipe.
@Suite("recipes: guard apt")
struct AptRecipeTests {
    @Test("the recipe's steps (block or flow) are replaced by apt-get update and apt-get -y ARGS; the rest stays; arguments arrive as written")
    func compose() throws {
        let flow = validRecipe.replacingOccurrences(
            of: "steps:\n  - name: add id column\n    shell: nl -n rz -w 5 /mnt/website/database > /tmp/x\n    timeout: 10m\n", with: "steps: [[true]]\n")
        #expect(flow != validRecipe)
        for base in [validRecipe, flow] {
            let text = try AptRecipe.compose(base: base, arguments: ["install", "--only-upgrade", "nginx", "it's \"odd\"", "a: b"]).get()
            let recipe = try parse(text).get()
            #expect(
                recipe.steps.map(\.invocation.arguments) == [
                    ["apt-get", "update", "-q"], ["apt-get", "-y", "-q", "install", "--only-upgrade", "nginx", "it's \"odd\"", "a: b"],
                ])
            #expect(recipe.steps.allSatisfy { $0.environment["DEBIAN_FRONTEND"] == "noninteractive" })
            #expect(recipe.verify.map(\.name) == ["every row has an id"])
            #expect(recipe.volumes.count == 1)
            #expect(recipe.onSuccess == .keep(.seconds(24 * 3600)))
        }
    }

    @Test("no apt-get arguments: an error that says what to give")
    func noArguments() {
        guard case .failure(let failure) = AptRecipe.compose(base: validRecipe, arguments: []) else {
            Issue.record("must fail")
            return
        }
        #expect(failure.description.contains("guard apt -- full-upgrade"))
    }

    @Test("the shipped example recipe takes guard apt's steps")
    func example() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Recipes/system-apt-upgrade.recipe").path
        let text = try AptRecipe.compose(base: String(contentsOfFile: path, encoding: .utf8), arguments: ["full-upgrade"]).get()
        let recipe = try parse(text).get()
        #expect(recipe.steps.last?.invocation.arguments == ["apt-get", "-y", "-q", "full-upgrade"])
        #expect(recipe.verify.count == 2)
    }
}
