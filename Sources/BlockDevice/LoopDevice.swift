import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// A loop device bound to a backing file.
public struct LoopDevice: Hashable, Sendable, CustomStringConvertible {
    /// "/dev/loop3".
    public var path: String
    public var number: DeviceNumber
    /// The backing file as the kernel reports it (sysfs backing_file).
    public var backingFile: String?
    /// The kernel frees the device when its last user closes it (LO_FLAGS_AUTOCLEAR).
    public var autoclear: Bool

    public var description: String { "\(path)" + (backingFile.map { " (\($0))" } ?? "") }

    /// Attaches `file` to a free loop device.
    ///
    /// With `autoclear` the kernel detaches the device when its last opener closes it:
    /// the returned `LoopHandle` keeps it open until the caller has stacked something on it
    /// (a dm table) and calls `release()`; if guard dies first, nothing is left behind.
    ///
    /// - Parameters:
    ///   - file: the backing file; opened read-write unless `readOnly`.
    ///   - readOnly: attach read-only.
    ///   - autoclear: set LO_FLAGS_AUTOCLEAR.
    ///   - directIO: set LO_FLAGS_DIRECT_IO (the backing file's page cache is bypassed).
    /// - Throws: `BlockDeviceError` naming the file and the failing call.
    /// - Note: LOOP_CTL_GET_FREE on /dev/loop-control, then LOOP_CONFIGURE (LOOP_SET_FD + LOOP_SET_STATUS64 before 5.8).
    public static func attach(file: String, readOnly: Bool = false, autoclear: Bool = false, directIO: Bool = false)
        throws(BlockDeviceError) -> LoopHandle
    {
        let operation = "attach of \(file) to a loop device"
        let backing = try Sys.open(file, readOnly ? O_RDONLY : O_RDWR, operation: operation)
        defer { Sys.close(backing) }
        let backingInfo = try Sys.fstat(backing, operation: operation)
        guard backingInfo.st_mode & S_IFMT == S_IFREG || backingInfo.st_mode & S_IFMT == S_IFBLK else {
            throw BlockDeviceError(code: .invalidArgument, operation: operation, detail: "\(file) is not a regular file")
        }
        let control = try Sys.open("/dev/loop-control", O_RDWR, operation: operation)
        defer { Sys.close(control) }

        // Another process can take the free device between GET_FREE and CONFIGURE: retry a few times.
        var lastError: BlockDeviceError?
        for _ in 0..<8 {
            let index = guard_ioctl_long(control, UInt(LOOP_CTL_GET_FREE), 0)
            if index < 0 {
                throw BlockDeviceError.syscall("ioctl LOOP_CTL_GET_FREE", errno: -index, operation: operation)
            }
            let path = "/dev/loop\(index)"
            let loopFD: Int32
            do {
                loopFD = try Sys.open(path, readOnly ? O_RDONLY : O_RDWR, operation: operation)
            } catch {
                lastError = error
                usleep(20_000)  // devtmpfs may not have made the node yet
                continue
            }
            let result = guard_loop_configure(loopFD, backing, readOnly ? 1 : 0, autoclear ? 1 : 0, directIO ? 1 : 0, file)
            if result == 0 {
                let number = DeviceNumber((try? Sys.fstat(loopFD, operation: operation).st_rdev) ?? 0)
                let device = LoopDevice(path: path, number: number, backingFile: file, autoclear: autoclear)
                if autoclear { return LoopHandle(device: device, descriptor: loopFD) }
                Sys.close(loopFD)
                return LoopHandle(device: device, descriptor: nil)
            }
            Sys.close(loopFD)
            lastError = .syscall("ioctl LOOP_CONFIGURE on \(path)", errno: -result, operation: operation)
            if -result != EBUSY { break }
        }
        throw lastError ?? BlockDeviceError(code: .noFreeLoop, operation: operation)
    }

