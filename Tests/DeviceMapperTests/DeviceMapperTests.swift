import BlockDevice
import DeviceMapper
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Status lines captured from a Debian 6.1 kernel (dm driver 4.47.0) with dmsetup, in the VM.
enum Captured {
    static let freshSnapshot = "0 131072 snapshot 16/8192 16"
    static let afterOneMiB = "0 131072 snapshot 2072/8192 24"
    static let overflowed = "0 131072 snapshot Invalid"
    static let chunk16 = "0 131072 snapshot 8240/32768 48"
    static let mergeComplete = "0 131072 snapshot-merge 32/32768 32"
    static let lvmSnapshot = "0 204800 snapshot 3040/57344 24"
    static let originStatus = "0 131072 snapshot-origin "
    static let tables = """
        org: 0 131072 snapshot-origin 254:1
        real: 0 131072 linear 7:0 0
        snp: 0 131072 snapshot 254:1 7:1 P 8
        merging: 0 131072 snapshot-merge 254:1 7:2 P 16
        """
}

/// Splits "start length type text" as DM_DEVICE_STATUS returns it.
func statusLine(_ text: String) -> StatusLine {
    let fields = text.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
    return StatusLine(start: UInt64(fields[0])!, length: UInt64(fields[1])!, type: String(fields[2]), text: fields.count > 3 ? String(fields[3]) : "")
}

@Suite("device-mapper parsing")
struct DeviceMapperParsingTests {
    @Test(
        "snapshot status lines captured from the kernel",
        arguments: [
            (Captured.freshSnapshot, SnapshotStatus.active(SnapshotUsage(allocatedSectors: 16, totalSectors: 8192, metadataSectors: 16))),
            (Captured.afterOneMiB, .active(SnapshotUsage(allocatedSectors: 2072, totalSectors: 8192, metadataSectors: 24))),
            (Captured.overflowed, .invalid(cause: nil)),
            (Captured.chunk16, .active(SnapshotUsage(allocatedSectors: 8240, totalSectors: 32768, metadataSectors: 48))),
            (Captured.mergeComplete, .active(SnapshotUsage(allocatedSectors: 32, totalSectors: 32768, metadataSectors: 32))),
            (Captured.lvmSnapshot, .active(SnapshotUsage(allocatedSectors: 3040, totalSectors: 57344, metadataSectors: 24))),
            ("0 8388608 snapshot-merge 281688/2097152 1104", .active(SnapshotUsage(allocatedSectors: 281_688, totalSectors: 2_097_152, metadataSectors: 1104))),
            ("0 2048 snapshot Overflow", .overflow),
            ("0 2048 snapshot-merge Merge failed", .mergeFailed),
            ("0 2048 snapshot Invalid cow_full", .invalid(cause: "cow_full")),
            ("0 2048 snapshot Unknown", .unknown("Unknown")),
        ])
    func snapshotStatus(line: String, expected: SnapshotStatus) throws {
        let parsed = try #require(statusLine(line).snapshot)
        #expect(parsed == expected)
        #expect(parsed.description == line.split(separator: " ", maxSplits: 3)[3].trimmingWhitespace())
    }

    @Test("usage arithmetic: fill, data, merge completion")
    func usage() {
        let usage = SnapshotUsage(allocatedSectors: 2072, totalSectors: 8192, metadataSectors: 24)
        #expect(usage.dataSectors == 2048)
        #expect(usage.allocatedBytes == 2072 * 512)
        #expect(abs(usage.fill - 2072.0 / 8192) < 1e-9)
        #expect(!usage.isMergeComplete)
        #expect(SnapshotUsage(allocatedSectors: 32, totalSectors: 32768, metadataSectors: 32).isMergeComplete)
        #expect(SnapshotStatus.invalid(cause: nil).isRestorable == false)
        #expect(SnapshotStatus.mergeFailed.usage == nil)
        #expect(statusLine(Captured.originStatus).snapshot == nil, "an origin has no snapshot status")
    }

