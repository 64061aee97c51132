import BlockDevice

#if canImport(Glibc)
import Glibc
#endif

/// An error from a device-mapper operation.
///
/// Its description says what was being done, on which device, which ioctl with
/// which table failed and why, and what the kernel logged about it:
/// `reload of guard-7-website-snap failed: DM_DEVICE_RELOAD 'snapshot 254:3 254:4 P 8' returned EINVAL (Invalid argument); kernel: device-mapper: table: 254:5: snapshot: Couldn't create exception store`.
public struct DeviceMapperError: Error, Sendable, CustomStringConvertible {
    /// The kind of failure, for callers that react to it.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: Hashable, Sendable {
            case notFound, busy, exists, invalidArgument, permissionDenied, driverMissing, io, noSpace
            case invalidSnapshot, timedOut, other
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// The device does not exist (ENXIO, ENODEV).
        public static let notFound = Code(.notFound)
        /// The device is open or otherwise in use (EBUSY).
        public static let busy = Code(.busy)
        /// A device with this name or UUID already exists (EEXIST, EBUSY on create).
        public static let exists = Code(.exists)
        /// The kernel rejected a table or request (EINVAL).
        public static let invalidArgument = Code(.invalidArgument)
        /// Not root, or the control node cannot be opened (EACCES, EPERM).
        public static let permissionDenied = Code(.permissionDenied)
        /// The kernel has no device-mapper driver, or it does not answer.
        public static let driverMissing = Code(.driverMissing)
        public static let io = Code(.io)
        public static let noSpace = Code(.noSpace)
        /// A snapshot the kernel reports Invalid, Overflow or Merge failed.
        public static let invalidSnapshot = Code(.invalidSnapshot)
        public static let timedOut = Code(.timedOut)
        public static let other = Code(.other)

        public var description: String { "\(value)" }

        static func from(errno value: Int32) -> Code {
            switch value {
            case ENXIO, ENODEV, ENOENT: return .notFound
            case EBUSY: return .busy
            case EEXIST: return .exists
            case EINVAL: return .invalidArgument
            case EACCES, EPERM: return .permissionDenied
            case EIO: return .io
            case ENOSPC: return .noSpace
            default: return .other
            }
        }
    }

    public var code: Code
    /// "reload of guard-7-website-snap".
    public var operation: String
    /// "DM_DEVICE_RELOAD 'snapshot 254:3 254:4 P 8'".
    public var call: String?
    public var errno: Int32?
    /// What libdevmapper and the kernel log said about it, and hints.
    public var detail: String?

    public init(code: Code, operation: String, call: String? = nil, errno: Int32? = nil, detail: String? = nil) {
        self.code = code
        self.operation = operation
        self.call = call
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var text = "\(operation) failed"
        if let call, let errno, errno != 0 {
            text += ": \(call) returned \(errnoName(errno)) (\(String(cString: strerror(errno))))"
        } else if let call {
            text += ": \(call) failed"
        }
        if let detail, !detail.isEmpty { text += "; \(detail)" }
        return text
    }
}
