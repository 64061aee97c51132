import BlockDevice
import Foundation
import Testing

@testable import Engine
@testable import Files

#if canImport(Glibc)
import Glibc
#endif

/// The diff and restore logic on two ordinary directories ("then" stands in for a mounted
/// snapshot); the kernel suite proves it on a real snapshot.
@Suite("file tree diff and restore")
struct FileTreeTests {
    let base: String
    var then: String { base + "/then" }
    var now: String { base + "/now" }

    init() throws {
        base = NSTemporaryDirectory() + "guard-tree-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: base + "/then/dir", withIntermediateDirectories: true)
    }

    func write(_ path: String, _ text: String) throws {
        try text.write(toFile: path, atomically: false, encoding: .utf8)
    }

    /// "then" with a few entries; "now" is a copy with the same inodes' metadata where it
    /// matters (cp -a), then changed.
    func makeTrees() throws {
        try write(then + "/same", "same\n")
        try write(then + "/changed", "v1\n")
        try write(then + "/gone", "bye\n")
        try write(then + "/dir/inner", "inner\n")
        try FileManager.default.createSymbolicLink(atPath: then + "/link", withDestinationPath: "/etc/passwd")
        #expect(system("cp -a '\(then)' '\(now)'") == 0)
        try write(now + "/changed", "v2\n")
        try FileManager.default.removeItem(atPath: now + "/gone")
        try write(now + "/dir/new", "new\n")
        chmod(now + "/same", 0o600)
    }

