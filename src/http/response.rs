//! Responses and their serialisation straight into the connection's output
//! buffer.

use bytes::{BufMut, BytesMut};

use super::date::with_date;

/// A body produced piece by piece as the connection's output drains, so
/// that a large response is never held whole (a pull page of 100 × 64 KiB
/// control characters is ~39 MB of JSON from a 6.5 MB protobuf reply).
/// Its length is known up front (it is sent as `Content-Length`); a future
/// streamed response without a known length (SSE) would add a chunked or
/// close-delimited variant here.
pub trait BodySource: Send {
    /// Total body bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends more of the body to `out`, stopping once `out` holds at least
    /// `until` bytes; returns true when the whole body has been appended.
    fn fill(&mut self, out: &mut BytesMut, until: usize) -> bool;
}

/// A response ready to be written. The body is already serialised JSON, or
/// is produced by `stream` while being written.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// When set, the body (instead of `body`).
    pub stream: Option<Box<dyn BodySource>>,
    /// `Allow` header value, for 405.
    pub allow: Option<&'static str>,
    /// `Retry-After` seconds, for 503.
    pub retry_after: Option<u32>,
    /// Close the connection after this response.
    pub close: bool,
    /// One more header field, name and value (`Idempotent-Replayed: true`).
    pub extra_header: Option<(&'static str, &'static str)>,
    /// `Content-Type`: JSON unless set otherwise (the metrics' text format).
    pub content_type: &'static str,
}

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            body,
            stream: None,
            allow: None,
            retry_after: None,
            close: false,
            extra_header: None,
            content_type: "application/json",
        }
    }
}

impl Response {
    /// Body bytes, as sent in `Content-Length`.
    pub fn body_len(&self) -> usize {
        self.stream.as_ref().map_or(self.body.len(), |s| s.len())
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("body_len", &self.body_len())
            .field("streamed", &self.stream.is_some())
            .field("close", &self.close)
            .finish()
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Appends `resp` to `out`. `head_only` drops the body (for HEAD) but keeps
/// its Content-Length; `keep_alive` is the connection's decision after this
/// response, and `http10` makes keep-alive explicit for HTTP/1.0 clients.
/// A streamed body is not written here: the caller fills it as output drains.
pub fn write_response(
    out: &mut BytesMut,
    resp: &Response,
    head_only: bool,
    keep_alive: bool,
    http10: bool,
) {
    out.reserve(160 + if head_only { 0 } else { resp.body.len() });
    out.put_slice(b"HTTP/1.1 ");
    put_u64(out, u64::from(resp.status));
    out.put_u8(b' ');
    out.put_slice(reason(resp.status).as_bytes());
    out.put_slice(b"\r\nDate: ");
    with_date(|date| out.put_slice(date));
    out.put_slice(b"\r\nContent-Type: ");
    out.put_slice(resp.content_type.as_bytes());
    out.put_slice(b"\r\nContent-Length: ");
    put_u64(out, resp.body_len() as u64);
    if let Some(allow) = resp.allow {
        out.put_slice(b"\r\nAllow: ");
        out.put_slice(allow.as_bytes());
    }
    if let Some(secs) = resp.retry_after {
        out.put_slice(b"\r\nRetry-After: ");
        put_u64(out, u64::from(secs));
    }
    if let Some((name, value)) = resp.extra_header {
        out.put_slice(b"\r\n");
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
    }
    if !keep_alive {
        out.put_slice(b"\r\nConnection: close");
    } else if http10 {
        out.put_slice(b"\r\nConnection: keep-alive");
    }
    out.put_slice(b"\r\n\r\n");
    if !head_only && resp.stream.is_none() {
        out.put_slice(&resp.body);
    }
}

/// Decimal digits of `v`, without going through `fmt`.
pub fn put_u64(out: &mut BytesMut, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}
