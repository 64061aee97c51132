// swift-tools-version: 6.1
//
// guard: a snapshot-guarded upgrade runner for Linux.
// Layout and layering are described in Docs/architecture.md: only DeviceMapper and
// BlockDevice call C; GuardCLI is a thin entry point over GuardCommands.

import PackageDescription

let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "guard",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "guard", targets: ["GuardCLI"]),
        // The same program with the test hooks on, for the kernel suite; never installed.
        .executable(name: "guard-test", targets: ["GuardTestCLI"]),
        .executable(name: "guard-watchdog", targets: ["GuardWatchdog"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        // C entry points: libdevmapper, libmount and a few ioctls/variadics Swift cannot call.
        .systemLibrary(
            name: "CDeviceMapper",
            pkgConfig: "devmapper",
            providers: [.apt(["libdevmapper-dev"])]
        ),
        .systemLibrary(
            name: "CMount",
            pkgConfig: "mount",
            providers: [.apt(["libmount-dev"])]
        ),
        .target(
            name: "CGuardShims",
            dependencies: ["CDeviceMapper"]
        ),

        // How sizes are written for people, shared by every layer (no dependencies).
        .target(name: "Quantities", swiftSettings: strict),

        // Kernel-facing layers.
        .target(
            name: "BlockDevice",
            dependencies: ["CMount", "CGuardShims"],
            swiftSettings: strict
        ),
        .target(
            name: "DeviceMapper",
            dependencies: ["CDeviceMapper", "CGuardShims", "BlockDevice"],
            swiftSettings: strict
        ),
        .target(
            name: "Snapshot",
            dependencies: ["DeviceMapper", "BlockDevice", "Quantities"],
            swiftSettings: strict
        ),

        // The suspend-window watchdog: its own small program, without Foundation.
        .target(
            name: "Watchdog",
            dependencies: ["DeviceMapper", "BlockDevice"],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "GuardWatchdog",
            dependencies: ["Watchdog"],
            swiftSettings: strict
        ),

        // Above the kernel.
        .target(
            name: "Files",
            dependencies: ["BlockDevice"],
            swiftSettings: strict
        ),
        .target(
            name: "Journal",
            dependencies: [.product(name: "GRDB", package: "GRDB.swift")],
            swiftSettings: strict
        ),
        .target(
            name: "Recipe",
            dependencies: ["Yams", "Quantities"],
            swiftSettings: strict
        ),
        .target(
            name: "Engine",
            dependencies: [
                "Snapshot", "Journal", "Recipe", "DeviceMapper", "BlockDevice", "Quantities", "Files", "Watchdog",
            ],
            swiftSettings: strict
        ),
        .target(
            name: "GuardCommands",
            dependencies: [
                "Engine", "Snapshot", "Journal", "Recipe", "DeviceMapper", "BlockDevice", "Quantities", "Files", "Watchdog",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "GuardCLI",
            dependencies: ["GuardCommands"],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "GuardTestCLI",
            dependencies: ["GuardCommands", "Snapshot"],
            swiftSettings: strict
        ),

        // Host tests: no root, no device-mapper.
        .testTarget(name: "DeviceMapperTests", dependencies: ["DeviceMapper"], swiftSettings: strict),
        .testTarget(name: "BlockDeviceTests", dependencies: ["BlockDevice"], swiftSettings: strict),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshot", "DeviceMapper", "Quantities"], swiftSettings: strict),
        .testTarget(name: "JournalTests", dependencies: ["Journal"], swiftSettings: strict),
        .testTarget(name: "RecipeTests", dependencies: ["Recipe", "Quantities"], swiftSettings: strict),
        .testTarget(name: "EngineTests", dependencies: ["Engine", "Files", "Recipe", "Journal", "Watchdog", "DeviceMapper", "BlockDevice"], swiftSettings: strict),
        .testTarget(
            name: "GuardCommandsTests",
            dependencies: ["GuardCommands", "Journal", "Engine", "Snapshot", "DeviceMapper"],
            swiftSettings: strict
        ),
        // Kernel suite: root + device-mapper (in the VM on machines without it).
        .testTarget(
            name: "KernelTests",
            dependencies: ["DeviceMapper", "BlockDevice", "Snapshot", "Engine", "Journal", "Recipe", "Quantities"],
            swiftSettings: strict
        ),
    ]
)
