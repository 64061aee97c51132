import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// A file or block device opened for positioned, unbuffered-by-guard I/O.
///
/// Used for COW storage and labels, where every write must be durable before the next
/// step (write, then `sync()`). Closed when the value is consumed or dropped.
public struct RawFile: ~Copyable {
    public let path: String
    public let descriptor: Int32

    /// Opens `path`.
    /// - Parameters:
    ///   - create: create it (mode 0600) if missing.
    ///   - exclusive: fail if it exists (with `create`).
    ///   - readOnly: open for reading only.
    ///   - direct: O_DIRECT (buffers must be aligned to the logical block size).
    /// - Note: open(2) with O_CLOEXEC.
    /// - Parameter mode: the permissions of a file `create` makes (less the umask).
    public init(path: String, create: Bool = false, exclusive: Bool = false, readOnly: Bool = false, direct: Bool = false, mode: mode_t = 0o600)
        throws(BlockDeviceError)
    {
        var flags = readOnly ? O_RDONLY : O_RDWR
        if create { flags |= O_CREAT }
        if exclusive { flags |= O_EXCL }
        if direct { flags |= guard_o_direct() }
        self.path = path
        self.descriptor = try Sys.open(path, flags, mode: mode, operation: "open of \(path)")
    }

    /// Replaces the file at `path` with `data` so that a crash leaves the old file or the new
    /// one, never a mix: a temporary file beside it, written and fsynced, renamed over `path`,
    /// then the directory fsynced. The temporary file has a name of its own, made with
    /// O_EXCL: two writers never share one, and nothing already there (a link put in its
    /// place) is written through.
    /// - Parameter mode: the new file's permissions (less the umask).
    public static func replace(_ path: String, with data: [UInt8], mode: mode_t = 0o600) throws(BlockDeviceError) {
        let temporary = path + ".new-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        do {
            let file = try RawFile(path: temporary, create: true, exclusive: true, mode: mode)
            try file.write(data, at: 0)
            try file.sync()
        } catch {
            unlink(temporary)
            throw error
        }
        guard rename(temporary, path) == 0 else {
            let error = BlockDeviceError.syscall("rename", errno: errno, operation: "replacement of \(path)")
            unlink(temporary)
            throw error
        }
        try RawFile(path: Sys.parentDirectory(of: path) ?? ".", readOnly: true).sync()
    }

    deinit { Sys.close(descriptor) }

    /// Size in bytes: st_size for a file, BLKGETSIZE64 for a block device.
    public func size() throws(BlockDeviceError) -> UInt64 {
        let info = try Sys.fstat(descriptor, operation: "size query of \(path)")
        if info.st_mode & S_IFMT == S_IFBLK {
            var size: UInt64 = 0
            _ = try Sys.ioctl(descriptor, guard_req_blkgetsize64(), "BLKGETSIZE64", pointer: &size, operation: "size query of \(path)")
            return size
        }
        return UInt64(info.st_size)
    }

    /// Reads exactly `count` bytes at `offset` (fewer only at end of file).
    /// - Note: pread(2), retried on EINTR and short reads.
    public func read(at offset: UInt64, count: Int) throws(BlockDeviceError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = buffer.withUnsafeMutableBytes { raw in
                pread(descriptor, raw.baseAddress! + done, count - done, off_t(offset) + off_t(done))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw .syscall("pread", errno: errno, operation: "read of \(count) bytes at \(offset) of \(path)")
            }
            if n == 0 { break }
            done += n
        }
        return Array(buffer[0..<done])
    }

    /// Writes all of `bytes` at `offset`.
    /// - Note: pwrite(2), retried on EINTR and short writes.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws(BlockDeviceError) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                pwrite(descriptor, raw.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw .syscall("pwrite", errno: errno, operation: "write of \(bytes.count) bytes at \(offset) of \(path)")
            }
            done += n
        }
    }

    /// Flushes data and metadata to stable storage.
    /// - Note: fsync(2).
    public func sync() throws(BlockDeviceError) {
        while fsync(descriptor) != 0 {
            if errno == EINTR { continue }
            throw .syscall("fsync", errno: errno, operation: "sync of \(path)")
        }
    }

    /// Sets the file's size (sparse growth).
    /// - Note: ftruncate(2).
    public func truncate(to size: UInt64) throws(BlockDeviceError) {
        _ = try Sys.retrying("ftruncate", operation: "resize of \(path) to \(size) bytes") { ftruncate(descriptor, off_t(size)) }
    }

    /// Reserves `length` bytes at `offset` on the filesystem, so later writes cannot fail
    /// for lack of space; the file grows to cover them. Reads of the range return zeros.
    /// - Throws: `.other` with ENOSPC when the filesystem is too full, EOPNOTSUPP where unsupported.
    /// - Note: fallocate(2) mode 0.
    public func allocate(offset: UInt64, length: UInt64) throws(BlockDeviceError) {
        _ = try Sys.retrying("fallocate", operation: "preallocation of \(length) bytes in \(path)") {
            guard_fallocate(descriptor, 0, Int64(offset), Int64(length))
        }
    }
}

/// Free space on the filesystem holding `path`, in bytes, as root sees it (reserved blocks included).
/// - Note: statvfs(3), f_bfree (root may use the reserved blocks).
public func freeSpace(at path: String) throws(BlockDeviceError) -> UInt64 {
    var info = statvfs()
    _ = try Sys.retrying("statvfs(\(path))", operation: "free space query of \(path)") { statvfs(path, &info) }
    return UInt64(info.f_bfree) * UInt64(info.f_frsize)
}