    @Test("tables as the kernel reports them parse into typed targets and print back unchanged")
    func tables() throws {
        for line in Captured.tables.split(separator: "\n") {
            let text = String(line.split(separator: ":", maxSplits: 1)[1]).trimmingWhitespace()
            let table = try Table(parsing: text)
            #expect(table.description == text)
        }
        let snapshot = try Table(parsing: "0 131072 snapshot 254:1 7:1 P 8")
        #expect(snapshot.lines[0].target == .snapshot(origin: DeviceNumber(major: 254, minor: 1), cow: DeviceNumber(major: 7, minor: 1), persistence: .persistent, chunkSectors: 8))
        #expect(snapshot.devices == [DeviceNumber(major: 254, minor: 1), DeviceNumber(major: 7, minor: 1)])
        let merge = try Table(parsing: "0 131072 snapshot-merge 254:1 7:2 P 16")
        #expect(merge.isOnly("snapshot-merge"))
        let linear = try Table(parsing: "0 204800 linear 7:0 2048")
        #expect(linear.lines[0].target == .linear(device: DeviceNumber(major: 7, minor: 0), offset: 2048))
        #expect(linear.lengthSectors == 204_800)
        let features = try Table(parsing: "0 100 snapshot 254:1 7:1 P 8 2 discard_zeroes_cow discard_passdown_origin")
        #expect(features.lines[0].target == .other(type: "snapshot", parameters: "254:1 7:1 P 8 2 discard_zeroes_cow discard_passdown_origin"), "unmodelled parameters round-trip")
        // The kernel prints flakey's features with their count: guard's fuse and nothing else.
        let fuse = try Table(parsing: "0 204800 flakey 254:3 0 0 1 1 error_writes")
        #expect(fuse.lines[0].target == .writeFuse(device: DeviceNumber(major: 254, minor: 3)))
        #expect(fuse.isFused && fuse.snapshotOriginDevice == DeviceNumber(major: 254, minor: 3))
        #expect(fuse.description == "0 204800 flakey 254:3 0 0 1 1 error_writes")
        #expect(try Table(parsing: "0 100 snapshot-origin 254:3").snapshotOriginDevice == DeviceNumber(major: 254, minor: 3))
        let flaky = try Table(parsing: "0 100 flakey 254:3 0 5 1 1 error_writes")
        #expect(!flaky.isFused && flaky.snapshotOriginDevice == nil, "a flakey table that comes back up is not a fuse")
        let twoLines = try Table(parsing: "0 100 linear 7:0 0\n100 50 zero")
        #expect(twoLines.lengthSectors == 150)
        #expect(twoLines.description == "0 100 linear 7:0 0\n100 50 zero")
    }

    @Test("thin pools and thin devices: tables round-trip, pool status reads data and metadata use, a failed pool says so")
    func thin() throws {
        let pool = try Table(parsing: "0 327680 thin-pool 254:3 254:4 128 256 1 error_if_no_space")
        #expect(pool.lines[0].target == .thinPool(metadata: DeviceNumber(major: 254, minor: 3), data: DeviceNumber(major: 254, minor: 4), blockSectors: 128, lowWaterBlocks: 256))
        #expect(pool.description == "0 327680 thin-pool 254:3 254:4 128 256 1 error_if_no_space")
        #expect(pool.devices == [DeviceNumber(major: 254, minor: 3), DeviceNumber(major: 254, minor: 4)])
        let lvm = try Table(parsing: "0 327680 thin-pool 254:3 254:4 128 0 0")
        #expect(lvm.lines[0].target == .other(type: "thin-pool", parameters: "254:3 254:4 128 0 0"), "another tool's pool is not guard's")
        let thin = try Table(parsing: "0 131072 thin 254:5 7")
        #expect(thin.lines[0].target == .thin(pool: DeviceNumber(major: 254, minor: 5), deviceID: 7) && thin.isOnly("thin"))
        #expect(thin.description == "0 131072 thin 254:5 7")
        #expect(try Table(parsing: "0 131072 thin 254:5 7 254:9").lines[0].target.typeName == "thin", "an external origin is kept as it is")

        let status = try #require(ThinPoolStatus(parsing: "0 10/1024 170/2560 - rw discard_passdown error_if_no_space - 1024"))
        #expect(status.usedMetadataBlocks == 10 && status.totalMetadataBlocks == 1024)
        #expect(status.usedDataBlocks == 170 && status.totalDataBlocks == 2560 && status.mode == .readWrite && !status.needsCheck)
        #expect(abs(status.dataFill - 170.0 / 2560) < 1e-9 && abs(status.metadataFill - 10.0 / 1024) < 1e-9)
        let full = try #require(ThinPoolStatus(parsing: "3 20/1024 2560/2560 - out_of_data_space discard_passdown error_if_no_space needs_check 1024"))
        #expect(full.mode == .outOfDataSpace && full.needsCheck && full.transactionID == 3)
        #expect(ThinPoolStatus(parsing: "Fail")?.mode == .failed)
        #expect(ThinPoolStatus(parsing: "0 10/1024") == nil)
    }

