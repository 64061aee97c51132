import BlockDevice
import DeviceMapper
import Foundation
import Quantities

/// Resumes devices if guard dies or stalls while they are suspended.
///
/// `arm` must return only once the watchdog is ready to act (a separate process that
/// does not depend on any suspended volume); `disarm` after the last resume.
public protocol WindowWatchdog: AnyObject {
    /// If `disarm()` does not follow within `timeout`, or this process dies, finish the window
    /// `plan` describes: once any of its devices is suspended, suspend the rest in order, resume
    /// in order, then remove what must never be live again.
    func arm(_ plan: WatchdogPlan, timeout: Duration) throws
    /// - Returns: false when the watchdog did not confirm: it fired (and resumed the devices
    ///   itself) or died; the caller says so.
    @discardableResult
    func disarm() -> Bool
}

/// guard's own implementation of `lvcreate -s`, the removal of a snapshot, and
/// `lvconvert --merge`, for any active device-mapper volume (an LVM LV or a guard volume).
///
/// Every operation is written so that it can be repeated after a crash at any line: it
/// looks at what the kernel has (by GUARD- UUID) and the COW label, and does what is left.
/// The order of kernel calls is lvm2's (lib/activate/dev_manager.c, libdm/libdm-deptree.c).
/// How the loop device of a COW file writes it: through the backing file's page cache
/// (`buffered`), or with direct I/O (`direct`), over a file whose extents were written with
/// zeros when it was made (`directZeroed`). See `Scripts/bench`, section 4b.
public enum CowFileIO: String, Sendable {
    case buffered, direct
    case directZeroed = "direct-zeroed"
    public static let `default`: CowFileIO = .directZeroed
}

public struct SnapshotEngine {
    /// 4 KiB chunks (8 sectors), lvm2's default; `Scripts/bench` compares 4, 16 and 64 KiB.
    public static let defaultChunkSectors: UInt32 = 8

    /// How a COW file is written by its loop device (see `CowFileIO`).
    public static var cowFileIO: CowFileIO {
        if TestHooks.isEnabled, let value = getenv("GUARD_COW_IO").map({ String(cString: $0) }), let io = CowFileIO(rawValue: value) { return io }
        return .default
    }
    /// How long a suspend window may last before the watchdog resumes everything.
    public static let defaultWatchdogTimeout: Duration = .seconds(30)

    public let dm: DeviceMapper
    public var watchdog: (any WindowWatchdog)?
    public var watchdogTimeout: Duration = SnapshotEngine.defaultWatchdogTimeout
    /// Receives one line per step, for guard's log. Never called while a device is suspended.
    public var log: (@Sendable (String) -> Void)?

    public init(dm: DeviceMapper, watchdog: (any WindowWatchdog)? = nil, log: (@Sendable (String) -> Void)? = nil) {
        self.dm = dm
        self.watchdog = watchdog
        self.log = log
    }

    // MARK: Origins

    /// An origin as guard found it: its device, table and size.
    public struct Origin: Sendable, Hashable {
        public var info: DeviceInfo
        public var table: Table
        public var bytes: UInt64 { table.lengthSectors * 512 }
    }

    /// Finds the active dm volume behind `path` (/dev/mapper/X, /dev/VG/LV, /dev/dm-N or a dm name)
    /// and checks that guard can snapshot it.
    ///
    /// - Throws: `SnapshotError` with `.originNotFound`, `.notAVolume` or `.alreadySnapshotted`.
    public func inspectOrigin(_ path: String) throws -> Origin {
        let operation = "snapshot of \(path)"
        let ref: DeviceRef
        if path.hasPrefix("/") {
            let number: DeviceNumber
            do {
                number = try BlockDevices.deviceNumber(of: path)
            } catch {
                throw SnapshotError(.originNotFound, operation, "\(error)", hint: "check the device path (lvs, dmsetup ls)")
            }
            guard BlockDevices.deviceMapperName(of: number) != nil else {
                throw SnapshotError(
                    .notAVolume, operation, "\(path) (\(number)) is not a device-mapper device",
                    hint: "guard snapshots LVM logical volumes and guard volumes (`guard volume create`)")
            }
            ref = .number(number)
        } else {
            ref = .name(path)
        }
        guard let info = try dm.info(ref) else {
            throw SnapshotError(.originNotFound, operation, "no device-mapper device \(path)", hint: "check `dmsetup ls`")
        }
        guard info.hasLiveTable else {
            throw SnapshotError(.notAVolume, operation, "\(info.name) has no live table (it is not active)")
        }
        if info.isSuspended {
            throw SnapshotError(.inUse, operation, "\(info.name) is suspended", hint: "resume it (`dmsetup resume \(info.name)`) or run `guard recover`")
        }
        if info.hasInactiveTable {
            throw SnapshotError(
                .inUse, operation, "\(info.name) has an inactive table loaded (another tool is changing it)", hint: "run `guard recover` or `dmsetup clear \(info.name)`")
        }
        if let (identity, layer) = StackIdentity.parse(uuid: info.uuid) {
            throw SnapshotError(.alreadySnapshotted, operation, "\(info.name) is guard's own \(layer.rawValue) layer of run \(identity.runToken)")
        }
        let table = try dm.table(ref)
        for line in table.lines {
            switch line.target {
            case .snapshotOrigin:
                throw SnapshotError(
                    .alreadySnapshotted, operation, "\(info.name) already has a snapshot (its table is snapshot-origin)",
                    hint: "commit or roll back the earlier run (`guard status`), or remove the LVM snapshot (`lvs`)")
            case .snapshotMerge:
                throw SnapshotError(.mergeInProgress, operation, "\(info.name) is merging a snapshot", hint: "wait for it (`guard status --wait`)")
            case .writeFuse:
                throw SnapshotError(
                    .alreadySnapshotted, operation, "\(info.name) has a snapshot and refuses writes (guard's fuse)",
                    hint: "roll back or commit the earlier run (`guard status`)")
            case .snapshot:
                throw SnapshotError(.notAVolume, operation, "\(info.name) is itself a snapshot")
            default: continue
            }
        }
        // A classic snapshot's -real runs the origin's own table a second time: proven end to end
        // for these targets only (a guard thin volume takes thin snapshots in its pool instead).
        let unproven = table.unprovenTargets.filter { !($0 == "thin" && info.uuid.hasPrefix(DeviceMapper.uuidPrefix + "VOL-")) }
        if !unproven.isEmpty {
            throw SnapshotError(
                .notAVolume, operation,
                "\(info.name) is a \(unproven.joined(separator: "/")) volume: guard's snapshot is not proven on it (a target that keeps state of its own must never run twice over the same devices, and guard's suite has not shown that it does not)",
                hint: "snapshot it with lvm2 (`lvcreate -s`); guard snapshots linear, striped, crypt, raid1 and writecache volumes")
        }
        return Origin(info: info, table: table)
    }

    /// Whether `device` is a dm-crypt device or stacked on one: what it reads is decrypted, so a
    /// snapshot's COW of it holds plaintext.
    public func isOnEncryption(_ device: DeviceNumber) -> Bool {
        ([device] + BlockDevices.allLowerDevices(of: device)).contains { number in
            BlockDevices.deviceMapperName(of: number) != nil && (try? dm.table(.number(number)))?.lines.contains { $0.target.typeName == "crypt" } == true
        }
    }

