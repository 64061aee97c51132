import BlockDevice
import CDeviceMapper
import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

// Every call into libdevmapper is in this file. libdevmapper keeps global state (its
// control descriptor, pending /dev/mapper node operations, the log function), so calls
// are serialized by one process-wide lock, and its log goes to `LibDM.messages` instead
// of stderr.

/// One message libdevmapper logged.
public struct DeviceMapperLogMessage: Sendable, CustomStringConvertible {
    /// libdevmapper's level: 2 fatal, 3 error, 4 warning, 5 notice, 6 info, 7 debug.
    public var level: Int32
    public var file: String
    public var line: Int32
    public var errno: Int32
    public var text: String
    public var description: String { text }
}

/// How guard identifies a device to the kernel.
public enum DeviceRef: Hashable, Sendable, CustomStringConvertible {
    case name(String)
    case uuid(String)
    case number(DeviceNumber)

    public var description: String {
        switch self {
        case .name(let name): return name
        case .uuid(let uuid): return uuid
        case .number(let number): return number.description
        }
    }
}

/// The log callback handed to the C shim: it can capture nothing, so it appends to a global.
private let logCallback: guard_dm_log_callback = { level, file, line, dmErrno, message in
    let entry = DeviceMapperLogMessage(
        level: level, file: file.map { String(cString: $0) } ?? "", line: line, errno: dmErrno,
        text: message.map { String(cString: $0) } ?? "")
    LibDM.messages.withLock { $0.append(entry) }
}

enum LibDM {
    /// Serializes every libdevmapper call: the library is not thread-safe.
    static let serial = LockedValue(())
    /// Messages logged by libdevmapper during the current call.
    static let messages = LockedValue<[DeviceMapperLogMessage]>([])
    /// Where messages go after a call (guard's log), set by the caller; nil drops them.
    static let sink = LockedValue<(@Sendable (DeviceMapperLogMessage) -> Void)?>(nil)

    private static let installed: Bool = {
        guard_dm_log_install(logCallback, 5)
        return true
    }()

    static func install() { _ = installed }

    static func setVerbose(_ verbose: Bool) {
        install()
        guard_dm_log_set_level(verbose ? 7 : 5)
    }

    static func configureUdev(sync: Bool) {
        serial.withLock { _ in
            install()
            dm_udev_set_sync_support(sync ? 1 : 0)
        }
    }

    static func udevSyncActive() -> Bool {
        serial.withLock { _ in
            install()
            return dm_udev_get_sync_support() != 0
        }
    }

    /// What one task needs besides its type.
    struct Request {
        var type: Int32
        var call: String
        var operation: String
        var device: DeviceRef?
        /// Passed to dm_task_set_cookie; nil for tasks that make no uevent.
        var udevFlags: UInt16?
        /// A cookie shared with other tasks, waited for by the caller; nil to wait here.
        var sharedCookie: UdevBatch?
    }

    /// Creates a task, configures it, runs it and hands it to `extract`, all under the lock.
    /// The task cannot escape: it is destroyed when this returns.
    static func run<T>(
        _ request: Request,
        configure: (OpaquePointer) -> Bool = { _ in true },
        extract: (OpaquePointer) throws -> T
    ) throws -> T {
        let started = monotonicSeconds()
        return try serial.withLock { _ throws -> T in
            install()
            messages.withLock { $0.removeAll() }
            guard let task = dm_task_create(request.type) else {
                throw DeviceMapperError(code: .other, operation: request.operation, call: "dm_task_create")
            }
            defer { dm_task_destroy(task) }

            var ok = true
            switch request.device {
            case .name(let name)?: ok = dm_task_set_name(task, name) != 0
            case .uuid(let uuid)?: ok = dm_task_set_uuid(task, uuid) != 0
            case .number(let number)?:
                ok = dm_task_set_major(task, Int32(number.major)) != 0 && dm_task_set_minor(task, Int32(number.minor)) != 0
            case nil: break
            }
            ok = ok && configure(task)
            guard ok else {
                throw failure(request, errno: 0, started: started, fallbackCode: .invalidArgument)
            }

            var ownCookie: UInt32 = 0
            if let flags = request.udevFlags {
                if let batch = request.sharedCookie {
                    ok = dm_task_set_cookie(task, &batch.cookie, flags) != 0
                    batch.used = true
                } else {
                    ok = dm_task_set_cookie(task, &ownCookie, flags) != 0
                }
                guard ok else { throw failure(request, errno: 0, started: started, fallbackCode: .other) }
            }

            let succeeded = dm_task_run(task) != 0
            let code = dm_task_get_errno(task)
            // With a cookie of its own the task is waited for now (this also performs pending
            // /dev/mapper node operations when udev sync is off); a shared cookie is waited for later.
            if request.udevFlags != nil && request.sharedCookie == nil {
                _ = dm_udev_wait(ownCookie)
            }
            guard succeeded else { throw failure(request, errno: code, started: started, fallbackCode: .other) }
            let result = try extract(task)
            flushMessages()
            return result
        }
    }

