/// What the suspend-window watchdog does if guard dies or stalls inside a window: once any
/// device of `suspend` is suspended, it suspends the rest in that order (guard got that far),
/// resumes `resume` in order, then removes `remove` (layers that must never be live again).
/// When none of them is suspended the window never began, and it touches nothing.
public struct WatchdogPlan: Hashable, Sendable {
    public var suspend: [DeviceRef]
    public var resume: [DeviceRef]
    public var remove: [DeviceRef]

    public init(suspend: [DeviceRef] = [], resume: [DeviceRef], remove: [DeviceRef] = []) {
        self.suspend = suspend
        self.resume = resume
        self.remove = remove
    }
}
