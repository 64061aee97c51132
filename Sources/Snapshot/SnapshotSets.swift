import BlockDevice
import DeviceMapper

// The states of a run's snapshots, as types. A set is prepared (layers built, nothing
// suspended), then live (taken), then committed, kept or merging; a merging set finishes.
// The kernel-level steps (`drop` of a live stack, `startMerge`, `restartMerge`,
// `finishMerge`) are internal to this module: Engine reaches them only through these types,
// so a merge can start only from a live set, and only a merging set can restart or finish one.

/// Marks a ~Copyable value as finished, so its deinit knows a consuming method ran
/// (`discard self` needs trivially destroyed stored properties).
final class Completion {
    var done = false
}

/// A snapshot set whose layers are built and whose origins have `snapshot-origin` loaded
/// but not live. It must be taken (the suspend window) or abandoned; dropping it
/// without either (a bug) tears it down.
public struct PreparedSnapshotSet: ~Copyable {
    public let stacks: [SnapshotStack]
    let engine: SnapshotEngine
    let handles: [LoopHandle]
    /// The udev cookie of the layers' resumes, shared with the window and waited for after it.
    let udev: UdevBatch
    private let completion = Completion()

    init(engine: SnapshotEngine, stacks: [SnapshotStack], handles: [LoopHandle], udev: UdevBatch) {
        self.engine = engine
        self.stacks = stacks
        self.handles = handles
        self.udev = udev
    }

    /// Takes the snapshots: the critical window.
    /// - Returns: the live set; its `window` says when the origins were suspended and for how long.
    /// - Throws: after undoing everything, if the window failed.
    public consuming func take() throws -> LiveSnapshotSet {
        completion.done = true
        do {
            let window = try engine.take(stacks, udev: udev)
            handles.forEach { $0.release() }  // the -cow layers hold the loop devices now
            return LiveSnapshotSet(engine: engine, stacks: stacks, window: window)
        } catch {
            handles.forEach { $0.release() }
            for stack in stacks.reversed() { try? engine.drop(stack) }
            throw error
        }
    }

    /// Removes everything `prepare` built; no origin was ever suspended.
    public consuming func abandon() {
        completion.done = true
        udev.finish()
        handles.forEach { $0.release() }
        for stack in stacks.reversed() { try? engine.drop(stack) }
    }

    deinit {
        guard !completion.done else { return }
        udev.finish()
        handles.forEach { $0.release() }
        for stack in stacks.reversed() { try? engine.drop(stack) }
    }
}

/// Live snapshots of a set of volumes, from one instant. The ways out are commit (drop the
/// snapshots, keep the upgrade), rollback (merge them back) and keep (leave them for later).
/// Dropped without one of them (a bug), the snapshots stay live, which is safe:
/// `guard recover` and `guard status` find them by their GUARD- UUIDs.
public struct LiveSnapshotSet: ~Copyable {
    public let stacks: [SnapshotStack]
    /// When and how long the origins were suspended to take the set (`.none` for a set
    /// attached later).
    public let window: WindowTiming
    /// How long the origins were suspended to take the set (0 for a set attached later).
    public var suspendMicroseconds: UInt64 { window.microseconds }
    let engine: SnapshotEngine

    init(engine: SnapshotEngine, stacks: [SnapshotStack], window: WindowTiming = .none) {
        self.engine = engine
        self.stacks = stacks
        self.window = window
    }

    /// Re-attaches to snapshots taken earlier (a kept run, or the volumes of a run whose merge
    /// has not started), as the kernel has them now.
    /// - Throws: `.layerMissing` for a stack that is not live on its origin (or already merging):
    ///   nothing of the set is touched.
    public static func attach(_ stacks: [SnapshotStack], engine: SnapshotEngine) throws -> LiveSnapshotSet {
        for stack in stacks {
            let state = try engine.liveState(stack)
            if !state.live, try engine.dm.info(stack.originRef) == nil {
                throw SnapshotError(
                    .originNotFound, "snapshot of \(stack.originName)", "the origin \(stack.originName) (\(stack.originUUID)) is not active",
                    hint: "activate it (`lvchange -ay`, `guard volume activate`) and run `guard recover`")
            }
            guard state.live, !state.merging else {
                throw SnapshotError(
                    .layerMissing, "snapshot of \(stack.originName)",
                    state.merging ? "\(stack.originName) is already merging its snapshot back" : "\(stack.originName) has no live guard snapshot",
                    hint: "run `guard recover`")
            }
        }
        return LiveSnapshotSet(engine: engine, stacks: stacks)
    }

    /// Drops the snapshots; the volumes keep their current data. Stops at the first failure
    /// and hands back, as a set, the snapshots still live (the one that failed too, when it
    /// still is): the caller keeps them (`keep()`, labels kept) for `guard commit` to finish.
    public consuming func commit() -> CommitResult {
        for (index, stack) in stacks.enumerated() {
            do { try engine.drop(stack) } catch {
                let failedIsLive = (try? engine.liveState(stack).live) == true
                let left = Array(stacks[(failedIsLive ? index : index + 1)...])
                return .incomplete(stillLive: LiveSnapshotSet(engine: engine, stacks: left, window: window), error: error)
            }
        }
        return .committed
    }

