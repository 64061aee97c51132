import BlockDevice
import DeviceMapper
import Foundation
import Quantities

extension SnapshotEngine {
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
    func build(_ stack: SnapshotStack, origin: Origin, udev: UdevBatch) throws -> LoopHandle? {
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
}
