import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// What a crash must leave once `guard recover` ran.
enum Expected: String, Sendable {
    /// Every byte of the volume as before the run.
    case restored
    /// Every byte as after the steps.
    case upgraded
}

/// One place to kill guard.
struct CrashCase: CustomTestStringConvertible, Sendable {
    /// A `GUARD_CRASH_AT` point, or `external:<marker>` for a kill -9 from outside when a marker appears.
    var point: String
    /// Whether the recipe succeeds (commit) or fails its verify (rollback).
    var succeeds: Bool
    var expected: Expected
    var note: String
    /// What `guard history` says after recovery.
    var outcome = "recovered"
    /// Whether the run is left `running` (other commands refuse to start); a run that died
    /// while its merge was finishing is `merging`, which any guard command completes itself.
    var unfinished = true
    var testDescription: String { point }
}

/// A raw 16 MiB guard volume (no filesystem: every byte is compared) and a recipe that writes
/// 3 MiB of new bytes into it, in a state directory of its own.
final class CrashFixture {
    let scratch: Scratch
    let guardTool: GuardTool
    let name: String
    let device: String
    let backing: String
    let before: String
    let after: String
    let patch: String

    /// - Parameter thin: a thin guard volume (its snapshots are thin devices of its pool).
    init(label: String = #function, thin: Bool = false) throws {
        scratch = try Scratch(label)
        guardTool = GuardTool(stateDirectory: scratch.path("state"))
        name = uniqueName("crash")
        device = "/dev/mapper/\(name)"
        backing = scratch.path("volume.img")
        // The volume is made in-process (the CLI's `volume create` is tested elsewhere): a guard
        // process costs a second or two under emulation, and this suite starts many.
        let volumes = GuardVolumes(dm: try DeviceMapper(), stateDirectory: guardTool.stateDirectory)
        let content = scratch.path("content.img")
        try makeRandomFile(content, mebibytes: 16)
        if thin {
            _ = try volumes.create(name: name, backing: backing, size: 16 << 20, thin: true, poolSize: 48 << 20)
            try sh("dd if='\(content)' of=\(device) bs=1M oflag=direct conv=fsync status=none")
        } else {
            try FileManager.default.moveItem(atPath: content, toPath: backing)
            _ = try volumes.create(name: name, backing: backing, size: nil)
        }
        let (name, device, backing) = (self.name, self.device, self.backing)
        scratch.defer_ {
            removeGuardStacks(onVolume: name)
            if thin {
                for snap in (try? DeviceMapper().guardDevices())?.filter({ $0.name.contains(name) }) ?? [] { _ = try? run(["dmsetup", "remove", snap.name]) }
            }
            try? volumes.remove(name: name)
            _ = device
            for loop in LoopDevice.find(backingFile: backing) { try? loop.detach() }
        }
        before = try sha256(device)
        patch = scratch.path("patch")
        try makeRandomFile(patch, mebibytes: 3)
        let copy = scratch.path("expected.img")
        try sh("dd if=\(device) of='\(copy)' bs=1M status=none && dd if='\(patch)' of='\(copy)' bs=1M seek=5 conv=notrunc status=none")
        after = try sha256(copy)
        try FileManager.default.removeItem(atPath: copy)
    }

    func recipe(succeeds: Bool, marker: String? = nil, sleep: Int = 0) throws -> String {
        let touch = marker.map { "touch \($0); " } ?? ""
        return try writeRecipe(
            """
            name: crash
            volumes:
              - device: \(device)
                snapshot: 8M
            steps:
              - name: write
                shell: \(touch)dd if=\(patch) of=\(device) bs=1M seek=5 oflag=direct conv=notrunc,fsync status=none\(sleep > 0 ? "; sleep \(sleep)" : "")
            verify:
              - name: check
                run: [\(succeeds ? "/bin/true" : "/bin/false")]
            on_success: commit
            on_failure: rollback
            """, in: scratch, name: "crash.recipe")
    }

    var current: String {
        get throws {
            try dropCaches(device)
            return try sha256(device)
        }
    }
}

/// Sends SIGKILL to the processes whose argv starts with `argv`; returns how many.
@discardableResult
func killProcesses(argv: [String], signal: Int32 = SIGKILL) -> Int {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    var count = 0
    for name in names {
        guard let pid = Int32(name), pid != getpid(), let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
        let arguments = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        if arguments.starts(with: argv) {
            kill(pid, signal)
            count += 1
        }
    }
    return count
}

