import Engine

/// `guard rollback --dry-run --json` (Docs/schema/rollback-plan.schema.json).
struct RollbackPlanDocument: Encodable {
    struct Volume: Encodable {
        var volume: String
        var unmounts: [String]
        var users: [String]
        var changedBytes: UInt64?
        var changedAtEndBytes: UInt64?
        var changedSinceEndBytes: UInt64?

        enum CodingKeys: String, CodingKey {
            case volume, unmounts, users
            case changedBytes = "changed_bytes"
            case changedAtEndBytes = "changed_at_end_bytes"
            case changedSinceEndBytes = "changed_since_end_bytes"
        }
    }

    var run: Int64
    var keptAt: String?
    var atBoot: Bool
    var stopHooks: [String]
    var startHooks: [String]
    var volumes: [Volume]

    enum CodingKeys: String, CodingKey {
        case run, volumes
        case keptAt = "kept_at"
        case atBoot = "at_boot"
        case stopHooks = "stop_hooks"
        case startHooks = "start_hooks"
    }

    init(_ preview: RollbackPreview) {
        run = preview.run
        keptAt = iso8601(preview.keptAt)
        atBoot = preview.atBoot
        stopHooks = preview.stopHooks
        startHooks = preview.startHooks
        volumes = preview.volumes.map {
            Volume(
                volume: $0.volume, unmounts: $0.unmounts, users: $0.users, changedBytes: $0.changedBytes, changedAtEndBytes: $0.changedAtEndBytes,
                changedSinceEndBytes: $0.changedSinceEndBytes)
        }
    }
}
