//! The smallest HTTP/1.1 client etcd's JSON gateway needs: `POST` a JSON body,
//! read a `Content-Length` or chunked response. A pure codec ([`encode_post`],
//! [`parse_head`], [`ChunkDecoder`], [`JsonStream`]) and a thin I/O part
//! ([`Exchange`]).
//!
//! Why our own rather than an HTTP crate: the project already parses HTTP
//! with `httparse`, and a second HTTP stack (hyper, reqwest) would double the
//! dependency tree for four endpoints of one control-plane service that is
//! never on the request path.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head; etcd's are ~400 bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Largest single body or chunk we buffer: a range of a few thousand
/// endpoints is well under this.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// A `POST` of a JSON body. `Connection: close`: one exchange per connection
/// keeps the reader simple, and these calls are seconds apart.
pub fn encode_post(host: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
    /// Neither header: the body runs until the connection closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// Bytes of the head, to be consumed before the body.
    pub len: usize,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Parses a response head off the front of `buf`; `Ok(None)` until complete.
pub fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(invalid("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(format!("bad response head: {e}"))),
    };
    let mut framing = Framing::UntilClose;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            && h.value.eq_ignore_ascii_case(b"chunked")
        {
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| invalid("bad Content-Length"))?;
            if n > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            framing = Framing::Length(n);
        }
    }
    Ok(Some(Head {
        status: response.code.unwrap_or(0),
        framing,
        len,
    }))
}

/// Incremental chunked-body decoder.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    /// Data bytes left in the current chunk, and whether its CRLF follows.
    remaining: usize,
    in_chunk: bool,
    done: bool,
}

impl ChunkDecoder {
    /// Moves decoded data from `input` to `out`; returns true once the last
    /// chunk has been read (trailers are not used by etcd and are skipped
    /// up to the blank line).
    pub fn decode(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> io::Result<bool> {
        while !self.done {
            if self.in_chunk {
                if self.remaining > 0 {
                    let n = self.remaining.min(input.len());
                    if n == 0 {
                        return Ok(false);
                    }
                    out.extend_from_slice(&input[..n]);
                    input.advance(n);
                    self.remaining -= n;
                    continue;
                }
                if input.len() < 2 {
                    return Ok(false);
                }
                if &input[..2] != b"\r\n" {
                    return Err(invalid("chunk not followed by CRLF"));
                }
                input.advance(2);
                self.in_chunk = false;
                continue;
            }
            let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
                if input.len() > 1024 {
                    return Err(invalid("chunk size line too long"));
                }
                return Ok(false);
            };
            let line = std::str::from_utf8(&input[..end]).map_err(|_| invalid("bad chunk size"))?;
            let hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| invalid("bad chunk size"))?;
            if size > MAX_BODY {
                return Err(invalid("chunk too large"));
            }
            input.advance(end + 2);
            if size == 0 {
                // Skip trailers through the terminating blank line.
                match input.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        input.advance(2);
                        self.done = true;
                    }
                    _ => {
                        // Not worth supporting: etcd sends none. Treat the
                        // body as over.
                        self.done = true;
                    }
                }
            } else {
                self.remaining = size;
                self.in_chunk = true;
            }
        }
        Ok(true)
    }
}

/// Splits a byte stream of concatenated JSON values (etcd's watch: one
/// object per message, newline-separated) into values as they complete.
#[derive(Debug, Default)]
pub struct JsonStream {
    buf: Vec<u8>,
}

impl JsonStream {
    pub fn push(&mut self, data: &[u8]) -> io::Result<Vec<serde_json::Value>> {
        self.buf.extend_from_slice(data);
        if self.buf.len() > MAX_BODY {
            return Err(invalid("streamed JSON value too large"));
        }
        let mut values = Vec::new();
        let mut stream =
            serde_json::Deserializer::from_slice(&self.buf).into_iter::<serde_json::Value>();
        let consumed = loop {
            let offset = stream.byte_offset();
            match stream.next() {
                Some(Ok(value)) => values.push(value),
                Some(Err(e)) if e.is_eof() => break offset,
                Some(Err(e)) => return Err(invalid(format!("bad JSON in stream: {e}"))),
                None => break stream.byte_offset(),
            }
        };
        self.buf.drain(..consumed);
        Ok(values)
    }
}

