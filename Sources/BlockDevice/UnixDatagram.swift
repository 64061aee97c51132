#if canImport(Glibc)
import Glibc
#endif

/// One datagram to a Unix socket, without waiting: journald's native socket, systemd's
/// notification socket. A path that starts with `@` names a socket in the abstract namespace
/// (as `NOTIFY_SOCKET` may).
public enum UnixDatagram {
    /// - Returns: whether the whole datagram was sent.
    @discardableResult
    public static func send(_ bytes: [UInt8], to path: String) -> Bool {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var pathBytes = Array(path.utf8)
        let abstract = pathBytes.first == UInt8(ascii: "@")
        if abstract { pathBytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !pathBytes.isEmpty, pathBytes.count < capacity else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in pathBytes.enumerated() { buffer[index] = byte }
        }
        // An abstract name is exactly its bytes; a path is NUL-terminated (sockaddr_un is zeroed).
        let length = MemoryLayout<sa_family_t>.size + pathBytes.count + (abstract ? 0 : 1)
        let descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        let sent = bytes.withUnsafeBytes { buffer in
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(descriptor, buffer.baseAddress, buffer.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT), $0, socklen_t(length))
                }
            }
        }
        return sent == bytes.count
    }
}

/// systemd's service notification protocol (sd_notify(3)) for a `Type=notify` unit: READY=1
/// once the service works, WATCHDOG=1 at least every half of `WatchdogSec=`, STATUS= lines.
/// Outside such a unit (`NOTIFY_SOCKET` unset) every call does nothing.
public struct ServiceNotifier: Sendable {
    public let socket: String?
    /// Half the watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process), or nil.
    public let watchdogInterval: Duration?

    public init(environment: [String: String]) {
        socket = environment["NOTIFY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
        let forUs = environment["WATCHDOG_PID"].map { Int32($0) == getpid() } ?? true
        if forUs, let text = environment["WATCHDOG_USEC"], let usec = Int64(text), usec > 0 {
            watchdogInterval = .microseconds(usec / 2)
        } else {
            watchdogInterval = nil
        }
    }

    /// Sends `state` (`READY=1`, `WATCHDOG=1`, `STATUS=...`, newline-separated); false when
    /// there is no socket or it was not sent.
    @discardableResult
    public func notify(_ state: String) -> Bool {
        guard let socket else { return false }
        return UnixDatagram.send(Array(state.utf8), to: socket)
    }
}
