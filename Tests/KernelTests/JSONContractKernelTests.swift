import BlockDevice
import DeviceMapper
import Foundation
import Testing

extension Kernel {
    /// Issue 21: every command takes --json and prints one document, valid against its schema,
    /// whose facts are the files', the kernel's and the journal's.
    @Suite("the JSON contract on real volumes")
    struct JSONContractKernelTests {
        /// `guard <arguments> --json`, whatever its exit code: the document (validated) and the result.
        func document(_ tool: GuardTool, _ arguments: String..., schema: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> ([String: Any], CommandResult)
        {
            let result = try run([tool.binary] + arguments + ["--json", "--state-dir", tool.stateDirectory], environment: guardEnvironment().merging(tool.environment) { $1 })
            try expectValid(result.stdout, arguments: arguments, schema: schema, sourceLocation: sourceLocation)
            let parsed = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
            let object = try #require(parsed, "guard \(arguments) --json printed no object: \(result.stdout)\n\(result.stderr)", sourceLocation: sourceLocation)
            #expect(object["schema_version"] as? Int == 1, sourceLocation: sourceLocation)
            return (object, result)
        }

        func recipe(device: String, mount: String, bad: Bool, onSuccess: String) -> String {
            tutorialRecipe(device: device, mount: mount, bad: bad, onSuccess: onSuccess).replacingOccurrences(
                of: "steps:\n", with: "steps:\n  - name: say hello\n    shell: echo step-output-marker; echo step-error-marker >&2\n")
        }

        @Test(
            "volume create/list/activate/remove, check, run --dry-run, run (rolled back, kept), status, diff, restore, rollback, commit, recover and a refusal: each document matches its schema and the volume"
        )
        func everyCommand() throws {
            let scratch = try Scratch()
            let tool = GuardTool(stateDirectory: scratch.path("state"))
            let name = uniqueName("jsonsite")
            let device = "/dev/mapper/\(name)"
            let mount = scratch.path("site")
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
            scratch.defer_ {
                try? Mounts.unmount(mount)
                _ = try? tool("volume", "remove", name)
            }

            // Guard volumes.
            let (created, createResult) = try document(tool, "volume", "create", name, "--backing", scratch.path("site.img"), "--size", "64M")
            #expect(createResult.status == 0, "\(createResult.stderr)")
            let volume = try #require(created["volume"] as? [String: Any])
            let info = try #require(try DeviceMapper().info(.name(name)))
            #expect(volume["name"] as? String == name && volume["path"] as? String == device)
            #expect(volume["size_bytes"] as? Int == 64 << 20 && volume["active"] as? Bool == true)
            #expect(volume["device"] as? String == info.number.description, "the kernel's device number")
            let listed = try #require(try tool.json("volume", "list") as? [String: Any])
            #expect((listed["volumes"] as? [[String: Any]])?.map { $0["name"] as? String } == [name])
            #expect(listed["activated"] is NSNull)
            try sh("mkfs.ext4 -q -F \(device)")
            try Mounts.mount(source: device, target: mount, fileSystemType: "ext4")
            try writeDatabase(at: mount)
            let before = try manifest(mount)

            // check and the dry run: the plan resolved against the system, nothing touched.
            let bad = try writeRecipe(recipe(device: device, mount: mount, bad: true, onSuccess: "keep 24h"), in: scratch, name: "bad.recipe")
            let (plan, checkResult) = try document(tool, "check", bad)
            #expect(checkResult.status == 0, "\(checkResult.stderr)")
            #expect(plan["mode"] as? String == "check" && plan["valid"] as? Bool == true)
            let planned = try #require((plan["volumes"] as? [[String: Any]])?.first)
            #expect(planned["origin_path"] as? String == device && planned["device_number"] as? String == info.number.description)
            #expect(planned["snapshot_bytes"] as? Int == 25 << 20 && planned["origin_bytes"] as? Int == 64 << 20)
            #expect(planned["mounted_on"] as? [String] == [mount])
            let (dryRun, dryResult) = try document(tool, "run", "--dry-run", bad)
            #expect(dryResult.status == 0 && dryRun["mode"] as? String == "dry_run" && (dryRun["problems"] as? [Any])?.isEmpty == true, "\(dryResult.stderr)")
            #expect(try tool.history()?.isEmpty == true, "the dry run journaled nothing")

            // A rolled-back run: exit 1, its document on stdout, the steps' output on stderr.
            let (rolledBack, badResult) = try document(tool, "run", bad)
            #expect(badResult.status == 1, "\(badResult.stderr)")
            #expect(rolledBack["outcome"] as? String == "rolled_back" && rolledBack["exit_code"] as? Int == 1 && rolledBack["state"] as? String == "finished")
            #expect(badResult.stderr.contains("step-output-marker") && badResult.stderr.contains("step-error-marker"), "the steps' output streams to stderr: \(badResult.stderr)")
            #expect((rolledBack["steps"] as? [[String: Any]])?.first?["stdout_tail"] as? String == "step-output-marker\n", "and in the journal")
            #expect(try manifest(mount) == before, "the files are as before the run")

            // A kept run, then everything that reads it.
            let good = try writeRecipe(recipe(device: device, mount: mount, bad: false, onSuccess: "keep 24h"), in: scratch, name: "good.recipe")
            let (kept, goodResult) = try document(tool, "run", good)
            #expect(goodResult.status == 0, "\(goodResult.stderr)")
            #expect(kept["outcome"] as? String == "kept" && kept["state"] as? String == "kept" && kept["keep_until"] is String)
            let snapshot = try #require((kept["snapshots"] as? [[String: Any]])?.first)
            #expect(snapshot["state"] as? String == "live" && snapshot["size_bytes"] as? Int == 25 << 20)
            let keptID = try #require(kept["id"] as? Int)
            let migrated = try manifest(mount)
            let status = try #require(try tool.json("status") as? [String: Any])
            let live = try #require(((status["runs"] as? [[String: Any]])?.first?["volumes"] as? [[String: Any]])?.first)
            #expect(live["status"] as? String == "live" && (live["used_bytes"] as? Int ?? 0) > 0)
            let changes = try #require(((try tool.json("diff", "\(keptID)") as? [String: Any])?["volumes"] as? [[String: Any]])?.first?["changes"] as? [[String: Any]])
            #expect(changes.contains { $0["path"] as? String == "database" && $0["change"] as? String == "modified" }, "\(changes)")
            let restore = try #require(try tool.json("restore", "--dry-run", "\(keptID)", "\(mount)/database") as? [String: Any])
            #expect((restore["actions"] as? [String])?.isEmpty == false, "\(restore)")
            #expect(try manifest(mount) == migrated, "a dry-run restore changes nothing")

            // Its dry run: the rollback-plan document, nothing touched.
            let (rollbackPlan, planResult) = try document(tool, "rollback", "--dry-run", "\(keptID)", schema: "rollback-plan")
            #expect(planResult.status == 0 && rollbackPlan["run"] as? Int == keptID, "\(planResult.stderr)")
            #expect((rollbackPlan["volumes"] as? [[String: Any]])?.first?["unmounts"] as? [String] == [mount], "\(rollbackPlan)")
            #expect(try manifest(mount) == migrated, "a dry-run rollback changes nothing")

            // Rollback: the run afterwards, and the files as before it.
            let (afterRollback, rollbackResult) = try document(tool, "rollback", "--wait", "\(keptID)")
            #expect(rollbackResult.status == 0, "\(rollbackResult.stderr)")
            #expect(afterRollback["id"] as? Int == keptID && afterRollback["outcome"] as? String == "rolled_back")
            #expect((afterRollback["snapshots"] as? [[String: Any]])?.first?["state"] as? String == "merged")
            #expect(try manifest(mount) == before)

            // Commit a kept run; a second commit is refused with the error document.
            let (committedRun, _) = try document(tool, "run", good)
            let committedID = try #require(committedRun["id"] as? Int)
            let (committed, commitResult) = try document(tool, "commit", "\(committedID)")
            #expect(commitResult.status == 0 && committed["outcome"] as? String == "committed", "\(commitResult.stderr)")
            #expect(try manifest(mount) == migrated)
            let (refused, refusedResult) = try document(tool, "commit", "\(committedID)", schema: "error")
            let error = try #require(refused["error"] as? [String: Any])
            #expect(refusedResult.status == 2 && error["exit_code"] as? Int == 2 && error["kind"] as? String == "refused")
            #expect((error["message"] as? String).map { refusedResult.stderr.contains($0) } == true, "the same message on stderr: \(refusedResult.stderr)")
            let (recovered, recoverResult) = try document(tool, "recover")
            #expect(recoverResult.status == 0 && (recovered["problems"] as? [Any])?.isEmpty == true, "\(recoverResult.stderr)")
            try expectNothingLeft(state: tool.stateDirectory)

            // As after a reboot: the device is gone; activate brings it back, remove takes it away.
            try Mounts.unmount(mount)
            try sh("dmsetup remove \(name)")
            for loop in LoopDevice.find(backingFile: scratch.path("site.img")) { try loop.detach() }
            let activated = try #require(try tool.json("volume", "activate") as? [String: Any])
            #expect(activated["activated"] as? [String] == [name])
            #expect((activated["volumes"] as? [[String: Any]])?.first?["active"] as? Bool == true)
            #expect(try fsck(device))
            let (removed, removeResult) = try document(tool, "volume", "remove", name)
            #expect(removeResult.status == 0, "\(removeResult.stderr)")
            let gone = try #require(removed["volume"] as? [String: Any])
            #expect(gone["name"] as? String == name && gone["active"] as? Bool == false && gone["device"] is NSNull)
            #expect(try DeviceMapper().info(.name(name)) == nil, "the kernel has no such device")
        }
    }
}
