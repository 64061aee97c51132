import DeviceMapper
import Testing

@testable import Snapshot

@Suite("COW watcher")
struct CowWatcherTests {
    /// A 16 MiB COW (32768 sectors) with `used` sectors allocated.
    func usage(_ used: UInt64) -> SnapshotUsage { SnapshotUsage(allocatedSectors: used, totalSectors: 32768, metadataSectors: 16) }

    @Test("the watcher polls sooner when the measured rate would reach stop_at before two polls, at half the time left")
    func adaptiveInterval() throws {
        let interval = Duration.milliseconds(250)
        // 8 MiB/s (16384 sectors/s); 90% of 32768 = 29491.2 sectors; at 20000 the stop point is
        // 0.579 s away: more than two polls, the regular interval will do.
        #expect(CowWatcher.nextPoll(usage: usage(20000), previous: (at: 1.0, sectors: 20000 - 1638), now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        // At 27000 it is 0.152 s away: poll in 76 ms.
        let soon = try #require(CowWatcher.nextPoll(usage: usage(27000), previous: (at: 1.0, sectors: 27000 - 1638), now: 1.1, stopThreshold: 0.9, interval: interval))
        #expect(soon > .milliseconds(70) && soon < .milliseconds(80), "\(soon)")
        // No writes since the last reading, no reading before, or already at the stop point: the
        // regular interval (the alarm and the fuse act at the stop point itself).
        #expect(CowWatcher.nextPoll(usage: usage(27000), previous: (at: 1.0, sectors: 27000), now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        #expect(CowWatcher.nextPoll(usage: usage(27000), previous: nil, now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        #expect(CowWatcher.nextPoll(usage: usage(30000), previous: (at: 1.0, sectors: 20000), now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
    }
}
