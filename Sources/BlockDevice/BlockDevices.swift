import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// Facts about block devices, read from device nodes and sysfs.
public enum BlockDevices {
    /// The device number of a block device node.
    ///
    /// - Throws: `BlockDeviceError` with `.notFound` when the path does not exist and
    ///   `.notABlockDevice` when it is something else.
    /// - Note: stat(2), following symlinks (`/dev/mapper/x` and `/dev/vg/lv` are symlinks under udev).
    public static func deviceNumber(of path: String) throws(BlockDeviceError) -> DeviceNumber {
        let info = try Sys.stat(path, operation: "look-up of block device \(path)")
        guard info.st_mode & S_IFMT == S_IFBLK else {
            throw BlockDeviceError(
                code: .notABlockDevice, operation: "look-up of block device \(path)",
                detail: "\(path) is not a block device")
        }
        return DeviceNumber(info.st_rdev)
    }

    /// The device number of the filesystem that holds `path` (st_dev).
    public static func filesystemDevice(of path: String) throws(BlockDeviceError) -> DeviceNumber {
        DeviceNumber(try Sys.stat(path, operation: "look-up of the filesystem holding \(path)").st_dev)
    }

    /// The size of a block device in bytes.
    /// - Note: ioctl BLKGETSIZE64 on the opened device.
    public static func size(of path: String) throws(BlockDeviceError) -> UInt64 {
        let fd = try Sys.open(path, O_RDONLY, operation: "size query of \(path)")
        defer { Sys.close(fd) }
        var size: UInt64 = 0
        _ = try Sys.ioctl(
            fd, guard_req_blkgetsize64(), "BLKGETSIZE64", pointer: &size,
            operation: "size query of \(path)")
        return size
    }

    /// The size of a block device from sysfs, in bytes, without opening it.
    public static func size(of device: DeviceNumber) -> UInt64? {
        guard let text = Sys.readSmallFile("/sys/dev/block/\(device)/size"),
            let sectors = UInt64(text.trimmingWhitespace())
        else { return nil }
        return sectors * 512
    }

    /// Write and discard requests the kernel has completed on a device since it was created
    /// (/sys/dev/block/M:m/stat, fields 5 and 12); nil when sysfs does not have the device.
    /// A device activated at boot that nothing wrote reads 0: the durable sign that a volume
    /// was not written before guard reassembled its snapshot.
    public static func writeRequests(of device: DeviceNumber) -> UInt64? {
        guard let text = Sys.readSmallFile("/sys/dev/block/\(device)/stat") else { return nil }
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).compactMap { UInt64($0) }
        guard fields.count >= 5 else { return nil }
        return fields[4] + (fields.count >= 12 ? fields[11] : 0)
    }

    /// The kernel name of a block device ("dm-3", "loop0"), from sysfs.
    public static func kernelName(of device: DeviceNumber) -> String? {
        guard let link = Sys.readlink("/sys/dev/block/\(device)") else { return nil }
        return link.split(separator: "/").last.map(String.init)
    }

    /// Devices stacked directly on top of `device` (/sys/dev/block/M:m/holders).
    public static func holders(of device: DeviceNumber) -> [DeviceNumber] {
        relatives(of: device, "holders")
    }

    /// Devices `device` is stacked directly on (/sys/dev/block/M:m/slaves).
    public static func lowerDevices(of device: DeviceNumber) -> [DeviceNumber] {
        relatives(of: device, "slaves")
    }

    /// Every device under `device`, transitively, and any partition's whole disk.
    public static func allLowerDevices(of device: DeviceNumber) -> Set<DeviceNumber> {
        var seen: Set<DeviceNumber> = []
        var queue = [device]
        while let next = queue.popLast() {
            var lower = lowerDevices(of: next)
            if let whole = wholeDisk(of: next) { lower.append(whole) }
            for item in lower where seen.insert(item).inserted { queue.append(item) }
        }
        return seen
    }

    /// The whole disk of a partition, nil when `device` is not a partition.
    public static func wholeDisk(of device: DeviceNumber) -> DeviceNumber? {
        guard Sys.readSmallFile("/sys/dev/block/\(device)/partition") != nil,
            let text = Sys.readSmallFile("/sys/dev/block/\(device)/../dev")
        else { return nil }
        return DeviceNumber(parsing: text.trimmingWhitespace())
    }

    /// The dm name of a device-mapper device from sysfs (/sys/dev/block/M:m/dm/name).
    public static func deviceMapperName(of device: DeviceNumber) -> String? {
        Sys.readSmallFile("/sys/dev/block/\(device)/dm/name")?.trimmingWhitespace()
    }

    /// The dm UUID of a device-mapper device from sysfs.
    public static func deviceMapperUUID(of device: DeviceNumber) -> String? {
        Sys.readSmallFile("/sys/dev/block/\(device)/dm/uuid")?.trimmingWhitespace()
    }

    private static func relatives(of device: DeviceNumber, _ directory: String) -> [DeviceNumber] {
        Sys.listDirectory("/sys/dev/block/\(device)/\(directory)").compactMap { name in
            Sys.readSmallFile("/sys/class/block/\(name)/dev").flatMap { DeviceNumber(parsing: $0.trimmingWhitespace()) }
        }
    }
}

extension StringProtocol {
    /// The text without leading and trailing spaces, tabs and newlines.
    public func trimmingWhitespace() -> String {
        var slice = Substring(self)
        while let first = slice.first, first.isWhitespace { slice.removeFirst() }
        while let last = slice.last, last.isWhitespace { slice.removeLast() }
        return String(slice)
    }
}