    /// Whether what is written in `directory` may land on `origin` (its filesystem is on it or on
    /// something stacked over it). A filesystem whose devices cannot be told (FUSE, NFS) counts
    /// as on it: guard never puts what a merge would roll back where it cannot check.
    public static func isOnDevice(_ directory: String, _ origin: DeviceNumber) -> Bool {
        guard let devices = Mounts.backingDevices(of: directory) else { return true }
        return devices.contains { $0 == origin || BlockDevices.allLowerDevices(of: $0).contains(origin) }
    }

    // MARK: Taking a snapshot set

    /// Prepares the stacks of a snapshot set without suspending anything: COW storage with its
    /// label, `-cow` live, `-real` and `-snap` loaded, the origins' inactive tables `snapshot-origin`.
    ///
    /// - Parameters:
    ///   - requests: one per volume, in recipe order (the suspend order).
    ///   - token: the run's token, in every layer's UUID.
    /// - Returns: a prepared set that must be taken or abandoned.
    /// - Throws: `SnapshotError` for refusals (nothing is left behind), `DeviceMapperError` or
    ///   `BlockDeviceError` from the kernel (what was built is torn down first).
    public func prepare(_ requests: [VolumeRequest], token: String) throws -> PreparedSnapshotSet {
        try prepare(plan(requests, token: token))
    }

    /// Decides everything about a snapshot set without touching anything: the origins and
    /// their tables, the COW storage and sizes, the layer names and UUIDs. A caller journals
    /// the result before `prepare(_:)` builds it, so a crash in between leaves nothing the
    /// journal does not describe.
    /// - Throws: `SnapshotError` for every refusal.
    public func plan(_ requests: [VolumeRequest], token: String) throws -> [SnapshotStack] {
        var origins: [Origin] = []
        for request in requests {
            let origin = try inspectOrigin(request.origin)
            if origins.contains(where: { $0.info.number == origin.info.number }) {
                throw SnapshotError(.other, "snapshot of \(request.origin)", "the volume is named twice")
            }
            origins.append(origin)
        }
        var stacks: [SnapshotStack] = []
        for (index, (origin, request)) in zip(origins, requests).enumerated() {
            let geometry = CowGeometry(chunkSectors: request.chunkSectors)
            let budget = request.size.resolve(originBytes: origin.bytes, geometry: geometry)
            // The fuse reserve, where the whole origin would not fit in the size already.
            let whole = geometry.bytesForWholeOrigin(origin.bytes)
            let area = budget >= whole ? budget : budget + min(geometry.roundUp(request.reserveBytes), whole - budget)
            let operation = "snapshot of \(origin.info.path)"
            let storage: CowStorage
            let storageBytes: UInt64
            var thin: ThinSnapshot?
            switch request.storage {
            case .thinPool(let registry):
                var planned = try planThin(origin: origin, registry: registry, operation: operation)
                // `size: auto` sized the pool for this run (the request's size is the pool's):
                // it grows before the snapshot.
                if case .bytes(let poolBytes) = request.size, poolBytes > planned.dataBytes {
                    planned.dataBytes = try growThinPool(origin.info.name, registry: registry, to: poolBytes)
                }
                (thin, storage, storageBytes) = (planned.0, planned.storage, planned.dataBytes + CowLabel.areaOffset)
            case .fileIn(let directory):
                for other in origins where Self.isOnDevice(directory, other.info.number) {
                    throw SnapshotError(
                        .cowOnOrigin, operation,
                        "the COW file would live in \(directory), on \(other.info.path), a volume of this snapshot set (a rollback would roll the COW back too)",
                        hint: "put the COW on another filesystem (`cow:` in the recipe, or --state-dir)")
                }
                storageBytes = area + CowLabel.areaOffset
                let free = try freeSpace(at: directory)
                if free < storageBytes + (16 << 20) {
                    throw SnapshotError(
                        .noSpace, operation,
                        "the COW needs \(formatBytes(storageBytes)) in \(directory), which has \(formatBytes(free)) free",
                        hint: "free space, choose a smaller snapshot size, or put the COW elsewhere")
                }
                storage = .file(path: "\(directory)/\(token)-\(index).cow")
            case .blockDevice(let named):
                // A kernel name (/dev/sdc) can be another disk after a reboot: the plan keeps the
                // device's stable name, or refuses.
                var path = named
                if BlockDevices.isKernelName(named) {
                    guard let stable = BlockDevices.stablePath(of: named) else {
                        throw SnapshotError(
                            .notAVolume, operation,
                            "the COW device \(named) is named by the kernel's name for it, which can be another disk after a reboot, and it has no /dev/disk/by-id name",
                            hint: "name it by a path that stays its own (/dev/disk/by-id/..., /dev/VG/LV)")
                    }
                    path = stable
                }
                let number: DeviceNumber
                do { number = try BlockDevices.deviceNumber(of: path) } catch {
                    throw SnapshotError(.other, operation, "COW device: \(error)")
                }
                for other in origins where number == other.info.number || BlockDevices.allLowerDevices(of: number).contains(other.info.number) {
                    throw SnapshotError(.cowOnOrigin, operation, "the COW device \(path) is stacked on \(other.info.path), a volume of this snapshot set")
                }
                try Self.requireBlank(cowDevice: path, number: number, operation: operation)
                storageBytes = try BlockDevices.size(of: path)
                if storageBytes < budget + CowLabel.areaOffset {
                    throw SnapshotError(
                        .cowTooSmall, operation, "the COW device \(path) has \(formatBytes(storageBytes)), the snapshot needs \(formatBytes(budget + CowLabel.areaOffset))")
                }
                storage = .blockDevice(path: path)
            }
            var stack = SnapshotStack(
                identity: StackIdentity(runToken: token, volumeIndex: index), originName: origin.info.name,
                originUUID: origin.info.uuid, originNumber: origin.info.number, originSectors: origin.table.lengthSectors,
                originTable: origin.table.redacted.description, storage: storage, storageBytes: storageBytes,
                chunkSectors: request.chunkSectors)
            if case .blockDevice = storage { stack.storageIdentity = BlockDevices.stableIdentity(of: storage.path) }
            // A device's space past the size is all reserve (it cannot grow); a pool has none.
            stack.reserveBytes = stack.areaBytes > budget && thin == nil ? stack.areaBytes - budget : nil
            stack.thin = thin
            _ = try stack.label(state: .preparing, createdAt: 0).encodedSlot()  // it fits, or nothing is written
            stacks.append(stack)
        }
        return stacks
    }

    /// Refuses a COW device that holds anything guard would destroy, before any write: a disk
    /// with partitions, a device open exclusively (mounted, a PV, swap, RAID), any signature
    /// libblkid knows (filesystem, LVM, swap, RAID, partition table), or a guard label of a
    /// snapshot that is not released.
    static func requireBlank(cowDevice path: String, number: DeviceNumber, operation: String) throws {
        if !Mounts.mountPoints(of: number).isEmpty || !BlockDevices.holders(of: number).isEmpty {
            throw SnapshotError(.inUse, operation, "the COW device \(path) is mounted or in use", hint: "name an unused device: guard overwrites it")
        }
        let partitions = BlockDevices.partitions(of: number)
        if !partitions.isEmpty {
            throw SnapshotError(
                .inUse, operation, "the COW device \(path) is a disk with partitions (\(partitions.joined(separator: ", "))); guard would overwrite them",
                hint: "name an unused partition or disk")
        }
        let probe = open(path, O_RDONLY | O_EXCL | O_CLOEXEC)
        if probe < 0 {
            let reason = String(cString: strerror(errno))
            throw SnapshotError(
                .inUse, operation, "the COW device \(path) cannot be opened exclusively (\(reason)): something uses it", hint: "name an unused device: guard overwrites it")
        }
        close(probe)
        let found: [String]
        do { found = try BlockDevices.signatures(of: path) } catch {
            throw SnapshotError(.other, operation, "the COW device \(path) cannot be probed for signatures: \(error)", hint: "check the device")
        }
        if !found.isEmpty {
            throw SnapshotError(
                .inUse, operation, "the COW device \(path) holds \(found.joined(separator: ", ")) (found by libblkid); guard would overwrite it",
                hint: "name a blank device; if what it holds is unneeded, erase it yourself (`wipefs -a \(path)`)")
        }
        if let label = try? CowLabel.read(from: path), label.state != .released {
            throw SnapshotError(
                .inUse, operation,
                "the COW device \(path) holds guard's \(label.state.rawValue) snapshot of \(label.originName) (run \(label.identity.runToken)), which may hold old blocks",
                hint: "finish that run first (`guard status`, `guard recover`)")
        }
    }

