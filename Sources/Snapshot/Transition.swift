import BlockDevice
import DeviceMapper

/// One change of the snapshot stack's tables, described as data: the tables to load, the
/// order to suspend, what to check while everything is suspended, the order to resume, and
/// where the crash points sit. lvm2 does the same in libdm/libdm-deptree.c: a description
/// (its dm_tree) from which one executor derives the order of the kernel calls.
///
/// From a transition the executor (`TransitionExecutor`) derives everything that used to be
/// written by hand at each site: the watchdog's list (the resume order), the undo after a
/// failure (its `onFailure`), whether memory must be locked (a suspended device guard's pages
/// could fault on), and the one udev wait after the last resume (or the caller's, for a
/// batch it shares).
///
/// The descriptions of guard's transitions are `Transition.take`, `.drop`, `.startMerge`,
/// `.endFailedMerge`, `.restartMerge`, `.finishMerge`, `.blowFuse`, `.extend` and
/// `.reassemble` below; Docs/architecture.md draws them.
public struct Transition: @unchecked Sendable {
    // @unchecked: `check` is a closure run only by the executor, on the caller's thread.

    /// A table loaded (inactive) before the window; a later resume of the device makes it live.
    public struct Load {
        public var device: DeviceRef
        public var table: Table
        public var readOnly: Bool
        public var crashPointAfter: CrashPoint?

        public init(device: DeviceRef, table: Table, readOnly: Bool, crashPointAfter: CrashPoint? = nil) {
            self.device = device
            self.table = table
            self.readOnly = readOnly
            self.crashPointAfter = crashPointAfter
        }
    }

    public struct Suspension: Hashable, Sendable {
        public var device: DeviceRef
        /// Flush queued I/O (false for the fuse: its point is that nothing more is written).
        public var flush: Bool
        /// Freeze the filesystem on the device (FIFREEZE through the kernel).
        public var lockFileSystem: Bool
    }

    public struct Resumption {
        public var device: DeviceRef
        public var udevFlags: UdevFlags
        public var crashPointAfter: CrashPoint?
    }

    /// A target message sent with everything suspended (a thin pool's `create_snap`): to a
    /// device that is not suspended itself.
    public struct Message {
        public var device: DeviceRef
        public var text: String
        public var crashPointAfter: CrashPoint?
    }

    /// What the executor does when a call in the window fails.
    public enum OnFailure: Hashable, Sendable {
        /// Resume every device not resumed yet: tables loaded for this transition go live.
        /// For transitions whose durable decision (the label) is already written, so going
        /// forward is what recovery would do anyway.
        case completeForward
        /// Devices still suspended drop the table loaded for them and resume on the one
        /// they had: nothing of the transition happened to them.
        case revertSuspended
    }

    /// For messages: "snapshot window", "commit of website".
    public var name: String
    public var loads: [Load] = []
    public var suspensions: [Suspension]
    public var crashPointSuspended: CrashPoint?
    /// Sent in order once everything is suspended, before `check`.
    public var messages: [Message] = []
    /// Runs with every device of `suspensions` suspended; a throw fails the window.
    public var check: (() throws -> Void)?
    public var resumptions: [Resumption]
    /// Devices retired after the resumes: a `-real` (and the `-snap` over it) whose table keeps
    /// state of its own, once the origin's own table is live again. Made live again, it would be
    /// a second instance of that target over the same devices; left suspended, it would hold
    /// every process that reads it (lvm2's scan, blkid), and such a reader keeps its removal
    /// from succeeding: a hang no command ends. So each is suspended by the transition, gets an
    /// `error` table among its loads, is resumed onto it once every resumption is done (its own
    /// target is destroyed, never live again), and is removed after the window (by the kernel
    /// when its last opener closes it, if one still has it open).
    public var retirements: [DeviceRef] = []
    /// Devices this transition resumes that must be suspended again before a failed window puts
    /// the origins back on their own tables (a stateful `-real` the take made live).
    public var suspendBeforeRevert: [DeviceRef] = []
    public var onFailure: OnFailure

