import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A lock on one volume, held by this process: an flock(2) on `locks/<volume>.lock`, so it
/// disappears with the process, however it dies. The file says who holds it.
public final class VolumeLock {
    public let path: String
    private var descriptor: Int32

    /// Takes the lock or throws who holds it.
    /// - Parameter key: the volume's stable identity (dm UUID or name).
    public static func acquire(directory: String, key: String, holder: String) throws -> VolumeLock {
        let path = lockPath(directory: directory, key: key)
        // Never through a link: a lock file replaced by a symlink would truncate its target.
        let descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard descriptor >= 0 else {
            throw GuardFailure(.refused, "cannot open the lock file \(path): \(String(cString: strerror(errno)))")
        }
        // guard monitor holds a volume's lock only around one extension or fuse (milliseconds):
        // wait for it rather than refuse.
        var patience = 250
        while flock(descriptor, LOCK_EX | LOCK_NB) != 0 {
            let owner = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            if owner.hasPrefix(Self.monitorHolder), patience > 0 {
                patience -= 1
                usleep(20_000)
                continue
            }
            close(descriptor)
            throw GuardFailure(.busy, "the volume \(key) is in use by another guard command (\(owner.isEmpty ? "unknown" : owner)); wait for it to finish")
        }
        let lock = VolumeLock(path: path, descriptor: descriptor)
        lock.describe(holder)
        return lock
    }

    /// How `guard monitor` names itself as a holder.
    public static let monitorHolder = "guard monitor"

    private init(path: String, descriptor: Int32) {
        self.path = path
        self.descriptor = descriptor
    }

    /// Rewrites who holds the lock ("run 12 (pid 3456)").
    public func describe(_ holder: String) {
        _ = ftruncate(descriptor, 0)
        let text = holder + "\n"
        _ = text.withCString { pwrite(descriptor, $0, strlen($0), 0) }
    }

    static func lockPath(directory: String, key: String) -> String {
        let safe = key.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." ? $0 : "_" }
        return "\(directory)/\(String(safe)).lock"
    }

    /// Whether another process holds the lock on `key` right now.
    public static func isHeld(directory: String, key: String) -> Bool { holder(directory: directory, key: key) != nil }

    /// Who holds the lock on `key` ("run 12 (pid 3456)"), or nil when nobody does. Creates and
    /// changes nothing (a dry run uses it); a lock file it cannot open counts as held.
    public static func holder(directory: String, key: String) -> String? {
        let path = lockPath(directory: directory, key: key)
        let descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard descriptor >= 0 else { return errno == ENOENT ? nil : "unknown (\(path): \(String(cString: strerror(errno))))" }
        defer { close(descriptor) }
        if flock(descriptor, LOCK_SH | LOCK_NB) == 0 { return nil }
        let owner = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        return owner.isEmpty ? "unknown" : owner
    }

    public func release() {
        if descriptor >= 0 {
            _ = ftruncate(descriptor, 0)
            close(descriptor)
            descriptor = -1
        }
    }

    deinit { release() }
}