    /// Why `path` cannot be a COW device, or nil (the planner's check, before anything is written).
    public static func cowDeviceProblem(_ path: String) -> String? {
        do {
            let number = try BlockDevices.deviceNumber(of: path)
            try requireBlank(cowDevice: path, number: number, operation: "COW device \(path)")
            return nil
        } catch let error as SnapshotError {
            return error.description
        } catch {
            return "COW device \(path): \(error)"
        }
    }

    /// Builds planned stacks (see `plan`): after a failure, what was built is removed.
    public func prepare(_ stacks: [SnapshotStack]) throws -> PreparedSnapshotSet {
        var handles: [LoopHandle] = []
        var built: [SnapshotStack] = []
        // One udev wait for the whole take: the layers' resumes here and the window's share
        // a cookie, waited for after the window (the tables name devices by number, so
        // nothing here needs udev's /dev nodes).
        let udev = UdevBatch()
        do {
            for stack in stacks {
                let origin = try inspectOrigin(stack.originPath)
                guard origin.info.number == stack.originNumber, origin.table.redacted.description == stack.originTable else {
                    throw SnapshotError(.other, "snapshot of \(stack.originPath)", "the volume changed since it was planned (its table is now \(origin.table))")
                }
                built.append(stack)
                if let handle = try build(stack, origin: origin, udev: udev) { handles.append(handle) }
            }
        } catch {
            log?("preparing the snapshot set failed (\(error)); removing what was built")
            udev.finish()
            handles.forEach { $0.release() }
            for stack in built.reversed() { try? drop(stack) }
            throw error
        }
        return PreparedSnapshotSet(engine: self, stacks: stacks, handles: handles, udev: udev)
    }

    /// Builds one stack up to the inactive origin table (`-cow` and `-real` live, `-snap`
    /// loaded); returns the COW loop handle to keep until the snapshot holds the loop device.
    private func build(_ stack: SnapshotStack, origin: Origin, udev: UdevBatch) throws -> LoopHandle? {
        if let thin = stack.thin {
            try prepareThin(stack, thin)
            return nil
        }
        let now = Int64(Date().timeIntervalSince1970)
        var label = stack.label(state: .preparing, createdAt: now)
        var handle: LoopHandle?
        let cowDevice: DeviceNumber
        switch stack.storage {
        case .file(let path):
            let file = try Self.isStaged(stack) ? RawFile(path: path) : Self.makeCowFile(stack, log: log)
            try file.write([UInt8](repeating: 0, count: 4096), at: CowLabel.areaOffset)
            try label.write(to: file)
            CrashPoint.hit(.prepareCowFile)
            let loop = try attachCowFile(path)
            handle = loop
            cowDevice = loop.device.number
        case .blockDevice(let path):
            // Exclusive from the checks to the label: nobody mounts or claims it in between.
            // The kernel lets one exclusive holder at a time, so it is closed just before
            // -cow claims it.
            let number = try BlockDevices.deviceNumber(of: path)
            try Self.requireBlank(cowDevice: path, number: number, operation: "snapshot of \(stack.originPath)")
            let file = try RawFile(path: path, exclusive: true)
            try file.write([UInt8](repeating: 0, count: 4096), at: CowLabel.areaOffset)
            try label.write(to: file)
            try file.sync()
            cowDevice = number
        case .thinPool:
            return nil  // (thin stacks return above)
        }
        let areaSectors = stack.areaBytes / 512
        let cow = try dm.create(
            name: stack.cowName, uuid: stack.identity.uuid(.cow),
            table: Table(.linear(device: cowDevice, offset: CowLabel.areaOffsetSectors), length: areaSectors),
            udevFlags: .hidden, batch: udev)
        CrashPoint.hit(.prepareCowLive)
        let real = try dm.create(name: stack.realName, uuid: stack.identity.uuid(.real))
        try dm.load(.uuid(stack.identity.uuid(.real)), table: origin.table, readOnly: origin.info.isReadOnly)
        CrashPoint.hit(.prepareRealLoaded)
        // Live before the window (one resume less inside it): the origin's own blocks mapped a
        // second time, opened by nothing until -snap is resumed inside the window. Not a table
        // that keeps state (raid, writecache): that one goes live inside the window, with the
        // origin suspended, so its target never runs twice over the same devices.
        if !stack.delaysRealResume {
            try dm.resume(stack.ref(.real), udevFlags: .hidden, batch: udev)
            CrashPoint.hit(.prepareRealLive)
        }
        _ = try dm.create(name: stack.snapName, uuid: stack.identity.uuid(.snap))
        try dm.load(
            stack.ref(.snap),
            table: Table(
                .snapshot(origin: real.number, cow: cow.number, persistence: .persistent, chunkSectors: stack.chunkSectors),
                length: stack.originSectors))
        CrashPoint.hit(.prepareSnapLoaded)
        try dm.load(
            .number(origin.info.number), table: Table(.snapshotOrigin(device: real.number), length: stack.originSectors),
            readOnly: origin.info.isReadOnly)
        CrashPoint.hit(.prepareOriginLoaded)
        // The label says "active" before the window: a power loss after the window must
        // find a snapshot to reassemble (if the window never happened, recovery drops it).
        label.state = .active
        try label.write(to: stack.storage.path)
        log?("prepared \(stack.snapName): -real \(real.number), -cow \(cow.number), chunk \(stack.chunkSectors * 512 / 1024) KiB")
        return handle
    }

    /// The critical window: suspend every origin (flush, freeze), resume every `-snap`, then
    /// every origin. Nothing is logged, journaled, executed or read from a filesystem in
    /// between; memory is locked and the watchdog armed. `udev` is the batch `prepare`
    /// opened: its one wait follows the window.
    ///
    /// - Returns: when the window began and ended, and its parts.
    func take(_ stacks: [SnapshotStack], udev: UdevBatch) throws -> WindowTiming {
        for stack in stacks {
            // Less to flush inside the window.
            for mount in Mounts.mountPoints(of: stack.originNumber) { try? FileSystems.sync(mount.target) }
        }
        defer { udev.finish() }
        let timing = try executor.run(.take(stacks), udev: udev)
        for stack in stacks {
            guard let thin = stack.thin else { continue }
            do { try activateThinView(stack, thin, udev: udev) } catch {
                log?("warning: the snapshot of \(stack.originName) is taken, but its read-only view \(stack.snapName) could not be made: \(error)")
            }
        }
        return timing
    }