    /// The order the watchdog resumes in if guard dies or stalls inside the window.
    public var watchdogOrder: [DeviceRef] { resumptions.map(\.device) }

    /// What the watchdog does if guard dies or stalls inside the window.
    public var watchdogPlan: WatchdogPlan {
        WatchdogPlan(suspend: suspensions.map(\.device), resume: watchdogOrder + retirements, remove: retirements)
    }

    /// Devices whose suspension guard's own pages could fault on (known by number).
    public var suspendedNumbers: Set<DeviceNumber> {
        Set(suspensions.compactMap { if case .number(let number) = $0.device { number } else { nil } })
    }

    /// What is wrong with the description; empty for a transition the executor may run.
    /// A device suspended but never resumed would stay frozen; a table loaded but never
    /// resumed would never go live.
    public var problems: [String] {
        var problems: [String] = []
        let resumed = resumptions.map(\.device)
        for device in Set(resumed) where resumed.count(where: { $0 == device }) > 1 {
            problems.append("\(name): \(device) is resumed twice")
        }
        let suspended = suspensions.map(\.device)
        for device in Set(suspended) where suspended.count(where: { $0 == device }) > 1 {
            problems.append("\(name): \(device) is suspended twice")
        }
        for device in suspended where !resumed.contains(device) && !retirements.contains(device) {
            problems.append("\(name): \(device) is suspended and never resumed")
        }
        for device in retirements where resumed.contains(device) {
            problems.append("\(name): \(device) is resumed and retired")
        }
        for device in retirements where !suspended.contains(device) {
            problems.append("\(name): \(device) is retired without being suspended first")
        }
        for device in retirements where !loads.contains(where: { $0.device == device && $0.table.isOnly("error") }) {
            problems.append("\(name): \(device) is retired without an error table loaded for it")
        }
        for load in loads where !resumed.contains(load.device) && !retirements.contains(load.device) {
            problems.append("\(name): the table loaded into \(load.device) never goes live")
        }
        if suspensions.isEmpty { problems.append("\(name): nothing is suspended") }
        for message in messages where suspended.contains(message.device) {
            problems.append("\(name): the message '\(message.text)' goes to \(message.device), which is suspended then")
        }
        return problems
    }
}

// MARK: - The descriptions

extension Transition {
    /// The snapshot window (`lvcreate -s`): every origin suspended (flushed, frozen), then
    /// every `-snap` and every origin resumed, so all snapshots are of one instant. `prepare`
    /// loaded the tables and already made `-cow` and `-real` live: a `-real` is a second
    /// mapping of the origin's blocks that nothing opens, and a snapshot reads through it
    /// only once `-snap` is resumed, here, with the origin frozen (lvm2 resumes its new
    /// `-real` before the suspend too). A failure puts the origins still suspended back on
    /// their own tables (the set is then dropped).
    public static func take(_ stacks: [SnapshotStack]) -> Transition {
        func group(_ refs: [DeviceRef], _ flags: UdevFlags, _ crashPoint: CrashPoint?) -> [Resumption] {
            refs.enumerated().map { index, ref in
                Resumption(device: ref, udevFlags: flags, crashPointAfter: index == refs.count - 1 ? crashPoint : nil)
            }
        }
        let origins = stacks.map { DeviceRef.number($0.originNumber) }
        let classic = stacks.filter { $0.thin == nil }
        // A -real whose table keeps state goes live only now, its origin suspended (lvm2's
        // delay_resume_if_new): never two live instances of that target.
        let stateful = classic.filter(\.delaysRealResume).map { $0.ref(.real) }
        // A thin snapshot is one message to the volume's pool, with the volume suspended.
        let thin = stacks.compactMap(\.thin).enumerated().map { index, thin in
            Message(device: thin.poolRef, text: "create_snap \(thin.snapshotID) \(thin.originID)", crashPointAfter: index == 0 ? CrashPoint.windowThinSnapshot : nil)
        }
        return Transition(
            name: "snapshot window",
            suspensions: origins.map { Suspension(device: $0, flush: true, lockFileSystem: true) },
            crashPointSuspended: .windowSuspended,
            messages: thin,
            resumptions: group(stateful, .hidden, nil)
                + group(classic.map { $0.ref(.snap) }, [.hidden, .lowPriority], classic.isEmpty ? nil : .windowSnapResumed)
                + group(origins, [], nil),
            suspendBeforeRevert: stateful,
            onFailure: .revertSuspended)
    }

