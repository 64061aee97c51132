import CGuardShims

/// Extended attributes of an open file (ACLs are among them: system.posix_acl_*).
/// sys/xattr.h is not in Swift's Glibc module, hence the shims.
public enum ExtendedAttributes {
    /// Every attribute guard can read, by name.
    public static func all(_ fd: Int32) -> [String: [UInt8]] {
        let size = guard_flistxattr(fd, nil, 0)
        guard size > 0 else { return [:] }
        var list = [CChar](repeating: 0, count: size)
        let got = guard_flistxattr(fd, &list, size)
        guard got > 0 else { return [:] }
        var result: [String: [UInt8]] = [:]
        for name in list[0..<got].split(separator: 0).map({ String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }) {
            let length = guard_fgetxattr(fd, name, nil, 0)
            guard length >= 0 else { continue }
            var value = [UInt8](repeating: 0, count: max(length, 1))
            let read = guard_fgetxattr(fd, name, &value, length)
            guard read >= 0 else { continue }
            result[name] = Array(value.prefix(read))
        }
        return result
    }

    /// Sets one attribute; false with errno set on failure.
    public static func set(_ fd: Int32, _ name: String, _ value: [UInt8]) -> Bool {
        guard_fsetxattr(fd, name, value, value.count) == 0
    }

    /// Removes one attribute; false with errno set on failure.
    @discardableResult
    public static func remove(_ fd: Int32, _ name: String) -> Bool {
        guard_fremovexattr(fd, name) == 0
    }
}