    /// The one executor of transitions (`Transition`), with this engine's watchdog and log.
    var executor: TransitionExecutor<DeviceMapper> {
        TransitionExecutor(devices: dm, watchdog: watchdog, watchdogTimeout: watchdogTimeout, log: log)
    }

    // MARK: Dropping a snapshot (commit, or undoing a preparation)

    /// Drops the snapshot and keeps the origin's current data: the origin goes back to its
    /// own table, then `-snap`, `-real`, `-cow` and the COW storage are removed.
    ///
    /// Idempotent, and correct for a stack in any state before a merge: never taken,
    /// half-built, live, or half-dropped by a crash.
    ///
    /// A stack that is not live is dropped only when its storage provably holds nothing of the
    /// old data (see `evidence`), or when `discarding` says the run decided to commit and the
    /// journal holds that decision. The label says `released` before the origin leaves the
    /// snapshot, so a reboot in between never brings the snapshot back.
    /// - Throws: `.mergeInProgress` when the origin is merging (finish that instead),
    ///   `.inUse` when the snapshot is mounted, `.needsReassembly` or `.stale` when the storage
    ///   of a snapshot that is not live may hold old blocks (nothing is touched).
    func drop(_ stack: SnapshotStack, discarding: Bool = false) throws {
        if let thin = stack.thin { return try dropThin(stack, thin) }
        let operation = "commit of \(stack.originName)"
        // One udev wait for the origin's resume and the layers' removal.
        let udev = UdevBatch()
        defer { udev.finish() }
        let real = try dm.info(stack.ref(.real))
        let snap = try dm.info(stack.ref(.snap))
        let origin = try dm.info(stack.originRef)
        let originTable = try origin.map { try dm.table(.number($0.number)) }
        // Before the label says released: a merging origin must finish, not be dropped.
        if let origin, originTable?.isOnly("snapshot-merge") == true {
            throw SnapshotError(.mergeInProgress, operation, "\(origin.name) is merging its snapshot back", hint: "wait for the merge (`guard status --wait`)")
        }
        if !(try liveState(stack).live) && !discarding { try requireReleasable(stack, operation) }
        if let snap { try waitUntilClosed(snap, operation: operation, hint: "unmount it first") }
        try markReleased(stack)
        if let origin, let live = originTable {
            if origin.hasInactiveTable {
                let inactive = try dm.table(.number(origin.number), inactive: true)
                if let real, inactive.devices.contains(real.number) || inactive.isOnly("snapshot-origin") {
                    try dm.clearInactiveTable(.number(origin.number))  // a swap that never happened
                }
            }
            // A fused origin too: the commit lifts the fuse with the snapshot.
            if let device = live.snapshotOriginDevice, real == nil || device == real?.number {
                let own: Table
                if let real {
                    own = try dm.table(.number(real.number))
                } else {
                    own = try Table(parsing: stack.originTable)
                    if own.isRedacted {
                        throw SnapshotError(
                            .layerMissing, operation, "\(origin.name)'s -real layer is gone and its own table holds a key guard does not keep",
                            hint: "load the volume's table again yourself (`cryptsetup open`, `dmsetup reload`), then run `guard recover`")
                    }
                }
                try executor.run(.drop(origin: origin, own: own, snap: snap, statefulReal: stack.delaysRealResume ? real : nil, name: operation), udev: udev)
                log?("\(origin.name) is back on its own table")
            } else if origin.isSuspended {
                try dm.resume(.number(origin.number))  // left suspended by a crash, own table
            }
        }
        CrashPoint.hit(.commitOriginRestored)
        try removeLayers(stack, [.snap, .real, .cow], udev: udev)
        CrashPoint.hit(.commitLayersRemoved)
        try releaseStorage(stack)
    }

    /// Makes the COW files of `stacks` (`stage`), ahead of `prepare`: a run does it before its
    /// quiesce hooks stop the service, so the service is not down while they are written. A
    /// staged file has no label: a crash leaves nothing recovery would keep.
    public func stage(_ stacks: [SnapshotStack]) throws {
        for stack in stacks where stack.storage.isFile {
            if try Self.isStaged(stack) { continue }
            _ = try Self.makeCowFile(stack, log: log)
        }
    }

    /// The loop device of a COW file: with direct I/O (`CowFileIO`) where the file's
    /// filesystem really does it, through the page cache where it does not (said in the log).
    func attachCowFile(_ path: String) throws -> LoopHandle {
        var direct = Self.cowFileIO != .buffered
        if direct && !LoopDevice.directIOWorks(on: path) {
            log?("\(path)'s filesystem refuses direct I/O: its loop device writes through the page cache")
            direct = false
        }
        return try LoopDevice.attach(file: path, autoclear: true, directIO: direct)
    }

    /// Removes COW files `stage` made that no `prepare` used (the quiesce hooks failed).
    public func unstage(_ stacks: [SnapshotStack]) {
        for stack in stacks where stack.storage.isFile && (try? Self.isStaged(stack)) == true {
            unlink(stack.storage.path)
        }
    }

    /// A COW file made for `stack`: created (it must not exist), preallocated, and, unless COW
    /// files are written through the page cache, its snapshot area written with zeros.
    static func makeCowFile(_ stack: SnapshotStack, log: (@Sendable (String) -> Void)?) throws -> RawFile {
        let path = stack.storage.path
        log?("creating COW file \(path) (\(formatBytes(stack.storageBytes)), preallocated)")
        try CowDirectoryMarker.place(in: (path as NSString).deletingLastPathComponent)
        let file = try RawFile(path: path, create: true, exclusive: true)
        do {
            if !(try Self.preallocate(file, from: 0, length: stack.storageBytes)) {
                log?("warning: \(path)'s filesystem cannot preallocate; the COW file is sparse")
            }
            if Self.cowFileIO == .directZeroed { try Self.zeroFill(file, from: CowLabel.areaOffset, to: stack.storageBytes) }
        } catch {
            unlink(path)
            throw error
        }
        return file
    }

    /// Whether `stage` made `stack`'s file: one of the run's own name (its token is in it), of
    /// the stack's size, with no label yet.
    static func isStaged(_ stack: SnapshotStack) throws -> Bool {
        guard case .file(let path) = stack.storage, FileManager.default.fileExists(atPath: path) else { return false }
        let file = try RawFile(path: path, readOnly: true)
        return try file.size() == stack.storageBytes && CowLabel.read(from: file) == nil
    }

    /// Writes zeros over `[from, to)` and syncs: the filesystem's extents are then written ones,
    /// so the kernel's copies into the COW convert no unwritten extent (a journaled change that
    /// each exception-store commit would have to wait for).
    static func zeroFill(_ file: borrowing RawFile, from start: UInt64, to end: UInt64) throws {
        let step: UInt64 = 1 << 20
        let zeros = [UInt8](repeating: 0, count: Int(step))
        var offset = start
        while offset < end {
            let count = Int(min(step, end - offset))
            try file.write(count == zeros.count ? zeros : Array(zeros.prefix(count)), at: offset)
            offset += UInt64(count)
        }
        try file.sync()
    }

    /// Reserves space for a COW file; where the filesystem cannot (EOPNOTSUPP) the file is
    /// only grown, sparse. Returns whether the space is reserved.
    static func preallocate(_ file: borrowing RawFile, from offset: UInt64, length: UInt64) throws -> Bool {
        do {
            try file.allocate(offset: offset, length: length)
            return true
        } catch {
            guard error.errno == EOPNOTSUPP else { throw error }
            try file.truncate(to: offset + length)
            return false
        }
    }

