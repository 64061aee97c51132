import ArgumentParser
import BlockDevice
import DeviceMapper
import Engine
import Foundation
import Quantities
import Recipe
import Snapshot

extension GuardCommand {
    struct Volume: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "volume",
            abstract: "Guard volumes: a device-mapper volume over a file or block device, for machines without LVM.",
            discussion: """
                A guard volume is /dev/mapper/NAME, a linear device-mapper volume over a file or a whole block device, registered in the state directory so that `guard volume activate` (and the boot unit) can bring it back after a reboot. guard snapshots it like an LVM logical volume.

                With --thin the volume is a thin device of a dm-thin pool guard makes over the backing (its metadata and data in one file or device). guard checks the pool's metadata with thin_check before every activation and leaves a pool that fails it inactive; `guard volume repair NAME` rebuilds it with thin_repair.

                Examples:
                  guard volume create website --backing /srv/website.img --size 100M
                  guard volume create website --backing /srv/website.img --size 100M --thin --pool-size 300M
                  guard volume extend website --pool-size 600M
                  guard volume list
                  guard volume remove website
                """,
            subcommands: [Create.self, List.self, Remove.self, Activate.self, Extend.self, Repair.self])

        /// `volume list --json` and `volume activate --json`: every volume, and what activate made.
        struct VolumeList: Encodable {
            var volumes: [Entry]
            /// `activate`: the names it activated (null for `list`).
            var activated: [String]?
        }

        /// A guard volume in JSON (/usr/share/doc/guard/schema/volume.schema.json and volume-list.schema.json).
        struct Entry: Encodable {
            var name: String
            var path: String
            var backing: String
            var sizeBytes: UInt64
            var active: Bool
            /// MAJOR:MINOR while active.
            var device: String?
            /// A thin volume's pool; null for a linear volume.
            var thin: Pool?
            enum CodingKeys: String, CodingKey {
                case name, path, backing, active, device, thin
                case sizeBytes = "size_bytes"
            }

            struct Pool: Encodable {
                var poolBytes: UInt64
                var blockBytes: UInt64
                var metadataBytes: UInt64
                /// From the kernel while the pool is active; null otherwise.
                var dataUsedBytes: UInt64?
                var metadataUsedBytes: UInt64?
                var mode: String?
                enum CodingKeys: String, CodingKey {
                    case mode
                    case poolBytes = "pool_bytes"
                    case blockBytes = "block_bytes"
                    case metadataBytes = "metadata_bytes"
                    case dataUsedBytes = "data_used_bytes"
                    case metadataUsedBytes = "metadata_used_bytes"
                }
            }

            init(_ volume: GuardVolume, _ info: DeviceInfo?, pool status: ThinPoolStatus? = nil) {
                (name, path, backing, sizeBytes, active, device) = (volume.name, volume.path, volume.backing, volume.sizeBytes, info != nil, info?.number.description)
                thin = volume.thin.map { layout in
                    Pool(
                        poolBytes: layout.dataBytes, blockBytes: layout.blockBytes, metadataBytes: layout.metadataBytes,
                        dataUsedBytes: status.map { $0.usedDataBlocks * layout.blockBytes },
                        metadataUsedBytes: status.map { $0.usedMetadataBlocks * ThinPoolStatus.metadataBlockBytes }, mode: status?.mode.rawValue)
                }
            }
        }

        /// Every registered volume with its device and (thin) its pool's use.
        static func entries(_ volumes: GuardVolumes) throws -> [Entry] {
            try volumes.list().map { volume, info in Entry(volume, info, pool: try? volumes.poolStatus(volume)) }
        }

        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "create",
                abstract: "Create a guard volume: /dev/mapper/NAME over a file (created if missing) or a block device.",
                discussion: """
                    Examples:
                      guard volume create website --backing /srv/website.img --size 100M
                      mkfs.ext4 /dev/mapper/website && mount /dev/mapper/website /mnt/website
                    """)
            @OptionGroup var global: GlobalOptions
            @Argument(help: "The volume name (/dev/mapper/NAME).") var name: String
            @Option(help: ArgumentHelp("A file (created when missing) or block device.", valueName: "file|device")) var backing: String
            @Option(help: ArgumentHelp("Size, e.g. 100M (required for a new file; default: all of the backing, or half a thin volume's pool).", valueName: "size")) var size:
                String?
            @Flag(help: "A thin volume: a dm-thin pool over the backing, the volume a thin device of it.") var thin = false
            @Option(help: ArgumentHelp("The thin pool's data, e.g. 300M (default: twice --size for a new file, else what the backing holds).", valueName: "size")) var poolSize:
                String?
            @Flag(help: "Print the volume as JSON (/usr/share/doc/guard/schema/volume.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                let bytes = try size.map { try sizeOption($0, "--size") }
                let poolBytes = try poolSize.map { try sizeOption($0, "--pool-size") }
                let volume = try VolumeService(context: context).create(name: name, backing: backing, size: bytes, thin: thin, poolSize: poolBytes)
                guard json else {
                    let pool = volume.thin.map { ", a thin volume of a \(formatBytes($0.dataBytes)) pool" } ?? ""
                    return say("created \(volume.path) (\(formatBytes(volume.sizeBytes)) on \(volume.backing)\(pool))")
                }
                let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                try printJSON(["volume": Entry(volume, try volumes.dm.info(.name(volume.name)), pool: try? volumes.poolStatus(volume))])
            }
        }

        struct List: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "list",
                abstract: "List guard volumes.",
                discussion: """
                    Each volume with its device, size, backing file or device, and whether it is active.

                    Examples:
                      guard volume list
                      guard volume list --json | jq -r '.volumes[].name'
                    """)
            @OptionGroup var global: GlobalOptions
            @Flag(help: "Print JSON (/usr/share/doc/guard/schema/volume-list.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                let entries = try Volume.entries(GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory))
                if json { return try printJSON(VolumeList(volumes: entries, activated: nil)) }
                if entries.isEmpty { return say("no guard volumes") }
                var rows = [["NAME", "DEVICE", "SIZE", "BACKING", "STATE", "POOL"]]
                for entry in entries {
                    var pool = "-"
                    if let thin = entry.thin {
                        pool = "thin, \(formatBytes(thin.poolBytes))"
                        if let data = thin.dataUsedBytes, let metadata = thin.metadataUsedBytes {
                            pool += String(
                                format: ", data %.1f%%, metadata %.1f%%", 100 * Double(data) / Double(max(thin.poolBytes, 1)),
                                100 * Double(metadata) / Double(max(thin.metadataBytes, 1)))
                        }
                        if let mode = thin.mode, mode != "rw" { pool += ", \(mode)" }
                    }
                    rows.append([entry.name, entry.path, formatBytes(entry.sizeBytes), entry.backing, entry.active ? "active" : "inactive", pool])
                }
                say(table(rows))
            }
        }

        struct Remove: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "remove",
                abstract: "Remove a guard volume's device (its backing file keeps the data).",
                discussion: """
                    Refused while the volume is open (mounted) or under a run's snapshot. The backing file or device is left as it is, with its data.

                    Examples:
                      umount /mnt/website && guard volume remove website
                    """)
            @OptionGroup var global: GlobalOptions
            @Argument(help: "The volume name.") var name: String
            @Flag(help: "Print the removed volume as JSON (/usr/share/doc/guard/schema/volume.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                let removed = try volumes.list().first { $0.0.name == name }?.0
                try VolumeService(context: context).remove(name: name)
                guard json, let removed else { return say("removed \(name)") }
                try printJSON(["volume": Entry(removed, nil)])
            }
        }

        struct Activate: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "activate",
                abstract: "Activate guard volumes after a reboot (the boot unit does it).",
                discussion: """
                    Makes /dev/mapper/NAME again for every registered guard volume whose backing is there; active volumes are left alone.

                    Examples:
                      guard volume activate
                    """)
            @OptionGroup var global: GlobalOptions
            @Flag(help: "Print the volumes as JSON (/usr/share/doc/guard/schema/volume-list.schema.json), with the names activated.") var json = false

            func run() throws {
                let context = try global.context()
                let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                let (activated, failed) = try VolumeService(context: context).activateAll()
                if json {
                    try printJSON(VolumeList(volumes: try Volume.entries(volumes), activated: activated.map(\.name)))
                } else {
                    say(
                        activated.isEmpty && failed.isEmpty
                            ? "every guard volume is active" : activated.isEmpty ? "activated none" : "activated " + activated.map(\.name).joined(separator: ", "))
                }
                if !failed.isEmpty {
                    // 2 only when nothing changed: no volume activated and every failure a refusal.
                    let changedNothing = activated.isEmpty && failed.allSatisfy { ExitStatus.of($0.1)?.code == .usage }
                    throw GuardFailure(changedNothing ? .refused : .attention, failed.map { "guard volume \($0.0.name) was not activated: \($0.1)" }.joined(separator: "\n"))
                }
            }
        }

        struct Extend: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "extend",
                abstract: "Grow a thin volume's pool (its data), online.",
                discussion: """
                    The backing file grows first (a block device must already be large enough), then the registry, then the pool, which takes the new size at once; the volume and its snapshots stay in use. The pool's metadata area keeps its size: a pool larger than it can map is refused.

                    Examples:
                      guard volume extend website --pool-size 600M
                    """)
            @OptionGroup var global: GlobalOptions
            @Argument(help: "The thin volume's name.") var name: String
            @Option(help: ArgumentHelp("The pool's new data size, e.g. 600M.", valueName: "size")) var poolSize: String
            @Flag(help: "Print the volume as JSON (/usr/share/doc/guard/schema/volume.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                let bytes = try sizeOption(poolSize, "--pool-size")
                let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                let volume = try VolumeService(context: context).extendPool(name: name, poolSize: bytes)
                guard json else { return say("grew \(name)'s pool to \(formatBytes(volume.thin?.dataBytes ?? bytes))") }
                try printJSON(["volume": Entry(volume, try volumes.dm.info(.uuid(volume.uuid)), pool: try? volumes.poolStatus(volume))])
            }
        }

        struct Repair: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "repair",
                abstract: "Rebuild a thin volume's pool metadata with thin_repair, after thin_check refused it.",
                discussion: """
                    For a thin volume whose pool `guard volume activate` (or the boot) left inactive because thin_check found its metadata damaged. The damaged metadata is copied to <state dir>/volumes/NAME.tmeta.<time> and kept; thin_repair writes a new copy, which must pass thin_check before it replaces the damaged one. Then `guard volume activate` and `guard recover`.

                    Examples:
                      guard volume repair website && guard volume activate && guard recover
                    """)
            @OptionGroup var global: GlobalOptions
            @Argument(help: "The thin volume's name.") var name: String

            func run() throws {
                let context = try global.context()
                let kept = try VolumeService(context: context).repair(name: name)
                say("repaired the metadata of \(name)'s pool (the damaged copy is kept in \(kept)); activate it with `guard volume activate`")
            }
        }
    }
}

/// A size option's value in bytes (`100M`); a bad one is refused, naming the option.
func sizeOption(_ text: String, _ option: String) throws -> UInt64 {
    switch Units.parseSize(text) {
    case .success(let value): return value
    case .failure(let error): throw GuardFailure(.refused, "\(option): \(error.message)" + (error.hint.map { "; \($0)" } ?? ""))
    }
}