/// One request/response exchange over its own connection.
pub struct Exchange {
    stream: TcpStream,
    input: BytesMut,
    pub head: Head,
    chunks: ChunkDecoder,
    /// Body bytes still expected (Length framing).
    left: usize,
    finished: bool,
}

impl Exchange {
    /// Connects to `host` (`host:port`), sends the request and reads the head.
    pub async fn post(host: &str, path: &str, body: &[u8], timeout: Duration) -> io::Result<Self> {
        let connect = tokio::time::timeout(timeout, TcpStream::connect(host));
        let mut stream = connect
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        tokio::time::timeout(timeout, stream.write_all(&encode_post(host, path, body)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))??;
        let mut input = BytesMut::with_capacity(4096);
        let head = loop {
            if let Some(head) = parse_head(&input)? {
                break head;
            }
            let read = tokio::time::timeout(timeout, stream.read_buf(&mut input));
            let n = read
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response"))??;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        input.advance(head.len);
        let left = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Ok(Exchange {
            stream,
            input,
            head,
            chunks: ChunkDecoder::default(),
            left,
            finished: false,
        })
    }

    /// The next piece of body, waiting for it; `None` at the end.
    pub async fn next_data(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.finished {
                return Ok(None);
            }
            let mut out = Vec::new();
            match self.head.framing {
                Framing::Chunked => {
                    self.finished = self.chunks.decode(&mut self.input, &mut out)?;
                }
                Framing::Length(_) => {
                    let n = self.left.min(self.input.len());
                    out.extend_from_slice(&self.input[..n]);
                    self.input.advance(n);
                    self.left -= n;
                    self.finished = self.left == 0;
                }
                Framing::UntilClose => {
                    out.extend_from_slice(&self.input);
                    self.input.clear();
                }
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
            if self.finished {
                return Ok(None);
            }
            let n = self.stream.read_buf(&mut self.input).await?;
            if n == 0 {
                if self.head.framing == Framing::UntilClose {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The whole body (bounded by [`MAX_BODY`]).
    pub async fn body(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(data) = self.next_data().await? {
            body.extend_from_slice(&data);
            if body.len() > MAX_BODY {
                return Err(invalid("response body too large"));
            }
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_is_well_formed() {
        let req = encode_post("127.0.0.1:2379", "/v3/kv/range", b"{}");
        let text = String::from_utf8(req).expect("ascii");
        assert!(text.starts_with("POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1:2379\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn heads_with_length_chunked_or_neither() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{")
            .expect("valid")
            .expect("complete");
        assert_eq!((h.status, h.framing, h.len), (200, Framing::Length(17), 39));
        let h = parse_head(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!((h.status, h.framing), (404, Framing::Chunked));
        let h = parse_head(b"HTTP/1.1 200 OK\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.framing, Framing::UntilClose);
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").expect("valid"),
            None
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"NOTHTTP\r\n\r\n").is_err());
    }

    #[test]
    fn chunks_decode_split_at_every_byte() {
        let wire: &[u8] = b"8\r\n{\"a\":1}\n\r\n3;ext=1\r\nxyz\r\n0\r\n\r\n";
        for split in 0..=wire.len() {
            let mut decoder = ChunkDecoder::default();
            let mut input = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            let mut done = decoder.decode(&mut input, &mut out).expect("valid");
            input.extend_from_slice(&wire[split..]);
            done |= decoder.decode(&mut input, &mut out).expect("valid");
            assert!(done, "split at {split}");
            assert_eq!(out, b"{\"a\":1}\nxyz", "split at {split}");
        }
        let mut bad = BytesMut::from(&b"zz\r\n"[..]);
        assert!(
            ChunkDecoder::default()
                .decode(&mut bad, &mut Vec::new())
                .is_err()
        );
        let mut no_crlf = BytesMut::from(&b"1\r\nabc"[..]);
        assert!(
            ChunkDecoder::default()
                .decode(&mut no_crlf, &mut Vec::new())
                .is_err()
        );
    }

    #[test]
    fn json_stream_yields_values_as_they_complete() {
        let mut s = JsonStream::default();
        assert!(s.push(b"{\"result\":{\"a\"").expect("valid").is_empty());
        let v = s.push(b":1}}\n{\"result\":2}\n{").expect("valid");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["result"]["a"], 1);
        assert_eq!(v[1]["result"], 2);
        let v = s.push(b"}").expect("valid");
        assert_eq!(v, vec![serde_json::json!({})]);
        assert!(s.push(b"]").is_err());
    }
}
