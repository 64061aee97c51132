import BlockDevice
import DeviceMapper
import Foundation
import Quantities

/// Watches the COW use of live snapshots while the steps run, and on a rollback until the
/// merge starts: records the peak, grows file-backed COWs before they fill (by the extension
/// policy), raises the alarm when one reaches the stop point and cannot grow, so the steps
/// are stopped while a rollback is still possible, and, once the fuse is armed (the run will
/// roll back), blows it: the origin then refuses writes, so writers guard cannot stop (a
/// database server, a daemon, a cron job) cannot overflow the COW before the merge.
///
/// It polls every `interval` (250 ms); when the write rate it measured would bring a COW to
/// its stop point sooner than that, it polls at half the time left, down to
/// `minimumInterval` (5 ms). What it cannot catch: more than `100% - stop_at` of a COW
/// written between two polls plus the fuse's suspend (`Scripts/bench` measures the fastest
/// writer it stops in time), or a single request larger than that.
public final class CowWatcher: Sendable {
    /// One reading of one snapshot.
    public struct Sample: Sendable, Hashable {
        public var volumeIndex: Int
        public var status: SnapshotStatus
        /// Seconds since the watcher started.
        public var elapsed: Double
        public var storageBytes: UInt64
        /// The snapshot's size: the COW without its fuse reserve (what fill is a fraction of).
        public var sizeBytes: UInt64
    }

    /// Something the engine must react to.
    public enum Event: Sendable {
        case sample(Sample)
        /// The COW grew: `stack` is the stack with its new storage and size.
        case extended(volumeIndex: Int, stack: SnapshotStack)
        /// Fill reached the stop threshold and the COW cannot grow: stop writing now.
        case nearlyFull(volumeIndex: Int, fill: Double)
        /// About to blow the fuse of this volume (armed, at the stop point, cannot grow).
        case fusing(volumeIndex: Int, fill: Double)
        /// The origin refuses writes; it was suspended for `microseconds`.
        case fused(volumeIndex: Int, fill: Double, microseconds: UInt64)
        /// The kernel invalidated the snapshot: the rollback is no longer possible.
        case invalidated(volumeIndex: Int, status: SnapshotStatus)
        /// Another tool replaced the origin's table: its writes no longer reach the snapshot,
        /// which is stale from now on (the rollback is no longer possible). Said once.
        case bypassed(volumeIndex: Int, bypass: OriginBypass)
        case error(volumeIndex: Int, message: String)
    }

    struct State {
        var stacks: [SnapshotStack]
        var peakSectors: [UInt64]
        var running = true
        var alarmed: Set<Int> = []
        /// The volumes whose fuse is armed.
        var fuseArmed: Set<Int> = []
        var fused: Set<Int> = []
        var fusing: Set<Int> = []
        /// The volumes whose origin was found bypassed (reported once, never acted on again).
        var bypassed: Set<Int> = []
        /// The last reading of each stack: seconds, allocated sectors.
        var last: [Int: (at: Double, sectors: UInt64)] = [:]
    }

    /// The shortest time between two polls.
    public static let minimumInterval: Duration = .milliseconds(5)
    /// The time between two polls of a COW past half its stop point.
    public static let closeInterval: Duration = .milliseconds(25)

    private let state: LockedValue<State>
    private let policies: [ExtensionPolicy?]
    private let stopThresholds: [Double]
    private let interval: Duration
    private let gate: Gate
    private let onEvent: @Sendable (Event) -> Void
    private let engine: WatcherEngine
    /// Signalled by `stop()`: the polling thread wakes at once instead of at its next reading.
    private let wake = DispatchSemaphore(value: 0)
    /// Signalled by the polling thread after its last reading (and passed on by each waiter).
    private let finished = DispatchSemaphore(value: 0)

    /// Runs an action of the watcher on stack `index` (an extension, a fuse) and returns true,
    /// or returns false without running it (the watcher tries again at its next reading).
    /// `guard monitor` holds the volume's lock around it, so that no other guard command
    /// suspends the volume meanwhile; a run holds its locks already.
    public typealias Gate = @Sendable (_ index: Int, _ action: () -> Void) -> Bool

