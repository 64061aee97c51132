import DeviceMapper
import Journal
import Testing

@testable import Engine
@testable import GuardCommands
@testable import Snapshot

/// Issue 14: the layers' typed errors become exit codes in one place, and 2 ("nothing was
/// touched") is never given to an error that may come after a change.
@Test("each layer's error gets the exit code its meaning calls for")
func exitStatusOfLayerErrors() {
    func code(_ error: any Error) -> ExitCode? { ExitStatus.of(error)?.code }
    #expect(code(GuardFailure(.needsReassembly, "x")) == .needsReassembly)
    #expect(code(GuardFailure(.refused, "x")) == .usage)
    #expect(code(GuardFailure(.attention, "x")) == .attention)
    #expect(code(GuardFailure(.busy, "x"))?.rawValue == 75, "busy: EX_TEMPFAIL, try again later")
    #expect(code(SnapshotError(.needsReassembly, "commit of vg-lv", "its COW holds old blocks")) == .needsReassembly)
    #expect(code(SnapshotError(.cowOnOrigin, "snapshot of vg-lv", "the COW would live on the volume")) == .usage)
    for after in [SnapshotError.Code.inUse, .mergeInProgress, .mergeFailed, .stale, .layerMissing, .originNotFound, .invalidSnapshot, .other] {
        #expect(code(SnapshotError(after, "commit of vg-lv", "why")) == .attention, "\(after)")
    }
    // The volume commands: a check before any change is 2 whatever its code; what failed after
    // a change (thin_repair that wrote a copy) is 3.
    #expect(code(SnapshotError.refusal(.inUse, "volume remove site", "it is mounted")) == .usage)
    #expect(code(SnapshotError.refusal(.other, "volume create site", "guard already has a volume site")) == .usage)
    #expect(code(SnapshotError(.other, "volume repair site", "thin_repair could not rebuild the metadata")) == .attention)
    #expect(code(ThinCheckFailure(volume: "site", output: "bad checksum")) == .usage, "the pool was left inactive: nothing changed")
    #expect(code(DeviceMapperError(code: .permissionDenied, operation: "connection to device-mapper", detail: "needs root")) == .usage)
    #expect(code(DeviceMapperError(code: .busy, operation: "remove of x")) == .attention)
    let message = ExitStatus.of(SnapshotError(.inUse, "commit of vg-lv", "the snapshot is open", hint: "unmount it first"))?.message
    #expect(message == "commit of vg-lv refused: the snapshot is open; unmount it first")
    #expect(code(JournalError(path: "/j", reason: "database is locked", isBusy: true))?.rawValue == 75)
    struct Unknown: Error {}
    #expect(ExitStatus.of(Unknown()) == nil)
    #expect(ExitStatus.unmapped(Unknown()).code == .attention, "an error no layer mapped may come after a change: 3, never 2")
}

@Test("rollback --dry-run's text says, in the rollback's order, the hooks, the unmounts and who would stop them, and what is thrown away")
func rollbackPreviewText() {
    var volume = RollbackPreview.Volume(
        volume: "/dev/vg/website", unmounts: ["/srv/www"], users: ["pid 812 (nginx)"], changedBytes: 14 << 20, changedAtEndBytes: 4 << 20, changedSinceEndBytes: 10 << 20)
    let preview = RollbackPreview(run: 12, keptAt: 0, atBoot: false, stopHooks: ["stop nginx"], startHooks: ["start nginx"], volumes: [volume])
    #expect(
        GuardCommand.describe(preview) == [
            "run 12: a rollback would",
            "  run rollback.stop: stop nginx",
            "  unmount /srv/www",
            "    in use by pid 812 (nginx): unless rollback.stop stops it (or it is the run's own), the unmount fails and nothing is merged",
            "  merge /dev/vg/website back: 14 MiB differ from before the run; 10 MiB of them first written after the run ended (thrown away: at least that much of what was written since)",
            "  mount /srv/www again",
            "  run rollback.start: start nginx",
        ])
    volume.changedAtEndBytes = nil
    volume.changedSinceEndBytes = nil
    let older = GuardCommand.describe(RollbackPreview(run: 3, keptAt: nil, atBoot: true, stopHooks: [], startHooks: [], volumes: [volume]))
    #expect(older.first?.hasSuffix("at the next boot (the initramfs merges the volumes before it mounts the root)") == true, "\(older)")
    #expect(older.contains { $0.hasSuffix("(how much of it since the run ended is not journaled for this run)") }, "\(older)")
}
