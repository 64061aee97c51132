import Foundation
import Recipe

#if canImport(Glibc)
import Glibc
#endif

/// guard's built-in verify check: one HTTP/1.1 GET over a plain TCP connection, on a thread
/// of its own (a slow server never holds up the tasks that watch the COW).
///
/// Redirects are not followed (a 301 is a status like any other), no proxy is used, and the
/// body is read up to `HTTPCheck.bodyLimit`.
enum HTTPProbe {
    struct Response {
        var status: Int
        var reason: String
        var body: [UInt8]
    }

    /// Runs `check` within `timeout` (none: 30 s, a health URL that hangs longer is down),
    /// giving up early when `stop` returns a reason.
    static func run(_ check: HTTPCheck, name: String, timeout: Duration?, stop: (@Sendable () -> String?)?, tailBytes: Int) async -> StepResult {
        let started = ContinuousClock.now
        let limit = timeout ?? .seconds(30)
        let deadline = started + limit
        let outcome: Result<Response, ProbeFailure> = await withCheckedContinuation { continuation in
            let thread = Thread {
                continuation.resume(returning: Result { try get(check, deadline: deadline, stop: stop) }.mapError { $0 as? ProbeFailure ?? .failed("\($0)") })
            }
            thread.name = "guard http check"
            thread.start()
        }
        let duration = seconds(since: started)
        func result(_ termination: StepTermination, out: String, err: String, bytes: Int = 0) -> StepResult {
            StepResult(
                name: name, argv: check.words, termination: termination, duration: duration,
                stdoutTail: String(out.suffix(tailBytes)), stderrTail: String(err.suffix(tailBytes)), outputBytes: UInt64(bytes))
        }
        switch outcome {
        case .failure(.timedOut):
            return result(.timedOut, out: "", err: "no complete answer from \(check.url) within \(limit)")
        case .failure(.stopped(let reason)):
            return result(.stopped(reason), out: "", err: "")
        case .failure(.failed(let reason)):
            return result(.checkFailed(reason), out: "", err: "GET \(check.url): \(reason)")
        case .success(let response):
            let text = String(decoding: response.body, as: UTF8.self)
            let out = "HTTP \(response.status) \(response.reason)\n" + text
            if let problem = verdict(check, response) {
                return result(.checkFailed(problem), out: out, err: "GET \(check.url): \(problem)", bytes: response.body.count)
            }
            return result(.exited(0), out: out, err: "", bytes: response.body.count)
        }
    }

    /// Why a response fails the check, or nil when it passes.
    static func verdict(_ check: HTTPCheck, _ response: Response) -> String? {
        let wanted = check.status.map { "\($0)" } ?? "2xx"
        let statusOK = check.status.map { $0 == response.status } ?? (200...299).contains(response.status)
        if !statusOK { return "status \(response.status) \(response.reason), wanted \(wanted)".trimmingCharacters(in: .whitespaces) }
        if let text = check.contains, !String(decoding: response.body, as: UTF8.self).contains(text) {
            return "status \(response.status), but the body does not contain '\(text)'"
        }
        return nil
    }

    enum ProbeFailure: Error {
        case timedOut
        case stopped(String)
        case failed(String)
    }

    /// The request, blocking, on the calling thread.
    static func get(_ check: HTTPCheck, deadline: ContinuousClock.Instant, stop: (@Sendable () -> String?)?) throws -> Response {
        guard case .success(let parts) = HTTPCheck.parse(check.url) else { throw ProbeFailure.failed("not an http:// URL") }
        let socket = try connect(host: parts.host, port: parts.port, deadline: deadline, stop: stop)
        defer { close(socket) }
        let hostHeader = (parts.host.contains(":") ? "[\(parts.host)]" : parts.host) + (parts.port == 80 ? "" : ":\(parts.port)")
        let request = "GET \(parts.target) HTTP/1.1\r\nHost: \(hostHeader)\r\nUser-Agent: guard/verify\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        var bytes = Array(request.utf8)
        while !bytes.isEmpty {
            try wait(socket, for: Int16(POLLOUT), deadline: deadline, stop: stop)
            let sent = send(socket, bytes, bytes.count, Int32(MSG_NOSIGNAL))
            if sent < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw ProbeFailure.failed("sending the request: \(String(cString: strerror(errno)))")
            }
            bytes.removeFirst(sent)
        }
        // Read to the end (Connection: close), or until the body is known to be complete.
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while answer.count < HTTPCheck.bodyLimit + (64 << 10) {
            if let response = complete(answer) { return response }
            try wait(socket, for: Int16(POLLIN), deadline: deadline, stop: stop)
            let count = recv(socket, &buffer, buffer.count, 0)
            if count < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw ProbeFailure.failed("reading the answer: \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            answer += buffer[0..<count]
        }
        if let response = try parse(answer, atEnd: true) { return response }
        throw ProbeFailure.failed(answer.isEmpty ? "the server closed the connection without an answer" : "the answer is not HTTP")
    }

    /// A response whose body is complete (by Content-Length or the last chunk), or nil.
    static func complete(_ answer: [UInt8]) -> Response? { (try? parse(answer, atEnd: false)) ?? nil }

