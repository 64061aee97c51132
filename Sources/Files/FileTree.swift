import BlockDevice
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A failure of a file-level diff or restore, naming the path.
public struct FileTreeError: Error, Sendable, CustomStringConvertible {
    public var path: String
    public var reason: String
    public var description: String { "\(path): \(reason)" }

    init(_ path: String, _ reason: String) {
        self.path = path
        self.reason = reason
    }

    init(_ path: String, call: String, errno code: Int32 = errno) {
        self.init(path, "\(call): \(String(cString: strerror(code)))")
    }
}

/// What a path is, from lstat.
public enum FileKind: String, Sendable, Encodable {
    case file, directory, symlink, fifo, socket, device

    init(mode: mode_t) {
        switch mode & S_IFMT {
        case S_IFDIR: self = .directory
        case S_IFLNK: self = .symlink
        case S_IFIFO: self = .fifo
        case S_IFSOCK: self = .socket
        case S_IFCHR, S_IFBLK: self = .device
        default: self = .file
        }
    }
}

/// One difference between the snapshot ("then") and the volume ("now").
public struct FileChange: Sendable, Encodable, Hashable {
    public enum Change: String, Sendable, Encodable {
        /// Exists now, not in the snapshot.
        case created
        /// In the snapshot, gone now.
        case deleted
        /// Content (or, for a symlink, its target; or the kind of file) differs.
        case modified
        /// Same content, different mode, owner, extended attributes (or times, if asked).
        case metadata
    }

    /// Relative to the volume's root.
    public var path: String
    public var change: Change
    public var kind: FileKind
    public var sizeBefore: Int64?
    public var sizeAfter: Int64?
    /// What changed besides the content: "mode 0644 -> 0600", "owner 0:0 -> 33:33", "xattrs", "mtime".
    public var details: [String]

    enum CodingKeys: String, CodingKey {
        case path, change, kind, details
        case sizeBefore = "size_before"
        case sizeAfter = "size_after"
    }
}

/// Paths given on the command line, made relative to a volume's root, with escapes refused.
public enum VolumePath {
    /// `path` relative to `root` ("" for the root itself), given absolute (under `root`'s
    /// mount point) or relative to it. Refuses `..` components and paths outside the volume.
    public static func relative(_ path: String, root: String) throws -> String {
        let components = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        if components.contains("..") {
            throw FileTreeError(path, "`..` is not allowed; give the path inside the volume (under \(root))")
        }
        let cleaned = components.filter { $0 != "." }
        if path.hasPrefix("/") {
            let rootComponents = root.split(separator: "/").map(String.init)
            guard cleaned.starts(with: rootComponents) else {
                throw FileTreeError(path, "is not on the volume mounted at \(root); give a path under \(root)")
            }
            return cleaned.dropFirst(rootComponents.count).joined(separator: "/")
        }
        return cleaned.joined(separator: "/")
    }
}

/// lstat-style metadata of one entry.
struct Entry {
    var stat: stat
    var kind: FileKind { FileKind(mode: stat.st_mode) }
    var size: Int64 { Int64(stat.st_size) }
    var permissions: mode_t { stat.st_mode & 0o7777 }
}

// Linux's O_PATH and AT_EMPTY_PATH (<fcntl.h> under _GNU_SOURCE, which Glibc's module does
// not export): a descriptor that names an inode without opening it, and *at() calls on it.
let O_PATH: Int32 = 0o10000000
let AT_EMPTY_PATH: Int32 = 0x1000

/// A directory entry's name as the kernel keeps it: bytes, which need not be UTF-8.
///
/// Every system call gets the bytes; people get `display`, which is the name itself when it is
/// UTF-8 and otherwise shows each byte that is not as `\xNN` (and a backslash as `\\`).
/// `FileName.parsing` reads that form back, so a name `guard diff` shows can be restored.
struct FileName: Hashable, Comparable {
    /// The bytes, NUL-terminated: passed to the *at() calls as a C string.
    let cString: [CChar]

    init(bytes: some Sequence<UInt8>) { cString = bytes.map { CChar(bitPattern: $0) } + [0] }
    init(_ string: String) { self.init(bytes: string.utf8) }

    var bytes: [UInt8] { cString.dropLast().map { UInt8(bitPattern: $0) } }
    var isDotOrDotDot: Bool { cString == [46, 0] || cString == [46, 46, 0] }

    func hasPrefix(_ prefix: String) -> Bool { cString.dropLast().starts(with: prefix.utf8) { UInt8(bitPattern: $0) == $1 } }

