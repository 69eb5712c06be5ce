//! HTTP/1.1 request framing (RFC 9112), with no I/O: bytes in, [`Request`]s
//! out. Every framing decision (Content-Length vs chunked vs none, keep-alive
//! vs close) is made in [`RequestDecoder::decode`] and the helpers it calls.

use bytes::{Buf, Bytes, BytesMut};

/// Size limits, checked as soon as the bytes that break them arrive. Their
/// `Default` is the options' defaults (`config/components.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus header section, in bytes (431 beyond it).
    pub max_head: usize,
    /// Number of header fields (431 beyond it).
    pub max_headers: usize,
    /// Decoded body, in bytes (413 beyond it).
    pub max_body: usize,
    /// Request line, in bytes (414 beyond it).
    pub max_request_line: usize,
}

impl Limits {
    /// The configured sizes, with the fixed ones (field count, request
    /// line) that have no option.
    pub fn new(max_head: usize, max_body: usize) -> Limits {
        Limits {
            max_head,
            max_headers: 64,
            max_body,
            max_request_line: 8 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// A complete request: head fields the server acts on, and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The request-target exactly as sent (origin-form or absolute-form).
    pub target: Bytes,
    pub version: Version,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    pub body: Bytes,
    /// The request line and header section, as received (already
    /// validated), for [`Request::header_values`].
    pub head: Bytes,
    /// The client's address, set by the connection that read the request.
    pub peer: Option<std::net::IpAddr>,
    /// An `Upgrade` field names `websocket`: read in the header scan of the
    /// parse, so the connection's per-request check costs nothing (it was a
    /// second scan of every request's head: 0.4 % of the all-in-one's CPU
    /// under `wrk` pulls).
    pub upgrade_websocket: bool,
    /// Where the fields the server reads per request are in `head`.
    fields: FieldIndex,
}

/// The fields the gateway reads per request ([`Request::header_values`]),
/// indexed in the parse's one pass over the fields. Scanning the head for
/// each of them (content type, idempotency key, origin, ...: four or five
/// per send) was 3 % of the gateway's CPU under `wrk` sends; the
/// cross-origin check's `sec-fetch-site`, read on every POST and absent
/// from most, was still a scan per send (1.1 % of the all-in-one's CPU).
const INDEXED: [&str; 10] = [
    "content-type",
    "idempotency-key",
    "authorization",
    "origin",
    "last-event-id",
    "accept",
    "forwarded",
    "x-forwarded-for",
    "sec-fetch-site",
    "host",
];

/// Where in the head each [`INDEXED`] field's value is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FieldIndex {
    /// The first value of `INDEXED[i]`: its range in the head (trimmed).
    values: [(u32, u32); INDEXED.len()],
    /// Bit i: `INDEXED[i]` is there.
    seen: u16,
    /// Bit i: `INDEXED[i]` is there more than once: its values are read by
    /// a scan of the head, in order, as any other field's.
    repeated: u16,
}

impl FieldIndex {
    fn note(&mut self, name: &[u8], value: std::ops::Range<usize>) {
        let Some(i) = indexed(name) else {
            return;
        };
        let bit = 1u16 << i;
        if self.seen & bit != 0 {
            self.repeated |= bit;
            return;
        }
        self.seen |= bit;
        // The head is at most `Limits::max_head` bytes, far below 4 GiB.
        self.values[i] = (value.start as u32, value.end as u32);
    }
}

/// The index of `name` (ASCII case-insensitive) in [`INDEXED`].
fn indexed(name: &[u8]) -> Option<usize> {
    INDEXED
        .iter()
        .position(|n| n.len() == name.len() && name.eq_ignore_ascii_case(n.as_bytes()))
}

impl Request {
    /// The path and the raw (still percent-encoded) query of the target.
    pub fn path_and_query(&self) -> (&[u8], Option<&[u8]>) {
        let mut target = &self.target[..];
        // absolute-form: "http://host:port/path?query" (RFC 9112 §3.2.2) is
        // only a target that starts with a scheme; a "://" later on is data
        // ("/ping?u=http://x"), and routing by it would let a query value
        // choose the path.
        if let Some(after) = after_scheme(target) {
            target = match after.iter().position(|&b| b == b'/' || b == b'?') {
                Some(i) => &after[i..], // "http://host?q": empty path
                None => b"/",
            };
        }
        match target.iter().position(|&b| b == b'?') {
            Some(i) => (&target[..i], Some(&target[i + 1..])),
            None => (target, None),
        }
    }

