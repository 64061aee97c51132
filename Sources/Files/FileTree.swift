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

/// Compares a snapshot's tree ("then") with the live volume's ("now"), metadata first:
/// an entry with the same inode, ctime, mtime and size in both is unchanged (a block-level
/// snapshot keeps inode numbers, and ctime moves on every change), so only entries whose
/// metadata does not settle it are read.
public struct TreeDiff {
    public var then: String
    public var now: String
    /// Report mtime-only changes as metadata changes.
    public var times: Bool

    public init(then: String, now: String, times: Bool) {
        self.then = then
        self.now = now
        self.times = times
    }

    /// The differences under `relative` ("" for the whole volume), sorted by path.
    public func changes(under relative: String) throws -> [FileChange] {
        let thenRoot = try FS.openRoot(then)
        defer { close(thenRoot) }
        let nowRoot = try FS.openRoot(now)
        defer { close(nowRoot) }
        guard let device = FS.fstat(nowRoot)?.stat.st_dev else { throw FileTreeError(now, call: "fstat") }
        var changes: [FileChange] = []
        if relative.isEmpty {
            try compareDirectories(thenRoot, nowRoot, path: "", device: device, into: &changes)
        } else {
            let (thenParent, nowParent, name) = try parents(of: relative, thenRoot: thenRoot, nowRoot: nowRoot)
            defer {
                if let thenParent { close(thenParent) }
                if let nowParent { close(nowParent) }
            }
            try compare(thenParent, nowParent, name: name, path: relative, device: device, into: &changes)
        }
        return changes.sorted { $0.path < $1.path }
    }