    @Test("diff lists created, deleted, modified and metadata-only changes, sorted")
    func diff() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        try makeTrees()
        let changes = try TreeDiff(then: then, now: now, times: false).changes(under: "")
        let summary = changes.map { "\($0.change.rawValue) \($0.path)" }
        #expect(summary == ["modified changed", "created dir/new", "deleted gone", "metadata same"], "\(summary)")
        #expect(changes.last?.details.first?.hasPrefix("mode 644 -> 600") == true || changes.last?.details.first?.contains("-> 600") == true)
        let under = try TreeDiff(then: then, now: now, times: false).changes(under: "dir")
        #expect(under.map(\.path) == ["dir/new"])
    }

    @Test("restore copies content, mode and times back, keeps new files unless asked, and refuses escapes")
    func restore() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        try makeTrees()
        var report = RestoreReport()
        try TreeRestore(then: then, now: now, deleteCreated: false, dryRun: false, tag: "t").restore(["changed", "gone", "dir", "same"], into: &report)
        #expect(try String(contentsOfFile: now + "/changed", encoding: .utf8) == "v1\n")
        #expect(try String(contentsOfFile: now + "/gone", encoding: .utf8) == "bye\n")
        #expect(FileManager.default.fileExists(atPath: now + "/dir/new"), "kept without deleteCreated")
        #expect(report.kept == ["dir/new"])
        let changes = try TreeDiff(then: then, now: now, times: true).changes(under: "")
        #expect(changes.map(\.path) == ["dir/new"], "only the kept new file differs: \(changes)")

        var second = RestoreReport()
        try TreeRestore(then: then, now: now, deleteCreated: true, dryRun: false, tag: "t").restore(["dir"], into: &second)
        #expect(!FileManager.default.fileExists(atPath: now + "/dir/new"))
        #expect(second.removed == 1)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: now).filter { $0.hasPrefix(".guard-restore") }
        #expect(leftovers.isEmpty)

        #expect(throws: FileTreeError.self) { try VolumePath.relative("../../etc/passwd", root: "/srv") }
        #expect(throws: FileTreeError.self) { try VolumePath.relative("/etc/passwd", root: "/srv") }
        #expect(try VolumePath.relative("/srv/www/./db", root: "/srv") == "www/db")
        #expect(throws: FileTreeError.self) {
            var report = RestoreReport()
            try TreeRestore(then: then, now: now, deleteCreated: false, dryRun: true, tag: "t").restore(["link/x"], into: &report)
        }
    }

    /// An SQLite header followed by `text`: what guard recognizes a database by.
    func writeDatabase(_ path: String, _ text: String) throws {
        try (Data("SQLite format 3".utf8) + Data([0]) + Data(text.utf8)).write(to: URL(fileURLWithPath: path))
    }

    func read(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

    @Test(
        "an SQLite database comes back with its companions as one instant, named or inside a directory: the snapshot's -wal, and the current -shm removed (never left beside the restored database)"
    )
    func sqliteCompanions() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        for directory in [then, then + "/dir"] {
            try writeDatabase(directory + "/db", "pages-then")
            try write(directory + "/db-wal", "log-then")
        }
        #expect(system("cp -a '\(then)' '\(now)'") == 0)
        for directory in [now, now + "/dir"] {
            try writeDatabase(directory + "/db", "pages-now")
            try write(directory + "/db-wal", "log-now")
            try write(directory + "/db-shm", "index-now")
        }
        var report = RestoreReport()
        try TreeRestore(then: then, now: now, deleteCreated: false, dryRun: false, tag: "t").restore(["db", "db-wal", "dir"], into: &report)
        for directory in [now, now + "/dir"] {
            #expect(read(directory + "/db")?.hasSuffix("pages-then") == true)
            #expect(read(directory + "/db-wal") == "log-then")
            #expect(!FileManager.default.fileExists(atPath: directory + "/db-shm"), "the current index is gone with the current log")
        }
        #expect(report.actions.contains { $0.hasPrefix("remove db-shm (the current database's shm") }, "\(report.actions)")
        #expect(report.actions.contains { $0.hasPrefix("remove dir/db-shm") }, "\(report.actions)")
        #expect(report.actions.filter { $0.hasPrefix("restore db-wal") }.count == 1, "named too, restored once: \(report.actions)")
        #expect(report.kept.isEmpty, "a companion is never kept as created after the snapshot: \(report.kept)")
        #expect(report.removed == 2)
    }

    @Test("a file a process has open for writing is refused before anything is touched, naming the process; a reader is not a writer, and with no check (--force) it is replaced")
    func writerRefused() throws {
        defer { try? FileManager.default.removeItem(atPath: base) }
        try makeTrees()
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/sh")
        writer.arguments = ["-c", "exec 3<>\"$1\" 4<\"$2\"; exec sleep 60", "sh", now + "/changed", now + "/same"]
        try writer.run()
        defer {
            writer.terminate()
            writer.waitUntilExit()
        }
        func identity(_ path: String) -> FileIdentity {
            var info = stat()
            #expect(stat(path, &info) == 0)
            return FileIdentity(device: DeviceNumber(info.st_dev), inode: UInt64(info.st_ino))
        }
        let (changed, same) = (identity(now + "/changed"), identity(now + "/same"))
        var writers: [FileIdentity: [ProcessHolder]] = [:]
        for _ in 0..<100 {
            writers = OpenFiles.writers(on: [changed.device])
            if writers[changed]?.first?.command == "sleep" { break }
            usleep(50_000)
        }
        #expect(writers[changed]?.map(\.pid) == [writer.processIdentifier], "the file opened for writing")
        #expect(writers[same] == nil, "a file opened for reading only")
        var report = RestoreReport()
        let refusal = #expect(throws: FileTreeError.self) {
            try TreeRestore(then: then, now: now, deleteCreated: false, dryRun: true, tag: "t", writers: writers).restore(["same", "changed"], into: &report)
        }
        #expect(refusal.map { "\($0)" }?.contains("changed: is open for writing by pid \(writer.processIdentifier) (sleep)") == true, "\(String(describing: refusal))")
        #expect(read(now + "/changed") == "v2\n")
        report = RestoreReport()
        try TreeRestore(then: then, now: now, deleteCreated: false, dryRun: false, tag: "t", writers: writers).restore(["same"], into: &report)
        try TreeRestore(then: then, now: now, deleteCreated: false, dryRun: false, tag: "t", writers: nil).restore(["changed"], into: &report)
        #expect(read(now + "/changed") == "v1\n")
    }
}