    /// The values of every header field named `name` (ASCII
    /// case-insensitive), trimmed, in order. The fields the gateway reads
    /// per request are indexed by the parse (one that is there once is read
    /// without a scan); others, and fields there more than once, are read
    /// by scanning the head.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let (first, scanned): (Option<&[u8]>, &[u8]) = match indexed(name.as_bytes()) {
            Some(i) if self.fields.repeated & (1 << i) == 0 => {
                let (start, end) = self.fields.values[i];
                let present = self.fields.seen & (1 << i) != 0;
                let value = present.then(|| self.head.get(start as usize..end as usize));
                (value.flatten(), &[])
            }
            _ => (None, &self.head[..]),
        };
        first.into_iter().chain(scan_values(scanned, name))
    }
}

/// The values of the fields named `name` in `head`, by a scan of it.
fn scan_values<'a>(head: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    // httparse accepted the head: one field per line, `name:value`, no
    // obsolete line folding; the first line is the request line.
    head.split(|&b| b == b'\n').skip(1).filter_map(move |line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| trim(&line[colon + 1..]))
    })
}

/// What follows `scheme "://"` when `target` starts with one
/// (`scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`, RFC 3986 §3.1).
fn after_scheme(target: &[u8]) -> Option<&[u8]> {
    let colon = target.iter().position(|&b| b == b':')?;
    let (scheme, rest) = target.split_at(colon);
    let first_alpha = scheme.first().is_some_and(u8::is_ascii_alphabetic);
    let scheme_chars = scheme
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    (first_alpha && scheme_chars).then_some(())?;
    rest.strip_prefix(b"://")
}

/// Why a request cannot be served; the connection is closed after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed syntax or ambiguous framing (400).
    BadRequest(&'static str),
    /// Header section or header count over the limit (431).
    HeadersTooLarge,
    /// Request line over the limit (414).
    UriTooLong,
    /// Body over the limit (413).
    PayloadTooLarge,
    /// A transfer coding we do not implement (501).
    NotImplemented(&'static str),
    /// The client took too long to send the request (408).
    Timeout,
    /// The connection limit is reached (503).
    TooManyConnections,
    /// The handler panicked while serving this request (500).
    HandlerPanicked,
}

/// How the body of the request being decoded is delimited.
#[derive(Debug)]
enum Body {
    Length(usize),
    Chunked(ChunkedBody),
}

#[derive(Debug)]
struct PartialRequest {
    method: Method,
    target: Bytes,
    version: Version,
    keep_alive: bool,
    expect_continue: bool,
    upgrade_websocket: bool,
    fields: FieldIndex,
    body: Body,
    head: Bytes,
}

/// Incremental request decoder: call [`decode`](Self::decode) whenever more
/// bytes arrive; it consumes exactly the bytes of each complete request.
#[derive(Debug)]
pub struct RequestDecoder {
    limits: Limits,
    partial: Option<PartialRequest>,
}

impl RequestDecoder {
    pub fn new(limits: Limits) -> Self {
        RequestDecoder {
            limits,
            partial: None,
        }
    }

    /// Whether the head of a request has been read and its body has not.
    pub fn in_body(&self) -> bool {
        self.partial.is_some()
    }

    /// True once per request whose head asked for `100 Continue` and whose
    /// body has not fully arrived: the caller should send the interim reply.
    pub fn take_expect_continue(&mut self) -> bool {
        match &mut self.partial {
            Some(p) if p.expect_continue => {
                p.expect_continue = false;
                true
            }
            _ => false,
        }
    }

    /// Decodes the next complete request from the front of `buf`.
    /// `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, HttpError> {
        if self.partial.is_none() {
            match parse_head(buf, &self.limits)? {
                Some(partial) => self.partial = Some(partial),
                None => return Ok(None),
            }
        }
        let Some(partial) = self.partial.as_mut() else {
            return Ok(None);
        };
        let body = match &mut partial.body {
            Body::Length(len) => {
                if buf.len() < *len {
                    return Ok(None);
                }
                buf.split_to(*len).freeze()
            }
            Body::Chunked(chunked) => match chunked.decode(buf, &self.limits)? {
                Some(body) => body,
                None => return Ok(None),
            },
        };
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        Ok(Some(Request {
            method: p.method,
            target: p.target,
            version: p.version,
            keep_alive: p.keep_alive,
            body,
            head: p.head,
            peer: None,
            upgrade_websocket: p.upgrade_websocket,
            fields: p.fields,
        }))
    }
}

/// Upper bound for [`Limits::max_headers`]: the header array lives on the stack.
pub const MAX_HEADERS_CAP: usize = 128;

