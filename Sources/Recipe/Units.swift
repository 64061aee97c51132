/// Sizes and durations as admins write them in recipes.
public enum Units {
    /// Parses a size: `25M`, `25MiB`, `1.5G`, `512K`, `100MB` (decimal), `4096B`.
    /// K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024 (as in lvm2); KB/MB/GB/TB powers of 1000.
    /// - Returns: bytes, or nil with the reason.
    public static func parseSize(_ text: String) -> Result<UInt64, UnitError> {
        let trimmed = text.trimmed
        guard !trimmed.isEmpty else { return .failure(UnitError("an empty size")) }
        let numberPart = trimmed.prefix { $0.isNumber || $0 == "." }
        let unit = trimmed.dropFirst(numberPart.count).trimmed.lowercased()
        guard let value = Double(numberPart), value >= 0 else {
            return .failure(UnitError("'\(trimmed)' is not a size", hint: "write a number and a unit, like 25M or 2G"))
        }
        let factors: [String: Double] = [
            "b": 1, "k": 1024, "kib": 1024, "m": Double(1 << 20), "mib": Double(1 << 20), "g": Double(1 << 30), "gib": Double(1 << 30),
            "t": Double(1 << 40), "tib": Double(1 << 40), "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
        ]
        if unit.isEmpty {
            return .failure(UnitError("the size '\(trimmed)' has no unit", hint: "did you mean \(numberPart)M? (units: K, M, G, T; B for bytes)"))
        }
        guard let factor = factors[unit] else {
            return .failure(UnitError("unknown size unit '\(unit)' in '\(trimmed)'", hint: "use K, M, G, T (powers of 1024), KB, MB, GB (powers of 1000) or B"))
        }
        let bytes = value * factor
        guard bytes < 1.8e19 else { return .failure(UnitError("the size '\(trimmed)' is too large")) }
        return .success(UInt64(bytes.rounded(.up)))
    }

    /// The longest duration a recipe or guard.conf may give, in seconds (100 years).
    public static let longestDuration: Double = 36500 * 86400

    /// The units a duration may use, in seconds: systemd's (systemd.time(7)), spelled in any
    /// case, except `M` (see `parseDuration`).
    static let durationUnits: [String: Double] = [
        "us": 1e-6, "usec": 1e-6, "µs": 1e-6,
        "ms": 1e-3, "msec": 1e-3,
        "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
        "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
        "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
        "d": 86400, "day": 86400, "days": 86400,
        "w": 604_800, "week": 604_800, "weeks": 604_800,
        "month": 2_629_800, "months": 2_629_800,  // 30.44 days, as systemd counts a month
        "y": 31_557_600, "year": 31_557_600, "years": 31_557_600,  // 365.25 days
    ]

    /// Parses a duration in systemd's syntax: `30s`, `10m`, `2h`, `1h 30min`, `2weeks`,
    /// `1month`, `500ms`. `M` alone is refused: systemd reads it as a month, guard's older
    /// recipes as a minute, so it must be written `min` or `month`.
    public static func parseDuration(_ text: String) -> Result<Duration, UnitError> {
        let trimmed = text.trimmed
        guard !trimmed.isEmpty else { return .failure(UnitError("an empty duration")) }
        if trimmed.allSatisfy({ $0.isNumber || $0 == "." }) {
            return .failure(UnitError("the duration '\(trimmed)' has no unit", hint: "did you mean \(trimmed)s or \(trimmed)min? (units: ms, s, min, h, d, w, month, y)"))
        }
        var total: Double = 0
        var rest = Substring(trimmed)
        while true {
            rest = rest.drop { $0.isWhitespace }
            if rest.isEmpty { break }
            let number = rest.prefix { $0.isNumber || $0 == "." }
            rest = rest.dropFirst(number.count).drop { $0.isWhitespace }
            let unit = String(rest.prefix { $0.isLetter })
            rest = rest.dropFirst(unit.count)
            guard let value = Double(number) else {
                return .failure(UnitError("'\(trimmed)' is not a duration", hint: "write it like 30s, 10min, 2h or 1h 30min"))
            }
            if unit.isEmpty {
                return .failure(UnitError("'\(number)' in '\(trimmed)' has no unit", hint: "units: ms, s, min, h, d, w, month, y"))
            }
            if unit == "M" {
                return .failure(
                    UnitError(
                        "the unit 'M' in '\(trimmed)' is ambiguous: systemd reads it as a month, guard used to read it as a minute",
                        hint: "write \(number)min for minutes or \(number)month for months"))
            }
            guard let size = Self.durationUnits[unit.lowercased()] else {
                return .failure(UnitError("unknown duration unit '\(unit)' in '\(trimmed)'", hint: "use ms, s, min, h, d, w, month or y"))
            }
            total += value * size
        }
        // Durations are timeouts and keep times: anything past a century is a typo, and would
        // not fit the milliseconds guard counts in.
        guard total.isFinite, total <= Self.longestDuration else {
            return .failure(UnitError("the duration '\(trimmed)' is too long", hint: "at most 100 years (36500d)"))
        }
        return .success(.milliseconds(Int64((total * 1000).rounded())))
    }

