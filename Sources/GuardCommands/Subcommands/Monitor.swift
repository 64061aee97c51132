import ArgumentParser
import Engine
import Foundation

extension GuardCommand {
    struct Monitor: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "monitor",
            abstract: "Watch kept runs' snapshots: grow them, warn as they fill, and apply on_full before one can overflow.",
            discussion: """
                A kept snapshot takes the old blocks of every write to its volume for as long as it is kept, so a COW large enough for the night can fill up days later, and a full COW loses the rollback. guard monitor runs as a service (guard-monitor.service) and reads the COW use of every kept run's snapshot every second (sooner when it fills fast):

                - it grows a COW file by the recipe's extend policy, or guard.conf's extend when the recipe has none;
                - it warns in the system log when a snapshot is 50%, 75% and 90% full;
                - when one reaches the recipe's stop_at (90% by default) and cannot grow, it applies the recipe's on_full: fuse (the default: the volume refuses writes, as a failed disk would, until `guard rollback` or `guard commit`; the rollback stays possible), commit (the upgrade becomes final), or rollback (the run is rolled back now, its rollback hooks run).

                Every action is journaled (`guard show RUN` lists them) and holds the volume's lock, so it never overlaps another guard command. SIGTERM stops the monitor between two readings.

                Examples:
                  systemctl enable --now guard-monitor.service
                  guard monitor --once          # one pass over the kept runs (cron, tests)
                  journalctl -u guard-monitor   # what it did
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "Read every kept snapshot once, act on what that finds, and exit.")
        var once = false

        @Option(help: ArgumentHelp("Seconds between two readings of a COW (sooner when one fills fast).", valueName: "seconds"))
        var interval: Double = 1

        func run() async throws {
            guard interval >= 0.05, interval <= 60 else {
                throw GuardFailure(.refused, "--interval must be between 0.05 and 60 seconds, not \(interval)")
            }
            let context = try global.context()
            let stop = StopFlag()
            let signals = InterruptHandler(message: nil) { stop.set("signal") }
            defer { signals.cancel() }
            try await KeptRunMonitor(context: context).run(interval: .milliseconds(Int64(interval * 1000)), once: once) { stop.value != nil }
        }
    }
}
