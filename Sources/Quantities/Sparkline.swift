/// COW use over time as a terminal plot: one row of eighth blocks, scaled to the snapshot's
/// size, with the time axis below it.
///
///     COW use over time, █ = 25 MiB (the snapshot's size), peak 21 MiB (84%):
///       ▁▁▁▂▂▃▄▅▆▇▇███
///       0s           12.5s
public enum Sparkline {
    static let levels: [Character] = ["▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"]

    /// One column per time slice of `width` from the first sample's time to the last: the
    /// highest use in it, or the last one before it when no sample falls in it. A blank is
    /// nothing used; a full block is the size.
    public static func bars(_ samples: [(at: Double, used: UInt64)], scale: UInt64, width: Int) -> String {
        guard let first = samples.first, let last = samples.last, width > 0, scale > 0 else { return "" }
        let span = max(last.at - first.at, 0)
        let columns = span == 0 ? 1 : width
        var values = [UInt64?](repeating: nil, count: columns)
        for sample in samples {
            let column = span == 0 ? 0 : min(columns - 1, Int((sample.at - first.at) / span * Double(columns)))
            values[column] = max(values[column] ?? 0, sample.used)
        }
        var carried: UInt64 = 0
        var text = ""
        for value in values {
            let used = value ?? carried
            carried = used
            if used == 0 {
                text.append(" ")
            } else {
                let eighths = Int((Double(min(used, scale)) / Double(scale) * 8).rounded(.up))
                text.append(levels[max(0, min(7, eighths - 1))])
            }
        }
        return text
    }

    /// The plot's lines: a caption, the bars and the time axis, each indented by `indent`.
    public static func plot(_ samples: [(at: Double, used: UInt64, size: UInt64)], width: Int = 48, indent: String = "    ") -> [String] {
        guard let first = samples.first, let last = samples.last else { return [] }
        let scale = samples.map(\.size).max() ?? 0
        let smallest = samples.map(\.size).min() ?? 0
        let peak = samples.map(\.used).max() ?? 0
        let bars = bars(samples.map { ($0.at, $0.used) }, scale: scale, width: width)
        let sizeNote = smallest == scale ? "the snapshot's size" : "the snapshot's size at its largest; it grew from \(formatBytes(smallest))"
        let percent = scale == 0 ? 0 : Int((Double(peak) / Double(scale) * 100).rounded())
        let start = "\(oneDecimal(first.at))s"
        let end = "\(oneDecimal(last.at))s"
        let gap = max(1, bars.count - start.count - end.count)
        let axis = bars.count > 1 ? start + String(repeating: " ", count: gap) + end : start
        return [
            "\(indent)COW use over time, █ = \(formatBytes(scale)) (\(sizeNote)), peak \(formatBytes(peak)) (\(percent)%):",
            "\(indent)  \(bars)",
            "\(indent)  \(axis)",
        ]
    }
}
