import BlockDevice

#if canImport(Glibc)
import Glibc
#endif

/// What the kernel knows about one device-mapper device (DM_DEVICE_INFO).
public struct DeviceInfo: Hashable, Sendable {
    public var name: String
    public var uuid: String
    public var number: DeviceNumber
    public var openCount: Int
    public var isSuspended: Bool
    public var hasLiveTable: Bool
    public var hasInactiveTable: Bool
    public var isReadOnly: Bool
    public var targetCount: Int
    public var eventNumber: UInt32
    /// A deferred removal is pending: the kernel removes the device when its last opener closes it.
    public var removalDeferred: Bool = false

    /// "/dev/mapper/NAME".
    public var path: String { "/dev/mapper/\(name)" }
}

/// A device in the kernel's list: name, number and UUID.
public struct DeviceSummary: Hashable, Sendable {
    public var name: String
    public var number: DeviceNumber
    public var uuid: String
    public var isGuardDevice: Bool { uuid.hasPrefix(DeviceMapper.uuidPrefix) }
}

/// How device-mapper operations wait for udev.
public enum UdevMode: String, Sendable, CaseIterable, Codable {
    /// Cookies when udev is running and libdevmapper can sync with it, otherwise none.
    case automatic
    /// Every create, resume and remove carries a udev cookie and is waited for.
    case cookies
    /// No udev sync: libdevmapper creates and removes /dev/mapper nodes itself.
    case none
}

/// udev rule flags for a device guard creates.
public struct UdevFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// A private layer (-real, -cow, a snapshot): no blkid scan, no symlinks, no other rules,
    /// so a copy of the origin's filesystem UUID never wins a `UUID=` mount.
    public static let hidden = UdevFlags(rawValue: LibDM.hiddenFlags)
    /// Lower priority than the origin for udev's /dev/disk/by-* links.
    public static let lowPriority = UdevFlags(rawValue: LibDM.lowPriorityFlag)
}

/// Typed access to the kernel's device-mapper through libdevmapper.
///
/// Every call is one ioctl task; errors are `DeviceMapperError`s that name the device,
/// the ioctl, errno and what libdevmapper and the kernel logged. Nothing goes to stderr.
public struct DeviceMapper: Sendable {
    /// Every device guard creates has a UUID with this prefix.
    public static let uuidPrefix = "GUARD-"

    /// Whether udev cookies are in use for this process.
    public let usesUdevCookies: Bool

    /// Connects to the driver.
    ///
    /// - Parameter udev: how to wait for udev; `.none` makes libdevmapper manage /dev/mapper itself.
    /// - Throws: `.permissionDenied` when not root, `.driverMissing` when the kernel has no
    ///   device-mapper (with what to do about it).
    /// - Note: DM_DEVICE_VERSION on /dev/mapper/control.
    public init(udev: UdevMode = .automatic) throws {
        if geteuid() != 0 {
            throw DeviceMapperError(
                code: .permissionDenied, operation: "connection to device-mapper",
                detail: "device-mapper needs root; run guard as root (sudo guard ...)")
        }
        switch udev {
        case .none: LibDM.configureUdev(sync: false)
        case .cookies, .automatic: LibDM.configureUdev(sync: true)
        }
        _ = try DeviceMapper.driverVersion()
        let active = LibDM.udevSyncActive()
        if udev == .cookies && !active {
            throw DeviceMapperError(
                code: .other, operation: "udev synchronisation",
                detail: "udev cookies were asked for, but udev is not running or libdevmapper cannot sync with it")
        }
        usesUdevCookies = active
    }

    /// Whether this kernel has a working device-mapper driver, asked of the driver itself.
    /// The control node can exist where the driver does not.
    public static var isAvailable: Bool {
        geteuid() == 0 && (try? driverVersion()) != nil
    }

    /// Routes libdevmapper's messages to `sink` (guard's log); `verbose` includes its debug output.
    public static func setLogSink(verbose: Bool = false, _ sink: (@Sendable (DeviceMapperLogMessage) -> Void)?) {
        LibDM.setVerbose(verbose)
        LibDM.sink.withLock { $0 = sink }
    }

