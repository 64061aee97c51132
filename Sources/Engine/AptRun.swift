import BlockDevice
import Foundation
import Recipe

/// `guard apt`: the recipe it runs, written into the state directory.
public enum AptRun {
    /// Reads the base recipe as `guard run` reads one (only root may be able to change it,
    /// unless `allowUnsafe`), puts apt-get's steps in it, checks the result, and writes it to
    /// `<state>/apt/<time>-<pid>.recipe` (mode 0600): the file `guard run` then runs and the
    /// journal names.
    public static func prepare(context: GuardContext, base path: String, arguments: [String], allowUnsafe: Bool) throws -> String {
        let contents: TrustedFiles.Contents
        do {
            contents = try TrustedFiles.read(path, what: "the apt recipe", limit: RecipeFile.sizeLimit)
        } catch {
            let reason =
                error.code == .notFound
                ? "does not exist (copy /usr/share/doc/guard/examples/system-apt-upgrade.recipe there and set its volumes, or give --recipe)" : "cannot be read: \(error)"
            throw GuardFailure(.refused, "\(path): the apt recipe \(reason); nothing was touched")
        }
        if !allowUnsafe, let problem = contents.problem {
            throw GuardFailure(.refused, "\(problem); guard runs apt-get as root, so it refuses recipes others can change: \(RecipeFile.unsafeAdvice(path)); nothing was touched")
        }
        guard let base = String(validating: contents.bytes, as: UTF8.self) else {
            throw GuardFailure(.refused, "\(path): the apt recipe cannot be read as UTF-8 text; nothing was touched")
        }
        let text: String
        switch AptRecipe.compose(base: base, arguments: arguments) {
        case .success(let composed): text = composed
        case .failure(let failure): throw GuardFailure(.refused, "\(failure); nothing was touched")
        }
        if case .failure(let errors) = RecipeParser.parse(text: text, path: path) {
            throw GuardFailure(.refused, "\(errors)\nin \(path) with guard apt's steps; nothing was touched")
        }
        try context.prepareStateDirectory()
        let directory = context.stateDirectory + "/apt"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let stamp = Int(context.now().timeIntervalSince1970)
        let file = "\(directory)/\(stamp)-\(getpid()).recipe"
        guard FileManager.default.createFile(atPath: file, contents: Data(text.utf8), attributes: [.posixPermissions: 0o600]) else {
            throw GuardFailure(.refused, "cannot write \(file); nothing was touched")
        }
        return file
    }
}