    /// Drops every snapshot, going on past a failure, for a run whose journal holds the
    /// decision that their old blocks may go (a rollback found impossible).
    /// - Returns: the stacks that could not be dropped, with why.
    @discardableResult
    public consuming func discard() -> [(SnapshotStack, any Error)] {
        var failures: [(SnapshotStack, any Error)] = []
        for stack in stacks {
            do { try engine.drop(stack, discarding: true) } catch { failures.append((stack, error)) }
        }
        return failures
    }

    /// Leaves the snapshots in place for a later commit or rollback, their labels saying kept
    /// (a reboot reassembles them as snapshots).
    /// - Returns: the stacks, and those whose label could not be marked, with why.
    public consuming func keep() -> (stacks: [SnapshotStack], unmarked: [(SnapshotStack, any Error)]) {
        var unmarked: [(SnapshotStack, any Error)] = []
        for stack in stacks {
            do { try engine.mark(stack, .kept) } catch { unmarked.append((stack, error)) }
        }
        return (stacks, unmarked)
    }

    /// Starts merging the snapshots back, one volume after another (each unmounted). From the
    /// moment a merge starts its volume reads as before the run.
    /// - Parameters:
    ///   - udev: a batch for every start's udev events that the caller waits for (after it has
    ///     mounted the volumes again); nil: each start waits for its own.
    ///   - started: runs after each start (the journal's record of it); its failure stops the
    ///     starts like a failed merge.
    /// - Throws: `MergeStartFailure`, with the stacks already merging and those not started.
    public consuming func startMerges(udev: UdevBatch? = nil, started: (Int) throws -> Void) throws(MergeStartFailure) -> MergingSnapshotSet {
        var merging: [SnapshotStack] = []
        for (index, stack) in stacks.enumerated() {
            do {
                CrashPoint.hit(.rollbackBeforeMerge)
                try engine.startMerge(stack, udev: udev, live: true)
                CrashPoint.hit(.rollbackAfterMergeStart)
                try started(index)
            } catch {
                throw MergeStartFailure(merging: merging, notStarted: Array(stacks[index...]), underlying: error)
            }
            merging.append(stack)
        }
        return MergingSnapshotSet(engine: engine, stacks: merging)
    }
}

/// What a commit did: every snapshot dropped, or not all of them, with the ones still live.
public enum CommitResult: ~Copyable {
    case committed
    /// A drop failed (`error`); `stillLive` are the snapshots that are still live.
    case incomplete(stillLive: LiveSnapshotSet, error: any Error)
}

/// Merges that did not all start: `merging` are under way (their volumes read as before the
/// run), `notStarted` are still live snapshots (the first is the one that failed).
public struct MergeStartFailure: Error, CustomStringConvertible {
    public var merging: [SnapshotStack]
    public var notStarted: [SnapshotStack]
    public var underlying: any Error
    public var description: String { "\(underlying)" }
}

/// Snapshots being merged back into their origins: a rollback under way. The volumes read as
/// before the run; the kernel copies the old chunks back underneath. Nothing can commit or
/// drop such a set: each merge restarts (after a fixed I/O error) or finishes.
public struct MergingSnapshotSet {
    public let stacks: [SnapshotStack]
    let engine: SnapshotEngine

    init(engine: SnapshotEngine, stacks: [SnapshotStack]) {
        self.engine = engine
        self.stacks = stacks
    }

    /// The merges a journal records as started (the kernel's state is read by `state`).
    public static func attach(_ stacks: [SnapshotStack], engine: SnapshotEngine) -> MergingSnapshotSet {
        MergingSnapshotSet(engine: engine, stacks: stacks)
    }

    /// Where the merge of `stack` stands, from the kernel and the label.
    public func state(_ stack: SnapshotStack) throws -> MergeState {
        try engine.mergeState(require(stack))
    }

    /// Tears down a merge the kernel reports complete.
    public func finish(_ stack: SnapshotStack) throws {
        try engine.finishMerge(require(stack))
    }

    /// Restarts a merge the kernel stopped (`Merge failed`) once the I/O error is fixed; the
    /// volume must be unmounted.
    public func restart(_ stack: SnapshotStack) throws {
        try engine.restartMerge(require(stack))
    }

    private func require(_ stack: SnapshotStack) throws -> SnapshotStack {
        guard stacks.contains(where: { $0.identity == stack.identity }) else {
            throw SnapshotError(.other, "merge of \(stack.originName)", "guard asked about a snapshot that is not in this merging set (a bug)")
        }
        return stack
    }
}

extension SnapshotEngine {
    /// Removes what a run left of one stack, in whatever state a crash left it (never taken,
    /// half-built, live, half-dropped), keeping the origin's current data: recovery's way to
    /// finish a journaled commit or to clear a run that changed nothing. Storage that may still
    /// hold old blocks of a snapshot that is not live is released only when `commitJournaled`
    /// (the journal holds the decision that they may go); otherwise it is refused and kept.
    /// - Throws: as `LiveSnapshotSet.commit`, and `.needsReassembly` or `.stale` for storage kept.
    public func discard(_ stack: SnapshotStack, commitJournaled: Bool) throws {
        try drop(stack, discarding: commitJournaled)
    }
}
