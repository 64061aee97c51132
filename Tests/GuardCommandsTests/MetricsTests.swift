import Foundation
import Journal
import Testing

@testable import Engine
@testable import GuardCommands

/// Issue 22: `guard metrics` in Prometheus's text format, every family with HELP and TYPE.
@Test("metrics: every family is declared, zeros included; labels are escaped; live snapshots and merges per volume")
func metricsText() {
    let metrics = sampleMetrics()
    let text = metrics.text()
    let lines = text.split(separator: "\n").map(String.init)
    let families = lines.filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
    #expect(
        families == [
            "guard_build_info", "guard_runs_started_total", "guard_runs_ended_total", "guard_runs_finished_total", "guard_open_runs", "guard_kept_runs",
            "guard_run_keep_until_timestamp_seconds", "guard_snapshot_cow_used_bytes", "guard_snapshot_cow_size_bytes",
            "guard_merges_in_progress", "guard_merge_remaining_bytes", "guard_attention", "guard_needs_reassembly",
            "guard_recipe_last_end_timestamp_seconds", "guard_recipe_last_duration_seconds", "guard_recipe_last_success_timestamp_seconds",
            "guard_last_run_start_timestamp_seconds", "guard_last_run_end_timestamp_seconds", "guard_last_run_exit_code",
        ])
    #expect(lines.filter { $0.hasPrefix("# HELP ") }.count == families.count)
    #expect(lines.filter { $0.hasPrefix("# TYPE ") && $0.hasSuffix(" counter") }.allSatisfy { $0.split(separator: " ")[2].hasSuffix("_total") }, "counters end in _total")
    #expect(lines.contains("guard_build_info{version=\"\(GuardCommand.version)\"} 1"))
    #expect(lines.contains("guard_runs_started_total 6"))
    #expect(lines.contains("guard_runs_ended_total{outcome=\"committed\"} 3") && lines.contains("guard_runs_ended_total{outcome=\"failed\"} 0"))
    #expect(lines.contains("guard_runs_finished_total{outcome=\"rolled_back\"} 1") && lines.contains("guard_runs_finished_total{outcome=\"recovered\"} 0"))
    #expect(lines.contains("guard_open_runs{state=\"merging\"} 0") && lines.contains("guard_kept_runs 1"))
    let labels = "{run=\"7\",recipe=\"web \\\"v2\\\"\",volume=\"/dev/vg/web\"}"
    #expect(lines.contains("guard_snapshot_cow_used_bytes\(labels) 4096"), "\(text)")
    #expect(lines.contains("guard_snapshot_cow_size_bytes\(labels) 1048576"))
    #expect(lines.contains("guard_run_keep_until_timestamp_seconds{run=\"7\",recipe=\"web \\\"v2\\\"\"} 1700086400.000"), "\(text)")
    #expect(lines.contains("guard_recipe_last_success_timestamp_seconds{recipe=\"web \\\"v2\\\"\"} 1700000060.000"), "\(text)")
    #expect(lines.contains("guard_recipe_last_duration_seconds{recipe=\"web \\\"v2\\\"\"} 59.500"), "\(text)")
    #expect(lines.contains("guard_last_run_start_timestamp_seconds{run=\"7\",recipe=\"web \\\"v2\\\"\"} 1700000000.500"))
    #expect(lines.contains("guard_last_run_exit_code{run=\"7\",recipe=\"web \\\"v2\\\"\"} 0"))
    #expect(text.hasSuffix("\n"))
}

/// Metrics of a kept run with one live snapshot, after five earlier runs.
func sampleMetrics() -> Metrics {
    var run = RunRecord(token: "t", recipeName: "web \"v2\"", recipePath: "/r", recipeSHA256: "", recipeText: "", host: "h", user: "root", pid: 1, startedAt: 1_700_000_000.5)
    run.id = 7
    run.state = .kept
    run.finishedAt = 1_700_000_060
    run.exitCode = 0
    run.keepUntil = 1_700_086_400
    var metrics = Metrics()
    metrics.tallies.started = 6
    metrics.tallies.ended = ["committed": 3, "rolled_back": 1, "kept": 1]
    metrics.tallies.finished = [.committed: 3, .rolledBack: 1]
    metrics.tallies.recipes = ["web \"v2\"": Journal.RecipeTally(lastEnd: 1_700_000_060, lastDuration: 59.5, lastSuccess: 1_700_000_060)]
    metrics.open = [.kept: 1]
    metrics.lastRun = run
    metrics.runs = [
        Maintenance.RunStatus(
            run: run,
            volumes: [
                Maintenance.VolumeStatus(volume: "/dev/vg/web", origin: "vg-web", state: .live, status: "live", condition: .live, usedBytes: 4096, sizeBytes: 1 << 20)
            ])
    ]
    return metrics
}

/// Debian's promtool (Scripts/setup puts it in /opt/guard-test/promtool), or a recorded failure.
func promtool() -> String? {
    let candidates = [ProcessInfo.processInfo.environment["GUARD_PROMTOOL"], "/opt/guard-test/promtool/promtool", "/usr/bin/promtool"].compactMap { $0 }
    guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        Issue.record("promtool is missing (\(candidates.joined(separator: ", "))): Scripts/setup extracts it from Debian's promtool (or, on Debian 12, prometheus) package")
        return nil
    }
    return found
}

