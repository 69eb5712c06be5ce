//! One client cannot take the gateway down (issue 20, items 1-4 and 10):
//! the process-wide memory budget for replies held until written, charged
//! by real size; pipelined pulls that start together; limits on held work
//! (waiting pulls, streams) apart from ordinary calls; connection limits
//! derived from the open-file limit. Every test runs the real binary with
//! its defaults (unless a test says otherwise) and measures the server's
//! RSS from /proc and another client's latency while it is attacked.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;
/// The default `--max-buffered-bytes` on any machine with 2 GiB or more.
const BUDGET: u64 = 256 * MIB;
/// What the issue allows the process to grow past the budget.
const SLACK: u64 = 64 * MIB;
/// The tests here measure the server's memory and another client's
/// latency: each runs alone, not beside another attack.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|p| p.into_inner())
}

const BIG_PULL: &[u8] =
    b"GET /api/pull?chat=big&limit=100&reverse=true HTTP/1.1\r\nHost: x\r\n\r\n";

fn rss(server: &Server) -> u64 {
    proc_status_bytes(server.pid().expect("server pid"), "VmRSS")
}

/// A chat of 100 messages of 64 KiB: a full page is 6.5 MB of protobuf.
fn populate_big_chat(addr: SocketAddr) {
    let text = "m".repeat(64 * 1024);
    let mut conn = HttpConn::connect(addr);
    for _ in 0..100 {
        conn.send_ok("big", "s", &text);
    }
}

/// The attack of item 1: reads 8 small replies first (which opened the
/// old window to 64), then pipelines 64 full-page pulls and reads nothing.
fn window_then_unread_big_pulls(addr: SocketAddr) -> TcpStream {
    unread_big_pulls_from(HttpConn::connect(addr))
}

/// The same attack on `conn` (connected from any address).
fn unread_big_pulls_from(mut conn: HttpConn) -> TcpStream {
    for _ in 0..8 {
        assert_eq!(conn.request("GET", "/ping", &[], b"").status, 200);
    }
    let mut s = conn.clone_stream();
    s.write_all(&BIG_PULL.repeat(64)).expect("write pulls");
    s
}

/// Where another client connects from (the attackers use 127.0.0.1).
const VICTIM: [u8; 4] = [127, 0, 0, 2];