fn parse_head(buf: &mut BytesMut, limits: &Limits) -> Result<Option<PartialRequest>, HttpError> {
    skip_empty_lines(buf);
    if buf.is_empty() {
        return Ok(None);
    }
    let line_window = &buf[..buf.len().min(limits.max_request_line.saturating_add(1))];
    if !line_window.contains(&b'\n') && buf.len() > limits.max_request_line {
        return Err(HttpError::UriTooLong);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut headers[..limits.max_headers.min(MAX_HEADERS_CAP)]);
    let Some(head_len) = head_length(req.parse(buf), buf.len(), limits)? else {
        return Ok(None);
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let version = match req.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    let path = req.path.unwrap_or("/");
    let target_start = path.as_ptr() as usize - buf.as_ptr() as usize;
    let target_range = target_start..target_start + path.len();
    let fields = HeaderFields::scan(req.headers, version, buf.as_ptr() as usize)?;
    let (body, keep_alive) = fields.framing(version, limits)?;
    let has_body = !matches!(body, Body::Length(0));
    let head = buf.split_to(head_len).freeze();
    Ok(Some(PartialRequest {
        method,
        target: head.slice(target_range),
        version,
        keep_alive,
        expect_continue: fields.expect_continue && has_body,
        upgrade_websocket: fields.upgrade_websocket,
        fields: fields.index,
        body,
        head,
    }))
}

/// Skips the empty lines a client may send between requests (RFC 9112 §2.2).
fn skip_empty_lines(buf: &mut BytesMut) {
    while buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
        let n = if buf[0] == b'\r' { 2 } else { 1 };
        buf.advance(n);
    }
}

/// The head's length once httparse has it whole; `None` = more bytes needed.
fn head_length(
    parsed: httparse::Result<usize>,
    buffered: usize,
    limits: &Limits,
) -> Result<Option<usize>, HttpError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n <= limits.max_head => Ok(Some(n)),
        Ok(httparse::Status::Complete(_)) => Err(HttpError::HeadersTooLarge),
        Ok(httparse::Status::Partial) if buffered > limits.max_head => {
            Err(HttpError::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadersTooLarge),
        Err(httparse::Error::Version) => Err(HttpError::BadRequest("unsupported HTTP version")),
        Err(_) => Err(HttpError::BadRequest("malformed request head")),
    }
}

/// What the header fields say about framing and the connection.
#[derive(Default)]
struct HeaderFields {
    content_length: Option<usize>,
    chunked: bool,
    transfer_encoding: bool,
    close: bool,
    keep_alive_token: bool,
    expect_continue: bool,
    upgrade_websocket: bool,
    hosts: usize,
    index: FieldIndex,
}