    /// The commit: the origin back on its own table (`own`); the snapshot, if any, suspended
    /// with it so nothing is copied into a COW about to go, and resumed so nothing stays
    /// frozen. The label says released before this runs. The origin's filesystem is not
    /// frozen: the suspend still waits for every write in flight (the copies into the COW
    /// with them) and holds new ones until the resume, and nothing needs the filesystem
    /// consistent at this instant (the snapshot is going), so the service does not wait for
    /// a freeze and its journal checkpoint a second time.
    ///
    /// For an origin whose own table keeps state (`statefulReal`), `-real` is suspended too,
    /// before the origin's own table goes live (its target commits its metadata on suspend and
    /// the origin's reads it on resume), and `-snap` and `-real` are retired: never live again.
    public static func drop(origin: DeviceInfo, own: Table, snap: DeviceInfo?, statefulReal: DeviceInfo? = nil, name: String) -> Transition {
        let snapRef = snap.map { DeviceRef.number($0.number) }
        let realRef = statefulReal.map { DeviceRef.number($0.number) }
        let quiet: [DeviceRef] = (snapRef.map { [$0] } ?? []) + (realRef.map { [$0] } ?? [])
        let retired = realRef == nil ? [] : quiet
        return Transition(
            name: name,
            loads: [Load(device: .number(origin.number), table: own, readOnly: origin.isReadOnly, crashPointAfter: .commitOriginLoaded)]
                + retirementLoads(retired, sectors: own.lengthSectors),
            suspensions: [Suspension(device: .number(origin.number), flush: true, lockFileSystem: false)]
                + quiet.map { Suspension(device: $0, flush: true, lockFileSystem: false) },
            crashPointSuspended: .commitSuspended,
            resumptions: [Resumption(device: .number(origin.number), udevFlags: [])]
                + (realRef == nil ? (snapRef.map { [Resumption(device: $0, udevFlags: [.hidden, .lowPriority])] } ?? []) : []),
            retirements: retired,
            onFailure: .completeForward)
    }

    /// The `error` tables of devices a transition retires (as large as the origin, as they are).
    static func retirementLoads(_ devices: [DeviceRef], sectors: UInt64) -> [Load] {
        devices.map { Load(device: $0, table: Table(.error, length: sectors), readOnly: false) }
    }

    /// The start of a rollback (`lvconvert --merge`): the origin gets `snapshot-merge` over
    /// `-real` and `-cow`, the snapshot an `error` table; resuming the origin hands the
    /// exceptions over. The label says merging before this runs.
    public static func startMerge(origin: DeviceInfo, snap: DeviceInfo, real: DeviceNumber, cow: DeviceNumber, stack: SnapshotStack) -> Transition {
        let originRef = DeviceRef.number(origin.number)
        let snapRef = DeviceRef.number(snap.number)
        return Transition(
            name: "rollback of \(stack.originName)",
            loads: [
                Load(
                    device: originRef,
                    table: Table(.snapshotMerge(origin: real, cow: cow, persistence: .persistent, chunkSectors: stack.chunkSectors), length: stack.originSectors),
                    readOnly: origin.isReadOnly, crashPointAfter: .mergeOriginLoaded),
                Load(device: snapRef, table: Table(.error, length: stack.originSectors), readOnly: false, crashPointAfter: .mergeSnapLoaded),
            ],
            suspensions: [Suspension(device: originRef, flush: true, lockFileSystem: false), Suspension(device: snapRef, flush: true, lockFileSystem: false)],
            crashPointSuspended: .mergeSuspended,
            resumptions: [
                Resumption(device: originRef, udevFlags: []),
                // Hidden: an error table, removed right after; udev must not probe it.
                Resumption(device: snapRef, udevFlags: [.hidden, .lowPriority], crashPointAfter: .mergeHandedOver),
            ],
            onFailure: .completeForward)
    }

