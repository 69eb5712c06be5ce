//! A tiny blocking HTTP/1.1 client on `std::net::TcpStream` (no extra
//! crates) and the assertions every test shares about responses and connections.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::*;
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Header names are lowercased; order preserved.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Short description for assertion messages.
    pub fn describe(&self) -> String {
        let mut t = self.text();
        if t.len() > 600 {
            let mut cut = 600;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t.push_str("...");
        }
        format!("HTTP {} {} body={t}", self.status, self.reason)
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.describe()))
    }
}

/// Serializes a request. `Host` and `Content-Length` are added unless present in
/// `headers`; `Content-Length` is added when there is a body or the method is POST.
pub fn format_request(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("content-length") && (!body.is_empty() || method == "POST") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads one response. `head` = the request was HEAD (no body follows).
/// Interim 1xx responses are skipped.
pub fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Response> {
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed before a response arrived",
            ));
        }
        let status_line = String::from_utf8_lossy(&line).trim_end().to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_string();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            ));
        }
        let reason = parts.next().unwrap_or("").to_string();

        let mut headers = Vec::new();
        loop {
            let mut h = Vec::new();
            if r.read_until(b'\n', &mut h)? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "EOF inside headers",
                ));
            }
            let h = String::from_utf8_lossy(&h)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').ok_or_else(|| {
                io::Error::new(ErrorKind::InvalidData, format!("bad header line {h:?}"))
            })?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let mut resp = Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 {
            return Ok(resp);
        }
        if let Some(cl) = resp.header("content-length") {
            let n: usize = cl.parse().map_err(|_| {
                io::Error::new(ErrorKind::InvalidData, format!("bad content-length {cl:?}"))
            })?;
            resp.body = vec![0u8; n];
            r.read_exact(&mut resp.body)?;
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            resp.body = read_chunked(r)?;
        } else {
            r.read_to_end(&mut resp.body)?;
        }
        return Ok(resp);
    }
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size_s = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_s, 16).map_err(|_| {
            io::Error::new(ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
        })?;
        if size == 0 {
            // trailers
            loop {
                let mut t = String::new();
                if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk)?;
        chunk.truncate(size);
        body.extend(chunk);
    }
}

/// A persistent HTTP/1.1 connection (keep-alive, pipelining, raw bytes).
pub struct HttpConn {
    addr: SocketAddr,
    /// The socket, for writes and socket options (hostile tests write on it directly).
    pub stream: TcpStream,
    /// Reads of the socket; may hold bytes read ahead.
    pub reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        Self::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<HttpConn> {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            addr,
            reader: BufReader::new(s.try_clone()?),
            stream: s,
        })
    }

    /// A connection from the local address `from` (e.g. 127.0.0.2: another
    /// client to the server's per-client limits).
    pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> HttpConn {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        socket
            .bind(&SocketAddr::new(from, 0).into())
            .unwrap_or_else(|e| panic!("bind {from}: {e}"));
        socket
            .connect_timeout(&addr.into(), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {addr} from {from}: {e}"));
        let s: TcpStream = socket.into();
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        HttpConn {
            addr,
            reader: BufReader::new(s.try_clone().expect("clone")),
            stream: s,
        }
    }

    /// A second handle to the socket (e.g. to write a large body from another thread).
    pub fn clone_stream(&self) -> TcpStream {
        self.stream.try_clone().expect("clone TcpStream")
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.addr));
    }

    pub fn write_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) {
        let req = format_request(&self.addr.to_string(), method, path, headers, body);
        self.write_raw(&req);
    }

    pub fn read_response(&mut self) -> Response {
        self.try_read_response()
            .unwrap_or_else(|e| panic!("reading response from {}: {e}", self.addr))
    }

    pub fn try_read_response(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader, false)
    }

    /// Reads the response to a HEAD request (headers only).
    pub fn read_head_response(&mut self) -> Response {
        read_response(&mut self.reader, true)
            .unwrap_or_else(|e| panic!("reading HEAD response from {}: {e}", self.addr))
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} to {}: {e}", self.addr))
    }

    pub fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let req = format_request(&self.addr.to_string(), method, path, headers, body);
        self.stream.write_all(&req)?;
        read_response(&mut self.reader, method == "HEAD")
    }

    pub fn send(&mut self, chat: &str, sender: &str, text: &str) -> Response {
        let body = send_body(chat, sender, text);
        self.request("POST", "/api/send", JSON_CT, body.as_bytes())
    }

    /// Sends and asserts 200; returns `send_time`.
    pub fn send_ok(&mut self, chat: &str, sender: &str, text: &str) -> i64 {
        let r = self.send(chat, sender, text);
        send_time_of(&r, &format!("send chat={chat:?} sender={sender:?}"))
    }

    pub fn pull_json(&mut self, params: &Value) -> Response {
        self.request("GET", "/api/pull", JSON_CT, params.to_string().as_bytes())
    }

    pub fn pull_query(&mut self, query: &str) -> Response {
        self.request("GET", &format!("/api/pull?{query}"), &[], b"")
    }

    /// One line of the response stream, with its line ending.
    pub fn read_line(&mut self, ctx: &str) -> String {
        let mut line = Vec::new();
        self.reader
            .read_until(b'\n', &mut line)
            .unwrap_or_else(|e| panic!("{ctx}: reading a line: {e}"));
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Asserts the server closes the connection (EOF or reset) within 3 s and sends
    /// nothing more.
    pub fn assert_closed(&mut self, ctx: &str) {
        self.assert_closed_within(Duration::from_secs(3), ctx);
    }

    /// Asserts the server closes the connection (EOF or reset) within `within`
    /// and sends nothing more (bytes already buffered count); returns how long
    /// it took.
    pub fn assert_closed_within(&mut self, within: Duration, ctx: &str) -> Duration {
        assert_closed_within(&self.stream, &mut self.reader, within, ctx)
    }
}

