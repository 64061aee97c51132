import DeviceMapper
import Engine
import Files
import Journal
import Snapshot

/// The exit code and message of an error that ends a command: the one place where the
/// layers' typed errors become exit codes (Docs/guide.md, "Exit codes").
///
/// 2 promises that nothing was touched, so a kernel-layer error gets 2 only when it is a
/// refusal before any change (no device-mapper, not root, a COW that cannot be made); one
/// that may come after a change is 3 (the message says what to run), and a snapshot that
/// holds old blocks without being live is 4, as `guard status` says it.
enum ExitStatus {
    static func of(_ error: any Error) -> (code: ExitCode, message: String)? {
        switch error {
        case let failure as GuardFailure:
            switch failure.kind {
            case .refused: return (.usage, failure.message)
            case .attention: return (.attention, failure.message)
            case .needsReassembly: return (.needsReassembly, failure.message)
            case .busy: return (.busy, failure.message)
            }
        case let error as SnapshotError:
            if error.changedNothing { return (.usage, error.description) }
            switch error.code {
            case .needsReassembly:
                return (.needsReassembly, error.description)
            case .notAVolume, .alreadySnapshotted, .cowOnOrigin, .cowTooSmall, .notExtendable:
                return (.usage, error.description)
            default:
                return (.attention, error.description)
            }
        case let error as DeviceMapperError:
            switch error.code {
            case .permissionDenied, .driverMissing: return (.usage, error.description)
            default: return (.attention, error.description)
            }
        case let error as ThinCheckFailure:
            // Activation checks the metadata before the pool goes live, and takes the check's
            // own layers down when it fails: the pool stays as it was, inactive.
            return (.usage, error.description)
        case let error as FileTreeError:
            return (.attention, error.description)
        case let error as JournalError:
            return (error.isBusy ? .busy : .attention, error.description)
        default:
            return nil
        }
    }

    /// An error no layer mapped (a block device's, a spawn's, Foundation's): it may come after
    /// a change, so it is 3 with its own words, never 2 ("nothing was touched").
    static func unmapped(_ error: any Error) -> (code: ExitCode, message: String) {
        (.attention, "\(error); see `guard status`")
    }
}
