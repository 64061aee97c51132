import BlockDevice
import Foundation
import Testing

/// ansible-core from PyPI, as Scripts/setup installs it.
let ansibleVenv = ProcessInfo.processInfo.environment["GUARD_ANSIBLE_VENV"] ?? "/opt/guard-test/ansible"

extension Kernel {
    /// Issue 21: the collection's rolling playbook drives real guard runs on several hosts
    /// (each an inventory host with a local connection, its own guard volume and state
    /// directory), stops at the first rollback and rolls back the hosts already upgraded.
    @Suite("the Ansible collection on real volumes")
    struct AnsibleKernelTests {
        struct Host {
            let name: String
            let device: String
            let mount: String
            let state: String
            let before: String
            var tool: GuardTool { GuardTool(stateDirectory: state, binary: plainGuardBinary) }
        }

        /// A guard volume with the tutorial's database, for one inventory host.
        func host(_ name: String, scratch: Scratch) throws -> Host {
            let volume = uniqueName("fleet\(name)")
            let mount = scratch.path("mnt-\(name)")
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
            let tool = GuardTool(stateDirectory: scratch.path("state-\(name)"), binary: plainGuardBinary)
            let created = try tool("volume", "create", volume, "--backing", scratch.path("\(name).img"), "--size", "32M")
            #expect(created.status == 0, "\(created.stderr)")
            let device = "/dev/mapper/\(volume)"
            scratch.defer_ {
                try? Mounts.unmount(mount)
                _ = try? tool("volume", "remove", volume)
            }
            try sh("mkfs.ext4 -q -F \(device)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            try writeDatabase(at: mount)
            return Host(name: name, device: device, mount: mount, state: tool.stateDirectory, before: try manifest(mount))
        }

        /// Runs the collection's rolling playbook over `hosts`, whose recipes are `bad` or
        /// good; returns ansible-playbook's result.
        func playbook(_ hosts: [Host], bad: Set<String>, scratch: Scratch, label: String, extra: [String]) throws -> CommandResult {
            let collections = scratch.path("collections-\(label)")
            try FileManager.default.createDirectory(atPath: "\(collections)/ansible_collections/guard", withIntermediateDirectories: true)
            try sh("cp -r '\(packageRoot)/ansible/guard' '\(collections)/ansible_collections/guard/guard'")
            var inventory = "[fleet]\n"
            for host in hosts {
                let recipe = try writeRecipe(
                    tutorialRecipe(device: host.device, mount: host.mount, bad: bad.contains(host.name), onSuccess: "keep 24h"),
                    in: scratch, name: "\(label)-\(host.name).recipe")
                inventory +=
                    "\(host.name) ansible_connection=local ansible_python_interpreter=/usr/bin/python3 guard_recipe=\(recipe) guard_state_dir=\(host.state) guard_binary=\(plainGuardBinary)\n"
            }
            let inventoryPath = scratch.path("\(label).ini")
            try inventory.write(toFile: inventoryPath, atomically: true, encoding: .utf8)
            var environment = guardEnvironment()
            environment["ANSIBLE_COLLECTIONS_PATH"] = collections
            environment["ANSIBLE_NOCOLOR"] = "1"
            environment["ANSIBLE_HOME"] = scratch.path("ansible-home")
            environment["ANSIBLE_LOCAL_TEMP"] = scratch.path("ansible-tmp")
            environment["ANSIBLE_REMOTE_TMP"] = scratch.path("ansible-tmp")
            environment["LC_ALL"] = "C.UTF-8"
            environment["ANSIBLE_PIPELINING"] = "1"  // no module file written per task: a 9p root makes every file cost
            environment["HOME"] = scratch.path("ansible-home")
            return try run(
                ["\(ansibleVenv)/bin/ansible-playbook", "-i", inventoryPath, "guard.guard.rolling_upgrade"] + extra, environment: environment)
        }

        @Test(
            "a bad upgrade on the second host stops the rollout: the first host's kept run is rolled back by the playbook, the third is never touched; a good rollout is committed at the end"
        )
        func rollingUpgrade() throws {
            #expect(FileManager.default.isExecutableFile(atPath: "\(ansibleVenv)/bin/ansible-playbook"), "no ansible-core in \(ansibleVenv): Scripts/setup installs it")
            let scratch = try Scratch()
            let hosts = try ["a", "b", "c"].map { try host($0, scratch: scratch) }

            let stopped = try playbook(hosts, bad: ["b"], scratch: scratch, label: "stop", extra: ["-e", "guard_serial=1"])
            #expect(stopped.status == 2, "ansible-playbook fails the run: \(stopped.stdout)\n\(stopped.stderr)")
            #expect(stopped.stdout.contains("Roll back the kept runs of the hosts already upgraded"), "\(stopped.stdout)")
            #expect(stopped.stdout.contains("guard rolled back the upgrade on b"), "\(stopped.stdout)")
            for host in hosts {
                #expect(try manifest(host.mount) == host.before, "host \(host.name): every file is as before the night")
            }
            let first = try #require(try hosts[0].tool.history())
            #expect(first.count == 1 && first.first?["outcome"] as? String == "rolled_back", "a's kept run was rolled back by the playbook: \(first)")
            let second = try #require(try hosts[1].tool.history())
            #expect(second.count == 1 && second.first?["outcome"] as? String == "rolled_back" && second.first?["exit_code"] as? Int == 1, "b rolled back by guard: \(second)")
            #expect(!FileManager.default.fileExists(atPath: hosts[2].state + "/journal.sqlite"), "c's batch never started: guard never ran there")
            for host in hosts { try expectNothingLeft(state: host.state) }

            // A good rollout is committed once every batch has passed (one host: under emulation
            // each ansible-playbook costs tens of seconds of Python start-up alone).
            let good = [hosts[2]]
            let rollout = try playbook(good, bad: [], scratch: scratch, label: "good", extra: ["-e", "guard_commit_at_end=true"])
            #expect(rollout.status == 0, "\(rollout.stdout)\n\(rollout.stderr)")
            for host in good {
                let runs = try #require(try host.tool.history())
                #expect(runs.first?["outcome"] as? String == "committed", "host \(host.name): \(runs)")
                let firstRow = try String(contentsOfFile: "\(host.mount)/database", encoding: .utf8).prefix { $0 != "\n" }
                #expect(firstRow == "id:00001,user1,user1@example.com", "host \(host.name) is upgraded")
                try expectNothingLeft(state: host.state)
            }

            // Idempotence: the same recipe again with guard_skip_if_applied changes nothing; the
            // journal has the same runs, and the upgrade is not applied twice.
            let runsBefore = try #require(try good[0].tool.history()).count
            let again = try playbook(good, bad: [], scratch: scratch, label: "again", extra: ["-e", "guard_skip_if_applied=true"])
            #expect(again.status == 0 && again.stdout.contains("changed=0"), "\(again.stdout)\n\(again.stderr)")
            #expect(try #require(try good[0].tool.history()).count == runsBefore, "no new run")
        }
    }
}