    /// Waits for a shared cookie (or performs pending node operations without udev).
    static func wait(_ batch: UdevBatch) {
        serial.withLock { _ in
            _ = dm_udev_wait(batch.cookie)
            batch.cookie = 0
            batch.used = false
        }
    }

    /// While set, messages are kept in memory instead of going to the sink (which may write
    /// to a disk): inside the suspend window nothing may touch a filesystem.
    static let held = LockedValue<[DeviceMapperLogMessage]?>(nil)

    static func holdLog(_ hold: Bool) {
        let released = held.withLock { buffer -> [DeviceMapperLogMessage] in
            defer { buffer = hold ? (buffer ?? []) : nil }
            return hold ? [] : (buffer ?? [])
        }
        if let sink = sink.withLock({ $0 }) { released.forEach(sink) }
    }

    private static func deliver(_ list: [DeviceMapperLogMessage]) {
        guard !list.isEmpty else { return }
        let kept = held.withLock { buffer -> Bool in
            guard buffer != nil else { return false }
            buffer!.append(contentsOf: list)
            return true
        }
        if !kept, let sink = sink.withLock({ $0 }) { list.forEach(sink) }
    }

    private static func flushMessages() {
        let drained = messages.withLock { list -> [DeviceMapperLogMessage] in
            defer { list.removeAll() }
            return list
        }
        deliver(drained)
    }

    /// Builds the error for a failed task from errno, libdevmapper's messages and the kernel log.
    private static func failure(
        _ request: Request, errno code: Int32, started: Double, fallbackCode: DeviceMapperError.Code
    ) -> DeviceMapperError {
        let logged = messages.withLock { list -> [DeviceMapperLogMessage] in
            defer { list.removeAll() }
            return list
        }
        deliver(logged)
        var notes: [String] = []
        // libdevmapper repeats the ioctl failure guard already reports; keep what it adds.
        for message in logged where message.level <= 4 {
            let text = message.text
            if text.contains("ioctl on") || text.contains("Failure to communicate") || text.isEmpty { continue }
            if !notes.contains(text) { notes.append(text) }
        }
        // The kernel explains refused tables and failed resumes only in its log.
        let explained: Set<Int32> = [reload, resume, suspend, create, targetMessage]
        if code != 0 && explained.contains(request.type),
            let kernel = KernelLog.latestDeviceMapperMessage(since: started)
        {
            notes.append("kernel: \(kernel)")
        }
        var errorCode = code != 0 ? DeviceMapperError.Code.from(errno: code) : fallbackCode
        if request.type == Int32(DM_DEVICE_CREATE) && code == EBUSY { errorCode = .exists }
        if code == 0 && logged.contains(where: { $0.text.contains("Failure to communicate") || $0.text.contains("control") }) {
            errorCode = .driverMissing
        }
        return DeviceMapperError(
            code: errorCode, operation: request.operation, call: request.call, errno: code == 0 ? nil : code,
            detail: notes.isEmpty ? nil : notes.joined(separator: "; "))
    }

    static func cString(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }

    // MARK: Result readers (called inside `extract`).

    static func info(_ task: OpaquePointer) -> DeviceInfo? {
        var raw = dm_info()
        guard dm_task_get_info(task, &raw) != 0, raw.exists != 0 else { return nil }
        let name = dm_task_get_name(task).map { String(cString: $0) } ?? ""
        let uuid = dm_task_get_uuid(task).map { String(cString: $0) } ?? ""
        return DeviceInfo(
            name: name, uuid: uuid, number: DeviceNumber(major: raw.major, minor: raw.minor),
            openCount: Int(raw.open_count), isSuspended: raw.suspended != 0, hasLiveTable: raw.live_table != 0,
            hasInactiveTable: raw.inactive_table != 0, isReadOnly: raw.read_only != 0,
            targetCount: Int(raw.target_count), eventNumber: raw.event_nr, removalDeferred: raw.deferred_remove != 0)
    }

    static func targets(_ task: OpaquePointer) -> [(start: UInt64, length: UInt64, type: String, parameters: String)] {
        var result: [(UInt64, UInt64, String, String)] = []
        var next: UnsafeMutableRawPointer? = nil
        repeat {
            var start: UInt64 = 0
            var length: UInt64 = 0
            var type: UnsafeMutablePointer<CChar>? = nil
            var parameters: UnsafeMutablePointer<CChar>? = nil
            next = dm_get_next_target(task, next, &start, &length, &type, &parameters)
            if let type {
                result.append((start, length, String(cString: type), parameters.map { String(cString: $0) } ?? ""))
            }
        } while next != nil
        return result
    }

