import BlockDevice
import DeviceMapper
import Foundation
import Journal
import Recipe
import Snapshot

/// guard's exit codes (documented in `guard help run` and Docs/guide.md).
public enum ExitCode: Int32, Sendable {
    /// The upgrade is applied (committed or kept), or the command did what was asked.
    case success = 0
    /// The upgrade failed and the volumes were restored to their state before the run.
    case failedRestored = 1
    /// Usage or recipe error, or a refusal in preflight: nothing was touched.
    case usage = 2
    /// Needs attention: something did not complete; the message says what to run.
    case attention = 3
    /// A snapshot that holds old blocks is not live (a reboot without reassembly, a late
    /// device or directory): everything is kept; the message names what to mount or activate
    /// before `guard recover`.
    case needsReassembly = 4
    /// Busy: another guard command holds a volume or the journal; nothing was touched, and the
    /// same command can be tried again later (EX_TEMPFAIL, as sysexits.h has it).
    case busy = 75
}

/// An error that ends a guard command: what kind of end it is, and the message for stderr.
/// GuardCommands alone turns the kind into an exit code (`ExitStatus`).
public struct GuardFailure: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// Refused before anything was touched: bad input, a preflight refusal, a lock held.
        case refused
        /// Something did not complete; the message says what to run.
        case attention
        /// A snapshot that holds old blocks is not live: everything is kept; the message names
        /// what to mount or activate before `guard recover`.
        case needsReassembly
        /// Refused before anything was touched because another guard command holds a volume
        /// or the journal: the same command can succeed later.
        case busy
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

/// Where guard keeps its state and how it reaches the kernel.
public final class GuardContext: @unchecked Sendable {
    // @unchecked: set up once before use; the lazily opened handles are only touched from
    // the command's own task.
    /// The state directory: journal.sqlite, cow/, locks/, volumes/, logs.
    public let stateDirectory: String
    public let udev: UdevMode
    /// "now", overridable for tests of keep durations (GUARD_NOW, seconds since 1970, honoured
    /// only by the test build: `TestHooks`).
    public let now: @Sendable () -> Date
    /// The guard executable, for the watchdog helper.
    public let executable: String
    public var reporter: any Reporter
    /// Site defaults (guard.conf): COW directory, keep duration, growth policy.
    public let configuration: GuardConfiguration
    private var journalHandle: Journal?
    private var deviceMapper: DeviceMapper?

    public init(
        stateDirectory: String, udev: UdevMode = .automatic, reporter: any Reporter, configuration: GuardConfiguration = GuardConfiguration(),
        now: (@Sendable () -> Date)? = nil, executable: String? = nil
    ) {
        self.stateDirectory = stateDirectory
        self.configuration = configuration
        self.udev = udev
        self.reporter = reporter
        if let now {
            self.now = now
        } else if TestHooks.isEnabled, let fixed = ProcessInfo.processInfo.environment["GUARD_NOW"].flatMap(Double.init) {
            self.now = { Date(timeIntervalSince1970: fixed) }
        } else {
            self.now = { Date() }
        }
        self.executable = executable ?? ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
    }

    public var journalPath: String { "\(stateDirectory)/journal.sqlite" }
    /// Where COW files go when a recipe names no `cow:`: guard.conf's cow_dir, or cow/ in the state directory.
    public var cowDirectory: String { configuration.cowDirectory ?? "\(stateDirectory)/cow" }
    public var lockDirectory: String { "\(stateDirectory)/locks" }

    /// The journal, opened (and created) on first use.
    /// - Throws: `.usage` when the state directory or the journal could have been changed by
    ///   someone other than root: its rows drive what guard does as root (hooks, wipes).
    public func journal(check: Bool = false) throws -> Journal {
        if let journalHandle { return journalHandle }
        try requireTrustedState()
        do {
            let journal = try Journal.open(path: journalPath, check: check)
            journalHandle = journal
            return journal
        } catch let error as JournalError {
            throw GuardFailure(error.isBusy ? .busy : .refused, "\(error)")
        }
    }

