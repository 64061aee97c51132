import BlockDevice
import DeviceMapper

/// Whether writes to a snapshot's origin still reach the snapshot, read from the kernel: the
/// origin's live table must be the one guard gave it (`snapshot-origin` or guard's fuse over
/// this stack's `-real`, or `snapshot-merge` during a rollback).
///
/// guard's table sits in the origin's own device, outside lvm2's metadata. Any tool that loads
/// a table of its own into the origin (lvm2's `lvextend`, `lvchange --refresh`, `pvmove`,
/// `lvconvert`, an lvm2 snapshot of the volume, `vgchange -an` then `-ay`; `dmsetup reload`)
/// takes the snapshot out of the write path, and nothing says so: from that instant every write
/// goes around it, and the snapshot no longer describes the origin's past.
public enum OriginRouting: Sendable, Hashable {
    /// The origin's writes go through the snapshot (or the origin merges it back).
    case intact
    /// The stack's layers are in the kernel, but the origin no longer routes through them.
    case bypassed(OriginBypass)
    /// The stack's layers are in the kernel and its origin is not active: it was deactivated
    /// behind guard's back (`vgchange -an`, `lvchange -an`). Nothing can write it while it is
    /// inactive; activated again with a table of its own, it is bypassed.
    case originInactive
    /// The stack is not in the kernel (a reboot without reassembly): the durable records decide.
    case notInKernel
}

/// What guard saw of an origin that no longer routes through its snapshot.
public struct OriginBypass: Sendable, Hashable, CustomStringConvertible {
    /// The origin's name now (`lvrename` changes it).
    public var origin: String
    /// Its live table now, keys left out.
    public var table: String
    public var sectors: UInt64
    /// The size and table the snapshot was taken of.
    public var recordedSectors: UInt64
    public var recordedTable: String
    /// Which command most likely did it, in words.
    public var likelyCause: String

    public var description: String {
        "\(origin)'s table is no longer guard's (it is now `\(table.split(separator: "\n").first ?? "")`\(sectors == recordedSectors ? "" : ", \(sectors) sectors instead of \(recordedSectors)")): \(likelyCause)"
    }

    /// Names the command that most likely replaced the table, from how the table changed.
    static func cause(now: Table, recorded: String, recordedSectors: UInt64, deviceName: (DeviceNumber) -> String?) -> String {
        if now.lines.contains(where: { if case .snapshotOrigin = $0.target { true } else { false } }) {
            return "another snapshot was stacked on it (an lvm2 snapshot: `lvcreate -s`)"
        }
        if now.lengthSectors > recordedSectors { return "it was grown (`lvextend`, `lvresize`)" }
        if now.lengthSectors < recordedSectors { return "it was shrunk (`lvreduce`, `lvresize`)" }
        if now.redacted.description == recorded {
            return "its own table was loaded again (`lvchange --refresh`, `vgchange -an` then `-ay`, `lvrename`, or `dmsetup reload`)"
        }
        if now.devices.contains(where: { deviceName($0)?.contains("pvmove") == true }) { return "its extents are being moved (`pvmove`)" }
        let types = Set(now.lines.map(\.target.typeName))
        let recordedTypes = Set((try? Table(parsing: recorded))?.lines.map(\.target.typeName) ?? [])
        if types != recordedTypes { return "its type changed (`lvconvert`)" }
        return "its table was changed (`pvmove`, `lvconvert` or `dmsetup reload`)"
    }
}

extension SnapshotEngine {
    /// Whether `stack`'s origin still routes its writes through the snapshot, from the kernel's
    /// tables now. A thin snapshot is a device of the volume's own pool, outside any origin
    /// table: it is always `intact` here.
    public func routing(_ stack: SnapshotStack) throws -> OriginRouting {
        if stack.thin != nil { return .intact }
        guard let real = try dm.info(stack.ref(.real)) else { return .notInKernel }
        guard let origin = try dm.info(stack.originRef) else { return .originInactive }
        let live = try dm.table(.number(origin.number))
        if live.snapshotOriginDevice == real.number || (live.isOnly("snapshot-merge") && live.devices.contains(real.number)) {
            return .intact
        }
        // A restart of a failed merge gives the origin an `error` table for an instant.
        if live.isOnly("error"), try dm.info(stack.ref(.snap)) == nil { return .intact }
        return .bypassed(
            OriginBypass(
                origin: origin.name, table: live.redacted.description, sectors: live.lengthSectors, recordedSectors: stack.originSectors,
                recordedTable: stack.originTable,
                likelyCause: OriginBypass.cause(now: live, recorded: stack.originTable, recordedSectors: stack.originSectors) { BlockDevices.deviceMapperName(of: $0) }))
    }

    /// Marks the COW label of a bypassed stack stale, synced: the durable record that comes before
    /// any other (a reboot may make the origin look intact again: the same table, the same size).
    public func markStale(_ stack: SnapshotStack) throws {
        try mark(stack, .stale)
    }
}