    static func names(_ task: OpaquePointer) -> [(name: String, number: DeviceNumber)] {
        guard let first = dm_task_get_names(task) else { return [] }
        var result: [(String, DeviceNumber)] = []
        var cursor: UnsafePointer<dm_names>? = UnsafePointer(first)
        while let entry = cursor {
            let dev = guard_dm_names_dev(entry)
            if dev == 0 { break }  // an empty list has one zeroed entry
            result.append((String(cString: guard_dm_names_name(entry)), DeviceNumber(dev_t(dev))))
            cursor = guard_dm_names_next(entry)
        }
        return result
    }

    static func versions(_ task: OpaquePointer) -> [String: String] {
        guard let first = dm_task_get_versions(task) else { return [:] }
        var result: [String: String] = [:]
        var cursor: UnsafePointer<dm_versions>? = UnsafePointer(first)
        while let entry = cursor {
            var version: (UInt32, UInt32, UInt32) = (0, 0, 0)
            withUnsafeMutableBytes(of: &version) { raw in
                guard_dm_versions_version(entry, raw.baseAddress!.assumingMemoryBound(to: UInt32.self))
            }
            result[String(cString: guard_dm_versions_name(entry))] = "\(version.0).\(version.1).\(version.2)"
            cursor = guard_dm_versions_next(entry)
        }
        return result
    }

    static func driverVersion(_ task: OpaquePointer) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = dm_task_get_driver_version(task, &buffer, buffer.count)
        return cString(buffer)
    }

    // MARK: Task options (called inside `configure`).

    static func addTarget(_ task: OpaquePointer, _ line: Table.Line) -> Bool {
        dm_task_add_target(task, line.start, line.length, line.target.typeName, line.target.parameters) != 0
    }
    static func setUUID(_ task: OpaquePointer, _ uuid: String) -> Bool { dm_task_set_uuid(task, uuid) != 0 }
    static func setReadOnly(_ task: OpaquePointer) -> Bool { dm_task_set_ro(task) != 0 }
    static func noFlush(_ task: OpaquePointer) -> Bool { dm_task_no_flush(task) != 0 }
    static func skipLockFS(_ task: OpaquePointer) -> Bool { dm_task_skip_lockfs(task) != 0 }
    static func queryInactive(_ task: OpaquePointer) -> Bool { dm_task_query_inactive_table(task) != 0 }
    static func deferRemoval(_ task: OpaquePointer) -> Bool { dm_task_deferred_remove(task) != 0 }
    static func setMessage(_ task: OpaquePointer, _ text: String) -> Bool {
        dm_task_set_sector(task, 0) != 0 && dm_task_set_message(task, text) != 0
    }

    static let create = Int32(DM_DEVICE_CREATE)
    static let reload = Int32(DM_DEVICE_RELOAD)
    static let remove = Int32(DM_DEVICE_REMOVE)
    static let suspend = Int32(DM_DEVICE_SUSPEND)
    static let resume = Int32(DM_DEVICE_RESUME)
    static let infoType = Int32(DM_DEVICE_INFO)
    static let version = Int32(DM_DEVICE_VERSION)
    static let status = Int32(DM_DEVICE_STATUS)
    static let table = Int32(DM_DEVICE_TABLE)
    static let list = Int32(DM_DEVICE_LIST)
    static let clear = Int32(DM_DEVICE_CLEAR)
    static let listVersions = Int32(DM_DEVICE_LIST_VERSIONS)
    static let targetMessage = Int32(DM_DEVICE_TARGET_MSG)

    static let hiddenFlags = UInt16(
        DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG | DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG)
    static let lowPriorityFlag = UInt16(DM_UDEV_LOW_PRIORITY_FLAG)
}

/// A udev cookie shared by several tasks (the resumes of a snapshot set), waited for once
/// after the last of them. Without udev sync, `finish()` performs the pending /dev/mapper
/// node operations instead.
public final class UdevBatch {
    var cookie: UInt32 = 0
    var used = false

    public init() {}

    /// Waits for udev to have processed every task of the batch.
    /// - Note: dm_udev_wait(cookie).
    public func finish() {
        if used { LibDM.wait(self) }
    }

    deinit { if used { LibDM.wait(self) } }
}

/// The kernel's own account of a device-mapper failure: the reason for an EINVAL is only
/// in the kernel log ("device-mapper: table: 254:5: snapshot: Couldn't create exception store").
enum KernelLog {
    static func latestDeviceMapperMessage(since started: Double) -> String? {
        var buffer = [CChar](repeating: 0, count: 1 << 18)
        let count = guard_read_kernel_log(&buffer, Int32(buffer.count))
        guard count > 0 else { return nil }
        let text = String(decoding: buffer[0..<Int(count)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        for line in text.split(separator: "\n").reversed() {
            guard let range = line.firstRange(of: "device-mapper:") else { continue }
            // "<3>[  123.456789] device-mapper: ..." : keep messages from this call only.
            if let open = line.firstIndex(of: "["), let close = line.firstIndex(of: "]"), open < close,
                let stamp = Double(line[line.index(after: open)..<close].trimmingWhitespace())
            {
                guard stamp >= started - 0.5 else { return nil }
            }
            return String(line[range.lowerBound...])
        }
        return nil
    }
}
