import ArgumentParser
import BlockDevice
import Engine
import Files
import Foundation
import Quantities
import Recipe

#if canImport(Glibc)
import Glibc
#endif

extension GuardCommand {
    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "diff",
            abstract: "What changed on a kept run's volumes since its snapshot: created, deleted, modified files.",
            discussion: """
                Mounts each snapshot read-only on a private mount point (ro, nodev, nosuid, noexec, no journal replay) and compares it with the mounted volume, under the volume's mount point or the paths given. Metadata is compared first (inode, ctime, mtime, size); contents are read only where it does not settle the question. The service keeps running on the volume.

                Each line: the change (created, deleted, modified, metadata), the path, its size then and now, and what changed in its metadata (mode, owner, xattrs; mtime with --times).

                --json prints {"volumes": [...]} (/usr/share/doc/guard/schema/diff.schema.json), one object per volume: volume, mount_point, changes (path, change, kind, size_before, size_after, details), with paths relative to mount_point.

                A name that is not UTF-8 is shown with each such byte as \\xNN (a backslash in it as \\\\); guard restore takes that form back.

                Refused for a run whose snapshots are not kept, and for an Invalid snapshot.

                Examples:
                  guard diff 12
                  guard diff 12 /srv/www/db --patch
                  guard diff --json 12 | jq '.volumes[].changes[] | select(.change == "deleted")'
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The run: its number or token.", valueName: "run"), completion: Completions.runs)
        var target: String

        @Argument(help: ArgumentHelp("Paths to compare (absolute, or relative to the volume's mount point); default: the whole volume.", valueName: "path"))
        var paths: [String] = []

        @Flag(help: "Print JSON.")
        var json = false

        @Flag(help: "Show a unified diff of each modified small text file (up to 256 KiB).")
        var patch = false

        @Flag(help: "Report files whose only change is their modification time.")
        var times = false

        func run() throws {
            let context = try global.context()
            let patches = PatchCollector()
            let collect: ((SnapshotFiles.View, FileChange, [UInt8]?, [UInt8]?) -> Void)? = patch && !json ? { patches.collect($0, $1, $2, $3) } : nil
            let volumes = try SnapshotFiles(context: context).diff(target, paths: paths, times: times, patch: collect)
            if json {
                try printJSON(["volumes": volumes])
                return
            }
            var total = 0
            for volume in volumes {
                for change in volume.changes {
                    total += 1
                    let path = volume.mountPoint == "/" ? "/" + change.path : volume.mountPoint + "/" + change.path
                    var sizes = ""
                    switch change.change {
                    case .created: sizes = change.sizeAfter.map { formatBytes(UInt64($0)) } ?? ""
                    case .deleted: sizes = change.sizeBefore.map { formatBytes(UInt64($0)) } ?? ""
                    case .modified, .metadata:
                        if change.kind == FileKind.file, let before = change.sizeBefore, let after = change.sizeAfter {
                            sizes = before == after ? formatBytes(UInt64(after)) : "\(formatBytes(UInt64(before))) -> \(formatBytes(UInt64(after)))"
                        }
                    }
                    let kind = change.kind == FileKind.file ? "" : " (\(change.kind.rawValue))"
                    let details = change.details.isEmpty ? "" : "  [" + change.details.joined(separator: ", ") + "]"
                    say("\(change.change.rawValue.padding(toLength: 9, withPad: " ", startingAt: 0)) \(path)\(kind)\(sizes.isEmpty ? "" : "  \(sizes)")\(details)")
                    if let text = patches.text[path] { say(text) }
                }
            }
            if total == 0 { context.reporter.note("no differences") }
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restore",
            abstract: "Copy files back from a kept run's snapshot, leaving everything else as it is.",
            discussion: """
                For when one file or directory is wrong and the rest of the night's writes must stay (a whole-volume rollback is `guard rollback`). Each path is copied back from the snapshot, mounted read-only on a private mount point, with its mode, owner, times, extended attributes and ACLs; symlinks stay symlinks (never followed), hard links within the restored set stay linked, sparse files stay sparse. Every file is written beside its target, fsynced and renamed over it: a reader sees the old file or the restored one, never a mix. Missing parent directories are recreated from the snapshot.

