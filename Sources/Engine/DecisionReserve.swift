import BlockDevice
import Foundation

/// Room for a run's decision: a preallocated file in the state directory, given back to the
/// filesystem just before the decision is written when the filesystem is nearly full (a step
/// that filled /var, logs that grew all night). Without it, a successful run whose decision
/// could not be journaled would be taken for one that stopped in its steps, and rolled back.
enum DecisionReserve {
    /// Enough for the decision's journal writes (a few WAL frames) many times over.
    static let bytes: UInt64 = 16 << 20

    static func path(stateDirectory: String) -> String { "\(stateDirectory)/decision.reserve" }

    /// Makes the reserve if it is missing (best effort: a filesystem that cannot preallocate, or
    /// is already too full, goes without, and the decision falls back on the COW labels).
    static func ensure(stateDirectory: String) {
        let path = path(stateDirectory: stateDirectory)
        guard !FileManager.default.fileExists(atPath: path) else { return }
        guard let free = try? freeSpace(at: stateDirectory), free > bytes * 4 else { return }
        do {
            let file = try RawFile(path: path, create: true, exclusive: true)
            try file.allocate(offset: 0, length: bytes)
            try file.sync()
        } catch {
            unlink(path)
        }
    }

    /// Gives the reserve back when the filesystem has less free than it holds.
    /// - Returns: whether it was given back.
    @discardableResult
    static func releaseIfLow(stateDirectory: String) -> Bool {
        let path = path(stateDirectory: stateDirectory)
        guard FileManager.default.fileExists(atPath: path), let free = try? freeSpace(at: stateDirectory), free < bytes else { return false }
        return unlink(path) == 0
    }
}