    /// Ends a merge the kernel failed: the origin on an `error` table for an instant (the
    /// kernel allows one merging snapshot per COW, and the failed one must go first).
    public static func endFailedMerge(origin: DeviceInfo, stack: SnapshotStack) -> Transition {
        onOwnSuspend(origin, Table(.error, length: stack.originSectors), name: "end of the failed merge into \(stack.originName)")
    }

    /// A fresh `snapshot-merge` that reads the exceptions still in the COW and merges on.
    public static func restartMerge(origin: DeviceInfo, real: DeviceNumber, cow: DeviceNumber, stack: SnapshotStack) -> Transition {
        onOwnSuspend(
            origin,
            Table(.snapshotMerge(origin: real, cow: cow, persistence: .persistent, chunkSectors: stack.chunkSectors), length: stack.originSectors),
            name: "restart of the merge into \(stack.originName)")
    }

    /// The end of a merge the kernel reports complete: the origin back on its own table
    /// (`own`, `-real`'s). `check` runs with the origin quiet and must confirm completion;
    /// if it does not, the origin stays on the merge.
    /// For an origin whose own table keeps state (`statefulReal`), `-real` is suspended after
    /// the origin and retired once the origin's own table is live: never live again.
    public static func finishMerge(origin: DeviceInfo, own: Table, statefulReal: DeviceInfo? = nil, stack: SnapshotStack, check: @escaping () throws -> Void) -> Transition {
        let retired = statefulReal.map { [DeviceRef.number($0.number)] } ?? []
        return Transition(
            name: "teardown of the merge into \(stack.originName)",
            loads: [Load(device: .number(origin.number), table: own, readOnly: origin.isReadOnly, crashPointAfter: .finishOriginLoaded)]
                + retirementLoads(retired, sectors: stack.originSectors),
            suspensions: [Suspension(device: .number(origin.number), flush: true, lockFileSystem: true)]
                + retired.map { Suspension(device: $0, flush: true, lockFileSystem: false) },
            check: check,
            resumptions: [Resumption(device: .number(origin.number), udevFlags: [])],
            retirements: retired,
            onFailure: .revertSuspended)
    }

    /// guard's write fuse: the origin on `flakey` over `-real` refusing writes. The suspend
    /// neither flushes nor freezes: that would write dirty pages into the COW.
    public static func blowFuse(origin: DeviceInfo, real: DeviceNumber, stack: SnapshotStack) -> Transition {
        onOwnSuspend(origin, Table(.writeFuse(device: real), length: stack.originSectors), name: "write fuse of \(stack.originName)")
    }

    /// A grown `-cow`: its table one larger; the kernel's exception store sees the size on resume.
    public static func extend(cow: DeviceRef, table: Table, stack: SnapshotStack) -> Transition {
        Transition(
            name: "extension of the COW of \(stack.originName)",
            loads: [Load(device: cow, table: table, readOnly: false)],
            suspensions: [Suspension(device: cow, flush: true, lockFileSystem: false)],
            resumptions: [Resumption(device: cow, udevFlags: [])],
            onFailure: .completeForward)
    }

