import BlockDevice
import DeviceMapper
import Foundation
import Quantities

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
