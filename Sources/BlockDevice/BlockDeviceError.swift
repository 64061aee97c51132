#if canImport(Glibc)
import Glibc
#endif

/// An error from a block-device, loop-device or mount operation.
///
/// The description says what was being done, on which device or path, and which
/// system call failed with which errno, e.g.
/// `unmount of /mnt/website failed: umount2 returned EBUSY (Device or resource busy); held by pid 812 (postgres)`.
public struct BlockDeviceError: Error, Sendable, CustomStringConvertible, Equatable {
    /// What kind of failure this is, for callers that react to it.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: Hashable, Sendable {
            case notFound, busy, permissionDenied, invalidArgument, notABlockDevice, noFreeLoop, io, other
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        public static let notFound = Code(.notFound)
        public static let busy = Code(.busy)
        public static let permissionDenied = Code(.permissionDenied)
        public static let invalidArgument = Code(.invalidArgument)
        public static let notABlockDevice = Code(.notABlockDevice)
        public static let noFreeLoop = Code(.noFreeLoop)
        public static let io = Code(.io)
        public static let other = Code(.other)

        public var description: String { "\(value)" }

        static func from(errno value: Int32) -> Code {
            switch value {
            case ENOENT, ENXIO, ENODEV: return .notFound
            case EBUSY: return .busy
            case EACCES, EPERM: return .permissionDenied
            case EINVAL: return .invalidArgument
            case ENOTBLK: return .notABlockDevice
            case EIO: return .io
            default: return .other
            }
        }
    }

    public var code: Code
    /// What was being done: "attach of /var/lib/guard/cow/x.cow to a loop device".
    public var operation: String
    /// The system call or library function that failed, if one did.
    public var call: String?
    /// errno as returned by the call.
    public var errno: Int32?
    /// Extra facts: the processes holding a busy mount, a hint on what to do.
    public var detail: String?

    public init(code: Code, operation: String, call: String? = nil, errno: Int32? = nil, detail: String? = nil) {
        self.code = code
        self.operation = operation
        self.call = call
        self.errno = errno
        self.detail = detail
    }

    /// An error for a failed system call, its code derived from errno.
    public static func syscall(_ call: String, errno value: Int32, operation: String, detail: String? = nil) -> Self {
        BlockDeviceError(code: .from(errno: value), operation: operation, call: call, errno: value, detail: detail)
    }

    public var description: String {
        var text = "\(operation) failed"
        if let call, let errno {
            text += ": \(call) returned \(errnoName(errno)) (\(String(cString: strerror(errno))))"
        } else if let call {
            text += ": \(call) failed"
        }
        if let detail { text += "; \(detail)" }
        return text
    }
}

/// The symbolic name of an errno value ("EBUSY"), for messages admins can search for.
public func errnoName(_ value: Int32) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO", ENXIO: "ENXIO",
        E2BIG: "E2BIG", EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES",
        EFAULT: "EFAULT", ENOTBLK: "ENOTBLK", EBUSY: "EBUSY", EEXIST: "EEXIST", EXDEV: "EXDEV",
        ENODEV: "ENODEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL", ENFILE: "ENFILE",
        EMFILE: "EMFILE", ENOTTY: "ENOTTY", EFBIG: "EFBIG", ENOSPC: "ENOSPC", EROFS: "EROFS",
        ERANGE: "ERANGE", ENAMETOOLONG: "ENAMETOOLONG", ENOSYS: "ENOSYS", ENOTEMPTY: "ENOTEMPTY",
        ELOOP: "ELOOP", ENODATA: "ENODATA", EOPNOTSUPP: "EOPNOTSUPP", ETIMEDOUT: "ETIMEDOUT",
        EUCLEAN: "EUCLEAN", EDQUOT: "EDQUOT",
    ]
    return names[value] ?? "errno \(value)"
}
