import BlockDevice
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The cgroup (v2) a run's steps and hooks run in: `<cgroup2 mount>/guard/<token>`, one child
/// per command. A step that double-forks, calls setsid or daemonizes leaves guard's process
/// group, but not its cgroup: guard kills the command's cgroup when it stops a step, the whole
/// run's before a rollback, and `guard recover` kills what is left of a dead run's before it
/// rolls back, so no process of the run writes after the rollback.
///
/// Under systemd too the directory is guard's own (systemd leaves cgroups it did not create
/// alone). Without a cgroup2 mount (a container, an old kernel) there is none, and steps are
/// contained by their process group only; `guard check` says so.
public struct RunCgroup: Sendable, Hashable {
    /// The run's directory.
    public let path: String

    /// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
    public static var mountPoint: String? {
        ((try? Mounts.current()) ?? []).first { $0.fileSystemType == "cgroup2" }?.target
    }

    /// The cgroup of the run with `token` (not created).
    public static func of(token: String) -> RunCgroup? {
        mountPoint.map { RunCgroup(path: "\($0)/guard/\(token)") }
    }

    /// Creates the run's cgroup; nil (and nothing made) where cgroup v2 is not mounted.
    public static func create(token: String) throws -> RunCgroup? {
        guard let cgroup = of(token: token) else { return nil }
        do {
            try FileManager.default.createDirectory(atPath: cgroup.path, withIntermediateDirectories: true)
        } catch {
            throw GuardFailure(.attention, "cannot create the run's cgroup \(cgroup.path): \(error)")
        }
        return cgroup
    }

    /// The cgroup of one command of the run (`step-2`, `rollback-stop-1`), created.
    public func child(_ name: String) throws -> RunCgroup {
        let child = RunCgroup(path: "\(path)/\(name)")
        try FileManager.default.createDirectory(atPath: child.path, withIntermediateDirectories: true)
        return child
    }

    /// `argv` run inside this cgroup on a kernel that cannot create a process inside one
    /// (before Linux 5.7; elsewhere `Spawn` does): a shell moves itself in, then execs it, so
    /// the command and everything it starts is inside from its first instruction. If the move
    /// fails the command does not run.
    public func wrap(_ argv: [String]) -> [String] {
        ["/bin/sh", "-c", "echo 0 > \"$0/cgroup.procs\" || { echo \"guard: cannot join the cgroup $0\" >&2; exit 126; }; exec \"$@\"", path] + argv
    }

    /// This cgroup's directory and its descendants', parents first.
    var directories: [String] {
        var result = FileManager.default.fileExists(atPath: path) ? [path] : []
        var index = 0
        while index < result.count {
            let directory = result[index]
            index += 1
            for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
                var isDirectory: ObjCBool = false
                if FileManager.default.fileExists(atPath: "\(directory)/\(name)", isDirectory: &isDirectory), isDirectory.boolValue {
                    result.append("\(directory)/\(name)")
                }
            }
        }
        return result
    }

    /// The processes in this cgroup and below.
    public var processes: [pid_t] {
        directories.flatMap { directory in
            ((try? String(contentsOfFile: "\(directory)/cgroup.procs", encoding: .utf8)) ?? "").split(separator: "\n").compactMap { pid_t($0) }
        }
    }

    /// Kills every process in this cgroup and below (`cgroup.kill`, or SIGKILL to each where
    /// the kernel has none), and waits up to `timeout` for them to be gone.
    /// - Returns: how many processes there were.
    @discardableResult
    public func killAll(timeout: Duration = .seconds(10)) async -> Int {
        guard FileManager.default.fileExists(atPath: path) else { return 0 }
        let found = processes.count
        guard found > 0 else { return 0 }
        let deadline = ContinuousClock.now + timeout
        repeat {
            signalAll()
            if processes.isEmpty { break }
            // Waits without holding a thread of the cooperative pool.
            try? await Task.sleep(for: .milliseconds(20))
        } while ContinuousClock.now < deadline
        return found
    }

    /// Sends KILL to every process in this cgroup and below, once (`cgroup.kill`, or to each
    /// process where the kernel has none); does not wait.
    public func signalAll() {
        if (try? "1".write(toFile: "\(path)/cgroup.kill", atomically: false, encoding: .utf8)) == nil {
            for pid in processes { kill(pid, SIGKILL) }
        }
    }

    /// Removes the cgroup's empty directories, deepest first; a cgroup with processes left (a
    /// daemon a committed step started) stays.
    public func removeIfEmpty() {
        for directory in directories.reversed() { rmdir(directory) }
        rmdir((path as NSString).deletingLastPathComponent)  // guard/, when no other run has one
    }
}
