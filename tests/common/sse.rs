//! A Server-Sent Events client (tests/stream.rs).

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use super::*;

/// One item of an event stream: an event, or a comment (a heartbeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    Event(SseEvent),
    Comment(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `event:`; `None` is the default type, `message`.
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The id's send_time (an id is `<send_time>.<change seq>`; panics if
    /// absent or not numbers).
    pub fn send_time(&self) -> i64 {
        self.cursors().0
    }

    /// The id's two cursors: send_time and change sequence.
    pub fn cursors(&self) -> (i64, i64) {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("no id: {self:?}"));
        let (t, s) = id
            .split_once('.')
            .unwrap_or_else(|| panic!("id {id:?} is not <send_time>.<seq>"));
        let number = |v: &str| {
            v.parse()
                .unwrap_or_else(|_| panic!("id {id:?} is not <send_time>.<seq>"))
        };
        (number(t), number(s))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data of {self:?} is not JSON: {e}"))
    }
}

/// A client of `GET /api/stream`: the response head, then items as they
/// come, decoding chunked (HTTP/1.1) or close-delimited (HTTP/1.0) bodies.
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    socket: TcpStream,
    chunked: bool,
    /// Body bytes received and not yet parsed into items.
    pending: Vec<u8>,
    /// The body ended: the last chunk (`clean`) or EOF.
    ended: bool,
    /// The body ended with chunked coding's last chunk.
    pub clean_end: bool,
}

impl SseStream {
    /// `GET path` with `Accept: text/event-stream` (unless `headers` has an
    /// `Accept`); panics unless the answer is a 200 event stream.
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseStream {
        match SseStream::try_open(addr, path, headers, "HTTP/1.1") {
            Ok(stream) => stream,
            Err(r) => panic!("GET {path}: expected an event stream, got {}", r.describe()),
        }
    }

    /// The stream, or the (non-200) response.
    pub fn try_open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        version: &str,
    ) -> Result<SseStream, Response> {
        let socket = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        SseStream::open_on(socket, addr, path, headers, version)
    }

    /// [`SseStream::try_open`] from the local address `from` (another
    /// client to the server's per-client limits).
    pub fn try_open_from(
        addr: SocketAddr,
        from: std::net::IpAddr,
        path: &str,
    ) -> Result<SseStream, Response> {
        let socket = HttpConn::connect_from(addr, from).stream;
        SseStream::open_on(socket, addr, path, &[], "HTTP/1.1")
    }

    fn open_on(
        socket: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        version: &str,
    ) -> Result<SseStream, Response> {
        socket.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            all.push(("Accept", "text/event-stream"));
        }
        let mut req = format_request(&addr.to_string(), "GET", path, &all, b"");
        if version != "HTTP/1.1" {
            let line_end = req.iter().position(|&b| b == b'\r').expect("request line");
            let line = String::from_utf8_lossy(&req[..line_end]).replace("HTTP/1.1", version);
            req.splice(..line_end, line.into_bytes());
        }
        (&socket).write_all(&req).expect("write the request");
        let mut reader = BufReader::new(socket.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        let mut parts = line.trim_end().splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).expect("status");
        let reason = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header field");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if status != 200 {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).expect("error body");
            return Err(Response {
                version,
                status,
                reason,
                headers,
                body,
            });
        }
        let chunked = header("transfer-encoding").is_some_and(|v| v == "chunked");
        Ok(SseStream {
            status,
            headers,
            reader,
            socket,
            chunked,
            pending: Vec::new(),
            ended: false,
            clean_end: false,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.socket.set_read_timeout(Some(t)).expect("timeout");
    }

    /// The next item; `Ok(None)` once the body has ended.
    pub fn next_item(&mut self) -> io::Result<Option<SseItem>> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..end + 2).collect();
                return Ok(Some(parse_sse_block(&String::from_utf8_lossy(&block))));
            }
            if self.ended {
                return Ok(None);
            }
            self.read_body()?;
        }
    }

    /// The next event, skipping comments; panics at the end or on error.
    pub fn next_event(&mut self) -> SseEvent {
        loop {
            match self.next_item() {
                Ok(Some(SseItem::Event(e))) => return e,
                Ok(Some(SseItem::Comment(_))) => {}
                Ok(None) => panic!("the stream ended while an event was expected"),
                Err(e) => panic!("reading the stream: {e}"),
            }
        }
    }

    /// Reads the rest of the body: every item until the end (panics if it
    /// does not end within the read timeout).
    pub fn read_to_end(&mut self) -> Vec<SseItem> {
        let mut items = Vec::new();
        loop {
            match self.next_item() {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return items,
                Err(e) => panic!("the stream did not end: {e} (after {} items)", items.len()),
            }
        }
    }

    fn read_body(&mut self) -> io::Result<()> {
        if !self.chunked {
            let mut buf = [0u8; 16 * 1024];
            match self.reader.read(&mut buf)? {
                0 => self.ended = true,
                n => self.pending.extend_from_slice(&buf[..n]),
            }
            return Ok(());
        }
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            self.ended = true;
            return Ok(());
        }
        let size = usize::from_str_radix(line.trim_end(), 16)
            .map_err(|_| io::Error::new(ErrorKind::InvalidData, format!("chunk size {line:?}")))?;
        let mut data = vec![0u8; size + 2];
        self.reader.read_exact(&mut data)?;
        assert_eq!(&data[size..], b"\r\n", "chunk not followed by CRLF");
        if size == 0 {
            self.ended = true;
            self.clean_end = true;
        }
        self.pending.extend_from_slice(&data[..size]);
        Ok(())
    }
}

fn parse_sse_block(block: &str) -> SseItem {
    let mut event = SseEvent::default();
    let mut comment = None;
    for line in block.lines().filter(|l| !l.is_empty()) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => comment = Some(value.to_string()),
            "id" => event.id = Some(value.to_string()),
            "event" => event.event = Some(value.to_string()),
            "data" if event.data.is_empty() => event.data = value.to_string(),
            "data" => event.data = format!("{}\n{value}", event.data),
            other => panic!("unexpected SSE field {other:?} in {block:?}"),
        }
    }
    match comment {
        Some(c) if event == SseEvent::default() => SseItem::Comment(c),
        _ => SseItem::Event(event),
    }
}
