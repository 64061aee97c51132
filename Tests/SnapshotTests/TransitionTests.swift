import BlockDevice
import Snapshot
import Testing

@testable import DeviceMapper

/// The kernel calls a transition makes, in order, with a failure injected where a test says.
final class RecordingDevices: TransitionDevices, @unchecked Sendable {
    // @unchecked: used from one test's thread only.
    var calls: [String] = []
    var failAt: String?

    private func record(_ call: String) throws {
        calls.append(call)
        if call == failAt { throw SnapshotError(.other, "test", "injected failure at \(call)") }
    }
    func load(_ device: DeviceRef, table: Table, readOnly: Bool) throws {
        try record("load \(device) \(table.lines.first!.target.typeName)")
    }
    func clearInactiveTable(_ device: DeviceRef) throws { try record("clear \(device)") }
    func suspend(_ device: DeviceRef, flush: Bool, lockFileSystem: Bool) throws {
        try record("suspend \(device)\(flush ? "" : " noflush")\(lockFileSystem ? " lockfs" : "")")
    }
    func resume(_ device: DeviceRef, udevFlags: UdevFlags, batch: UdevBatch?) throws {
        try record("resume \(device)")
    }
    func message(_ device: DeviceRef, _ text: String) throws { try record("message \(device) \(text)") }
    func removeDevice(_ device: DeviceRef, batch: UdevBatch?) throws { try record("remove \(device)") }
}

final class RecordingWatchdog: WindowWatchdog, @unchecked Sendable {
    var armed: [[DeviceRef]] = []
    var plans: [WatchdogPlan] = []
    var disarms = 0
    func arm(_ plan: WatchdogPlan, timeout: Duration) throws {
        armed.append(plan.resume)
        plans.append(plan)
    }
    func disarm() -> Bool {
        disarms += 1
        return true
    }
}

@Suite("transitions: the stack's changes as data, one executor")
struct TransitionTests {
    static let identity0 = StackIdentity(runToken: "3f9a2c1e", volumeIndex: 0)
    static let identity1 = StackIdentity(runToken: "3f9a2c1e", volumeIndex: 1)

    static func stack(_ identity: StackIdentity, origin: UInt32) -> SnapshotStack {
        SnapshotStack(
            identity: identity, originName: "vg-lv\(origin)", originUUID: "LVM-\(origin)",
            originNumber: DeviceNumber(major: 254, minor: origin), originSectors: 2048, originTable: "0 2048 linear 7:0 0",
            storage: .file(path: "/var/lib/guard/cow/\(origin).cow"), storageBytes: 4 << 20, chunkSectors: 8)
    }

    static func info(_ minor: UInt32) -> DeviceInfo {
        DeviceInfo(
            name: "dm\(minor)", uuid: "", number: DeviceNumber(major: 254, minor: minor), openCount: 0, isSuspended: false,
            hasLiveTable: true, hasInactiveTable: false, isReadOnly: false, targetCount: 1, eventNumber: 0)
    }

    /// Runs `transition` on recorders; returns the calls, the crash points hit, the watchdog.
    static func run(_ transition: Transition, failAt: String? = nil) -> (
        calls: [String], crashPoints: [String], watchdog: RecordingWatchdog, error: (any Error)?, afterFailedLoad: Bool
    ) {
        let devices = RecordingDevices()
        devices.failAt = failAt
        let watchdog = RecordingWatchdog()
        var executor = TransitionExecutor(devices: devices, watchdog: watchdog, watchdogTimeout: .seconds(30), log: nil)
        var points: [String] = []
        var afterFailedLoad = false
        executor.crashPoint = { points.append($0.rawValue) }
        executor.mayFault = { _ in false }
        do {
            try executor.run(transition) { afterFailedLoad = true }
            return (devices.calls, points, watchdog, nil, afterFailedLoad)
        } catch {
            return (devices.calls, points, watchdog, error, afterFailedLoad)
        }
    }

