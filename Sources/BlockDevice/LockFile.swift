#if canImport(Glibc)
import Glibc
#endif

/// An advisory lock on a file (flock(2)): released when the file is closed, and by the kernel
/// when the process dies, however it dies. The file may say who holds it.
public final class LockFile {
    public let path: String
    private var descriptor: Int32
    private var locked = false

    /// Opens the lock file, creating it (mode 0600), never through a symbolic link: a lock file
    /// replaced by a link would otherwise truncate the link's target.
    public init(opening path: String) throws(BlockDeviceError) {
        self.path = path
        descriptor = try Sys.open(path, O_RDWR | O_CREAT | O_NOFOLLOW, mode: 0o600, operation: "opening the lock file \(path)")
    }

    /// Takes the lock exclusively, without waiting: whether it was free.
    public func tryLock() -> Bool {
        guard descriptor >= 0 else { return false }
        while true {
            if flock(descriptor, LOCK_EX | LOCK_NB) == 0 {
                locked = true
                return true
            }
            if errno != EINTR { return false }
        }
    }

    /// Replaces what the file says (who holds the lock); only while this process holds it.
    public func write(_ text: String) {
        guard descriptor >= 0, locked else { return }
        _ = ftruncate(descriptor, 0)
        _ = text.withCString { pwrite(descriptor, $0, strlen($0), 0) }
    }

    /// Closes the file: the lock is free. A lock this process held is emptied first (a lock
    /// it did not get keeps what its holder wrote).
    public func release() {
        guard descriptor >= 0 else { return }
        if locked { _ = ftruncate(descriptor, 0) }
        Sys.close(descriptor)
        descriptor = -1
        locked = false
    }

    deinit { release() }

    /// Whether another process holds the lock at `path` now (false when there is no such
    /// file). Creates and changes nothing.
    /// - Throws: when the file exists and cannot be opened.
    public static func isHeld(_ path: String) throws(BlockDeviceError) -> Bool {
        let descriptor: Int32
        do {
            descriptor = try Sys.open(path, O_RDONLY | O_NOFOLLOW, operation: "reading the lock file \(path)")
        } catch  where error.errno == ENOENT {
            return false
        }
        defer { Sys.close(descriptor) }
        return flock(descriptor, LOCK_SH | LOCK_NB) != 0
    }
}
