import BlockDevice
import Foundation

#if canImport(Glibc)
import Glibc
#endif

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
