import BlockDevice
import Foundation
import Snapshot
import Testing

/// Issue 15: what a COW's durable records say decides whether it may be released; every case
/// that may hold old blocks is kept.
@Suite("storage evidence")
struct EvidenceTests {
    let directory: String
    let identity = StackIdentity(runToken: "0badc0de", volumeIndex: 0)

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("evidence-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    func stack(_ path: String, identity: StackIdentity? = nil) -> SnapshotStack {
        SnapshotStack(
            identity: identity ?? self.identity, originName: "gpl-steps", originUUID: "LVM-xyz", originNumber: DeviceNumber(major: 253, minor: 1),
            originSectors: 49_152, originTable: "0 49152 linear 7:0 2048", storage: .file(path: path), storageBytes: 4 << 20, chunkSectors: 8)
    }

    /// A COW file with a label in `state`, optionally the kernel's header and a first exception.
    func cow(_ name: String, state: CowLabel.State?, header: Bool, valid: Bool = true, exception: Bool = false, labelIdentity: StackIdentity? = nil) throws -> String {
        let path = "\(directory)/\(name).cow"
        var bytes = Data(count: 4 << 20)
        if header {
            let words: [UInt32] = [KernelCowHeader.magic, valid ? 1 : 0, 1, 8]
            for (index, word) in words.enumerated() {
                for byte in 0..<4 { bytes[Int(CowLabel.areaOffset) + index * 4 + byte] = UInt8((word >> (8 * UInt32(byte))) & 0xFF) }
            }
        }
        if exception {
            // The first entry of metadata area 0 (chunk 1): old chunk 5, new chunk 2.
            let entry = Int(CowLabel.areaOffset) + 8 * 512
            bytes[entry] = 5
            bytes[entry + 8] = 2
        }
        #expect(FileManager.default.createFile(atPath: path, contents: bytes))
        if let state {
            var label = CowLabel(
                identity: labelIdentity ?? identity, originUUID: "LVM-xyz", originName: "gpl-steps", originSectors: 49_152,
                originTable: "0 49152 linear 7:0 2048", chunkSectors: 8, storageBytes: 4 << 20, state: state, createdAt: 1)
            try label.write(to: path)
        }
        return path
    }

    @Test("a snapshot that recorded changed blocks, or a merge, is kept; provably empty ones may go")
    func labelsAndHeaders() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func evidence(_ path: String) -> StorageEvidence { stack(path).storageEvidence() }

        let changed = evidence(try cow("changed", state: .active, header: true, exception: true))
        #expect(changed.mustKeep, "\(changed)")
        #expect(changed.reason.contains("holds the old blocks"), "\(changed.reason)")
        #expect(evidence(try cow("kept", state: .kept, header: true, exception: true)).mustKeep)
        // A merge stopped by a reboot: kept even if the first area is empty (merged from the end).
        #expect(evidence(try cow("merging", state: .merging, header: true)).mustKeep)
        // An invalidated snapshot is not dropped behind the admin's back either.
        #expect(evidence(try cow("invalid", state: .active, header: true, valid: false)).mustKeep)

        #expect(!evidence(try cow("untouched", state: .active, header: true)).mustKeep, "no exception recorded: the origin was never written under it")
        #expect(!evidence(try cow("never-initialised", state: .active, header: false)).mustKeep)
        #expect(!evidence(try cow("preparing", state: .preparing, header: true, exception: true)).mustKeep)
        #expect(evidence(try cow("released", state: .released, header: true, exception: true)) == .released)
        if case .stale = evidence(try cow("stale", state: .stale, header: true, exception: true)) {} else { Issue.record("a stale label is stale") }

        // No label but a kernel header: kept for the admin. Neither: nothing of guard's.
        #expect(evidence(try cow("no-label", state: nil, header: true, exception: true)).mustKeep)
        #expect(evidence(try cow("blank", state: nil, header: false)) == .released)
        // Another run's label: left alone.
        #expect(evidence(try cow("other", state: .active, header: true, exception: true, labelIdentity: StackIdentity(runToken: "feedf00d", volumeIndex: 0))).mustKeep)
    }

    @Test("a label that cannot be read, a missing directory or an unmounted filesystem keeps everything")
    func unreadableAndMissing() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // Reading fails (EISDIR here; EIO on a failing disk): kept, and said so.
        let unreadable = "\(directory)/unreadable.cow"
        try FileManager.default.createDirectory(atPath: unreadable, withIntermediateDirectories: false)
        let failed = stack(unreadable).storageEvidence()
        #expect(failed.mustKeep && failed.reason.contains("cannot be read"), "\(failed)")

        // The COW directory is not there (its filesystem is not mounted yet).
        let missing = stack("\(directory)/not-mounted/run-0.cow").storageEvidence()
        #expect(missing.mustKeep && missing.reason.contains("does not exist"), "\(missing)")

        // fstab puts the directory on a filesystem that is not mounted: the mount point is named.
        let fstab = "\(directory)/fstab"
        try "# comment\n/dev/gpl/cow /guard-test-not-mounted ext4 defaults 0 2\n".write(toFile: fstab, atomically: true, encoding: .utf8)
        let late = stack("/guard-test-not-mounted/cow/run-0.cow").storageEvidence(fstab: fstab)
        #expect(late.mustKeep && late.reason.contains("/guard-test-not-mounted, which is not mounted"), "\(late)")

        // The file is gone from a directory without guard's marker (an empty mount point): kept waiting.
        let unmarked = stack("\(directory)/gone.cow").storageEvidence()
        #expect(unmarked.mustKeep && unmarked.reason.contains("marker"), "\(unmarked)")
        // From the directory guard wrote it into: released (nothing left to keep).
        try "".write(toFile: "\(directory)/\(CowDirectoryMarker.name)", atomically: true, encoding: .utf8)
        #expect(stack("\(directory)/gone.cow").storageEvidence() == .released)
    }
}
