//! The gateway bounded under abuse (issue #8, gateway items; issue #11,
//! hostile-HTTP gaps): responses never read, peers that stop reading,
//! requests split across reads, targets and bodies that try to confuse
//! routing or echo, Host rules, silent connections. Memory is measured from
//! /proc/<pid>/status of the real server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MIB: u64 = 1024 * 1024;
/// The pull that amplifies most: a full page of 64 KiB messages of control
/// characters, each written as `\u0001` (6 bytes) — ~39 MB of JSON.
const BIG_PULL: &[u8] = b"GET /api/pull?chat=big&limit=100 HTTP/1.1\r\nHost: x\r\n\r\n";

fn populate_big_chat(addr: SocketAddr) -> String {
    let text = "\u{1}".repeat(64 * 1024);
    let mut conn = HttpConn::connect(addr);
    for _ in 0..100 {
        conn.send_ok("big", "s", &text);
    }
    text
}

fn rss(server: &Server) -> u64 {
    proc_status_bytes(server.pid().expect("server pid"), "VmRSS")
}

/// Opens a connection, pipelines 64 big pulls and reads nothing.
fn unread_big_pulls(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&BIG_PULL.repeat(64)).expect("write pulls");
    s
}

/// The highest RSS over `span` (the server keeps working on the pulls).
fn peak_rss(server: &Server, span: Duration) -> u64 {
    peak_rss_bytes(server.pid().expect("server pid"), span)
}

#[test]
fn unread_pipelined_big_pulls_stay_within_the_output_bound() {
    // What is bounded here is memory, not time: pipelined pulls of 38 MB
    // pages start together, and in a debug build on a loaded machine the
    // third could take longer than the default 1 s RPC timeout (504).
    let server = Server::start("all", &["--rpc-timeout-ms", "10000"], &[]);
    let addr = server.http_addr();
    let text = populate_big_chat(addr);

    let base = rss(&server);
    let one = unread_big_pulls(addr);
    let grown = peak_rss(&server, Duration::from_secs(4)).saturating_sub(base);
    eprintln!(
        "one connection of 64 unread big pulls: +{} MiB",
        grown / MIB
    );
    assert!(
        grown <= 128 * MIB,
        "one connection grew the server by {} MiB",
        grown / MIB
    );

    let mut all = vec![one];
    all.extend((0..9).map(|_| unread_big_pulls(addr)));
    let grown = peak_rss(&server, Duration::from_secs(6)).saturating_sub(base);
    eprintln!(
        "ten connections of 64 unread big pulls: +{} MiB",
        grown / MIB
    );
    assert!(
        grown <= 256 * MIB,
        "ten connections grew the server by {} MiB",
        grown / MIB
    );
    drop(all);
    // The pulls of the closed connections hold this client's share of the
    // memory budget until the RPC server has answered them (503 overloaded
    // meanwhile, with Retry-After): wait for it to be free.
    wait_until(Duration::from_secs(20), "the budget given back", || {
        let mut conn = HttpConn::connect(addr);
        conn.set_read_timeout(Duration::from_secs(60));
        conn.write_raw(BIG_PULL);
        (conn.read_response().status == 200).then_some(())
    });

    // The streamed bodies are whole and in order: three pipelined big pulls
    // read back whole and in order.
    let mut conn = HttpConn::connect(addr);
    conn.set_read_timeout(Duration::from_secs(60));
    conn.write_raw(&BIG_PULL.repeat(3));
    for i in 0..3 {
        let page = parse_page(&conn.read_response(), &format!("big pull #{i}"));
        assert_eq!(page.messages.len(), 100, "pull #{i}");
        assert!(page.messages.iter().all(|m| m.text == text), "pull #{i}");
    }
    let mut head = HttpConn::connect(addr);
    head.write_raw(b"HEAD /api/pull?chat=big&limit=100 HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = head.read_head_response();
    let len: usize = r
        .header("content-length")
        .expect("length")
        .parse()
        .expect("number");
    assert!(len > 38_000_000, "HEAD gives the streamed length: {len}");
    assert_eq!(
        head.request("GET", "/ping", &[], b"").status,
        200,
        "nothing after HEAD"
    );
}

#[test]
fn a_peer_that_stops_reading_is_closed_by_the_write_timeout() {
    let server = Server::start("all", &[], &[("IM_WRITE_TIMEOUT_S", "3")]);
    let addr = server.http_addr();
    let pid = server.pid().expect("pid");
    populate_big_chat(addr);
    // The populating connection's fd closes when the server sees its EOF.
    thread::sleep(Duration::from_millis(500));
    let before = open_fds(pid);
    let stalled = unread_big_pulls(addr);
    let began = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the stalled connection is open",
        || (open_fds(pid) > before).then_some(()),
    );
    wait_until(
        Duration::from_secs(15),
        "the stalled connection closed",
        || (open_fds(pid) <= before).then_some(()),
    );
    let closed_after = began.elapsed();
    assert!(
        closed_after >= Duration::from_secs(2) && closed_after <= Duration::from_secs(15),
        "closed {closed_after:?} after the pulls were written; want the 3 s write timeout (+ the time to fill the socket buffers)"
    );
    // What the kernel had buffered drains, then the end of the stream.
    let mut stalled = stalled;
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match stalled.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("expected EOF or reset after the write timeout, got {e}"),
        }
    }
}

