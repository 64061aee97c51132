import BlockDevice
import DeviceMapper

// MARK: - The executor

/// When a window began and ended, and its two parts: suspending (the flush and the
/// filesystem freeze) and what followed while suspended (the check and the resumes).
public struct WindowTiming: Sendable {
    /// Before the first suspend.
    public var start: ContinuousClock.Instant
    /// After the last suspend returned: every device flushed and frozen.
    public var suspended: ContinuousClock.Instant
    /// After the last resume.
    public var end: ContinuousClock.Instant

    public init(start: ContinuousClock.Instant, suspended: ContinuousClock.Instant, end: ContinuousClock.Instant) {
        self.start = start
        self.suspended = suspended
        self.end = end
    }

    /// A timing for a set that was not taken by this process (attached later).
    public static var none: WindowTiming {
        let now = ContinuousClock.now
        return WindowTiming(start: now, suspended: now, end: now)
    }

    /// The whole window, first suspend to last resume.
    public var microseconds: UInt64 { Self.microseconds(end - start) }
    /// The suspends: the flush and the freeze.
    public var suspendMicroseconds: UInt64 { Self.microseconds(suspended - start) }
    /// The check and the resumes, with everything suspended.
    public var resumeMicroseconds: UInt64 { Self.microseconds(end - suspended) }

    /// "suspended for 61234 µs (suspend and freeze 48000 µs, resumes 13234 µs)": the journal's words.
    public var description: String {
        "suspended for \(microseconds) µs (suspend and freeze \(suspendMicroseconds) µs, resumes \(resumeMicroseconds) µs)"
    }

    static func microseconds(_ duration: Duration) -> UInt64 {
        let parts = duration.components
        guard parts.seconds >= 0 else { return 0 }
        return UInt64(parts.seconds) * 1_000_000 + UInt64(parts.attoseconds / 1_000_000_000_000)
    }
}

/// The kernel calls a transition needs: `DeviceMapper`'s, or a recorder in the unit tests.
public protocol TransitionDevices {
    func load(_ device: DeviceRef, table: Table, readOnly: Bool) throws
    func clearInactiveTable(_ device: DeviceRef) throws
    func suspend(_ device: DeviceRef, flush: Bool, lockFileSystem: Bool) throws
    func resume(_ device: DeviceRef, udevFlags: UdevFlags, batch: UdevBatch?) throws
    func message(_ device: DeviceRef, _ text: String) throws
    /// Removes a retired device (on its `error` table; a process may still hold it open).
    func removeDevice(_ device: DeviceRef, batch: UdevBatch?) throws
}

extension DeviceMapper: TransitionDevices {
    /// A retired device: removed now, or by the kernel once its last opener closes it.
    public func removeDevice(_ device: DeviceRef, batch: UdevBatch?) throws {
        try removeRetired(device, batch: batch)
    }
}

/// Runs transitions. The only code in guard that suspends a device.
public struct TransitionExecutor<Devices: TransitionDevices> {
    public var devices: Devices
    public var watchdog: (any WindowWatchdog)?
    public var watchdogTimeout: Duration
    /// Receives warnings, after the window (never while a device is suspended).
    public var log: ((String) -> Void)?
    /// Where crash points go: `CrashPoint.hit`, or a recorder in the unit tests.
    public var crashPoint: (CrashPoint) -> Void = { CrashPoint.hit($0) }
    /// Whether guard's memory must be locked while these devices are suspended.
    public var mayFault: (Set<DeviceNumber>) -> Bool = { Memory.mayFault(on: $0) }
    public var lockMemory: () throws -> Void = { try Memory.lockAll() }
    public var unlockMemory: () -> Void = { Memory.unlockAll() }

    public init(devices: Devices, watchdog: (any WindowWatchdog)?, watchdogTimeout: Duration, log: ((String) -> Void)?) {
        self.devices = devices
        self.watchdog = watchdog
        self.watchdogTimeout = watchdogTimeout
        self.log = log
    }

    /// Loads the tables, then runs the window: watchdog armed with the resume order, memory
    /// locked where it must be, libdevmapper's log held, suspends, the check, resumes; then
    /// one udev wait. Nothing is logged, journaled, executed or read from a filesystem
    /// between the first suspend and the last resume.
    ///
    /// - Parameters:
    ///   - udev: a batch the caller already uses and waits for itself (the take shares the
    ///     one `prepare` opened, so no udev cookie is made inside the window); nil for one
    ///     of the executor's own, waited for after the last resume.
    ///   - afterFailedLoad: runs when a load failed (after the loaded tables are cleared,
    ///     before the error is thrown): nothing was suspended.
    /// - Returns: when the window began and ended, and its parts.
    @discardableResult
    public func run(_ transition: Transition, udev: UdevBatch? = nil, afterFailedLoad: (() -> Void)? = nil) throws -> WindowTiming {
        let problems = transition.problems
        guard problems.isEmpty else {
            throw SnapshotError(.other, transition.name, "guard refused its own description of the change: \(problems.joined(separator: "; "))")
        }
        var loaded: [DeviceRef] = []
        do {
            for load in transition.loads {
                loaded.append(load.device)
                try devices.load(load.device, table: load.table, readOnly: load.readOnly)
                if let point = load.crashPointAfter { crashPoint(point) }
            }
        } catch {
            for device in loaded { try? devices.clearInactiveTable(device) }
            afterFailedLoad?()
            throw error
        }
        return try window(transition, udev: udev)
    }

