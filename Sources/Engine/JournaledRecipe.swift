import Journal
import Recipe

extension RunRecord {
    /// The recipe the run was started with, as the journal holds it, parsed again for its hooks
    /// and policies (rollback.stop and .start, on_failure, on_full).
    ///
    /// - Parameter withoutHooks: the admin asked to go on without the recipe (`--without-hooks`):
    ///   nil when it does not parse, instead of the refusal.
    /// - Throws: `GuardFailure(.refused)` naming the run and what does not parse, and how to go on:
    ///   a rollback that silently ran without its stop hooks would unmount under a running service.
    public func journaledRecipe(withoutHooks: Bool = false, verb: String = "rolled back") throws -> Recipe? {
        switch RecipeParser.parse(text: recipeText, path: recipePath) {
        case .success(let recipe): return recipe
        case .failure(let errors):
            if withoutHooks { return nil }
            let id = id.map { "\($0)" } ?? token
            throw GuardFailure(
                .refused,
                "the recipe journaled with run \(id) (\(recipePath)) does not parse with this guard (\(errors.errors.first.map { "\($0)" } ?? "unreadable")), so its rollback.stop and rollback.start hooks are unknown and run \(id) is not \(verb) without them; stop what uses its volumes yourself, then add --without-hooks; nothing was touched"
            )
        }
    }
}
