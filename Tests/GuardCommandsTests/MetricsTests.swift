@testable import Engine
import Foundation
@testable import GuardCommands
import Journal
import Testing

/// Issue 22: `guard metrics` in Prometheus's text format, every family with HELP and TYPE.
@Test("metrics: every family is declared, zeros included; labels are escaped; live snapshots and merges per volume")
func metricsText() {
    var run = RunRecord(token: "t", recipeName: "web \"v2\"", recipePath: "/r", recipeSHA256: "", recipeText: "", host: "h", user: "root", pid: 1, startedAt: 1_700_000_000.5)
    run.id = 7
    run.state = .kept
    run.finishedAt = 1_700_000_060
    run.exitCode = 0
    var metrics = Metrics()
    metrics.outcomes = [.committed: 3, .rolledBack: 1, .kept: 1]
    metrics.open = [.kept: 1]
    metrics.lastRun = run
    metrics.runs = [Maintenance.RunStatus(run: run, volumes: [
        Maintenance.VolumeStatus(volume: "/dev/vg/web", origin: "vg-web", state: .live, status: "live", usedBytes: 4096, sizeBytes: 1 << 20),
    ])]
    let text = metrics.text()
    let lines = text.split(separator: "\n").map(String.init)
    let families = lines.filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
    #expect(families == ["guard_runs_total", "guard_open_runs", "guard_kept_runs", "guard_snapshot_cow_used_bytes", "guard_snapshot_cow_size_bytes",
                         "guard_merges_in_progress", "guard_merge_remaining_bytes", "guard_attention", "guard_needs_reassembly",
                         "guard_last_run_start_timestamp_seconds", "guard_last_run_end_timestamp_seconds", "guard_last_run_exit_code"])
    #expect(lines.filter { $0.hasPrefix("# HELP ") }.count == families.count)
    #expect(lines.contains("guard_runs_total{outcome=\"committed\"} 3") && lines.contains("guard_runs_total{outcome=\"failed\"} 0"))
    #expect(lines.contains("guard_open_runs{state=\"merging\"} 0") && lines.contains("guard_kept_runs 1"))
    let labels = "{run=\"7\",recipe=\"web \\\"v2\\\"\",volume=\"/dev/vg/web\"}"
    #expect(lines.contains("guard_snapshot_cow_used_bytes\(labels) 4096"), "\(text)")
    #expect(lines.contains("guard_snapshot_cow_size_bytes\(labels) 1048576"))
    #expect(lines.contains("guard_last_run_start_timestamp_seconds{run=\"7\",recipe=\"web \\\"v2\\\"\"} 1700000000.500"))
    #expect(lines.contains("guard_last_run_exit_code{run=\"7\",recipe=\"web \\\"v2\\\"\"} 0"))
    #expect(text.hasSuffix("\n"))
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
    let runs = [Maintenance.RunStatus(run: run, volumes: [
        Maintenance.VolumeStatus(volume: "/dev/vg/web", origin: "vg-web", state: .live, status: "live", usedBytes: 90 << 20, sizeBytes: 100 << 20),
    ])]
    let view = GuardCommand.Status.watchView(runs, strays: ["GUARD-SNAP-x (vg-web-guard-x-snap)"], header: "guard status")
    let lines = view.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    #expect(lines.filter { $0.contains("GUARD-SNAP-x") }.count == 1, "\(view)")
    let attention = lines.drop { $0 != "needs attention:" }.dropFirst().filter { !$0.isEmpty }
    #expect(attention.count == 1 && attention.first?.contains("90%") == true, "the full COW is under needs attention, once: \(view)")
}
