import BlockDevice
import DeviceMapper
import Files
import Foundation
import Journal
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// File-level access to a kept run's snapshots: `guard diff` and `guard restore`.
/// Each snapshot is mounted read-only on a private mount point in the state directory
/// (mode 0700, no propagation, nodev,nosuid,noexec, no journal replay), for as long as the
/// command runs, while the service keeps running on the volume.
public struct SnapshotFiles {
    public let context: GuardContext

    public init(context: GuardContext) { self.context = context }

    /// Where private views are mounted.
    var viewsDirectory: String { context.stateDirectory + "/views" }

    /// One volume of the run: its snapshot mounted read-only, and the volume's mount point.
    public struct View: Sendable {
        public var volume: String
        public var mountPoint: String
        public var snapshotRoot: String
    }

    /// A volume's differences, for `guard diff`.
    public struct VolumeChanges: Sendable, Encodable {
        public var volume: String
        public var mountPoint: String
        public var changes: [FileChange]

        enum CodingKeys: String, CodingKey {
            case volume, changes
            case mountPoint = "mount_point"
        }
    }

    // MARK: guard diff

    /// - Parameter patch: called for each modified file with both sides' bytes (nil for a side
    ///   larger than `patchLimit` or not readable as a regular file), read without following symlinks.
    public func diff(
        _ reference: String, paths: [String], times: Bool, patchLimit: Int = 256 << 10, patch: ((View, FileChange, [UInt8]?, [UInt8]?) -> Void)? = nil
    ) throws -> [VolumeChanges] {
        try withViews(reference) { run, views in
            var result: [VolumeChanges] = []
            let wanted = try assign(paths, to: views)
            for (index, view) in views.enumerated() {
                let relatives = paths.isEmpty ? [""] : wanted[index]
                guard !relatives.isEmpty else { continue }
                let differ = TreeDiff(then: view.snapshotRoot, now: view.mountPoint, times: times)
                var changes: [FileChange] = []
                for relative in relatives { changes += try differ.changes(under: relative) }
                changes.sort { $0.path < $1.path }
                if let patch {
                    for change in changes where change.change == .modified && change.kind == .file {
                        let (before, after) = try differ.contents(of: change.path, limit: patchLimit)
                        patch(view, change, before, after)
                    }
                }
                result.append(VolumeChanges(volume: view.volume, mountPoint: view.mountPoint, changes: changes))
            }
            return result
        }
    }

    // MARK: guard restore

    /// - Parameter force: replace files that processes have open for writing (else refused,
    ///   naming them, before anything is touched).
    public func restore(_ reference: String, paths: [String], deleteCreated: Bool, dryRun: Bool, force: Bool = false) throws -> RestoreReport {
        guard !paths.isEmpty else { throw GuardFailure(.refused, "name the paths to restore (`guard diff RUN` lists what changed)") }
        return try withViews(reference) { run, views in
            let wanted = try assign(paths, to: views)
            let journal = try context.journal()
            // Who writes which file on the volumes, once, before the dry run that checks it.
            let writers = force ? nil : OpenFiles.writers(on: Set(views.compactMap { Mounts.entry(at: $0.mountPoint)?.device }))
            func restoreAll(dryRun: Bool, into report: inout RestoreReport) throws {
                for (index, view) in views.enumerated() where !wanted[index].isEmpty {
                    let restorer = TreeRestore(
                        then: view.snapshotRoot, now: view.mountPoint, deleteCreated: deleteCreated, dryRun: dryRun, tag: run.token, writers: writers)
                    try restorer.restore(wanted[index], into: &report)
                }
            }
            // A dry run first: every path is checked (no `..`, no symlink on the way, nothing
            // outside the volume) before the first file is touched.
            var preview = RestoreReport()
            do {
                try restoreAll(dryRun: true, into: &preview)
            } catch {
                throw GuardFailure(.refused, "\(error); nothing was touched")
            }
            if dryRun { return preview }
            var record = try journal.insert(
                RestoreRecord(runID: run.id!, startedAt: context.now().timeIntervalSince1970, user: context.userName, paths: paths, deleteCreated: deleteCreated))
            var report = RestoreReport()
            func close(_ status: String, _ detail: String?) throws {
                record.status = status
                record.finishedAt = context.now().timeIntervalSince1970
                record.files = report.files
                record.bytes = report.bytes
                record.removed = report.removed
                record.detail = detail
                try journal.update(record)
            }
            do {
                try restoreAll(dryRun: false, into: &report)
            } catch {
                try? close("failed", "\(error)")
                throw GuardFailure(
                    .attention,
                    "restore from run \(run.id!) stopped at \(error); what was restored before it is in place (every file whole), the rest is unchanged; see `guard show \(run.id!)`"
                )
            }
            try close("done", report.kept.isEmpty ? nil : "kept (created after the snapshot): " + report.kept.joined(separator: ", "))
            return report
        }
    }

    // MARK: Views

