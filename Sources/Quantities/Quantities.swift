/// How guard writes sizes and fractions for people: one formatter for every module (the
/// recipe parser's messages, the engine's log, the commands' output), without Foundation.

extension Duration {
    /// The duration in seconds, with its fraction: 1.5 for one and a half seconds.
    public var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// "25 MiB", "1.5 GiB", "512 B": binary units, at most one decimal, no trailing ".0".
public func formatBytes(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : "\(oneDecimal(value)) \(units[unit])"
}

/// A number with at most one decimal and no trailing ".0": 12.34 -> "12.3", 20.0 -> "20".
public func oneDecimal(_ value: Double) -> String {
    let tenths = (value * 10).rounded()
    if tenths.truncatingRemainder(dividingBy: 10) == 0 { return "\(Int64(tenths / 10))" }
    return "\(Int64(tenths) / 10).\(abs(Int64(tenths) % 10))"
}
