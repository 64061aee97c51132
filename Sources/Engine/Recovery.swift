import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// `guard recover`: brings the kernel, the COW labels and the journal back into agreement
/// after guard was killed or the machine went down. Idempotent.
public struct Recovery {
    public let context: GuardContext
    /// Go on without a run's rollback hooks when its journaled recipe does not parse
    /// (`guard recover --without-hooks`); refused otherwise.
    public var withoutHooks = false
    /// Only the runs with a snapshot of this volume (its device-mapper UUID): guard-hold@.service,
    /// when a volume guard's udev rule holds appears after the boot units (`--device`).
    public var onlyOrigin: String?
    /// The markers of the volumes guard's udev rule holds at boot.
    public var holds = VolumeHolds()
    var reporter: any Reporter { context.reporter }

    public init(context: GuardContext) { self.context = context }

    func timestamp() -> Double { context.now().timeIntervalSince1970 }

    /// Runs marked running whose guard process is gone (their volume locks are free), and runs
    /// waiting for reassembly.
    public func unfinishedRuns(journal: Journal) throws -> [RunRecord] {
        try journal.runs(in: [.running, .needsReassembly]).filter { run in
            let records = (try? journal.snapshots(runID: run.id!)) ?? []
            if records.isEmpty { return kill(run.pid, 0) != 0 }
            return records.allSatisfy { !VolumeLock.isHeld(directory: context.lockDirectory, key: $0.originUUID.isEmpty ? $0.originName : $0.originUUID) }
        }
    }

    /// What recovery did, one line per action.
    public struct Report: Sendable {
        public var actions: [String] = []
        public var problems: [String] = []
        /// Snapshots that hold old blocks and are not live: kept; what to mount or activate.
        public var needsReassembly: [String] = []
    }

