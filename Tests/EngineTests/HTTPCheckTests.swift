import Engine
import Foundation
import Recipe
import Testing

/// A real HTTP server (Python's http.server) on 127.0.0.1 for the built-in check.
final class TestHTTPServer {
    let process = Process()
    let port: Int

    static let script = #"""
        import http.server, socketserver, sys, time
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def log_message(self, *args): pass
            def send(self, code, body, chunked=False):
                self.send_response(code)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part in (body[:3], body[3:]):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
            def do_GET(self):
                if self.path == "/ok?full=1": self.send(200, b"all good")
                elif self.path == "/chunked": self.send(200, b"ready: yes", chunked=True)
                elif self.path == "/down": self.send(503, b"starting")
                elif self.path == "/slow": time.sleep(30); self.send(200, b"late")
                else: self.send(404, b"no")
        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
        server = Server(("127.0.0.1", 0), Handler)
        print(server.server_address[1], flush=True)
        server.serve_forever()
        """#

    init() throws {
        let output = Pipe()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", Self.script]
        process.standardOutput = output
        try process.run()
        var line = Data()
        while !line.contains(UInt8(ascii: "\n")) {
            let byte = output.fileHandleForReading.readData(ofLength: 1)
            guard !byte.isEmpty else { break }
            line.append(byte)
        }
        port = Int(String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    func url(_ path: String) -> String { "http://127.0.0.1:\(port)\(path)" }

    deinit {
        // SIGKILL: a test process may pass SIGTERM on ignored, and python would live on.
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}

@Suite("verify: the built-in HTTP check", .serialized)
struct HTTPCheckTests {
    let server: TestHTTPServer
    init() throws { server = try TestHTTPServer() }

    func check(_ http: HTTPCheck, timeout: Duration? = .seconds(10), stop: (@Sendable () -> String?)? = nil) async -> StepResult {
        await StepRunner().run(Command(name: "health", invocation: .http(http)), environment: plainEnvironment, timeout: timeout, stop: stop)
    }

    @Test("a 2xx passes; the status line and body go to the journal's output")
    func passes() async throws {
        #expect(server.port > 0)
        let result = await check(HTTPCheck(url: server.url("/ok?full=1"), contains: "good"))
        #expect(result.succeeded, "\(result.termination) \(result.stderrTail)")
        #expect(result.stdoutTail == "HTTP 200 OK\nall good")
        #expect(result.argv == ["http", "GET", server.url("/ok?full=1"), "contains", "good"])
        let chunked = await check(HTTPCheck(url: server.url("/chunked"), status: 200, contains: "ready: yes"))
        #expect(chunked.succeeded, "a chunked body is put together before it is searched: \(chunked.termination)")
        let wanted = await check(HTTPCheck(url: server.url("/down"), status: 503))
        #expect(wanted.succeeded, "the status the recipe asks for passes, even a 503")
    }

    @Test("a wrong status, a missing text, a refused connection and a timeout fail, each saying why")
    func failures() async throws {
        let down = await check(HTTPCheck(url: server.url("/down")))
        #expect(down.termination == .checkFailed("status 503 Service Unavailable, wanted 2xx"))
        #expect(down.stdoutTail == "HTTP 503 Service Unavailable\nstarting")
        #expect(!down.succeeded && down.exitCode == nil)
        let missing = await check(HTTPCheck(url: server.url("/ok?full=1"), contains: "schema v3"))
        #expect(missing.termination == .checkFailed("status 200, but the body does not contain 'schema v3'"))
        let notFound = await check(HTTPCheck(url: server.url("/nothing"), status: 200))
        #expect(notFound.termination == .checkFailed("status 404 Not Found, wanted 200"))

        // A port nobody listens on: the server's port once it is gone.
        let closed = TestHTTPServer.closedPort()
        let refused = await check(HTTPCheck(url: "http://127.0.0.1:\(closed)/"))
        #expect(refused.termination.description.contains("cannot connect to 127.0.0.1 port \(closed)"), "\(refused.termination)")

        // The server answers /slow after 30 s. A .timedOut result is the proof that the 300 ms
        // deadline ended the wait (an answer would be a 200); the clock only bounds it loosely,
        // because on a busy 2-core machine this test's own task can wait seconds to be resumed.
        let started = ContinuousClock.now
        let slow = await check(HTTPCheck(url: server.url("/slow")), timeout: .milliseconds(300))
        #expect(slow.termination == .timedOut)
        #expect(slow.stderrTail.contains("within 0.3 seconds"), "\(slow.stderrTail)")
        #expect(ContinuousClock.now - started < .seconds(15), "the timeout ends the wait, long before the answer")

        let stopped = await check(HTTPCheck(url: server.url("/slow")), stop: { "interrupted (Ctrl-C)" })
        #expect(stopped.termination == .stopped("interrupted (Ctrl-C)"))
    }
}

extension TestHTTPServer {
    /// A TCP port on 127.0.0.1 with no listener.
    static func closedPort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