    /// Both sides' bytes of the regular file at `relative` (a path `changes` reported), read
    /// through descriptors that follow no symlink; nil for a side that is not a regular file,
    /// is larger than `limit` bytes or cannot be read.
    public func contents(of relative: String, limit: Int) throws -> (then: [UInt8]?, now: [UInt8]?) {
        let thenRoot = try FS.openRoot(then)
        defer { close(thenRoot) }
        let nowRoot = try FS.openRoot(now)
        defer { close(nowRoot) }
        let (thenParent, nowParent, name) = try parents(of: relative, thenRoot: thenRoot, nowRoot: nowRoot)
        defer {
            if let thenParent { close(thenParent) }
            if let nowParent { close(nowParent) }
        }
        func read(_ directory: Int32?) -> [UInt8]? {
            guard let directory else { return nil }
            let fd = openat(directory, name.cString, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            defer { close(fd) }
            guard let entry = FS.fstat(fd), entry.kind == .file, entry.size <= limit else { return nil }
            var bytes = [UInt8](repeating: 0, count: Int(entry.size) + 1)
            var count = 0
            while count < bytes.count {
                let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + count, $0.count - count) }
                if n < 0 && errno == EINTR { continue }
                if n < 0 { return nil }
                if n == 0 { break }
                count += n
            }
            return count <= limit ? Array(bytes[..<count]) : nil  // grown past the limit since fstat
        }
        return (read(thenParent), read(nowParent))
    }

    /// Opens the parent directories of `relative` on both sides (nil where it does not exist).
    func parents(of relative: String, thenRoot: Int32, nowRoot: Int32) throws -> (Int32?, Int32?, FileName) {
        var components = relative.split(separator: "/").map(String.init)
        let last = components.removeLast()
        var thenFD: Int32? = dup(thenRoot)
        var nowFD: Int32? = dup(nowRoot)
        var walked = ""
        for text in components {
            let component = FS.resolve(text, in: [thenFD ?? -1, nowFD ?? -1])
            walked += (walked.isEmpty ? "" : "/") + component.display
            if let fd = thenFD {
                thenFD = FS.lstat(fd, component)?.kind == .directory ? try FS.openDirectory(fd, component, path: walked) : nil
                close(fd)
            }
            if let fd = nowFD {
                if let entry = FS.lstat(fd, component), entry.kind != .directory {
                    close(fd)
                    throw FileTreeError(walked, "is a \(entry.kind.rawValue) on the volume, not a directory; guard never follows a symlink in a path")
                }
                nowFD = FS.lstat(fd, component) == nil ? nil : try FS.openDirectory(fd, component, path: walked)
                close(fd)
            }
        }
        return (thenFD, nowFD, FS.resolve(last, in: [thenFD ?? -1, nowFD ?? -1]))
    }

    func compare(_ thenDir: Int32?, _ nowDir: Int32?, name: FileName, path: String, device: dev_t, into changes: inout [FileChange]) throws {
        let before = thenDir.flatMap { FS.lstat($0, name) }
        let after = nowDir.flatMap { FS.lstat($0, name) }
        switch (before, after) {
        case (nil, nil): return
        case (nil, let after?):
            changes.append(FileChange(path: path, change: .created, kind: after.kind, sizeBefore: nil, sizeAfter: after.size, details: []))
            if after.kind == .directory, after.stat.st_dev == device, let nowDir {
                let fd = try FS.openDirectory(nowDir, name, path: path)
                defer { close(fd) }
                for child in FS.names(fd) { try compare(nil, fd, name: child, path: path + "/" + child.display, device: device, into: &changes) }
            }
        case (let before?, nil):
            changes.append(FileChange(path: path, change: .deleted, kind: before.kind, sizeBefore: before.size, sizeAfter: nil, details: []))
            if before.kind == .directory, let thenDir {
                let fd = try FS.openDirectory(thenDir, name, path: path)
                defer { close(fd) }
                for child in FS.names(fd) { try compare(fd, nil, name: child, path: path + "/" + child.display, device: device, into: &changes) }
            }
        case (let before?, let after?):
            if after.kind == .directory && after.stat.st_dev != device { return }  // another filesystem mounted here
            if before.kind != after.kind {
                changes.append(
                    FileChange(path: path, change: .modified, kind: after.kind, sizeBefore: before.size, sizeAfter: after.size, details: ["was a \(before.kind.rawValue)"]))
                return
            }
            if let change = try compareEntries(before, after, thenDir!, nowDir!, name: name, path: path) { changes.append(change) }
            if after.kind == .directory {
                let thenFD = try FS.openDirectory(thenDir!, name, path: path)
                defer { close(thenFD) }
                let nowFD = try FS.openDirectory(nowDir!, name, path: path)
                defer { close(nowFD) }
                try compareDirectories(thenFD, nowFD, path: path, device: device, into: &changes)
            }
        }
    }

    func compareDirectories(_ thenFD: Int32, _ nowFD: Int32, path: String, device: dev_t, into changes: inout [FileChange]) throws {
        let names = Set(FS.names(thenFD)).union(FS.names(nowFD)).sorted()
        for name in names {
            try compare(thenFD, nowFD, name: name, path: path.isEmpty ? name.display : path + "/" + name.display, device: device, into: &changes)
        }
    }

    /// Two entries of the same kind: nil when they are the same.
    func compareEntries(_ before: Entry, _ after: Entry, _ thenDir: Int32, _ nowDir: Int32, name: FileName, path: String) throws -> FileChange? {
        let a = before.stat
        let b = after.stat
        let sameTimes = a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec
        if a.st_ino == b.st_ino && a.st_ctim.tv_sec == b.st_ctim.tv_sec && a.st_ctim.tv_nsec == b.st_ctim.tv_nsec && sameTimes && a.st_size == b.st_size {
            return nil
        }
        var details: [String] = []
        if before.permissions != after.permissions {
            details.append("mode \(String(before.permissions, radix: 8)) -> \(String(after.permissions, radix: 8))")
        }
        if a.st_uid != b.st_uid || a.st_gid != b.st_gid { details.append("owner \(a.st_uid):\(a.st_gid) -> \(b.st_uid):\(b.st_gid)") }
        // Files and directories are opened once, for their content and their attributes.
        let l = FS.openForAttributes(thenDir, name, kind: after.kind)
        let r = FS.openForAttributes(nowDir, name, kind: after.kind)
        defer {
            if let l { close(l) }
            if let r { close(r) }
        }
        var contentChanged = false
        switch after.kind {
        case .file:
            if a.st_size != b.st_size {
                contentChanged = true
            } else if let l, let r {
                contentChanged = !FS.sameContent(l, r)
            }
        case .symlink:
            contentChanged = FS.readLink(thenDir, name) != FS.readLink(nowDir, name)
        case .device:
            contentChanged = a.st_rdev != b.st_rdev
        case .directory, .fifo, .socket:
            break
        }
        if let l, let r, FS.xattrs(l) != FS.xattrs(r) { details.append("xattrs") }
        if times && !sameTimes && after.kind != .directory { details.append("mtime") }
        if contentChanged {
            return FileChange(path: path, change: .modified, kind: after.kind, sizeBefore: before.size, sizeAfter: after.size, details: details)
        }
        if details.isEmpty { return nil }
        return FileChange(path: path, change: .metadata, kind: after.kind, sizeBefore: before.size, sizeAfter: after.size, details: details)
    }
}