    /// Whether `file` can really be read with direct I/O. The loop driver enables
    /// LO_FLAGS_DIRECT_IO when the filesystem has a direct_IO method, but an overlayfs over
    /// tmpfs has one that the file below refuses, and every read of the loop device then
    /// fails with EIO; this asks the file itself: open with O_DIRECT and one aligned 4 KiB read.
    /// - Note: open(2) O_DIRECT, posix_memalign(3), pread(2).
    public static func directIOWorks(on file: String) -> Bool {
        let fd = Glibc.open(file, O_RDONLY | O_CLOEXEC | guard_o_direct())
        guard fd >= 0 else { return false }
        defer { Sys.close(fd) }
        var buffer: UnsafeMutableRawPointer?
        guard posix_memalign(&buffer, 4096, 4096) == 0, let buffer else { return false }
        defer { free(buffer) }
        while true {
            let n = pread(fd, buffer, 4096, 0)
            if n < 0 && errno == EINTR { continue }
            return n >= 0
        }
    }

    /// The loop devices currently bound to `file` (same device and inode).
    /// - Note: sysfs /sys/block/loopN/loop/backing_file, confirmed with LOOP_GET_STATUS64.
    public static func find(backingFile file: String) -> [LoopDevice] {
        guard let target = try? Sys.stat(file, operation: "look-up of \(file)") else { return [] }
        return all().filter { device in
            let fd = Glibc.open(device.path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return false }
            defer { Sys.close(fd) }
            var flags: UInt32 = 0
            var backingDevice: UInt64 = 0
            var inode: UInt64 = 0
            guard guard_loop_get_status(fd, nil, 0, &flags, &backingDevice, &inode) == 0 else { return false }
            return backingDevice == UInt64(target.st_dev) && inode == UInt64(target.st_ino)
        }
    }

    /// Every bound loop device.
    public static func all() -> [LoopDevice] {
        Sys.listDirectory("/sys/block").filter { $0.hasPrefix("loop") }.compactMap { name in
            guard let backing = Sys.readSmallFile("/sys/block/\(name)/loop/backing_file")?.trimmingWhitespace(),
                let numberText = Sys.readSmallFile("/sys/block/\(name)/dev"),
                let number = DeviceNumber(parsing: numberText.trimmingWhitespace())
            else { return nil }
            let autoclear = Sys.readSmallFile("/sys/block/\(name)/loop/autoclear")?.trimmingWhitespace() == "1"
            return LoopDevice(path: "/dev/\(name)", number: number, backingFile: backing, autoclear: autoclear)
        }
    }

    /// Detaches the device from its file. If the device is still open the kernel detaches it
    /// when it is last closed (it sets autoclear), so this succeeds for a device in use.
    /// - Note: LOOP_CLR_FD.
    public func detach() throws(BlockDeviceError) {
        let operation = "detach of \(path)"
        let fd = try Sys.open(path, O_RDONLY, operation: operation)
        defer { Sys.close(fd) }
        let result = guard_ioctl_long(fd, UInt(LOOP_CLR_FD), 0)
        if result < 0 && -result != ENXIO {  // ENXIO: already unbound
            throw .syscall("ioctl LOOP_CLR_FD", errno: -result, operation: operation)
        }
    }

    /// Makes the kernel re-read the backing file's size after it grew.
    /// - Note: LOOP_SET_CAPACITY.
    public func refreshCapacity() throws(BlockDeviceError) {
        let operation = "capacity refresh of \(path)"
        let fd = try Sys.open(path, O_RDONLY, operation: operation)
        defer { Sys.close(fd) }
        _ = try Sys.ioctl(fd, UInt(LOOP_SET_CAPACITY), "LOOP_SET_CAPACITY", value: 0, operation: operation)
    }
}

/// A freshly attached loop device, kept open while it has no other user.
///
/// For an autoclear device the open descriptor is what keeps it bound; `release()`
/// closes it once something else (a dm table) holds the device.
public final class LoopHandle {
    public let device: LoopDevice
    private var descriptor: Int32?

    init(device: LoopDevice, descriptor: Int32?) {
        self.device = device
        self.descriptor = descriptor
    }

    /// Closes guard's own descriptor. An autoclear device with no other opener detaches now.
    public func release() {
        if let descriptor { Sys.close(descriptor) }
        descriptor = nil
    }

    deinit { release() }
}
