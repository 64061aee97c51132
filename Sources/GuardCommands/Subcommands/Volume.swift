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

                Examples:
                  guard volume create website --backing /srv/website.img --size 100M
                  guard volume list
                  guard volume remove website
                """,
            subcommands: [Create.self, List.self, Remove.self, Activate.self])

        /// `volume list --json` and `volume activate --json`: every volume, and what activate made.
        struct VolumeList: Encodable {
            var volumes: [Entry]
            /// `activate`: the names it activated (null for `list`).
            var activated: [String]?
        }

        /// A guard volume in JSON (Docs/schema/volume.schema.json and volume-list.schema.json).
        struct Entry: Encodable {
            var name: String
            var path: String
            var backing: String
            var sizeBytes: UInt64
            var active: Bool
            /// MAJOR:MINOR while active.
            var device: String?
            enum CodingKeys: String, CodingKey {
                case name, path, backing, active, device
                case sizeBytes = "size_bytes"
            }

            init(_ volume: GuardVolume, _ info: DeviceInfo?) {
                (name, path, backing, sizeBytes, active, device) = (volume.name, volume.path, volume.backing, volume.sizeBytes, info != nil, info?.number.description)
            }
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
            @Option(help: ArgumentHelp("Size, e.g. 100M (required for a new file; default: all of the backing).", valueName: "size")) var size: String?
            @Flag(help: "Print the volume as JSON (Docs/schema/volume.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                var bytes: UInt64?
                if let size {
                    switch Units.parseSize(size) {
                    case .success(let value): bytes = value
                    case .failure(let error): throw GuardFailure(.refused, "--size: \(error.message)" + (error.hint.map { "; \($0)" } ?? ""))
                    }
                }
                try context.prepareStateDirectory()
                do {
                    let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                    let volume = try volumes.create(name: name, backing: backing, size: bytes)
                    guard json else { return say("created \(volume.path) (\(formatBytes(volume.sizeBytes)) on \(volume.backing))") }
                    try printJSON(["volume": Entry(volume, try volumes.dm.info(.name(volume.name)))])
                } catch let error as SnapshotError {
                    throw GuardFailure(.refused, "\(error)")
                }
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
            @Flag(help: "Print JSON (Docs/schema/volume-list.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                let volumes = try GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory).list()
                let entries = volumes.map { Entry($0.0, $0.1) }
                if json { return try printJSON(VolumeList(volumes: entries, activated: nil)) }
                if entries.isEmpty { return say("no guard volumes") }
                var rows = [["NAME", "DEVICE", "SIZE", "BACKING", "STATE"]]
                for entry in entries { rows.append([entry.name, entry.path, formatBytes(entry.sizeBytes), entry.backing, entry.active ? "active" : "inactive"]) }
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
            @Flag(help: "Print the removed volume as JSON (Docs/schema/volume.schema.json).") var json = false

            func run() throws {
                let context = try global.context()
                let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                let removed = try volumes.list().first { $0.0.name == name }?.0
                do {
                    try volumes.remove(name: name)
                } catch let error as SnapshotError {
                    throw GuardFailure(.refused, "\(error)")
                }
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
            @Flag(help: "Print the volumes as JSON (Docs/schema/volume-list.schema.json), with the names activated.") var json = false

            func run() throws {
                let context = try global.context()
                let volumes = GuardVolumes(dm: try context.dm(), stateDirectory: context.stateDirectory)
                let activated = try volumes.activateAll()
                if json {
                    return try printJSON(VolumeList(volumes: try volumes.list().map { Entry($0.0, $0.1) }, activated: activated.map(\.name)))
                }
                say(activated.isEmpty ? "every guard volume is active" : "activated " + activated.map(\.name).joined(separator: ", "))
            }
        }
    }
}