/// Whether an I/O error means the peer reset or closed the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// Whether an I/O error is a read/write timeout.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The one "the peer closes" assertion of every protocol: reading `reader`
/// (of `socket`) within `within` ends in EOF or a reset, not in more bytes
/// nor a timeout. Returns how long it took.
pub fn assert_closed_within(
    socket: &TcpStream,
    reader: &mut impl Read,
    within: Duration,
    ctx: &str,
) -> Duration {
    let start = Instant::now();
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(n) => panic!(
                "{ctx}: expected the peer to close the connection, got {n} more bytes: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if is_reset(&e) => return start.elapsed(),
            Err(e) if is_timeout(&e) => {
                panic!(
                    "{ctx}: expected the peer to close the connection, but it is still open after {within:?}"
                )
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("{ctx}: unexpected error while waiting for close: {e}"),
        }
    }
}

/// A fresh connection's `GET /ping` is answered 200.
pub fn assert_alive(addr: SocketAddr, ctx: &str) {
    let r = try_request(addr, "GET", "/ping", &[], b"")
        .unwrap_or_else(|e| panic!("{ctx}: the server no longer answers GET /ping: {e}"));
    assert_eq!(
        r.status,
        200,
        "{ctx}: GET /ping afterwards: {}",
        r.describe()
    );
}

pub const JSON_CT: &[(&str, &str)] = &[("Content-Type", "application/json")];

/// One request on a fresh connection (panics on I/O errors or timeouts).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    HttpConn::connect(addr).request(method, path, headers, body)
}

/// A POST of `body` as JSON on a fresh connection.
pub fn post_json(addr: SocketAddr, path: &str, body: Value) -> Response {
    request(addr, "POST", path, JSON_CT, body.to_string().as_bytes())
}

/// One request on a fresh connection; I/O errors (including the 5 s read timeout) are returned.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    HttpConn::try_connect(addr)?.try_request(method, path, headers, body)
}

/// Writes raw bytes on a fresh connection and reads one response.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut c = HttpConn::connect(addr);
    c.write_raw(bytes);
    c.read_response()
}

pub fn send(addr: SocketAddr, chat: &str, sender: &str, text: &str) -> Response {
    HttpConn::connect(addr).send(chat, sender, text)
}

