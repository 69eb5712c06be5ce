//! The RPC tier under abuse (issue #8, items 6–9): call deadlines counted
//! from the moment a call is issued, the RPC server's reply byte budget, frame
//! buffers that grow only as bytes arrive, and the RPC listener's connection
//! limit, idle timeout and accept backoff. Every test runs the real binary
//! over real sockets; memory is read from `/proc/<pid>/status`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use im_server::proto::PullResponse;
use im_server::rpc::method::{PULL, SEND};
use im_server::rpc::status::OK;
use prost::Message as _;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// A TCP peer that accepts connections, reads and discards what they send,
/// and never answers. Stops when dropped.
struct SilentPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl SilentPeer {
    fn start() -> SilentPeer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                if let Ok((socket, _)) = listener.accept() {
                    socket.set_nonblocking(true).unwrap();
                    held.push(socket);
                }
                let mut sink = [0u8; 4096];
                for socket in &mut held {
                    while matches!(socket.read(&mut sink), Ok(n) if n > 0) {}
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        SilentPeer { addr, stop }
    }
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// 6. the call deadline starts when the call is issued
// ---------------------------------------------------------------------------

#[test]
fn pipelined_calls_to_a_silent_rpc_peer_all_time_out_within_3_s() {
    let peer = SilentPeer::start();
    // The default RPC timeout (1 s).
    let gateway = Server::gateway(peer.addr, &[]);
    let addr = gateway.http_addr();
    let mut conn = HttpConn::connect(addr);
    conn.set_read_timeout(Duration::from_secs(15));
    let mut burst = Vec::new();
    for i in 0..8 {
        burst.extend(
            format!("GET /api/pull?chat=silent{i} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes(),
        );
    }
    let started = Instant::now();
    conn.write_raw(&burst);
    for i in 0..8 {
        let r = conn.read_response();
        assert_eq!(r.status, 504, "pipelined pull {i}: {}", r.describe());
    }
    let took = started.elapsed();
    eprintln!("8 pipelined pulls to a silent RPC peer answered in {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "8 pipelined calls with a 1 s timeout must all be answered within 3 s, took {took:?}"
    );
}

// ---------------------------------------------------------------------------
// 7. unread replies are bounded in bytes; the connection is not read meanwhile
// ---------------------------------------------------------------------------

/// Stores `count` messages of `text_len` bytes in `chat` over raw RPC.
fn fill_chat(addr: SocketAddr, chat: &str, count: u64, text_len: usize) {
    let mut c = RpcConn::connect(addr);
    let text = "m".repeat(text_len);
    for id in 0..count {
        c.write_all(&rpc_frame(
            id,
            SEND,
            &send_request_body(chat, "filler", &text),
        ))
        .unwrap();
    }
    for _ in 0..count {
        let (_, kind, body) = c.read_frame("filling the chat");
        assert_eq!((kind, response_code(&body)), (OK, 0), "a filler send");
    }
}

#[test]
fn unread_big_pull_replies_do_not_grow_the_rpc_server() {
    unread_big_pulls(&Server::rpc(&[]), "memory store");
}

#[test]
fn unread_big_pull_replies_do_not_grow_the_rpc_server_on_redis() {
    let redis = Redis::start();
    let url = redis.url();
    // Reading back 2.6 GB of pages on a loaded machine may take Redis over
    // the default 1 s per command; only the byte bound is under test here.
    let server = Server::rpc(&["--redis", &url, "--redis-timeout-ms", "30000"]);
    unread_big_pulls(&server, "Redis store");
}

fn unread_big_pulls(server: &Server, store: &str) {
    let addr = server.rpc_addr();
    let pid = server.pid().expect("pid");
    fill_chat(addr, "big", 100, 64_000);
    // Warm up: one full page read normally, so its buffers are counted in
    // the baseline.
    let mut warm = RpcConn::connect(addr);
    warm.write_all(&rpc_frame(1, PULL, &pull_request_body("big", 100)))
        .unwrap();
    let (_, kind, page) = warm.read_frame("warm-up pull");
    assert_eq!(kind, OK);
    assert!(page.len() > 6_000_000, "a page is {} bytes", page.len());
    drop(warm);
    let before = proc_status_kib(pid, "VmRSS");

    // 400 pulls of the whole chat (~6.5 MB each, ~2.6 GB in all), none read.
    let mut attacker = RpcConn::connect(addr);
    let mut burst = Vec::new();
    for id in 0..400 {
        burst.extend(rpc_frame(id, PULL, &pull_request_body("big", 100)));
    }
    attacker.write_all(&burst).unwrap();
    // Let the server do all it will; sample the peak.
    let peak = (peak_rss_bytes(pid, Duration::from_secs(3)) / 1024).max(before);
    let grew = peak.saturating_sub(before) * 1024;
    eprintln!(
        "{store}: RPC server VmRSS {} MiB before, peak {} MiB with 400 unread big pulls (+{} MiB)",
        before / 1024,
        peak / 1024,
        grew / MIB
    );
    assert!(
        grew <= 128 * MIB,
        "{store}: 400 unread big pulls grew the RPC server by {} MiB (bound: 128 MiB)",
        grew / MIB
    );
    // Other connections are served meanwhile.
    assert_rpc_serves(addr, "while a connection's replies are unread");

    // Backpressure, not refusal: once read, every pull is answered in full.
    attacker
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = vec![false; 400];
    for _ in 0..400 {
        let (id, kind, body) = attacker.read_frame("reading the unread replies");
        assert_eq!(
            (kind, response_code(&body)),
            (OK, 0),
            "reply to pull {id} (refused or failed instead of delayed?)"
        );
        assert!(body.len() > 6_000_000, "reply {id} is {} bytes", body.len());
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "id {id} twice"
        );
    }
}

// ---------------------------------------------------------------------------
// 8. frame buffers grow as bytes arrive, not from the announced length
// ---------------------------------------------------------------------------

#[test]
fn frame_headers_alone_reserve_nothing_even_under_an_address_space_limit() {
    let server = Server::memory();
    let pid = server.pid().expect("pid");
    let rpc = server.rpc_addr();
    assert_alive(server.http_addr(), "before");
    assert_rpc_serves(rpc, "before");
    let before = proc_status_kib(pid, "VmSize");
    // 1 GiB of headroom: reserving the announced 16 MiB per connection, as
    // the old decoder did, needs 4.7 GiB for the 300 connections below and
    // aborted the process ("memory allocation of 16777220 bytes failed").
    let limit = (before + 1024 * 1024) * 1024;
    prlimit(pid, "as", &format!("{limit}:{limit}"));

    let mut held = Vec::new();
    for id in 0..300u64 {
        let mut c = RpcConn::connect(rpc);
        let mut prefix = (16_777_216u32 - 4).to_be_bytes().to_vec();
        prefix.extend_from_slice(&id.to_be_bytes());
        prefix.push(PULL);
        assert_eq!(prefix.len(), 13);
        c.write_all(&prefix).unwrap();
        held.push(c);
    }
    // Let every connection be accepted and its 13 bytes read.
    thread::sleep(Duration::from_secs(2));
    let after = proc_status_kib(pid, "VmSize");
    let grew = after.saturating_sub(before) * 1024;
    eprintln!(
        "VmSize {} MiB before, {} MiB with 300 connections each announcing a 16 MiB frame (+{} MiB)",
        before / 1024,
        after / 1024,
        grew / MIB
    );
    let mut server = server;
    assert!(
        server.is_alive(),
        "the process died under the address-space limit:\n{}",
        server.stderr()
    );
    assert!(
        grew <= 1024 * MIB,
        "300 announced frames grew VmSize by {} MiB (bound: 1 GiB)",
        grew / MIB
    );
    assert_alive(server.http_addr(), "with 300 frames announced");
    assert_rpc_serves(rpc, "with 300 frames announced");
    // The announced frames are still accepted when their bodies come: the
    // limit is unchanged, only the reservation is gone.
    for c in held.iter_mut().take(3) {
        c.shutdown(Shutdown::Write).unwrap();
    }
}

#[test]
fn frames_split_at_every_byte_over_a_socket_are_served() {
    let server = Server::rpc(&[]);
    let mut c = RpcConn::connect(server.rpc_addr());
    let wire = rpc_frame(41, SEND, &send_request_body("split", "s", "hello"));
    for split in 1..wire.len() {
        c.write_all(&wire[..split]).unwrap();
        c.flush().unwrap();
        // Give the server time to read the first part on its own.
        thread::sleep(Duration::from_millis(5));
        c.write_all(&wire[split..]).unwrap();
        let (id, kind, body) = c.read_frame(&format!("split at {split}"));
        assert_eq!(
            (id, kind, response_code(&body)),
            (41, OK, 0),
            "send split at byte {split}"
        );
    }
    // Every byte on its own.
    for &b in &wire {
        c.write_all(&[b]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    let (id, kind, _) = c.read_frame("byte by byte");
    assert_eq!((id, kind), (41, OK), "send written one byte at a time");
    let page = pull_page_rpc(&mut c, "split");
    assert_eq!(page, wire.len(), "every split send was stored once");
}

/// How many messages a raw pull of `chat` (limit 100) returns.
fn pull_page_rpc(c: &mut RpcConn, chat: &str) -> usize {
    c.write_all(&rpc_frame(7, PULL, &pull_request_body(chat, 100)))
        .unwrap();
    let (_, kind, body) = c.read_frame("counting pull");
    assert_eq!(kind, OK);
    PullResponse::decode(&body[..])
        .expect("a PullResponse")
        .messages
        .len()
}

// ---------------------------------------------------------------------------
// 9. connection limit, idle timeout, accept backoff
// ---------------------------------------------------------------------------

#[test]
fn rpc_connections_over_the_fd_limit_do_not_stop_http() {
    // The descriptor budget (docs/operations.md): 1024 files hold the 400 HTTP and 512
    // RPC connections allowed here, the pools and the listeners.
    let server = Server::start(
        "all",
        &["--max-connections", "400", "--max-rpc-connections", "512"],
        &[],
    );
    let pid = server.pid().expect("pid");
    prlimit(pid, "nofile", "1024:1024");
    let (http, rpc) = (server.http_addr(), server.rpc_addr());
    assert_alive(http, "before");

    let mut idle = Vec::new();
    for i in 0..1100 {
        let c = TcpStream::connect_timeout(&rpc, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} to the RPC port: {e}"));
        idle.push(c);
    }
    let started = Instant::now();
    for round in 0..5 {
        assert_alive(
            http,
            &format!("round {round} with 1,100 idle RPC connections"),
        );
        thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "5 pings took {took:?}");
    // The connections over the limit were closed at once, not left to pile up.
    let closed = idle
        .iter_mut()
        .filter_map(|c| closed_within(c, Duration::from_millis(20)).then_some(()))
        .count();
    assert!(
        closed >= 1100 - 512,
        "only {closed} of 1,100 connections were closed with a limit of 512"
    );
    let log = server.stderr();
    assert!(
        !log.contains("accept failed"),
        "within the descriptor budget no accept may fail:\n{log}"
    );
    assert!(
        log.contains("rpc connection limit (512) reached"),
        "refusals are logged:\n{log}"
    );
    // Freed slots are reused.
    drop(idle);
    wait_until(Duration::from_secs(5), "a free RPC slot", || {
        let mut c = RpcConn::connect(rpc);
        c.write_all(&rpc_frame(1, PULL, &pull_request_body("x", 1)))
            .ok()?;
        let mut len = [0u8; 4];
        c.read_exact(&mut len).ok()
    });
    assert_alive(http, "after");
}

#[test]
fn rpc_accept_failures_back_off_and_recover() {
    // A limit above the descriptors: accepts fail with EMFILE.
    let server = Server::start("all", &["--max-rpc-connections", "5000"], &[]);
    let pid = server.pid().expect("pid");
    prlimit(pid, "nofile", "256:256");
    let (http, rpc) = (server.http_addr(), server.rpc_addr());
    // 300 connections: past the 256 descriptors, and within the listen
    // backlog (128) for the ones that cannot be accepted.
    let mut idle = Vec::new();
    for i in 0..300 {
        let c = TcpStream::connect_timeout(&rpc, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} to the RPC port: {e}"));
        idle.push(c);
    }
    thread::sleep(Duration::from_secs(3));
    let log = server.stderr();
    let failures = log.matches("accept failed").count();
    eprintln!("{failures} accept-failure lines in 3 s of EMFILE");
    assert!(failures >= 1, "EMFILE is logged:\n{log}");
    assert!(
        failures <= 10,
        "accept failures must back off and be logged once per run, got {failures} lines:\n{log}"
    );
    // Once descriptors are free again both listeners recover.
    drop(idle);
    wait_until(Duration::from_secs(5), "HTTP after EMFILE", || {
        try_request(http, "GET", "/ping", &[], b"")
            .ok()
            .filter(|r| r.status == 200)
    });
    assert_rpc_serves(rpc, "after EMFILE");
}

#[test]
fn idle_rpc_connections_are_closed_and_the_gateway_reconnects() {
    let rpc = Server::rpc(&["--rpc-idle-timeout-s", "1"]);
    let addr = rpc.rpc_addr();
    let mut idle = RpcConn::connect(addr);
    let started = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)),
        "an idle RPC connection must be closed after --rpc-idle-timeout-s 1"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");

    // A connection that keeps sending is not idle.
    let mut busy = RpcConn::connect(addr);
    for id in 0..8 {
        busy.write_all(&rpc_frame(id, PULL, &pull_request_body("x", 1)))
            .unwrap();
        busy.read_frame("busy connection");
        thread::sleep(Duration::from_millis(400));
    }

    // The gateway's pooled connections (one per gateway thread) are closed
    // whenever idle for 1 s and reopened at once: sends spread over several
    // such cycles, each on a fresh HTTP connection (so on any thread, whose
    // RPC connection may just have been closed), all succeed.
    let gateway = Server::gateway(addr, &["--threads", "2"]);
    let http = gateway.http_addr();
    send_ok(http, "idle:room", "a", "before the idle close");
    thread::sleep(Duration::from_millis(2500));
    for i in 0..40 {
        let r = send(http, "idle:room", "a", &format!("after the idle close {i}"));
        assert_eq!(
            r.status,
            200,
            "send {i} around idle closes: {}",
            r.describe()
        );
        thread::sleep(Duration::from_millis(97));
    }
    let page = pull_page(http, "idle:room", 0, 100, false);
    assert_eq!(page.messages.len(), 41, "every send was stored once");
    assert!(
        !gateway.stderr().contains("lost"),
        "idle closes are routine, not logged as lost connections:\n{}",
        gateway.stderr()
    );
}
