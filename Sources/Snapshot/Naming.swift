import DeviceMapper

/// The names and UUIDs of the layers guard stacks under and beside one origin.
///
/// Names are for people (`dmsetup ls`); guard matches layers by UUID only:
/// `GUARD-<run token>-<volume index>-real|cow|snap`.
public struct StackIdentity: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The run's random token (8 lowercase hex digits).
    public var runToken: String
    /// The volume's position in the recipe.
    public var volumeIndex: Int

    public init(runToken: String, volumeIndex: Int) {
        self.runToken = runToken
        self.volumeIndex = volumeIndex
    }

    public enum Layer: String, CaseIterable, Sendable, Codable {
        case real, cow, snap
    }

    /// "GUARD-3f9a2c1e-0-".
    public var uuidPrefix: String { "\(DeviceMapper.uuidPrefix)\(runToken)-\(volumeIndex)-" }

    public func uuid(_ layer: Layer) -> String { uuidPrefix + layer.rawValue }

    /// "guard-3f9a2c1e-website-snap": the origin's name shortened so the whole stays under 127 bytes.
    public func name(_ layer: Layer, originName: String) -> String {
        let base = String(originName.utf8.prefix(80)) ?? "volume\(volumeIndex)"
        return "guard-\(runToken)-\(base)-\(layer.rawValue)"
    }

    public var description: String { "\(runToken)/\(volumeIndex)" }

    /// Parses a layer UUID back into identity and layer; nil for anything that is not one.
    public static func parse(uuid: String) -> (StackIdentity, Layer)? {
        guard uuid.hasPrefix(DeviceMapper.uuidPrefix) else { return nil }
        let parts = uuid.dropFirst(DeviceMapper.uuidPrefix.count).split(separator: "-")
        guard parts.count == 3, parts[0].count == 8, parts[0].allSatisfy(\.isHexDigit), let index = Int(parts[1]),
            let layer = Layer(rawValue: String(parts[2]))
        else { return nil }
        return (StackIdentity(runToken: String(parts[0]), volumeIndex: index), layer)
    }

    /// A new random run token.
    public static func newToken() -> String {
        String(UInt32.random(in: 0x1000_0000...UInt32.max), radix: 16)
    }
}