/// Another client's small requests while the attack runs: the slowest
/// answer and the median, over `rounds` ping + pull pairs.
fn victim_latency(addr: SocketAddr, rounds: usize) -> (Duration, Duration) {
    let mut times = Vec::new();
    for _ in 0..rounds {
        for path in ["/ping", "/api/pull?chat=victim&limit=5"] {
            let started = Instant::now();
            let mut conn = HttpConn::connect_from(addr, VICTIM.into());
            let r = conn.request("GET", path, &[], b"");
            assert_eq!(r.status, 200, "victim {path}: {}", r.describe());
            times.push(started.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    times.sort();
    (times[times.len() - 1], times[times.len() / 2])
}

/// [`peak_rss`] on a thread of its own, while the test goes on.
fn peak_rss_meanwhile(server: &Server, span: Duration) -> thread::JoinHandle<u64> {
    let pid = server.pid().expect("server pid");
    thread::spawn(move || peak_rss_bytes(pid, span))
}

/// The highest RSS over `span`.
fn peak_rss(server: &Server, span: Duration) -> u64 {
    peak_rss_meanwhile(server, span).join().expect("rss watch")
}

/// The embedded server with the big chat (and the victim's) stored and one
/// big page read normally, so its buffers are in the baseline; and that
/// baseline RSS.
fn big_chat_server() -> (Server, SocketAddr, u64) {
    let server = Server::memory();
    let addr = server.http_addr();
    populate_big_chat(addr);
    send_ok(addr, "victim", "v", "hello");
    let mut warm = HttpConn::connect(addr);
    warm.set_read_timeout(Duration::from_secs(30));
    assert_eq!(warm.pull_query("chat=big&limit=100").status, 200);
    let base = rss(&server);
    (server, addr, base)
}

/// While an attack (`what`) goes on: the server grows by at most the
/// budget + the slack over `base`, and another client's requests are
/// answered quickly (generous for a loaded machine; before the budget the
/// victim waited behind a saturated RPC tier).
fn assert_within_budget_and_others_served(server: &Server, base: u64, what: &str) {
    let watch = peak_rss_meanwhile(server, Duration::from_secs(4));
    let (slowest, median) = victim_latency(server.http_addr(), 10);
    let grown = watch.join().expect("rss watch").saturating_sub(base);
    eprintln!(
        "{what}: +{} MiB; another client's slowest request {slowest:?}, median {median:?}",
        grown / MIB
    );
    assert!(
        grown <= BUDGET + SLACK,
        "{what} grew the server by {} MiB, over the {} MiB budget + {} MiB",
        grown / MIB,
        BUDGET / MIB,
        SLACK / MIB
    );
    assert!(
        median < Duration::from_millis(250) && slowest < Duration::from_secs(2),
        "another client waited: median {median:?}, slowest {slowest:?}"
    );
}

// ---------------------------------------------------------------------------
// 1 + 3. the pipelining window and unread replies stay within the budget
// ---------------------------------------------------------------------------

#[test]
fn unread_pipelined_big_pulls_stay_within_the_process_budget() {
    let _alone = alone();
    let (server, addr, base) = big_chat_server();
    // Four connections (the issue measured +1.26 GB), then eight more.
    let mut attackers: Vec<TcpStream> =
        (0..4).map(|_| window_then_unread_big_pulls(addr)).collect();
    let grown = peak_rss(&server, Duration::from_secs(3)).saturating_sub(base);
    eprintln!("4 connections of 64 unread big pulls: +{} MiB", grown / MIB);
    attackers.extend((0..8).map(|_| window_then_unread_big_pulls(addr)));
    assert_within_budget_and_others_served(&server, base, "12 connections of unread pulls");
    drop(attackers);
    // The memory is given back and the budget is free again: a whole big
    // page is served. The server learns of the closes as it gets to them
    // (on a loaded machine, not before the next request): until then the
    // budget is still held and the pull is 503, so it is asked again.
    let mut after = HttpConn::connect(addr);
    after.set_read_timeout(Duration::from_secs(30));
    let page = wait_until(Duration::from_secs(10), "the budget given back", || {
        let r = after.pull_query("chat=big&limit=100");
        (r.status == 200).then(|| parse_page(&r, "after the attack"))
    });
    assert_eq!(page.messages.len(), 100);
}

/// The budget bounds the process whatever the number of clients: 40
/// addresses (127.0.1.1-40), two connections each, every connection 64
/// unread full-page pulls (6.6 MB each: 34 GB if each were held). Each
/// client's share shrinks as clients come (the budget ÷ holders), the
/// total never passes the budget.
#[test]
fn many_attacking_addresses_stay_within_the_process_budget() {
    let _alone = alone();
    let (server, addr, base) = big_chat_server();
    let _attackers: Vec<TcpStream> = (1..=40u8)
        .flat_map(|host| [host, host])
        .map(|host| unread_big_pulls_from(HttpConn::connect_from(addr, [127, 0, 1, host].into())))
        .collect();
    assert_within_budget_and_others_served(&server, base, "80 connections from 40 addresses");
}

#[test]
fn a_client_over_its_share_gets_503_overloaded_and_others_do_not() {
    let _alone = alone();
    // A small budget, so that one client's unread pages fill its share fast.
    // On Redis: its pages arrive after the connection has started all 16
    // pulls (each reserving a full page). The embedded store answers a pull
    // as it starts, in the all-in-one (src/rpc/lane.rs), so the connection
    // then holds its first page before the next pull may start, and serves
    // these one at a time, within the share: nothing to refuse.
    let redis = Redis::start();
    let server = Server::on_redis(&redis, &["--max-buffered-bytes", "33554432"]);
    let addr = server.http_addr();
    populate_big_chat(addr);
    send_ok(addr, "victim", "v", "hello");
    let mut attacker = HttpConn::connect(addr);
    attacker.set_read_timeout(Duration::from_secs(30));
    attacker.write_raw(&BIG_PULL.repeat(16));
    // Nothing read for a while: the replies arrive and are charged (or
    // refused) meanwhile.
    thread::sleep(Duration::from_secs(2));
    let (slowest, _) = victim_latency(addr, 3);
    assert!(
        slowest < Duration::from_secs(2),
        "victim waited {slowest:?}"
    );
    let mut statuses = Vec::new();
    for i in 0..16 {
        let r = attacker.read_response();
        if r.status == 503 {
            assert_error(&r, 503, &format!("refused pull {i}"));
            assert_eq!(r.json()["error"]["code"], "overloaded", "{}", r.describe());
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        statuses.push(r.status);
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    eprintln!("16 unread big pulls against a 32 MiB budget: {ok} x 200, {refused} x 503");
    // A client alone holds at most half the budget: 16 MiB, two pages.
    assert!(ok >= 1 && refused >= 8, "statuses {statuses:?}");
    assert_eq!(ok + refused, 16, "statuses {statuses:?}");
}

// ---------------------------------------------------------------------------
// 4. pipelined big pulls to a silent RPC peer time out together
// ---------------------------------------------------------------------------

/// A TCP peer that accepts connections, reads and discards what they send,
/// and never answers. Stops when dropped.
struct SilentPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl SilentPeer {
    fn start() -> SilentPeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                if let Ok((socket, _)) = listener.accept() {
                    socket.set_nonblocking(true).expect("nonblocking");
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

#[test]
fn pipelined_full_page_pulls_to_a_silent_rpc_peer_time_out_together() {
    let _alone = alone();
    let peer = SilentPeer::start();
    let gateway = Server::gateway(peer.addr, &[]);
    let mut conn = HttpConn::connect(gateway.http_addr());
    conn.set_read_timeout(Duration::from_secs(20));
    let mut burst = Vec::new();
    for i in 0..8 {
        burst.extend(
            format!("GET /api/pull?chat=silent{i}&limit=100 HTTP/1.1\r\nHost: t\r\n\r\n")
                .into_bytes(),
        );
    }
    let started = Instant::now();
    conn.write_raw(&burst);
    for i in 0..8 {
        let r = conn.read_response();
        assert_eq!(r.status, 504, "pipelined pull {i}: {}", r.describe());
    }
    let took = started.elapsed();
    eprintln!("8 pipelined full-page pulls to a silent RPC peer answered in {took:?}");
    // One after another they took 8 s (1 s timeout each).
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

// ---------------------------------------------------------------------------
// 2. held work has its own limits and slots
// ---------------------------------------------------------------------------

/// Opens `conns` connections from `from`, each reading 8 pings and then
/// pipelining `pulls` pulls that wait up to 30 s, every one on a chat of
/// its own.
fn waiting_pulls(addr: SocketAddr, from: [u8; 4], conns: usize, pulls: usize) -> Vec<HttpConn> {
    (0..conns)
        .map(|c| {
            let mut conn = HttpConn::connect_from(addr, from.into());
            // Small replies first: they opened the old pipelining window.
            for _ in 0..8 {
                assert_eq!(conn.request("GET", "/ping", &[], b"").status, 200);
            }
            let burst: Vec<u8> = (0..pulls)
                .flat_map(|p| {
                    format!(
                        "GET /api/pull?chat=held-{}-{c}-{p}&wait_ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n",
                        from[3]
                    )
                    .into_bytes()
                })
                .collect();
            conn.write_raw(&burst);
            conn
        })
        .collect()
}

/// Another client's send and pull, each answered 200: the slowest and the
/// median of `rounds` pairs.
fn victim_send_and_pull(addr: SocketAddr, rounds: usize) -> (Duration, Duration) {
    let mut times = Vec::new();
    let mut conn = HttpConn::connect_from(addr, VICTIM.into());
    for i in 0..rounds {
        let started = Instant::now();
        let r = conn.send("victim", "v", &format!("hello {i}"));
        assert_eq!(r.status, 200, "victim send {i}: {}", r.describe());
        times.push(started.elapsed());
        let started = Instant::now();
        let r = conn.pull_query("chat=victim&limit=5");
        assert_eq!(r.status, 200, "victim pull {i}: {}", r.describe());
        times.push(started.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    times.sort();
    (times[times.len() - 1], times[times.len() / 2])
}

fn held_at_the_rpc_server(addr: SocketAddr) -> f64 {
    scrape(addr).value("im_rpc_server_requests_in_flight", &[])
}

/// The status of the first response on `conn`, within 5 s.
fn first_status(conn: &mut HttpConn) -> u16 {
    conn.set_read_timeout(Duration::from_secs(5));
    conn.read_response().status
}

#[test]
fn waiting_pulls_beyond_a_clients_share_get_429_and_leave_the_in_flight_slots_free() {
    let _alone = alone();
    let server = Server::memory();
    let addr = server.http_addr();
    // 40 clients (addresses), each with 8 connections of 64 pipelined
    // waiting pulls: 20,480 pulls, over the 2 x 8,192 in-flight slots of
    // the RPC tier (the 300 x 64 from one address did the same).
    let started = Instant::now();
    let mut attackers = Vec::new();
    for client in 0..40u8 {
        attackers.extend(waiting_pulls(addr, [127, 0, 1, client], 8, 64));
    }
    eprintln!("20,480 waiting pulls sent in {:?}", started.elapsed());
    // Each client holds its share (256), and the process its 10,000 (or,
    // without those limits, every in-flight slot of the RPC tier).
    let settle = Instant::now() + Duration::from_secs(20);
    while held_at_the_rpc_server(addr) < 10_000.0 && Instant::now() < settle {
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(500));

    let (slowest, median) = victim_send_and_pull(addr, 10);
    eprintln!("another client while the pulls wait: slowest {slowest:?}, median {median:?}");
    assert!(
        median < Duration::from_millis(250) && slowest < Duration::from_secs(1),
        "another client waited: median {median:?}, slowest {slowest:?}"
    );
    let held = held_at_the_rpc_server(addr);
    eprintln!("held at the RPC server: {held}");
    assert!(
        (10_000.0..=10_001.0).contains(&held),
        "held {held} (the victim's pull may be counted)"
    );
    // One more from a client at its share: 429 at once; from a client
    // holding nothing while the process is full: 503.
    let mut more = waiting_pulls(addr, [127, 0, 1, 0], 1, 1);
    let r = {
        more[0].set_read_timeout(Duration::from_secs(5));
        more[0].read_response()
    };
    assert_error(&r, 429, "a client over its share");
    assert_eq!(r.header("retry-after"), Some("1"));
    let mut fresh = waiting_pulls(addr, [127, 0, 1, 200], 1, 1);
    assert_eq!(first_status(&mut fresh[0]), 503, "the process is full");
    // The held ones are still held: a message wakes one.
    send_ok(addr, "held-0-0-0", "v", "wake");
    let mut first = attackers.swap_remove(0);
    first.set_read_timeout(Duration::from_secs(10));
    let page = parse_page(&first.read_response(), "the woken pull");
    assert_eq!(page.messages.len(), 1);
}

// ---------------------------------------------------------------------------
// 10. the default connection limits fit the open-file limit
// ---------------------------------------------------------------------------

#[test]
fn with_default_limits_under_nofile_1024_idle_rpc_connections_do_not_stop_http() {
    let _alone = alone();
    let server = Server::start_with_open_files("all", &[], 1024);
    let (http, rpc) = (server.http_addr(), server.rpc_addr());
    assert_alive(http, "before");
    let mut idle = Vec::new();
    for i in 0..1100 {
        let c = TcpStream::connect_timeout(&rpc, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} to the RPC port: {e}"));
        idle.push(c);
    }
    // Give the server time to take (and refuse) them all.
    thread::sleep(Duration::from_millis(500));
    for round in 0..5 {
        let started = Instant::now();
        let mut conn = HttpConn::try_connect(http).expect("connect");
        conn.set_read_timeout(Duration::from_secs(3));
        let r = conn
            .try_request("GET", "/ping", &[], b"")
            .unwrap_or_else(|e| {
                panic!("round {round}: /ping with 1,100 idle RPC connections: {e}")
            });
        assert_eq!(r.status, 200, "round {round}");
        eprintln!("round {round}: /ping in {:?}", started.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    let log = server.stderr();
    assert!(!log.contains("accept failed"), "no accept may fail:\n{log}");
    assert!(log.contains("connection limits lowered to fit"), "{log}");
    drop(idle);
}

// ---------------------------------------------------------------------------
// 3. event streams never read stay within the budget too
// ---------------------------------------------------------------------------

/// CPU ticks (1/100 s) the process `pid` used over `span`.
fn cpu_ticks(pid: u32, span: Duration) -> u64 {
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // utime and stime (fields 14 and 15 of the whole line).
        fields[10] + fields[11]
    };
    let before = ticks();
    thread::sleep(span);
    ticks() - before
}

/// Opens an event stream on the big chat from 127.0.0.1 with a 1 KB receive
/// buffer and never reads it.
fn unread_stream(addr: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(1024).expect("rcvbuf");
    socket
        .connect_timeout(&addr.into(), IO_TIMEOUT)
        .expect("connect");
    let mut s: TcpStream = socket.into();
    s.write_all(
        b"GET /api/stream?chat=big HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
    )
    .expect("write");
    s
}

#[test]
fn unread_event_streams_stay_within_the_process_budget() {
    let _alone = alone();
    // (In a debug build many of the base commit's first pages time out, so
    // it grew +206 MiB here, not the issue's +432 MB for 40 streams: item 3
    // is proven on the base commit by the pipelined pulls above; this holds
    // the streams' side of the budget.)
    let server = Server::memory();
    let addr = server.http_addr();
    populate_big_chat(addr);
    send_ok(addr, "victim", "v", "hello");
    let base = rss(&server);
    let streams: Vec<TcpStream> = (0..40).map(|_| unread_stream(addr)).collect();
    // Rendering 40 pages of 64 KiB messages takes a debug build's gateway
    // seconds of CPU (more on a loaded machine): the memory is watched
    // throughout, another client's latency once the pages are rendered and
    // the streams wait on their unread sockets.
    let grown = peak_rss(&server, Duration::from_secs(4)).saturating_sub(base);
    let pid = server.pid().expect("pid");
    let settle = Instant::now() + Duration::from_secs(30);
    while cpu_ticks(pid, Duration::from_millis(500)) > 10 && Instant::now() < settle {}
    let grown = grown.max(rss(&server).saturating_sub(base));
    let (slowest, median) = victim_latency(addr, 10);
    let grown = grown.max(rss(&server).saturating_sub(base));
    eprintln!(
        "40 unread streams of 64 KiB messages: +{} MiB; another client's slowest request {slowest:?}, median {median:?}",
        grown / MIB
    );
    // Before the budget: +432 MB for 40 (issue 20, item 3).
    assert!(
        grown <= BUDGET + SLACK,
        "unread streams grew the server by {} MiB",
        grown / MIB
    );
    assert!(
        median < Duration::from_millis(250) && slowest < Duration::from_secs(2),
        "another client waited: median {median:?}, slowest {slowest:?}"
    );
    // Another client's stream opens and delivers while they hold their share.
    let mut other = SseStream::try_open_from(addr, VICTIM.into(), "/api/stream?chat=victim")
        .unwrap_or_else(|r| panic!("another client's stream: {}", r.describe()));
    assert_eq!(other.next_event().json()["text"], "hello");
    drop(streams);
}

/// `n` waiting pulls of one connection, pipelined, through a proxy that
/// says they come from `client`.
fn forwarded_waiting_pulls(addr: SocketAddr, client: &str, n: usize) -> HttpConn {
    let mut conn = HttpConn::connect(addr);
    let burst: Vec<u8> = (0..n)
        .flat_map(|p| {
            format!(
                "GET /api/pull?chat=fwd-{client}-{p}&wait_ms=30000 HTTP/1.1\r\nHost: x\r\n\
                 X-Forwarded-For: {client}\r\n\r\n"
            )
            .into_bytes()
        })
        .collect();
    conn.write_raw(&burst);
    conn
}

/// Behind a trusted proxy every connection's peer is the proxy: shares go
/// by the address it forwards, so one client at its share of waiting pulls
/// leaves another client, through the same proxy, its own.
#[test]
fn behind_a_trusted_proxy_shares_are_per_forwarded_client() {
    let _alone = alone();
    let server = Server::start(
        "all",
        &[
            "--trusted-proxies",
            "127.0.0.1/32",
            "--max-held-per-client",
            "16",
        ],
        &[],
    );
    let addr = server.http_addr();
    let _holding = forwarded_waiting_pulls(addr, "203.0.113.1", 16);
    let settle = Instant::now() + Duration::from_secs(10);
    while held_at_the_rpc_server(addr) < 16.0 && Instant::now() < settle {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        held_at_the_rpc_server(addr),
        16.0,
        "the first client's pulls"
    );
    let mut over = forwarded_waiting_pulls(addr, "203.0.113.1", 1);
    assert_eq!(
        first_status(&mut over),
        429,
        "the first client over its share"
    );
    let mut other = forwarded_waiting_pulls(addr, "203.0.113.2", 1);
    send_ok(addr, "fwd-203.0.113.2-0", "v", "wake");
    other.set_read_timeout(Duration::from_secs(10));
    let page = parse_page(&other.read_response(), "another client's pull");
    assert_eq!(page.messages.len(), 1);
}

// ---------------------------------------------------------------------------
// The embedded store's own limit
// ---------------------------------------------------------------------------

/// The default path (no Redis) holds messages in the process, so before it
/// had a limit any client that could send grew the process without bound
/// (issue 20, "store full"). With `--memory-store-max-bytes` 48 MiB, two
/// clients sending 64 KiB messages as fast as they can: sends past the
/// limit get `507 insufficient_storage`; the process grows by at most the
/// limit + 64 MiB; the chats hold exactly the sends answered 200; the
/// gauge and counter say so; a delete gives room back and a small send
/// then fits.
#[test]
fn a_full_embedded_store_answers_507_and_the_process_stays_within_its_limit() {
    let _alone = alone();
    const LIMIT: u64 = 48 * MIB;
    let limit = LIMIT.to_string();
    let server = Server::start("all", &["--memory-store-max-bytes", &limit], &[]);
    let addr = server.http_addr();
    let base = rss(&server);
    let text = "x".repeat(64 * 1024);
    let senders: Vec<_> = (0..2)
        .map(|w| {
            let text = text.clone();
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let chat = format!("fill{w}");
                let mut stored = Vec::new();
                loop {
                    let r = conn.send(&chat, "s", &text);
                    match r.status {
                        200 => stored.push(send_time_of(&r, "fill")),
                        _ => return (chat, stored, r),
                    }
                    assert!(stored.len() < 10_000, "48 MiB never filled");
                }
            })
        })
        .collect();
    let results: Vec<_> = senders
        .into_iter()
        .map(|s| s.join().expect("sender"))
        .collect();
    let grown = rss(&server).saturating_sub(base);
    let total: usize = results.iter().map(|(_, stored, _)| stored.len()).sum();
    eprintln!(
        "{total} sends of 64 KiB stored, then 507; RSS +{} MiB",
        grown / MIB
    );
    for (chat, stored, refused) in &results {
        assert_error(refused, 507, "a send into a full embedded store");
        assert_eq!(refused.json()["error"]["code"], "insufficient_storage");
        // Nothing half-written: the chat holds the acknowledged sends.
        let mut conn = HttpConn::connect(addr);
        let held = walk(&mut conn, chat, 100, true, Form::Json);
        assert_eq!(
            held.iter().map(|m| m.send_time).collect::<Vec<_>>(),
            *stored
        );
    }
    assert!(
        total as u64 * 64 * 1024 > LIMIT / 2,
        "only {total} sends fit"
    );
    assert!(
        grown <= LIMIT + SLACK,
        "+{} MiB past a {} MiB store",
        grown / MIB,
        LIMIT / MIB
    );
    let metrics = scrape(addr);
    let held = metrics.value("im_memory_store_bytes", &[]);
    // Both threads may pass the check together: one message each over.
    assert!(held <= (LIMIT + 2 * 66 * 1024) as f64, "gauge {held}");
    assert!(held > (LIMIT / 2) as f64, "gauge {held}");
    assert!(metrics.value("im_store_full_total", &[]) >= 2.0);

    // Refused while full, whoever sends; a delete makes room again.
    assert_eq!(send(addr, "other", "s", &text).status, 507);
    let (chat, stored, _) = &results[0];
    let mut conn = HttpConn::connect(addr);
    let body = serde_json::json!({"chat": chat, "send_time": stored[0]}).to_string();
    let deleted = conn.request("POST", "/api/delete", JSON_CT, body.as_bytes());
    assert_eq!(deleted.status, 200, "{}", deleted.describe());
    assert_eq!(send(addr, "other", "s", "fits again").status, 200);
    assert!(scrape(addr).value("im_memory_store_bytes", &[]) < held);
}