    /// - Parameters:
    ///   - policies: per stack, how to grow its COW; nil never grows it.
    ///   - stopThresholds: per stack, the fill at which a COW that cannot grow raises
    ///     `.nearlyFull` (and blows the fuse once it is armed).
    ///   - engine: extends and fuses with this engine and its watchdog. The caller suspends
    ///     nothing itself while the watcher runs (steps, verify, the rollback's stop hooks
    ///     and unmounts) and stops it before its next suspend, so the watchdog has one user.
    ///   - gate: around each extension and fuse (see `Gate`).
    public init(
        engine: SnapshotEngine, stacks: [SnapshotStack], policies: [ExtensionPolicy?], stopThresholds: [Double],
        interval: Duration = .milliseconds(250),
        gate: @escaping Gate = { _, action in
            action()
            return true
        },
        onEvent: @escaping @Sendable (Event) -> Void
    ) {
        precondition(policies.count == stacks.count && stopThresholds.count == stacks.count, "one policy and one stop point per stack")
        self.state = LockedValue(State(stacks: stacks, peakSectors: Array(repeating: 0, count: stacks.count)))
        self.policies = policies
        self.stopThresholds = stopThresholds
        self.interval = interval
        self.gate = gate
        self.onEvent = onEvent
        self.engine = WatcherEngine(engine: engine)
    }

    /// One stop point for every stack (a run's `stop_at`).
    public convenience init(
        engine: SnapshotEngine, stacks: [SnapshotStack], policies: [ExtensionPolicy?], stopThreshold: Double = 0.9,
        interval: Duration = .milliseconds(250), onEvent: @escaping @Sendable (Event) -> Void
    ) {
        self.init(
            engine: engine, stacks: stacks, policies: policies, stopThresholds: Array(repeating: stopThreshold, count: stacks.count),
            interval: interval, onEvent: onEvent)
    }

    /// From now on a COW that reaches the stop point and cannot grow gets the fuse: the run
    /// will roll back, so every write the fuse refuses would be undone anyway. Blows it at
    /// the next reading for a COW already there.
    /// - Parameter volumes: the stacks to arm; nil: all of them.
    public func armFuse(volumes: Set<Int>? = nil) {
        // A thin snapshot needs no fuse: a full pool fails writes, never a snapshot's blocks.
        state.withLock { state in
            state.fuseArmed.formUnion((volumes ?? Set(state.stacks.indices)).filter { state.stacks[$0].thin == nil })
        }
    }

    /// The volumes whose origin the watcher fused.
    public var fusedVolumes: Set<Int> { state.withLock { $0.fused } }

    /// Starts polling on a thread of its own.
    public func start() {
        let thread = Thread { [self] in
            let clock = ContinuousClock()
            let start = clock.now
            while state.withLock({ $0.running }) {
                let next = poll(elapsed: start.duration(to: clock.now))
                let nanoseconds = Int(next.components.seconds) * 1_000_000_000 + Int(next.components.attoseconds / 1_000_000_000)
                _ = wake.wait(timeout: .now() + .nanoseconds(nanoseconds))
            }
            poll(elapsed: start.duration(to: clock.now))
            finished.signal()
        }
        thread.name = "guard-cow-watcher"
        thread.start()
    }

    /// Stops polling (after one last reading) and returns the stacks, grown if they were.
    @discardableResult
    public func stop() -> [SnapshotStack] {
        state.withLock { $0.running = false }
        wake.signal()
        // Blocks for one last reading at most (milliseconds), not a poll loop.
        finished.wait()
        finished.signal()  // for the next caller of stop()
        return stacks
    }

    public var stacks: [SnapshotStack] { state.withLock { $0.stacks } }

    /// Peak COW use per stack, in bytes.
    public var peakBytes: [UInt64] { state.withLock { $0.peakSectors.map { $0 * 512 } } }

