import GuardCommands

/// The `guard` executable: everything lives in GuardCommands, which tests call directly.
@main
enum Entrypoint {
    static func main() async {
        await GuardMain.run()
    }
}
