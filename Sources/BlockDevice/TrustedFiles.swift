import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// Files and directories guard acts on as root (recipes, guard.conf, the state directory):
/// read once through one descriptor, and checked for who besides root could have changed them.
public enum TrustedFiles {
    /// A file as it was read: its bytes, and why someone other than root could have changed it.
    public struct Contents: Sendable {
        public var bytes: [UInt8]
        /// nil when only root can change the file and every directory above it.
        public var problem: String?
    }

    /// Reads `path` once: opened without following a symbolic link in its last component, and
    /// checked on that descriptor (a regular file, at most `limit` bytes, its owner and mode),
    /// so the text checked is the text read. Every directory above it is checked too (see
    /// `ancestryProblem`).
    ///
    /// - Parameter what: what the file is, for messages ("the recipe").
    /// - Throws: `BlockDeviceError` when it cannot be opened or read, is not a regular file
    ///   (a symlink, a FIFO, a device) or is larger than `limit`.
    /// - Note: open(2) with O_NOFOLLOW, fstat(2), read(2).
    public static func read(_ path: String, what: String, limit: Int, owner: uid_t = geteuid()) throws(BlockDeviceError) -> Contents {
        let operation = "reading \(what) \(path)"
        let fd: Int32
        do {
            fd = try Sys.open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK, operation: operation)
        } catch {
            if error.errno == ELOOP {
                let target = Sys.readlink(path).map { " (it points to \($0))" } ?? ""
                throw BlockDeviceError(code: .invalidArgument, operation: operation, call: "open", errno: ELOOP, detail: "it is a symbolic link\(target); name the file itself")
            }
            throw error
        }
        defer { Sys.close(fd) }
        let info = try Sys.fstat(fd, operation: operation)
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw BlockDeviceError(code: .invalidArgument, operation: operation, call: "fstat", errno: EINVAL, detail: "it is not a regular file")
        }
        guard info.st_size <= limit else {
            throw BlockDeviceError(
                code: .invalidArgument, operation: operation, call: "fstat", errno: EFBIG, detail: "it has \(info.st_size) bytes, more than the \(limit) a \(what) may have")
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while bytes.count <= limit {
            let count = try Sys.retrying("read", operation: operation) { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        guard bytes.count <= limit else {
            throw BlockDeviceError(
                code: .invalidArgument, operation: operation, call: "read", errno: EFBIG, detail: "it grew past the \(limit) bytes a \(what) may have while it was read")
        }
        var problem: String?
        if info.st_uid != owner && info.st_uid != 0 {
            problem = "\(what) \(path) is owned by uid \(info.st_uid), not root"
        } else if info.st_mode & 0o022 != 0 {
            problem = "\(what) \(path) is writable by its group or by everyone (mode \(String(info.st_mode & 0o777, radix: 8)))"
        } else {
            problem = ancestryProblem(of: path, what: what, owner: owner)
        }
        return Contents(bytes: bytes, problem: problem)
    }

    /// Why someone other than root (or `owner`) could replace what is in `path`'s directories,
    /// or nil: every directory above it, as written and as resolved, must be owned by root and
    /// not writable by group or others, unless it is sticky (as /tmp: then nobody else can
    /// rename or delete root's files in it).
    public static func ancestryProblem(of path: String, what: String, owner: uid_t = geteuid()) -> String? {
        let absolute = path.hasPrefix("/") ? path : (currentDirectory() ?? "/") + "/" + path
        var chains = [directories(above: Mounts.normalize(absolute))]
        if let resolved = realpath(parentOf: absolute) { chains.append(directories(above: resolved + "/x")) }
        var checked: Set<String> = []
        for directory in chains.joined() where checked.insert(directory).inserted {
            guard let info = try? Sys.stat(directory, operation: "checking \(directory)") else {
                return "\(what)'s directory \(directory) cannot be checked"
            }
            let sticky = info.st_mode & S_ISVTX != 0
            if info.st_uid != 0 && info.st_uid != owner {
                return "\(what)'s directory \(directory) is owned by uid \(info.st_uid), not root"
            }
            if info.st_mode & 0o022 != 0 && !sticky {
                return "\(what)'s directory \(directory) is writable by others (mode \(String(info.st_mode & 0o7777, radix: 8)))"
            }
        }
        return nil
    }

    /// Why a directory guard keeps state in could be changed by someone other than root (or
    /// `owner`), or nil: it must be a directory, owned by root, not writable by group or others.
    public static func directoryProblem(_ path: String, what: String, owner: uid_t = geteuid()) -> String? {
        guard let info = try? Sys.stat(path, operation: "checking \(path)") else { return nil }
        if info.st_mode & S_IFMT != S_IFDIR { return "\(what) \(path) is not a directory" }
        if info.st_uid != 0 && info.st_uid != owner { return "\(what) \(path) is owned by uid \(info.st_uid), not root" }
        if info.st_mode & 0o022 != 0 { return "\(what) \(path) is writable by its group or by everyone (mode \(String(info.st_mode & 0o7777, radix: 8)))" }
        return nil
    }

    /// Why a file guard keeps state in (the journal) could be changed by someone other than
    /// root (or `owner`), or nil; a missing file is nil. A symbolic link is a problem: guard
    /// writes its state files itself, never through a link.
    public static func fileProblem(_ path: String, what: String, owner: uid_t = geteuid()) -> String? {
        guard let info = try? Sys.lstat(path, operation: "checking \(path)") else { return nil }
        if info.st_mode & S_IFMT != S_IFREG { return "\(what) \(path) is not a regular file" }
        if info.st_uid != 0 && info.st_uid != owner { return "\(what) \(path) is owned by uid \(info.st_uid), not root" }
        if info.st_mode & 0o022 != 0 { return "\(what) \(path) is writable by its group or by everyone (mode \(String(info.st_mode & 0o7777, radix: 8)))" }
        return nil
    }

    /// `/a/b/c` -> `/a/b`, `/a`, `/`.
    static func directories(above path: String) -> [String] {
        var result: [String] = []
        var current = path
        while current != "/" {
            current = Sys.parentDirectory(of: current) ?? "/"
            result.append(current)
        }
        return result
    }

    static func realpath(parentOf path: String) -> String? {
        let parent = directories(above: path).first ?? "/"
        guard let resolved = Glibc.realpath(parent, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    static func currentDirectory() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return nil }
        return Sys.string(buffer)
    }
}