    @Test(
        "malformed tables name the line and say what is wrong",
        arguments: [
            ("", "the table is empty"),
            ("0 100", "expected `start length type [parameters]`"),
            ("x 100 linear 7:0 0", "expected `start length type [parameters]`"),
            ("0 0 zero", "expected `start length type [parameters]`"),
            ("0 100 zero\n200 100 zero", "starts at sector 200, expected 100"),
        ])
    func malformedTables(text: String, reason: String) {
        #expect(throws: TableParseError.self) { try Table(parsing: text) }
        do {
            _ = try Table(parsing: text)
        } catch {
            #expect(error.reason.contains(reason), "\(error)")
        }
    }

    @Test("device numbers")
    func deviceNumbers() {
        #expect(DeviceNumber(parsing: "254:3") == DeviceNumber(major: 254, minor: 3))
        #expect(DeviceNumber(parsing: "254") == nil)
        #expect(DeviceNumber(parsing: "a:b") == nil)
        let number = DeviceNumber(major: 259, minor: 70000)
        #expect(DeviceNumber(number.rawValue) == number, "dev_t round trip with a large minor")
    }

    @Test("errors say what, on which device, the ioctl, errno and why")
    func errorText() {
        let error = DeviceMapperError(
            code: .invalidArgument, operation: "reload of GUARD-website", call: "DM_DEVICE_RELOAD 'snapshot-origin 254:3'", errno: 22,
            detail: "kernel: device-mapper: table: 254:0: snapshot-origin: Cannot get target device")
        #expect(
            error.description
                == "reload of GUARD-website failed: DM_DEVICE_RELOAD 'snapshot-origin 254:3' returned EINVAL (Invalid argument); kernel: device-mapper: table: 254:0: snapshot-origin: Cannot get target device"
        )
    }

    @Test("on a kernel without device-mapper, connecting fails with one clear line", .enabled(if: !DeviceMapper.isAvailable && getuid() == 0, "this kernel has device-mapper"))
    func driverMissing() {
        do {
            _ = try DeviceMapper()
            Issue.record("must fail without the driver")
        } catch let error as DeviceMapperError {
            #expect(error.code == .driverMissing)
            #expect(error.description.contains("this kernel has no device-mapper driver"), "\(error)")
            #expect(error.description.contains("modprobe dm-mod"), "\(error)")
            #expect(!error.description.contains("\n"))
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test("a dm-crypt table is stored without its key; a keyring reference and other targets are kept as they are")
    func cryptKeysRedacted() throws {
        let key = String(repeating: "0123456789abcdef", count: 4)
        let table = try Table(parsing: "0 2048 crypt aes-xts-plain64 \(key) 0 7:0 0 1 allow_discards\n2048 2048 linear 7:1 0")
        #expect(!table.redacted.description.contains(key))
        #expect(table.redacted.description == "0 2048 crypt aes-xts-plain64 <key-not-kept> 0 7:0 0 1 allow_discards\n2048 2048 linear 7:1 0")
        #expect(table.redacted.isRedacted && !table.isRedacted)
        let keyring = try Table(parsing: "0 2048 crypt aes-xts-plain64 :64:logon:cryptsetup:abc 0 7:0 4096")
        #expect(keyring.redacted == keyring, "a keyring reference holds no secret")
        let plain = try Table(parsing: "0 204800 linear 7:0 2048")
        #expect(plain.redacted == plain)
    }
}
