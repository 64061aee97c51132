import CMount

#if canImport(Glibc)
import Glibc
#endif

extension BlockDevices {
    /// Every filesystem, RAID, LVM, swap or partition-table signature libblkid finds on a
    /// device (`ext4`, `LVM2_member`, `swap`, `partition table dos`), as wipefs lists them:
    /// a low-level probe of the device itself, no cache.
    public static func signatures(of path: String) throws(BlockDeviceError) -> [String] {
        guard let probe = blkid_new_probe_from_filename(path) else {
            throw BlockDeviceError(code: .from(errno: errno), operation: "signature probe of \(path)", call: "blkid_new_probe_from_filename", errno: errno)
        }
        defer { blkid_free_probe(probe) }
        blkid_probe_enable_superblocks(probe, 1)
        blkid_probe_set_superblocks_flags(probe, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_BADCSUM)
        blkid_probe_enable_partitions(probe, 1)
        blkid_probe_set_partitions_flags(probe, BLKID_PARTS_MAGIC)
        var found: [String] = []
        while blkid_do_probe(probe) == 0 {
            var value: UnsafePointer<CChar>?
            var length = 0
            if blkid_probe_lookup_value(probe, "TYPE", &value, &length) == 0, let value {
                found.append(String(cString: value))
            } else if blkid_probe_lookup_value(probe, "PTTYPE", &value, &length) == 0, let value {
                found.append("partition table \(String(cString: value))")
            }
        }
        return found
    }

    /// The partitions of a whole disk (`loop3p1`), from sysfs.
    public static func partitions(of device: DeviceNumber) -> [String] {
        Sys.listDirectory("/sys/dev/block/\(device)").filter { Sys.readSmallFile("/sys/dev/block/\(device)/\($0)/partition") != nil }.sorted()
    }

    /// A name for the device that survives reboots and renumbering: its `/dev/disk/by-id`
    /// link (a WWN first), else its device-mapper UUID, else a loop device's backing file;
    /// with its size. Nil when it has none of these.
    /// Whether `path` names a device by the kernel's name for it (`/dev/sdc`, `/dev/nvme0n1p2`),
    /// which can be another device after a reboot (disks found in another order).
    public static func isKernelName(_ path: String) -> Bool {
        guard path.hasPrefix("/dev/") else { return false }
        let name = path.dropFirst(5)
        guard !name.contains("/") else { return false }
        return ["sd", "vd", "hd", "xvd", "nvme", "mmcblk"].contains { name.hasPrefix($0) }
    }

    /// A path of the device that survives reboots: its `/dev/disk/by-id` link (a WWN first),
    /// or nil when it has none.
    public static func stablePath(of path: String) -> String? {
        guard let number = try? deviceNumber(of: path) else { return nil }
        let byID = "/dev/disk/by-id"
        let links = Sys.listDirectory(byID).filter { (try? deviceNumber(of: "\(byID)/\($0)")) == number }
        return links.sorted { ($0.hasPrefix("wwn-") ? 0 : 1, $0) < ($1.hasPrefix("wwn-") ? 0 : 1, $1) }.first.map { "\(byID)/\($0)" }
    }

    public static func stableIdentity(of path: String) -> String? {
        guard let number = try? deviceNumber(of: path), let size = size(of: number) else { return nil }
        let byID = "/dev/disk/by-id"
        let links = Sys.listDirectory(byID).filter { (try? deviceNumber(of: "\(byID)/\($0)")) == number }
        let name =
            links.sorted { ($0.hasPrefix("wwn-") ? 0 : 1, $0) < ($1.hasPrefix("wwn-") ? 0 : 1, $1) }.first
            ?? deviceMapperUUID(of: number).map { "dm-uuid-\($0)" }
            ?? Sys.readSmallFile("/sys/dev/block/\(number)/loop/backing_file").map { "loop-backing-\($0.trimmingWhitespace())" }
        return name.map { "\($0) size=\(size)" }
    }
}