/// What a restore did (or, with dryRun, would do), one line per entry.
public struct RestoreReport: Sendable, Encodable {
    public var actions: [String] = []
    /// Paths created after the snapshot and left in place (no --delete).
    public var kept: [String] = []
    public var files: Int64 = 0
    public var bytes: Int64 = 0
    public var removed: Int64 = 0

    public init() {}
}

/// Copies paths back from a snapshot's tree into the live volume's. Every entry is written
/// beside its target under a temporary name, fsynced and renamed over it, so a reader sees
/// the old or the new file, never a mix. Mode, owner, times, extended attributes (ACLs
/// included), symlinks, hard links within the restored set and holes are preserved.
public struct TreeRestore {
    public var then: String
    public var now: String
    /// Remove what was created after the snapshot under the restored paths.
    public var deleteCreated: Bool
    public var dryRun: Bool
    /// A tag for temporary names (the run's token).
    public var tag: String

    public init(then: String, now: String, deleteCreated: Bool, dryRun: Bool, tag: String) {
        self.then = then
        self.now = now
        self.deleteCreated = deleteCreated
        self.dryRun = dryRun
        self.tag = tag
    }

    /// Restores each relative path (validated by `VolumePath.relative`).
    public func restore(_ paths: [String], into report: inout RestoreReport) throws {
        let thenRoot = try FS.openRoot(then)
        defer { close(thenRoot) }
        let nowRoot = try FS.openRoot(now)
        defer { close(nowRoot) }
        guard let device = FS.fstat(nowRoot)?.stat.st_dev else { throw FileTreeError(now, call: "fstat") }
        var links: [ino_t: Link] = [:]
        defer { for link in links.values where link.fd >= 0 { close(link.fd) } }
        for relative in paths {
            if relative.isEmpty {
                throw FileTreeError(now, "restoring the whole volume file by file is not what restore is for; use `guard rollback RUN` (a merge) or name the paths")
            }
            let (thenParent, nowParent, name) = try openParents(relative, thenRoot: thenRoot, nowRoot: nowRoot, device: device, report: &report)
            defer {
                close(thenParent)
                if nowParent >= 0 { close(nowParent) }
            }
            try restoreEntry(thenParent, nowParent, name: name, path: relative, device: device, links: &links, report: &report)
        }
    }

    /// Opens both parents; missing parents on the volume are created from the snapshot's.
    func openParents(_ relative: String, thenRoot: Int32, nowRoot: Int32, device: dev_t, report: inout RestoreReport) throws -> (Int32, Int32, FileName) {
        var components = relative.split(separator: "/").map(String.init)
        let last = components.removeLast()
        var thenFD = dup(thenRoot)
        var nowFD = dup(nowRoot)
        var walked = ""
        for text in components {
            let component = FS.resolve(text, in: [thenFD, nowFD])
            walked += (walked.isEmpty ? "" : "/") + component.display
            guard let source = FS.lstat(thenFD, component) else {
                close(thenFD)
                if nowFD >= 0 { close(nowFD) }
                throw FileTreeError(walked, "is not in the snapshot; nothing under it can be restored")
            }
            guard source.kind == .directory else {
                close(thenFD)
                if nowFD >= 0 { close(nowFD) }
                throw FileTreeError(walked, "is a \(source.kind.rawValue) in the snapshot, not a directory; guard never follows a symlink in a path")
            }
            let nextThen = try FS.openDirectory(thenFD, component, path: walked)
            close(thenFD)
            thenFD = nextThen
            if nowFD >= 0 {
                if let target = FS.lstat(nowFD, component) {
                    guard target.kind == .directory else {
                        close(thenFD)
                        close(nowFD)
                        throw FileTreeError(
                            walked, "is a \(target.kind.rawValue) on the volume, not a directory; guard never follows a symlink in a path (restore \(walked) itself to replace it)")
                    }
                    guard target.stat.st_dev == device else {
                        close(thenFD)
                        close(nowFD)
                        throw FileTreeError(walked, "is another filesystem mounted inside the volume; guard restores only the volume's own files")
                    }
                } else {
                    report.actions.append("create directory \(walked)")
                    if !dryRun {
                        guard mkdirat(nowFD, component.cString, 0o700) == 0 else {
                            defer {
                                close(thenFD)
                                close(nowFD)
                            }
                            throw FileTreeError(walked, call: "mkdir")
                        }
                        let created = try FS.openDirectory(nowFD, component, path: walked)
                        try copyAttributes(from: thenFD, source: source, to: created, path: walked)
                        close(nowFD)
                        nowFD = created
                        continue
                    }
                    close(nowFD)
                    nowFD = -1
                    continue
                }
                let nextNow = try FS.openDirectory(nowFD, component, path: walked)
                close(nowFD)
                nowFD = nextNow
            }
        }
        return (thenFD, nowFD, FS.resolve(last, in: [thenFD, nowFD]))
    }

