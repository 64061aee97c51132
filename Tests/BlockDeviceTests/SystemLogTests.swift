import Foundation
import Testing

@testable import BlockDevice

/// Issue 22: journald's native protocol, read back from a socket of the test's own.
@Suite("system log: journald's native protocol")
struct SystemLogTests {
    /// A datagram socket bound at a fresh path: a journald that reads only when told to.
    static func boundSocket() throws -> (Int32, String) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("journal-\(UInt32.random(in: 0...UInt32.max)).socket").path
        let listener = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
        }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        try #require(bound == 0)
        return (listener, path)
    }

    @Test("an entry carries MESSAGE, PRIORITY, the identifier and guard's fields; a message with a newline goes in the binary form")
    func nativeEntry() throws {
        let (listener, path) = try Self.boundSocket()
        defer {
            close(listener)
            unlink(path)
        }
        let sent = SystemLog.sendToJournal(
            .error, "run 4 failed:\nverify 'health' exit 1", fields: [("GUARD_RUN_ID", "4"), ("GUARD_RECIPE", "web"), ("MESSAGE_ID", "0daef6f1528e45648b75728188725573")],
            socket: path)
        #expect(sent)
        var buffer = [UInt8](repeating: 0, count: 65536)
        let count = recv(listener, &buffer, buffer.count, Int32(MSG_DONTWAIT))
        try #require(count > 0)
        let fields = SystemLog.fields(ofNativeEntry: Array(buffer[0..<count]))
        #expect(fields["MESSAGE"] == "run 4 failed:\nverify 'health' exit 1")
        #expect(fields["PRIORITY"] == "3" && fields["SYSLOG_IDENTIFIER"] == "guard" && fields["SYSLOG_PID"] == "\(getpid())")
        #expect(fields["GUARD_RUN_ID"] == "4" && fields["GUARD_RECIPE"] == "web" && fields["MESSAGE_ID"] == "0daef6f1528e45648b75728188725573")
        #expect(!SystemLog.sendToJournal(.info, "nobody listens", fields: [], socket: path + ".none"), "no journald: the caller falls back to syslog")
    }

    @Test("a journald that does not read (its queue full) never makes guard wait: the entry goes to syslog instead", .timeLimit(.minutes(1)))
    func neverBlocks() throws {
        let (listener, path) = try Self.boundSocket()
        defer {
            close(listener)
            unlink(path)
        }
        var refused = 0
        for index in 0..<5000 where !SystemLog.sendToJournal(.info, "line \(index)", fields: [], socket: path) { refused += 1 }
        #expect(refused > 0, "the queue filled and sending returned at once instead of waiting")
    }

    @Test("stderr is the journal only when JOURNAL_STREAM names its device and inode")
    func journalStream() {
        var status = stat()
        fstat(2, &status)
        #expect(SystemLog.standardErrorIsJournal(["JOURNAL_STREAM": "\(status.st_dev):\(status.st_ino)"]))
        #expect(!SystemLog.standardErrorIsJournal(["JOURNAL_STREAM": "\(status.st_dev):\(status.st_ino + 1)"]))
        #expect(!SystemLog.standardErrorIsJournal([:]))
    }
}
