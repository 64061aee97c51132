import Foundation
import Testing

@testable import Engine

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
}