    /// Beside `name`, under the 255-byte limit: the prefix and as much of the name as fits.
    func temporaryName(_ name: FileName) -> FileName {
        let prefix = Array(".guard-restore.\(tag).".utf8)
        return FileName(bytes: prefix + name.bytes.prefix(250 - prefix.count))
    }

    func restoreEntry(_ thenDir: Int32, _ nowDir: Int32, name: FileName, path: String, device: dev_t, links: inout [ino_t: Link], report: inout RestoreReport) throws {
        let source = FS.lstat(thenDir, name)
        let target = nowDir >= 0 ? FS.lstat(nowDir, name) : nil
        guard let source else {
            guard let target else { throw FileTreeError(path, "is neither in the snapshot nor on the volume") }
            if deleteCreated {
                report.actions.append("remove \(path) (created after the snapshot)")
                if !dryRun { try removeTree(nowDir, name, path: path, device: device) }
                report.removed += 1
            } else {
                report.kept.append(path)
                report.actions.append("keep \(path) (\(target.kind.rawValue) created after the snapshot; --delete removes it)")
            }
            return
        }
        if let target, target.kind == .directory, target.stat.st_dev != device {
            throw FileTreeError(path, "is another filesystem mounted inside the volume; guard restores only the volume's own files")
        }
        if source.kind == .directory {
            try restoreDirectory(thenDir, nowDir, name: name, source: source, target: target, path: path, device: device, links: &links, report: &report)
            return
        }
        if let target, target.kind == .directory {
            guard deleteCreated else {
                throw FileTreeError(path, "is a directory now and a \(source.kind.rawValue) in the snapshot; replacing it deletes what the directory holds: add --delete")
            }
            report.actions.append("remove directory \(path) (a \(source.kind.rawValue) in the snapshot)")
            if !dryRun { try removeTree(nowDir, name, path: path, device: device) }
            report.removed += 1
        }
        report.files += 1
        if source.kind == .file { report.bytes += source.size }
        if source.stat.st_nlink > 1, source.kind != .directory, source.kind != .socket, let first = links[source.stat.st_ino] {
            report.actions.append("link \(path) to \(first.path)")
            report.bytes -= source.size
            if !dryRun {
                try replace(nowDir, name, path: path) { temporary in
                    // Through the first copy's own descriptor (AT_EMPTY_PATH): no path is looked
                    // up, so a symlink swapped into the tree since cannot redirect the link.
                    guard first.fd >= 0, linkat(first.fd, "", nowDir, temporary.cString, AT_EMPTY_PATH) == 0 else { throw FileTreeError(path, call: "link") }
                }
            }
            return
        }
        // The first of several links keeps a descriptor of what guard created, for the others.
        let pin = source.stat.st_nlink > 1 && !dryRun
        links[source.stat.st_ino] = Link(fd: -1, path: path)
        report.actions.append("restore \(path) (\(source.kind.rawValue)\(source.kind == .file ? ", \(source.size) bytes" : ""))")
        if dryRun { return }
        var pinned: Int32 = -1
        switch source.kind {
        case .file:
            pinned = try replace(nowDir, name, path: path, pin: pin) { temporary in try copyFile(thenDir, name, source: source, to: nowDir, temporary, path: path) }
        case .symlink:
            guard let destination = FS.readLink(thenDir, name) else { throw FileTreeError(path, call: "readlink") }
            pinned = try replace(nowDir, name, path: path, pin: pin) { temporary in
                guard symlinkat(destination, nowDir, temporary.cString) == 0 else { throw FileTreeError(path, call: "symlink") }
                guard fchownat(nowDir, temporary.cString, source.stat.st_uid, source.stat.st_gid, AT_SYMLINK_NOFOLLOW) == 0 else { throw FileTreeError(path, call: "lchown") }
                var times = [source.stat.st_atim, source.stat.st_mtim]
                guard utimensat(nowDir, temporary.cString, &times, AT_SYMLINK_NOFOLLOW) == 0 else { throw FileTreeError(path, call: "utimensat") }
            }
        case .fifo, .device:
            pinned = try replace(nowDir, name, path: path, pin: pin) { temporary in
                guard mknodat(nowDir, temporary.cString, source.stat.st_mode, source.stat.st_rdev) == 0 else { throw FileTreeError(path, call: "mknod") }
                // From here on through a descriptor of the node itself: whatever is put in its
                // place meanwhile (a symlink, another file) is neither followed nor changed.
                let node = openat(nowDir, temporary.cString, O_PATH | O_NOFOLLOW | O_CLOEXEC)
                guard node >= 0 else { throw FileTreeError(path, call: "open (O_PATH)") }
                defer { close(node) }
                guard let created = FS.fstat(node), created.stat.st_mode & S_IFMT == source.stat.st_mode & S_IFMT,
                    created.stat.st_rdev == source.stat.st_rdev, created.stat.st_uid == geteuid(), created.stat.st_nlink == 1
                else { throw FileTreeError(path, "was replaced by something else while guard restored it; it was left as it is") }
                guard fchownat(node, "", source.stat.st_uid, source.stat.st_gid, AT_EMPTY_PATH) == 0 else { throw FileTreeError(path, call: "chown") }
                // chmod(2) has no AT_EMPTY_PATH: the descriptor's /proc entry names the node itself.
                guard chmod("/proc/self/fd/\(node)", source.permissions) == 0 else { throw FileTreeError(path, call: "chmod") }
                var times = [source.stat.st_atim, source.stat.st_mtim]
                _ = utimensat(AT_FDCWD, "/proc/self/fd/\(node)", &times, 0)
            }
        case .socket:
            report.actions.append("skip \(path) (a socket: its server creates it)")
        case .directory:
            break
        }
        if pinned >= 0 { links[source.stat.st_ino] = Link(fd: pinned, path: path) }
    }