    /// Removes the layers in order, waiting for udev once for all of them (and for what
    /// `udev` already holds: the commit's resumes).
    private func removeLayers(_ stack: SnapshotStack, _ layers: [StackIdentity.Layer], udev: UdevBatch? = nil) throws {
        let batch = udev ?? UdevBatch()
        defer { batch.finish() }
        for layer in layers {
            guard let info = try dm.info(stack.ref(layer)) else { continue }
            let ref = DeviceRef.number(info.number)
            // A layer a crash left suspended (a stateful `-real` between the origin's own table
            // and its removal) that no device uses any more is retired first: a suspended device
            // holds every reader, and a held reader would keep it from being removed.
            if info.isSuspended && BlockDevices.holders(of: info.number).isEmpty {
                try dm.retire(ref, batch: batch)
            }
            if try dm.table(ref).isOnly("error") {
                if try !dm.removeRetired(ref, batch: batch) {
                    log?("\(info.name) is still open (an error device now); the kernel removes it when its last opener closes it")
                    continue
                }
            } else {
                try dm.remove(ref, batch: batch)
            }
            log?("removed \(stack.identity.uuid(layer))")
        }
    }

    /// Writes `released` into the stack's label (the durable decision that its old blocks may
    /// go). A storage without this stack's label is left as it is.
    func markReleased(_ stack: SnapshotStack) throws {
        guard stack.thin == nil else { return }  // a pool has no label; guard never writes it
        let path = stack.storage.path
        guard FileManager.default.fileExists(atPath: path), var label = try CowLabel.read(from: path),
            label.identity == stack.identity, label.state != .released
        else { return }
        label.state = .released
        try label.write(to: path)
    }

    /// Wipes the label and the kernel header, detaches a loop device still bound to the
    /// file and deletes it. Idempotent. Only storage whose label says released, or that
    /// provably holds no old block, is released; anything else is refused and kept.
    func releaseStorage(_ stack: SnapshotStack) throws {
        guard stack.thin == nil else { return }  // a pool is the volume's storage: never released
        let path = stack.storage.path
        guard FileManager.default.fileExists(atPath: path) else { return }
        try requireReleasable(stack, "release of \(path)")
        try markReleased(stack)
        if stack.storage.isFile {
            for loop in LoopDevice.find(backingFile: path) { try? loop.detach() }
        }
        if !stack.storage.isFile {
            // A device is wiped only while it carries this run's label: a device that took its
            // path since (a replaced disk, renumbering) or was reused by hand is left alone.
            guard let label = try? CowLabel.read(from: path), label.identity == stack.identity else {
                log?("left \(path) as it is: it does not carry the label of run \(stack.identity.runToken)")
                return
            }
            if let journaled = stack.storageIdentity, let now = BlockDevices.stableIdentity(of: path), now != journaled {
                log?("left \(path) as it is: it is \(now) now, the run used \(journaled)")
                return
            }
        }
        try CowLabel.wipe(path)
        if stack.storage.isFile {
            try FileManager.default.removeItem(atPath: path)
            log?("deleted COW file \(path)")
        }
    }

    /// Records in the COW label what the run decided, so a reboot reassembles it right
    /// (`.kept`: a snapshot again; `.active`: an undecided run, merged back at boot).
    public func mark(_ stack: SnapshotStack, _ state: CowLabel.State) throws {
        guard stack.thin == nil else { return }  // the pool's metadata and the journal say it all
        guard var label = try CowLabel.read(from: stack.storage.path), label.identity == stack.identity else {
            throw SnapshotError(.labelMismatch, "label update of \(stack.storage.path)", "it has no label of run \(stack.identity.runToken)")
        }
        guard label.state != state else { return }
        // Stale is final: such a snapshot is never kept, merged or reassembled again, only released.
        if label.state == .stale && state != .released {
            throw SnapshotError(
                .stale, "label update of \(stack.storage.path)", "the snapshot of \(label.originName) is stale (its volume was written around it)",
                hint: "`guard commit` releases it")
        }
        label.state = state
        try label.write(to: stack.storage.path)
    }

    // MARK: Status, watching and extending

    /// The snapshot's state as the kernel reports it.
    public func health(_ stack: SnapshotStack) throws -> SnapshotHealth {
        if let thin = stack.thin { return try thinHealth(thin) }
        return SnapshotHealth(status: try dm.snapshotStatus(stack.ref(.snap)))
    }

    /// Grows a file-backed COW to `storageBytes`: the file (preallocated), the loop device's
    /// capacity, then `-cow`'s table. The kernel's exception store sees the new size at once.
    ///
    /// - Returns: the stack with its new size.
    /// - Throws: `.notExtendable` for a block-device COW or a smaller size.
    public func extend(_ stack: SnapshotStack, to storageBytes: UInt64) throws -> SnapshotStack {
        let operation = "extension of the COW of \(stack.originName)"
        if let thin = stack.thin {
            guard storageBytes > stack.storageBytes else { return stack }
            return try extendThin(stack, thin, to: storageBytes)
        }
        guard case .file(let path) = stack.storage else {
            throw SnapshotError(.notExtendable, operation, "its COW is the block device \(stack.storage.path)")
        }
        guard storageBytes > stack.storageBytes else { return stack }
        let free = try freeSpace(at: (path as NSString).deletingLastPathComponent)
        guard free > storageBytes - stack.storageBytes + (16 << 20) else {
            throw SnapshotError(.noSpace, operation, "growing by \(formatBytes(storageBytes - stack.storageBytes)) needs more than the \(formatBytes(free)) free")
        }
        let file = try RawFile(path: path)
        _ = try Self.preallocate(file, from: stack.storageBytes, length: storageBytes - stack.storageBytes)
        if Self.cowFileIO == .directZeroed { try Self.zeroFill(file, from: stack.storageBytes, to: storageBytes) }
        let cowTable = try dm.table(stack.ref(.cow))
        guard case .linear(let loopNumber, let offset)? = cowTable.lines.first?.target else {
            throw SnapshotError(.layerMissing, operation, "\(stack.cowName) is not a linear device")
        }
        if let loop = LoopDevice.all().first(where: { $0.number == loopNumber }) {
            try loop.refreshCapacity()
        }
        var grown = stack
        grown.storageBytes = storageBytes
        // The label grows first: once -cow is larger the kernel may put exceptions past the old
        // end, and a reassembly from a label that still had the old size would cut them off.
        // A label larger than the area the kernel used is harmless (the file is that large).
        if var label = try CowLabel.read(from: path), label.identity == stack.identity {
            label.storageBytes = storageBytes
            try label.write(to: path)
        }
        try executor.run(.extend(cow: stack.ref(.cow), table: Table(.linear(device: loopNumber, offset: offset), length: grown.areaBytes / 512), stack: stack))
        log?("grew the COW of \(stack.originName) to \(formatBytes(grown.areaBytes))")
        return grown
    }

    // MARK: The write fuse

