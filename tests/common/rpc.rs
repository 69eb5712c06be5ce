//! One raw client of the internal RPC protocol (length-prefixed frames of
//! protobuf bodies), built on the library's own codec and proto types.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use im_server::proto::{Message, PullRequest, PullResponse, SendRequest, SendResponse};
use im_server::rpc::frame::{self, Frame};
use im_server::rpc::method::PULL;
use im_server::rpc::status::OK;
use prost::Message as _;

use super::*;

/// A SendRequest body.
pub fn send_request_body(chat: &str, sender: &str, text: &str) -> Vec<u8> {
    let message = Message {
        chat: chat.into(),
        text: text.into(),
        sender: sender.into(),
        send_time: 0,
        edited_at: 0,
    };
    SendRequest {
        message: Some(message),
        ..SendRequest::default()
    }
    .encode_to_vec()
}

/// A PullRequest body (`limit` 0: the server's default).
pub fn pull_request_body(chat: &str, limit: i32) -> Vec<u8> {
    PullRequest {
        chat: chat.into(),
        limit,
        ..PullRequest::default()
    }
    .encode_to_vec()
}

/// One frame, encoded by the library's codec.
pub fn rpc_frame(id: u64, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frame::encode_raw(&mut out, id, kind, body);
    out.to_vec()
}

/// The `code` of a SendResponse or PullResponse body.
pub fn response_code(body: &[u8]) -> i32 {
    SendResponse::decode(body)
        .map(|r| r.code)
        .or_else(|_| PullResponse::decode(body).map(|r| r.code))
        .unwrap_or_else(|e| panic!("undecodable response body: {e}"))
}

/// A connection to an RPC server with the test I/O timeouts.
/// A connection with `timeout` for connecting, reading and writing.
fn rpc_connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether the peer has closed `stream` (EOF or reset), waiting up to `wait`
/// and discarding whatever it still sends.
pub fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return false,
            Err(_) => return true, // reset
        }
    }
}

/// Replies are never bigger than this (the server's largest frame).
const MAX_REPLY_FRAME: usize = 16 << 20;

/// A raw RPC connection: frames out, frames in (decoded by the library's own
/// codec). Derefs to its socket for writes and socket options.
pub struct RpcConn {
    pub stream: TcpStream,
    /// Bytes read but not yet decoded into a frame.
    input: BytesMut,
}

impl std::ops::Deref for RpcConn {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl std::ops::DerefMut for RpcConn {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl RpcConn {
    pub fn connect(addr: SocketAddr) -> RpcConn {
        RpcConn::try_connect(addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to rpc {addr}: {e}"))
    }

    /// A connection, or why there is none; `timeout` bounds the connect
    /// and each read and write.
    pub fn try_connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<RpcConn> {
        Ok(RpcConn {
            stream: rpc_connect(addr, timeout)?,
            input: BytesMut::new(),
        })
    }

    /// An accepted connection (a test standing in for a server or relay).
    pub fn from_stream(stream: TcpStream) -> RpcConn {
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        RpcConn {
            stream,
            input: BytesMut::new(),
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("rpc write: {e}"));
    }

    pub fn write_frame(&mut self, id: u64, kind: u8, body: &[u8]) {
        self.write(&rpc_frame(id, kind, body));
    }

    /// The next frame; `None` once the connection is closed, reset or times
    /// out. Panics on a frame the codec refuses.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.try_next_frame().ok()
    }

    fn try_next_frame(&mut self) -> std::io::Result<Frame> {
        loop {
            let decoded = frame::decode(&mut self.input, MAX_REPLY_FRAME)
                .unwrap_or_else(|e| panic!("an invalid reply frame: {e:?}"));
            if let Some(frame) = decoded {
                return Ok(frame);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk)? {
                0 => return Err(ErrorKind::UnexpectedEof.into()),
                n => self.input.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads one reply frame: (id, kind, body); panics if there is none.
    pub fn read_frame(&mut self, ctx: &str) -> (u64, u8, Vec<u8>) {
        let f = self
            .try_next_frame()
            .unwrap_or_else(|e| panic!("{ctx}: reading a reply frame: {e}"));
        (f.id, f.method_or_status, f.body.to_vec())
    }

    /// A valid Pull on this connection gets an OK reply with its id and code 0.
    pub fn assert_pull_ok(&mut self, id: u64, ctx: &str) {
        self.write_frame(id, PULL, &pull_request_body("probe", 1));
        let (got_id, kind, body) = self.read_frame(ctx);
        assert_eq!(
            (got_id, kind),
            (id, OK),
            "{ctx}: a valid Pull must get an OK reply with the same id (body {body:?})"
        );
        assert_eq!(response_code(&body), 0, "{ctx}: Pull of chat \"probe\"");
    }

    /// Asserts the server closes the connection (EOF or reset) within 3 s and
    /// sends nothing more.
    pub fn assert_closed(&mut self, ctx: &str) {
        assert!(
            self.input.is_empty(),
            "{ctx}: expected the rpc connection to be closed, got {} more bytes",
            self.input.len()
        );
        let mut reader = self.stream.try_clone().unwrap();
        assert_closed_within(&self.stream, &mut reader, Duration::from_secs(3), ctx);
    }
}

/// A Pull on a fresh connection is answered OK with code 0.
pub fn assert_rpc_serves(addr: SocketAddr, ctx: &str) {
    RpcConn::connect(addr).assert_pull_ok(9, &format!("{ctx}: fresh connection"));
}
