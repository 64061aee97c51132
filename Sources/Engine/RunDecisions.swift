import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

extension RunBody {
    // MARK: Decisions

    mutating func commit(live: consuming LiveSnapshotSet) -> RunReport {
        reporter.phase("commit", run: runID)
        run.decision = .commit
        DecisionReserve.releaseIfLow(stateDirectory: context.stateDirectory)
        let phase: PhaseRecord
        do {
            phase = try journal.batch {
                try journal.update(run)
                let phase = try journal.beginPhase(runID, "commit", at: timestamp())
                try journal.event(runID, .intent, "commit", nil, at: timestamp())
                return phase
            }
        } catch {
            // Nothing is dropped without its intent in the journal; the upgrade stays, and the
            // labels say kept, which recovery reads as the run's decision.
            let unmarked = live.keep().unmarked
            let labels = unmarked.isEmpty ? "their COW labels say kept" : "\(unmarked.count) COW label(s) could not be marked kept"
            return journalUnwritable(
                error,
                "the upgrade is in place and nothing was committed: the snapshots are live and \(labels); once the journal is writable, `guard recover` records the run as kept, then `guard commit \(runID)` makes it final"
            )
        }
        CrashPoint.hit(.runBeforeCommit)
        switch live.commit() {
        case .committed:
            CrashPoint.hit(.runAfterCommit)
            try? journal.setSnapshotState(runID: runID, .committed)
            try? journal.endPhase(phase, status: .done, at: timestamp())
            return finish(outcome: .committed, exit: .success, state: .finished, error: nil, message: "run \(runID) committed: the upgrade is final")
        case .incomplete(let stillLive, let error):
            // The run is kept: the snapshots still live say so in their labels too (a reboot
            // reassembles them as a kept run's), and `guard commit` finishes the drop.
            let volumes = stillLive.stacks.map(\.originPath)
            for (stack, labelError) in stillLive.keep().unmarked {
                reporter.warning("could not mark the snapshot of \(stack.originName) as kept in its COW label: \(labelError)")
            }
            try? journal.endPhase(phase, status: .failed, detail: "\(error)", at: timestamp())
            let live = volumes.isEmpty ? "" : "; the snapshots of \(volumes.joined(separator: ", ")) are live and kept"
            return finish(
                outcome: .kept, exit: .attention, state: .kept, error: "the commit did not complete: \(error)",
                message: "run \(runID): the upgrade is applied but the commit did not complete (\(error))\(live); run `guard commit \(runID)` again")
        }
    }

    mutating func keep(live: consuming LiveSnapshotSet, until duration: Duration?, failure: String?) -> RunReport {
        reporter.phase("keep", run: runID)
        for (stack, error) in live.keep().unmarked {
            reporter.warning("could not mark the snapshot of \(stack.originName) as kept in its COW label: \(error)")
        }
        run.decision = .keep
        DecisionReserve.releaseIfLow(stateDirectory: context.stateDirectory)
        if let duration {
            run.keepUntil = timestamp() + Double(duration.components.seconds)
        }
        // Boot assessment: the checks after the reboot into the upgrade (BootAssessment).
        let assessing = failure == nil && !recipe.verifyAfterBoot.isEmpty
        do {
            let decided = run
            try journal.batch {
                try journal.update(decided)
                if assessing {
                    try journal.event(
                        runID, .intent, BootAssessment.pendingEvent,
                        "verify_after_boot: \(recipe.verifyAfterBoot.count) check(s) after the reboot, \(recipe.bootAttempts) boot(s) to reach them", at: timestamp())
                }
            }
        } catch {
            return journalUnwritable(
                error,
                "the upgrade is in place, the snapshots are live and their COW labels say kept; once the journal is writable, `guard recover` records the run as kept (`guard rollback \(runID)` and `guard commit \(runID)` then work)"
            )
        }
        let phase = try? journal.beginPhase(runID, "keep", at: timestamp())
        if let phase { try? journal.endPhase(phase, status: .done, detail: failure, at: timestamp()) }
        if let failure {
            return finish(
                outcome: .kept, exit: .attention, state: .kept, error: failure,
                message:
                    "run \(runID) failed (\(failure)); the recipe says keep: the volumes hold the failed upgrade and the snapshots are kept; `guard rollback \(runID)` restores them, `guard commit \(runID)` keeps the new state"
            )
        }
        let until = run.keepUntil.map { " until \(formatDate($0))" } ?? ""
        let assessment =
            assessing
            ? "; reboot into the upgrade: guard-assess.service runs its verify_after_boot checks after the boot, and a failure (or \(recipe.bootAttempts) boot(s) that do not reach them) rolls it back"
            : ""
        return finish(
            outcome: .kept, exit: .success, state: .kept, error: nil,
            message: "run \(runID) succeeded; the snapshots are kept\(until): `guard rollback \(runID)` undoes the upgrade, `guard commit \(runID)` makes it final\(assessment)")
    }

