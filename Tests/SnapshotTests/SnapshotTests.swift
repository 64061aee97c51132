import BlockDevice
import Foundation
import Quantities
import Snapshot
import Testing

@Suite("snapshot layout")
struct SnapshotLayoutTests {
    @Test("COW sizing follows the kernel's persistent store layout")
    func sizing() {
        let geometry = CowGeometry(chunkSectors: 8)
        #expect(geometry.chunkBytes == 4096)
        #expect(geometry.exceptionsPerArea == 256)
        // 1 MiB changed: the header, 256 data chunks, the first area's metadata chunk and the next one's.
        #expect(geometry.bytesNeeded(forChanged: 1 << 20) == (1 + 2 + 256) * 4096)
        #expect(geometry.bytesNeeded(forChanged: (1 << 20) - 4096) == (1 + 1 + 255) * 4096)
        // As the kernel reported it: 1 MiB with 4 KiB chunks is 2072 sectors; 4 MiB with 8 KiB chunks 8240.
        #expect(geometry.bytesNeeded(forChanged: 1 << 20) / 512 == 2072)
        #expect(CowGeometry(chunkSectors: 16).bytesNeeded(forChanged: 4 << 20) / 512 == 8240)
        // The whole 100 MiB tutorial volume: 25600 chunks, 101 metadata chunks.
        #expect(geometry.bytesForWholeOrigin(100 << 20) == (1 + 101 + 25_600) * 4096)
        #expect(CowSize.percentOfOrigin(25).resolve(originBytes: 100 << 20, geometry: geometry) == 25 << 20)
        #expect(CowSize.bytes(1).resolve(originBytes: 100 << 20, geometry: geometry) == geometry.minimumBytes)
        #expect(CowSize.bytes(13000).resolve(originBytes: 100 << 20, geometry: geometry) == 16384, "rounded up to whole chunks")
    }

    @Test("layer UUIDs round-trip and nothing else parses as one")
    func identities() {
        let identity = StackIdentity(runToken: "3f9a2c1e", volumeIndex: 2)
        for layer in StackIdentity.Layer.allCases {
            let parsed = StackIdentity.parse(uuid: identity.uuid(layer))
            #expect(parsed?.0 == identity && parsed?.1 == layer)
        }
        #expect(identity.uuid(.snap) == "GUARD-3f9a2c1e-2-snap")
        #expect(StackIdentity.parse(uuid: "GUARD-VOL-website") == nil)
        // A thin volume's pool devices are not snapshot layers either (recovery leaves them be).
        let pool = ThinPoolNames(volume: "deadbeef-0-real")
        for uuid in [pool.poolUUID, pool.metadataUUID, pool.dataUUID] { #expect(StackIdentity.parse(uuid: uuid) == nil, "\(uuid)") }
        #expect(StackIdentity.parse(uuid: "LVM-abc-real") == nil)
        #expect(StackIdentity.parse(uuid: "GUARD-3f9a2c1e-x-real") == nil)
        let long = String(repeating: "x", count: 200)
        #expect(identity.name(.real, originName: long).utf8.count <= 127)
        #expect(StackIdentity.newToken().count == 8)
    }

    @Test("a thin pool's layout: reserved MiB, metadata by the kernel's guide (at least 4 MiB), data in whole blocks")
    func thinLayout() throws {
        let layout = ThinLayout.new(dataBytes: 160 << 20)
        #expect(layout.metadataOffset == 1 << 20 && layout.metadataBytes == 4 << 20 && layout.dataOffset == 5 << 20)
        #expect(layout.dataBytes == 160 << 20 && layout.blockBytes == 65536 && layout.backingBytes == 165 << 20)
        // 64 GiB of data: 1 Mi blocks, 48 bytes each, four times over: 192 MiB of metadata.
        #expect(ThinLayout.new(dataBytes: 64 << 30).metadataBytes == 192 << 20)
        let whole = try #require(ThinLayout.filling(backingBytes: (200 << 20) + 12345))
        #expect(whole.backingBytes <= (200 << 20) + 12345 && whole.dataBytes % 65536 == 0 && whole.dataOffset == whole.metadataOffset + whole.metadataBytes)
        #expect(ThinLayout.filling(backingBytes: 8 << 20) == nil, "too small for a pool")
    }

    @Test("the COW label survives a torn write: the older slot is still read")
    func labelSlots() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("label-\(UInt32.random(in: 0...UInt32.max)).cow").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 2 << 20)))
        var label = CowLabel(
            identity: StackIdentity(runToken: "0badc0de", volumeIndex: 0), originUUID: "LVM-xyz", originName: "datadisks-website",
            originSectors: 204_800, originTable: "0 204800 linear 7:0 2048", chunkSectors: 8, storageBytes: 2 << 20, state: .active, createdAt: 1)
        try label.write(to: path)
        #expect(try CowLabel.read(from: path) == label)
        label.state = .merging
        try label.write(to: path)
        #expect(try CowLabel.read(from: path)?.state == .merging)
        #expect(try CowLabel.read(from: path)?.generation == 2)

        // Tear the newest slot (generation 2 sits at 0): the reader falls back to generation 1.
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.seek(toOffset: 40)
        handle.write(Data([0xFF, 0xFF, 0xFF]))
        try handle.close()
        let survivor = try #require(try CowLabel.read(from: path))
        #expect(survivor.state == .active && survivor.generation == 1)

        try CowLabel.wipe(path)
        #expect(try CowLabel.read(from: path) == nil)
        #expect(try KernelCowHeader.read(from: path) == nil)
    }

    @Test("a label too large for its slot (a volume of thousands of segments) is a clear error, not a trap, and writes nothing")
    func labelTooLarge() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("label-\(UInt32.random(in: 0...UInt32.max)).cow").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 2 << 20)))
        let table = (0..<3000).map { "\($0 * 8) 8 linear 7:0 \($0 * 64)" }.joined(separator: "\n")
        var label = CowLabel(
            identity: StackIdentity(runToken: "0badc0de", volumeIndex: 0), originUUID: "LVM-xyz", originName: "vg-fragmented",
            originSectors: 24_000, originTable: table, chunkSectors: 8, storageBytes: 2 << 20, state: .preparing, createdAt: 1)
        #expect(throws: SnapshotError.self) { try label.write(to: path) }
        do { try label.write(to: path) } catch {
            #expect("\(error)".contains("3000 segments"), "\(error)")
        }
        #expect(try CowLabel.read(from: path) == nil, "nothing was written")
    }

    @Test("the kernel's COW header is read as the kernel writes it")
    func kernelHeader() {
        // le32 magic "SnAp", valid 1, version 1, chunk size 8 sectors.
        let bytes: [UInt8] = [0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]
        #expect(KernelCowHeader.parse(bytes) == KernelCowHeader(valid: true, version: 1, chunkSectors: 8))
        var invalid = bytes
        invalid[4] = 0
        #expect(KernelCowHeader.parse(invalid)?.valid == false)
        #expect(KernelCowHeader.parse([UInt8](repeating: 0, count: 16)) == nil)
    }

    @Test("sizes print as admins read them")
    func formatting() {
        #expect(formatBytes(25 << 20) == "25 MiB")
        #expect(formatBytes(1536 << 20) == "1.5 GiB")
        #expect(formatBytes(512) == "512 B")
        #expect(CowSize.percentOfOrigin(20).description == "20% of the origin")
    }
}
