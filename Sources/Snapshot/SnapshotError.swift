/// A refusal or failure of the snapshot engine, above the kernel calls.
///
/// The description says what was being done, on which volume, why it cannot be done and
/// what to do: `snapshot of /dev/mapper/vg-website refused: the COW file
/// /mnt/website/.guard/x.cow would live on the volume being snapshotted; put the state
/// directory on another filesystem (--state-dir)`.
public struct SnapshotError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: Hashable, Sendable {
            case originNotFound, notAVolume, alreadySnapshotted, cowOnOrigin, noSpace, cowTooSmall
            case invalidSnapshot, inUse, mergeInProgress, mergeFailed, notExtendable, layerMissing, labelMismatch, needsReassembly, stale, other
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        public static let originNotFound = Code(.originNotFound)
        /// Not an active device-mapper device (guard snapshots dm volumes: LVs and guard volumes).
        public static let notAVolume = Code(.notAVolume)
        public static let alreadySnapshotted = Code(.alreadySnapshotted)
        public static let cowOnOrigin = Code(.cowOnOrigin)
        public static let noSpace = Code(.noSpace)
        public static let cowTooSmall = Code(.cowTooSmall)
        /// The kernel invalidated the snapshot: its old data is gone, a rollback is impossible.
        public static let invalidSnapshot = Code(.invalidSnapshot)
        /// Mounted or open where it must not be.
        public static let inUse = Code(.inUse)
        public static let mergeInProgress = Code(.mergeInProgress)
        public static let mergeFailed = Code(.mergeFailed)
        public static let notExtendable = Code(.notExtendable)
        public static let layerMissing = Code(.layerMissing)
        public static let labelMismatch = Code(.labelMismatch)
        /// The COW's durable records say it holds old blocks of a snapshot that is not live:
        /// reassemble it (`guard recover` once its device or directory is there); nothing is removed.
        public static let needsReassembly = Code(.needsReassembly)
        /// The origin was written while its snapshot was not live: the snapshot no longer
        /// describes the origin's past. The COW is kept for the admin; nothing is merged.
        public static let stale = Code(.stale)
        public static let other = Code(.other)

        public var description: String { "\(value)" }
    }

    public var code: Code
    public var operation: String
    public var reason: String
    public var hint: String?
    /// Thrown by a check made before anything was changed (exit 2: "nothing was touched").
    /// False for every other error, which may come after a change (exit 3).
    public var changedNothing = false

    public init(_ code: Code, _ operation: String, _ reason: String, hint: String? = nil) {
        self.code = code
        self.operation = operation
        self.reason = reason
        self.hint = hint
    }

    /// A refusal by a check made before anything was changed.
    public static func refusal(_ code: Code = .other, _ operation: String, _ reason: String, hint: String? = nil) -> SnapshotError {
        var error = SnapshotError(code, operation, reason, hint: hint)
        error.changedNothing = true
        return error
    }

    public var description: String {
        "\(operation) refused: \(reason)" + (hint.map { "; \($0)" } ?? "")
    }
}