    /// Blows the write fuse: the origin's table becomes `flakey <-real> 0 0 1 1 error_writes`,
    /// so every later write fails with EIO, as on a failed disk, and reaches neither the origin
    /// nor the COW, while reads go on. For a run that will roll back, before a COW that cannot
    /// grow overflows: every write the fuse refuses would be undone by the merge anyway, and
    /// the snapshot stays valid. The merge (`startMerge`) or a commit (`drop`) replaces the
    /// table; a reboot forgets it (the label still says active: the merge runs at boot).
    ///
    /// The suspend neither flushes nor freezes the filesystem: that would write its dirty pages
    /// into the COW, the very thing the fuse prevents. Bios in flight complete; bios that
    /// arrive during the suspend are queued and fail after it.
    /// - Returns: how long the origin was suspended, in microseconds.
    @discardableResult
    public func blowFuse(_ stack: SnapshotStack) throws -> UInt64 {
        let operation = "write fuse of \(stack.originName)"
        // A full pool fails writes itself, and never at the cost of a snapshot's blocks.
        if stack.thin != nil { return 0 }
        let origin = try requireOrigin(stack, operation)
        let live = try dm.table(.number(origin.number))
        if live.isFused { return 0 }
        let real = try dm.requireInfo(stack.ref(.real))
        guard live.snapshotOriginDevice == real.number else {
            throw SnapshotError(.layerMissing, operation, "\(origin.name) has no live guard snapshot (its table is \(live.lines.first?.target.typeName ?? "empty"))")
        }
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        let window = try executor.run(.blowFuse(origin: origin, real: real.number, stack: stack))
        log?("\(origin.name) refuses writes (guard's fuse): its snapshot stays valid for the rollback")
        return window.microseconds
    }

    /// Whether the stack's origin is on guard's write fuse.
    public func isFused(_ stack: SnapshotStack) throws -> Bool {
        guard let origin = try dm.info(stack.originRef) else { return false }
        return try dm.table(.number(origin.number)).isFused
    }

    // MARK: Merging back (rollback)

    /// Starts merging the snapshot back into the origin. From the moment this returns, reads
    /// of the origin show the snapshot's data, so it can be mounted again while the kernel
    /// copies chunks back underneath.
    ///
    /// - Precondition: neither the origin nor the snapshot is mounted or open.
    /// - Parameter udev: the caller's batch for the resumes and the removal of `-snap`, which
    ///   it waits for itself (a rollback mounts the volume again first: the device node is
    ///   there all along, and udev's probe of the merging origin is slow); nil: waited for here.
    /// - Throws: `.invalidSnapshot` when the kernel invalidated the snapshot (the rollback is
    ///   impossible, the volume keeps the upgraded data); `.inUse` when mounted.
    /// - Parameter live: the caller holds the snapshot as live (a `LiveSnapshotSet`).
    func startMerge(_ stack: SnapshotStack, udev callerBatch: UdevBatch? = nil, live: Bool = false) throws {
        if let thin = stack.thin { return try startThinRollback(stack, thin, udev: callerBatch, live: live) }
        let operation = "rollback of \(stack.originName)"
        let origin = try requireOrigin(stack, operation)
        let live = try dm.table(.number(origin.number))
        if live.isOnly("snapshot-merge") {
            log?("\(origin.name) is already merging")
            return
        }
        guard let real = try dm.info(stack.ref(.real)), let snap = try dm.info(stack.ref(.snap)),
            let device = live.snapshotOriginDevice, device == real.number  // writable or fused
        else {
            throw SnapshotError(
                .layerMissing, operation, "\(origin.name) has no live guard snapshot (its table is \(live.lines.first?.target.typeName ?? "empty"))", hint: "run `guard recover`")
        }
        let status = try dm.snapshotStatus(.number(snap.number))
        guard status.isRestorable else {
            throw SnapshotError(
                .invalidSnapshot, operation,
                "the snapshot is \(status) (\(status == .overflow ? "written past its COW" : "its COW filled up or failed")); its old data is lost, so the volume keeps the upgraded data",
                hint: "restore from a backup if the upgraded data is bad")
        }
        try waitUntilClosed(origin, operation: operation, hint: "unmount it first: a merge must not start under a mounted filesystem")
        // A scan that opens every block device for an instant (lvm2's, blkid's) is waited out too.
        try waitUntilClosed(snap, operation: operation, hint: "unmount it first")
        let cow = try dm.requireInfo(stack.ref(.cow))
        // Tables a crashed command loaded and never made live would clash with the merge
        // (two snapshot targets claiming one COW): drop them first.
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        if snap.hasInactiveTable { try dm.clearInactiveTable(.number(snap.number)) }
        if var label = try CowLabel.read(from: stack.storage.path) {
            label.state = .merging
            try label.write(to: stack.storage.path)
        }
        CrashPoint.hit(.mergeLabelMerging)
        // Resuming the origin hands the exceptions over to the merge. A table that did not
        // load leaves nothing merging: the label goes back to active. One udev wait for the
        // resumes and the removal of -snap, here or by the caller.
        let udev = callerBatch ?? UdevBatch()
        defer { if callerBatch == nil { udev.finish() } }
        try executor.run(.startMerge(origin: origin, snap: snap, real: real.number, cow: cow.number, stack: stack), udev: udev) {
            if var label = try? CowLabel.read(from: stack.storage.path) {
                label.state = .active
                try? label.write(to: stack.storage.path)
            }
        }
        // `-snap` is on its error table now: a scan that opens it at this instant (lvm2's, blkid's)
        // defers its removal to its close, never turns a merge under way into a failed start.
        if try !dm.removeRetired(.number(snap.number), batch: udev) {
            log?("\(snap.name) is still open (an error device now); the kernel removes it when its last opener closes it")
        }
        log?("\(origin.name) is merging its snapshot back")
    }

    /// Restarts a merge the kernel stopped (`Merge failed`, after an I/O error was fixed).
    ///
    /// The failed target cannot be replaced by a new merge while it exists (the kernel allows
    /// one merging snapshot per COW), and it keeps reporting `Merge failed`. So the origin
    /// goes to an `error` table for an instant, which ends the failed target, and then gets a
    /// fresh `snapshot-merge`, which reads the exceptions still in the COW and merges on.
    /// In that instant reads would fail, so the origin must not be open (unmounted).
    func restartMerge(_ stack: SnapshotStack) throws {
        if let thin = stack.thin { return try finishThin(stack, thin) }
        let operation = "restart of the merge into \(stack.originName)"
        let origin = try requireOrigin(stack, operation)
        let live = try dm.table(.number(origin.number))
        guard live.isOnly("snapshot-merge") || live.isOnly("error") else {
            throw SnapshotError(.layerMissing, operation, "\(origin.name) is not merging (its table is \(live.lines.first?.target.typeName ?? "empty"))")
        }
        try waitUntilClosed(origin, operation: operation, hint: "unmount it (stop what uses it) and run `guard recover` again")
        let real = try dm.requireInfo(stack.ref(.real))
        let cow = try dm.requireInfo(stack.ref(.cow))
        if origin.hasInactiveTable { try dm.clearInactiveTable(.number(origin.number)) }
        if live.isOnly("snapshot-merge") {
            try executor.run(.endFailedMerge(origin: origin, stack: stack))
        }
        CrashPoint.hit(.restartErrorTable)
        try executor.run(.restartMerge(origin: origin, real: real.number, cow: cow.number, stack: stack))
        log?("restarted the merge into \(origin.name)")
    }

