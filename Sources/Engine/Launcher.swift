import BlockDevice
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A command followed from its start to its end: its leader's wait status, and the forced
/// ending (timeout, stop) if there was one.
struct Launched {
    var pid: pid_t
    /// waitpid(2)'s status of the leader.
    var status: Int32
    var forced: StepTermination?

    var termination: StepTermination {
        if let forced { return forced }
        // WIFEXITED: the low 7 bits are 0, the code is in bits 8-15; else the signal is there.
        return status & 0x7f == 0 ? .exited((status >> 8) & 0xff) : .signaled(status & 0x7f)
    }
}

/// Starts steps and hooks with one clone and one exec (`Spawn`), created inside their cgroup
/// where there is one, and follows each on a thread of its own: both output pipes read with
/// poll(2) until they close, the leader reaped with waitpid(2), the timeout and the stop
/// request checked every 50 ms.
enum Launcher {
    static func run(
        _ argv: [String], environment: [String: String], directory: String?, cgroup: RunCgroup?,
        timeout: Duration?, stop: (@Sendable () -> String?)?, grace: Duration,
        output: @escaping @Sendable (StepOutput.Stream, ArraySlice<UInt8>) -> Void
    ) async -> Result<Launched, SpawnError> {
        let outPipe: (read: Int32, write: Int32)
        let errPipe: (read: Int32, write: Int32)
        do {
            outPipe = try Spawn.pipe()
            do { errPipe = try Spawn.pipe() } catch {
                close(outPipe.read)
                close(outPipe.write)
                return .failure(error)
            }
        } catch {
            return .failure(error)
        }
        let pid: pid_t
        do {
            pid = try start(argv, environment: environment, directory: directory, cgroup: cgroup, stdout: outPipe.write, stderr: errPipe.write)
        } catch {
            [outPipe.read, outPipe.write, errPipe.read, errPipe.write].forEach { close($0) }
            return .failure(error)
        }
        close(outPipe.write)
        close(errPipe.write)
        let (out, err) = (outPipe.read, errPipe.read)
        return .success(
            await withCheckedContinuation { continuation in
                Thread {
                    continuation.resume(returning: follow(pid: pid, out: out, err: err, cgroup: cgroup, timeout: timeout, stop: stop, grace: grace, output: output))
                }.start()
            })
    }

    /// Starts the command inside its cgroup. Where the kernel cannot create a process inside a
    /// cgroup (before Linux 5.7), a shell moves itself in first, then execs the command.
    private static func start(
        _ argv: [String], environment: [String: String], directory: String?, cgroup: RunCgroup?, stdout: Int32, stderr: Int32
    ) throws(SpawnError) -> pid_t {
        do {
            return try Spawn.start(path: argv[0], arguments: argv, environment: environment, directory: directory, cgroup: cgroup?.path, stdout: stdout, stderr: stderr)
        } catch .create(let code) where cgroup != nil && [ENOSYS, EINVAL, E2BIG, EOPNOTSUPP].contains(code) {
            let wrapped = cgroup!.wrap(argv)
            return try Spawn.start(path: wrapped[0], arguments: wrapped, environment: environment, directory: directory, cgroup: nil, stdout: stdout, stderr: stderr)
        }
    }

    /// Follows the command until its output has closed and its leader has exited. A timeout or
    /// a stop sends TERM to its process group and, `grace` later, KILL to the group and to its
    /// cgroup: a process that left the group (setsid) and holds the output would hold the step.
    private static func follow(
        pid: pid_t, out: Int32, err: Int32, cgroup: RunCgroup?, timeout: Duration?, stop: (@Sendable () -> String?)?, grace: Duration,
        output: @Sendable (StepOutput.Stream, ArraySlice<UInt8>) -> Void
    ) -> Launched {
        let clock = ContinuousClock()
        let deadline = timeout.map { clock.now + $0 }
        var open = [out, err]
        var status: Int32 = 0
        var exited = false
        var forced: StepTermination?
        var terminated: ContinuousClock.Instant?
        var killed = false
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !(open.isEmpty && exited) {
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), 50) > 0 {
                for entry in fds where entry.revents != 0 {
                    let count = read(entry.fd, &buffer, buffer.count)
                    if count > 0 {
                        output(entry.fd == out ? .stdout : .stderr, buffer[0..<count])
                    } else if count == 0 || errno != EINTR {
                        open.removeAll { $0 == entry.fd }
                        close(entry.fd)
                    }
                }
            }
            if !exited {
                let waited = waitpid(pid, &status, WNOHANG)
                if waited == pid {
                    exited = true
                } else if waited < 0 && errno == ECHILD {
                    exited = true  // reaped elsewhere: nothing is known of how it ended
                    status = 255 << 8
                }
            }
            if forced == nil {
                if let deadline, clock.now >= deadline {
                    forced = .timedOut
                } else if let reason = stop?() {
                    forced = .stopped(reason)
                }
            }
            if forced != nil {
                if let since = terminated {
                    if !killed && clock.now - since >= grace {
                        kill(-pid, SIGKILL)
                        cgroup?.signalAll()
                        killed = true
                    } else if killed && !open.isEmpty && clock.now - since >= grace * 2 {
                        // Killed, and still its output is held open (by a process outside its
                        // group where there is no cgroup): stop reading; the step is over.
                        open.forEach { close($0) }
                        open.removeAll()
                    }
                } else {
                    kill(-pid, SIGTERM)
                    terminated = clock.now
                }
            }
        }
        return Launched(pid: pid, status: status, forced: forced)
    }
}