pub fn send_ok(addr: SocketAddr, chat: &str, sender: &str, text: &str) -> i64 {
    HttpConn::connect(addr).send_ok(chat, sender, text)
}

/// POST /api/send with an arbitrary raw body.
pub fn send_raw_body(addr: SocketAddr, body: &[u8]) -> Response {
    request(addr, "POST", "/api/send", JSON_CT, body)
}

/// GET /api/pull with the parameters as a JSON body.
pub fn pull_json(addr: SocketAddr, params: Value) -> Response {
    HttpConn::connect(addr).pull_json(&params)
}

/// GET /api/pull?{query}
pub fn pull_query(addr: SocketAddr, query: &str) -> Response {
    HttpConn::connect(addr).pull_query(query)
}

/// GET /api/pull with an arbitrary raw body.
pub fn pull_raw_body(addr: SocketAddr, body: &[u8]) -> Response {
    request(addr, "GET", "/api/pull", JSON_CT, body)
}

/// Asserts a 200 `{"send_time": i64}` and returns the send_time.
pub fn send_time_of(r: &Response, ctx: &str) -> i64 {
    assert_eq!(r.status, 200, "{ctx}: expected 200, got {}", r.describe());
    let v = r.json();
    v.get("send_time")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{ctx}: no integer send_time in {}", r.describe()))
}

/// Asserts `status` and the error body shape `{"error":{"code":"...","message":"..."}}`.
pub fn assert_error(r: &Response, status: u16, ctx: &str) {
    assert_eq!(
        r.status,
        status,
        "{ctx}: expected {status}, got {}",
        r.describe()
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{ctx}: error body is not JSON ({e}): {}", r.describe()));
    let err = v
        .get("error")
        .unwrap_or_else(|| panic!("{ctx}: no \"error\" object in {}", r.describe()));
    assert!(
        err.get("code").is_some_and(Value::is_string),
        "{ctx}: error.code must be a string: {}",
        r.describe()
    );
    assert!(
        err.get("message").is_some_and(Value::is_string),
        "{ctx}: error.message must be a string: {}",
        r.describe()
    );
}

/// The headers every response carries: Content-Length framing (never chunked)
/// matching the body, a JSON Content-Type and an IMF-fixdate Date.
pub fn assert_standard_headers(r: &Response, ctx: &str) {
    let cl = r
        .header("content-length")
        .unwrap_or_else(|| panic!("{ctx}: missing Content-Length: {:?}", r.headers));
    assert_eq!(
        cl.parse::<usize>().ok(),
        Some(r.body.len()),
        "{ctx}: Content-Length must match the body length"
    );
    let ct = r
        .header("content-type")
        .unwrap_or_else(|| panic!("{ctx}: missing Content-Type: {:?}", r.headers));
    assert!(
        ct.starts_with("application/json"),
        "{ctx}: Content-Type should be application/json, got {ct:?}"
    );
    let date = r
        .header("date")
        .unwrap_or_else(|| panic!("{ctx}: missing Date: {:?}", r.headers));
    // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT"
    let b = date.as_bytes();
    assert!(
        date.len() == 29
            && date.ends_with(" GMT")
            && b[3] == b','
            && b[19] == b':'
            && b[22] == b':',
        "{ctx}: Date must be an IMF-fixdate like 'Sun, 06 Nov 1994 08:49:37 GMT', got {date:?}"
    );
    assert!(
        r.header("transfer-encoding").is_none(),
        "{ctx}: responses are Content-Length framed, not chunked"
    );
}

/// Encodes `body` as chunks of `size` bytes, each with a chunk extension,
/// then a last-chunk with an extension and two trailer fields.
pub fn chunked_body(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in body.chunks(size).enumerate() {
        if i % 2 == 0 {
            out.extend_from_slice(format!("{:x};foo=bar\r\n", piece.len()).as_bytes());
        } else {
            out.extend_from_slice(format!("{:X}\r\n", piece.len()).as_bytes());
        }
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0;last=\"yes\"\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n");
    out
}