    /// The journal if it exists, for read-only commands (history, show) that never need the kernel.
    public func existingJournal(check: Bool = false) throws -> Journal? {
        guard FileManager.default.fileExists(atPath: journalPath) else { return nil }
        return try journal(check: check)
    }

    /// Device-mapper, checked on first use: root, driver present.
    public func dm() throws -> DeviceMapper {
        if let deviceMapper { return deviceMapper }
        do {
            let dm = try DeviceMapper(udev: udev)
            deviceMapper = dm
            return dm
        } catch let error as DeviceMapperError {
            throw GuardFailure(.refused, "\(error)")
        }
    }

    /// A snapshot engine with the watchdog process and guard's log.
    public func engine(watchdog: Bool = true) throws -> SnapshotEngine {
        let reporter = self.reporter
        var engine = SnapshotEngine(dm: try dm(), log: { reporter.log($0) })
        engine.notice = { reporter.note($0) }
        if watchdog { engine.watchdog = ProcessWatchdog(executable: executable, log: { reporter.log($0) }) }
        return engine
    }

    /// Refuses state that someone other than root could have changed: the state directory, its
    /// locks/, the COW directory and the journal must be owned by root and not writable by
    /// group or others. What is missing is not checked (it is created 0700 by guard).
    public func requireTrustedState() throws {
        var problems = [(stateDirectory, "the state directory"), (lockDirectory, "the lock directory"), (cowDirectory, "the COW directory")]
            .compactMap { TrustedFiles.directoryProblem($0.0, what: $0.1) }
        if let problem = TrustedFiles.fileProblem(journalPath, what: "the journal") { problems.append(problem) }
        guard problems.isEmpty else {
            throw GuardFailure(
                .refused,
                problems.joined(separator: "; ")
                    + "; guard acts as root on what its state says, so it refuses state others could have changed (`chown root:root` it and `chmod go-w` it, or choose another --state-dir); nothing was touched"
            )
        }
    }

    /// Makes the state directory (0700) and its cow/ and locks/ subdirectories.
    ///
    /// A directory that /etc/fstab puts on a filesystem not mounted now is never created:
    /// created underneath the mount point, it would hide the real journal or COW files, and
    /// recovery would take their absence for a release.
    /// - Parameter creatingCowDirectory: false for `guard recover`, which never creates the COW
    ///   directory (a missing one means a filesystem is not there yet).
    public func prepareStateDirectory(creatingCowDirectory: Bool = true) throws {
        let directories = [stateDirectory, lockDirectory] + (creatingCowDirectory ? [cowDirectory] : [])
        for directory in directories + (creatingCowDirectory ? [] : [cowDirectory]) {
            if let late = Mounts.unmountedFileSystem(holding: directory) {
                throw GuardFailure(
                    .needsReassembly,
                    "\(directory) is on \(late), which /etc/fstab lists but is not mounted; mount \(late) (`mount \(late)`) and run the command again; nothing was touched")
            }
        }
        for directory in directories {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw GuardFailure(.refused, "cannot create the state directory \(directory): \(error.localizedDescription); choose another with --state-dir")
            }
        }
        if creatingCowDirectory { try? CowDirectoryMarker.place(in: cowDirectory) }
        // `guard recover` goes on without: reassembly from the COW labels only stacks devices,
        // and must not be stopped at boot; what the journal drives is refused when it is opened.
        if creatingCowDirectory { try requireTrustedState() }
    }

    public var hostName: String { ProcessInfo.processInfo.hostName }

    public var userName: String {
        // Who asked: the sudo user, else the login name, else the account of the real uid.
        if let sudo = ProcessInfo.processInfo.environment["SUDO_USER"], !sudo.isEmpty { return sudo }
        if let login = getlogin() { return String(cString: login) }
        if let account = getpwuid(getuid()) { return String(cString: account.pointee.pw_name) }
        return "uid \(getuid())"
    }
}