    /// - Parameter watcher: still watching: it fuses a COW that reaches stop_at while the stop
    ///   hooks run, and is stopped before the first suspend of the rollback.
    mutating func rollback(live: consuming LiveSnapshotSet, engine: SnapshotEngine, failure: String, watcher: CowWatcher) async -> RunReport {
        watcher.armFuse(volumes: Self.fusible(live.stacks, engine: engine))
        reporter.phase("rollback", run: runID)
        reporter.warning("\(failure); rolling back")
        let report = await rollingBack(live: live, engine: engine, failure: failure, watcher: watcher)
        recordWatch(watcher, stacks: watcher.stop())
        return report
    }

    mutating func rollingBack(live: consuming LiveSnapshotSet, engine: SnapshotEngine, failure: String, watcher: CowWatcher) async -> RunReport {
        let stacks = live.stacks
        run.decision = .rollback
        run.error = failure
        DecisionReserve.releaseIfLow(stateDirectory: context.stateDirectory)
        do { try journal.update(run) } catch {
            return journalUnwritable(error, "nothing was merged; the snapshots are live; run `guard recover` once the journal is writable")
        }
        // A snapshot the kernel invalidated holds nothing to go back to: say so, and release it.
        let invalid = stacks.filter { (try? engine.health($0).isRestorable) == false }
        if !invalid.isEmpty {
            watcher.stop()
            let which = invalid.map { "\($0.originPath) (\((try? engine.health($0).status.description) ?? "Invalid"))" }.joined(separator: ", ")
            do { try journal.event(runID, .error, JournalEvents.rollbackImpossible, which, at: timestamp()) } catch {
                return journalUnwritable(error, "the invalidated snapshots of \(which) are left as they are")
            }
            live.discard()
            try? journal.setSnapshotState(runID: runID, .invalid)
            return finish(
                outcome: .failed, exit: .attention, state: .finished, error: "\(failure); the snapshot of \(which) overflowed its COW, so a rollback is impossible",
                message:
                    "run \(runID) failed (\(failure)) and cannot be rolled back: the snapshot of \(which) was invalidated by the kernel when its COW filled up during the steps, so its old data is gone. The volumes hold the upgraded data (as the steps left it); restore from a backup if that data is bad, and give the recipe a larger snapshot size or an extend policy"
            )
        }
        // A volume the initramfs mounts (/, /usr) is never unmounted while the system runs: its
        // rollback is journaled for the next boot, whose initramfs merges it before mounting it.
        // No stop hook runs: nothing would follow it until the reboot.
        let maintenance = Maintenance(context: context)
        if let early = try? maintenance.earlyMount(of: stacks, engine: engine) {
            watcher.stop()
            do {
                let scheduled = try maintenance.scheduleBootRollback(
                    run, records: try journal.snapshots(runID: runID), stacks: stacks, mountedOn: early, journal: journal, engine: engine)
                _ = live.keep()
                return finish(
                    outcome: .failed, exit: .attention, state: .kept, error: failure,
                    message: "run \(runID) failed (\(failure)); \(early) is mounted, so it is rolled back at the next boot: \(scheduled)")
            } catch {
                let unmarked = live.keep().unmarked
                return finish(
                    outcome: .failed, exit: .attention, state: .kept, error: "\(failure); its rollback could not be scheduled: \(error)",
                    message:
                        "run \(runID) failed (\(failure)), and its rollback could not be scheduled for the next boot: \(error). The volumes hold what the steps left and the snapshots are kept\(unmarked.isEmpty ? "" : " (\(unmarked.count) label(s) not marked)"); fix that and run `guard rollback \(runID)`"
                )
            }
        }
        let procedure = RollbackProcedure(context: context, journal: journal, engine: engine)
        do {
            try await procedure.perform(run: run, records: try journal.snapshots(runID: runID), live: live, recipe: recipe, wait: true, beforeMerge: { watcher.stop() })
            run = (try? journal.run(id: runID)) ?? run
            return finish(
                outcome: .rolledBack, exit: .failedRestored, state: .finished, error: failure,
                message: "run \(runID) failed (\(failure)); the volumes were rolled back to their state before the run")
        } catch {
            // A refusal says what to do; any other error (an I/O error on the COW while the
            // merge was torn down) is for `guard recover`.
            let reason = (error as? GuardFailure)?.message ?? "\(error); run `guard recover`"
            run = (try? journal.run(id: runID)) ?? run
            let state: RunState = run.state == .merging ? .merging : .kept
            // The kernel's own status decides, not the message: an invalidated snapshot has nothing to merge.
            let invalidated = stacks.contains { (try? engine.health($0).isRestorable) == false }
            // Some volumes merging and some not is no rollback: the run stays open until `guard recover`.
            let unmerged = ((try? journal.snapshots(runID: runID)) ?? []).contains { $0.state == .live }
            let outcome: RunOutcome = state == .merging ? (unmerged ? .failed : .rolledBack) : (invalidated ? .failed : .kept)
            let fused = stacks.filter { (try? engine.isFused($0)) == true }.map(\.originPath)
            let fuse =
                fused.isEmpty || state == .merging
                ? ""
                : "; \(fused.joined(separator: ", ")) refuse\(fused.count == 1 ? "s" : "") writes (guard's fuse kept the snapshot valid) until `guard rollback \(runID)` or `guard commit \(runID)`"
            return finish(
                outcome: outcome, exit: .attention, state: state == .merging ? .merging : (outcome == .failed ? .finished : state), error: "\(failure); \(reason)",
                message: "run \(runID) failed (\(failure)) and the rollback did not complete: \(reason)\(fuse)")
        }
    }

