import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Quantities
import Recipe
import Snapshot

/// `guard monitor`: watches the snapshots of kept runs after their run has ended, as a run
/// watches its own while the steps run (lvm2 users know this from dmeventd's autoextend).
///
/// A kept snapshot keeps taking the old blocks of every write to its volume for as long as it
/// is kept, so a COW that was large enough for the night fills up days later. The monitor
/// grows a file-backed COW by the recipe's `extend` (or guard.conf's), warns in the system log
/// as it fills (50%, 75%, 90%), and when it reaches `stop_at` and cannot grow, applies the
/// recipe's `on_full`:
/// - `fuse` (the default): the volume refuses writes (EIO, as a failed disk would) until the
///   admin runs `guard rollback` or `guard commit`; the rollback stays possible;
/// - `commit`: the snapshots are dropped, the upgrade is final;
/// - `rollback`: the run is rolled back now (its rollback hooks run); a fuse holds the volume
///   from the stop point until the merge starts, and stays if the rollback cannot start.
///
/// A kept snapshot is never invalidated silently: if one overflows anyway (one write larger
/// than what was left), that is logged at error priority and journaled.
///
/// The COW use of each kept snapshot is read every `interval` (1 s), sooner when the write
/// rate measured would bring it to `stop_at` before two readings (see `CowWatcher`); the
/// journal is read again every `refresh` (2 s) for runs kept or closed since. Every action
/// holds the volume's lock, so it never overlaps a `guard rollback`, `commit` or `restore`.
public final class KeptRunMonitor {
    public let context: GuardContext
    var reporter: any Reporter { context.reporter }

    /// Something the monitor's loop does every `every` (the first time at once), between two
    /// readings and never beside a commit or rollback it applies: `guard monitor` writes the
    /// metrics file with it.
    public var periodic: (every: Duration, action: () -> Void)?

    /// Called at every pass of the loop, and every 5 s while a commit or rollback it applies
    /// runs (those have their own timeouts): `guard monitor` tells systemd's watchdog with it
    /// that the loop turns.
    public var heartbeat: (@Sendable () -> Void)?

    public init(context: GuardContext) { self.context = context }

    /// One kept snapshot under watch.
    struct Watched: Sendable {
        var run: RunRecord
        var record: SnapshotRecord
        var stack: SnapshotStack
        var policy: ExtensionPolicy?
        var stopAt: Double
        var onFull: FullAction
        var key: String { "\(run.id!)/\(record.volumeIndex)" }
        var runID: Int64 { run.id! }
    }

    /// Something the monitor's loop must do outside the watcher's thread.
    struct Request: Sendable, Hashable {
        var runID: Int64
        var action: FullAction
        var reason: String
    }

