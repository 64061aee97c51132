import BlockDevice
import DeviceMapper
import Foundation
import Snapshot
import Testing

/// What a user checks of a restored entry: kind, mode, owner, size, blocks (holes), mtime.
func statLine(_ path: String) throws -> String {
    try sh("stat -c '%F %a %u:%g %s %b %Y.%y' '\(path)' 2>/dev/null || echo 'missing \(path)'").trimmingWhitespace()
}

extension Kernel {
    /// Issue 10: guard diff and guard restore from a kept snapshot.
    @Suite("file-level diff and restore")
    struct FileRestoreKernelTests {
        /// The tutorial's volume with its database and index.html, a run kept after `steps`.
        func keptRun(_ lvm: LVMFixture, _ tool: GuardTool, steps: String, snapshot: String = "25M") throws -> Int {
            let recipe = try writeRecipe(
                """
                name: website-files
                volumes:
                  - device: \(lvm.device)
                    mount: \(lvm.mountPoint)
                    snapshot: { size: \(snapshot) }
                steps:
                \(steps)
                on_success: keep 1d
                on_failure: rollback
                """, in: lvm.scratch)
            let run = try tool("run", recipe)
            #expect(run.status == 0, "\(run.stderr)")
            let history = try #require(try tool.history())
            return try #require(history.first?["id"] as? Int)
        }

