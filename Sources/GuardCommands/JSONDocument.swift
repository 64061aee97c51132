import Foundation

/// guard's JSON contract (Docs/guide.md, "JSON output"; the schemas are in Docs/schema/):
/// every `--json` prints one object with `schema_version`, keys sorted, and every field the
/// schema names present, null when it has no value. The version changes only when a field is
/// removed, renamed or changes its type; a new field does not change it.
enum JSONContract {
    static let schemaVersion = 1
}

/// A JSON value, as `DocumentEncoder` builds it.
indirect enum JSONValue: Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case unsigned(UInt64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// Pretty-printed with sorted keys, two spaces per level, `/` not escaped.
    func text(indent: String = "") -> String {
        switch self {
        case .null: return "null"
        case .bool(let value): return value ? "true" : "false"
        case .integer(let value): return String(value)
        case .unsigned(let value): return String(value)
        case .number(let value):
            // Shortest form that reads back the same; an integral value without ".0".
            let text = value.description
            return text.hasSuffix(".0") ? String(text.dropLast(2)) : text
        case .string(let value): return Self.quoted(value)
        case .array(let values):
            guard !values.isEmpty else { return "[]" }
            let inner = indent + "  "
            return "[\n" + values.map { inner + $0.text(indent: inner) }.joined(separator: ",\n") + "\n\(indent)]"
        case .object(let members):
            guard !members.isEmpty else { return "{}" }
            let inner = indent + "  "
            return "{\n" + members.keys.sorted().map { inner + Self.quoted($0) + " : " + members[$0]!.text(indent: inner) }.joined(separator: ",\n") + "\n\(indent)}"
        }
    }

    /// On one line, without spaces, keys sorted: one document per line (JSON lines).
    func compactText() -> String {
        switch self {
        case .array(let values): return "[" + values.map { $0.compactText() }.joined(separator: ",") + "]"
        case .object(let members): return "{" + members.keys.sorted().map { Self.quoted($0) + ":" + members[$0]!.compactText() }.joined(separator: ",") + "}"
        default: return text()
        }
    }

    static func quoted(_ string: String) -> String {
        var out = "\""
        for scalar in string.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case let control where control.value < 0x20:
                out += "\\u" + String(repeating: "0", count: 4 - String(control.value, radix: 16).count) + String(control.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// Encodes `Encodable` values into a `JSONValue`, writing an absent optional as null where
/// Foundation's JSONEncoder leaves the key out: the contract promises every key.
struct DocumentEncoder {
    func encode<T: Encodable>(_ value: T) throws -> JSONValue {
        let node = Node()
        try value.encode(to: NodeEncoder(node: node, codingPath: []))
        return try node.value(at: [])
    }

    /// What an encoder wrote: nothing yet, a value, or a container filled later by reference.
    final class Node {
        var scalar: JSONValue?
        var members: [String: Node]?
        var elements: [Node]?

        func value(at path: [any CodingKey]) throws -> JSONValue {
            if let members {
                var object: [String: JSONValue] = [:]
                for (key, node) in members { object[key] = try node.value(at: path) }
                return .object(object)
            }
            if let elements { return .array(try elements.map { try $0.value(at: path) }) }
            guard let scalar else {
                throw EncodingError.invalidValue((), .init(codingPath: path, debugDescription: "nothing was encoded"))
            }
            return scalar
        }
    }

    struct NodeEncoder: Encoder {
        let node: Node
        let codingPath: [any CodingKey]
        var userInfo: [CodingUserInfoKey: Any] { [:] }

        func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
            if node.members == nil { node.members = [:] }
            return KeyedEncodingContainer(Keyed<Key>(node: node, codingPath: codingPath))
        }

        func unkeyedContainer() -> any UnkeyedEncodingContainer {
            if node.elements == nil { node.elements = [] }
            return Unkeyed(node: node, codingPath: codingPath)
        }

        func singleValueContainer() -> any SingleValueEncodingContainer { Single(node: node, codingPath: codingPath) }
    }

    /// The one place a value becomes JSON: numbers, strings and bools directly, anything else
    /// through its own `encode(to:)`.
    static func encode<T: Encodable>(_ value: T, into node: Node, at path: [any CodingKey]) throws {
        switch value {
        case let value as Bool: node.scalar = .bool(value)
        case let value as String: node.scalar = .string(value)
        case let value as Double: node.scalar = try number(value, path)
        case let value as Float: node.scalar = try number(Double(value), path)
        case let value as Int: node.scalar = .integer(Int64(value))
        case let value as Int8: node.scalar = .integer(Int64(value))
        case let value as Int16: node.scalar = .integer(Int64(value))
        case let value as Int32: node.scalar = .integer(Int64(value))
        case let value as Int64: node.scalar = .integer(value)
        case let value as UInt: node.scalar = .unsigned(UInt64(value))
        case let value as UInt8: node.scalar = .unsigned(UInt64(value))
        case let value as UInt16: node.scalar = .unsigned(UInt64(value))
        case let value as UInt32: node.scalar = .unsigned(UInt64(value))
        case let value as UInt64: node.scalar = .unsigned(value)
        default: try value.encode(to: NodeEncoder(node: node, codingPath: path))
        }
    }

    static func number(_ value: Double, _ path: [any CodingKey]) throws -> JSONValue {
        guard value.isFinite else {
            throw EncodingError.invalidValue(value, .init(codingPath: path, debugDescription: "JSON has no \(value)"))
        }
        return .number(value)
    }

    struct Keyed<Key: CodingKey>: KeyedEncodingContainerProtocol {
        let node: Node
        let codingPath: [any CodingKey]

        private func child(_ key: Key) -> Node {
            let child = Node()
            node.members![key.stringValue] = child
            return child
        }

        mutating func encodeNil(forKey key: Key) throws { child(key).scalar = .null }
        mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
            try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key])
        }
        mutating func encodeIfPresent<T: Encodable>(_ value: T?, forKey key: Key) throws {
            try encodeIfPresent(value, forKey: key, generic: ())
        }
        /// Foundation leaves an absent optional out; the contract writes null.
        private func encodeIfPresent<T: Encodable>(_ value: T?, forKey key: Key, generic: Void) throws {
            if let value { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) } else { child(key).scalar = .null }
        }

        mutating func encode(_ value: Bool, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: String, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Double, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Float, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Int, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Int8, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Int16, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Int32, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: Int64, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: UInt, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: UInt8, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: UInt16, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: UInt32, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }
        mutating func encode(_ value: UInt64, forKey key: Key) throws { try DocumentEncoder.encode(value, into: child(key), at: codingPath + [key]) }

        mutating func encodeIfPresent(_ value: Bool?, forKey key: Key) throws { try encodeIfPresent(value as Bool?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: String?, forKey key: Key) throws { try encodeIfPresent(value as String?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Double?, forKey key: Key) throws { try encodeIfPresent(value as Double?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Float?, forKey key: Key) throws { try encodeIfPresent(value as Float?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Int?, forKey key: Key) throws { try encodeIfPresent(value as Int?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Int8?, forKey key: Key) throws { try encodeIfPresent(value as Int8?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Int16?, forKey key: Key) throws { try encodeIfPresent(value as Int16?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Int32?, forKey key: Key) throws { try encodeIfPresent(value as Int32?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: Int64?, forKey key: Key) throws { try encodeIfPresent(value as Int64?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: UInt?, forKey key: Key) throws { try encodeIfPresent(value as UInt?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: UInt8?, forKey key: Key) throws { try encodeIfPresent(value as UInt8?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: UInt16?, forKey key: Key) throws { try encodeIfPresent(value as UInt16?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: UInt32?, forKey key: Key) throws { try encodeIfPresent(value as UInt32?, forKey: key, generic: ()) }
        mutating func encodeIfPresent(_ value: UInt64?, forKey key: Key) throws { try encodeIfPresent(value as UInt64?, forKey: key, generic: ()) }

        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
            NodeEncoder(node: child(key), codingPath: codingPath + [key]).container(keyedBy: keyType)
        }
        mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
            NodeEncoder(node: child(key), codingPath: codingPath + [key]).unkeyedContainer()
        }
        mutating func superEncoder() -> any Encoder { NodeEncoder(node: child(Key(stringValue: "super")!), codingPath: codingPath) }
        mutating func superEncoder(forKey key: Key) -> any Encoder { NodeEncoder(node: child(key), codingPath: codingPath + [key]) }
    }

    struct Unkeyed: UnkeyedEncodingContainer {
        let node: Node
        let codingPath: [any CodingKey]
        var count: Int { node.elements!.count }

        private func next() -> Node {
            let child = Node()
            node.elements!.append(child)
            return child
        }

        mutating func encodeNil() throws { next().scalar = .null }
        mutating func encode<T: Encodable>(_ value: T) throws { try DocumentEncoder.encode(value, into: next(), at: codingPath) }
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
            NodeEncoder(node: next(), codingPath: codingPath).container(keyedBy: keyType)
        }
        mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer { NodeEncoder(node: next(), codingPath: codingPath).unkeyedContainer() }
        mutating func superEncoder() -> any Encoder { NodeEncoder(node: next(), codingPath: codingPath) }
    }

    struct Single: SingleValueEncodingContainer {
        let node: Node
        let codingPath: [any CodingKey]
        mutating func encodeNil() throws { node.scalar = .null }
        mutating func encode<T: Encodable>(_ value: T) throws { try DocumentEncoder.encode(value, into: node, at: codingPath) }
    }
}

extension GuardCommand.Check: JSONOutputCommand {}
extension GuardCommand.Commit: JSONOutputCommand {}
extension GuardCommand.Config: JSONOutputCommand {}
extension GuardCommand.Diff: JSONOutputCommand {}
extension GuardCommand.History: JSONOutputCommand {}
extension GuardCommand.Recover: JSONOutputCommand {}
extension GuardCommand.Restore: JSONOutputCommand {}
extension GuardCommand.Rollback: JSONOutputCommand {}
extension GuardCommand.Run: JSONOutputCommand {}
extension GuardCommand.Show: JSONOutputCommand {}
extension GuardCommand.Status: JSONOutputCommand {}
extension GuardCommand.Volume.Activate: JSONOutputCommand {}
extension GuardCommand.Volume.Create: JSONOutputCommand {}
extension GuardCommand.Volume.List: JSONOutputCommand {}
extension GuardCommand.Volume.Remove: JSONOutputCommand {}