    /// Recovers everything it can.
    /// - Parameter boot: early boot, before local filesystems are mounted: reassemble
    ///   snapshots from their COW labels, merge back undecided runs at once (nothing is
    ///   mounted yet), run no hooks.
    /// - Parameter initramfs: in the initramfs (guard's local-premount script), before the root is
    ///   mounted: an origin that is not there is left for guard-reassemble.service (the
    ///   initramfs activates the logical volumes; anything else comes later), not waited for.
    ///
    /// The initramfs handles only the runs of / and /usr (and, without a journal, COW devices:
    /// a COW file there would keep the state volume busy); everything else is the boot unit's,
    /// which, after a successful initramfs, leaves those runs alone. Nothing about another run
    /// makes the initramfs fail, so nothing but / and /usr can stop the boot.
    public func recover(boot: Bool = false, initramfs: Bool = false) async throws -> Report {
        var report = Report()
        if boot && !initramfs && onlyOrigin == nil, initramfsDidTheWork(marker: BootSupport.marker, report: &report) { return report }
        if boot && !FileManager.default.fileExists(atPath: context.stateDirectory) {
            if let late = Mounts.unmountedFileSystem(holding: context.stateDirectory), BootSupport.lateUnitConfigured {
                report.actions.append(
                    "the state directory \(context.stateDirectory) is on \(late), which is mounted after this unit: guard-reassemble-late.service reassembles once it is, before the other filesystems are mounted"
                )
            } else if let late = Mounts.unmountedFileSystem(holding: context.stateDirectory) {
                report.needsReassembly.append(
                    "the state directory \(context.stateDirectory) is on \(late), which is not mounted yet; mount \(late), then run `guard recover`; nothing was touched")
            } else {
                report.actions.append(
                    "the state directory \(context.stateDirectory) does not exist: guard has nothing to reassemble (if it is on a filesystem mounted later, run `guard recover` once it is)"
                )
            }
            return report
        }
        do {
            try context.prepareStateDirectory(creatingCowDirectory: false)
        } catch let failure as GuardFailure where failure.kind == .needsReassembly {
            report.needsReassembly.append(failure.message)
            return report
        }
        let dm = try context.dm()
        let engine = try context.engine()

        // Guard volumes first: snapshots are stacked on them. One that cannot be activated
        // (its backing file is missing) is reported; the others are activated all the same.
        // Not in the initramfs: a guard volume backs onto a file or device of the running system,
        // and a thin one needs thin_check; the boot unit activates them.
        let volumes = GuardVolumes(dm: dm, stateDirectory: context.stateDirectory)
        for (volume, info) in try volumes.list() where info == nil && !initramfs {
            do {
                try volumes.activate(volume)
                report.actions.append("activated guard volume \(volume.name)")
            } catch {
                report.problems.append("guard volume \(volume.name) cannot be activated: \(error); its snapshots stay as they are until it is")
            }
        }

        // Reassembly from COW labels (after a reboot the kernel has none of guard's devices).
        // A journal that cannot be opened (corrupt, or migrated by a newer guard) leaves the
        // labels: what they hold is reassembled, and the runs wait for a journal guard can read.
        var journalProblem: String?
        let journal: Journal?
        do {
            journal = try context.journal()
        } catch {
            journal = nil
            journalProblem = "\(error)"
        }
        let scope = RecoveryScope(
            journal: journal, initramfs: initramfs, afterInitramfs: boot && !initramfs && onlyOrigin == nil && BootSupport.initramfsStatus() == "0", origin: onlyOrigin)
        let files = cowFiles()
        // Runs whose merge this recovery resumed: their guard died mid-merge, recovery finishes it.
        var resumedMerges: Set<String> = []
        // The boot unit waits for the COW devices the journal names, 30 s in all, instead of
        // `udevadm settle` (which waits for every device of the machine, and is deprecated).
        // The initramfs does not: its own scripts settle udev, and only / and /usr are its.
        let deviceDeadline = ContinuousClock.now + .seconds(30)
        for storage in files + journaledStorages(journal, besides: files) {
            if boot && !initramfs, case .blockDevice(let path) = storage {
                _ = try await Self.poll(until: deviceDeadline, every: .milliseconds(250)) { Self.deviceReady(path) }
                if !FileManager.default.fileExists(atPath: path) {
                    report.problems.append("the COW device \(path) did not appear within 30 s of the boot unit's start; nothing is removed: attach it, then run `guard recover`")
                    continue
                }
            }
            let label: CowLabel
            do {
                guard let read = try CowLabel.read(from: storage.path) else { continue }
                label = read
            } catch {
                report.problems.append("the label of \(storage.path) cannot be read (\(error)); it is kept and nothing is reassembled from it")
                continue
            }
            if let onlyOrigin, label.originUUID != onlyOrigin { continue }
            if try dm.info(.uuid(label.identity.uuid(.real))) != nil || dm.info(.uuid(label.identity.uuid(.cow))) != nil { continue }
            guard scope.includes(label.runToken, storage: storage) else {
                if initramfs { report.actions.append("left \(storage.path) for guard-reassemble.service: its volume \(label.originName) is not / or /usr") }
                continue
            }
            if initramfs, try dm.info(label.originRef) == nil {
                report.actions.append("left \(storage.path) for guard-reassemble.service: its volume \(label.originName) is not in the initramfs")
                continue
            }
            if boot && [.active, .kept, .merging].contains(label.state) {
                // A volume guard's udev rule holds is reassembled when it appears (guard-hold@.service).
                if try dm.info(label.originRef) == nil && holds.isHeld(uuid: label.originUUID) {
                    report.actions.append(
                        "left \(storage.path) until \(label.originName) is activated: udev keeps it from being mounted until guard-hold@.service has stacked its snapshot")
                    continue
                }
                try await waitForOrigin(label, dm: dm, report: &report)
            }
            do {
                let result = try engine.reassemble(storage)
                switch result {
                case .reassembled(let stack, let merging):
                    if merging { resumedMerges.insert(stack.identity.runToken) }
                    report.actions.append(
                        merging ? "resumed the merge into \(stack.originName) from \(storage.path)" : "reassembled the snapshot of \(stack.originName) from \(storage.path)")
                case .alreadyLive: break
                case .discarded(let why): report.actions.append("removed \(storage.path): \(why)")
                case .kept(let why): report.problems.append(why)
                }
            } catch {
                report.problems.append("reassembly from \(storage.path): \(error)")
            }
        }

        guard let journal else {
            report.problems.append(
                "\(journalProblem ?? "the journal \(context.journalPath) cannot be opened"); snapshots were reassembled from their labels only, and their runs wait until `guard recover` can read the journal"
            )
            return report
        }
        // Anything a crash left suspended is resumed first: nothing may stay frozen.
        for run in try journal.runs(in: RunState.open) where scope.includes(run.token) {
            let records = try journal.snapshots(runID: run.id!)
            // A run another guard process holds may be inside its own suspend window: its
            // devices are its to resume, in its order.
            guard let locks = try? Maintenance(context: context).lock(records, runID: run.id!) else { continue }
            defer { locks.forEach { $0.release() } }
            for record in records {
                guard let stack = decodeStack(record.stack) else { continue }
                for name in (try? engine.resumeSuspended(stack)) ?? [] {
                    report.actions.append("resumed \(name), left suspended by run \(run.id!)")
                }
            }
        }
        // Origins another tool took out of their snapshot's write path (lvm2 reloads): stale
        // from then on, recorded before anything acts on their runs.
        for finding in try OriginWatch(context: context, journal: journal, engine: engine).sweep(where: { scope.includes($0.token) }) {
            report.problems.append("run \(finding.runID): \(finding.text)")
        }
        // What the durable records say of each open run, before anything acts on it.
        let dead = Set(try unfinishedRuns(journal: journal).compactMap(\.id))
        for run in try journal.runs(in: [.running, .kept, .merging, .needsReassembly]) where (run.state != .running || dead.contains(run.id!)) && scope.includes(run.token) {
            switch try classify(run, journal: journal, engine: engine) {
            case .needsReassembly(let reasons) where boot && awaitsHeldVolumes(run, journal: journal, engine: engine):
                report.actions += reasons.map { "run \(run.id!) waits for its volume to be activated (udev holds it until guard-hold@.service stacks its snapshot): \($0)" }
            case .needsReassembly(let reasons):
                report.needsReassembly += reasons.map { "run \(run.id!): \($0)" }
            case .stale(let reasons):
                if let bypass = OriginWatch.recorded(journal, runID: run.id!) {
                    let line = "run \(run.id!): \(bypass)"
                    if !report.problems.contains(line) { report.problems.append(line) }
                } else {
                    report.problems += reasons.map { "run \(run.id!): \($0); `guard commit \(run.id!)` discards the COW and keeps the volume as it is" }
                }
            case .ready:
                break
            }
        }
        // Stale runs wait for the admin's `guard commit`: said every time, as `guard status` does.
        for run in try journal.runs(in: [.stale]) where scope.includes(run.token) {
            let line =
                "run \(run.id!): "
                + (OriginWatch.recorded(journal, runID: run.id!)
                    ?? "its snapshot is stale (its volume was written while the snapshot was not live); `guard commit \(run.id!)` discards the COW and keeps the volume as it is")
            if !report.problems.contains(where: { $0.hasPrefix("run \(run.id!):") }) { report.problems.append(line) }
        }
        // A kept thin snapshot survives a reboot in its pool; its read-only view (for diff and
        // restore) does not: made again.
        for run in try journal.runs(in: [.kept]) where !initramfs && scope.includes(run.token) {
            for stack in try journal.snapshots(runID: run.id!).compactMap({ decodeStack($0.stack) }) where stack.thin != nil {
                if try engine.restoreThinView(stack) { report.actions.append("made the view of run \(run.id!)'s thin snapshot of \(stack.originName) again") }
            }
        }
        for run in try unfinishedRuns(journal: journal) where run.state == .running && scope.includes(run.token) {
            do {
                report.actions.append(try await recover(run, journal: journal, engine: engine, boot: boot))
            } catch {
                report.problems.append("run \(run.id!): \(error)")
            }
        }
        // Rollbacks of volumes the initramfs mounts (/, /usr), journaled by `guard rollback` (or
        // by a failed boot assessment) for this boot: merged now, before anything mounts them.
        // This boot counts for the runs awaiting their checks after boot; one that used up its
        // boots without reaching them is rolled back here too.
        if boot && onlyOrigin == nil {
            do {
                report.actions += try BootAssessment.countBoot(journal: journal, at: timestamp()) { scope.includes($0.token) }
            } catch {
                report.problems.append("the boot assessment's count of this boot: \(error)")
            }
        }
        // Kept runs with a rollback decided. A boot carries out only those scheduled for a boot
        // (`rollback-at-boot`: a rollback of / or /usr, a failed boot assessment); a rollback
        // decided on the running system that began no merge (guard stopped between its decision
        // and its first merge) is taken back: the admin was never told it happened, and days of
        // writes they chose to keep must not be merged away at some later boot.
        for run in try journal.runs(in: [.kept]) where run.decision == .rollback && scope.includes(run.token) {
            do {
                if let action = try await decidedRollback(run, journal: journal, engine: engine, boot: boot) { report.actions.append(action) }
            } catch {
                report.problems.append("run \(run.id!): \(error)")
            }
        }
        // A rollback whose guard died mid-merge (its merge resumed above from the COW): recovery
        // finishes it, so it is recorded as recovered, whatever instant the power went (before or
        // after that guard had journaled the merge's start).
        for run in try journal.runs(in: [.merging]) where resumedMerges.contains(run.token) && run.outcome != .recovered && scope.includes(run.token) {
            var updated = run
            updated.outcome = .recovered
            let what = "rolled back (the merge, interrupted by a restart, resumed from the COW; the volumes read as before the run)"
            updated.error = [run.error, "recovered: \(what)"].compactMap { $0 }.joined(separator: "; ")
            try journal.update(updated)
            try journal.event(run.id!, .result, "recover", what, at: timestamp())
            report.actions.append("run \(run.id!): \(what)")
        }
        // Rollbacks that started for some volumes only: the decision is journaled; roll the rest back.
        for run in try journal.runs(in: [.merging]) where try scope.includes(run.token) && journal.snapshots(runID: run.id!).contains(where: { $0.state == .live }) {
            do {
                report.actions.append(try await recover(run, journal: journal, engine: engine, boot: boot))
            } catch {
                report.problems.append("run \(run.id!): \(error)")
            }
        }
        // Rollbacks whose merge the kernel stopped (an I/O error since fixed): start them again.
        for run in try journal.runs(in: [.merging]) where scope.includes(run.token) {
            let records = try journal.snapshots(runID: run.id!)
            guard let locks = try? Maintenance(context: context).lock(records, runID: run.id!) else { continue }
            defer { locks.forEach { $0.release() } }
            for record in records where record.state == .merging {
                guard let stack = decodeStack(record.stack), case .failed? = try? engine.mergeState(stack) else { continue }
                do {
                    let recipe = try run.journaledRecipe(withoutHooks: withoutHooks || boot, verb: "restarted")
                    try await RollbackProcedure(context: context, journal: journal, engine: engine).restartMerge(run: run, record: record, stack: stack, recipe: recipe)
                    report.actions.append("run \(run.id!): restarted the merge into \(record.volume)")
                } catch {
                    report.problems.append("run \(run.id!): the merge into \(record.volume) cannot restart: \(error)")
                }
            }
            if !boot {
                do {
                    try await Maintenance(context: context).waitForMerges(runID: run.id!, journal: journal, engine: engine)
                    report.actions.append("run \(run.id!): the rollback's merge is complete and torn down")
                } catch {
                    report.problems.append("run \(run.id!): \(error)")
                }
            }
        }
        if boot && !initramfs && onlyOrigin == nil { BootSupport.markReassembled(at: timestamp()) }
        // Volumes guard's udev rule held are ready once their snapshots are live again.
        if !initramfs {
            do {
                report.actions += try holds.reconcile(journal: journal, engine: engine)
            } catch {
                report.problems.append("the markers of the volumes held at boot (\(holds.heldDirectory)): \(error)")
            }
        }
        if !boot {
            try? Maintenance(context: context).tidy(journal: journal)
            let strays = try removeStrays(journal: journal, engine: engine)
            report.actions += strays.actions
            report.problems += strays.problems
        }
        return report
    }
}