#[test]
fn each_request_is_timed_from_its_own_first_byte() {
    let server = Server::start("all", &[], &[("IM_REQUEST_TIMEOUT_S", "2")]);
    let addr = server.http_addr();
    let mut writer = TcpStream::connect(addr).expect("connect");
    writer.set_nodelay(true).expect("nodelay");
    let reader = writer.try_clone().expect("clone");
    let one = format_request(&addr.to_string(), "GET", "/ping", &[], b"");
    // Every write ends partway into the next request, for 5 s.
    let split = one.len() / 2;
    let started = Instant::now();
    let mut sent = 0usize;
    let counter = thread::spawn(move || {
        let mut reader = std::io::BufReader::new(reader);
        let mut statuses = Vec::new();
        while let Ok(r) = read_response(&mut reader, false) {
            statuses.push(r.status);
        }
        statuses
    });
    writer.write_all(&one[..split]).expect("write");
    while started.elapsed() < Duration::from_secs(5) {
        let mut part = one[split..].to_vec();
        part.extend_from_slice(&one[..split]);
        writer.write_all(&part).expect("write");
        sent += 1;
        thread::sleep(Duration::from_millis(50));
    }
    writer.write_all(&one[split..]).expect("write");
    sent += 1;
    writer
        .write_all(&format_request(
            &addr.to_string(),
            "GET",
            "/ping",
            &[("Connection", "close")],
            b"",
        ))
        .expect("write");
    sent += 1;
    let statuses = counter.join().expect("reader");
    assert!(
        statuses.iter().all(|&s| s == 200),
        "non-200 among {statuses:?}"
    );
    assert_eq!(statuses.len(), sent, "every request answered");
}

#[test]
fn only_a_target_starting_with_a_scheme_is_absolute_form() {
    let server = Server::memory();
    let addr = server.http_addr();
    send_ok(addr, "c1", "s", "secret of c1");
    assert_eq!(
        request(addr, "GET", "/ping?u=http://x", &[], b"").status,
        200
    );
    let r = request(addr, "GET", "/api/pull?chat=c1&ref=http://x", &[], b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        parse_page(&r, "pull with a URL in the query")
            .messages
            .len(),
        1
    );
    let r = request(
        addr,
        "GET",
        "/api/pull?chat=http://h/api/pull?chat=c1",
        &[],
        b"",
    );
    assert!(
        !r.text().contains("secret of c1"),
        "read chat c1: {}",
        r.describe()
    );
    let r = request(addr, "GET", "HTTP://h:1/api/pull?chat=c1", &[], b"");
    assert_eq!(parse_page(&r, "absolute-form").messages.len(), 1);
}

#[test]
fn json_bodies_must_be_objects_and_errors_quote_little() {
    let server = Server::memory();
    let addr = server.http_addr();
    let r = send_raw_body(addr, br#"["arr","t","s"]"#);
    assert_error(&r, 400, "array as a send body");
    assert_eq!(
        pull_page(addr, "arr", 0, 100, false).messages.len(),
        0,
        "nothing stored"
    );
    assert_error(
        &pull_raw_body(addr, br#"["arr"]"#),
        400,
        "array as a pull body",
    );
    let cursor = "9".repeat(900_000) + "x";
    let r = pull_raw_body(
        addr,
        json!({"chat": "c", "cursor": cursor})
            .to_string()
            .as_bytes(),
    );
    assert_error(&r, 400, "1 MB bad cursor");
    assert!(r.body.len() < 1024, "error body of {} bytes", r.body.len());
    assert!(r.text().contains('…'), "the cut is marked: {}", r.text());
}

#[test]
fn host_is_required_once_on_http_1_1() {
    let server = Server::memory();
    let addr = server.http_addr();
    for (raw, what) in [
        (&b"GET /ping HTTP/1.1\r\n\r\n"[..], "no Host"),
        (
            b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "two Hosts",
        ),
        (
            b"GET /ping HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            "two Hosts on 1.0",
        ),
    ] {
        let mut c = HttpConn::connect(addr);
        c.write_raw(raw);
        assert_error(&c.read_response(), 400, what);
        c.assert_closed(what);
    }
    let r = raw_request(addr, b"GET /ping HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "HTTP/1.0 without Host");
}

#[test]
fn a_connection_that_sends_nothing_is_closed_at_the_request_timeout() {
    let server = Server::start("all", &[], &[("IM_REQUEST_TIMEOUT_S", "2")]);
    let mut silent = HttpConn::connect(server.http_addr());
    let waited = silent.assert_closed_within(Duration::from_secs(10), "a silent connection");
    assert!(
        waited >= Duration::from_millis(1500) && waited <= Duration::from_secs(6),
        "closed after {waited:?}, want about 2 s"
    );
}
