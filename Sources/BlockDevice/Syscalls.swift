import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

// Every raw system call of BlockDevice goes through here: errno is read at once and
// EINTR is retried, so callers see either a value or a typed error.

enum Sys {
    /// Retries `body` while it fails with EINTR; returns its result or throws with errno.
    @inline(__always)
    static func retrying<T: FixedWidthInteger>(
        _ call: String, operation: @autoclosure () -> String, _ body: () -> T
    ) throws(BlockDeviceError) -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = Glibc.errno
            if code == EINTR { continue }
            throw .syscall(call, errno: code, operation: operation())
        }
    }

    static func open(_ path: String, _ flags: Int32, mode: mode_t = 0, operation: @autoclosure () -> String)
        throws(BlockDeviceError) -> Int32
    {
        try retrying("open(\(path))", operation: operation()) { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    static func close(_ fd: Int32) {
        _ = Glibc.close(fd)  // Linux: never retry close.
    }

    static func stat(_ path: String, operation: @autoclosure () -> String) throws(BlockDeviceError) -> stat {
        var buffer = Glibc.stat()
        _ = try retrying("stat(\(path))", operation: operation()) { guard_stat(path, &buffer) }
        return buffer
    }

    static func lstat(_ path: String, operation: @autoclosure () -> String) throws(BlockDeviceError) -> stat {
        var buffer = Glibc.stat()
        _ = try retrying("lstat(\(path))", operation: operation()) { guard_lstat(path, &buffer) }
        return buffer
    }

    static func fstat(_ fd: Int32, operation: @autoclosure () -> String) throws(BlockDeviceError) -> stat {
        var buffer = Glibc.stat()
        _ = try retrying("fstat", operation: operation()) { guard_fstat(fd, &buffer) }
        return buffer
    }

    /// ioctl through the shim, which retries EINTR itself and returns -errno.
    static func ioctl(
        _ fd: Int32, _ request: UInt, _ name: String, pointer: UnsafeMutableRawPointer,
        operation: @autoclosure () -> String
    ) throws(BlockDeviceError) -> Int32 {
        let result = guard_ioctl_ptr(fd, request, pointer)
        if result < 0 { throw .syscall("ioctl \(name)", errno: -result, operation: operation()) }
        return result
    }

    static func ioctl(
        _ fd: Int32, _ request: UInt, _ name: String, value: UInt,
        operation: @autoclosure () -> String
    ) throws(BlockDeviceError) -> Int32 {
        let result = guard_ioctl_long(fd, request, value)
        if result < 0 { throw .syscall("ioctl \(name)", errno: -result, operation: operation()) }
        return result
    }

    /// mount(2) without libmount: a bind or a propagation change (no filesystem is read).
    static func mount(_ source: String?, _ target: String, flags: UInt, operation: @autoclosure () -> String) throws(BlockDeviceError) {
        _ = try retrying("mount(\(target))", operation: operation()) { Glibc.mount(source, target, nil, flags, nil) }
    }

    /// A C string buffer as a Swift string (up to its first NUL).
    static func string(_ buffer: [CChar]) -> String {
        let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func readlink(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = Glibc.readlink(path, &buffer, buffer.count - 1)
        guard count >= 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Reads a small text file (sysfs, procfs) whole; nil when it cannot be read.
    static func readSmallFile(_ path: String, limit: Int = 1 << 20) -> String? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        guard readToEnd(fd, into: &bytes, limit: limit) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Reads `fd` until end of file (or until `bytes` holds `limit` bytes or more), appending
    /// to `bytes`, again after EINTR; false on any other error (`bytes` keeps what was read).
    static func readToEnd(_ fd: Int32, into bytes: inout [UInt8], limit: Int = .max) -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while bytes.count < limit {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if Glibc.errno == EINTR { continue }
                return false
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return true
    }

    /// The directory part of `path` (`/a/b/c` -> `/a/b`, `/a` -> `/`); nil when it has no `/`.
    static func parentDirectory(of path: String) -> String? {
        path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) }
    }

    static func listDirectory(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }
}
