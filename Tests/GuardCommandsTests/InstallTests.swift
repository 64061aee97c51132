import Foundation
import Testing

/// The package's root directory (Scripts/, Docs/).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

/// One (sub)command of `guard --experimental-dump-help`: its words after `guard`, its long option names.
struct CommandInfo {
    var words: [String]
    var longNames: [String]
    var abstract: String
}

/// Every command an admin can call, from the binary's own description of itself.
func commandTree() async throws -> [CommandInfo] {
    let dump = try await guardCommand(["--experimental-dump-help"])
    #expect(dump.status == 0, "\(dump.stderr)")
    let root = try #require((try JSONSerialization.jsonObject(with: Data(dump.stdout.utf8)) as? [String: Any])?["command"] as? [String: Any])
    var commands: [CommandInfo] = []
    func walk(_ node: [String: Any], _ words: [String]) {
        let name = node["commandName"] as? String ?? ""
        guard node["shouldDisplay"] as? Bool ?? true, name != "help" else { return }
        let path = words.isEmpty ? [] : words
        let arguments = node["arguments"] as? [[String: Any]] ?? []
        let longNames = arguments.filter { $0["shouldDisplay"] as? Bool ?? true }.flatMap { argument in
            (argument["names"] as? [[String: Any]] ?? []).filter { ($0["kind"] as? String) == "long" }.compactMap { $0["name"] as? String }
        }
        commands.append(CommandInfo(words: path, longNames: longNames, abstract: node["abstract"] as? String ?? ""))
        for child in node["subcommands"] as? [[String: Any]] ?? [] {
            walk(child, path + [child["commandName"] as? String ?? ""])
        }
    }
    walk(root, [])
    return commands
}

/// Runs a script of the package with extra environment variables.
func script(_ name: String, _ environment: [String: String], arguments: [String] = []) async throws -> Output {
    try await runProgram("\(packageRoot)/Scripts/\(name)", arguments, environment: ProcessInfo.processInfo.environment.merging(environment) { $1 })
}

func filesUnder(_ root: String) -> Set<String> {
    var files: Set<String> = []
    let enumerator = FileManager.default.enumerator(atPath: root)
    while let relative = enumerator?.nextObject() as? String {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: "\(root)/\(relative)", isDirectory: &isDirectory), !isDirectory.boolValue {
            files.insert("/" + relative)
        }
    }
    return files
}

/// Docs/install.md's list of installed files, for PREFIX=/usr (so UNITDIR=/usr/lib/systemd/system) and /etc.
func documentedFiles(_ commands: [CommandInfo]) throws -> Set<String> {
    let doc = try String(contentsOfFile: "\(packageRoot)/Docs/install.md", encoding: .utf8)
    let table = try #require(doc.components(separatedBy: "<!-- installed-files -->").dropFirst().first?.components(separatedBy: "<!-- /installed-files -->").first)
    var documented: Set<String> = []
    for line in table.split(separator: "\n") where line.hasPrefix("| `$") {
        let path = String(line.dropFirst(3).prefix { $0 != "`" })
            .replacingOccurrences(of: "$PREFIX", with: "/usr").replacingOccurrences(of: "$UNITDIR", with: "/usr/lib/systemd/system")
            .replacingOccurrences(of: "$SYSCONFDIR", with: "/etc").replacingOccurrences(of: "$INITRAMFSDIR", with: "/usr/share/initramfs-tools")
            .replacingOccurrences(of: "$RULESDIR", with: "/usr/lib/udev/rules.d")
        if path.contains("<command>") {
            for command in commands where !command.words.isEmpty {
                documented.insert(path.replacingOccurrences(of: "<command>", with: command.words.joined(separator: "-")))
            }
        } else {
            documented.insert(path)
        }
    }
    return documented
}

/// Runs a command line and returns its standard output; records its failure.
func capture(_ arguments: [String]) async throws -> String {
    let output = try await runProgram("/usr/bin/env", arguments, environment: ProcessInfo.processInfo.environment)
    #expect(output.status == 0, "\(arguments.joined(separator: " ")) exited \(output.status): \(output.stderr)")
    return output.stdout
}