    /// Resumes whatever of this stack a crash left suspended (origin and layers), making a
    /// loaded inactive table live: every table guard loads before a suspend is the next
    /// step forward, so completing it is what the crashed command was doing.
    /// - Returns: the names resumed.
    ///
    /// A `-real` whose table keeps state (and the `-snap` over it) is never resumed onto its own
    /// table when the origin no longer routes through it (a commit or the end of a merge stopped
    /// between the origin's own table going live and their retirement): they are retired
    /// (an `error` table, never suspended again), and the teardown that follows removes them.
    public func resumeSuspended(_ stack: SnapshotStack) throws -> [String] {
        var resumed: [String] = []
        var retired: Set<DeviceRef> = []
        if stack.delaysRealResume, let real = try dm.info(stack.ref(.real)), real.isSuspended {
            let routes = try dm.info(stack.originRef).map { try dm.table(.number($0.number)).devices.contains(real.number) } ?? false
            if !routes {
                retired = [stack.ref(.real), stack.ref(.snap)]
                for ref in [stack.ref(.snap), stack.ref(.real)] {
                    guard let info = try dm.info(ref), info.isSuspended else { continue }
                    try dm.retire(.number(info.number))
                    resumed.append("\(info.name) (retired: an error table, its own never live again)")
                }
            }
        }
        for ref in [stack.ref(.cow), stack.ref(.real), stack.ref(.snap), stack.originRef] where !retired.contains(ref) {
            guard let info = try dm.info(ref), info.isSuspended else { continue }
            try dm.resume(.number(info.number))
            resumed.append(info.name)
        }
        return resumed
    }

    /// Waits a little for a device to be closed: udev's probes and a process just killed
    /// hold it for an instant. A mount or a process that keeps it open is named in the error.
    func waitUntilClosed(_ device: DeviceInfo, operation: String, hint: String) throws {
        var info = device
        for _ in 0..<30 {
            guard info.openCount > 0, Mounts.mountPoints(of: info.number).isEmpty else { break }
            usleep(100_000)
            info = try dm.info(.number(device.number)) ?? info
        }
        guard info.openCount > 0 else { return }
        let mounts = Mounts.mountPoints(of: info.number).map(\.target)
        let holders = Mounts.processes(holdingDevice: info.number).map(\.description)
        var what = "\(info.path) is open"
        if !mounts.isEmpty { what += " (mounted on \(mounts.joined(separator: ", ")))" }
        if !holders.isEmpty { what += " (by \(holders.joined(separator: ", ")))" }
        throw SnapshotError(.inUse, operation, what, hint: hint)
    }

    /// Where a merge stands, from the origin's snapshot-merge status.
    public func mergeState(_ stack: SnapshotStack) throws -> MergeState {
        if let thin = stack.thin { return try thinMergeState(stack, thin) }
        guard try dm.info(stack.originRef) != nil || !evidence(stack).mustKeep else {
            return .needsReassembly("its origin \(stack.originName) is not active; activate it without mounting it, then run `guard recover`")
        }
        let origin = try requireOrigin(stack, "merge status of \(stack.originName)")
        let live = try dm.table(.number(origin.number))
        if live.isOnly("snapshot-merge") {
            let status = try dm.snapshotStatus(.number(origin.number))
            switch status {
            case .active(let usage):
                return usage.isMergeComplete ? .complete : .merging(remainingSectors: usage.dataSectors, usage: usage)
            default:
                return .failed(status)
            }
        }
        // An `error` table with the layers still there: a restart of a failed merge was interrupted.
        if live.isOnly("error"), try dm.info(stack.ref(.real)) != nil {
            return .failed(.unknown("restart interrupted"))
        }
        // Off the merge: finished only if the label says released (written once the kernel
        // reported the merge complete, before the swap). A label still `merging` means the
        // stack was torn down by a reboot: it must be reassembled, never torn down.
        if !live.isOnly("snapshot-origin") {
            let evidence = evidence(stack)
            return evidence.mustKeep ? .needsReassembly(evidence.reason) : .finished
        }
        throw SnapshotError(.layerMissing, "merge status of \(stack.originName)", "\(origin.name) is not merging (its table is \(live.lines.first?.target.typeName ?? "empty"))")
    }

    /// Tears a finished merge down: the origin back on its own table, `-real`, `-cow` and the
    /// COW storage removed. Refuses unless the kernel reports the merge complete.
    func finishMerge(_ stack: SnapshotStack) throws {
        if let thin = stack.thin { return try finishThin(stack, thin) }
        let operation = "teardown of the merge into \(stack.originName)"
        switch try mergeState(stack) {
        case .finished:
            try removeLayers(stack, [.snap, .real, .cow])
            try releaseStorage(stack)
            return
        case .merging(let remaining, _):
            throw SnapshotError(.mergeInProgress, operation, "\(formatBytes(remaining * 512)) are still to merge")
        case .failed(let status):
            throw SnapshotError(.mergeFailed, operation, "the kernel reports the merge as \(status)", hint: "see `dmesg`; fix the I/O error, then run `guard recover`")
        case .needsReassembly(let why):
            throw SnapshotError(.needsReassembly, operation, why, hint: "run `guard recover` with \(stack.originName) active and unmounted: the merge resumes")
        case .complete:
            break
        }
        let origin = try requireOrigin(stack, operation)
        let real = try dm.requireInfo(stack.ref(.real))
        let own = try dm.table(.number(real.number))
        // The kernel reports the merge complete: the label says so before the origin leaves the
        // merge target, so "own table, label merging" always means a reboot interrupted it.
        try markReleased(stack)
        CrashPoint.hit(.finishLabelReleased)
        do {
            // Checked again with the origin quiet: the merge must really be complete, or the
            // origin stays on the merge.
            try executor.run(
                .finishMerge(origin: origin, own: own, statefulReal: stack.delaysRealResume ? real : nil, stack: stack) { [dm] in
                    if case .active(let usage) = try dm.snapshotStatus(.number(origin.number)), !usage.isMergeComplete {
                        throw SnapshotError(.mergeInProgress, operation, "the merge is not complete")
                    }
                })
        } catch {
            if try liveState(stack).merging { try? mark(stack, .merging) }
            throw error
        }
        CrashPoint.hit(.finishOriginRestored)
        try removeLayers(stack, [.snap, .real, .cow])
        CrashPoint.hit(.finishLayersRemoved)
        try releaseStorage(stack)
        log?("the merge into \(origin.name) is complete and torn down")
    }

    private func requireOrigin(_ stack: SnapshotStack, _ operation: String) throws -> DeviceInfo {
        guard let origin = try dm.info(stack.originRef) else {
            throw SnapshotError(
                .originNotFound, operation, "the origin \(stack.originName) (\(stack.originUUID)) is not active",
                hint: "activate it (`lvchange -ay`, `guard volume activate`) and run `guard recover`")
        }
        return origin
    }
}

// MARK: - Rediscovery after a reboot

/// What reassembly did with one COW storage.
public enum ReassemblyResult: Sendable, Hashable {
    /// The stack was rebuilt: a snapshot again, or a merge resumed.
    case reassembled(SnapshotStack, merging: Bool)
    /// The stack is already in the kernel.
    case alreadyLive(SnapshotStack)
    /// The storage held no snapshot that ever went live (or a released one); it was removed.
    case discarded(String)
    /// The storage holds a stale snapshot: kept, not reassembled.
    case kept(String)
}