    /// Keeps libdevmapper's messages in memory until `releaseLog()`: for the suspend window,
    /// where guard's log (a file) must not be written.
    public static func holdLog() { LibDM.holdLog(true) }

    /// Sends the messages kept since `holdLog()` to the log sink.
    public static func releaseLog() { LibDM.holdLog(false) }

    /// The kernel driver's version ("4.47.0").
    /// - Note: DM_DEVICE_VERSION.
    public static func driverVersion() throws -> String {
        do {
            return try LibDM.run(
                .init(type: LibDM.version, call: "DM_DEVICE_VERSION", operation: "version query of the device-mapper driver"),
                extract: LibDM.driverVersion)
        } catch var error as DeviceMapperError {
            let misc = (try? String(contentsOfProcFile: "/proc/misc")) ?? ""
            if !misc.contains("device-mapper") || error.code == .driverMissing || error.code == .notFound {
                error.code = .driverMissing
                error.detail =
                    "this kernel has no device-mapper driver (no 'device-mapper' in /proc/misc); "
                    + "load it with `modprobe dm-mod dm-snapshot`, or run guard on a kernel that has it"
            }
            throw error
        }
    }

    public func driverVersion() throws -> String { try DeviceMapper.driverVersion() }

    /// The versions of the targets the kernel has loaded ("snapshot": "1.16.0").
    /// - Note: DM_DEVICE_LIST_VERSIONS.
    public func targetVersions() throws -> [String: String] {
        try LibDM.run(
            .init(type: LibDM.listVersions, call: "DM_DEVICE_LIST_VERSIONS", operation: "target version query"),
            extract: LibDM.versions)
    }

    /// Every device-mapper device with its name, number and UUID.
    /// - Note: DM_DEVICE_LIST, then DM_DEVICE_INFO per device for its UUID.
    public func list() throws -> [DeviceSummary] {
        let names = try LibDM.run(
            .init(type: LibDM.list, call: "DM_DEVICE_LIST", operation: "listing of device-mapper devices"),
            extract: LibDM.names)
        return try names.compactMap { entry in
            guard let info = try info(.name(entry.name)) else { return nil }  // removed meanwhile
            return DeviceSummary(name: entry.name, number: entry.number, uuid: info.uuid)
        }.sorted { $0.name < $1.name }
    }

    /// The devices guard created: UUID starting with `GUARD-`.
    public func guardDevices() throws -> [DeviceSummary] {
        try list().filter(\.isGuardDevice)
    }

    /// What the kernel knows about `device`; nil when there is no such device.
    /// - Note: DM_DEVICE_INFO.
    public func info(_ device: DeviceRef) throws -> DeviceInfo? {
        try LibDM.run(
            .init(type: LibDM.infoType, call: "DM_DEVICE_INFO", operation: "info query of \(device)", device: device),
            extract: LibDM.info)
    }

    /// Like `info`, but a missing device is an error that names it.
    public func requireInfo(_ device: DeviceRef) throws -> DeviceInfo {
        guard let info = try info(device) else {
            throw DeviceMapperError(
                code: .notFound, operation: "look-up of \(device)",
                detail: "no device-mapper device \(device) exists (see `dmsetup ls`)")
        }
        return info
    }

    /// Creates a device with no table (load one, then resume it, to control the order).
    ///
    /// - Parameters:
    ///   - name: the device name (/dev/mapper/NAME); at most 127 bytes, no `/`.
    ///   - uuid: the device UUID; guard's own start with `GUARD-`.
    ///   - readOnly: the device refuses writes.
    /// - Note: DM_DEVICE_CREATE without a table (libdevmapper would resume one that has a table).
    @discardableResult
    public func create(name: String, uuid: String, readOnly: Bool = false, udevFlags: UdevFlags = [])
        throws -> DeviceInfo
    {
        try Self.validate(name: name, uuid: uuid)
        // No udev cookie: the kernel emits no cookie-carrying uevent for a create without a
        // table (only resume, remove and rename do), so a cookie here would never complete.
        // The udev flags travel with the first resume.
        _ = udevFlags
        return try LibDM.run(
            .init(type: LibDM.create, call: "DM_DEVICE_CREATE", operation: "create of \(name)", device: .name(name)),
            configure: { task in LibDM.setUUID(task, uuid) && (!readOnly || LibDM.setReadOnly(task)) },
            extract: { task in
                guard let info = LibDM.info(task) else {
                    throw DeviceMapperError(code: .other, operation: "create of \(name)", detail: "no info after create")
                }
                return info
            })
    }