    /// The first restored link of an inode with several: the others are linked to `fd`.
    struct Link {
        /// An O_PATH descriptor of what guard created (-1 in a dry run).
        var fd: Int32
        var path: String
    }

    /// Creates the entry under a temporary name beside `name`, then renames it over `name`
    /// and syncs the directory; on failure the temporary entry is removed.
    /// - Parameter pin: keep an O_PATH descriptor of the created entry (taken before the
    ///   rename, so it is what guard made) and return it; else -1.
    @discardableResult
    func replace(_ directory: Int32, _ name: FileName, path: String, pin: Bool = false, create: (FileName) throws -> Void) throws -> Int32 {
        let temporary = temporaryName(name)
        _ = unlinkat(directory, temporary.cString, 0)
        var pinned: Int32 = -1
        do {
            try create(temporary)
            if pin {
                pinned = openat(directory, temporary.cString, O_PATH | O_NOFOLLOW | O_CLOEXEC)
                guard pinned >= 0 else { throw FileTreeError(path, call: "open (O_PATH)") }
            }
            guard renameat(directory, temporary.cString, directory, name.cString) == 0 else { throw FileTreeError(path, call: "rename") }
        } catch {
            if pinned >= 0 { close(pinned) }
            _ = unlinkat(directory, temporary.cString, 0)
            throw error
        }
        _ = fsync(directory)
        return pinned
    }

    func copyFile(_ thenDir: Int32, _ name: FileName, source: Entry, to nowDir: Int32, _ temporary: FileName, path: String) throws {
        let input = openat(thenDir, name.cString, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard input >= 0 else { throw FileTreeError(path, call: "open (snapshot)") }
        defer { close(input) }
        let output = openat(nowDir, temporary.cString, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw FileTreeError(path, call: "create") }
        defer { close(output) }
        try copyData(input, output, size: source.size, path: path)
        try copyAttributes(from: input, source: source, to: output, path: path)
        guard fsync(output) == 0 else { throw FileTreeError(path, call: "fsync") }
    }

    /// Copies the data regions only (SEEK_DATA/SEEK_HOLE), so holes stay holes.
    func copyData(_ input: Int32, _ output: Int32, size: Int64, path: String) throws {
        let seekData: Int32 = 3
        let seekHole: Int32 = 4
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: off_t = 0
        while offset < size {
            let dataStart = lseek(input, offset, seekData)
            if dataStart < 0 { break }  // ENXIO: only a hole remains
            let holeStart = lseek(input, dataStart, seekHole)
            let end = holeStart < 0 ? off_t(size) : holeStart
            var position = dataStart
            while position < end {
                let n = pread(input, &buffer, min(buffer.count, Int(end - position)), position)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw FileTreeError(path, call: "read (snapshot)")
                }
                if n == 0 { break }
                var written = 0
                while written < n {
                    let w = buffer.withUnsafeBytes { pwrite(output, $0.baseAddress! + written, n - written, position + off_t(written)) }
                    if w < 0 {
                        if errno == EINTR { continue }
                        throw FileTreeError(path, call: "write")
                    }
                    written += w
                }
                position += off_t(n)
            }
            offset = end
        }
        guard ftruncate(output, off_t(size)) == 0 else { throw FileTreeError(path, call: "ftruncate") }
    }

