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
        #expect(CowWatcher.nextPoll(usage: usage(20000), budgetSectors: 32768, previous: (at: 1.0, sectors: 20000 - 1638), now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        // At 27000 it is 0.152 s away: poll in 76 ms.
        let soon = try #require(
            CowWatcher.nextPoll(usage: usage(27000), budgetSectors: 32768, previous: (at: 1.0, sectors: 27000 - 1638), now: 1.1, stopThreshold: 0.9, interval: interval))
        #expect(soon > .milliseconds(70) && soon < .milliseconds(80), "\(soon)")
        // No writes since the last reading, no reading before, or already at the stop point: the
        // regular interval (the alarm and the fuse act at the stop point itself).
        #expect(CowWatcher.nextPoll(usage: usage(27000), budgetSectors: 32768, previous: (at: 1.0, sectors: 27000), now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        #expect(CowWatcher.nextPoll(usage: usage(27000), budgetSectors: 32768, previous: nil, now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        #expect(CowWatcher.nextPoll(usage: usage(30000), budgetSectors: 32768, previous: (at: 1.0, sectors: 20000), now: 1.1, stopThreshold: 0.9, interval: interval) == nil)
        // The stop point is a fraction of the snapshot's size, not of the COW with its fuse
        // reserve: a 4 MiB size in this 16 MiB COW stops at 7372.8 sectors; 6000 is 84 ms away.
        let sized = try #require(
            CowWatcher.nextPoll(usage: usage(6000), budgetSectors: 8192, previous: (at: 1.0, sectors: 6000 - 1638), now: 1.1, stopThreshold: 0.9, interval: interval))
        #expect(sized > .milliseconds(38) && sized < .milliseconds(46), "\(sized)")
    }

    @Test("the fuse reserve: a quarter of the size, at least 32 MiB, never past the whole origin")
    func fuseReserve() {
        let geometry = CowGeometry(chunkSectors: 8)
        #expect(geometry.fuseReserve(forSize: 8 << 20, originBytes: 1 << 30) == 32 << 20)
        #expect(geometry.fuseReserve(forSize: 400 << 20, originBytes: 4 << 30) == 100 << 20)
        // A 32 MiB volume: the whole origin needs 32 MiB and a bit of metadata; 4 MiB of size leaves the rest.
        #expect(geometry.fuseReserve(forSize: 4 << 20, originBytes: 32 << 20) == geometry.bytesForWholeOrigin(32 << 20) - (4 << 20))
        #expect(geometry.fuseReserve(forSize: geometry.bytesForWholeOrigin(32 << 20), originBytes: 32 << 20) == 0)
    }
}
