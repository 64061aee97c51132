import BlockDevice
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A lock on one volume, held by this process: an flock(2) on `locks/<volume>.lock`, so it
/// disappears with the process, however it dies. The file says who holds it.
public final class VolumeLock {
    public var path: String { file.path }
    private let file: LockFile

    /// Takes the lock or throws who holds it.
    /// - Parameter key: the volume's stable identity (dm UUID or name).
    public static func acquire(directory: String, key: String, holder: String) throws -> VolumeLock {
        let path = lockPath(directory: directory, key: key)
        let file: LockFile
        do { file = try LockFile(opening: path) } catch {
            throw GuardFailure(.refused, "cannot open the lock file \(path): \(error)")
        }
        // guard monitor holds a volume's lock only around one extension or fuse (milliseconds):
        // wait for it rather than refuse.
        var patience = 250
        while !file.tryLock() {
            let owner = Self.owner(path)
            if owner.hasPrefix(Self.monitorHolder), patience > 0 {
                patience -= 1
                usleep(20_000)
                continue
            }
            throw GuardFailure(.busy, "the volume \(key) is in use by another guard command (\(owner.isEmpty ? "unknown" : owner)); wait for it to finish")
        }
        let lock = VolumeLock(file: file)
        lock.describe(holder)
        return lock
    }

    /// What the lock file says about its holder ("" when nothing).
    static func owner(_ path: String) -> String {
        (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
    }

    /// How `guard monitor` names itself as a holder.
    public static let monitorHolder = "guard monitor"

    private init(file: LockFile) { self.file = file }

    /// Rewrites who holds the lock ("run 12 (pid 3456)").
    public func describe(_ holder: String) { file.write(holder + "\n") }

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
        do {
            guard try LockFile.isHeld(path) else { return nil }
        } catch {
            return "unknown (\(path): \(error))"
        }
        let owner = owner(path)
        return owner.isEmpty ? "unknown" : owner
    }

    public func release() { file.release() }

    deinit { release() }
}