    /// Creates a device, loads `table` and resumes it: a ready device in three ioctls.
    /// - Parameter batch: share one udev cookie and wait for it later (`UdevBatch.finish()`);
    ///   nil waits now.
    @discardableResult
    public func create(name: String, uuid: String, table: Table, readOnly: Bool = false, udevFlags: UdevFlags = [], batch: UdevBatch? = nil)
        throws -> DeviceInfo
    {
        let info = try create(name: name, uuid: uuid, readOnly: readOnly, udevFlags: udevFlags)
        do {
            try load(.name(name), table: table, readOnly: readOnly)
            try resume(.name(name), udevFlags: udevFlags, batch: batch)
        } catch {
            try? remove(.name(name), attempts: 3)
            throw error
        }
        _ = info
        return try requireInfo(.name(name))
    }

    /// Loads `table` as the device's inactive table; it goes live at the next resume.
    /// - Note: DM_DEVICE_RELOAD.
    public func load(_ device: DeviceRef, table: Table, readOnly: Bool = false) throws {
        let shown = table.lines.count == 1 ? table.lines[0].target.description : table.description
        try LibDM.run(
            .init(type: LibDM.reload, call: "DM_DEVICE_RELOAD '\(shown)'", operation: "reload of \(device)", device: device),
            configure: { task in
                table.lines.allSatisfy { LibDM.addTarget(task, $0) } && (!readOnly || LibDM.setReadOnly(task))
            },
            extract: { _ in () })
    }

    /// Drops the device's inactive table.
    /// - Note: DM_DEVICE_CLEAR.
    public func clearInactiveTable(_ device: DeviceRef) throws {
        try LibDM.run(
            .init(type: LibDM.clear, call: "DM_DEVICE_CLEAR", operation: "clear of the inactive table of \(device)", device: device),
            extract: { _ in () })
    }

    /// Suspends the device: new I/O is queued until resume.
    ///
    /// - Parameters:
    ///   - flush: complete I/O in flight first (else it is requeued: `noflush`).
    ///   - lockFileSystem: freeze a mounted filesystem first so it is consistent on disk.
    /// - Note: DM_DEVICE_SUSPEND, with DM_NOFLUSH_FLAG / DM_SKIP_LOCKFS_FLAG when asked.
    public func suspend(_ device: DeviceRef, flush: Bool = true, lockFileSystem: Bool = true) throws {
        try LibDM.run(
            .init(type: LibDM.suspend, call: "DM_DEVICE_SUSPEND", operation: "suspend of \(device)", device: device),
            configure: { task in (flush || LibDM.noFlush(task)) && (lockFileSystem || LibDM.skipLockFS(task)) },
            extract: { _ in () })
    }

    /// Resumes the device, making its inactive table live if it has one.
    ///
    /// - Parameter batch: share one udev cookie with other tasks and wait for it later
    ///   (`UdevBatch.finish()`), as inside the snapshot window; nil waits now.
    /// - Note: DM_DEVICE_RESUME.
    public func resume(_ device: DeviceRef, udevFlags: UdevFlags = [], batch: UdevBatch? = nil) throws {
        try LibDM.run(
            .init(
                type: LibDM.resume, call: "DM_DEVICE_RESUME", operation: "resume of \(device)", device: device,
                udevFlags: udevFlags.rawValue, sharedCookie: batch),
            extract: { _ in () })
    }

