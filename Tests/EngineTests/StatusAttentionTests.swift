import Foundation
import Journal
import Testing

@testable import Engine

/// Issue 22: `guard status` exits non-zero when something needs a person, and names it.
@Suite("status: what needs attention")
struct StatusAttentionTests {
    func run(_ id: Int64, state: RunState = .kept) -> RunRecord {
        var run = RunRecord(token: "t\(id)", recipeName: "web", recipePath: "/r", recipeSHA256: "", recipeText: "", host: "h", user: "root", pid: 1, startedAt: 0)
        run.id = id
        run.state = state
        return run
    }

    func volume(_ status: String, used: UInt64? = nil, size: UInt64? = nil, detail: String? = nil) -> Maintenance.VolumeStatus {
        // The condition Maintenance.status gives with each of these words.
        let condition: Maintenance.Condition =
            status.hasPrefix("merge failed") ? .mergeFailed : Maintenance.Condition(rawValue: status.replacingOccurrences(of: " ", with: "_")) ?? .unknown
        return Maintenance.VolumeStatus(
            volume: "/dev/vg/web", origin: "vg-web", state: .live, status: status, condition: condition, usedBytes: used, sizeBytes: size, detail: detail)
    }

    @Test("a healthy kept run, a merge under way or complete, and reassembly (exit 4 of its own) need nobody")
    func quiet() {
        let runs = [
            Maintenance.RunStatus(run: run(1), volumes: [volume("live", used: 79 << 20, size: 100 << 20)]),
            Maintenance.RunStatus(run: run(2, state: .merging), volumes: [volume("merging"), volume("merged")]),
            Maintenance.RunStatus(run: run(3, state: .needsReassembly), volumes: [volume("needs reassembly", detail: "the COW directory does not exist")]),
        ]
        #expect(Maintenance.attention(runs, strays: []).isEmpty)
    }

    @Test("80% full, a blown fuse, a failed merge, a volume not rolled back, stale and unfinished runs, strays: one line each")
    func eachNamed() {
        var unfinished = Maintenance.RunStatus(run: run(5, state: .running), volumes: [volume("live", used: 1, size: 100)])
        unfinished.unfinished = true
        let runs = [
            Maintenance.RunStatus(run: run(1), volumes: [volume("live", used: 80 << 20, size: 100 << 20)]),
            Maintenance.RunStatus(run: run(2), volumes: [volume("fused", detail: "refuses writes")]),
            Maintenance.RunStatus(run: run(3, state: .merging), volumes: [volume("merge failed (Invalid)"), volume("not rolled back")]),
            Maintenance.RunStatus(run: run(4, state: .stale), volumes: []),
            unfinished,
        ]
        let lines = Maintenance.attention(runs, strays: ["GUARD-x-snap (GUARD-1-2-snap)"])
        #expect(lines.count == 7, "\(lines)")
        #expect(lines[0].hasPrefix("run 1, /dev/vg/web: COW 80% full (80 MiB of 100 MiB)") && lines[0].contains("guard commit 1"), "\(lines[0])")
        #expect(lines[1] == "run 2, /dev/vg/web: fused: refuses writes")
        #expect(lines[2] == "run 3, /dev/vg/web: merge failed (Invalid)")
        #expect(lines[3] == "run 3, /dev/vg/web: not rolled back")
        #expect(lines[4].hasPrefix("run 4's snapshot is stale") && lines[4].contains("guard commit 4"))
        #expect(lines[5].hasPrefix("run 5 did not finish") && lines[5].contains("guard recover"))
        #expect(lines[6].hasPrefix("stray guard device (no open run): GUARD-x-snap"))
    }

    @Test("a volume another guard command holds is busy (exit 75), with who holds it")
    func lockHeldIsBusy() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-locks-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = try VolumeLock.acquire(directory: directory, key: "vg-web", holder: "run 7 (pid 42)")
        defer { first.release() }
        let error = #expect(throws: GuardFailure.self) {
            try VolumeLock.acquire(directory: directory, key: "vg-web", holder: "run 8 (pid 43)")
        }
        #expect(error?.kind == .busy)
        #expect(error?.message.contains("run 7 (pid 42)") == true, "\(error?.message ?? "")")
    }
}
