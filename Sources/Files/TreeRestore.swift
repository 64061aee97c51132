import BlockDevice
import Foundation

#if canImport(Glibc)
import Glibc
#endif

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
    /// The files on the volume that processes have open for writing (`OpenFiles.writers`):
    /// replacing or removing one of them is refused, naming the processes. nil: not checked
    /// (--force). Readers are no reason to refuse: they read the old file until they open
    /// the name again.
    public var writers: [FileIdentity: [ProcessHolder]]?

    public init(then: String, now: String, deleteCreated: Bool, dryRun: Bool, tag: String, writers: [FileIdentity: [ProcessHolder]]? = nil) {
        self.then = then
        self.now = now
        self.deleteCreated = deleteCreated
        self.dryRun = dryRun
        self.tag = tag
        self.writers = writers
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
        // A database before its companions (sorted), which then come with it, not again.
        var restoredWith: Set<String> = []
        for relative in paths.sorted() where !restoredWith.contains(relative) {
            if relative.isEmpty {
                throw FileTreeError(now, "restoring the whole volume file by file is not what restore is for; use `guard rollback RUN` (a merge) or name the paths")
            }
            let (thenParent, nowParent, name) = try openParents(relative, thenRoot: thenRoot, nowRoot: nowRoot, device: device, report: &report)
            defer {
                close(thenParent)
                if nowParent >= 0 { close(nowParent) }
            }
            let companions = try restoreWithCompanions(thenParent, nowParent, name: name, path: relative, device: device, links: &links, report: &report)
            restoredWith.formUnion(companions)
        }
    }

    /// SQLite's files beside a database (its rollback journal, write-ahead log and shared
    /// memory index), which belong to one instant of it.
    static let sqliteCompanionSuffixes = ["-journal", "-wal", "-shm"]

    /// Restores an entry; for an SQLite database (by its header in the snapshot) with its
    /// companions as one instant: first the current companions go (a reader never pairs the
    /// restored database with the current log, which SQLite would replay into it), then the
    /// database, then the snapshot's companions. Returns the companions' paths.
    @discardableResult
    func restoreWithCompanions(
        _ thenDir: Int32, _ nowDir: Int32, name: FileName, path: String, device: dev_t, links: inout [ino_t: Link], report: inout RestoreReport
    ) throws -> [String] {
        guard Self.isSQLiteDatabase(thenDir, name) else {
            try restoreEntry(thenDir, nowDir, name: name, path: path, device: device, links: &links, report: &report)
            return []
        }
        let companions = Self.sqliteCompanionSuffixes.map { (FileName(bytes: name.bytes + Array($0.utf8)), path + $0, $0) }
        for (companion, companionPath, suffix) in companions where nowDir >= 0 {
            guard let current = FS.lstat(nowDir, companion), current.kind == .file else { continue }
            try requireClosed(current, path: companionPath)
            if FS.lstat(thenDir, companion) == nil {
                report.actions.append("remove \(companionPath) (the current database's \(suffix.dropFirst()); the snapshot's \(path) has none)")
                report.removed += 1
            }
            if !dryRun, unlinkat(nowDir, companion.cString, 0) != 0, errno != ENOENT { throw FileTreeError(companionPath, call: "unlink") }
        }
        try restoreEntry(thenDir, nowDir, name: name, path: path, device: device, links: &links, report: &report)
        for (companion, companionPath, _) in companions where FS.lstat(thenDir, companion) != nil {
            try restoreEntry(thenDir, nowDir, name: companion, path: companionPath, device: device, links: &links, report: &report)
        }
        return companions.map { $0.1 }
    }

    /// Whether the snapshot's file starts with SQLite's header ("SQLite format 3" and a NUL).
    static func isSQLiteDatabase(_ directory: Int32, _ name: FileName) -> Bool {
        guard FS.lstat(directory, name)?.kind == .file else { return false }
        let fd = openat(directory, name.cString, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: 16)
        return pread(fd, &header, 16, 0) == 16 && header == Array("SQLite format 3".utf8) + [0]
    }

    /// Refuses to replace or remove a file a process has open for writing: the process would
    /// go on writing into the old file, unseen and lost (a database into its old pages), or,
    /// for a database's log, into one its restored database does not match.
    func requireClosed(_ target: Entry, path: String) throws {
        guard let writers, target.kind == .file,
            let holders = writers[FileIdentity(device: DeviceNumber(target.stat.st_dev), inode: UInt64(target.stat.st_ino))]
        else { return }
        throw FileTreeError(
            path,
            "is open for writing by \(holders.map(\.description).joined(separator: ", ")): replaced under it, the program would go on writing into the old file, and those writes would be lost; stop it first (or restore with --force)"
        )
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
        // What is replaced or removed must not be written to meanwhile; what is kept may be.
        if let target, source != nil || deleteCreated { try requireClosed(target, path: path) }
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
        var restoredWith: Set<String> = []
        for child in names where !child.hasPrefix(".guard-restore.\(tag).") {
            let childPath = path + "/" + child.display
            guard !restoredWith.contains(childPath) else { continue }
            restoredWith.formUnion(try restoreWithCompanions(thenFD, nowFD, name: child, path: childPath, device: device, links: &links, report: &report))
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
