#if canImport(Glibc)
import Glibc
#endif

/// Named places where the fault-injection suite kills guard (SIGKILL, no cleanup).
///
/// Only active when the environment has `GUARD_CRASH_AT=<name>` (read once at start-up,
/// so hitting a point reads nothing, even inside the suspend window). The names are
/// listed in Docs/recovery.md with what `guard recover` does after each.
public enum CrashPoint {
    private static let target: String? = {
        guard let value = getenv("GUARD_CRASH_AT") else { return nil }
        let text = String(cString: value)
        return text.isEmpty ? nil : text
    }()

    /// Reads the environment now (call once at start-up, before any suspend).
    public static func prepare() { _ = target }

    /// Kills this process if `name` is the point the environment names.
    @inline(__always)
    public static func hit(_ name: StaticString) {
        guard let target else { return }
        if target == name.description {
            kill(getpid(), SIGKILL)
        }
    }
}
