import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Recipe
import Snapshot

/// Merging a run's snapshots back: stop hooks, unmount, merge, remount, start hooks.
/// The volumes show the old data from the moment the merge starts, so they are mounted
/// again at once and the services started while the kernel copies chunks back.
struct RollbackProcedure {
    let context: GuardContext
    let journal: Journal
    let engine: SnapshotEngine
    var reporter: any Reporter { context.reporter }

    func timestamp() -> Double { context.now().timeIntervalSince1970 }

    /// Refuses the rollback of `runID` when one of its snapshots can no longer be merged (the
    /// kernel marked it Invalid: its COW filled up or failed): journals `rollback-impossible`
    /// and marks the snapshot invalid, so that nothing is stopped or unmounted for it.
    func requireRestorable(runID: Int64, records: [SnapshotRecord], stacks: [SnapshotStack]) throws {
        for (record, stack) in zip(records, stacks) {
            let health = try engine.health(stack)
            guard !health.isRestorable else { continue }
            try journal.event(runID, .error, JournalEvents.rollbackImpossible, "\(record.volume): \(health.status)", at: timestamp())
            var updated = record
            updated.state = .invalid
            try journal.update(updated)
            throw GuardFailure(
                .attention,
                "rollback of run \(runID) is impossible: the snapshot of \(record.volume) is \(health.status) (its COW filled up or failed), so its old data is gone; the volume keeps the upgraded data; restore it from a backup if that data is bad"
            )
        }
    }