    /// Removes the device, retrying a bounded number of times while it is briefly busy
    /// (udev's blkid, a closing mount).
    ///
    /// - Parameters:
    ///   - attempts: tries in all; waits grow from 20 ms, about 2.5 s for 8 attempts.
    ///   - batch: share one udev cookie with other removals and wait for it once
    ///     (`UdevBatch.finish()`); nil waits now.
    /// - Throws: `.busy` naming who holds the device (mount points, stacked devices, open count).
    /// - Note: DM_DEVICE_REMOVE.
    public func remove(_ device: DeviceRef, attempts: Int = 8, udevFlags: UdevFlags = [], batch: UdevBatch? = nil) throws {
        var delay: useconds_t = 20_000
        for attempt in 1...max(attempts, 1) {
            do {
                try LibDM.run(
                    .init(
                        type: LibDM.remove, call: "DM_DEVICE_REMOVE", operation: "remove of \(device)", device: device,
                        udevFlags: udevFlags.rawValue, sharedCookie: batch),
                    extract: { _ in () })
                return
            } catch var error as DeviceMapperError where error.code == .busy {
                if attempt < attempts {
                    usleep(delay)
                    delay = min(delay * 2, 640_000)
                    continue
                }
                error.detail = [error.detail, busyExplanation(device)].compactMap { $0 }.joined(separator: "; ")
                throw error
            }
        }
    }

    /// Takes a device out of service for good, without ever making its table live again: an
    /// `error` table of its size replaces it and goes live, so the target it had (a raid's, a
    /// snapshot's) is destroyed and nothing that reads the device can block on it. A device
    /// left suspended holds every reader (lvm2's scan, blkid) until it is resumed, and a reader
    /// holding it keeps its removal from succeeding. Then `removeRetired`.
    public func retire(_ device: DeviceRef, batch: UdevBatch? = nil) throws {
        let length = try table(device).lengthSectors
        try load(device, table: Table(.error, length: max(length, 1)))
        try resume(device, udevFlags: [.hidden, .lowPriority], batch: batch)
    }

    /// Removes a device guard has retired (its live table is `error`: reading it fails at once,
    /// it never blocks): now, or, while a process still holds it open (lvm2's scan, blkid), by
    /// the kernel when that process closes it (a deferred removal). A device on any other
    /// table is only ever removed now (`remove`).
    /// - Returns: false when the removal was deferred.
    /// - Note: DM_DEVICE_REMOVE, then DM_DEVICE_REMOVE with DM_DEFERRED_REMOVE.
    @discardableResult
    public func removeRetired(_ device: DeviceRef, batch: UdevBatch? = nil) throws -> Bool {
        guard let info = try info(device) else { return true }
        if info.removalDeferred { return false }
        do {
            try remove(device, batch: batch)
            return true
        } catch let error as DeviceMapperError where error.code == .busy {
            guard try table(device).isOnly("error") else { throw error }
            try LibDM.run(
                .init(type: LibDM.remove, call: "DM_DEVICE_REMOVE", operation: "deferred remove of \(device)", device: device, udevFlags: nil, sharedCookie: nil),
                configure: LibDM.deferRemoval,
                extract: { _ in () })
            return false
        }
    }

    /// Who holds a device open, in words: mounts, devices stacked on it, the open count.
    public func busyExplanation(_ device: DeviceRef) -> String {
        guard let info = try? info(device) else { return "it is in use" }
        var parts = ["it is open (open count \(info.openCount))"]
        let mounts = Mounts.mountPoints(of: info.number).map(\.target)
        if !mounts.isEmpty { parts.append("mounted on " + mounts.joined(separator: ", ")) }
        let holders = BlockDevices.holders(of: info.number).map { number in
            BlockDevices.deviceMapperName(of: number) ?? BlockDevices.kernelName(of: number) ?? number.description
        }
        if !holders.isEmpty { parts.append("used by " + holders.joined(separator: ", ")) }
        if mounts.isEmpty && holders.isEmpty {
            let processes = Mounts.processes(holdingDevice: info.number)
            if !processes.isEmpty { parts.append("opened by " + processes.map(\.description).joined(separator: ", ")) }
        }
        return parts.joined(separator: ", ") + "; close it and try again"
    }