    /// The volumes whose fuse may be armed: not / or /usr, which the running system cannot do
    /// without (a root that refuses writes stops the machine before the rollback at boot).
    static func fusible(_ stacks: [SnapshotStack], engine: SnapshotEngine) -> Set<Int> {
        let early = Set((try? Mounts.current())?.filter { Planner.earlyMountPoints.contains($0.target) }.map(\.device) ?? [])
        return Set(
            stacks.indices.filter { index in
                guard let number = try? engine.dm.info(stacks[index].originRef)?.number else { return true }
                return !early.contains(number)
            })
    }

    /// The origins of `stacks` whose table another tool replaced, by volume name; nil when none could be read.
    static func bypassed(_ stacks: [SnapshotStack], engine: SnapshotEngine) -> [String]? {
        stacks.compactMap { stack in
            if case .bypassed? = try? engine.routing(stack) { return stack.originName }
            return nil
        }
    }

    /// The end of a run one of whose snapshots another tool took out of the write path: no
    /// rollback is possible and nothing is released behind the admin's back. The run is stale
    /// until `guard commit` releases its snapshots.
    mutating func staleEnd(_ volumes: [String], failure: String?) -> RunReport {
        let why = OriginWatch.recorded(journal, runID: runID) ?? "the table of \(volumes.joined(separator: ", ")) was replaced by another tool during the run"
        return finish(
            outcome: .failed, exit: .attention, state: .stale, error: [failure, why].compactMap { $0 }.joined(separator: "; "),
            message: "run \(runID) cannot be rolled back: \(why). The volumes hold what the steps and the other tool left; restore from a backup if that is bad")
    }

    /// The end of a run whose journal cannot be written: the action it was about to take did
    /// not happen, and the report says what state the volumes are in.
    func journalUnwritable(_ error: any Error, _ state: String) -> RunReport {
        RunReport(
            runID: runID, token: run.token, outcome: .failed, exitCode: .attention,
            message: "run \(runID): the journal \(journal.path) cannot be written (\(error)), so guard stopped before its next action: \(state)")
    }

    /// Writes the run's end and returns its report.
    mutating func finish(outcome: RunOutcome, exit: ExitCode, state: RunState, error: String?, message: String? = nil) -> RunReport {
        run = (try? journal.run(id: runID)) ?? run
        run.outcome = outcome
        run.exitCode = Int(exit.rawValue)
        run.state = state
        if let error { run.error = error }
        if state == .finished || state == .kept { run.finishedAt = timestamp() }
        run.phase = "done"
        let ended = run
        do {
            try journal.batch {
                let done = try journal.beginPhase(runID, "done", at: timestamp())
                try journal.endPhase(done, status: .done, detail: outcome.rawValue, at: timestamp())
                try journal.update(ended)
            }
        } catch {
            try? journal.update(ended)  // the outcome, at least
        }
        cgroup?.removeIfEmpty()
        let text = message ?? "run \(runID): \(outcome.rawValue)" + (error.map { " (\($0))" } ?? "")
        return RunReport(runID: runID, token: run.token, outcome: outcome, exitCode: exit, message: text)
    }
}