        @Test("the tutorial, file by file: diff lists the corrupted database and the new index.html; restore puts back only the database")
        func tutorialFileRestore() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let database = try sha256("\(lvm.mountPoint)/database")
            let badMigration =
                "nl -n rz -w 5 \(lvm.mountPoint)/database | cut -f1 | sed 's/^/id:/' > \(lvm.mountPoint)/database.new && mv \(lvm.mountPoint)/database.new \(lvm.mountPoint)/database"
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: bad migration
                        shell: \(badMigration)
                      - name: new front page
                        shell: "printf '<html>v2</html>\\\\n' > \(lvm.mountPoint)/index.html"
                    """)
            #expect(try sha256("\(lvm.mountPoint)/database") != database, "the migration corrupted the database")

            let diff = try tool("diff", "\(run)")
            #expect(diff.status == 0, "\(diff.stderr)")
            let lines = diff.stdout.split(separator: "\n").map(String.init)
            #expect(lines.count == 2, "exactly the two files changed: \(diff.stdout)")
            #expect(lines.contains { $0.hasPrefix("modified") && $0.contains("\(lvm.mountPoint)/database") }, "\(diff.stdout)")
            #expect(lines.contains { $0.hasPrefix("modified") && $0.contains("\(lvm.mountPoint)/index.html") }, "\(diff.stdout)")
            let json = try #require((try tool.json("diff", "\(run)") as? [String: Any])?["volumes"] as? [[String: Any]])
            let changes = try #require(json.first?["changes"] as? [[String: Any]])
            #expect(Set(changes.compactMap { $0["path"] as? String }) == ["database", "index.html"])
            let patch = try tool("diff", "\(run)", "index.html", "--patch")
            #expect(patch.stdout.contains("-<html>v1</html>") && patch.stdout.contains("+<html>v2</html>"), "\(patch.stdout)")
            #expect(try Mounts.current().filter { $0.target.contains("/views/") }.isEmpty, "the private view is unmounted after diff")

            let restore = try tool("restore", "\(run)", "database")
            #expect(restore.status == 0, "\(restore.stderr)")
            #expect(try sha256("\(lvm.mountPoint)/database") == database, "the database is back byte for byte")
            #expect(try String(contentsOfFile: "\(lvm.mountPoint)/index.html", encoding: .utf8) == "<html>v2</html>\n", "index.html keeps its new content")
            let after = try tool("diff", "\(run)")
            #expect(after.stdout.split(separator: "\n").count == 1 && after.stdout.contains("index.html"), "\(after.stdout)")

            // The journal has the restore: who, which paths, how much.
            let show = try #require(try tool.json("show", "\(run)") as? [String: Any])
            let restores = try #require(show["restores"] as? [[String: Any]])
            #expect(restores.count == 1)
            #expect(restores.first?["paths"] as? [String] == ["database"])
            #expect(restores.first?["status"] as? String == "done")
            #expect(restores.first?["bytes"] as? Int == Int(try sh("stat -c %s \(lvm.mountPoint)/database").trimmingWhitespace()))
            #expect(restores.first?["user"] as? String != nil)
            let text = try tool("show", "\(run)")
            #expect(text.stdout.contains("file restores:"), "\(text.stdout)")

            // The snapshot is still kept and commits cleanly afterwards.
            #expect(try tool("commit", "\(run)").status == 0)
            try expectNothingLeft(state: tool.stateDirectory)
        }

        @Test("a tree with an outside symlink, a hard-linked pair, a sparse 1 GiB file, an xattr and an ACL restores exactly")
        func treeRestoresExactly() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let tree = "\(lvm.mountPoint)/tree"
            try sh(
                """
                mkdir -p \(tree)/sub && cd \(tree) && ln -s /etc/passwd outside && echo pair > a && ln a sub/b \
                && truncate -s 1G sparse && printf start | dd of=sparse conv=notrunc status=none \
                && printf end | dd of=sparse bs=1 seek=$((1024*1024*1024-3)) conv=notrunc status=none \
                && echo attributes > tagged && setfattr -n user.guard -v kept tagged && setfacl -m u:daemon:r tagged \
                && chown 33:33 sub && chmod 0750 sub && chmod 0604 a && touch -d '2020-01-02 03:04:05' a sparse tagged sub && sync
                """)
            let entries = ["outside", "a", "sub", "sub/b", "sparse", "tagged"]
            // The sparse file: size and allocated blocks (holes) from stat, its data regions by checksum
            // (reading the whole GiB of holes would take minutes under emulation).
            func describe() throws -> String {
                try entries.map { try statLine("\(tree)/\($0)") }.joined(separator: "\n")
                    + "\n"
                    + sh(
                        "cd \(tree) && (readlink outside; stat -c '%i %h' a sub/b | sort -u | wc -l; sha256sum a tagged; head -c 8M sparse | sha256sum; tail -c 1M sparse | sha256sum; getfattr -d -m - tagged; getfacl -c tagged) 2>&1"
                    )
            }
            let before = try describe()
            #expect(try sh("stat -c %b \(tree)/sparse").trimmingWhitespace() != "2097152", "the 1 GiB file is sparse")
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: damage the tree
                        shell: "cd \(tree) && rm outside sub/b && echo changed > a && dd if=/dev/zero of=sparse bs=1M count=4 conv=notrunc status=none && setfattr -x user.guard tagged && setfacl -b tagged && chmod 0700 sub && echo new > created"
                    """)
            #expect(try describe() != before)

            let dry = try tool("restore", "\(run)", tree, "--dry-run")
            #expect(dry.status == 0, "\(dry.stderr)")
            #expect(dry.stdout.contains("would restore tree/sparse"), "\(dry.stdout)")
            #expect(try sh("cat \(tree)/a") == "changed\n", "a dry run touches nothing")

