import BlockDevice
import DeviceMapper
import Foundation
import Testing

extension Kernel {
    /// Issue 38: the README's first command never harms the machine it runs on.
    @Suite("first contact")
    struct FirstContactKernelTests {
        @Test(
            "Scripts/demo beside the tutorial's own VG datadisks with website mounted on /mnt/website: the demo runs its story, and the VG, the LV, the mount, the file and /mnt are exactly as before"
        )
        func demoLeavesTheTutorialsVolumeAlone() throws {
            let scratch = try Scratch()
            try makeSparseFile(scratch.path("pv.img"), mebibytes: 200)
            let loop = try LoopDevice.attach(file: scratch.path("pv.img")).device
            setenv("LVM_SUPPRESS_FD_WARNINGS", "1", 1)
            // The admin's: the classic tutorial's volume group, mounted where the tutorial mounts it.
            // (/mnt is read-only in the VM: a tmpfs stands for the root filesystem's /mnt.)
            let mntWasMounted = Mounts.entry(at: "/mnt") != nil
            if !mntWasMounted { try Mounts.mount(source: "tmpfs", target: "/mnt", fileSystemType: "tmpfs") }
            scratch.defer_ {
                try? Mounts.unmount("/mnt/website")
                _ = try? sh("vgchange -q -an datadisks; vgremove -q -f datadisks; pvremove -q \(loop.path)")
                try? loop.detach()
                if !mntWasMounted { try? Mounts.unmount("/mnt") }
            }
            try sh("pvcreate -q \(loop.path) && vgcreate -q datadisks \(loop.path) && lvcreate -q -y -L 100M -n website datadisks && mkfs.ext4 -q /dev/datadisks/website")
            try FileManager.default.createDirectory(atPath: "/mnt/website", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: "/mnt/other", withIntermediateDirectories: true)
            try Mounts.mount(source: "/dev/datadisks/website", target: "/mnt/website", fileSystemType: "ext4")
            try sh("head -c 1M /dev/urandom > /mnt/website/precious && sync")
            let file = try sha256("/mnt/website/precious")
            let mnt = try sh("ls -la /mnt")
            let lvs = try sh("lvs --noheadings -o lv_name,lv_size,lv_attr datadisks")
            let table = try DeviceMapper().table(.name("datadisks-website"))

            let demo = try run(["/usr/bin/unshare", "--mount", "--propagation", "private", "\(packageRoot)/Scripts/demo", "--inside"])
            #expect(demo.status == 0, "the demo ran its story beside the admin's volume: \(demo.stdout.suffix(3000)) \(demo.stderr.suffix(2000))")
            #expect(demo.stdout.contains("has a volume group 'datadisks' already"), "it said it left it alone: \(demo.stdout.prefix(600))")
            #expect(demo.stdout.contains("rolled back to their state before the run") || demo.stderr.contains("rolled back to their state before the run"), "the story ran")

            #expect(try sh("lvs --noheadings -o lv_name,lv_size,lv_attr datadisks") == lvs, "the VG and its LV are as before")
            #expect(try DeviceMapper().table(.name("datadisks-website")) == table)
            #expect(Mounts.entry(at: "/mnt/website")?.device == (try BlockDevices.deviceNumber(of: "/dev/datadisks/website")), "still mounted on /mnt/website")
            #expect(try sha256("/mnt/website/precious") == file)
            #expect(try sh("ls -la /mnt") == mnt, "/mnt as before")
            #expect(!FileManager.default.fileExists(atPath: "/usr/local/sbin/systemctl"), "no systemctl stand-in outside the demo's namespace")
            let demoVGs = try sh("vgs --noheadings -o vg_name").split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { $0.hasPrefix("datadisks-demo") }
            #expect(demoVGs.isEmpty, "the demo removed its own volume group: \(demoVGs)")
            let guardLayers = try DeviceMapper().guardDevices().filter { $0.name.contains("datadisks") }
            #expect(guardLayers.isEmpty, "\(guardLayers)")
        }
    }
}