    /// Which relative paths of `paths` fall on which view: absolute paths go to the volume
    /// whose mount point holds them; relative paths need a run of one volume.
    func assign(_ paths: [String], to views: [View]) throws -> [[String]] {
        var result = Array(repeating: [String](), count: views.count)
        for path in paths {
            if path.split(separator: "/").contains("..") {
                throw GuardFailure(.refused, "\(path): `..` is not allowed; give the path inside the volume; nothing was touched")
            }
            var index = 0
            if path.hasPrefix("/") {
                let candidates = views.enumerated().filter { Mounts.isPath(Mounts.normalize(path), under: $0.element.mountPoint) }
                guard let best = candidates.max(by: { $0.element.mountPoint.count < $1.element.mountPoint.count }) else {
                    let where_ = views.map(\.mountPoint).joined(separator: ", ")
                    throw GuardFailure(.refused, "\(path) is not on a volume of this run (mounted at \(where_)); nothing was touched")
                }
                index = best.offset
            } else if views.count != 1 {
                throw GuardFailure(.refused, "\(path): the run has \(views.count) volumes; give an absolute path (under \(views.map(\.mountPoint).joined(separator: " or ")))")
            }
            do {
                result[index].append(try VolumePath.relative(path, root: views[index].mountPoint))
            } catch {
                throw GuardFailure(.refused, "\(error); nothing was touched")
            }
        }
        return result
    }

    /// Mounts the kept run's snapshots read-only for the duration of `body`.
    func withViews<T>(_ reference: String, _ body: (RunRecord, [View]) throws -> T) throws -> T {
        let journal = try context.journal()
        let maintenance = Maintenance(context: context)
        let run = try maintenance.requireRun(reference, journal: journal)
        guard run.state == .kept else {
            let why = maintenance.refusal(run, "look into") ?? "its snapshots are not kept"
            throw GuardFailure(.refused, "run \(run.id!) has no kept snapshot to read: \(why)")
        }
        let records = try journal.snapshots(runID: run.id!)
        let locks = try maintenance.lock(records, runID: run.id!)
        defer { locks.forEach { $0.release() } }
        let engine = try context.engine()
        // A snapshot another tool took out of the write path would serve a mix of old and new blocks.
        _ = try maintenance.requireNotStale(run, "read (diff or restore)", journal: journal, engine: engine)
        let stacks = try maintenance.stacks(records)
        var views: [View] = []
        defer { for view in views { Self.release(view.snapshotRoot) } }
        try FileManager.default.createDirectory(atPath: viewsDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        chmod(viewsDirectory, 0o700)
        // Views are mounted under a private parent only: they never reach another namespace.
        do { try Mounts.makePrivateMountPoint(viewsDirectory) } catch {
            throw GuardFailure(
                .attention, "cannot make \(viewsDirectory) a private mount point, so the snapshot's views would show in other mount namespaces: \(error); nothing was mounted")
        }
        for (record, stack) in zip(records, stacks) {
            let health = try engine.health(stack)
            guard health.isRestorable else {
                throw GuardFailure(
                    .attention,
                    "the snapshot of \(record.volume) is \(health.status) (its COW filled up or failed): its old data is gone, so nothing can be read or restored from it")
            }
            guard let origin = try engine.dm.info(stack.originRef) else {
                throw GuardFailure(.attention, "the volume \(record.volume) is not active; activate it and run `guard recover`")
            }
            let mounts = Mounts.mountPoints(of: origin.number).filter { $0.root == "/" }
            guard let mount = mounts.first(where: { $0.target == record.mountPoint }) ?? mounts.first else {
                throw GuardFailure(.refused, "\(record.volume) is not mounted; mount it (guard compares the snapshot with the mounted volume) and try again")
            }
            let target = viewsDirectory + "/\(run.token)-\(record.volumeIndex)"
            Self.release(target)
            try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            do {
                try Mounts.mount(source: stack.snapPath, target: target, fileSystemType: mount.fileSystemType, options: Self.readOnlyOptions(mount.fileSystemType))
            } catch {
                throw GuardFailure(.attention, "cannot mount the snapshot of \(record.volume) read-only: \(error)")
            }
            views.append(View(volume: record.volume, mountPoint: mount.target, snapshotRoot: target))
        }
        return try body(run, views)
    }

    /// Options that cannot write to the snapshot: ext3/4 skip their journal replay, XFS its
    /// log recovery (and its UUID check: the snapshot has the volume's UUID).
    static func readOnlyOptions(_ type: String) -> String {
        switch type {
        case "ext3", "ext4": return "ro,nodev,nosuid,noexec,noload"
        case "xfs": return "ro,nodev,nosuid,noexec,norecovery,nouuid"
        default: return "ro,nodev,nosuid,noexec"
        }
    }

    static func release(_ target: String) {
        if Mounts.entry(at: target) != nil { try? Mounts.unmount(target) }
        rmdir(target)
    }

    /// Unmounts the views of a run that a killed `guard diff`/`restore` left behind (they
    /// keep the snapshot open, which would stop a commit or rollback). The caller holds the
    /// run's volume locks, so no live diff or restore uses them.
    public static func releaseStale(stateDirectory: String, token: String) {
        let directory = stateDirectory + "/views"
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasPrefix(token + "-") {
            release(directory + "/" + name)
        }
    }
}
