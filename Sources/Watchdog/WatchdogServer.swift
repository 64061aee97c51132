import BlockDevice
import DeviceMapper

#if canImport(Glibc)
import Glibc
#endif

// The suspend-window watchdog: the process that resumes suspended devices if guard dies or
// stalls inside a window. It is `guard-watchdog`, an executable of its own built from this
// module only (DeviceMapper and BlockDevice, no Foundation), so the memory it locks is a
// few MiB, not guard's whole program. The client side (`ProcessWatchdog`) is in Engine.

/// The line protocol between guard and its watchdog: `arm <ms> [suspend <ref>...] resume
/// <ref>... [remove <ref>...]` (an `arm` with refs and no keyword resumes them), `disarm`,
/// `exit`; answers `ready`, `armed`, `disarmed`, `error ...`.
public enum WatchdogProtocol {
    public static func encode(_ plan: WatchdogPlan) -> String {
        func list(_ word: String, _ refs: [DeviceRef]) -> String {
            refs.isEmpty ? "" : " \(word) " + refs.map(encode).joined(separator: " ")
        }
        let text = list("suspend", plan.suspend) + list("resume", plan.resume) + list("remove", plan.remove)
        return String(text.drop { $0 == " " })
    }

    public static func decodePlan(_ words: some Sequence<Substring>) -> WatchdogPlan {
        var plan = WatchdogPlan(resume: [])
        var current = "resume"
        for word in words {
            if ["suspend", "resume", "remove"].contains(word) {
                current = String(word)
                continue
            }
            guard let ref = decode(word) else { continue }
            switch current {
            case "suspend": plan.suspend.append(ref)
            case "remove": plan.remove.append(ref)
            default: plan.resume.append(ref)
            }
        }
        return plan
    }

    public static func encode(_ ref: DeviceRef) -> String {
        switch ref {
        case .name(let name): return "name=\(name)"
        case .uuid(let uuid): return "uuid=\(uuid)"
        case .number(let number): return "dev=\(number)"
        }
    }

    public static func decode(_ text: Substring) -> DeviceRef? {
        let parts = text.split(separator: "=", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        switch parts[0] {
        case "name": return .name(String(parts[1]))
        case "uuid": return .uuid(String(parts[1]))
        case "dev": return DeviceNumber(parsing: parts[1]).map { .number($0) }
        default: return nil
        }
    }
}

/// The watchdog process itself (`guard-watchdog`, or `guard __watchdog` where that is missing).
public enum WatchdogServer {
    /// Serves the protocol on stdin/stdout until told to exit or guard goes away.
    /// - Returns: the exit status.
    public static func serve() -> Int32 {
        // Memory is locked when an arm names a device a page of the watchdog could have to be
        // read from (its program, libraries or swap there): most windows need no lock at all.
        var locked = false
        guard let dm = try? DeviceMapper(udev: .none) else {
            writeLine("error device-mapper unavailable")
            return 1
        }
        writeLine("ready")
        var armed: (deadline: ContinuousClock.Instant, plan: WatchdogPlan)?
        var buffer: [UInt8] = []
        while true {
            var timeout: Int32 = -1
            if let armed {
                let remaining = ContinuousClock.now.duration(to: armed.deadline)
                timeout = max(0, Int32(remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000))
            }
            var descriptor = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, timeout)
            if ready < 0 && errno == EINTR { continue }
            if ready == 0, let current = armed {
                fire(dm, current.plan, reason: "guard did not finish its suspend window in time")
                return 2
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = read(0, &chunk, chunk.count)
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                if let current = armed {
                    fire(dm, current.plan, reason: "guard exited while devices were suspended")
                    return 2
                }
                return 0
            }
            buffer += chunk[0..<count]
            while let newline = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                let words = line.split(separator: " ")
                switch words.first {
                case "arm":
                    let milliseconds = words.count > 1 ? Int64(words[1]) ?? 30_000 : 30_000
                    let plan = WatchdogProtocol.decodePlan(words.dropFirst(2))
                    let numbers = Set((plan.suspend + plan.resume).compactMap { ref -> DeviceNumber? in if case .number(let number) = ref { return number } else { return nil } })
                    if !locked && Memory.mayFault(on: numbers) { locked = (try? Memory.lockAll()) != nil }
                    armed = (ContinuousClock.now + .milliseconds(milliseconds), plan)
                    writeLine("armed")
                case "disarm":
                    armed = nil
                    writeLine("disarmed")
                case "exit":
                    return 0
                default:
                    writeLine("error unknown command")
                }
            }
        }
    }

    /// Finishes the window guard left: the rest of its suspends (if it began them), its resumes
    /// (the retired devices' onto their `error` tables), its removals. A window that never began (nothing suspended) is left alone: the tables
    /// guard loaded stay inactive, and `guard recover` clears them.
    private static func fire(_ dm: DeviceMapper, _ plan: WatchdogPlan, reason: String) {
        let began = plan.suspend.isEmpty || plan.suspend.contains { (try? dm.info($0))??.isSuspended == true }
        var resumed: [String] = []
        var removed: [String] = []
        if began {
            for device in plan.suspend {
                if let info = try? dm.info(device), !info.isSuspended { _ = try? dm.suspend(device, flush: true, lockFileSystem: false) }
            }
            for device in plan.resume {
                if let info = try? dm.info(device), info.isSuspended || info.hasInactiveTable {
                    if (try? dm.resume(device)) != nil { resumed.append(info.name) }
                }
            }
            for device in plan.remove {
                if let info = try? dm.info(device), (try? dm.removeRetired(device)) != nil { removed.append(info.name) }
            }
        }
        let what = resumed.isEmpty ? "resumed nothing (nothing was suspended)" : "resumed \(resumed.joined(separator: ", "))"
        let message = "guard watchdog: \(reason); \(what)\(removed.isEmpty ? "" : ", removed \(removed.joined(separator: ", "))"); run `guard recover`\n"
        _ = message.withCString { write(2, $0, strlen($0)) }
    }

    private static func writeLine(_ text: String) {
        let line = text + "\n"
        _ = line.withCString { write(1, $0, strlen($0)) }
    }
}
