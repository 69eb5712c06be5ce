//! A handler that panics costs only its own request: the HTTP layer answers
//! 500 and the same connection serves the next request. The panic cannot be
//! provoked through the real gateway, so this runs the real HTTP server
//! (`im_server::http::serve`) with a handler built to panic, over a real socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use im_server::http::server::{ServerOptions, connection_slots};
use im_server::http::{Handler, HttpError, Request, Response};

/// Panics in `start` for `/panic-start`, in `finish` for `/panic-finish`,
/// answers 200 otherwise.
struct PanickyHandler;

impl Handler for PanickyHandler {
    type Pending = Vec<u8>;

    fn start(&self, req: &Request, _account: &im_server::budget::Account) -> Vec<u8> {
        if &req.target[..] == b"/panic-start" {
            panic!("test panic in start");
        }
        req.target.to_vec()
    }

    async fn finish(&self, target: Vec<u8>) -> Response {
        tokio::task::yield_now().await;
        if target == b"/panic-finish" {
            panic!("test panic in finish");
        }
        Response::json(200, br#"{"ok":true}"#.to_vec())
    }

    fn reject(&self, err: HttpError) -> Response {
        let status = match err {
            HttpError::HandlerPanicked => 500,
            _ => 400,
        };
        Response::json(status, b"{}".to_vec())
    }
}

/// Reads one response with a Content-Length body; returns (status, body).
fn read_response(conn: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte).expect("response head");
        assert_eq!(n, 1, "connection closed before a full response head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).expect("ASCII head");
    let status = head[9..12].parse().expect("status code");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().expect("length"))
        })
        .expect("Content-Length");
    let mut body = vec![0; length];
    conn.read_exact(&mut body).expect("body");
    (status, body)
}

#[test]
fn a_panicking_request_is_a_500_and_the_connection_carries_on() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let options = ServerOptions::default();
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let server = im_server::http::serve(
        listener,
        Arc::new(PanickyHandler),
        options,
        connection_slots(&options),
        im_server::budget::MemoryBudget::new(im_server::budget::DEFAULT_MAX),
        stopping,
    );
    std::thread::spawn(move || runtime.block_on(server));

    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for (path, status) in [
        ("/ok", 200),
        ("/panic-start", 500),
        ("/ok", 200),
        ("/panic-finish", 500),
        ("/ok", 200),
    ] {
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        assert_eq!(
            read_response(&mut conn).0,
            status,
            "GET {path} on the same connection"
        );
    }
    // Pipelined: the panic in the middle does not disturb its neighbours.
    conn.write_all(
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /panic-finish HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("write");
    let statuses: Vec<u16> = (0..3).map(|_| read_response(&mut conn).0).collect();
    assert_eq!(statuses, [200, 500, 200]);
}