    /// - Parameters:
    ///   - wait: wait for the merges to complete and tear them down; otherwise return once
    ///     the volumes are mounted again (the next guard command finishes the teardown).
    /// - Throws: `GuardFailure` with `.attention` when the rollback is impossible (an Invalid
    ///   snapshot: nothing is stopped or unmounted) or could not start (a busy mount: the
    ///   services are started again and the snapshots stay kept).
    ///   - beforeMerge: called once the volumes are unmounted, before the first merge (the run
    ///     stops its COW watcher there: it fuses until then, and suspends nothing after).
    func perform(run: RunRecord, records: [SnapshotRecord], live: consuming LiveSnapshotSet, recipe: Recipe?, wait: Bool, beforeMerge: () -> Void = {}) async throws {
        let runID = run.id!
        let stacks = live.stacks
        // The watchdog process starts while the hooks run and the volumes are unmounted.
        (engine.watchdog as? ProcessWatchdog)?.start()
        SnapshotFiles.releaseStale(stateDirectory: context.stateDirectory, token: run.token)
        // Refuse before stopping anything when a snapshot can no longer be merged.
        try requireRestorable(runID: runID, records: records, stacks: stacks)
        var run = run
        run.decision = .rollback
        let decided = run
        let phase = try journal.batch {
            try journal.update(decided)
            let phase = try journal.beginPhase(runID, "rollback", at: timestamp())
            try journal.event(runID, .intent, "rollback", records.map(\.volume).joined(separator: ", "), at: timestamp())
            return phase
        }
        let runner = StepRunner(onOutput: { [reporter] in reporter.stepOutput($0) })
        let hooks = recipe.map { ($0.rollbackStop, $0.rollbackStart, $0.environment) } ?? ([], [], [:])

        /// The rollback did not start (no merge began): the services are started again, the
        /// decision is taken back and the run is kept, so that nothing (recovery, the next boot,
        /// the keep expiry) carries out or blocks on a rollback the admin was told did not happen.
        func notStarted(_ error: any Error, _ what: String) async throws -> GuardFailure {
            await startHooks(hooks, runner: runner, runID: runID, token: run.token)
            try Self.takeBack(runID: runID, journal: journal, phase: phase, reason: "\(error)", at: timestamp())
            return GuardFailure(.attention, "rollback of run \(runID) did not start: \(error); nothing was merged, the run stays kept with its snapshots\(what)")
        }

        await stopHooks(hooks, runner: runner, runID: runID, token: run.token)

        // What the run's steps left running (a daemon, a writer that double-forked or called
        // setsid, the steps of a guard that died) must not write after the merge: kill the
        // run's cgroup, whatever the stop hooks left of it.
        if let cgroup = RunCgroup.of(token: run.token) {
            let killed = await cgroup.killAll()
            if killed > 0 {
                reporter.note("killed \(killed) process\(killed == 1 ? "" : "es") the run's steps left running")
                try journal.event(runID, .result, "kill-cgroup", "\(killed) process(es) in \(cgroup.path)", at: timestamp())
            }
        }

        // Unmount every mount of the origins and everything mounted inside them, deepest first;
        // on a busy mount put back what was unmounted.
        var unmounted: [MountEntry] = []
        let origins = Set(try stacks.compactMap { try engine.dm.info($0.originRef)?.number })
        let mounts: [MountEntry]
        do { mounts = try Self.mountsToUnmount(origins: origins, table: Mounts.current()) } catch {
            throw try await notStarted(error, "; `guard rollback \(runID)` tries again")
        }
        // The unmounts are journaled together once done (results, not decisions: recovery
        // does not read them).
        func journalUnmounts() throws {
            guard !unmounted.isEmpty else { return }
            let when = timestamp()
            try journal.batch { for mount in unmounted { try journal.event(runID, .result, "unmount", mount.target, at: when) } }
        }
        for mount in mounts {
            do {
                try Mounts.unmount(mount.target)
                unmounted.append(mount)
            } catch {
                try? journalUnmounts()
                remountAll(unmounted, origins: origins)
                throw try await notStarted(error, "; stop what uses \(mount.target) (rollback.stop in the recipe) and run `guard rollback \(runID)`")
            }
        }

        try journalUnmounts()

        // Merge: from here on the volumes read as before the run. udev's work on the merging
        // origins (a probe of each, which competes with the merge's copying) is waited for
        // once the volumes are mounted again and the start hooks ran: the device nodes are
        // there all along. The batch waits when it goes, on every path out of here.
        beforeMerge()
        let udev = UdevBatch()
        do {
            _ = try live.startMerges(udev: udev) { index in
                var updated = records[index]
                updated.state = .merging
                try journal.update(updated)
            }
        } catch let failure {
            let error = failure.underlying
            let merging = failure.merging
            let started = records.prefix(merging.count).map(\.volume)
            let left = records.dropFirst(merging.count).map(\.volume)
            try? journal.event(runID, .error, "merge", "\(left.first ?? "?"): \(error)", at: timestamp())
            remountAll(unmounted, origins: origins)
            guard !merging.isEmpty else {
                throw try await notStarted(error, ": fix that and run `guard rollback \(runID)`")
            }
            await startHooks(hooks, runner: runner, runID: runID, token: run.token)
            try? journal.endPhase(phase, status: .failed, detail: "\(error)", at: timestamp())
            // The decision stands and is journaled: `guard recover` rolls back what is left.
            run.state = .merging
            try? journal.update(run)
            throw GuardFailure(
                .attention,
                "rollback of run \(runID) is incomplete: \(left.joined(separator: ", ")) \(left.count == 1 ? "is" : "are") NOT rolled back (\(error)) and still hold\(left.count == 1 ? "s" : "") the upgraded data, with \(left.count == 1 ? "its snapshot" : "their snapshots") live; \(started.joined(separator: ", ")) \(started.count == 1 ? "is" : "are") merging back; fix that and run `guard recover`, which rolls the rest back"
            )
        }
        // Each merge is journaled as it starts (above): the volumes go back to the service
        // first, then the run's state is written, in one transaction.
        remountAll(unmounted, origins: origins)
        run = try journal.run(id: runID) ?? run
        run.state = .merging
        run.outcome = .rolledBack
        let merged = run
        try journal.batch {
            try journal.update(merged)
            try journal.event(runID, .result, "merge-started", nil, at: timestamp())
        }
        await startHooks(hooks, runner: runner, runID: runID, token: run.token)
        // Thin snapshots have nothing to merge: the run is over as soon as the swaps are.
        let allThin = stacks.allSatisfy { $0.thin != nil }
        reporter.note(
            allThin
                ? "the volumes are back to their state before run \(runID) (their thin snapshots, nothing to merge) and mounted again"
                : "the volumes are back to their state before run \(runID) and mounted again; the kernel merges in the background")
        try journal.endPhase(phase, status: .done, detail: allThin ? "swapped to the thin snapshots" : "merge started", at: timestamp())
        udev.finish()

        if wait || allThin {
            try await Maintenance(context: context).waitForMerges(runID: runID, journal: journal, engine: engine)
        }
    }

    /// Takes back the decision of a rollback that did not start (no merge began): the run is
    /// kept, its decision `keep`, and the journal says why (`rollback-not-started`), in one
    /// transaction. A run whose rollback is scheduled for a boot is not passed here.
    static func takeBack(runID: Int64, journal: Journal, phase: PhaseRecord?, reason: String, at now: Double) throws {
        try journal.batch {
            guard var run = try journal.run(id: runID) else { return }
            run.decision = .keep
            run.state = .kept
            try journal.update(run)
            try journal.event(runID, .result, JournalEvents.rollbackNotStarted, "\(reason); nothing was merged; the decision is taken back and the run stays kept", at: now)
            let open = try phase.map { [$0] } ?? journal.phases(runID: runID).filter { $0.name == "rollback" && $0.status == .started }
            for phase in open { try journal.endPhase(phase, status: .failed, detail: reason, at: now) }
        }
    }