    /// Parses a percentage `80%` (returns 80).
    public static func parsePercent(_ text: String) -> Double? {
        let trimmed = text.trimmed
        guard trimmed.hasSuffix("%"), let value = Double(trimmed.dropLast().trimmed), value > 0, value <= 100 else { return nil }
        return value
    }

    /// Parses a snapshot or growth size as recipes and guard.conf write it: `25M`, `20%`, `auto`.
    /// - Parameter context: what is being parsed, as the messages name it (`volumes[1].snapshot.size`).
    public static func parseSizeSpec(_ text: String, context: String, allowPercent: Bool, allowAuto: Bool) -> Result<SizeSpec, UnitError> {
        let trimmed = text.trimmed
        if trimmed.lowercased() == "auto" {
            return allowAuto ? .success(.auto) : .failure(UnitError("\(context) cannot be 'auto'"))
        }
        if trimmed.hasSuffix("%") {
            guard allowPercent else { return .failure(UnitError("\(context) cannot be a percentage")) }
            guard let percent = parsePercent(trimmed) else {
                return .failure(UnitError("\(context): '\(trimmed)' is not a percentage between 0 and 100"))
            }
            return .success(.percent(percent))
        }
        switch parseSize(trimmed) {
        case .success(let bytes):
            return bytes == 0 ? .failure(UnitError("\(context) must be larger than zero")) : .success(.bytes(bytes))
        case .failure(let failure):
            return .failure(UnitError("\(context): \(failure.message)", hint: failure.hint))
        }
    }

    /// The fill that triggers a COW's growth (`at: 80%`), as a fraction: 10% to 99%, else nil.
    public static func parseGrowthThreshold(_ text: String) -> Double? {
        guard let percent = parsePercent(text), percent >= 10, percent < 100 else { return nil }
        return percent / 100
    }

    /// "1h30m", "10m", "45s", "250ms".
    public static func formatDuration(_ duration: Duration) -> String {
        let totalMilliseconds = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
        if totalMilliseconds < 1000 { return "\(totalMilliseconds)ms" }
        var seconds = totalMilliseconds / 1000
        var parts: [String] = []
        for (unit, size) in [("d", Int64(86400)), ("h", 3600), ("m", 60)] where seconds >= size {
            parts.append("\(seconds / size)\(unit)")
            seconds %= size
        }
        if seconds > 0 || parts.isEmpty { parts.append("\(seconds)s") }
        return parts.joined()
    }
}

/// Why a size or duration did not parse, and how to fix it.
public struct UnitError: Error, Hashable, Sendable {
    public var message: String
    public var hint: String?
    init(_ message: String, hint: String? = nil) {
        self.message = message
        self.hint = hint
    }
}

extension StringProtocol {
    var trimmed: String {
        var slice = Substring(self)
        while let first = slice.first, first.isWhitespace { slice.removeFirst() }
        while let last = slice.last, last.isWhitespace { slice.removeLast() }
        return String(slice)
    }
}