    /// Watches until `shouldStop` says so (SIGTERM), or once over every kept run when `once`.
    public func run(interval: Duration = .seconds(1), refresh: Duration = .seconds(2), once: Bool = false, shouldStop: @escaping @Sendable () -> Bool) async throws {
        try context.prepareStateDirectory(creatingCowDirectory: false)
        try context.requireTrustedState()  // the journal drives commits and rollbacks: refuse loudly
        let engine = try context.engine()
        let requests = LockedValue<[Request]>([])
        let announced = LockedValue<Set<String>>([])
        var watcher: CowWatcher?
        var watched: [Watched] = []
        var lastRefresh: ContinuousClock.Instant?
        var lastPeriodic: ContinuousClock.Instant?
        reporter.note("guard monitor: watching kept runs' snapshots in \(context.stateDirectory)")
        defer { watcher?.stop() }
        while !shouldStop() {
            let pending = requests.withLock { requests -> [Request] in
                defer { requests.removeAll() }
                return requests
            }
            if !pending.isEmpty {
                // Nothing suspends while a commit or rollback runs: the watcher stops first.
                watcher?.stop()
                watcher = nil
                watched = []
                let pulse = heartbeat.map { beat in
                    Task {
                        while !Task.isCancelled {
                            beat()
                            try? await Task.sleep(for: .seconds(5))
                        }
                    }
                }
                for request in Set(pending) { await apply(request) }
                pulse?.cancel()
                lastRefresh = nil
            }
            if lastRefresh.isDue(every: refresh) {
                lastRefresh = .now
                // Origins another tool took out of their snapshot's write path (lvm2 reloads):
                // a snapshot no longer live is not watched below, so they are looked for here.
                if let journal = try? context.existingJournal() {
                    do { try OriginWatch(context: context, journal: journal, engine: engine).sweep() } catch {
                        reporter.log("guard monitor: the check of the guarded origins' tables failed: \(error)")
                    }
                }
                let found = keptSnapshots(engine: engine, announced: announced)
                if found.map({ $0.key }) != watched.map({ $0.key }) {
                    watcher?.stop()
                    watched = found
                    watcher = found.isEmpty ? nil : start(found, engine: engine, interval: interval, requests: requests, announced: announced)
                }
            }
            heartbeat?()
            if let periodic, lastPeriodic.isDue(every: periodic.every) {
                lastPeriodic = .now
                periodic.action()
            }
            if once {
                // One reading of each (the watcher polls at once when it starts), then done.
                try await Task.sleep(for: .milliseconds(300))
                if requests.withLock({ $0.isEmpty }) { break }
                continue
            }
            try await Task.sleep(for: .milliseconds(200))
        }
    }

    /// The live snapshots of kept runs, with each run's growth policy, stop point and `on_full`.
    func keptSnapshots(engine: SnapshotEngine, announced: LockedValue<Set<String>>) -> [Watched] {
        guard let journal = try? context.existingJournal(), let runs = try? journal.runs(in: [.kept]) else { return [] }
        var result: [Watched] = []
        for run in runs {
            let recipe = try? RecipeParser.parse(text: run.recipeText, path: run.recipePath).get()
            for record in (try? journal.snapshots(runID: run.id!)) ?? [] where record.state == .live {
                guard let stack = decodeStack(record.stack) else { continue }
                guard (try? engine.liveState(stack).live) == true else {
                    Self.once("\(run.id!)/\(record.volumeIndex)/not-live", announced) {
                        reporter.warning("kept run \(run.id!): the snapshot of \(record.volume) is not live; it is not watched (see `guard status`, `guard recover`)")
                    }
                    continue
                }
                let spec = recipe?.volumes.indices.contains(record.volumeIndex) == true ? recipe?.volumes[record.volumeIndex] : nil
                // guard.conf's growth for a COW file whose recipe says nothing, as in the run.
                let extend = spec?.extend ?? (stack.storage.isFile ? context.configuration.extend : nil)
                let policy = extend.flatMap { extend in
                    // A thin snapshot's storage is its volume's pool: `extend` grows the pool.
                    stack.thin.map { Planner.thinGrowth(extend, originBytes: stack.originBytes, poolBytes: stack.areaBytes, blockBytes: UInt64($0.blockSectors) * 512).policy }
                        ?? Planner.growth(extend, originBytes: stack.originBytes, cowBytes: stack.budgetBytes, reserveBytes: stack.reserveBytes ?? 0, geometry: stack.geometry)
                        .policy
                }
                result.append(
                    Watched(
                        run: run, record: record, stack: stack, policy: stack.storage.isFile || stack.thin != nil ? policy : nil,
                        stopAt: recipe?.stopAtFill ?? 0.9, onFull: recipe?.onFull ?? .fuse))
            }
        }
        return result
    }

