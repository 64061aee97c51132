import ArgumentParser
import BlockDevice
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
                  guard monitor --metrics-textfile /var/lib/prometheus/node-exporter
                  journalctl -u guard-monitor   # what it did
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "Read every kept snapshot once, act on what that finds, and exit.")
        var once = false

        @Option(help: ArgumentHelp("Seconds between two readings of a COW (sooner when one fills fast).", valueName: "seconds"))
        var interval: Double = 1

        @Option(
            help: ArgumentHelp(
                "Write DIR/guard.prom (as `guard metrics --textfile DIR`) every minute while DIR exists; guard-monitor.service names node_exporter's /var/lib/prometheus/node-exporter.",
                valueName: "dir"))
        var metricsTextfile: String?

        func run() async throws {
            guard interval >= 0.05, interval <= 60 else {
                throw GuardFailure(.refused, "--interval must be between 0.05 and 60 seconds, not \(interval)")
            }
            let context = try global.context()
            let stop = StopFlag()
            let signals = InterruptHandler(message: nil) { stop.set("signal") }
            defer { signals.cancel() }
            let monitor = KeptRunMonitor(context: context)
            if let directory = metricsTextfile {
                // Quietly skipped while the directory is not there (node_exporter not installed
                // yet); a failure to write is logged once per kind, never stops the watching.
                var lastFailure: String?
                monitor.periodic = (
                    .seconds(60),
                    {
                        guard FileManager.default.fileExists(atPath: directory) else { return }
                        do {
                            try MetricsCommand.writeAtomically(try Metrics.collect(context: context).text(), to: "\(directory)/guard.prom")
                            lastFailure = nil
                        } catch {
                            let text = "\(error)"
                            if text != lastFailure { context.reporter.log("guard monitor: the metrics in \(directory) were not written: \(text)") }
                            lastFailure = text
                        }
                    }
                )
            }
            // Under guard-monitor.service (Type=notify, WatchdogSec=): ready once the loop turns,
            // and a watchdog ping at most every second from it; systemd restarts a monitor
            // whose loop stopped turning.
            let notifier = ServiceNotifier(environment: ProcessInfo.processInfo.environment)
            if notifier.socket != nil {
                let lastPing = LockedValue<ContinuousClock.Instant?>(nil)
                monitor.heartbeat = {
                    let due = lastPing.withLock { last -> Bool in
                        guard last.isDue(every: .seconds(1)) else { return false }
                        last = .now
                        return true
                    }
                    if due { notifier.notify("READY=1\nWATCHDOG=1") }
                }
            }
            try await monitor.run(interval: .milliseconds(Int64(interval * 1000)), once: once) { stop.value != nil }
        }
    }
}