            let restore = try tool("restore", "\(run)", tree)
            #expect(restore.status == 0, "\(restore.stderr)")
            let after = try describe()
            #expect(after == before, "restored exactly:\nbefore:\n\(before)\nafter:\n\(after)")
            #expect(FileManager.default.fileExists(atPath: "\(tree)/created"), "created after the snapshot: kept without --delete")
            #expect(restore.stderr.contains("--delete"), "\(restore.stderr)")
            let delete = try tool("restore", "\(run)", tree, "--delete")
            #expect(delete.status == 0, "\(delete.stderr)")
            #expect(!FileManager.default.fileExists(atPath: "\(tree)/created"), "--delete removes it")
            #expect(try describe() == before)
            #expect(try tool("commit", "\(run)").status == 0)
        }

        @Test("names that are not UTF-8 (Latin-1 files, a directory, a symlink's target): diff shows each byte as \\xNN, restore takes that name, the bytes come back")
        func nonUTF8Names() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let m = lvm.mountPoint
            // Bash's $'...' writes the raw bytes: caf\xE9 (Latin-1 café), r\xE9pertoire/f\xFC, a link to target\xFF.
            try sh(
                """
                bash -c "printf v1 > \(m)/$'caf\\xe9' && mkdir \(m)/$'r\\xe9pertoire' && printf inner > \(m)/$'r\\xe9pertoire'/$'f\\xfc' && ln -s $'target\\xff' \(m)/link && sync"
                """)
            let listing =
                "cd \(m) && find . -print0 | sort -z | xargs -0 stat -c '%n %F %s %a' | od -c | sha256sum; cat $'caf\\xe9' $'r\\xe9pertoire'/$'f\\xfc'; readlink link | od -c"
            let before = try sh("bash -c \"\(listing)\"")
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: damage the names
                        shell: bash -c "printf v2 > \(m)/$'caf\\xe9' && rm -r \(m)/$'r\\xe9pertoire' && ln -sfn elsewhere \(m)/link"
                    """)
            #expect(try sh("bash -c \"\(listing)\"") != before)

            let diff = try tool("diff", "\(run)")
            #expect(diff.status == 0, "\(diff.stderr)")
            for line in ["modified", "deleted"] { #expect(diff.stdout.contains(line), "\(diff.stdout)") }
            #expect(diff.stdout.contains("\(m)/caf\\xE9"), "the Latin-1 name, byte by byte: \(diff.stdout)")
            #expect(diff.stdout.contains("\(m)/r\\xE9pertoire/f\\xFC"), "\(diff.stdout)")
            let json = try #require((try tool.json("diff", "\(run)") as? [String: Any])?["volumes"] as? [[String: Any]])
            let paths = Set(((json.first?["changes"] as? [[String: Any]]) ?? []).compactMap { $0["path"] as? String })
            #expect(paths == ["caf\\xE9", "link", "r\\xE9pertoire", "r\\xE9pertoire/f\\xFC"], "\(paths)")
            let patch = try tool("diff", "\(run)", "caf\\xE9", "--patch")
            #expect(patch.stdout.contains("-v1") && patch.stdout.contains("+v2"), "the patch of a file named in bytes: \(patch.stdout)")

            // Restored by the names diff printed, as an admin would paste them.
            let restore = try tool("restore", "\(run)", "\(m)/caf\\xE9", "r\\xE9pertoire", "link")
            #expect(restore.status == 0, "\(restore.stderr)")
            #expect(try sh("bash -c \"\(listing)\"") == before, "every name, size, mode, content and the link's target as before")
            #expect(try tool("diff", "\(run)").stdout.isEmpty)
            #expect(try tool("commit", "\(run)").status == 0)
        }

        @Test("escapes are refused and touch nothing: ../../etc/passwd, a path outside the volume, a symlink in the path")
        func escapesRefused() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            try sh("ln -s /etc \(lvm.mountPoint)/etc-link")
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: change
                        shell: "echo changed > \(lvm.mountPoint)/index.html"
                    """)
            let volume = try manifest(lvm.mountPoint)
            let passwd = try sha256("/etc/passwd")
            for (path, message) in [
                ("../../etc/passwd", "`..` is not allowed"), ("/etc/passwd", "is not on a volume of this run"),
                ("etc-link/passwd", "symlink"), ("\(lvm.mountPoint)/../x", "`..` is not allowed"),
            ] {
                let refused = try tool("restore", "\(run)", path)
                #expect(refused.status == 2 || refused.status == 3, "\(path): \(refused.status) \(refused.stderr)")
                #expect(refused.stderr.contains(message), "\(path): \(refused.stderr)")
            }
            #expect(try manifest(lvm.mountPoint) == volume, "the volume is untouched")
            #expect(try sha256("/etc/passwd") == passwd)
            let show = try #require(try tool.json("show", "\(run)") as? [String: Any])
            #expect((show["restores"] as? [[String: Any]])?.isEmpty == true, "a refused restore is not journaled: \(show["restores"] ?? "")")
            #expect(try tool("commit", "\(run)").status == 0)
        }

        @Test("a reader reading the file in a loop during the restore sees the old or the new content, never a mix")
        func restoreIsAtomicForReaders() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let file = "\(lvm.mountPoint)/data.bin"
            try sh("dd if=/dev/urandom of=\(file) bs=1M count=8 status=none && sync")
            let old = try sha256(file)
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: rewrite
                        shell: "dd if=/dev/urandom of=\(file) bs=1M count=8 conv=notrunc status=none"
                    """)
            let new = try sha256(file)
            let reader = lvm.scratch.path("reader.py")
            try """
            import hashlib, sys, time, os
            path, old, new, stop, started = sys.argv[1:6]
            counts = {"old": 0, "new": 0, "mixed": 0}
            # Reads until told to stop and until it has read the restored file 3 times.
            while not os.path.exists(stop) or counts["new"] < 3:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                counts["new" if digest == new else "old" if digest == old else "mixed"] += 1
                if not os.path.exists(started):
                    open(started, "w").close()
            print(counts["old"], counts["new"], counts["mixed"])
            """.write(toFile: reader, atomically: true, encoding: .utf8)
            let stop = lvm.scratch.path("stop")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            // Here "old" is the upgraded content and "new" the restored one.
            // It races nothing: the restore starts after the reader's first read, and the reader
            // stops only after it has read the restored file.
            let started = lvm.scratch.path("started")
            process.arguments = ["python3", reader, file, new, old, stop, started]
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            try waitUntilNow("the reader's first read") { FileManager.default.fileExists(atPath: started) }
            let restore = try tool("restore", "\(run)", file)
            #expect(restore.status == 0, "\(restore.stderr)")
            if restore.status != 0 { kill(process.processIdentifier, SIGKILL) }  // it would wait for the restored file
            _ = FileManager.default.createFile(atPath: stop, contents: nil)
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            let counts = output.split(separator: " ").compactMap { Int($0.trimmingWhitespace()) }
            #expect(counts.count == 3, "\(output)")
            #expect(counts.count == 3 && counts[2] == 0, "no read saw a mix (upgraded, restored, mixed = \(output))")
            #expect(counts.count == 3 && counts[0] > 0 && counts[1] > 0, "reads saw both before and after (\(output))")
            #expect(try sha256(file) == old)
            #expect(try tool("commit", "\(run)").status == 0)
        }

        @Test(
            "an SQLite database in WAL mode, changed after the run by a server that keeps it open: restore refuses while it writes, naming its pid; once it is gone the database comes back with its log as one instant (integrity_check ok, the pre-run row count)"
        )
        func sqliteDatabaseWithItsLog() async throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            let database = "\(lvm.mountPoint)/site.sqlite"
            let (ready, go, done, pidFile) = (lvm.scratch.path("ready"), lvm.scratch.path("go"), lvm.scratch.path("done"), lvm.scratch.path("server.pid"))
            // A server: 100 rows, all still in the write-ahead log (no checkpoint), then 50 more
            // when told to, and it keeps the database open, as a server does.
            let server = lvm.scratch.path("server.py")
            try """
            import os, sqlite3, sys, time
            database, ready, go, done, pid_file = sys.argv[1:6]
            open(pid_file, "w").write(str(os.getpid()))
            c = sqlite3.connect(database, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA wal_autocheckpoint=0")
            c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            c.executemany("INSERT INTO t (v) VALUES (?)", [("before-%d" % i,) for i in range(100)])
            open(ready, "w").close()
            while not os.path.exists(go): time.sleep(0.1)
            c.executemany("INSERT INTO t (v) VALUES (?)", [("after-%d" % i,) for i in range(50)])
            open(done, "w").close()
            time.sleep(600)
            """.write(toFile: server, atomically: true, encoding: .utf8)
            try startDetached(["/usr/bin/env", "python3", server, database, ready, go, done, pidFile])
            lvm.scratch.defer_ { _ = try? sh("kill -9 $(cat '\(pidFile)') 2>/dev/null; true") }
            try await waitUntil("the server's 100 rows", seconds: 120) { FileManager.default.fileExists(atPath: ready) }
            #expect(FileManager.default.fileExists(atPath: database + "-wal"), "the rows are in the write-ahead log")
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: nothing
                        shell: "true"
                    """)
            _ = FileManager.default.createFile(atPath: go, contents: nil)
            try await waitUntil("the server's 50 more rows", seconds: 120) { FileManager.default.fileExists(atPath: done) }
            let serverPID = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)

            let refused = try tool("restore", "\(run)", database)
            #expect(refused.status == 2, "\(refused.stdout) \(refused.stderr)")
            #expect(refused.stderr.contains("open for writing by pid \(serverPID) (") && refused.stderr.contains("nothing was touched"), "\(refused.stderr)")
            #expect(try sh("sqlite3 '\(database)' 'SELECT count(*) FROM t'").trimmingCharacters(in: .whitespacesAndNewlines) == "150", "the refusal touched nothing")

            // The server dies (its log and index stay, as after a crash); the restore goes through.
            try sh("kill -9 \(serverPID)")
            try await waitUntil("the server to exit", seconds: 60) { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(serverPID)/exe")) == nil }
            let restore = try tool("restore", "--json", "\(run)", database)
            #expect(restore.status == 0, "\(restore.stderr)")
            #expect(restore.stdout.contains("restore site.sqlite-wal"), "the log comes with the database: \(restore.stdout)")
            let check = try sh("sqlite3 '\(database)' 'PRAGMA integrity_check' 'SELECT count(*) FROM t' 'SELECT count(*) FROM t WHERE v LIKE \"after-%\"'")
            #expect(check.split(separator: "\n").map(String.init) == ["ok", "100", "0"], "integrity_check, rows, rows written after the run: \(check)")
            #expect(try tool("commit", "\(run)").status == 0)
        }

        @Test("an Invalid snapshot is refused by diff and restore with the reason")
        func invalidSnapshotRefused() throws {
            let lvm = try LVMFixture()
            let tool = GuardTool(stateDirectory: lvm.scratch.path("state"))
            try writeDatabase(at: lvm.mountPoint)
            let run = try keptRun(
                lvm, tool,
                steps: """
                      - name: small change
                        shell: "echo changed > \(lvm.mountPoint)/index.html"
                    """, snapshot: "4M")
            // More writes than the COW holds (4 MiB and its 32 MiB fuse reserve), after the run,
            // with no guard monitor to fuse it: the kernel invalidates the snapshot.
            try sh("dd if=/dev/urandom of=\(lvm.mountPoint)/big bs=1M count=48 oflag=direct status=none; sync")
            for refused in [try tool("diff", "\(run)"), try tool("restore", "\(run)", "index.html")] {
                #expect(refused.status == 3, "\(refused.stderr)")
                #expect(refused.stderr.contains("Invalid") && refused.stderr.contains("old data is gone"), "\(refused.stderr)")
            }
            #expect(try String(contentsOfFile: "\(lvm.mountPoint)/index.html", encoding: .utf8) == "changed\n")
            _ = try tool("commit", "\(run)")
        }
    }
}
