#if canImport(Glibc)
import Glibc
#endif

/// guard's one in-memory lock: a value behind a pthread mutex, usable from any thread.
///
/// Not Synchronization.Mutex: its `withLock` needs `sending` results, which closures
/// returning tuples of non-Sendable values (or a libdevmapper call's result) are not. Not
/// NSLock: the layers below Engine do without Foundation. (File locks between processes are
/// another thing: `VolumeLock`.)
public final class LockedValue<Value>: @unchecked Sendable {
    // @unchecked: `value` is only read or written while `mutex` is held, and the mutex lives
    // in a heap allocation of its own for the object's lifetime (never moved).
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
