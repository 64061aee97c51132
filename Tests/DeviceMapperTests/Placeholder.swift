import Testing

@Test func trivial() { #expect(1 == 1) }

@Suite struct S { @Test("named") func a() {} }