/// Where the suite's results go, for Docs/recovery.md (Scripts/recovery-table).
func recordResult(_ fields: [String]) {
    let directory = ProcessInfo.processInfo.environment["GUARD_RESULTS_DIR"] ?? "/tmp"
    let line = fields.map { $0.replacingOccurrences(of: "\t", with: " ").replacingOccurrences(of: "\n", with: " ") }.joined(separator: "\t") + "\n"
    let path = "\(directory)/recovery-results.tsv"
    // O_APPEND: the suite's lanes append to the same file at once; each line is one write.
    let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return }
    _ = Array(line.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
}

extension Kernel {
    /// Issue 7: guard killed at every phase boundary and inside every kernel sequence, then `guard recover`.
    @Suite("crash safety")
    struct CrashKernelTests {
        static let cases: [CrashCase] = [
            CrashCase(point: "run.before-prepare", succeeds: true, expected: .restored, note: "journal says snapshot phase, nothing built"),
            CrashCase(point: "prepare.cow-file", succeeds: true, expected: .restored, note: "COW file written, no device yet"),
            CrashCase(point: "prepare.cow-live", succeeds: true, expected: .restored, note: "-cow live over the COW, no other layer"),
            CrashCase(point: "prepare.real-loaded", succeeds: true, expected: .restored, note: "-real loaded, not resumed"),
            CrashCase(point: "prepare.real-live", succeeds: true, expected: .restored, note: "-real live before the window, origin untouched"),
            CrashCase(point: "prepare.snap-loaded", succeeds: true, expected: .restored, note: "-snap loaded, not resumed"),
            CrashCase(point: "prepare.origin-loaded", succeeds: true, expected: .restored, note: "origin has the inactive snapshot-origin table"),
            CrashCase(point: "run.before-take", succeeds: true, expected: .restored, note: "all tables loaded, nothing suspended"),
            CrashCase(point: "window.suspended", succeeds: true, expected: .restored, note: "origin suspended: the watchdog resumes it"),
            CrashCase(point: "window.snap-resumed", succeeds: true, expected: .restored, note: "origin suspended, -real and -snap live"),
            CrashCase(point: "run.after-take", succeeds: true, expected: .restored, note: "snapshot live, not yet journaled"),
            CrashCase(point: "external:step", succeeds: true, expected: .restored, note: "kill -9 while a step runs"),
            CrashCase(point: "run.before-commit", succeeds: true, expected: .upgraded, note: "commit decided, nothing done"),
            CrashCase(point: "commit.origin-loaded", succeeds: true, expected: .upgraded, note: "origin has its own table inactive"),
            CrashCase(point: "commit.suspended", succeeds: true, expected: .upgraded, note: "origin and snapshot suspended"),
            CrashCase(point: "commit.origin-restored", succeeds: true, expected: .upgraded, note: "origin on its own table, layers left"),
            CrashCase(point: "commit.layers-removed", succeeds: true, expected: .upgraded, note: "layers removed, COW file left"),
            CrashCase(point: "run.after-commit", succeeds: true, expected: .upgraded, note: "committed and released, not yet journaled"),
            CrashCase(point: "rollback.before-merge", succeeds: false, expected: .restored, note: "rollback decided, volume unmounted, no merge"),
            CrashCase(point: "merge.label-merging", succeeds: false, expected: .restored, note: "COW label says merging"),
            CrashCase(point: "merge.origin-loaded", succeeds: false, expected: .restored, note: "origin has snapshot-merge inactive"),
            CrashCase(point: "merge.snap-loaded", succeeds: false, expected: .restored, note: "-snap has error inactive"),
            CrashCase(point: "merge.suspended", succeeds: false, expected: .restored, note: "origin and snapshot suspended for the handover"),
            CrashCase(point: "merge.handed-over", succeeds: false, expected: .restored, note: "merging, -snap not removed"),
            CrashCase(point: "rollback.after-merge-start", succeeds: false, expected: .restored, note: "merging, not journaled"),
            CrashCase(
                point: "finish.label-released", succeeds: false, expected: .restored, note: "merge complete, label says released, origin still on the merge",
                outcome: "rolled_back", unfinished: false),
            CrashCase(
                point: "finish.origin-loaded", succeeds: false, expected: .restored, note: "merge complete, label released, origin's own table loaded inactive",
                outcome: "rolled_back", unfinished: false),
            CrashCase(
                point: "finish.origin-restored", succeeds: false, expected: .restored, note: "origin on its own table, layers left", outcome: "rolled_back", unfinished: false),
            CrashCase(point: "finish.layers-removed", succeeds: false, expected: .restored, note: "layers gone, COW file left", outcome: "rolled_back", unfinished: false),
        ]

