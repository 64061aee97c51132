import DeviceMapper
import Foundation
import Snapshot

#if canImport(Glibc)
import Glibc
#endif

/// The guard volume commands (`guard volume create`, `remove`, `activate`, `extend`,
/// `repair`), each under the volume's lock, the one a run, a rollback, a commit and
/// `guard monitor` take: none of them overlaps another guard command on the volume, and the
/// registry's read, change and write are one step. What suspends a device does so through
/// the context's engine, with its watchdog.
public struct VolumeService {
    public let context: GuardContext

    public init(context: GuardContext) { self.context = context }

    var volumes: GuardVolumes {
        get throws { GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory) }
    }

    /// The lock of guard volume `name` (its dm UUID, as the planner keys it).
    func lock(_ name: String, _ verb: String) throws -> VolumeLock {
        try context.prepareStateDirectory()
        return try VolumeLock.acquire(directory: context.lockDirectory, key: GuardVolume.uuid(name: name), holder: "guard volume \(verb) \(name) (pid \(getpid()))")
    }

    public func create(name: String, backing: String, size: UInt64?, thin: Bool, poolSize: UInt64?) throws -> GuardVolume {
        let lock = try lock(name, "create")
        defer { lock.release() }
        return try volumes.create(name: name, backing: backing, size: size, thin: thin, poolSize: poolSize)
    }

    public func remove(name: String) throws {
        let lock = try lock(name, "remove")
        defer { lock.release() }
        try volumes.remove(name: name)
    }

    public func extendPool(name: String, poolSize: UInt64) throws -> GuardVolume {
        let lock = try lock(name, "extend")
        defer { lock.release() }
        let engine = try context.engine()
        (engine.watchdog as? ProcessWatchdog)?.start()
        return try volumes.extendPool(name: name, poolSize: poolSize, engine: engine)
    }

    public func repair(name: String) throws -> String {
        let lock = try lock(name, "repair")
        defer { lock.release() }
        return try volumes.repair(name: name)
    }

    /// Activates every registered volume whose backing is there; one another guard command
    /// holds is left to it.
    public func activateAll() throws -> (activated: [GuardVolume], failed: [(GuardVolume, any Error)]) {
        var activated: [GuardVolume] = []
        var failed: [(GuardVolume, any Error)] = []
        let volumes = try volumes
        for (volume, info) in try volumes.list() where info == nil {
            do {
                let lock = try lock(volume.name, "activate")
                defer { lock.release() }
                try volumes.activate(volume)
                activated.append(volume)
            } catch {
                failed.append((volume, error))
            }
        }
        return (activated, failed)
    }
}