@Test("promtool: guard's metrics pass Prometheus's linter; the shipped alert rules are valid and their unit tests pass")
func promtoolAcceptsMetricsAndRules() async throws {
    guard let promtool = promtool() else { return }
    let environment = ProcessInfo.processInfo.environment
    let lint = try await runProgram(promtool, ["check", "metrics"], environment: environment, input: sampleMetrics().text())
    #expect(lint.status == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty, "promtool check metrics: \(lint.stdout)\(lint.stderr)")
    let empty = try await runProgram(promtool, ["check", "metrics"], environment: environment, input: Metrics().text())
    #expect(empty.status == 0 && empty.stdout.isEmpty && empty.stderr.isEmpty, "a machine with no journal yet: \(empty.stdout)\(empty.stderr)")
    // The linter sees what it is given: a counter without _total is refused.
    let bad = try await runProgram(promtool, ["check", "metrics"], environment: environment, input: "# HELP x_count x\n# TYPE x_count counter\nx_count 1\n")
    #expect(bad.status != 0 && (bad.stdout + bad.stderr).contains("_total"), "\(bad.stdout)\(bad.stderr)")
    let monitoring = "\(packageRoot)/Monitoring"
    let rules = try await runProgram(promtool, ["check", "rules", "guard.rules.yml"], environment: environment, in: monitoring)
    #expect(rules.status == 0 && (rules.stdout + rules.stderr).contains("SUCCESS: 7 rules found"), "\(rules.stdout)\(rules.stderr)")
    let tests = try await runProgram(promtool, ["test", "rules", "guard.rules.test.yml"], environment: environment, in: monitoring)
    #expect(tests.status == 0 && (tests.stdout + tests.stderr).contains("SUCCESS"), "\(tests.stdout)\(tests.stderr)")
}

@Test("the alert rules and the Grafana dashboard use only metrics guard writes (and node_exporter's textfile mtime)")
func monitoringNamesExportedMetrics() throws {
    let exported = Set(sampleMetrics().text().split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { String($0.split(separator: " ")[2]) })
    let monitoring = "\(packageRoot)/Monitoring"
    let rules = try String(contentsOfFile: "\(monitoring)/guard.rules.yml", encoding: .utf8)
    let dashboardData = try Data(contentsOf: URL(fileURLWithPath: "\(monitoring)/guard-dashboard.json"))
    let dashboard = try #require(try JSONSerialization.jsonObject(with: dashboardData) as? [String: Any])
    let panels = try #require(dashboard["panels"] as? [[String: Any]])
    let expressions = panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
    #expect(expressions.count >= 8, "\(expressions)")
    let pattern = try Regex("guard_[a-z_]+")
    for (source, text) in [("guard.rules.yml", rules)] + expressions.map({ ("guard-dashboard.json", $0) }) {
        for match in text.matches(of: pattern) {
            let name = String(text[match.range])
            #expect(exported.contains(name), "\(source) names \(name), which guard does not write")
        }
    }
}

@Test("journald's catalog explains every event guard logs with a MESSAGE_ID")
func catalogCoversEvents() throws {
    let catalog = try String(contentsOfFile: "\(packageRoot)/Units/guard.catalog", encoding: .utf8)
    let ids = LogEvent.allCases.map(\.messageID)
    #expect(Set(ids).count == ids.count, "every id is its own")
    for id in ids {
        #expect(id.count == 32 && id.allSatisfy { $0.isHexDigit && !$0.isUppercase }, "\(id) is a 128-bit id")
        let entry = catalog.components(separatedBy: "-- \(id)\n").dropFirst().first ?? ""
        #expect(entry.hasPrefix("Subject: ") && entry.contains("Defined-By: guard"), "no catalog entry for \(id)")
    }
    #expect(catalog.components(separatedBy: "\n-- ").count - 1 == ids.count, "no entry without an event")
}

@Test("status --watch: a stray device is one line of the view, not repeated under needs attention; a full COW is")
func watchViewSaysEachThingOnce() {
    var run = RunRecord(token: "t", recipeName: "web", recipePath: "/r", recipeSHA256: "", recipeText: "", host: "h", user: "root", pid: 1, startedAt: 1_700_000_000)
    run.id = 3
    run.state = .kept
    let runs = [
        Maintenance.RunStatus(
            run: run,
            volumes: [
                Maintenance.VolumeStatus(volume: "/dev/vg/web", origin: "vg-web", state: .live, status: "live", condition: .live, usedBytes: 90 << 20, sizeBytes: 100 << 20)
            ])
    ]
    let view = GuardCommand.Status.watchView(runs, strays: ["GUARD-SNAP-x (vg-web-guard-x-snap)"], header: "guard status")
    let lines = view.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    #expect(lines.filter { $0.contains("GUARD-SNAP-x") }.count == 1, "\(view)")
    let attention = lines.drop { $0 != "needs attention:" }.dropFirst().filter { !$0.isEmpty }
    #expect(attention.count == 1 && attention.first?.contains("90%") == true, "the full COW is under needs attention, once: \(view)")
}
