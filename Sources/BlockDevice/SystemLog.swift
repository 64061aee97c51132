import CGuardShims

/// The system log (journald or syslog), identity "guard": `journalctl -t guard` tells the story.
public enum SystemLog {
    public enum Priority: Int32, Sendable {
        case error = 3, warning = 4, notice = 5, info = 6, debug = 7
    }

    /// Writes one message.
    /// - Note: syslog(3), facility LOG_DAEMON.
    public static func write(_ priority: Priority, _ message: String) {
        guard_syslog(priority.rawValue, message)
    }
}
