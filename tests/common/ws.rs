//! A raw WebSocket client over a blocking TCP socket, on the library's own
//! frame codec ([`im_server::ws::frame`]) in its client role: it can send
//! whatever frame a test needs, valid or not, and reads the server's frames
//! as a strict client would (unmasked, well-formed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use im_server::ws::frame::{Decoder, Incoming, Side, opcode, put_client_frame};
use serde_json::Value;

use super::*;

/// A key and its accept value from RFC 6455 §1.3.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

pub struct WsClient {
    reader: BufReader<TcpStream>,
    input: BytesMut,
    decoder: Decoder,
}

/// The upgrade request for `/api/ws` with `extra` header lines.
pub fn ws_handshake(extra: &[(&str, &str)]) -> String {
    let mut head = format!(
        "GET /api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

impl WsClient {
    /// Connects and upgrades; panics unless the answer is a right 101.
    pub fn connect(addr: SocketAddr, extra: &[(&str, &str)]) -> WsClient {
        match WsClient::try_connect(addr, extra) {
            Ok(client) => client,
            Err(resp) => panic!("upgrade refused: {}", resp.describe()),
        }
    }

    /// Connects and upgrades; the response if it is not a 101.
    pub fn try_connect(addr: SocketAddr, extra: &[(&str, &str)]) -> Result<WsClient, Response> {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .write_all(ws_handshake(extra).as_bytes())
            .expect("write the handshake");
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        if !status.starts_with("HTTP/1.1 101 ") {
            let rest = read_response_rest(&mut reader, &status);
            return Err(rest);
        }
        let mut accept = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("sec-websocket-accept")
            {
                accept = Some(value.trim().to_string());
            }
        }
        assert_eq!(accept.as_deref(), Some(WS_ACCEPT), "Sec-WebSocket-Accept");
        // Bytes past the head already buffered are frames.
        let input = BytesMut::from(reader.buffer());
        let consumed = reader.buffer().len();
        reader.consume(consumed);
        Ok(WsClient {
            reader,
            input,
            decoder: Decoder::new(Side::Client, 64 << 20),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream().set_read_timeout(Some(t)).expect("timeout");
    }

    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("write");
    }

    pub fn send_frame(&mut self, fin: bool, op: u8, payload: &[u8]) {
        let mut out = BytesMut::new();
        put_client_frame(&mut out, fin, op, payload, [0x12, 0x34, 0x56, 0x78]);
        self.write_raw(&out);
    }

    pub fn send_json(&mut self, value: &Value) {
        self.send_frame(true, opcode::TEXT, value.to_string().as_bytes());
    }

    /// The next frame (a whole message), or `None` at the end of the stream.
    pub fn try_recv(&mut self) -> std::io::Result<Option<Incoming>> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.decoder.decode(&mut self.input) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(err) => panic!("the server sent a bad frame: {err:?}"),
            }
            let n = self.reader.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn recv(&mut self) -> Incoming {
        match self.try_recv() {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("the server closed the connection"),
            Err(err) => panic!("reading a frame: {err}"),
        }
    }

    /// The next text message as JSON (see [`WsClient::recv_text`]).
    pub fn recv_json(&mut self) -> Value {
        serde_json::from_slice(&self.recv_text()).expect("JSON")
    }

    /// The next text message; pings are answered, as a client must.
    pub fn recv_text(&mut self) -> bytes::Bytes {
        loop {
            match self.recv() {
                Incoming::Text(text) => return text,
                Incoming::Ping(payload) => self.send_frame(true, opcode::PONG, &payload),
                Incoming::Pong(_) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Sends `request` and waits for the reply with its `id` (events and
    /// other replies before it are returned too, in order).
    pub fn call(&mut self, request: Value) -> (Value, Vec<Value>) {
        let id = request["id"].clone();
        self.send_json(&request);
        let mut before = Vec::new();
        loop {
            let v = self.recv_json();
            if v.get("id") == Some(&id) {
                return (v, before);
            }
            before.push(v);
        }
    }

    /// Reads until the server's close frame, answers it as a client must
    /// (the same code), and asserts the TCP connection is closed; its code.
    pub fn expect_close(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no close frame");
            match self.recv() {
                Incoming::Close(close) => {
                    let code = close.map_or(1005, |(code, _)| code);
                    // Ignored if the server closed already (it echoed ours).
                    let mut answer = bytes::BytesMut::new();
                    let echo = if code == 1005 {
                        vec![]
                    } else {
                        code.to_be_bytes().to_vec()
                    };
                    put_client_frame(&mut answer, true, opcode::CLOSE, &echo, [9, 9, 9, 9]);
                    let _ = self.reader.get_mut().write_all(&answer);
                    self.expect_eof();
                    return code;
                }
                _ => continue,
            }
        }
    }

    /// Asserts the server closes the TCP connection (no more frames).
    pub fn expect_eof(&mut self) {
        match self.try_recv() {
            Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }
}

/// The rest of a non-101 response whose status line was read.
fn read_response_rest(reader: &mut BufReader<TcpStream>, status: &str) -> Response {
    let mut whole = status.as_bytes().to_vec();
    let mut buf = Vec::new();
    let _ = reader.read_to_end(&mut buf);
    whole.extend_from_slice(&buf);
    read_response(&mut std::io::Cursor::new(whole), false).expect("an HTTP response")
}
