import Foundation

/// A value behind a lock, usable from any thread (Synchronization.Mutex needs `sending`
/// results, which closures returning tuples of non-Sendable values are not).
public final class LockedValue<Value>: @unchecked Sendable {
    // @unchecked: `value` is only read or written while `lock` is held.
    private let lock = NSLock()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}
