import ArgumentParser

public struct GuardCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(commandName: "guard", abstract: "Snapshot-guarded upgrades", version: "0.1.0")
    public init() {}
}

public enum GuardMain {
    public static func run() async {
        await GuardCommand.main()
    }
}