        /// Every crash point guard has (`CrashPoint`) has a scenario: one of the tables here, or
        /// a test of its own (`elsewhere`). A new point without one fails this test.
        static let elsewhere: [CrashPoint: String] = [
            .restartErrorTable: "FaultKernelTests.ioErrorMidMerge (origin): guard recover killed while it restarts a failed merge"
        ]

        @Test("every crash point has a kernel scenario")
        func everyCrashPointHasAScenario() {
            let covered = Set((Self.cases + Self.thinCases).map(\.point)).union(Self.elsewhere.keys.map(\.rawValue))
            let missing = CrashPoint.allCases.filter { !covered.contains($0.rawValue) }
            #expect(missing.isEmpty, "crash points without a kernel scenario: \(missing.map(\.rawValue))")
            let unknown = covered.filter { !$0.hasPrefix("external:") && CrashPoint(rawValue: $0) == nil }
            #expect(unknown.isEmpty, "scenarios for crash points guard does not have: \(unknown.sorted())")
        }

        /// Points that also check that other commands refuse to run, and that recovery is idempotent.
        static let thorough: Set<String> = ["prepare.origin-loaded", "window.suspended", "external:step", "commit.suspended", "merge.snap-loaded", "merge.handed-over"]

        @Test("kill -9 at a crash point, then guard recover: restored or upgraded, and said so", arguments: cases)
        func crash(_ crash: CrashCase) async throws {
            try await Self.crash(crash, fixture: try CrashFixture())
        }

        /// Issue 20: the thin backend's crash points (each pool message, each table swap, the registry).
        static let thinCases: [CrashCase] = [
            CrashCase(point: "run.before-take", succeeds: true, expected: .restored, note: "thin: nothing suspended, no pool message"),
            CrashCase(point: "window.suspended", succeeds: true, expected: .restored, note: "thin: volume suspended: the watchdog resumes it"),
            CrashCase(point: "window.thin-snapshot", succeeds: true, expected: .restored, note: "thin: create_snap sent, volume suspended"),
            CrashCase(point: "run.after-take", succeeds: true, expected: .restored, note: "thin: snapshot id exists, not yet journaled"),
            CrashCase(point: "external:step", succeeds: true, expected: .restored, note: "thin: kill -9 while a step runs"),
            CrashCase(point: "run.before-commit", succeeds: true, expected: .upgraded, note: "thin: commit decided, nothing done"),
            CrashCase(point: "thin.view-removed", succeeds: true, expected: .upgraded, note: "thin: snapshot view removed, id not deleted"),
            CrashCase(point: "thin.snapshot-deleted", succeeds: true, expected: .upgraded, note: "thin: snapshot id deleted, not journaled"),
            CrashCase(point: "rollback.before-merge", succeeds: false, expected: .restored, note: "thin: rollback decided, no swap"),
            CrashCase(point: "thin.registry-written", succeeds: false, expected: .restored, note: "thin: registry names the snapshot, volume on its old id"),
            CrashCase(point: "thin.origin-loaded", succeeds: false, expected: .restored, note: "thin: the snapshot's id loaded inactive"),
            CrashCase(point: "thin.swapped", succeeds: false, expected: .restored, note: "thin: volume on the snapshot's id, old id not deleted"),
            CrashCase(point: "rollback.after-merge-start", succeeds: false, expected: .restored, note: "thin: swapped, not journaled"),
            CrashCase(
                point: "thin.replaced-deleted", succeeds: false, expected: .restored, note: "thin: remounted, old id deleted, registry still names it", outcome: "rolled_back",
                unfinished: false),
        ]

        @Test("thin volumes: kill -9 at a crash point, then guard recover: restored or upgraded, the pool's ids and the registry agree", arguments: thinCases)
        func thinCrash(_ crash: CrashCase) async throws {
            let fixture = try CrashFixture(thin: true)
            try await Self.crash(crash, fixture: fixture, scenarioPrefix: "thin ")
            // The volume is exactly one id of its pool, the one its registry names: no
            // snapshot id left behind, none deleted that the volume needs.
            let ids = try thinPoolIDs(fixture.name)
            let registered = try registeredThinID(fixture.guardTool.stateDirectory, fixture.name)
            #expect(ids.count == 1 && ids.first == registered, "after \(crash.point): the pool has ids \(ids), the registry names \(String(describing: registered))")
            let table = try sh("dmsetup table \(fixture.name)").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(table.hasSuffix(" thin-pool") == false && table.hasSuffix(" \(registered ?? -1)"), "the volume is on its registered id: \(table)")
        }