@Suite("Install")
struct InstallTests {
    @Test("Scripts/install into a DESTDIR puts exactly Docs/install.md's files in place; pages and completions cover every command and option; uninstall removes them")
    func installIntoDestdir() async throws {
        let built = URL(fileURLWithPath: guardExecutable).deletingLastPathComponent().path
        try #require(
            FileManager.default.isExecutableFile(atPath: "\(built)/generate-manual"),
            "\(built)/generate-manual is missing: Scripts/test builds it (swift build --product generate-manual)")
        let destdir = FileManager.default.temporaryDirectory.appendingPathComponent("guard-install-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: destdir) }
        let environment = ["PREFIX": "/usr", "DESTDIR": destdir, "GUARD_INSTALL_FROM": built, "UNITDIR": "", "SYSCONFDIR": ""]
        let install = try await script("install", environment)
        try #require(install.status == 0, "\(install.stderr)")

        // The documented list, with PREFIX=/usr (so UNITDIR=/usr/lib/systemd/system) and /etc.
        let commands = try await commandTree()
        #expect(commands.contains { $0.words == ["volume", "create"] } && commands.contains { $0.words == ["run"] })
        #expect(!commands.contains { $0.words.contains("__watchdog") || $0.words.contains("help") })
        let documented = try documentedFiles(commands)
        #expect(documented.count >= 10)
        let installed = filesUnder(destdir)
        #expect(installed.subtracting(documented).isEmpty, "installed but not in Docs/install.md: \(installed.subtracting(documented).sorted())")
        #expect(documented.subtracting(installed).isEmpty, "in Docs/install.md but not installed: \(documented.subtracting(installed).sorted())")

        // Pages and completions come from the binary: every command, every option, every abstract.
        let man = "\(destdir)/usr/share/man/man8"
        let bash = try String(contentsOfFile: "\(destdir)/usr/share/bash-completion/completions/guard", encoding: .utf8)
        let zsh = try String(contentsOfFile: "\(destdir)/usr/share/zsh/site-functions/_guard", encoding: .utf8)
        let fish = try String(contentsOfFile: "\(destdir)/usr/share/fish/vendor_completions.d/guard.fish", encoding: .utf8)
        for command in commands {
            let name = (["guard"] + command.words).joined(separator: "-")
            let page = try String(contentsOfFile: "\(man)/\(name).8", encoding: .utf8)
            #expect(page.contains(".Dt \(name.uppercased()) 8"), "\(name).8 is titled after its file")
            let abstract = String(command.abstract.prefix(50))
            #expect(page.contains(abstract), "\(name).8 lacks the command's abstract '\(abstract)'")
            #expect(page.contains("Examples:"), "\(name).8 (the command's help) has no examples")
            let exitStatus = page.components(separatedBy: ".Sh \"EXIT STATUS\"").dropFirst().first ?? ""
            #expect(
                ["0", "1", "2", "3", "4", "75"].allSatisfy { exitStatus.contains(".It \($0)\n") } && !exitStatus.contains(".Ex -std"), "\(name).8's EXIT STATUS lists guard's codes"
            )
            for option in command.longNames {
                #expect(page.contains("Fl -\(option)"), "\(name).8 lacks --\(option)")
                for (shell, text) in [("bash", bash), ("zsh", zsh), ("fish", fish)] {
                    #expect(text.contains(option), "the \(shell) completion lacks --\(option) of \(name)")
                }
            }
            if let last = command.words.last {
                for (shell, text) in [("bash", bash), ("zsh", zsh), ("fish", fish)] {
                    #expect(text.contains(last), "the \(shell) completion lacks the command \(last)")
                }
            }
            for reference in page.split(separator: "\n") where reference.hasPrefix(".Xr guard") {
                let parts = reference.split(separator: " ")
                let (target, section) = (parts[1], parts.count > 2 ? String(parts[2]) : "8")
                #expect(
                    FileManager.default.fileExists(atPath: "\(destdir)/usr/share/man/man\(section)/\(target).\(section)"),
                    "\(name).8 refers to \(target)(\(section)), which is not installed")
            }
        }
        // guard(8) also says which files and environment variables guard uses, and renders cleanly.
        let mainPage = try String(contentsOfFile: "\(man)/guard.8", encoding: .utf8)
        for expected in [".Sh ENVIRONMENT", ".Sh FILES", "Ev GUARD_STATE_DIR", "Pa /var/lib/guard/journal.sqlite", ".Xr guard.recipe 5 ,", ".Xr lvm 8 ,"] {
            #expect(mainPage.contains(expected), "guard.8 lacks \(expected)")
        }
        let sections = mainPage.split(separator: "\n").filter { $0.hasPrefix(".Sh ") }.map(String.init)
        #expect(sections.firstIndex(of: ".Sh FILES").map { $0 < (sections.firstIndex(of: ".Sh \"EXIT STATUS\"") ?? 0) } == true, "mdoc's order: \(sections)")
        let renderedMain = try await runProgram(
            "/usr/bin/man", ["--warnings", "-l", "\(man)/guard.8"], environment: ["LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"])
        #expect(renderedMain.status == 0 && renderedMain.stderr.isEmpty && renderedMain.stdout.contains("/etc/guard/held/"), "guard.8: \(renderedMain.stderr)")
        // Completion: run arguments ask guard for the journal's runs, recipe arguments offer .recipe files.
        #expect(bash.contains("recipe") && zsh.contains("*.recipe") && fish.contains("recipe"), "recipe files are completed")
        #expect(bash.contains("---completion") && zsh.contains("---completion") && fish.contains("---completion"), "run numbers are completed from the journal")
        // guard.recipe(5) and guard.conf(5) come from Docs/: every key of their tables is in them,
        // and man renders them without a warning.
        let recipesDoc = try String(contentsOfFile: "\(packageRoot)/Docs/recipes.md", encoding: .utf8)
        let guideDoc = try String(contentsOfFile: "\(packageRoot)/Docs/guide.md", encoding: .utf8)
        let configurationDoc = guideDoc.components(separatedBy: "## Configuration: /etc/guard/guard.conf").dropFirst().first?.components(separatedBy: "\n## ").first ?? ""
        for (page, doc) in [("guard.recipe.5", recipesDoc), ("guard.conf.5", configurationDoc)] {
            let text = try String(contentsOfFile: "\(destdir)/usr/share/man/man5/\(page)", encoding: .utf8)
            let keys = doc.split(separator: "\n").filter { $0.hasPrefix("| `") }.map { String($0.dropFirst(3).prefix { $0 != "`" }) }
            #expect(keys.count >= 4, "\(page): the doc's tables")
            for key in keys {
                #expect(text.contains("\\fB\(key.replacingOccurrences(of: "-", with: "\\-"))\\fR"), "\(page) lacks `\(key)` of its doc")
            }
            let rendered = try await runProgram(
                "/usr/bin/man", ["--warnings", "-l", "\(destdir)/usr/share/man/man5/\(page)"], environment: ["LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"])
            #expect(rendered.status == 0 && rendered.stderr.isEmpty && rendered.stdout.contains("SEE ALSO"), "\(page): \(rendered.stderr)")
        }
        let installedConfig = try String(contentsOfFile: "\(destdir)/etc/guard/guard.conf", encoding: .utf8)
        #expect(installedConfig == (try String(contentsOfFile: "\(packageRoot)/Config/guard.conf", encoding: .utf8)))
        let shipped = try await guardCommand(["config", "--json", "--config", "\(destdir)/etc/guard/guard.conf"], environment: ["GUARD_STATE_DIR": ""])
        #expect(shipped.status == 0 && shipped.stdout.contains("\"/var/lib/guard\""), "the shipped guard.conf parses to the built-in defaults: \(shipped.stderr)")

        // A second install keeps an edited configuration; uninstall removes everything else.
        try (installedConfig + "keep = 3d\n").write(toFile: "\(destdir)/etc/guard/guard.conf", atomically: true, encoding: .utf8)
        #expect(try await script("install", environment).status == 0)
        #expect(try String(contentsOfFile: "\(destdir)/etc/guard/guard.conf", encoding: .utf8).hasSuffix("keep = 3d\n"))
        let uninstall = try await script("uninstall", environment)
        #expect(uninstall.status == 0, "\(uninstall.stderr)")
        #expect(filesUnder(destdir) == ["/etc/guard/guard.conf"], "left behind: \(filesUnder(destdir).sorted())")
        #expect(uninstall.stderr.contains("kept \(destdir)/etc/guard/guard.conf: it was edited"))
    }

    @Test("Scripts/package-deb builds a package with the same files (man pages compressed), guard.conf as a conffile, and the binary's version")
    func debianPackage() async throws {
        let built = URL(fileURLWithPath: guardExecutable).deletingLastPathComponent().path
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("guard-deb-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: out) }
        let result = try await script("package-deb", ["GUARD_INSTALL_FROM": built, "DESTDIR": "", "PREFIX": ""], arguments: [out])
        try #require(result.status == 0, "\(result.stderr)")
        let version = try await guardCommand(["--version"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let arch = try await capture(["dpkg", "--print-architecture"]).trimmingCharacters(in: .whitespacesAndNewlines)
        let deb = "\(out)/guard_\(version)_\(arch).deb"
        #expect(try await capture(["dpkg-deb", "-f", deb, "Package", "Version"]) == "Package: guard\nVersion: \(version)\n")
        let listed = Set(
            try await capture(["dpkg-deb", "-c", deb]).split(separator: "\n").compactMap { line -> String? in
                guard line.hasPrefix("-") else { return nil }
                return String(line.split(separator: " ", omittingEmptySubsequences: true).last!.dropFirst())
            })
        let expected = Set(try documentedFiles(try await commandTree()).map { $0.hasSuffix(".8") || $0.hasSuffix(".5") ? $0 + ".gz" : $0 })
        let docs = "/usr/share/doc/guard/"
        let overrides = "/usr/share/lintian/overrides/guard"
        #expect(listed.contains(overrides), "the package carries its lintian overrides")
        let programFiles = listed.filter { !$0.hasPrefix(docs) && $0 != overrides }
        #expect(programFiles == expected, "in the package only: \(programFiles.subtracting(expected).sorted()); missing: \(expected.subtracting(programFiles).sorted())")
        // The documentation: copyright, changelog, the docs (compressed above 4 KiB), the recipes as examples, the JSON schemas.
        var wantedDocs: Set<String> = ["copyright", "changelog.gz", "README.md", "README.md.gz"]
        for file in try FileManager.default.contentsOfDirectory(atPath: "\(packageRoot)/Docs") where file.hasSuffix(".md") || file.hasSuffix(".json") {
            wantedDocs.formUnion([file, file + ".gz"])
        }
        let recipes = try FileManager.default.contentsOfDirectory(atPath: "\(packageRoot)/Recipes")
        let docFiles = Set(listed.filter { $0.hasPrefix(docs) }.map { String($0.dropFirst(docs.count)) })
        #expect(docFiles.filter { !$0.hasPrefix("examples/") && !$0.hasPrefix("schema/") }.isSubset(of: wantedDocs), "\(docFiles.sorted())")
        let schemas = try FileManager.default.contentsOfDirectory(atPath: "\(packageRoot)/Docs/schema").filter { $0.hasSuffix(".schema.json") }
        #expect(
            Set(docFiles.filter { $0.hasPrefix("schema/") }.map { String($0.dropFirst("schema/".count)) }) == Set(schemas + ["input/recipe.schema.json"]),
            "the --json schemas and the recipe schema the examples name, uncompressed")
        #expect(
            listed.contains("/usr/share/guard/monitoring/guard.rules.yml") && listed.contains("/usr/share/guard/monitoring/guard-dashboard.json"), "the alert rules and dashboard")
        #expect(docFiles.contains("copyright") && docFiles.contains("changelog.gz") && docFiles.contains { $0.hasPrefix("guide.md") })
        #expect(Set(docFiles.filter { $0.hasPrefix("examples/") }.map { String($0.dropFirst("examples/".count)) }) == Set(recipes))

        let control = FileManager.default.temporaryDirectory.appendingPathComponent("guard-deb-control-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: control) }
        _ = try await capture(["dpkg-deb", "-e", deb, control])
        #expect(try String(contentsOfFile: "\(control)/conffiles", encoding: .utf8) == "/etc/guard/guard.conf\n")
        // Depends from dpkg-shlibdeps: versioned libraries, the programs guard runs.
        let depends = try await capture(["dpkg-deb", "-f", deb, "Depends"])
        for library in ["libc6 (>= ", "libdevmapper1.02.1 (>= ", "libmount1 (>= ", "libsqlite3-0 (>= ", "e2fsprogs"] {
            #expect(depends.contains(library), "Depends lacks \(library): \(depends)")
        }
        // The postinst enables the boot unit (and the timer and the monitor) as dh_installsystemd does.
        let postinst = try String(contentsOfFile: "\(control)/postinst", encoding: .utf8)
        #expect(
            postinst.contains("deb-systemd-helper enable \"$unit\"") && postinst.contains("for unit in guard-reassemble.service guard-maintenance.timer guard-monitor.service"),
            "\(postinst)")
        #expect(try String(contentsOfFile: "\(control)/postrm", encoding: .utf8).contains("deb-systemd-helper purge"))

        // md5sums hold for every file but the conffile; the binaries are stripped.
        let data = FileManager.default.temporaryDirectory.appendingPathComponent("guard-deb-data-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: data) }
        _ = try await capture(["dpkg-deb", "-x", deb, data])
        let sums = try String(contentsOfFile: "\(control)/md5sums", encoding: .utf8).split(separator: "\n")
        #expect(sums.count == listed.count - 1, "one line per file but guard.conf: \(sums.count) of \(listed.count)")
        _ = try await capture(["sh", "-c", "cd \(data) && md5sum --quiet -c \(control)/md5sums"])
        for binary in ["usr/sbin/guard", "usr/lib/guard/guard-watchdog"] {
            let sections = try await capture(["readelf", "-S", "--wide", "\(data)/\(binary)"])
            #expect(!sections.contains(".symtab"), "\(binary) is not stripped")
        }
        let stripped = try await runProgram("\(data)/usr/sbin/guard", ["--version"], environment: [:])
        #expect(stripped.status == 0 && stripped.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == version, "the stripped binary runs: \(stripped.stderr)")

        // lintian: no errors; each warning is one Docs/install.md explains.
        let lintian = try await runProgram("/usr/bin/lintian", ["--no-tag-display-limit", deb], environment: ProcessInfo.processInfo.environment)
        // The test packages the debug build, which finds the Swift runtime in the toolchain
        // (RUNPATH /opt/swift/...); the release build links it in and has no such tag.
        let tags = lintian.stdout.split(separator: "\n").filter { $0.hasPrefix("E: ") || $0.hasPrefix("W: ") }
            .filter { !($0.contains("custom-library-search-path") && $0.contains("/swift/")) }
        #expect(!tags.contains { $0.hasPrefix("E: ") }, "lintian errors:\n\(tags.joined(separator: "\n"))")
        let install = try String(contentsOfFile: "\(packageRoot)/Docs/install.md", encoding: .utf8)
        let explained = install.components(separatedBy: "<!-- lintian-warnings -->").dropFirst().first?.components(separatedBy: "<!-- /lintian-warnings -->").first ?? ""
        for tag in tags where tag.hasPrefix("W: ") {
            let name = tag.split(separator: " ").dropFirst(2).first.map(String.init) ?? ""
            #expect(explained.contains("`\(name)`"), "lintian warns \(tag), which Docs/install.md does not explain")
        }
    }
}

/// Issue 40: guard's generator orders the late reassembly between the state directory's
/// filesystem and every other local one, and writes nothing when the state is on the root.
@Test(
    "guard-generator: with /var and /var/lib/guard of their own, guard-reassemble-late.service requires them and every other local fstab filesystem waits for it; with the state on / it writes nothing"
)
func generatorOrdersTheLateReassembly() async throws {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("guard-generator-\(UInt32.random(in: 0...UInt32.max))").path
    defer { try? FileManager.default.removeItem(atPath: root) }
    try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    let fstab = """
        /dev/mapper/vg-root / ext4 errors=remount-ro 0 1
        /dev/mapper/vg-var /var ext4 defaults 0 2
        /dev/mapper/vg-state /var/lib/guard ext4 defaults 0 2
        /dev/mapper/vg-www /srv/www ext4 defaults 0 2
        /dev/mapper/vg-log /var/log ext4 defaults 0 2
        server:/export /mnt/nfs nfs defaults 0 0
        /dev/mapper/vg-iscsi /mnt/iscsi ext4 _netdev 0 0
        tmpfs /tmp tmpfs defaults 0 0
        /dev/mapper/vg-swap none swap sw 0 0

        """
    try fstab.write(toFile: "\(root)/fstab", atomically: true, encoding: .utf8)
    try "/dev/root / ext4 defaults 0 1\n/dev/data /srv ext4 defaults 0 2\n".write(toFile: "\(root)/fstab-root", atomically: true, encoding: .utf8)
    let generator = "\(packageRoot)/Units/guard-generator"
    let run = try await runProgram(
        generator, ["\(root)/out"], environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GUARD_GENERATOR_FSTAB": "\(root)/fstab", "GUARD_GENERATOR_CONF": "/dev/null"])
    #expect(run.status == 0, "\(run.stderr)")
    #expect(
        filesUnder("\(root)/out") == [
            "/guard-reassemble-late.service.d/guard.conf", "/srv-www.mount.d/guard.conf", "/var-log.mount.d/guard.conf",
            "/systemd-fsck@dev-mapper-vg\\x2dwww.service.d/guard.conf", "/systemd-fsck@dev-mapper-vg\\x2dlog.service.d/guard.conf",
        ])
    let late = try String(contentsOfFile: "\(root)/out/guard-reassemble-late.service.d/guard.conf", encoding: .utf8)
    #expect(late.contains("RequiresMountsFor=/var/lib/guard /var/lib/guard/cow"), "\(late)")
    let www = try String(contentsOfFile: "\(root)/out/srv-www.mount.d/guard.conf", encoding: .utf8)
    #expect(www.contains("After=guard-reassemble-late.service") && www.contains("Wants=guard-reassemble-late.service"))
    let onRoot = try await runProgram(
        generator, ["\(root)/out-root"], environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GUARD_GENERATOR_FSTAB": "\(root)/fstab-root", "GUARD_GENERATOR_CONF": "/dev/null"])
    #expect(onRoot.status == 0 && !FileManager.default.fileExists(atPath: "\(root)/out-root"), "the state directory on /: nothing to order")
}
