import DeviceMapper

/// `--udev` values.
enum UdevModeName: String {
    case automatic, cookies, none

    var mode: UdevMode {
        switch self {
        case .automatic: return .automatic
        case .cookies: return .cookies
        case .none: return .none
        }
    }
}