    /// A stack rebuilt after a reboot: `-real` and (for a snapshot) `-snap` are new devices
    /// with their tables loaded, the origin gets `snapshot-origin` (or `snapshot-merge` for a
    /// merge that resumes). A failure puts the origin back on its own table.
    public static func reassemble(origin: DeviceInfo, stack: SnapshotStack, real: DeviceNumber, cow: DeviceNumber, merging: Bool) -> Transition {
        let originRef = DeviceRef.number(origin.number)
        let chunk = stack.chunkSectors
        let sectors = stack.originSectors
        let table =
            merging
            ? Table(.snapshotMerge(origin: real, cow: cow, persistence: .persistent, chunkSectors: chunk), length: sectors)
            : Table(.snapshotOrigin(device: real), length: sectors)
        return Transition(
            name: "reassembly of \(stack.originName)",
            loads: (merging
                ? []
                : [Load(device: stack.ref(.snap), table: Table(.snapshot(origin: real, cow: cow, persistence: .persistent, chunkSectors: chunk), length: sectors), readOnly: false)])
                + [Load(device: originRef, table: table, readOnly: origin.isReadOnly)],
            suspensions: [Suspension(device: originRef, flush: true, lockFileSystem: true)],
            resumptions: [Resumption(device: stack.ref(.real), udevFlags: .hidden)]
                + (merging ? [] : [Resumption(device: stack.ref(.snap), udevFlags: [.hidden, .lowPriority])])
                + [Resumption(device: originRef, udevFlags: [])],
            onFailure: .revertSuspended)
    }

    /// A thin rollback: the volume's table goes from its own thin id to the snapshot's. The
    /// volume is unmounted; the suspend flushes what is in flight.
    public static func thinSwap(origin: DeviceInfo, table: Table, stack: SnapshotStack) -> Transition {
        let ref = DeviceRef.number(origin.number)
        return Transition(
            name: "rollback of \(stack.originName)",
            loads: [Load(device: ref, table: table, readOnly: origin.isReadOnly, crashPointAfter: .thinOriginLoaded)],
            suspensions: [Suspension(device: ref, flush: true, lockFileSystem: false)],
            resumptions: [Resumption(device: ref, udevFlags: [], crashPointAfter: .thinSwapped)],
            onFailure: .completeForward)
    }

    /// A thin pool's data grown: `-tdata` and the pool loaded larger; the pool suspended (its
    /// thin devices' I/O waits), `-tdata` suspended and resumed first, then the pool, which
    /// takes the new size on resume.
    public static func growPool(pool: DeviceNumber, poolTable: Table, data: DeviceNumber, dataTable: Table, name: String) -> Transition {
        let poolRef = DeviceRef.number(pool)
        let dataRef = DeviceRef.number(data)
        return Transition(
            name: name,
            loads: [Load(device: dataRef, table: dataTable, readOnly: false), Load(device: poolRef, table: poolTable, readOnly: false)],
            suspensions: [Suspension(device: poolRef, flush: true, lockFileSystem: false), Suspension(device: dataRef, flush: true, lockFileSystem: false)],
            resumptions: [Resumption(device: dataRef, udevFlags: .hidden), Resumption(device: poolRef, udevFlags: .hidden)],
            onFailure: .revertSuspended)
    }

    /// A thin pool suspended and resumed on its own table: the kernel counts its free blocks
    /// again and leaves out-of-data-space mode. Its thin devices' I/O waits meanwhile.
    public static func revivePool(_ pool: DeviceNumber, name: String) -> Transition {
        let ref = DeviceRef.number(pool)
        return Transition(
            name: name, suspensions: [Suspension(device: ref, flush: false, lockFileSystem: false)],
            resumptions: [Resumption(device: ref, udevFlags: .hidden)], onFailure: .completeForward)
    }

    /// One device to a new table, suspended without a flush or a freeze.
    private static func onOwnSuspend(_ device: DeviceInfo, _ table: Table, name: String) -> Transition {
        let ref = DeviceRef.number(device.number)
        return Transition(
            name: name,
            loads: [Load(device: ref, table: table, readOnly: device.isReadOnly)],
            suspensions: [Suspension(device: ref, flush: false, lockFileSystem: false)],
            resumptions: [Resumption(device: ref, udevFlags: [])],
            onFailure: .completeForward)
    }
}