    private func window(_ transition: Transition, udev: UdevBatch?) throws -> WindowTiming {
        // Nothing is suspended unarmed: an engine that changes tables has a watchdog (Engine's
        // context gives every one it makes), and one without it is a bug, refused here.
        guard let watchdog else {
            throw SnapshotError(.other, transition.name, "guard refused to suspend a device without its suspend watchdog (an engine made without one: a bug)")
        }
        let batch = udev ?? UdevBatch()
        try watchdog.arm(transition.watchdogPlan, timeout: watchdogTimeout)
        // Locked only where a page of guard could have to come from a suspended device.
        let lockNeeded = mayFault(transition.suspendedNumbers)
        var memoryLocked = lockNeeded
        if lockNeeded { do { try lockMemory() } catch { memoryLocked = false } }
        DeviceMapper.holdLog()

        let clock = ContinuousClock()
        let start = clock.now
        var allSuspended = start
        var suspended: [DeviceRef] = []
        var resumed: Set<DeviceRef> = []
        var failure: (any Error)?
        do {
            for suspension in transition.suspensions {
                try devices.suspend(suspension.device, flush: suspension.flush, lockFileSystem: suspension.lockFileSystem)
                suspended.append(suspension.device)
            }
            allSuspended = clock.now
            if let point = transition.crashPointSuspended { crashPoint(point) }
            for message in transition.messages {
                try devices.message(message.device, message.text)
                if let point = message.crashPointAfter { crashPoint(point) }
            }
            try transition.check?()
            for resumption in transition.resumptions {
                try devices.resume(resumption.device, udevFlags: resumption.udevFlags, batch: batch)
                resumed.insert(resumption.device)
                suspended.removeAll { $0 == resumption.device }
                if let point = resumption.crashPointAfter { crashPoint(point) }
            }
        } catch {
            failure = error
            switch transition.onFailure {
            case .completeForward:
                for resumption in transition.resumptions where !resumed.contains(resumption.device) {
                    if (try? devices.resume(resumption.device, udevFlags: resumption.udevFlags, batch: batch)) != nil {
                        resumed.insert(resumption.device)
                    }
                }
            case .revertSuspended:
                for device in transition.suspendBeforeRevert where resumed.contains(device) {
                    try? devices.suspend(device, flush: false, lockFileSystem: false)
                }
                for device in suspended {
                    try? devices.clearInactiveTable(device)
                    try? devices.resume(device, udevFlags: [], batch: batch)
                }
            }
        }
        // Retired once every resumption is done (a reverted window leaves them as they were):
        // onto their `error` tables, their own targets gone. One that cannot be resumed stays
        // suspended, never live again: `guard recover` retires it.
        let end = clock.now
        var retirementFailure: (any Error)?
        var retired: [DeviceRef] = []
        if transition.resumptions.allSatisfy({ resumed.contains($0.device) }) {
            for device in transition.retirements {
                do {
                    try devices.resume(device, udevFlags: [.hidden, .lowPriority], batch: batch)
                    retired.append(device)
                } catch {
                    retirementFailure =
                        retirementFailure
                        ?? SnapshotError(
                            .other, transition.name, "\(device) could not be retired (\(error)); it stays suspended, never live again",
                            hint: "run `guard recover`, which retires and removes it")
                }
            }
        }

        if !watchdog.disarm() {
            log?("warning: the suspend watchdog fired or died during the \(transition.name) (it resumes the devices itself when it fires); check `guard status` and the system log")
        }
        if memoryLocked { unlockMemory() }
        DeviceMapper.releaseLog()
        // Outside the window: the retired devices go (the kernel removes one still held open
        // when it is closed). A removal that fails leaves an `error` device, which blocks no one.
        for device in retired {
            do { try devices.removeDevice(device, batch: batch) } catch {
                log?("warning: \(device), retired by the \(transition.name), could not be removed (\(error)); it has an error table and blocks nothing; `guard recover` removes it")
            }
        }
        if udev == nil { batch.finish() }
        if lockNeeded && !memoryLocked { log?("warning: could not lock guard's memory for the suspend window (guard's program or swap is on a volume it suspends)") }
        if let failure { throw failure }
        if let retirementFailure { throw retirementFailure }
        return WindowTiming(start: start, suspended: allSuspended, end: end)
    }
}
