import Journal

/// The journal's event actions that guard reads back to decide something (recovery, status,
/// the boot): one spelling each, here. Events only written for the admin's eyes keep their
/// words where they are written.
enum JournalEvents {
    /// A rollback of a run that includes / or /usr, left to the initramfs of the next boot (by
    /// `guard rollback`, or by a failed boot assessment). The only reason a boot merges a kept run.
    static let rollbackAtBoot = "rollback-at-boot"
    /// A rollback found impossible (an Invalid snapshot): never retried.
    static let rollbackImpossible = "rollback-impossible"
    /// A rollback decided and then not started (a busy mount, a merge that would not start, a
    /// guard that stopped before its first merge): its decision is taken back, the run is kept.
    static let rollbackNotStarted = "rollback-not-started"
    /// A guarded origin's table changed behind guard's back (lvm2, dmsetup): writes no longer
    /// reach the snapshot; the run is stale from then on.
    static let originBypassed = "origin-bypassed"

    /// Whether `events` hold a rollback scheduled for a boot (see `rollbackAtBoot`).
    static func scheduledForBoot(_ events: [EventRecord]) -> Bool {
        events.contains { $0.kind == .intent && $0.action == rollbackAtBoot }
    }
}
