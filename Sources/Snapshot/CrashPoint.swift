#if canImport(Glibc)
import Glibc
#endif

/// Switches for the test suites, off in the `guard` that users run.
///
/// Only the `guard-test` executable (Sources/GuardTestCLI, built beside `guard` for the kernel
/// suite, never installed or packaged) calls `enable()`, first thing in `main`. The `guard`
/// executable never does, so a release or installed binary ignores GUARD_CRASH_AT and GUARD_NOW
/// whatever its environment holds (the kernel suite proves it on the plain binary).
public enum TestHooks {
    // Written once by `enable()` before any other thread exists, read-only afterwards.
    nonisolated(unsafe) public private(set) static var isEnabled = false
    nonisolated(unsafe) fileprivate static var crashTarget: String?

    /// Honours the test variables from here on. Reads GUARD_CRASH_AT now, so hitting a crash
    /// point reads nothing, even inside the suspend window.
    public static func enable() {
        isEnabled = true
        if let value = getenv("GUARD_CRASH_AT"), value.pointee != 0 { crashTarget = String(cString: value) }
    }
}

/// Named places where the fault-injection suite kills guard (SIGKILL, no cleanup), in the
/// order a run, a commit and a rollback pass them.
///
/// Only active in a test build (`TestHooks.enable()`) whose environment has
/// `GUARD_CRASH_AT=<raw value>`. Docs/recovery.md lists them with what `guard recover` does
/// after each; the kernel suite has a scenario for every case (it fails on one without).
public enum CrashPoint: String, CaseIterable, Sendable {
    case runBeforePrepare = "run.before-prepare"
    case prepareCowFile = "prepare.cow-file"
    case prepareCowLive = "prepare.cow-live"
    case prepareRealLoaded = "prepare.real-loaded"
    case prepareRealLive = "prepare.real-live"
    case prepareSnapLoaded = "prepare.snap-loaded"
    case prepareOriginLoaded = "prepare.origin-loaded"
    case runBeforeTake = "run.before-take"
    case windowSuspended = "window.suspended"
    case windowThinSnapshot = "window.thin-snapshot"
    case windowSnapResumed = "window.snap-resumed"
    case runAfterTake = "run.after-take"
    case runBeforeCommit = "run.before-commit"
    case commitOriginLoaded = "commit.origin-loaded"
    case commitSuspended = "commit.suspended"
    case commitOriginRestored = "commit.origin-restored"
    case commitLayersRemoved = "commit.layers-removed"
    case thinViewRemoved = "thin.view-removed"
    case thinSnapshotDeleted = "thin.snapshot-deleted"
    case runAfterCommit = "run.after-commit"
    case rollbackBeforeMerge = "rollback.before-merge"
    case mergeLabelMerging = "merge.label-merging"
    case mergeOriginLoaded = "merge.origin-loaded"
    case mergeSnapLoaded = "merge.snap-loaded"
    case mergeSuspended = "merge.suspended"
    case mergeHandedOver = "merge.handed-over"
    case thinRegistryWritten = "thin.registry-written"
    case thinOriginLoaded = "thin.origin-loaded"
    case thinSwapped = "thin.swapped"
    case rollbackAfterMergeStart = "rollback.after-merge-start"
    case restartErrorTable = "restart.error-table"
    case finishLabelReleased = "finish.label-released"
    case finishOriginLoaded = "finish.origin-loaded"
    case finishOriginRestored = "finish.origin-restored"
    case finishLayersRemoved = "finish.layers-removed"
    case thinReplacedDeleted = "thin.replaced-deleted"

    /// Kills this process if `point` is the one the environment names.
    @inline(__always)
    public static func hit(_ point: CrashPoint) {
        guard let target = TestHooks.crashTarget else { return }
        if target == point.rawValue {
            kill(getpid(), SIGKILL)
        }
    }
}
