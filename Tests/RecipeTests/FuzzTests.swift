import Foundation
import Testing

@testable import Recipe

/// Issue 17: the parsers guard reads as root get mutated input, numbers past every limit among
/// it, and must answer each with a value or an error naming a line: never a trap. The counts
/// are printed for Scripts/test's summary (a trap would end the test process: no count at all).
@Suite("parsers under mutated input")
struct FuzzTests {
    /// Mutations of `base`: deletions, insertions, replacements, duplicated slices, and numbers
    /// far past what a size, duration or percentage may be.
    static func mutations(of base: String, count: Int, seed: UInt64) -> [String] {
        var generator = SeededGenerator(seed: seed)
        let alphabet = Array("abc:{}[],-#=%'\"\n  \t0123456789.MGKTBsmhdw%&|!*@?>")
        let numbers = ["99999999999999999999", "1e400", String(repeating: "9", count: 320), "0.0000001", "-1", "18446744073709551616", "nan", "inf"]
        var result: [String] = []
        for round in 0..<count {
            var text = Array(base)
            for _ in 0..<(1 + round % 6) {
                let position = Int.random(in: 0..<max(text.count, 1), using: &generator)
                switch Int.random(in: 0..<5, using: &generator) {
                case 0: if !text.isEmpty { text.remove(at: position) }
                case 1: text.insert(alphabet.randomElement(using: &generator)!, at: min(position, text.count))
                case 2: if !text.isEmpty { text[position] = alphabet.randomElement(using: &generator)! }
                case 3: text.insert(contentsOf: numbers.randomElement(using: &generator)!, at: min(position, text.count))
                default:
                    let end = min(text.count, position + Int.random(in: 1...40, using: &generator))
                    let slice = text[min(position, end)..<end]
                    text.insert(contentsOf: slice, at: min(text.count, end + Int.random(in: 0...20, using: &generator)))
                }
            }
            result.append(String(text))
        }
        return result
    }

    @Test("recipes and guard.conf: thousands of mutations each give a value or errors with a line, never a trap")
    func parsersNeverTrap() {
        var recipes = (parsed: 0, rejected: 0)
        for text in Self.mutations(of: validRecipe, count: 4000, seed: 7) {
            switch RecipeParser.parse(text: text, path: "fuzz.recipe") {
            case .success: recipes.parsed += 1
            case .failure(let errors):
                recipes.rejected += 1
                #expect(!errors.errors.isEmpty && errors.errors.allSatisfy { $0.location.line >= 1 })
            }
        }
        let configuration = """
            state_dir = /srv/guard
            cow_dir = /srv/guard-cow
            keep = 7d
            extend = at 80% by 10% max 2G
            """
        var confs = (parsed: 0, rejected: 0)
        for text in Self.mutations(of: configuration, count: 4000, seed: 11) {
            let (_, errors) = GuardConfiguration.parseKeepingValid(text, path: "fuzz.conf")
            if !errors.isEmpty {
                confs.rejected += 1
                #expect(errors.allSatisfy { $0.location.line >= 1 })
            } else {
                confs.parsed += 1
            }
        }
        #expect(recipes.parsed + recipes.rejected == 4000 && confs.parsed + confs.rejected == 4000)
        print(
            "fuzz: \(recipes.parsed + recipes.rejected) recipe inputs (\(recipes.rejected) rejected), \(confs.parsed + confs.rejected) guard.conf inputs (\(confs.rejected) rejected), 0 crashes"
        )
    }
}
