import Foundation
import Testing

@testable import Engine

/// Issue 39: a volume with a kept snapshot that is activated late at boot is held by guard's
/// udev rule until guard has stacked its snapshot again. The boot suite proves the hold on a
/// real boot; these check that the rule, the unit and the markers agree.
@Suite("volume holds: the udev rule, guard-hold@.service and the markers")
struct VolumeHoldsTests {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    func scratch() throws -> VolumeHolds {
        let directory = NSTemporaryDirectory() + "guard-holds-\(UUID().uuidString)"
        return VolumeHolds(heldDirectory: directory + "/held", readyDirectory: directory + "/ready", ruleInstalled: true)
    }

    @Test("the rule tests the markers guard writes, skips suspended and flagged events, and starts guard-hold@ for the kernel name")
    func ruleMatchesCode() throws {
        let rule = try String(contentsOfFile: "\(root)/Units/\(VolumeHolds.ruleName)", encoding: .utf8)
        let defaults = VolumeHolds(ruleInstalled: false)
        #expect(rule.contains(#"TEST!="\#(defaults.heldDirectory)/$env{DM_UUID}", GOTO="guard_hold_end""#))
        #expect(rule.contains(#"TEST=="\#(defaults.readyDirectory)/$env{DM_UUID}", GOTO="guard_hold_end""#))
        #expect(rule.contains(#"ENV{DM_SUSPENDED}=="1", GOTO="guard_hold_end""#))
        #expect(rule.contains(#"ENV{DM_UDEV_DISABLE_OTHER_RULES_FLAG}=="1", GOTO="guard_hold_end""#))
        #expect(rule.contains(#"ENV{SYSTEMD_READY}="0""#))
        #expect(rule.contains(#"RUN+="/bin/systemctl --no-block start guard-hold@%k.service""#))
        let unit = try String(contentsOfFile: "\(root)/Units/guard-hold@.service", encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/bin/flock /run/lock/guard-hold.lock /usr/local/sbin/guard recover --boot --device %i"))
        #expect(unit.contains("After=systemd-udevd.service guard-reassemble.service guard-reassemble-late.service"))
    }

    @Test("a marker holds a volume until it is ready; guard's own volumes and odd UUIDs are never held; without the rule nothing is")
    func heldUntilReady() throws {
        let holds = try scratch()
        defer { try? FileManager.default.removeItem(atPath: (holds.heldDirectory as NSString).deletingLastPathComponent) }
        let uuid = "LVM-abcdefABCDEF0123456789abcdefABCDEF0123456789abcdefABCDEF012345"
        #expect(!holds.isHeld(uuid: uuid))
        try holds.mark(holds.heldDirectory, uuid, "vg-data\n")
        #expect(holds.isHeld(uuid: uuid))
        #expect(!VolumeHolds(heldDirectory: holds.heldDirectory, readyDirectory: holds.readyDirectory, ruleInstalled: false).isHeld(uuid: uuid))
        try holds.mark(holds.readyDirectory, uuid, "")
        #expect(!holds.isHeld(uuid: uuid))
        // A marker is written once: the name it holds stays.
        try holds.mark(holds.heldDirectory, uuid, "renamed\n")
        #expect(try String(contentsOfFile: "\(holds.heldDirectory)/\(uuid)", encoding: .utf8) == "vg-data\n")
        for uuid in ["GUARD-REAL-1234", "", "../etc", ".hidden", "a/b"] {
            #expect(!VolumeHolds.holdable(uuid), "\(uuid)")
        }
        #expect(VolumeHolds.holdable("CRYPT-LUKS2-0123-data"))
    }
}