    @Test("the snapshot window: origins suspended, then every -snap, every origin resumed (-real is live before); the watchdog knows that order")
    func take() {
        let take = Transition.take([Self.stack(Self.identity0, origin: 3), Self.stack(Self.identity1, origin: 4)])
        #expect(take.problems.isEmpty)
        let result = Self.run(take)
        #expect(result.error == nil)
        #expect(
            result.calls == [
                "suspend 254:3 lockfs", "suspend 254:4 lockfs",
                "resume GUARD-3f9a2c1e-0-snap", "resume GUARD-3f9a2c1e-1-snap",
                "resume 254:3", "resume 254:4",
            ])
        #expect(result.crashPoints == ["window.suspended", "window.snap-resumed"])
        #expect(result.watchdog.armed == [take.watchdogOrder])
        #expect(take.watchdogOrder.map(\.description) == result.calls.filter { $0.hasPrefix("resume") }.map { String($0.dropFirst(7)) })
        #expect(result.watchdog.disarms == 1)
    }

    @Test(
        "a set with a thin volume: every origin suspended, then create_snap to the pool (not suspended), the classic -snap and every origin resumed; a failed message puts the origins back"
    )
    func takeWithThin() {
        var thin = Self.stack(Self.identity1, origin: 4)
        thin.storage = .thinPool(path: "/dev/mapper/guard-pool-lv4")
        thin.thin = ThinSnapshot(poolUUID: "GUARD-POOL-lv4", originID: 0, snapshotID: 3, registry: "/var/lib/guard/volumes/lv4.json", blockSectors: 128)
        let take = Transition.take([Self.stack(Self.identity0, origin: 3), thin])
        #expect(take.problems.isEmpty)
        let result = Self.run(take)
        #expect(result.error == nil)
        #expect(
            result.calls == [
                "suspend 254:3 lockfs", "suspend 254:4 lockfs",
                "message GUARD-POOL-lv4 create_snap 3 0",
                "resume GUARD-3f9a2c1e-0-snap",
                "resume 254:3", "resume 254:4",
            ])
        #expect(result.crashPoints == ["window.suspended", "window.thin-snapshot", "window.snap-resumed"])
        let failed = Self.run(take, failAt: "message GUARD-POOL-lv4 create_snap 3 0")
        #expect(failed.error != nil)
        #expect(failed.calls.suffix(4) == ["clear 254:3", "resume 254:3", "clear 254:4", "resume 254:4"], "\(failed.calls)")
        // A message to a device the window suspends would hang: refused.
        var wrong = take
        wrong.messages[0].device = .number(DeviceNumber(major: 254, minor: 4))
        #expect(!wrong.problems.isEmpty)
    }

    @Test("a window's timing: start, all suspended, end in order; the journal's words give the whole and its two parts")
    func windowTiming() throws {
        var executor = TransitionExecutor(devices: RecordingDevices(), watchdog: RecordingWatchdog(), watchdogTimeout: .seconds(30), log: nil)
        executor.crashPoint = { _ in }
        executor.mayFault = { _ in false }
        let timing = try executor.run(.take([Self.stack(Self.identity0, origin: 3)]))
        #expect(timing.start <= timing.suspended && timing.suspended <= timing.end)
        #expect(
            timing.microseconds == (timing.suspendMicroseconds + timing.resumeMicroseconds) || timing.microseconds == timing.suspendMicroseconds + timing.resumeMicroseconds + 1)
        let start = ContinuousClock.now
        let fixed = WindowTiming(start: start, suspended: start + .microseconds(48_000), end: start + .microseconds(61_234))
        #expect(fixed.description == "suspended for 61234 µs (suspend and freeze 48000 µs, resumes 13234 µs)")
    }

    @Test("a failed snapshot window puts the origins still suspended back on their own tables, and only those")
    func takeFailure() {
        let take = Transition.take([Self.stack(Self.identity0, origin: 3), Self.stack(Self.identity1, origin: 4)])
        // The second origin's suspend fails: the first goes back, the second was never suspended.
        let early = Self.run(take, failAt: "suspend 254:4 lockfs")
        #expect(early.error != nil)
        #expect(early.calls == ["suspend 254:3 lockfs", "suspend 254:4 lockfs", "clear 254:3", "resume 254:3"])
        #expect(early.watchdog.disarms == 1)
        // The first origin resumed on its snapshot-origin, the second's resume fails: it goes back alone.
        let late = Self.run(take, failAt: "resume 254:4")
        #expect(late.calls.suffix(3) == ["resume 254:4", "clear 254:4", "resume 254:4"])
        #expect(!late.calls.contains("clear 254:3"))
    }

    @Test("a commit whose window fails goes forward: every device not resumed yet is resumed (the label already says released)")
    func dropForward() {
        let drop = Transition.drop(origin: Self.info(3), own: Table(.error, length: 2048), snap: Self.info(9), name: "commit of vg-lv3")
        #expect(drop.problems.isEmpty)
        let ok = Self.run(drop)
        #expect(ok.calls == ["load 254:3 error", "suspend 254:3", "suspend 254:9", "resume 254:3", "resume 254:9"], "the commit flushes without freezing the filesystem")
        #expect(ok.crashPoints == ["commit.origin-loaded", "commit.suspended"])
        let failed = Self.run(drop, failAt: "suspend 254:9")
        #expect(failed.error != nil)
        #expect(failed.calls.suffix(2) == ["resume 254:3", "resume 254:9"])
        #expect(!failed.calls.contains { $0.hasPrefix("clear") })
    }

    @Test("a table that does not load is cleared with those loaded before it; nothing is suspended, the watchdog never armed")
    func loadFailure() {
        let stack = Self.stack(Self.identity0, origin: 3)
        let merge = Transition.startMerge(origin: Self.info(3), snap: Self.info(9), real: DeviceNumber(major: 254, minor: 7), cow: DeviceNumber(major: 254, minor: 8), stack: stack)
        #expect(merge.problems.isEmpty)
        let ok = Self.run(merge)
        #expect(ok.calls == ["load 254:3 snapshot-merge", "load 254:9 error", "suspend 254:3", "suspend 254:9", "resume 254:3", "resume 254:9"])
        #expect(ok.crashPoints == ["merge.origin-loaded", "merge.snap-loaded", "merge.suspended", "merge.handed-over"])
        let failed = Self.run(merge, failAt: "load 254:9 error")
        #expect(failed.error != nil && failed.afterFailedLoad)
        #expect(failed.calls == ["load 254:3 snapshot-merge", "load 254:9 error", "clear 254:3", "clear 254:9"])
        #expect(failed.watchdog.armed.isEmpty && failed.watchdog.disarms == 0)
    }

    @Test("a merge that is not complete with the origin quiet leaves the origin on the merge")
    func finishCheck() {
        struct NotComplete: Error {}
        let stack = Self.stack(Self.identity0, origin: 3)
        let finish = Transition.finishMerge(origin: Self.info(3), own: Table(.error, length: 2048), stack: stack) { throw NotComplete() }
        let result = Self.run(finish)
        #expect(result.error is NotComplete)
        #expect(result.calls == ["load 254:3 error", "suspend 254:3 lockfs", "clear 254:3", "resume 254:3"])
        let done = Self.run(Transition.finishMerge(origin: Self.info(3), own: Table(.error, length: 2048), stack: stack) {})
        #expect(done.calls == ["load 254:3 error", "suspend 254:3 lockfs", "resume 254:3"])
    }

    @Test("the fuse and the restart of a merge suspend without a flush or a freeze; reassembly resumes the new layers before the origin")
    func otherShapes() {
        let stack = Self.stack(Self.identity0, origin: 3)
        let real = DeviceNumber(major: 254, minor: 7)
        let cow = DeviceNumber(major: 254, minor: 8)
        #expect(Self.run(.blowFuse(origin: Self.info(3), real: real, stack: stack)).calls == ["load 254:3 flakey", "suspend 254:3 noflush", "resume 254:3"])
        #expect(Self.run(.endFailedMerge(origin: Self.info(3), stack: stack)).calls == ["load 254:3 error", "suspend 254:3 noflush", "resume 254:3"])
        #expect(Self.run(.restartMerge(origin: Self.info(3), real: real, cow: cow, stack: stack)).calls == ["load 254:3 snapshot-merge", "suspend 254:3 noflush", "resume 254:3"])
        #expect(
            Self.run(.extend(cow: stack.ref(.cow), table: Table(.error, length: 8), stack: stack)).calls == [
                "load GUARD-3f9a2c1e-0-cow error", "suspend GUARD-3f9a2c1e-0-cow", "resume GUARD-3f9a2c1e-0-cow",
            ])
        #expect(
            Self.run(.reassemble(origin: Self.info(3), stack: stack, real: real, cow: cow, merging: false)).calls == [
                "load GUARD-3f9a2c1e-0-snap snapshot", "load 254:3 snapshot-origin", "suspend 254:3 lockfs",
                "resume GUARD-3f9a2c1e-0-real", "resume GUARD-3f9a2c1e-0-snap", "resume 254:3",
            ])
        let merging = Self.run(.reassemble(origin: Self.info(3), stack: stack, real: real, cow: cow, merging: true), failAt: "resume 254:3")
        #expect(merging.calls == ["load 254:3 snapshot-merge", "suspend 254:3 lockfs", "resume GUARD-3f9a2c1e-0-real", "resume 254:3", "clear 254:3", "resume 254:3"])
    }

    /// A stack whose origin is a raid1 LV: its table keeps state.
    static func raidStack(_ identity: StackIdentity, origin: UInt32) -> SnapshotStack {
        var stack = Self.stack(identity, origin: origin)
        stack.originTable = "0 2048 raid raid1 3 0 region_size 1024 2 254:5 254:6 254:7 254:8"
        return stack
    }

    @Test(
        "a table that keeps state (raid1, writecache) is never live twice: the take resumes its -real inside the window after every origin is suspended; a failed window suspends it again before the origins go back"
    )
    func takeStateful() {
        let raid = Self.raidStack(Self.identity0, origin: 3)
        #expect(raid.delaysRealResume && !Self.stack(Self.identity1, origin: 4).delaysRealResume)
        let take = Transition.take([raid, Self.stack(Self.identity1, origin: 4)])
        #expect(take.problems.isEmpty)
        let result = Self.run(take)
        #expect(
            result.calls == [
                "suspend 254:3 lockfs", "suspend 254:4 lockfs",
                "resume GUARD-3f9a2c1e-0-real",
                "resume GUARD-3f9a2c1e-0-snap", "resume GUARD-3f9a2c1e-1-snap",
                "resume 254:3", "resume 254:4",
            ])
        #expect(take.watchdogOrder.first == raid.ref(.real), "the watchdog resumes -real first too")
        let failed = Self.run(take, failAt: "resume 254:3")
        #expect(failed.error != nil)
        #expect(failed.calls.suffix(5) == ["suspend GUARD-3f9a2c1e-0-real noflush", "clear 254:3", "resume 254:3", "clear 254:4", "resume 254:4"], "\(failed.calls)")
    }

    @Test(
        "the commit and the end of a merge of a stateful origin: -real suspended before the origin's own table goes live, then retired (an error table made live, never suspended for good, never its own again) and removed, with -snap"
    )
    func dropAndFinishStateful() {
        let stack = Self.raidStack(Self.identity0, origin: 3)
        let own = try! Table(parsing: stack.originTable)
        let drop = Transition.drop(origin: Self.info(3), own: own, snap: Self.info(9), statefulReal: Self.info(7), name: "commit of vg-lv3")
        #expect(drop.problems.isEmpty, "\(drop.problems)")
        let committed = Self.run(drop)
        #expect(
            committed.calls == [
                "load 254:3 raid", "load 254:9 error", "load 254:7 error", "suspend 254:3", "suspend 254:9", "suspend 254:7",
                "resume 254:3", "resume 254:9", "resume 254:7", "remove 254:9", "remove 254:7",
            ], "\(committed.calls)")
        #expect(drop.watchdogPlan.resume.map(\.description) == ["254:3", "254:9", "254:7"], "the watchdog resumes the origin first, then -snap and -real onto their error tables")
        #expect(committed.watchdog.plans == [drop.watchdogPlan])
        #expect(drop.watchdogPlan.suspend.map(\.description) == ["254:3", "254:9", "254:7"] && drop.watchdogPlan.remove.map(\.description) == ["254:9", "254:7"])
        // The origin's resume fails: the commit goes forward (the label says released); -real is
        // retired only once the origin is on its own table.
        let stuck = Self.run(drop, failAt: "resume 254:3")
        #expect(stuck.error != nil && !stuck.calls.contains("resume 254:7"), "\(stuck.calls)")
        let finish = Transition.finishMerge(origin: Self.info(3), own: own, statefulReal: Self.info(7), stack: stack) {}
        #expect(finish.problems.isEmpty)
        #expect(Self.run(finish).calls == ["load 254:3 raid", "load 254:7 error", "suspend 254:3 lockfs", "suspend 254:7", "resume 254:3", "resume 254:7", "remove 254:7"])
        struct NotComplete: Error {}
        let incomplete = Self.run(Transition.finishMerge(origin: Self.info(3), own: own, statefulReal: Self.info(7), stack: stack) { throw NotComplete() })
        #expect(
            incomplete.calls.suffix(4) == ["clear 254:3", "resume 254:3", "clear 254:7", "resume 254:7"],
            "a merge not complete goes on as it was, -real on its own table: \(incomplete.calls)")
        #expect(!incomplete.calls.contains { $0.hasPrefix("remove") })
        // A failed retirement: the device stays suspended (never its own table again), the error says so.
        let unretired = Self.run(finish, failAt: "resume 254:7")
        #expect("\(unretired.error.map { "\($0)" } ?? "")".contains("could not be retired") && !unretired.calls.contains("remove 254:7"))
        var resumedAndRetired = drop
        resumedAndRetired.retirements.append(.number(DeviceNumber(major: 254, minor: 3)))
        #expect(resumedAndRetired.problems.contains("commit of vg-lv3: 254:3 is resumed and retired"))
        var noErrorTable = drop
        noErrorTable.loads.removeLast()
        #expect(noErrorTable.problems.contains("commit of vg-lv3: 254:7 is retired without an error table loaded for it"))
    }

    @Test("guard's classic snapshot is refused on the targets it is not proven on, by name")
    func unprovenTargets() throws {
        func unproven(_ text: String) throws -> [String] { try Table(parsing: text).unprovenTargets }
        #expect(try unproven("0 2048 linear 7:0 0\n2048 2048 striped 2 128 7:1 0 7:2 0").isEmpty)
        #expect(try unproven("0 2048 raid raid1 3 0 region_size 1024 2 254:5 254:6 254:7 254:8").isEmpty)
        #expect(try unproven("0 2048 writecache s 254:1 254:2 4096 0").isEmpty)
        #expect(try unproven("0 2048 raid raid5_ls 3 128 region_size 1024 3 - 254:5 - 254:6 - 254:7") == ["raid5_ls"])
        #expect(try unproven("0 2048 cache 254:1 254:2 254:3 64 1 writethrough smq 0") == ["cache"])
        #expect(try unproven("0 2048 mirror core 1 1024 2 254:1 0 254:2 0") == ["mirror"])
        #expect(try Table(parsing: "0 2048 cache 254:1 254:2 254:3 64 1 writethrough smq 0").keepsState)
        #expect(try !Table(parsing: "0 2048 crypt aes-xts-plain64 :64:logon:k 0 7:0 4096").keepsState)
    }

    @Test("an executor without a watchdog suspends nothing: refused before the first suspend")
    func unarmedExecutorRefuses() {
        let devices = RecordingDevices()
        var executor = TransitionExecutor(devices: devices, watchdog: nil, watchdogTimeout: .seconds(30), log: nil)
        executor.crashPoint = { _ in }
        executor.mayFault = { _ in false }
        #expect(throws: SnapshotError.self) { try executor.run(.take([Self.stack(Self.identity0, origin: 3)])) }
        #expect(!devices.calls.contains { $0.hasPrefix("suspend") })
    }

    @Test("a description that would leave a device frozen or a table never live is refused before any kernel call")
    func refusedDescriptions() {
        var bad = Transition.take([Self.stack(Self.identity0, origin: 3)])
        bad.resumptions.removeLast()  // the origin would stay suspended
        #expect(bad.problems == ["snapshot window: 254:3 is suspended and never resumed"])
        let result = Self.run(bad)
        #expect(result.error != nil && result.calls.isEmpty && result.watchdog.armed.isEmpty)
        var unresumedLoad = Transition.drop(origin: Self.info(3), own: Table(.error, length: 2048), snap: nil, name: "commit")
        unresumedLoad.loads.append(.init(device: .number(DeviceNumber(major: 254, minor: 5)), table: Table(.error, length: 8), readOnly: false))
        #expect(unresumedLoad.problems == ["commit: the table loaded into 254:5 never goes live"])
    }
}