impl HeaderFields {
    /// `head`: the address of the head's first byte, which the fields'
    /// values point into.
    fn scan(
        headers: &[httparse::Header<'_>],
        version: Version,
        head: usize,
    ) -> Result<Self, HttpError> {
        let mut f = HeaderFields::default();
        for header in headers {
            let name = header.name.as_bytes();
            let value = trim(header.value);
            let start = value.as_ptr() as usize - head;
            f.index.note(name, start..start + value.len());
            if name.eq_ignore_ascii_case(b"host") {
                f.hosts += 1;
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let len = parse_content_length(value)?;
                if f.content_length.is_some_and(|seen| seen != len) {
                    return Err(HttpError::BadRequest("conflicting Content-Length"));
                }
                f.content_length = Some(len);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.transfer_encoding = true;
                // Only a lone "chunked" is implemented; any other coding, or
                // chunked applied twice, is refused (RFC 9112 §6.1).
                for coding in value.split(|&b| b == b',').map(trim) {
                    if f.chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(HttpError::NotImplemented("unsupported Transfer-Encoding"));
                    }
                    f.chunked = true;
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',').map(trim) {
                    f.close |= token.eq_ignore_ascii_case(b"close");
                    f.keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade_websocket |= value
                    .split(|&b| b == b',')
                    .any(|p| trim(p).eq_ignore_ascii_case(b"websocket"));
            } else if name.eq_ignore_ascii_case(b"expect") {
                if !value.eq_ignore_ascii_case(b"100-continue") {
                    return Err(HttpError::BadRequest("unsupported Expect"));
                }
                f.expect_continue = version == Version::Http11;
            }
        }
        Ok(f)
    }

    /// The body's framing and whether the connection stays open, or why the
    /// request is refused.
    fn framing(&self, version: Version, limits: &Limits) -> Result<(Body, bool), HttpError> {
        // RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host and for any
        // request with more than one (which of two hosts was meant is a guess a
        // proxy in front may have made differently).
        if self.hosts > 1 {
            return Err(HttpError::BadRequest("more than one Host header"));
        }
        if self.hosts == 0 && version == Version::Http11 {
            return Err(HttpError::BadRequest("missing Host header"));
        }
        // Both framings at once is the classic smuggling vector (RFC 9112 §6.3).
        if self.transfer_encoding && self.content_length.is_some() {
            return Err(HttpError::BadRequest(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        if self.transfer_encoding && version == Version::Http10 {
            return Err(HttpError::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        let body = if self.chunked {
            Body::Chunked(ChunkedBody::default())
        } else {
            let len = self.content_length.unwrap_or(0);
            if len > limits.max_body {
                return Err(HttpError::PayloadTooLarge);
            }
            Body::Length(len)
        };
        let keep_alive = match version {
            Version::Http11 => !self.close,
            Version::Http10 => self.keep_alive_token && !self.close,
        };
        Ok((body, keep_alive))
    }
}

fn parse_content_length(value: &[u8]) -> Result<usize, HttpError> {
    const INVALID: HttpError = HttpError::BadRequest("invalid Content-Length");
    // 1*DIGIT only: no sign, no spaces inside, no overflow (RFC 9110 §8.6).
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(INVALID);
    }
    let len = value
        .iter()
        .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
    usize::try_from(len).map_err(|_| INVALID)
}

/// State of a `Transfer-Encoding: chunked` body being decoded (RFC 9112 §7.1).
#[derive(Debug, Default)]
struct ChunkedBody {
    decoded: BytesMut,
    phase: ChunkPhase,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkPhase {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailers(usize),
}

/// Longest chunk-size line (size plus extensions) we accept.
const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedBody {
    fn decode(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Bytes>, HttpError> {
        loop {
            match self.phase {
                ChunkPhase::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&line)?;
                    if self.decoded.len() + size > limits.max_body {
                        return Err(HttpError::PayloadTooLarge);
                    }
                    self.phase = if size == 0 {
                        ChunkPhase::Trailers(0)
                    } else {
                        ChunkPhase::Data(size)
                    };
                }
                ChunkPhase::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = remaining.min(buf.len());
                    self.decoded.extend_from_slice(&buf.split_to(n));
                    self.phase = if n == remaining {
                        ChunkPhase::DataEnd
                    } else {
                        ChunkPhase::Data(remaining - n)
                    };
                }
                ChunkPhase::DataEnd => {
                    let Some(line) = take_line(buf, 2)? else {
                        return Ok(None);
                    };
                    if !line.is_empty() {
                        return Err(HttpError::BadRequest("chunk data not followed by CRLF"));
                    }
                    self.phase = ChunkPhase::Size;
                }
                ChunkPhase::Trailers(seen) => {
                    let Some(line) = take_line(buf, limits.max_head)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        self.phase = ChunkPhase::Size;
                        return Ok(Some(std::mem::take(&mut self.decoded).freeze()));
                    }
                    // Trailer fields are read and ignored, within the head limit.
                    let seen = seen + line.len();
                    if seen > limits.max_head {
                        return Err(HttpError::HeadersTooLarge);
                    }
                    self.phase = ChunkPhase::Trailers(seen);
                }
            }
        }
    }
}

/// Takes one line (without its CRLF or bare LF) off the front of `buf`.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, HttpError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end <= max.saturating_add(1) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        Some(_) => Err(HttpError::BadRequest("line too long")),
        None if buf.len() > max.saturating_add(1) => Err(HttpError::BadRequest("line too long")),
        None => Ok(None),
    }
}

/// `chunk-size [ chunk-ext ]`: hex digits, then optional `;name[=value]`s.
fn parse_chunk_size(line: &[u8]) -> Result<usize, HttpError> {
    const INVALID: HttpError = HttpError::BadRequest("invalid chunk size");
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 15 {
        return Err(INVALID);
    }
    // No control character but HTAB in an extension (RFC 9112 §7.1.1: tokens
    // and quoted strings): a bare CR is where parsers disagree on where the
    // line ends (§2.2 says reject), a smuggling vector.
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(HttpError::BadRequest(
            "control character in a chunk extension",
        ));
    }
    let rest = trim(rest);
    if !rest.is_empty() && rest[0] != b';' {
        return Err(INVALID);
    }

    let size = digits.iter().fold(0u64, |acc, &d| {
        acc * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    });
    usize::try_from(size).map_err(|_| INVALID)
}

fn trim(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
