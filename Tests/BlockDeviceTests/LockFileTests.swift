import BlockDevice
import Foundation
import Testing

@Test("a lock file: one holder at a time, its words kept when another fails to take it, emptied and free once released; never through a symbolic link")
func lockFile() throws {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guard-lockfile-\(UInt32.random(in: 0...UInt32.max))").path
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let path = "\(directory)/vg-website.lock"
    #expect(try !LockFile.isHeld(path), "no file: nobody holds it")
    let first = try LockFile(opening: path)
    #expect(first.tryLock())
    first.write("run 12 (pid 3456)\n")
    #expect(try LockFile.isHeld(path))
    let second = try LockFile(opening: path)
    #expect(!second.tryLock(), "one holder at a time")
    second.write("run 13\n")
    second.release()
    #expect(try String(contentsOfFile: path, encoding: .utf8) == "run 12 (pid 3456)\n", "a command that did not get the lock leaves the holder's words")
    first.release()
    #expect(try !LockFile.isHeld(path))
    #expect(try String(contentsOfFile: path, encoding: .utf8).isEmpty)
    let target = "\(directory)/target"
    try "keep".write(toFile: target, atomically: false, encoding: .utf8)
    try FileManager.default.createSymbolicLink(atPath: "\(directory)/link.lock", withDestinationPath: target)
    #expect(throws: BlockDeviceError.self) { try LockFile(opening: "\(directory)/link.lock") }
    #expect(try String(contentsOfFile: target, encoding: .utf8) == "keep")
}
