import DeviceMapper
import Foundation
import Synchronization

/// Watches the COW use of live snapshots while the steps run: records the peak, grows
/// file-backed COWs before they fill (by the extension policy), and raises the alarm when
/// one is about to fill and cannot grow, so the steps can be stopped while a rollback is
/// still possible.
public final class CowWatcher: Sendable {
    /// One reading of one snapshot.
    public struct Sample: Sendable, Hashable {
        public var volumeIndex: Int
        public var status: SnapshotStatus
        /// Seconds since the watcher started.
        public var elapsed: Double
        public var storageBytes: UInt64
    }

    /// Something the engine must react to.
    public enum Event: Sendable {
        case sample(Sample)
        case extended(volumeIndex: Int, to: UInt64)
        /// Fill reached the stop threshold and the COW cannot grow: stop writing now.
        case nearlyFull(volumeIndex: Int, fill: Double)
        /// The kernel invalidated the snapshot: the rollback is no longer possible.
        case invalidated(volumeIndex: Int, status: SnapshotStatus)
        case error(volumeIndex: Int, message: String)
    }

    struct State {
        var stacks: [SnapshotStack]
        var peakSectors: [UInt64]
        var running = true
        var alarmed: Set<Int> = []
    }

    private let state: Mutex<State>
    private let policies: [ExtensionPolicy?]
    private let stopThreshold: Double
    private let interval: Duration
    private let onEvent: @Sendable (Event) -> Void
    // @unchecked-free: DeviceMapper is Sendable; the engine's other fields are only read.
    private let dm: DeviceMapper
    private let engineLog: (@Sendable (String) -> Void)?
    private let done = Mutex<Bool>(false)

    /// - Parameters:
    ///   - policies: per stack, how to grow its COW; nil never grows it.
    ///   - stopThreshold: fill at which a COW that cannot grow raises `.nearlyFull`.
    public init(
        engine: SnapshotEngine, stacks: [SnapshotStack], policies: [ExtensionPolicy?], stopThreshold: Double = 0.9,
        interval: Duration = .milliseconds(250), onEvent: @escaping @Sendable (Event) -> Void
    ) {
        self.state = Mutex(State(stacks: stacks, peakSectors: Array(repeating: 0, count: stacks.count)))
        self.policies = policies
        self.stopThreshold = stopThreshold
        self.interval = interval
        self.onEvent = onEvent
        self.dm = engine.dm
        self.engineLog = engine.log
    }

    /// Starts polling on a thread of its own.
    public func start() {
        let thread = Thread { [self] in
            let clock = ContinuousClock()
            let start = clock.now
            while state.withLock({ $0.running }) {
                poll(elapsed: start.duration(to: clock.now))
                Thread.sleep(forTimeInterval: Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18)
            }
            poll(elapsed: start.duration(to: clock.now))
            done.withLock { $0 = true }
        }
        thread.name = "guard-cow-watcher"
        thread.start()
    }

    /// Stops polling (after one last reading) and returns the stacks, grown if they were.
    @discardableResult
    public func stop() -> [SnapshotStack] {
        state.withLock { $0.running = false }
        while !done.withLock({ $0 }) { Thread.sleep(forTimeInterval: 0.01) }
        return stacks
    }

    public var stacks: [SnapshotStack] { state.withLock { $0.stacks } }

    /// Peak COW use per stack, in bytes.
    public var peakBytes: [UInt64] { state.withLock { $0.peakSectors.map { $0 * 512 } } }

    private func poll(elapsed: Duration) {
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        for (index, stack) in stacks.enumerated() {
            let status: SnapshotStatus
            do {
                status = try dm.snapshotStatus(stack.ref(.snap))
            } catch {
                onEvent(.error(volumeIndex: index, message: "\(error)"))
                continue
            }
            onEvent(.sample(Sample(volumeIndex: index, status: status, elapsed: seconds, storageBytes: stack.storageBytes)))
            guard case .active(let usage) = status else {
                let first = state.withLock { $0.alarmed.insert(index).inserted }
                if first { onEvent(.invalidated(volumeIndex: index, status: status)) }
                continue
            }
            state.withLock { $0.peakSectors[index] = max($0.peakSectors[index], usage.allocatedSectors) }
            if let policy = policies[index], usage.fill >= policy.threshold, stack.storageBytes < policy.maximumBytes {
                let target = min(stack.storageBytes + policy.stepBytes, policy.maximumBytes)
                do {
                    let engine = SnapshotEngine(dm: dm, log: engineLog)
                    let grown = try engine.extend(stack, to: target)
                    state.withLock { $0.stacks[index] = grown }
                    onEvent(.extended(volumeIndex: index, to: grown.storageBytes))
                    continue
                } catch {
                    onEvent(.error(volumeIndex: index, message: "\(error)"))
                }
            }
            if usage.fill >= stopThreshold {
                let first = state.withLock { $0.alarmed.insert(index).inserted }
                if first { onEvent(.nearlyFull(volumeIndex: index, fill: usage.fill)) }
            }
        }
    }
}
