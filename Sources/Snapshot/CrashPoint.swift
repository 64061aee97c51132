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

/// Named places where the fault-injection suite kills guard (SIGKILL, no cleanup).
///
/// Only active in a test build (`TestHooks.enable()`) whose environment has
/// `GUARD_CRASH_AT=<name>`. The names are listed in Docs/recovery.md with what
/// `guard recover` does after each.
public enum CrashPoint {
    /// Kills this process if `name` is the point the environment names.
    @inline(__always)
    public static func hit(_ name: StaticString) {
        guard let target = TestHooks.crashTarget else { return }
        if target == name.description {
            kill(getpid(), SIGKILL)
        }
    }
}