    /// Splits status line, headers and body; de-chunks. nil: not complete yet (unless `atEnd`).
    static func parse(_ answer: [UInt8], atEnd: Bool) throws -> Response? {
        guard let headerEnd = find([13, 10, 13, 10], in: answer, from: 0) else {
            if atEnd && !answer.isEmpty { throw ProbeFailure.failed("the answer is not HTTP (no end of headers)") }
            return nil
        }
        let head = String(decoding: answer[0..<headerEnd], as: UTF8.self).components(separatedBy: "\r\n")
        let statusWords = head[0].split(separator: " ", maxSplits: 2)
        guard statusWords.count >= 2, statusWords[0].hasPrefix("HTTP/1."), let status = Int(statusWords[1]) else {
            throw ProbeFailure.failed("the answer is not HTTP: '\(head[0].prefix(80))'")
        }
        let reason = statusWords.count > 2 ? String(statusWords[2]) : ""
        var headers: [String: String] = [:]
        for line in head.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let raw = Array(answer[(headerEnd + 4)...])
        if headers["transfer-encoding"]?.lowercased().contains("chunked") == true {
            guard let body = dechunk(raw) else {
                if atEnd { throw ProbeFailure.failed("the chunked body ended early") }
                return nil
            }
            return Response(status: status, reason: reason, body: Array(body.prefix(HTTPCheck.bodyLimit)))
        }
        if let length = headers["content-length"].flatMap(Int.init) {
            if raw.count >= length || raw.count >= HTTPCheck.bodyLimit {
                return Response(status: status, reason: reason, body: Array(raw.prefix(min(length, HTTPCheck.bodyLimit))))
            }
            if atEnd { throw ProbeFailure.failed("the body ended after \(raw.count) of \(length) bytes") }
            return nil
        }
        if raw.count >= HTTPCheck.bodyLimit || atEnd { return Response(status: status, reason: reason, body: Array(raw.prefix(HTTPCheck.bodyLimit))) }
        return nil
    }

    /// The body of a chunked transfer, or nil until its last chunk has arrived.
    static func dechunk(_ raw: [UInt8]) -> [UInt8]? {
        var body: [UInt8] = []
        var position = 0
        while true {
            guard let lineEnd = find([13, 10], in: raw, from: position) else { return nil }
            let sizeText = String(decoding: raw[position..<lineEnd], as: UTF8.self).split(separator: ";").first.map(String.init) ?? ""
            guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16) else { return nil }
            if size == 0 { return body }
            let start = lineEnd + 2
            guard raw.count >= start + size + 2 else { return body.count + (raw.count - start) >= HTTPCheck.bodyLimit ? body + raw[start...] : nil }
            body += raw[start..<(start + size)]
            if body.count >= HTTPCheck.bodyLimit { return body }
            position = start + size + 2
        }
    }

    static func find(_ needle: [UInt8], in haystack: [UInt8], from: Int) -> Int? {
        guard haystack.count >= needle.count, from <= haystack.count - needle.count else { return nil }
        for index in from...(haystack.count - needle.count) where haystack[index] == needle[0] {
            if Array(haystack[index..<(index + needle.count)]) == needle { return index }
        }
        return nil
    }

    /// Polls in short slices so a deadline or a stop request ends the wait.
    static func wait(_ socket: Int32, for events: Int16, deadline: ContinuousClock.Instant, stop: (@Sendable () -> String?)?) throws {
        while true {
            if let reason = stop?() { throw ProbeFailure.stopped(reason) }
            let left = deadline - ContinuousClock.now
            if left <= .zero { throw ProbeFailure.timedOut }
            var descriptor = pollfd(fd: socket, events: events, revents: 0)
            let slice = min(Int32(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000) + 1, 100)
            let ready = poll(&descriptor, 1, slice)
            if ready > 0 { return }
            if ready < 0 && errno != EINTR { throw ProbeFailure.failed("poll: \(String(cString: strerror(errno)))") }
        }
    }

    /// A non-blocking TCP connection to the first address of `host` that answers.
    static func connect(host: String, port: UInt16, deadline: ContinuousClock.Instant, stop: (@Sendable () -> String?)?) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, "\(port)", &hints, &list)
        guard status == 0, let first = list else {
            throw ProbeFailure.failed("cannot resolve \(host): \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(list) }
        var lastError = "no address"
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let current = entry {
            entry = current.pointee.ai_next
            let socket = Glibc.socket(
                current.pointee.ai_family, current.pointee.ai_socktype | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), current.pointee.ai_protocol)
            guard socket >= 0 else {
                lastError = String(cString: strerror(errno))
                continue
            }
            if Glibc.connect(socket, current.pointee.ai_addr, current.pointee.ai_addrlen) == 0 { return socket }
            guard errno == EINPROGRESS else {
                lastError = String(cString: strerror(errno))
                close(socket)
                continue
            }
            do {
                try wait(socket, for: Int16(POLLOUT), deadline: deadline, stop: stop)
            } catch {
                close(socket)
                throw error
            }
            var code: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(socket, SOL_SOCKET, SO_ERROR, &code, &length)
            if code == 0 { return socket }
            lastError = String(cString: strerror(code))
            close(socket)
        }
        throw ProbeFailure.failed("cannot connect to \(host) port \(port): \(lastError)")
    }
}