                An SQLite database is restored with its companions (-journal, -wal, -shm) as one instant: the current ones are removed first, then the database and the snapshot's companions are put back, so that SQLite never replays a log from another instant into it. A file that a process has open for writing is refused, naming the process, before anything is touched: stop it first (or give --force). Readers do not stop a restore.

                Files created after the snapshot under a restored directory are kept unless --delete is given. Paths outside the volume, `..` and symlinks in a path are refused before anything is touched. Each restore is journaled (who, when, which paths, how many files and bytes) and shown by `guard show RUN`.

                Refused for a run whose snapshots are not kept, and for an Invalid snapshot.

                Examples:
                  guard restore 12 /srv/www/db/site.sqlite
                  guard restore --dry-run 12 /srv/www/uploads
                  guard restore --delete 12 /srv/www/cache
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: ArgumentHelp("The run: its number or token.", valueName: "run"), completion: Completions.runs)
        var target: String

        @Argument(help: ArgumentHelp("Paths to restore (absolute, or relative to the volume's mount point).", valueName: "path"))
        var paths: [String]

        @Flag(name: .customLong("dry-run"), help: "Say what would be restored; touch nothing.")
        var dryRun = false

        @Flag(name: .customLong("delete"), help: "Also remove what was created after the snapshot under the restored paths.")
        var deleteCreated = false

        @Flag(help: "Replace files that a process has open for writing (refused otherwise: its later writes would go to the old file and be lost).")
        var force = false

        @Flag(help: "Print the report as JSON (actions, kept, files, bytes, removed).")
        var json = false

        func run() throws {
            let context = try global.context()
            let report = try SnapshotFiles(context: context).restore(target, paths: paths, deleteCreated: deleteCreated, dryRun: dryRun, force: force)
            if json {
                try printJSON(report)
                return
            }
            for action in report.actions {
                if dryRun { say("would " + action) } else if global.verbose || !action.hasPrefix("restore ") { say(action) }
            }
            let summary = "\(report.files) entries, \(formatBytes(UInt64(max(report.bytes, 0))))" + (report.removed > 0 ? ", \(report.removed) removed" : "")
            context.reporter.note(dryRun ? "dry run: would restore \(summary); nothing was touched" : "restored \(summary) from run \(target)'s snapshot")
            if !report.kept.isEmpty && !dryRun {
                context.reporter.note("kept \(report.kept.count) path(s) created after the snapshot (--delete removes them)")
            }
        }
    }
}

/// Unified diffs of modified small text files, made with diff(1) while the snapshot is mounted.
final class PatchCollector: @unchecked Sendable {
    // @unchecked: filled synchronously on the command's thread, read after.
    var text: [String: String] = [:]

    /// Both sides come as bytes read by the engine (through descriptors, never a path that a
    /// symlink could redirect); `diff -u` reads them from a private directory of guard's own.
    func collect(_ view: SnapshotFiles.View, _ change: FileChange, _ then: [UInt8]?, _ now: [UInt8]?) {
        let shown = view.mountPoint == "/" ? "/" + change.path : view.mountPoint + "/" + change.path
        guard let a = then, let b = now, !a.contains(0), !b.contains(0) else {
            text[shown] = "    (not shown: binary or larger than 256 KiB)"
            return
        }
        var template = Array((NSTemporaryDirectory() + "guard-patch-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { return }
        let directory = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let before = directory + "/then"
        let after = directory + "/now"
        guard FileManager.default.createFile(atPath: before, contents: Data(a)), FileManager.default.createFile(atPath: after, contents: Data(b)) else { return }
        let arguments = ["-u", "--label", "then:" + shown, "--label", "now:" + shown, before, after]
        guard let finished = try? Spawn.run("/usr/bin/diff", arguments, stderr: .discarded) else { return }
        text[shown] = String(decoding: finished.output, as: UTF8.self).trimmingCharacters(in: .newlines)
    }
}