    /// Restarts a merge the kernel stopped on an I/O error (fixed since): the volume is
    /// unmounted around the restart (the rollback's stop and start hooks run around it), as the
    /// restart briefly gives the origin an `error` table.
    func restartMerge(run: RunRecord, record snapshot: SnapshotRecord, stack: SnapshotStack, recipe: Recipe?) async throws {
        let runID = run.id!
        let runner = StepRunner(onOutput: { [reporter] in reporter.stepOutput($0) })
        let hooks = recipe.map { ($0.rollbackStop, $0.rollbackStart, $0.environment) } ?? ([], [], [:])
        let origins = Set([try engine.dm.info(stack.originRef)?.number].compactMap { $0 })
        let mounts = try Self.mountsToUnmount(origins: origins, table: Mounts.current())
        if !mounts.isEmpty { await stopHooks(hooks, runner: runner, runID: runID, token: run.token) }
        var unmounted: [MountEntry] = []
        defer { remountAll(unmounted, origins: origins) }
        for mount in mounts {
            try Mounts.unmount(mount.target)
            unmounted.append(mount)
        }
        try journal.event(runID, .intent, "restart-merge", snapshot.volume, at: timestamp())
        // The kernel reports this merge failed: it is merging, and only a merging set restarts.
        try MergingSnapshotSet.attach([stack], engine: engine).restart(stack)
        try journal.event(runID, .result, "merge-restarted", snapshot.volume, at: timestamp())
        if !mounts.isEmpty { await startHooks(hooks, runner: runner, runID: runID, token: run.token) }
    }

    /// What a rollback unmounts: every mount of `origins` and every mount inside one of them
    /// (another filesystem mounted in the volume would keep it busy), deepest first, the
    /// later of two mounts stacked on one place first.
    /// - Throws: `GuardFailure` for a filesystem without a device mounted inside a volume (a
    ///   tmpfs): unmounting it would lose what it holds; nothing is unmounted.
    ///   Inside means on top of a mount of an origin in the mount tree (mountinfo's parent ids):
    ///   a mount hidden under a later one on the same place (another namespace's view, a mount
    ///   shadowed by a tmpfs) is not inside, though its path is.
    static func mountsToUnmount(origins: Set<DeviceNumber>, table: [MountEntry]) throws -> [MountEntry] {
        let roots = table.filter { origins.contains($0.device) }
        let byID = Dictionary(table.compactMap { entry in entry.id.map { ($0, entry) } }, uniquingKeysWith: { first, _ in first })
        func descends(_ entry: MountEntry, from root: MountEntry) -> Bool {
            guard let rootID = root.id, var parent = entry.parentID else { return Mounts.isPath(entry.target, under: root.target) }
            if entry.id == rootID { return true }
            var seen: Set<Int32> = []
            while seen.insert(parent).inserted {
                if parent == rootID { return true }
                guard let next = byID[parent]?.parentID else { return false }
                parent = next
            }
            return false
        }
        let inside = table.enumerated().filter { _, entry in roots.contains { descends(entry, from: $0) } }
        if let (_, virtual) = inside.first(where: { !origins.contains($0.element.device) && $0.element.device.major == 0 }) {
            throw GuardFailure(
                .attention,
                "\(virtual.target) (\(virtual.fileSystemType)) is mounted inside a volume being rolled back; unmounting it would lose what it holds; unmount it first (rollback.stop in the recipe)"
            )
        }
        func depth(_ path: String) -> Int { path.split(separator: "/").count }
        return inside.sorted { (depth($0.element.target), $0.offset) > (depth($1.element.target), $1.offset) }.map(\.element)
    }

    /// Mounts again what a rollback unmounted, parents before children: each filesystem by its
    /// device, type and options; each bind mount as a bind of the same subtree; each only
    /// where its mount point is still the directory it was (a symlink put in its place since
    /// the unmount is refused, with a warning).
    func remountAll(_ unmounted: [MountEntry], origins: Set<DeviceNumber>) {
        var mounted: [MountEntry] = []
        for entry in unmounted.reversed() {
            guard Mounts.isUnchangedMountPoint(entry.target) else {
                reporter.warning(
                    "did not mount \(entry.source) on \(entry.target) again: the mount point changed since it was unmounted (a symbolic link or something else is there now); check it, then mount it by hand"
                )
                continue
            }
            let device = origins.contains(entry.device) ? BlockDevices.deviceMapperName(of: entry.device).map { "/dev/mapper/\($0)" } ?? entry.source : entry.source
            do {
                if entry.root == "/" {
                    try mount(entry, device: device)
                } else {
                    try bind(entry, device: device, from: mounted)
                }
                mounted.append(entry)
            } catch {
                reporter.warning("could not mount \(device) on \(entry.target) again: \(error); mount it by hand")
            }
        }
    }

