//! Responses and their serialisation straight into the connection's output
//! buffer.

use std::future::Future;
use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};

use super::date::with_date;
use crate::digits::{put_hex, put_u64};

/// A body produced piece by piece as the connection's output drains, so
/// that a large response is never held whole (a pull page of 100 × 64 KiB
/// control characters is ~39 MB of JSON from a 6.5 MB protobuf reply).
/// Its length is known up front (it is sent as `Content-Length`); a
/// response of unknown length (SSE) is an [`EventSource`] instead.
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

/// The next batch of events of an [`EventSource`]: its bytes, for
/// [`EventSource::take`], or the final event to write when the source
/// failed (the stream then ends).
pub type Batch = Result<Bytes, Vec<u8>>;

/// The body of a Server-Sent Events response (`text/event-stream`): events
/// without end, rendered as the output drains. The connection's policy
/// ([`super::conn`]) decides when to render, wait, send a heartbeat or give
/// up on a reader; the source only knows its events.
pub trait EventSource: Send {
    /// Appends buffered events (whole ones) to `out`, stopping once `out`
    /// holds at least `until` bytes; true while more remain buffered.
    fn fill(&mut self, out: &mut BytesMut, until: usize) -> bool;
    /// Waits for the next batch. The future owns what it needs, so the
    /// connection keeps it across heartbeats instead of abandoning a
    /// waiting call every time it writes one.
    fn more(&mut self) -> Pin<Box<dyn Future<Output = Batch> + Send>>;
    /// Takes the batch that [`EventSource::more`] produced, to be rendered
    /// by [`EventSource::fill`].
    fn take(&mut self, batch: Bytes);
    /// The body's media type (a stream of another format than SSE, e.g.
    /// the NDJSON of `/api/export`).
    fn content_type(&self) -> &'static [u8] {
        b"text/event-stream"
    }
    /// What is written after a silence (nothing: no heartbeat).
    fn heartbeat(&self) -> &'static [u8] {
        HEARTBEAT
    }
    /// What ends the body when the reader lags.
    fn lagged(&self) -> &'static [u8] {
        LAGGED_EVENT
    }
}

/// An SSE comment, written after [`super::conn::Settings::heartbeat`] of
/// silence so that proxies and clients see a live connection.
pub const HEARTBEAT: &[u8] = b": hb\n\n";
/// The final event to a reader that could not take the stream's output
/// within the write timeout (see docs/api.md, `GET /api/stream`).
pub const LAGGED_EVENT: &[u8] = b"event: lagged\ndata: {\"error\":{\"code\":\"lagged\",\"message\":\"the client read too slowly; reconnect with Last-Event-ID to resume\"}}\n\n";

/// What takes over a connection after a `101 Switching Protocols` (the
/// WebSocket session, [`crate::ws`]): the HTTP driver writes the 101 with
/// its header lines, then hands it the socket and any bytes already read.
pub trait Upgrade: Send {
    /// The 101's header lines after `Date`, each as `\r\nName: value`.
    fn put_head(&self, out: &mut BytesMut);
    /// Serves the connection until it ends; `shutdown` turns true when the
    /// process stops.
    fn run(
        self: Box<Self>,
        socket: tokio::net::TcpStream,
        input: BytesMut,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
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
    /// When set, an event stream: `200` with `Content-Type:
    /// text/event-stream`, no `Content-Length`, and the connection ends
    /// with it.
    pub events: Option<Box<dyn EventSource>>,
    /// When set, `101 Switching Protocols`: the connection is handed to it.
    pub upgrade: Option<Box<dyn Upgrade>>,
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
            events: None,
            upgrade: None,
        }
    }

    /// `101 Switching Protocols`, the connection then served by `upgrade`.
    pub fn switching(upgrade: Box<dyn Upgrade>) -> Response {
        let mut resp = Response::json(101, Vec::new());
        resp.upgrade = Some(upgrade);
        resp.close = true;
        resp
    }

    /// `200 text/event-stream`, its events from `events`.
    pub fn event_stream(events: Box<dyn EventSource>) -> Response {
        let mut resp = Response::json(200, Vec::new());
        resp.events = Some(events);
        resp.close = true;
        resp
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
            .field("events", &self.events.is_some())
            .field("close", &self.close)
            .finish()
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
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
    if let Some(upgrade) = &resp.upgrade {
        // No body, no Content-Length (RFC 9110 §8.6), its own `Connection`.
        upgrade.put_head(out);
        out.put_slice(b"\r\n\r\n");
        return;
    }
    if let Some(events) = &resp.events {
        put_event_stream_head(out, events.content_type(), http10);
    } else {
        out.put_slice(b"\r\nContent-Type: ");
        out.put_slice(resp.content_type.as_bytes());
        out.put_slice(b"\r\nContent-Length: ");
        put_u64(out, resp.body_len() as u64);
    }
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

/// The framing of an event stream. HTTP/1.1 gets chunked coding rather
/// than a close-delimited body: its last chunk tells a client (and a proxy)
/// that the server ended the stream on purpose, where a bare close looks
/// like a cut connection (RFC 9112 §6.3 lets close delimit a response only
/// as a last resort; §7.1 chunking exists for this). HTTP/1.0 has no chunked
/// coding (§6.1: not to be sent to it), so there the close ends the body.
/// `no-store`: the events are live, never to be cached; `X-Accel-Buffering`
/// keeps nginx from buffering them when it is the proxy in front.
fn put_event_stream_head(out: &mut BytesMut, content_type: &[u8], http10: bool) {
    out.put_slice(b"\r\nContent-Type: ");
    out.put_slice(content_type);
    out.put_slice(b"\r\nCache-Control: no-store\r\nX-Accel-Buffering: no");
    if !http10 {
        out.put_slice(b"\r\nTransfer-Encoding: chunked");
    }
}

/// Appends `data` as one chunk (`chunked`), or as it is (a close-delimited
/// body, HTTP/1.0). Empty data appends nothing: an empty chunk would end
/// the body.
pub fn put_chunk(out: &mut BytesMut, data: &[u8], chunked: bool) {
    if data.is_empty() {
        return;
    }
    if chunked {
        put_hex(out, data.len());
        out.put_slice(b"\r\n");
        out.put_slice(data);
        out.put_slice(b"\r\n");
    } else {
        out.put_slice(data);
    }
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_framed_with_hex_sizes() {
        let mut out = BytesMut::new();
        put_chunk(&mut out, &[b'x'; 26], true);
        put_chunk(&mut out, b"", true);
        put_chunk(&mut out, b"ab", false);
        out.put_slice(LAST_CHUNK);
        let mut expected = b"1a\r\n".to_vec();
        expected.extend_from_slice(&[b'x'; 26]);
        expected.extend_from_slice(b"\r\nab0\r\n\r\n");
        assert_eq!(&out[..], &expected[..]);
    }
}