    /// Owner, mode (after chown, which clears set-id bits), extended attributes, then times.
    func copyAttributes(from input: Int32, source: Entry, to output: Int32, path: String) throws {
        guard fchown(output, source.stat.st_uid, source.stat.st_gid) == 0 else { throw FileTreeError(path, call: "chown") }
        guard fchmod(output, source.permissions) == 0 else { throw FileTreeError(path, call: "chmod") }
        let wanted = FS.xattrs(input)
        let present = FS.xattrs(output)
        for name in present.keys where wanted[name] == nil { ExtendedAttributes.remove(output, name) }
        for (name, value) in wanted.sorted(by: { $0.key < $1.key }) {
            if !ExtendedAttributes.set(output, name, value) {
                if name.hasPrefix("security.") && (errno == EPERM || errno == ENOTSUP) { continue }
                throw FileTreeError(path, call: "setxattr \(name)")
            }
        }
        var times = [source.stat.st_atim, source.stat.st_mtim]
        guard futimens(output, &times) == 0 else { throw FileTreeError(path, call: "futimens") }
    }

    func restoreDirectory(
        _ thenDir: Int32, _ nowDir: Int32, name: FileName, source: Entry, target: Entry?, path: String, device: dev_t, links: inout [ino_t: Link], report: inout RestoreReport
    ) throws {
        if let target, target.kind != .directory {
            report.actions.append("remove \(path) (a \(target.kind.rawValue) now, a directory in the snapshot)")
            if !dryRun, unlinkat(nowDir, name.cString, 0) != 0 { throw FileTreeError(path, call: "unlink") }
        }
        if target?.kind != .directory {
            report.actions.append("create directory \(path)")
            report.files += 1
            if dryRun || nowDir < 0 {
                // Nothing exists below: everything in the snapshot's directory is restored.
                let fd = try FS.openDirectory(thenDir, name, path: path)
                defer { close(fd) }
                for child in FS.names(fd) { try restoreEntry(fd, -1, name: child, path: path + "/" + child.display, device: device, links: &links, report: &report) }
                return
            }
            guard mkdirat(nowDir, name.cString, 0o700) == 0 else { throw FileTreeError(path, call: "mkdir") }
        }
        let thenFD = try FS.openDirectory(thenDir, name, path: path)
        defer { close(thenFD) }
        let nowFD = nowDir >= 0 ? try FS.openDirectory(nowDir, name, path: path) : -1
        defer { if nowFD >= 0 { close(nowFD) } }
        let names = Set(FS.names(thenFD)).union(nowFD >= 0 ? FS.names(nowFD) : []).sorted()
        for child in names where !child.hasPrefix(".guard-restore.\(tag).") {
            try restoreEntry(thenFD, nowFD, name: child, path: path + "/" + child.display, device: device, links: &links, report: &report)
        }
        if !dryRun && nowFD >= 0 {
            try copyAttributes(from: thenFD, source: source, to: nowFD, path: path)
            _ = fsync(nowFD)
        }
    }

    /// Removes an entry and, for a directory, everything below it on the same filesystem.
    func removeTree(_ directory: Int32, _ name: FileName, path: String, device: dev_t) throws {
        guard let entry = FS.lstat(directory, name) else { return }
        if entry.kind == .directory {
            guard entry.stat.st_dev == device else { throw FileTreeError(path, "is another filesystem mounted inside the volume; not removed") }
            let fd = try FS.openDirectory(directory, name, path: path)
            for child in FS.names(fd) { try removeTree(fd, child, path: path + "/" + child.display, device: device) }
            close(fd)
            guard unlinkat(directory, name.cString, AT_REMOVEDIR) == 0 else { throw FileTreeError(path, call: "rmdir") }
        } else {
            guard unlinkat(directory, name.cString, 0) == 0 else { throw FileTreeError(path, call: "unlink") }
        }
    }
}
