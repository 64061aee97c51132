import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// Why a program did not start.
public enum SpawnError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The cgroup's directory cannot be opened.
    case cgroup(path: String, errno: Int32)
    /// The process could not be created (clone3: ENOSYS or EINVAL on a kernel that cannot
    /// create a process inside a cgroup, EAGAIN at the process limit).
    case create(errno: Int32)
    /// The child could not run the program (execve, chdir).
    case child(path: String, errno: Int32)

    public var description: String {
        switch self {
        case .cgroup(let path, let code): return "cannot open the cgroup \(path): \(String(cString: strerror(code)))"
        case .create(let code): return "cannot create a process: \(String(cString: strerror(code)))"
        case .child(let path, let code): return "cannot execute \(path): \(String(cString: strerror(code)))"
        }
    }
}

/// Starting a program the way guard runs steps and hooks: one clone and one exec, no shell.
public enum Spawn {
    /// Starts `path` with `arguments` (argv[0] included) and exactly `environment`, in a session
    /// of its own (its pid is its process group's), stdin /dev/null (or `stdin`), stdout and stderr on the
    /// given descriptors, in `directory` (nil: guard's). With `cgroup`, the process is created
    /// inside that cgroup directory (clone3 CLONE_INTO_CGROUP), so it and everything it starts
    /// are in it from their first instruction.
    /// - Returns: the pid, once the program runs.
    public static func start(
        path: String, arguments: [String], environment: [String: String], directory: String?, cgroup: String?,
        stdin: Int32 = -1, stdout: Int32, stderr: Int32
    ) throws(SpawnError) -> pid_t {
        var cgroupFD: Int32 = -1
        if let cgroup {
            cgroupFD = Glibc.open(cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard cgroupFD >= 0 else { throw .cgroup(path: cgroup, errno: errno) }
        }
        defer { if cgroupFD >= 0 { Glibc.close(cgroupFD) } }
        var inChild: Int32 = 0
        // Every string is copied before the clone: the child allocates nothing.
        let result = withCStringArray(arguments) { argv in
            withCStringArray(environment.map { "\($0.key)=\($0.value)" }) { envp in
                guard_spawn(path, argv, envp, directory, cgroupFD, stdin, stdout, stderr, &inChild)
            }
        }
        guard result < 0 else { return pid_t(result) }
        throw inChild != 0 ? .child(path: path, errno: -result) : .create(errno: -result)
    }

    /// A pipe whose ends close at exec: (read, write).
    public static func pipe() throws(SpawnError) -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        let result = guard_pipe_cloexec(&fds)
        guard result == 0 else { throw .create(errno: -result) }
        return (fds[0], fds[1])
    }

    private static func withCStringArray<T>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> T) -> T {
        var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
        pointers.append(nil)
        defer { for pointer in pointers { free(pointer) } }
        return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
    }
}

extension Spawn {
    /// What a program run to its end by `run` left.
    public struct Finished: Sendable {
        /// Its exit status; 128 + the signal's number when a signal ended it (as a shell says).
        public var status: Int32
        /// What it wrote to stdout (and to stderr, when `run` captured both).
        public var output: [UInt8]
        /// `output` as text, without the whitespace around it.
        public var text: String { String(decoding: output, as: UTF8.self).trimmingWhitespace() }
    }

    /// Where `run` puts a program's stderr.
    public enum ErrorOutput: Sendable {
        /// Into `Finished.output`, interleaved with stdout as the program wrote them.
        case captured
        /// /dev/null.
        case discarded
    }

    /// Runs `path` to its end (stdin /dev/null) and returns its exit status and output: the
    /// one way guard runs a helper program (systemctl, thin_check, diff). `environment` nil is
    /// guard's own. Started as `start` starts a step: one clone and one exec, no shell, no
    /// threads, so it works in an initramfs too.
    public static func run(_ path: String, _ arguments: [String], environment: [String: String]? = nil, stderr errors: ErrorOutput = .captured) throws(SpawnError) -> Finished {
        let pipe = try Spawn.pipe()
        var readEnd = pipe.read
        var writeEnd = pipe.write
        defer {
            if readEnd >= 0 { Glibc.close(readEnd) }
            if writeEnd >= 0 { Glibc.close(writeEnd) }
        }
        var errorFD = writeEnd
        if case .discarded = errors {
            errorFD = Glibc.open("/dev/null", O_WRONLY | O_CLOEXEC)
            guard errorFD >= 0 else { throw .create(errno: errno) }
        }
        defer { if errorFD != writeEnd { Glibc.close(errorFD) } }
        let pid = try start(
            path: path, arguments: [path] + arguments, environment: environment ?? currentEnvironment(), directory: nil, cgroup: nil,
            stdout: writeEnd, stderr: errorFD)
        Glibc.close(writeEnd)
        writeEnd = -1
        var output: [UInt8] = []
        _ = Sys.readToEnd(readEnd, into: &output)  // a read error ends the output, not the wait
        Glibc.close(readEnd)
        readEnd = -1
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let signal = status & 0x7f
        return Finished(status: signal == 0 ? (status >> 8) & 0xff : 128 + signal, output: output)
    }

    /// This process's environment, as `environ` has it.
    public static func currentEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var entry = environ
        while let pointer = entry.pointee {
            let text = String(cString: pointer)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            entry += 1
        }
        return result
    }
}