/// Names (and symlink targets) that are not UTF-8, as Latin-1 systems and old archives leave
/// them: listed by diff in a form that shows every byte, and restored byte for byte.
@Suite("file names that are not UTF-8")
struct NonUTF8NameTests {
    let base = NSTemporaryDirectory() + "guard-bytes-\(UInt32.random(in: 0...UInt32.max))"

    /// Runs `script` in `base` with bash's $'...' quoting for the raw bytes.
    func shell(_ script: String) {
        #expect(system("cd '\(base)' && bash -c \(shellQuote(script))") == 0, "\(script)")
    }

    func shellQuote(_ text: String) -> String { "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'" }

    /// The bytes of the names `ls` sees in `directory` (Foundation would decode them lossily).
    func rawNames(_ directory: String) -> [[UInt8]] {
        let fd = open(directory, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        return FS.names(fd).map(\.bytes)
    }

    @Test("a Latin-1 file, a directory and a symlink target: diff shows \\xNN, restore by that name and by the parent puts the same bytes back")
    func nonUTF8() throws {
        try FileManager.default.createDirectory(atPath: base + "/then", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        // café (Latin-1 é = 0xE9), a directory r\xE9pertoire with a file, a symlink to \xFF, a name with a backslash.
        shell(
            """
            printf v1 > then/$'caf\\xe9'; mkdir then/$'r\\xe9pertoire'; printf inner > then/$'r\\xe9pertoire'/$'f\\xfc'
            ln -s $'target\\xff' then/link; printf back > then/$'back\\\\slash\\xe9'
            cp -a then now
            printf v2 > now/$'caf\\xe9'; rm -r now/$'r\\xe9pertoire'; rm now/link; ln -s elsewhere now/link; rm now/$'back\\\\slash\\xe9'
            """)
        let changes = try TreeDiff(then: base + "/then", now: base + "/now", times: false).changes(under: "")
        let summary = changes.map { "\($0.change.rawValue) \($0.path)" }
        #expect(
            summary == [
                "deleted back\\\\slash\\xE9", "modified caf\\xE9", "modified link", "deleted r\\xE9pertoire", "deleted r\\xE9pertoire/f\\xFC",
            ], "\(summary)")

        // Restored by the names diff printed: the file, then the directory (with its file) and the symlink.
        var report = RestoreReport()
        try TreeRestore(then: base + "/then", now: base + "/now", deleteCreated: false, dryRun: false, tag: "t")
            .restore(["caf\\xE9", "r\\xE9pertoire", "link", "back\\\\slash\\xE9"], into: &report)
        #expect(rawNames(base + "/now").sorted { $0.lexicographicallyPrecedes($1) } == rawNames(base + "/then").sorted { $0.lexicographicallyPrecedes($1) })
        shell(
            """
            [ "$(cat now/$'caf\\xe9')" = v1 ] && [ "$(cat now/$'r\\xe9pertoire'/$'f\\xfc')" = inner ] && [ "$(readlink now/link)" = $'target\\xff' ] && [ "$(cat now/$'back\\\\slash\\xe9')" = back ]
            """)
        #expect(try TreeDiff(then: base + "/then", now: base + "/now", times: false).changes(under: "").isEmpty)
        #expect(report.actions.contains("restore caf\\xE9 (file, 2 bytes)"), "\(report.actions)")
    }

    @Test("the display form reads back to the same bytes; a UTF-8 name is shown as it is, escapes and all")
    func displayRoundTrip() {
        for bytes: [UInt8] in [[0x63, 0x61, 0x66, 0xE9], [0xFF], [0x5C, 0xE9], [0xC3], [0x61, 0x5C, 0x78, 0x34, 0x31, 0x80]] {
            let name = FileName(bytes: bytes)
            #expect(FileName.parsing(name.display)?.bytes == bytes, "\(name.display)")
        }
        #expect(FileName("caf\u{E9}").display == "caf\u{E9}")
        #expect(FileName("a\\xE9").display == "a\\xE9", "a UTF-8 name is its own display")
        #expect(FileName.parsing("a\\x41") == nil, "escapes that spell UTF-8 are not a non-UTF-8 name")
        #expect(FileName.parsing("plain") == nil)
    }
}
