import CMount

#if canImport(Glibc)
import Glibc
#endif

// Every call into libmount is in this file.

enum LibMount {
    static func readTable(_ file: String) throws(BlockDeviceError) -> [MountEntry] {
        guard let table = mnt_new_table_from_file(file) else {
            throw .syscall("mnt_new_table_from_file(\(file))", errno: Glibc.errno, operation: "read of the mount table")
        }
        defer { mnt_unref_table(table) }
        guard let iterator = mnt_new_iter(Int32(MNT_ITER_FORWARD)) else {
            throw BlockDeviceError(code: .other, operation: "read of the mount table", call: "mnt_new_iter")
        }
        defer { mnt_free_iter(iterator) }
        var entries: [MountEntry] = []
        var fs: OpaquePointer?
        while mnt_table_next_fs(table, iterator, &fs) == 0, let fs {
            entries.append(
                MountEntry(
                    source: mnt_fs_get_source(fs).map { String(cString: $0) } ?? "",
                    target: mnt_fs_get_target(fs).map { String(cString: $0) } ?? "",
                    fileSystemType: mnt_fs_get_fstype(fs).map { String(cString: $0) } ?? "",
                    options: mnt_fs_get_options(fs).map { String(cString: $0) } ?? "",
                    device: DeviceNumber(mnt_fs_get_devno(fs)),
                    root: mnt_fs_get_root(fs).map { String(cString: $0) } ?? "/",
                    id: file.hasSuffix("mountinfo") ? mnt_fs_get_id(fs) : nil,
                    parentID: file.hasSuffix("mountinfo") ? mnt_fs_get_parent_id(fs) : nil))
        }
        return entries
    }

    /// Runs a mount or umount through a libmount context; returns nil or (call, errno, message).
    static func run(
        source: String?, target: String, fileSystemType: String?, options: String?, unmount: Bool, flags: UInt
    ) -> (errno: Int32, message: String)? {
        guard let context = mnt_new_context() else { return (ENOMEM, "mnt_new_context failed") }
        defer { mnt_free_context(context) }
        // Nothing guard mounts comes from fstab, and helpers (/sbin/mount.*) are not wanted.
        mnt_context_disable_helpers(context, 1)
        mnt_context_disable_canonicalize(context, 1)
        mnt_context_disable_mtab(context, 1)
        if let source { mnt_context_set_source(context, source) }
        mnt_context_set_target(context, target)
        if let fileSystemType { mnt_context_set_fstype(context, fileSystemType) }
        if let options, !options.isEmpty { mnt_context_set_options(context, options) }
        if flags != 0 { mnt_context_set_mflags(context, flags) }
        let rc = unmount ? mnt_context_umount(context) : mnt_context_mount(context)
        var buffer = [CChar](repeating: 0, count: 512)
        if rc == 0 && mnt_context_get_status(context) == 1 { return nil }
        let syscallErrno: Int32 = mnt_context_syscall_called(context) != 0 ? mnt_context_get_syscall_errno(context) : 0
        _ = mnt_context_get_excode(context, rc, &buffer, buffer.count)
        let message = Sys.string(buffer)
        if syscallErrno != 0 { return (syscallErrno, message) }
        if rc < 0 { return (-rc, message) }
        return rc == 0 ? nil : (EINVAL, message.isEmpty ? "libmount error \(rc)" : message)
    }
}