    /// One reading of every stack; returns how long to wait for the next.
    @discardableResult
    private func poll(elapsed: Duration) -> Duration {
        let seconds = elapsed.inSeconds
        var next = interval
        for (index, stack) in stacks.enumerated() {
            if state.withLock({ $0.bypassed.contains(index) }) { continue }
            // The origin's table first: a snapshot another tool took out of the write path is
            // stale, whatever its COW says; it is never extended or fused again. Confirmed, and
            // reported, inside the gate: `guard monitor` holds the volume's lock there, so a
            // commit or rollback at work on the volume (whose own table changes look the same
            // for an instant) is never taken for another tool.
            if case .bypassed? = try? engine.engine.routing(stack) {
                _ = gate(index) {
                    guard case .bypassed(let bypass)? = try? engine.engine.routing(stack) else { return }
                    state.withLock { _ = $0.bypassed.insert(index) }
                    onEvent(.bypassed(volumeIndex: index, bypass: bypass))
                }
                continue
            }
            let status: SnapshotStatus
            do {
                // The engine's reading: a thin snapshot's use is its pool's.
                status = try engine.engine.health(stack).status
            } catch {
                onEvent(.error(volumeIndex: index, message: "\(error)"))
                continue
            }
            onEvent(.sample(Sample(volumeIndex: index, status: status, elapsed: seconds, storageBytes: stack.storageBytes, sizeBytes: stack.budgetBytes)))
            guard case .active(let usage) = status else {
                let first = state.withLock { $0.alarmed.insert(index).inserted }
                if first { onEvent(.invalidated(volumeIndex: index, status: status)) }
                continue
            }
            let previous = state.withLock { state -> (at: Double, sectors: UInt64)? in
                state.peakSectors[index] = max(state.peakSectors[index], usage.allocatedSectors)
                defer { state.last[index] = (seconds, usage.allocatedSectors) }
                return state.last[index]
            }
            let stopThreshold = stopThresholds[index]
            // Fill against the snapshot's size; the fuse reserve lies beyond 100%.
            let fill = stack.fill(usage)
            if let wait = Self.nextPoll(usage: usage, budgetSectors: stack.budgetBytes / 512, previous: previous, now: seconds, stopThreshold: stopThreshold, interval: interval) {
                next = min(next, wait)
            }
            // Past half the stop point, read it often: a burst must find the fuse soon.
            if fill >= stopThreshold / 2 { next = min(next, Self.closeInterval) }
            if let policy = policies[index], fill >= policy.threshold, stack.storageBytes < policy.maximumBytes {
                let target = min(stack.storageBytes + policy.stepBytes, policy.maximumBytes)
                var grown: SnapshotStack?
                var failure: (any Error)?
                let ran = gate(index) {
                    do { grown = try engine.engine.extend(stack, to: target) } catch { failure = error }
                }
                if let grown {
                    state.withLock { $0.stacks[index] = grown }
                    onEvent(.extended(volumeIndex: index, stack: grown))
                    continue
                }
                if let failure { onEvent(.error(volumeIndex: index, message: "\(failure)")) }
                if !ran { continue }
            }
            if fill >= stopThreshold {
                let first = state.withLock { $0.alarmed.insert(index).inserted }
                if first { onEvent(.nearlyFull(volumeIndex: index, fill: fill)) }
                let fuse = state.withLock { state -> (blow: Bool, first: Bool) in
                    guard state.fuseArmed.contains(index) && !state.fused.contains(index) else { return (false, false) }
                    return (true, state.fusing.insert(index).inserted)
                }
                if fuse.blow {
                    if fuse.first { onEvent(.fusing(volumeIndex: index, fill: fill)) }
                    var microseconds: UInt64?
                    var failure: (any Error)?
                    _ = gate(index) {
                        do { microseconds = try engine.engine.blowFuse(stack) } catch { failure = error }
                    }
                    if let microseconds {
                        state.withLock { _ = $0.fused.insert(index) }
                        onEvent(.fused(volumeIndex: index, fill: fill, microseconds: microseconds))
                    }
                    if let failure { onEvent(.error(volumeIndex: index, message: "\(failure)")) }
                }
            }
        }
        return max(next, Self.minimumInterval)
    }

    /// When to read a COW again: sooner than `interval` when the rate measured since the last
    /// reading would bring it to the stop point before two polls (at half the time left), so
    /// a fast writer is caught while there is room; nil when the regular interval will do.
    static func nextPoll(usage: SnapshotUsage, budgetSectors: UInt64, previous: (at: Double, sectors: UInt64)?, now: Double, stopThreshold: Double, interval: Duration) -> Duration?
    {
        guard let previous, now > previous.at, usage.allocatedSectors > previous.sectors else { return nil }
        let rate = Double(usage.allocatedSectors - previous.sectors) / (now - previous.at)  // sectors per second
        let stop = stopThreshold * Double(budgetSectors)
        let left = stop - Double(usage.allocatedSectors)
        guard left > 0 else { return nil }  // at the stop point: the alarm and the fuse act now
        let seconds = left / rate / 2
        let regular = interval.inSeconds
        guard seconds < regular else { return nil }
        return .microseconds(Int64(seconds * 1_000_000))
    }
}

/// The engine the watcher extends and fuses with, with the run's watchdog.
// @unchecked: the watchdog is a class used from one thread at a time (see `CowWatcher.init`);
// DeviceMapper is Sendable and the rest is read only.
struct WatcherEngine: @unchecked Sendable {
    let engine: SnapshotEngine
}
