import BlockDevice
import Testing

@testable import Engine

/// Issue 17: what a rollback unmounts, and in which order it mounts it all again.
@Suite("rollback: mounts")
struct RollbackMountsTests {
    let volume = DeviceNumber(major: 254, minor: 3)
    let other = DeviceNumber(major: 8, minor: 17)

    func entry(_ target: String, _ device: DeviceNumber, root: String = "/", type: String = "ext4") -> MountEntry {
        MountEntry(source: "/dev/x", target: target, fileSystemType: type, options: "rw", device: device, root: root)
    }

    @Test("the volume's mounts, its bind mounts and another filesystem mounted inside it: deepest first, the later of two stacked mounts first")
    func unmountOrder() throws {
        let table = [
            entry("/", DeviceNumber(major: 8, minor: 1)),
            entry("/srv/www", volume),
            entry("/srv/www/uploads", other),
            entry("/var/www/static", volume, root: "/static"),
            entry("/srv/www/uploads/cache", volume, root: "/cache"),
            entry("/srv/www", volume),
            entry("/home", DeviceNumber(major: 8, minor: 2)),
        ]
        let order = try RollbackProcedure.mountsToUnmount(origins: [volume], table: table).map(\.target)
        #expect(order == ["/srv/www/uploads/cache", "/var/www/static", "/srv/www/uploads", "/srv/www", "/srv/www"])
        // Mounted again in the reverse order: parents before children.
        #expect(order.reversed().first == "/srv/www")
    }

    @Test("a mount hidden under another on the same place (another filesystem shadowed by a tmpfs on its parent) is not inside the volume mounted there now")
    func shadowedMountIsNotInside() throws {
        func mount(_ id: Int32, _ parent: Int32, _ target: String, _ device: DeviceNumber, type: String = "ext4") -> MountEntry {
            MountEntry(source: "/dev/x", target: target, fileSystemType: type, options: "rw", device: device, root: "/", id: id, parentID: parent)
        }
        let table = [
            mount(1, 0, "/", DeviceNumber(major: 8, minor: 1)),
            mount(20, 1, "/mnt/website", other),  // the admin's, hidden by the tmpfs below
            mount(30, 1, "/mnt", DeviceNumber(major: 0, minor: 60), type: "tmpfs"),
            mount(31, 30, "/mnt/website", volume),
            mount(32, 31, "/mnt/website/uploads", DeviceNumber(major: 8, minor: 33)),
        ]
        let order = try RollbackProcedure.mountsToUnmount(origins: [volume], table: table).map(\.target)
        #expect(order == ["/mnt/website/uploads", "/mnt/website"])
    }

    @Test("a tmpfs mounted inside the volume is refused before anything is unmounted: unmounting it would lose its content")
    func virtualInside() {
        let table = [entry("/srv/www", volume), entry("/srv/www/tmp", DeviceNumber(major: 0, minor: 52), type: "tmpfs")]
        #expect(throws: GuardFailure.self) { try RollbackProcedure.mountsToUnmount(origins: [volume], table: table) }
    }
}
