#if canImport(Glibc)
import Glibc
#endif

/// guard's stdout and stderr. A write that fails (the reader of a pipe is gone, as after
/// `guard run … | head` or a killed `tee`; a terminal hung up: EPIPE, EIO) is dropped, never a
/// crash: guard may be in the middle of a transaction, and its journal and the system log
/// have what it would have said. (Foundation's `FileHandle.write(_:)` traps on such an error.)
public enum StandardStreams {
    /// Writes `text` to stdout; false when not all of it could be written.
    @discardableResult
    public static func out(_ text: String) -> Bool { write(text, to: STDOUT_FILENO) }

    /// Writes `text` to stderr; false when not all of it could be written.
    @discardableResult
    public static func error(_ text: String) -> Bool { write(text, to: STDERR_FILENO) }

    /// The whole of `text` to `descriptor`, again after EINTR and short writes; false on any
    /// other error.
    public static func write(_ text: String, to descriptor: Int32) -> Bool {
        Array(text.utf8).withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = Glibc.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                if written > 0 {
                    offset += written
                } else if written < 0 && errno == EINTR {
                    continue
                } else {
                    return false
                }
            }
            return true
        }
    }
}
