import ArgumentParser
import Engine
import Foundation
import Quantities
import Recipe

extension GuardCommand {
    struct Config: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "config",
            abstract: "Show the settings in effect and where each comes from (flag, variable, guard.conf, built-in).",
            discussion: """
                guard reads /etc/guard/guard.conf when it exists (or the file --config or GUARD_CONFIG names, which must exist). Its keys:
                  state_dir = /var/lib/guard         journal, locks, views, and COW files unless cow_dir
                  cow_dir   = /srv/guard-cow         COW files of volumes whose recipe names no `cow:`
                  keep      = 7d                     `on_success: keep` without a duration commits after this (default: forever)
                  extend    = at 80% by 10% max 50%  COW files grow so when the recipe has no `extend:` (default: none)
                --state-dir and GUARD_STATE_DIR win over state_dir; what a recipe says wins over cow_dir, keep and extend. A file with an error stops every command with exit 2, naming its line; only `guard recover` warns and goes on with the valid lines (a typo must not stop boot-time recovery).

                Examples:
                  guard config
                  guard config --config /etc/guard/test.conf --json
                """)

        @OptionGroup var global: GlobalOptions

        @Flag(help: "Print JSON (stable field names).")
        var json = false

        struct Setting: Encodable {
            var value: String?
            var source: String
        }

        struct Output: Encodable {
            var configFile: String?
            var configSource: String
            var stateDir: Setting
            var cowDir: Setting
            var keep: Setting
            var extend: Setting

            enum CodingKeys: String, CodingKey {
                case configFile = "config_file"
                case configSource = "config_source"
                case stateDir = "state_dir"
                case cowDir = "cow_dir"
                case keep, extend
            }
        }

        func run() throws {
            let settings = try global.settings()
            let file = settings.file
            let fromFile = file.path ?? "built-in default"
            let extend = file.extend.map { "at \(oneDecimal($0.at * 100))% by \($0.by) max \($0.max)" }
            let output = Output(
                configFile: file.path, configSource: settings.configurationSource,
                stateDir: Setting(value: settings.stateDirectory.value, source: settings.stateDirectory.source),
                cowDir: file.cowDirectory.map { Setting(value: $0, source: fromFile) }
                    ?? Setting(value: settings.stateDirectory.value + "/cow", source: "state_dir/cow"),
                keep: Setting(value: file.keep.map { Units.formatDuration($0) }, source: file.keep == nil ? "built-in default" : fromFile),
                extend: Setting(value: extend, source: extend == nil ? "built-in default" : fromFile))
            if json { return try printJSON(output) }
            say("config file: \(file.path ?? "none (\(GuardConfiguration.defaultPath) does not exist)")")
            say("state_dir: \(output.stateDir.value ?? "") (\(output.stateDir.source))")
            say("cow_dir:   \(output.cowDir.value ?? "") (\(output.cowDir.source))")
            say("keep:      \(output.keep.value ?? "forever") (\(output.keep.source))")
            say("extend:    \(output.extend.value ?? "none") (\(output.extend.source))")
        }
    }
}
