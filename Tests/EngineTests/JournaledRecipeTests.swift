import Engine
import Journal
import Recipe
import Testing

/// Issue 44: a rollback never drops the recipe's hooks silently.
@Test("a journaled recipe that does not parse refuses the rollback, naming the run and the way on (--without-hooks); one that parses gives its hooks")
func journaledRecipeRefusesLoudly() throws {
    var run = RunRecord(
        token: "t", recipeName: "web", recipePath: "/etc/guard/web.recipe", recipeSHA256: "", recipeText: "name: [unclosed", host: "h", user: "root", pid: 1, startedAt: 0)
    run.id = 12
    #expect {
        _ = try run.journaledRecipe()
    } throws: { error in
        guard let failure = error as? GuardFailure else { return false }
        return failure.kind == .refused && failure.message.contains("run 12") && failure.message.contains("--without-hooks") && failure.message.contains("/etc/guard/web.recipe")
    }
    #expect(try run.journaledRecipe(withoutHooks: true) == nil)
    run.recipeText = "name: web\nvolumes:\n  - device: /dev/vg/web\n    snapshot: 8M\nsteps:\n  - name: s\n    run: [true]\nrollback:\n  stop: [systemctl, stop, web]\n"
    let recipe = try #require(try run.journaledRecipe())
    #expect(recipe.rollbackStop.count == 1)
}