    /// The device's live table (or its inactive one).
    /// - Note: DM_DEVICE_TABLE, with DM_QUERY_INACTIVE_TABLE_FLAG for the inactive table.
    public func table(_ device: DeviceRef, inactive: Bool = false) throws -> Table {
        let lines = try LibDM.run(
            .init(
                type: LibDM.table, call: "DM_DEVICE_TABLE",
                operation: "\(inactive ? "inactive " : "")table query of \(device)", device: device),
            configure: { !inactive || LibDM.queryInactive($0) },
            extract: LibDM.targets)
        return Table(lines.map { Table.Line(start: $0.start, length: $0.length, target: .parse(type: $0.type, parameters: $0.parameters)) })
    }

    /// The device's status lines.
    /// - Note: DM_DEVICE_STATUS.
    public func status(_ device: DeviceRef) throws -> [StatusLine] {
        try LibDM.run(
            .init(type: LibDM.status, call: "DM_DEVICE_STATUS", operation: "status query of \(device)", device: device),
            extract: LibDM.targets
        ).map { StatusLine(start: $0.start, length: $0.length, type: $0.type, text: $0.parameters) }
    }

    /// The status of the snapshot or snapshot-merge target of `device`.
    /// - Throws: `.invalidArgument` when the device's live table is not a snapshot.
    public func snapshotStatus(_ device: DeviceRef) throws -> SnapshotStatus {
        let lines = try status(device)
        guard lines.count == 1, let status = lines[0].snapshot else {
            throw DeviceMapperError(
                code: .invalidArgument, operation: "snapshot status of \(device)",
                detail: "its live table is \(lines.map(\.type).joined(separator: ", ")), not a snapshot")
        }
        return status
    }

    /// The status of the thin-pool target of `device`.
    /// - Throws: `.invalidArgument` when the device's live table is not a thin pool.
    public func thinPoolStatus(_ device: DeviceRef) throws -> ThinPoolStatus {
        let lines = try status(device)
        guard lines.count == 1, lines[0].type == "thin-pool", let status = ThinPoolStatus(parsing: lines[0].text) else {
            throw DeviceMapperError(
                code: .invalidArgument, operation: "thin pool status of \(device)",
                detail: "its status is '\(lines.map(\.description).joined(separator: "; "))', not a thin pool's")
        }
        return status
    }

    /// Sends a message to the device's target (sector 0): a thin pool's `create_thin 0`,
    /// `create_snap 1 0`, `delete 1`.
    /// - Note: DM_DEVICE_TARGET_MSG.
    public func message(_ device: DeviceRef, _ text: String) throws {
        try LibDM.run(
            .init(type: LibDM.targetMessage, call: "DM_DEVICE_TARGET_MSG '\(text)'", operation: "message '\(text)' to \(device)", device: device),
            configure: { task in LibDM.setMessage(task, text) },
            extract: { _ in () })
    }

    static func validate(name: String, uuid: String) throws {
        var problems: [String] = []
        if name.isEmpty || name.utf8.count > 127 { problems.append("a name must be 1 to 127 bytes") }
        if name.contains("/") { problems.append("a name cannot contain '/'") }
        if name == "." || name == ".." || name == "control" { problems.append("'\(name)' is reserved") }
        if uuid.utf8.count > 128 { problems.append("a UUID must be at most 128 bytes") }
        if !problems.isEmpty {
            throw DeviceMapperError(
                code: .invalidArgument, operation: "create of '\(name)'", detail: problems.joined(separator: "; "))
        }
    }
}

extension String {
    /// Reads a procfs/sysfs file (no size from stat: read until EOF).
    init(contentsOfProcFile path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceMapperError(code: .notFound, operation: "read of \(path)", errno: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        self = String(decoding: bytes, as: UTF8.self)
    }
}