extension SnapshotEngine {
    /// Rebuilds a snapshot stack from its COW storage and its origin after a reboot tore
    /// the devices down; a merge that was under way resumes where it stopped (the kernel
    /// reads the exceptions still in the COW).
    ///
    /// Must run before anything mounts or writes the origin, or the snapshot no longer
    /// describes the origin's past (the boot unit orders it before local-fs-pre.target).
    public func reassemble(_ storage: CowStorage) throws -> ReassemblyResult {
        let operation = "reassembly from \(storage)"
        guard let label = try CowLabel.read(from: storage.path) else {
            if try KernelCowHeader.read(from: storage.path) != nil {
                throw SnapshotError(
                    .needsReassembly, operation, "\(storage.path) has a kernel snapshot header but no guard label",
                    hint: "it is kept for you to inspect; delete it yourself once you know it holds nothing you need")
            }
            if storage.isFile { try FileManager.default.removeItem(atPath: storage.path) }
            return .discarded("\(storage.path) has no guard label")
        }
        if label.state == .stale {
            return .kept("\(storage.path) holds a stale snapshot of \(label.originName) (written while the snapshot was not live); kept for the admin")
        }
        guard label.state == .active || label.state == .kept || label.state == .merging else {
            let stack = try stackFromLabel(label, storage: storage, originNumber: DeviceNumber(major: 0, minor: 0))
            try releaseStorage(stack)
            return .discarded("\(storage.path) was \(label.state.rawValue): nothing to reassemble")
        }
        guard let origin = try dm.info(label.originUUID.isEmpty ? .name(label.originName) : .uuid(label.originUUID)) else {
            throw SnapshotError(
                .originNotFound, operation, "its origin \(label.originName) (\(label.originUUID)) is not active",
                hint: "activate it without mounting it (`lvchange -ay`, `guard volume activate`), then run `guard recover`")
        }
        let stack = try stackFromLabel(label, storage: storage, originNumber: origin.number)
        if try dm.info(stack.ref(.real)) != nil {
            // Layers in the kernel are live only while the origin routes through them.
            if case .bypassed(let bypass) = try routing(stack) {
                try markStale(stack)
                return .kept("\(storage.path): \(bypass); its snapshot is stale (writes went around it) and is kept, never merged; `guard commit` of its run releases it")
            }
            return .alreadyLive(stack)
        }
        let live = try dm.table(.number(origin.number))
        // The origin must be what the snapshot was taken of: another size or another table means
        // a tool changed it while the snapshot was kept (`lvextend`, `pvmove`, `lvconvert`), and
        // every write since went around the snapshot. Never stacked again; the COW is kept.
        if let change = Self.originChange(live, label: label) {
            guard label.state != .merging else {
                throw SnapshotError(.labelMismatch, operation, "\(origin.name) \(change), but its merge did not finish", hint: "nothing was touched; see guard-recover(8)")
            }
            var stale = label
            stale.state = .stale
            try stale.write(to: storage.path)
            return .kept(
                "\(storage.path): \(origin.name) \(change) since its snapshot was taken (a tool such as lvextend, pvmove or lvconvert changed it while the snapshot was kept): the snapshot is stale, kept and never merged; `guard commit` of its run releases it"
            )
        }
        guard live.snapshotOriginDevice == nil && !live.isOnly("snapshot-merge") else {
            throw SnapshotError(.alreadySnapshotted, operation, "\(origin.name) already has another snapshot")
        }
        guard let header = try KernelCowHeader.read(from: storage.path) else {
            try releaseStorage(stack)
            return .discarded("\(storage.path): the kernel never initialised the snapshot (it was never taken)")
        }
        try requireUntouched(origin, label: label, stack: stack, operation: operation)
        let merging = label.state == .merging
        if merging && !header.valid {
            throw SnapshotError(.invalidSnapshot, operation, "the snapshot being merged is marked invalid in its COW header")
        }

        var handle: LoopHandle?
        let cowDevice: DeviceNumber
        if storage.isFile {
            let loop = try attachCowFile(storage.path)
            handle = loop
            cowDevice = loop.device.number
        } else {
            cowDevice = try BlockDevices.deviceNumber(of: storage.path)
        }
        defer { handle?.release() }
        do {
            let cow = try dm.create(
                name: stack.cowName, uuid: stack.identity.uuid(.cow),
                table: Table(.linear(device: cowDevice, offset: CowLabel.areaOffsetSectors), length: stack.areaBytes / 512),
                udevFlags: .hidden)
            let real = try dm.create(name: stack.realName, uuid: stack.identity.uuid(.real))
            try dm.load(stack.ref(.real), table: live, readOnly: origin.isReadOnly)
            if !merging { _ = try dm.create(name: stack.snapName, uuid: stack.identity.uuid(.snap)) }
            try executor.run(.reassemble(origin: origin, stack: stack, real: real.number, cow: cow.number, merging: merging))
        } catch {
            try? dm.clearInactiveTable(.number(origin.number))
            try? removeLayers(stack, [.snap, .real, .cow])
            throw error
        }
        log?("reassembled \(merging ? "the merge into" : "the snapshot of") \(origin.name) from \(storage.path)")
        return .reassembled(stack, merging: merging)
    }

    /// How an origin's table differs from the one its snapshot was taken of, or nil. The devices
    /// a table names may have other numbers after a reboot (disks found in another order), so
    /// two tables of the same shape (targets, lengths, offsets) count as the same.
    static func originChange(_ live: Table, label: CowLabel) -> String? {
        if live.lengthSectors != label.originSectors {
            return "has \(live.lengthSectors) sectors, not the \(label.originSectors) it had"
        }
        guard let recorded = try? Table(parsing: label.originTable) else { return nil }
        func shape(_ table: Table) -> [String] {
            table.redacted.lines.map { line in
                let numbers = Set(line.target.devices.map(\.description))
                let fields = line.target.description.split(separator: " ").map { numbers.contains(String($0)) ? "<dev>" : String($0) }
                return "\(line.start) \(line.length) \(fields.joined(separator: " "))"
            }
        }
        return shape(live) == shape(recorded)
            ? nil : "has another table (`\(live.redacted.lines.first?.description ?? "")`) than the one it had (`\(recorded.lines.first?.description ?? "")`)"
    }

    /// Refuses to reassemble onto an origin that was opened or written since it was activated:
    /// a snapshot of it would no longer describe its past, and a merge must not start under a
    /// mounted filesystem. A written origin's label becomes `stale` (durable: the next boot
    /// does not reassemble it either); the COW is kept, nothing is merged.
    func requireUntouched(_ origin: DeviceInfo, label: CowLabel, stack: SnapshotStack, operation: String) throws {
        let writes = BlockDevices.writeRequests(of: origin.number) ?? 0
        if writes > 0 {
            var stale = label
            stale.state = .stale
            try stale.write(to: stack.storage.path)
            throw SnapshotError(
                .stale, operation,
                "\(origin.name) was written (\(writes) write requests) since it was activated, before its snapshot was reassembled: the snapshot is stale, nothing is merged, and the COW \(stack.storage.path) is kept for you",
                hint: "`guard commit` of the run discards the COW and keeps the volume as it is")
        }
        try waitUntilClosed(origin, operation: operation, hint: "unmount it and stop what holds it, then run `guard recover`; nothing was reassembled")
    }

    /// The stack a label describes, with the origin's current number.
    public func stackFromLabel(_ label: CowLabel, storage: CowStorage, originNumber: DeviceNumber) throws -> SnapshotStack {
        SnapshotStack(
            identity: label.identity, originName: label.originName, originUUID: label.originUUID,
            originNumber: originNumber, originSectors: label.originSectors, originTable: label.originTable,
            storage: storage, storageBytes: label.storageBytes, chunkSectors: label.chunkSectors)
    }

    /// COW files in `directory` (guard's `cow/` directory), for reassembly and orphan checks.
    public static func cowFiles(in directory: String) -> [CowStorage] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { $0.hasSuffix(".cow") }.sorted().map { .file(path: "\(directory)/\($0)") }
    }
}