    var display: String {
        let bytes = bytes
        if let text = String(validating: bytes, as: UTF8.self) { return text }
        var text = ""
        var parser = Unicode.UTF8.ForwardParser()
        var iterator = bytes.makeIterator()
        var position = 0
        loop: while true {
            switch parser.parseScalar(from: &iterator) {
            case .valid(let encoded):
                let scalar = Unicode.UTF8.decode(encoded)
                text += scalar == "\\" ? "\\\\" : String(Character(scalar))
                position += encoded.count
            case .error(let length):
                for byte in bytes[position..<position + length] { text += "\\x" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2) }
                position += length
            case .emptyInput:
                break loop
            }
        }
        return text
    }

    /// The name a `display` form stands for, when it has escapes (`\xNN`, `\\`) and they
    /// give bytes that are not UTF-8; nil otherwise (the text is then the name itself).
    static func parsing(_ text: String) -> FileName? {
        guard text.contains("\\") else { return nil }
        var bytes: [UInt8] = []
        var utf8 = Array(text.utf8)[...]
        while let byte = utf8.popFirst() {
            guard byte == UInt8(ascii: "\\") else {
                bytes.append(byte)
                continue
            }
            switch utf8.popFirst() {
            case UInt8(ascii: "\\"): bytes.append(byte)
            case UInt8(ascii: "x"):
                guard utf8.count >= 2, let value = UInt8(String(decoding: utf8.prefix(2), as: UTF8.self), radix: 16) else { return nil }
                bytes.append(value)
                utf8 = utf8.dropFirst(2)
            default: return nil
            }
        }
        guard String(validating: bytes, as: UTF8.self) == nil, !bytes.contains(0), !bytes.contains(UInt8(ascii: "/")) else { return nil }
        return FileName(bytes: bytes)
    }

    /// Byte order (unsigned), as `ls` in the C locale; the terminating NUL sorts a prefix first.
    static func < (a: FileName, b: FileName) -> Bool {
        a.cString.lexicographicallyPrecedes(b.cString) { UInt8(bitPattern: $0) < UInt8(bitPattern: $1) }
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String { String(repeating: "0", count: Swift.max(0, width - count)) + self }
}

/// File-descriptor level helpers: every lookup is relative to an open directory and never
/// follows a symlink, so nothing a path holds can lead guard outside the volume.
enum FS {
    static func lstat(_ directory: Int32, _ name: FileName) -> Entry? {
        var result = stat()
        guard fstatat(directory, name.cString, &result, AT_SYMLINK_NOFOLLOW) == 0 else { return nil }
        return Entry(stat: result)
    }

    static func fstat(_ fd: Int32) -> Entry? {
        var result = stat()
        guard Glibc.fstat(fd, &result) == 0 else { return nil }
        return Entry(stat: result)
    }

    /// Opens a subdirectory without following a symlink.
    static func openDirectory(_ directory: Int32, _ name: FileName, path: String) throws -> Int32 {
        let fd = openat(directory, name.cString, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 {
            if errno == ELOOP || errno == ENOTDIR {
                throw FileTreeError(path, "is not a directory (a symlink or a file is in the way); guard never follows a symlink in a path")
            }
            throw FileTreeError(path, call: "open")
        }
        return fd
    }

    static func openRoot(_ path: String) throws -> Int32 {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw FileTreeError(path, call: "open") }
        return fd
    }

    /// The entries of a directory, as the bytes the kernel has (none is lost to an encoding).
    static func names(_ directory: Int32) -> [FileName] {
        let copy = dup(directory)
        guard copy >= 0, let stream = fdopendir(copy) else { return [] }
        defer { closedir(stream) }
        var result: [FileName] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { FileName(bytes: $0.prefix { $0 != 0 }) }
            if !name.isDotOrDotDot { result.append(name) }
        }
        return result.sorted()
    }

    /// A symlink's target, NUL-terminated, byte for byte.
    static func readLink(_ directory: Int32, _ name: FileName) -> [CChar]? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlinkat(directory, name.cString, &buffer, buffer.count - 1)
        guard n >= 0 else { return nil }
        return Array(buffer[0..<n]) + [0]
    }

    /// The name a path component given by a person stands for in `directories`: the text
    /// itself when it names an entry (or when its escapes stand for nothing there), else the
    /// non-UTF-8 name its `\xNN` escapes spell.
    static func resolve(_ component: String, in directories: [Int32]) -> FileName {
        let literal = FileName(component)
        guard let escaped = FileName.parsing(component) else { return literal }
        let valid = directories.filter { $0 >= 0 }
        if valid.contains(where: { lstat($0, literal) != nil }) { return literal }
        return valid.contains(where: { lstat($0, escaped) != nil }) ? escaped : literal
    }

    /// Extended attributes (ACLs are among them: system.posix_acl_*) of an open file.
    static func xattrs(_ fd: Int32) -> [String: [UInt8]] { ExtendedAttributes.all(fd) }

    /// Opens an entry to read its attributes (O_PATH does not allow xattr calls, so files and
    /// directories are opened read-only; others have no attributes guard copies).
    static func openForAttributes(_ directory: Int32, _ name: FileName, kind: FileKind) -> Int32? {
        guard kind == .file || kind == .directory else { return nil }
        let fd = openat(directory, name.cString, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | (kind == .directory ? O_DIRECTORY : 0))
        return fd >= 0 ? fd : nil
    }

    /// Whether two open files have the same bytes (read in 1 MiB blocks, stops at the first difference).
    static func sameContent(_ a: Int32, _ b: Int32) -> Bool {
        let size = 1 << 20
        var left = [UInt8](repeating: 0, count: size)
        var right = [UInt8](repeating: 0, count: size)
        var offset: off_t = 0
        while true {
            let n = pread(a, &left, size, offset)
            let m = pread(b, &right, size, offset)
            if n != m || n < 0 { return false }
            if n == 0 { return true }
            if left.withUnsafeBytes({ l in right.withUnsafeBytes { r in memcmp(l.baseAddress!, r.baseAddress!, n) } }) != 0 { return false }
            offset += off_t(n)
        }
    }
}