    /// Starts one watcher over every kept snapshot.
    func start(_ watched: [Watched], engine: SnapshotEngine, interval: Duration, requests: LockedValue<[Request]>, announced: LockedValue<Set<String>>) -> CowWatcher {
        // The watchdog starts now, not at the first extension, when writes go on.
        (engine.watchdog as? ProcessWatchdog)?.start()
        let journal = try? context.journal()
        let reporter = self.reporter
        let context = self.context
        let dm = engine.dm
        let lockDirectory = context.lockDirectory
        let peaks = LockedValue<[Int: UInt64]>([:])
        let lastPeakWrite = LockedValue<[Int: Double]>([:])
        // Journal writes from the watcher's thread: best effort, never in the way of a fuse.
        let record: @Sendable (Int, EventKind, String, String) -> Void = { index, kind, action, detail in
            try? journal?.event(watched[index].runID, kind, action, "\(detail) (guard monitor)", at: Date().timeIntervalSince1970)
        }
        let watcher = CowWatcher(
            engine: engine, stacks: watched.map(\.stack), policies: watched.map(\.policy), stopThresholds: watched.map(\.stopAt),
            interval: interval,
            gate: { index, action in
                let item = watched[index]
                let key = item.record.originUUID.isEmpty ? item.record.originName : item.record.originUUID
                // Another guard command has the volume (a rollback, a commit, a restore): it
                // acts on it; the monitor tries again at its next reading.
                guard let lock = try? VolumeLock.acquire(directory: lockDirectory, key: key, holder: "\(VolumeLock.monitorHolder) (pid \(getpid()))") else { return false }
                defer { lock.release() }
                // Still kept? The run may have been committed or rolled back since the last refresh.
                guard (try? journal?.run(id: item.runID))??.state == .kept else { return false }
                action()
                return true
            }
        ) { event in
            switch event {
            case .sample(let sample):
                guard let usage = sample.status.usage else { return }
                let item = watched[sample.volumeIndex]
                let budget = sample.sizeBytes
                let fill = Double(usage.allocatedBytes) / Double(max(budget, 1))
                for level in [50, 75, 90] where fill * 100 >= Double(level) {
                    Self.once("\(item.key)/fill-\(level)/\(sample.storageBytes)", announced) {
                        reporter.warning(
                            "kept run \(item.runID): the snapshot of \(item.record.volume) is \(Int(fill * 100))% full (\(formatBytes(usage.allocatedBytes)) of \(formatBytes(budget)))"
                        )
                        record(sample.volumeIndex, .warning, "cow-fill", "\(item.record.volume) at \(Int(fill * 100))%")
                    }
                }
                // The kept run's peak COW use, in the journal at most every 5 s.
                let (grew, due) = (
                    peaks.withLock { peaks -> Bool in
                        defer { peaks[sample.volumeIndex] = max(peaks[sample.volumeIndex] ?? 0, usage.allocatedBytes) }
                        return usage.allocatedBytes > (peaks[sample.volumeIndex] ?? UInt64(max(item.record.peakUsedBytes, 0)))
                    },
                    lastPeakWrite.withLock { last -> Bool in
                        guard sample.elapsed - (last[sample.volumeIndex] ?? -10) >= 5 else { return false }
                        last[sample.volumeIndex] = sample.elapsed
                        return true
                    }
                )
                if grew && due, var updated = try? journal?.snapshots(runID: item.runID).first(where: { $0.volumeIndex == item.record.volumeIndex }) {
                    updated.peakUsedBytes = Int64(usage.allocatedBytes)
                    try? journal?.update(updated)
                }
            case .extended(let index, let grown):
                let item = watched[index]
                reporter.note("kept run \(item.runID): the snapshot of \(item.record.volume) grew to \(formatBytes(grown.budgetBytes))")
                if var updated = try? journal?.snapshots(runID: item.runID).first(where: { $0.volumeIndex == item.record.volumeIndex }) {
                    updated.stack = encode(grown)
                    updated.sizeBytes = Int64(grown.budgetBytes)
                    try? journal?.update(updated)
                }
                record(index, .result, "extend", "\(item.record.volume) to \(grown.budgetBytes) bytes")
            case .nearlyFull(let index, let fill):
                let item = watched[index]
                let reason = "the kept snapshot of \(item.record.volume) is \(Int(fill * 100))% full and cannot grow"
                Self.once("\(item.key)/cow-full", announced) { record(index, .error, "cow-full", reason) }
                switch item.onFull {
                case .fuse: break  // the watcher blows it (armed), reported below
                case .commit, .rollback:
                    reporter.warning("kept run \(item.runID): \(reason); on_full says \(item.onFull): guard monitor will \(item.onFull) the run")
                    requests.withLock { $0.append(Request(runID: item.runID, action: item.onFull, reason: reason)) }
                }
            case .fusing(let index, let fill):
                let item = watched[index]
                Self.once("\(item.key)/fusing", announced) { record(index, .intent, "fuse", "\(item.record.volume) at \(Int(fill * 100))%") }
            case .fused(let index, _, let microseconds):
                let item = watched[index]
                // Once per monitor: a restarted monitor finds the fuse blown (0 µs) and says so again.
                Self.once("\(item.key)/fused", announced) {
                    reporter.result(
                        "kept run \(item.runID): the snapshot of \(item.record.volume) is full and cannot grow: \(item.record.volume) refuses writes from now on (guard's fuse), so the rollback stays possible; `guard rollback \(item.runID)` restores the volume, `guard commit \(item.runID)` keeps it as it is and lifts the fuse",
                        success: false)
                    record(index, .result, "fuse", "\(item.record.volume) refuses writes (suspended \(microseconds) µs)")
                }
            case .invalidated(let index, let status):
                let item = watched[index]
                Self.once("\(item.key)/invalid", announced) {
                    reporter.result(
                        "kept run \(item.runID): the kernel invalidated the snapshot of \(item.record.volume) (\(status)): a rollback of it is no longer possible; `guard commit \(item.runID)` releases it",
                        success: false)
                    record(index, .error, "cow-invalid", "\(item.record.volume): \(status)")
                }
            case .bypassed(let index, let bypass):
                // Inside the gate: the volume's lock is held and the run is still kept.
                let item = watched[index]
                guard let journal else { return }
                let watch = OriginWatch(context: context, journal: journal, engine: SnapshotEngine(dm: dm))
                do { _ = try watch.recordBypass(runID: item.runID, record: item.record, stack: item.stack, bypass: bypass) } catch {
                    reporter.warning("kept run \(item.runID): the table of \(item.record.volume) was replaced by another tool (\(bypass)), and guard could not record it: \(error)")
                }
            case .error(let index, let message):
                reporter.log("kept run \(watched[index].runID), \(watched[index].record.volume): \(message)")
            }
        }
        // Armed where the run will not be committed: every write the fuse refuses is one the
        // rollback would undo, or one the admin must decide about.
        watcher.armFuse(volumes: Set(watched.indices.filter { watched[$0].onFull != .commit }))
        watcher.start()
        return watcher
    }