        /// - Parameter scenarioPrefix: before the point's name in Docs/recovery.md's table (the
        ///   thin backend's points share names with the classic stack's).
        static func crash(_ crash: CrashCase, fixture: CrashFixture, scenarioPrefix: String = "") async throws {
            let tool = fixture.guardTool
            let result: CommandResult
            if crash.point.hasPrefix("external:") {
                let marker = fixture.scratch.path("marker")
                let recipe = try fixture.recipe(succeeds: crash.succeeds, marker: marker, sleep: 600)
                let runner = Task.detached { try tool("run", recipe) }
                // Waits for the step itself; the bound only stops a hung test.
                try await waitUntil("the step to start", seconds: 600) { FileManager.default.fileExists(atPath: marker) }
                try await Task.sleep(for: .milliseconds(500))
                #expect(killProcesses(argv: [guardBinary, "run", recipe]) == 1, "one guard run to kill")
                result = try await runner.value
            } else {
                result = try tool("run", try fixture.recipe(succeeds: crash.succeeds), extra: ["GUARD_CRASH_AT": crash.point])
            }
            #expect(result.status == 9 || result.status == 137, "guard was killed at \(crash.point): exit \(result.status), \(result.stderr)")

            // The watchdog (or nothing being suspended) leaves no device frozen.
            let dm = try DeviceMapper()
            let frozenDevices = {
                try dm.list().filter { device in
                    // This test's devices only: tests beside it have their own windows.
                    guard device.name.contains(fixture.name) else { return false }
                    return try dm.info(.number(device.number))?.isSuspended ?? false
                }
            }
            // The watchdog resumes them when it sees guard gone: wait for that, not for a time.
            try await waitUntil("the watchdog to resume what guard left suspended") { try frozenDevices().isEmpty }
            let frozen = try frozenDevices()
            #expect(frozen.isEmpty, "still suspended after guard died: \(frozen.map(\.name))")

            // Every other command notices the unfinished run (a finishing merge it completes
            // itself). The check is the same for every point, so a few points run it.
            let thorough = Self.thorough.contains(crash.point) || !crash.unfinished
            if thorough {
                let status = try tool("status")
                if crash.unfinished {
                    // 3, or 4 where the dead run's snapshot is not live (a merge it was handing over).
                    #expect([3, 4].contains(status.status), "a run that did not finish needs attention: \(status.stderr)")
                    #expect(status.stderr.contains("did not finish"), "\(status.stderr)")
                    let refused = try tool("run", try fixture.recipe(succeeds: true))
                    #expect(refused.status == 2 && refused.stderr.contains("guard recover"), "\(refused.stderr)")
                } else {
                    // `guard status` only says so; `--tidy` (the maintenance job) tears it down.
                    #expect(!status.stderr.contains("torn down"), "\(status.stderr)")
                    let tidy = try tool("status", "--tidy")
                    #expect(tidy.status == 0, "\(tidy.stderr)")
                    #expect(tidy.stderr.contains("merge is complete and torn down"), "\(tidy.stderr)")
                }
            }

            let started = Date()
            let recover = try tool("recover")
            #expect(recover.status == 0, "guard recover after \(crash.point): \(recover.stderr)")
            let bytes = try fixture.current
            switch crash.expected {
            case .restored: #expect(bytes == fixture.before, "after \(crash.point) the volume must be as before the run")
            case .upgraded: #expect(bytes == fixture.after, "after \(crash.point) the volume must hold the upgrade")
            }
            let history = try #require(try tool.history())
            let outcome = history.first?["outcome"] as? String
            #expect(outcome == crash.outcome, "the journal says \(crash.outcome): \(history.first ?? [:])")
            let error = history.first?["error"] as? String ?? ""
            if crash.unfinished {
                #expect(error.contains("recovered:"), "the journal says what recovery did: \(error)")
            }
            try expectNothingLeft(state: tool.stateDirectory)

            // A second recover changes nothing.
            if thorough {
                // This test's devices: its volume and the layers named after it.
                let before = try deviceMapperState(fixture.name)
                let again = try tool("recover")
                #expect(again.status == 0 && again.stdout.contains("nothing to recover"), "\(again.stdout) \(again.stderr)")
                #expect(try deviceMapperState(fixture.name) == before)
                #expect(try fixture.current == bytes)
            }
            let did =
                crash.unfinished
                ? String(error.split(separator: ";").last ?? "").trimmingWhitespace().replacingOccurrences(of: "recovered: ", with: "")
                : "the next guard command (here `guard status --tidy`) finished the merge's teardown"
            recordResult([
                scenarioPrefix + crash.point, crash.note, crash.succeeds ? "commit" : "rollback", crash.expected.rawValue, outcome ?? "?", did,
                String(format: "%.1f", Date().timeIntervalSince(started)),
            ])
        }
    }
}
