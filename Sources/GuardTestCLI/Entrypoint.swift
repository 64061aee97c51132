import GuardCommands
import Snapshot

/// `guard-test`: the `guard` executable with the test hooks on (GUARD_CRASH_AT, GUARD_NOW), for
/// the kernel suite only. Scripts/install and Scripts/package-deb never ship it; the `guard`
/// they ship ignores those variables.
@main
enum Entrypoint {
    static func main() async {
        TestHooks.enable()
        await GuardMain.run()
    }
}