    /// Mounts `entry`'s filesystem with its type and options; without the options if they are refused.
    func mount(_ entry: MountEntry, device: String) throws {
        do {
            try Mounts.mount(source: device, target: entry.target, fileSystemType: entry.fileSystemType, options: entry.options)
        } catch {
            try Mounts.mount(source: device, target: entry.target, fileSystemType: entry.fileSystemType)
            reporter.warning("mounted \(device) on \(entry.target) without its options \(entry.options): \(error)")
        }
    }

    /// A bind mount of a subtree: bound from a mount of the whole filesystem made again before
    /// it, or from one mounted for the moment on a private directory of guard's.
    func bind(_ entry: MountEntry, device: String, from mounted: [MountEntry]) throws {
        let readOnly = entry.options.split(separator: ",").contains("ro")
        if let whole = mounted.first(where: { $0.device == entry.device && $0.root == "/" }) {
            try Mounts.bind(whole.target + entry.root, on: entry.target, readOnly: readOnly)
            return
        }
        let views = context.stateDirectory + "/views"
        try FileManager.default.createDirectory(atPath: views, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try Mounts.makePrivateMountPoint(views)
        let scratch = views + "/remount-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
        defer { SnapshotFiles.release(scratch) }
        try Mounts.mount(source: device, target: scratch, fileSystemType: entry.fileSystemType)
        try Mounts.bind(scratch + entry.root, on: entry.target, readOnly: readOnly)
    }

    func stopHooks(_ hooks: ([Command], [Command], [String: String]), runner: StepRunner, runID: Int64, token: String) async {
        await runHooks(hooks.0, kind: "rollback-stop", environment: hooks.2, runner: runner, runID: runID, token: token)
    }

    func startHooks(_ hooks: ([Command], [Command], [String: String]), runner: StepRunner, runID: Int64, token: String) async {
        await runHooks(hooks.1, kind: "rollback-start", environment: hooks.2, runner: runner, runID: runID, token: token, warnOnFailure: true)
    }

    /// Runs the rollback's stop or start commands, reporting and journaling each. The stop
    /// hooks run in the run's cgroup (killed with it after them); the start hooks start the
    /// services again for good, outside it.
    func runHooks(_ commands: [Command], kind: String, environment: [String: String], runner: StepRunner, runID: Int64, token: String, warnOnFailure: Bool = false) async {
        for (index, command) in commands.enumerated() {
            reporter.stepStarted(kind: kind, index: index, count: commands.count, name: command.name)
            let cgroup = kind == "rollback-stop" ? try? RunCgroup.of(token: token)?.child("\(kind)-\(index + 1)") : nil
            let result = await runner.run(
                command, environment: StepRunner.environment(recipe: environment, command: command.environment, run: ["GUARD_RUN_ID": "\(runID)", "GUARD_PHASE": "rollback"]),
                timeout: command.timeout, cgroup: cgroup)
            reporter.stepFinished(kind: kind, result: result)
            try? record(result, kind: kind, index: index, runID: runID)
            if warnOnFailure && !result.succeeded { reporter.warning("rollback.start '\(command.name)' \(result.termination)") }
            if kind == "rollback-stop" && !result.succeeded {
                // Said, and journaled, with what comes next: the merge restores every block of the
                // snapshot's instant whatever the service wrote, but only once nothing holds the volume.
                let next =
                    "guard goes on: it kills what the run's steps left running, then unmounts the volumes; a process that still holds them stops the rollback before anything is merged"
                reporter.warning("rollback.stop '\(command.name)' \(result.termination); \(next)")
                try? journal.event(runID, .warning, "rollback-stop-failed", "'\(command.name)' \(result.termination); \(next)", at: timestamp())
            }
        }
    }

    func record(_ result: StepResult, kind: String, index: Int, runID: Int64) throws {
        let step = StepRecord(runID: runID, kind: kind, position: index, name: result.name, argv: result.argv, startedAt: timestamp() - result.duration)
        _ = try journal.insert(step.finished(result))
    }
}
