import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// The system log, identity "guard": journald's native protocol where journald listens,
/// with structured fields (GUARD_RUN_ID, GUARD_RECIPE, GUARD_PHASE, GUARD_VOLUME and, for
/// the events in guard.catalog, MESSAGE_ID); syslog(3) elsewhere. `journalctl -t guard`
/// tells the story either way.
public enum SystemLog {
    public enum Priority: Int32, Sendable {
        case error = 3, warning = 4, notice = 5, info = 6, debug = 7
    }

    /// journald's native socket.
    public static let journalSocket = "/run/systemd/journal/socket"

    /// Writes one message with its fields (names in journald's form: A-Z, 0-9, _).
    public static func write(_ priority: Priority, _ message: String, fields: [(String, String)] = []) {
        if sendToJournal(priority, message, fields: fields) { return }
        guard_syslog(priority.rawValue, message)
    }

    /// One datagram in journald's native format; false when journald is not there (or the
    /// entry is too large for a datagram), and the caller falls back to syslog.
    static func sendToJournal(_ priority: Priority, _ message: String, fields: [(String, String)], socket path: String = journalSocket) -> Bool {
        var entry: [UInt8] = []
        func field(_ name: String, _ value: String) {
            entry += Array(name.utf8)
            if value.utf8.contains(UInt8(ascii: "\n")) {
                // Binary form: NAME, newline, the length as 64-bit little endian, the bytes.
                entry.append(UInt8(ascii: "\n"))
                var length = UInt64(value.utf8.count).littleEndian
                withUnsafeBytes(of: &length) { entry += $0 }
                entry += Array(value.utf8)
            } else {
                entry.append(UInt8(ascii: "="))
                entry += Array(value.utf8)
            }
            entry.append(UInt8(ascii: "\n"))
        }
        field("MESSAGE", message)
        field("PRIORITY", "\(priority.rawValue)")
        field("SYSLOG_IDENTIFIER", "guard")
        field("SYSLOG_FACILITY", "3")  // daemon, as the syslog fallback
        field("SYSLOG_PID", "\(getpid())")
        for (name, value) in fields { field(name, value) }
        // Never waits: a journald that is behind (its queue full) gets the line by syslog
        // instead, and guard, which may hold volumes suspended, goes on.
        return UnixDatagram.send(entry, to: path)
    }

    /// The fields of one native entry, both forms (the inverse of `sendToJournal`: tests
    /// read guard's entries back with it).
    public static func fields(ofNativeEntry datagram: [UInt8]) -> [String: String] {
        var fields: [String: String] = [:]
        var index = 0
        while index < datagram.count {
            guard let end = datagram[index...].firstIndex(where: { $0 == UInt8(ascii: "=") || $0 == UInt8(ascii: "\n") }) else { break }
            let name = String(decoding: datagram[index..<end], as: UTF8.self)
            if datagram[end] == UInt8(ascii: "=") {
                let stop = datagram[(end + 1)...].firstIndex(of: UInt8(ascii: "\n")) ?? datagram.count
                fields[name] = String(decoding: datagram[(end + 1)..<stop], as: UTF8.self)
                index = stop + 1
            } else {
                guard end + 9 <= datagram.count else { break }
                var length = 0
                for (shift, byte) in datagram[(end + 1)..<(end + 9)].enumerated() { length |= Int(byte) << (8 * shift) }
                guard end + 9 + length <= datagram.count else { break }
                fields[name] = String(decoding: datagram[(end + 9)..<(end + 9 + length)], as: UTF8.self)
                index = end + 9 + length + 1
            }
        }
        return fields
    }

    /// Whether standard error goes to the journal already (a systemd unit's output, as
    /// `JOURNAL_STREAM` names it): a line sent natively must not be printed there too.
    public static func standardErrorIsJournal(_ environment: [String: String]) -> Bool {
        guard let stream = environment["JOURNAL_STREAM"] else { return false }
        let parts = stream.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var status = stat()
        guard fstat(2, &status) == 0 else { return false }
        return UInt64(status.st_dev) == device && UInt64(status.st_ino) == inode
    }
}
