import CGuardShims

#if canImport(Glibc)
import Glibc
#endif

/// A block device's major:minor number, the way the kernel names devices in tables.
public struct DeviceNumber: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    public var major: UInt32
    public var minor: UInt32

    public init(major: UInt32, minor: UInt32) {
        self.major = major
        self.minor = minor
    }

    /// From a `dev_t` (st_rdev of a device node, st_dev of a file).
    public init(_ rawValue: dev_t) {
        self.major = guard_major(UInt64(rawValue))
        self.minor = guard_minor(UInt64(rawValue))
    }

    /// Parses "254:3"; nil for anything else.
    public init?(parsing text: some StringProtocol) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let major = UInt32(parts[0]), let minor = UInt32(parts[1]) else { return nil }
        self.init(major: major, minor: minor)
    }

    public var rawValue: dev_t { dev_t(guard_makedev(major, minor)) }
    public var description: String { "\(major):\(minor)" }

    public static func < (lhs: DeviceNumber, rhs: DeviceNumber) -> Bool {
        (lhs.major, lhs.minor) < (rhs.major, rhs.minor)
    }

    /// The device-mapper major, as the kernel registered it (/proc/devices).
    public static var deviceMapperMajor: UInt32? {
        guard let text = Sys.readSmallFile("/proc/devices") else { return nil }
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count == 2, fields[1] == "device-mapper", let major = UInt32(fields[0]) { return major }
        }
        return nil
    }
}