    /// Commits or rolls back a kept run whose snapshot filled up (`on_full`).
    func apply(_ request: Request) async {
        let maintenance = Maintenance(context: context)
        do {
            guard let journal = try context.existingJournal(), let run = try journal.run(id: request.runID), run.state == .kept else { return }
            try journal.event(request.runID, .intent, "on-full", "\(request.action): \(request.reason) (guard monitor)")
            switch request.action {
            case .commit:
                let message = try maintenance.commit("\(request.runID)", reason: "\(request.reason); on_full: commit (guard monitor)")
                reporter.result("kept run \(request.runID): \(request.reason); \(message)", success: false)
            case .rollback:
                let message = try await maintenance.rollback("\(request.runID)", wait: false).message
                reporter.result("kept run \(request.runID): \(request.reason); \(message)", success: false)
            case .fuse:
                return
            }
        } catch {
            reporter.result("kept run \(request.runID): \(request.reason); on_full says \(request.action), which did not complete: \(error)", success: false)
        }
    }

    /// Runs `body` the first time `key` is seen.
    static func once(_ key: String, _ seen: LockedValue<Set<String>>, _ body: () -> Void) {
        if seen.withLock({ $0.insert(key).inserted }) { body() }
    }
}

extension Optional where Wrapped == ContinuousClock.Instant {
    /// Whether `every` has passed since this instant; always, when nothing happened yet.
    public func isDue(every: Duration) -> Bool {
        map { $0.duration(to: .now) >= every } ?? true
    }
}
