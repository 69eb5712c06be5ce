//! Long-polling pulls (`wait_ms`) against the real binary over sockets, on
//! the embedded store, standalone Redis and Redis Cluster: held until a
//! message is stored in their chat (and only theirs), never missing one
//! stored while they register, across RPC server processes, answered at
//! once on shutdown, and 10,000 of them held at once in bounded memory.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Far longer than any wake-up should take: a pull still waiting after
/// this was not woken.
const WOKEN_WITHIN: Duration = Duration::from_secs(5);

fn pull_waiting(addr: SocketAddr, query: &str) -> Response {
    let mut c = HttpConn::connect(addr);
    c.set_read_timeout(Duration::from_secs(60));
    c.request("GET", &format!("/api/pull?{query}"), &[], b"")
}

/// Starts a waiting pull on its own thread; its response arrives on the channel.
fn spawn_pull(addr: SocketAddr, query: String) -> mpsc::Receiver<(Response, Duration)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let start = Instant::now();
        let r = pull_waiting(addr, &query);
        let _ = tx.send((r, start.elapsed()));
    });
    rx
}

fn texts(r: &Response) -> Vec<String> {
    r.json()["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| m["text"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn woken_by_its_chat_only(b: &Backend) {
    let addr = b.addr();
    let waiting = spawn_pull(
        addr,
        format!("chat={}&reverse=true&wait_ms=20000", pct("lp:a")),
    );
    // Give it time to register; then a send elsewhere must not answer it.
    thread::sleep(Duration::from_millis(300));
    send_ok(addr, "lp:other", "u", "elsewhere");
    if let Ok((r, took)) = waiting.recv_timeout(Duration::from_millis(700)) {
        panic!(
            "a send to another chat answered the waiting pull after {took:?}: {}",
            r.describe()
        );
    }
    let sent = Instant::now();
    send_ok(addr, "lp:a", "u", "hello");
    let (r, _) = waiting
        .recv_timeout(WOKEN_WITHIN)
        .expect("the send to its chat answers the waiting pull");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(texts(&r), ["hello"]);
    eprintln!("send -> waiting pull answered: {:?}", sent.elapsed());

    // Following the chat from the newest send_time: the next message too.
    let cursor = r.json()["messages"][0]["send_time"]
        .as_i64()
        .expect("send_time");
    let waiting = spawn_pull(
        addr,
        format!(
            "chat={}&cursor={cursor}&reverse=true&wait_ms=20000",
            pct("lp:a")
        ),
    );
    thread::sleep(Duration::from_millis(200));
    send_ok(addr, "lp:a", "u", "second");
    let (r, _) = waiting.recv_timeout(WOKEN_WITHIN).expect("woken again");
    assert_eq!(texts(&r), ["second"]);
}

#[test]
fn a_waiting_pull_is_answered_by_a_send_to_its_chat_memory() {
    woken_by_its_chat_only(&Backend::memory());
}

#[test]
fn waiting_pulls_and_open_streams_are_gauged() {
    let b = Backend::memory();
    let addr = b.addr();
    let waiting: Vec<_> = (0..3)
        .map(|i| spawn_pull(addr, format!("chat=gauge{i}&wait_ms=20000")))
        .collect();
    let mut stream = HttpConn::connect(addr);
    stream.write_raw(b"GET /api/stream?chat=gauged HTTP/1.1\r\nHost: t\r\n\r\n");
    // The stream's own pulls wait too (after its first): 3 + 1 waiting.
    wait_until(
        Duration::from_secs(10),
        "4 waiting pulls and 1 stream gauged",
        || {
            let s = scrape(addr);
            (s.value("im_pulls_waiting", &[]) == 4.0 && s.value("im_streams_open", &[]) == 1.0)
                .then_some(())
        },
    );
    for i in 0..3 {
        send_ok(addr, &format!("gauge{i}"), "u", "x");
    }
    for rx in waiting {
        rx.recv_timeout(WOKEN_WITHIN).expect("woken");
    }
    drop(stream);
    // The closed stream's last pull is cancelled at the RPC server too
    // (RPC CANCEL, within about a second), not held to its wait's end.
    wait_until(Duration::from_secs(10), "the gauges back down", || {
        let s = scrape(addr);
        (s.value("im_pulls_waiting", &[]) == 0.0 && s.value("im_streams_open", &[]) == 0.0)
            .then_some(())
    });
}

/// A client that gives up on a waiting pull (closes) frees it in the
/// gateway at once and in the RPC server soon after (RPC CANCEL), not when
/// its wait ends; one that pipelines its next request behind a waiting pull
/// is still answered, in order.
#[test]
fn a_waiting_pull_is_given_up_when_its_client_closes() {
    use std::io::{Read, Write};
    let b = Backend::memory();
    let addr = b.addr();
    let in_flight = || scrape(addr).value("im_http_requests_in_flight", &[]);
    let clients: Vec<std::net::TcpStream> = (0..5)
        .map(|i| {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            let req =
                format!("GET /api/pull?chat=gone{i}&wait_ms=25000 HTTP/1.1\r\nHost: t\r\n\r\n");
            c.write_all(req.as_bytes()).expect("write");
            c
        })
        .collect();
    // Each scrape counts itself: 5 + 1.
    wait_until(Duration::from_secs(10), "5 pulls in flight", || {
        (in_flight() == 6.0).then_some(())
    });
    drop(clients);
    wait_until(Duration::from_secs(10), "the closed pulls given up", || {
        (in_flight() == 1.0).then_some(())
    });
    wait_until(Duration::from_secs(10), "their waiters cancelled", || {
        (scrape(addr).value("im_pulls_waiting", &[]) == 0.0).then_some(())
    });
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.write_all(
        b"GET /api/pull?chat=stays&wait_ms=25000 HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /ping HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .expect("write");
    thread::sleep(Duration::from_millis(300));
    send_ok(addr, "stays", "u", "still here");
    c.set_read_timeout(Some(WOKEN_WITHIN)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("pong") {
        let n = c.read(&mut buf).expect("both answered");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let (pull, ping) = (text.find("still here"), text.find("pong"));
    assert!(
        matches!((pull, ping), (Some(a), Some(b)) if a < b),
        "pull then ping: {text}"
    );
}

#[test]
fn a_waiting_pull_is_answered_by_a_send_to_its_chat_redis() {
    woken_by_its_chat_only(&Backend::redis());
}

#[test]
fn a_waiting_pull_is_answered_by_a_send_to_its_chat_cluster() {
    let b = Backend::cluster();
    woken_by_its_chat_only(&b);
    // Chats in every shard: each is announced by its own master.
    for i in 0..12 {
        let chat = format!("lp:shard{i}");
        let waiting = spawn_pull(b.addr(), format!("chat={}&wait_ms=20000", pct(&chat)));
        thread::sleep(Duration::from_millis(100));
        send_ok(b.addr(), &chat, "u", "hi");
        let (r, _) = waiting.recv_timeout(WOKEN_WITHIN).expect("woken");
        assert_eq!(texts(&r), ["hi"], "{chat}");
    }
}

#[test]
fn wait_ms_out_of_range_is_400_and_pulls_that_cannot_grow_answer_at_once() {
    let b = Backend::memory();
    let addr = b.addr();
    for bad in ["-1", "30001", "abc", "1.5", "99999999999"] {
        let r = pull_query(addr, &format!("chat=c&wait_ms={bad}"));
        assert_eq!(r.status, 400, "wait_ms={bad}: {}", r.describe());
        assert_eq!(r.json()["error"]["code"], "invalid_request", "{bad}");
    }
    let r = pull_json(addr, serde_json::json!({"chat": "c", "wait_ms": 30001}));
    assert_eq!(r.status, 400, "{}", r.describe());
    let r = pull_json(addr, serde_json::json!({"chat": "c", "wait_ms": "1"}));
    assert_eq!(r.status, 400, "{}", r.describe());

    // A chat with messages: a page that is not empty answers at once, and
    // so does an empty page of older messages (newest first before a cursor).
    let first = send_ok(addr, "full", "u", "one");
    send_ok(addr, "full", "u", "two");
    let start = Instant::now();
    let r = pull_waiting(addr, "chat=full&wait_ms=20000");
    assert_eq!(texts(&r), ["two", "one"]);
    let r = pull_waiting(addr, &format!("chat=full&cursor={first}&wait_ms=20000"));
    assert_eq!(r.status, 200);
    assert!(texts(&r).is_empty());
    assert!(
        start.elapsed() < WOKEN_WITHIN,
        "pulls that no new message could fill must not wait: {:?}",
        start.elapsed()
    );
    // An empty chat waits its wait_ms and answers an empty page.
    let start = Instant::now();
    let r = pull_waiting(addr, "chat=empty&wait_ms=400");
    assert_eq!((r.status, texts(&r).len()), (200, 0));
    assert!(
        start.elapsed() >= Duration::from_millis(380),
        "{:?}",
        start.elapsed()
    );
}

/// A send racing the pull's registration, many times: the pull must always
/// return the message (an empty answer means it was missed, since the send
/// completes long before the pull's deadline).
fn never_misses_a_racing_send(b: &Backend, rounds: usize) {
    let addr = b.addr();
    for round in 0..rounds {
        let chat = format!("race:{round}");
        let waiting = spawn_pull(
            addr,
            format!("chat={}&reverse=true&wait_ms=10000", pct(&chat)),
        );
        // 0..3 ms: sometimes before the pull registers, sometimes after.
        thread::sleep(Duration::from_micros((round as u64 * 397) % 3000));
        send_ok(addr, &chat, "u", "racer");
        let (r, took) = waiting
            .recv_timeout(Duration::from_secs(15))
            .expect("answered");
        assert_eq!(
            texts(&r),
            ["racer"],
            "round {round}: the pull answered after {took:?} without the message sent during it"
        );
    }
}

#[test]
fn a_send_racing_the_pull_is_never_missed_memory() {
    never_misses_a_racing_send(&Backend::memory(), 300);
}

#[test]
fn a_send_racing_the_pull_is_never_missed_redis() {
    never_misses_a_racing_send(&Backend::redis(), 300);
}

/// A chat's Redis subscription outlives its last waiter for a while (the
/// hub's linger: a follower's next pull finds it ready, with no round trip
/// to Redis), and then ends: nothing stays subscribed for chats nobody
/// waits for.
#[test]
fn a_chat_is_unsubscribed_from_redis_a_while_after_its_last_waiter() {
    let b = Backend::redis();
    let redis = b.redis.as_ref().expect("a redis backend");
    let subscriptions = || {
        let reply = redis.redis_cmd(&["PUBSUB", "SHARDNUMSUB", "im:{lingering}:new"]);
        let count = reply.lines().last().and_then(|l| l.strip_prefix(':'));
        count.and_then(|n| n.parse::<i64>().ok()).unwrap_or(-1)
    };
    let query = "chat=lingering&reverse=true&wait_ms=20000".to_string();
    let waiting = spawn_pull(b.addr(), query);
    wait_until(WOKEN_WITHIN, "subscribed while a pull waits", || {
        (subscriptions() == 1).then_some(())
    });
    send_ok(b.addr(), "lingering", "u", "m");
    let (r, _) = waiting.recv_timeout(WOKEN_WITHIN).expect("woken");
    assert_eq!(texts(&r), ["m"]);
    wait_until(
        Duration::from_secs(15),
        "unsubscribed once nobody waits",
        || (subscriptions() == 0).then_some(()),
    );
}

#[test]
fn a_waiter_on_one_rpc_server_is_woken_by_a_send_through_another() {
    let redis = Redis::start();
    let url = redis.url();
    let rpc_a = Server::rpc(&["--redis", &url]);
    let rpc_b = Server::rpc(&["--redis", &url]);
    let gateway_a = Server::gateway(rpc_a.rpc_addr(), &[]);
    let gateway_b = Server::gateway(rpc_b.rpc_addr(), &[]);
    let waiting = spawn_pull(gateway_a.http_addr(), "chat=shared&wait_ms=20000".into());
    thread::sleep(Duration::from_millis(300));
    send_ok(gateway_b.http_addr(), "shared", "u", "across");
    let (r, _) = waiting
        .recv_timeout(WOKEN_WITHIN)
        .expect("woken across processes");
    assert_eq!(texts(&r), ["across"]);
}

#[test]
fn sigterm_answers_waiting_pulls_at_once() {
    for backend in ["memory", "gateway"] {
        let rpc;
        let server = match backend {
            "memory" => Server::memory(),
            _ => {
                // A gateway alone: its RPC server would hold the pull on.
                rpc = Server::rpc(&[]);
                Server::gateway(rpc.rpc_addr(), &[])
            }
        };
        let waiting: Vec<_> = (0..5)
            .map(|i| spawn_pull(server.http_addr(), format!("chat=term{i}&wait_ms=25000")))
            .collect();
        thread::sleep(Duration::from_millis(400));
        let start = Instant::now();
        server.signal("TERM");
        for rx in waiting {
            let (r, _) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("answered on SIGTERM");
            assert_eq!(
                (r.status, texts(&r).len()),
                (200, 0),
                "{backend}: {}",
                r.describe()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{backend}: waiting pulls held the shutdown for {:?}",
            start.elapsed()
        );
    }
}

/// 10,000 pulls waiting across 1,000 chats on one process; a send wakes
/// exactly its chat's ten.
#[test]
fn ten_thousand_waiting_pulls_in_bounded_memory() {
    use std::io::{ErrorKind, Read, Write};
    // soft limit only, which the hard limit must allow
    prlimit(std::process::id(), "nofile", "12000:");
    // One test client stands for 10,000: its own limit on held work is lifted.
    let server = Server::start(
        "all",
        &[
            "--max-connections",
            "12000",
            "--max-held-per-client",
            "10000",
        ],
        &[],
    );
    let addr = server.http_addr();
    let before = vm_rss_kib(server.pid().expect("running"));
    // Chat k's ten pulls are opened one after another (k = i / 10), and the
    // chat woken is the last one opened: its pulls are surely still waiting
    // (wait_ms is at most 30 s, and opening 10,000 connections on a loaded
    // machine can take a good part of that).
    let chat_of = |i: usize| i / 10;
    let woken = 999;
    let mut conns = Vec::with_capacity(10_000);
    let opening = Instant::now();
    for i in 0..10_000 {
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        let req = format!(
            "GET /api/pull?chat=many{}&wait_ms=30000 HTTP/1.1\r\nHost: t\r\n\r\n",
            chat_of(i)
        );
        c.write_all(req.as_bytes()).expect("write");
        conns.push(c);
    }
    eprintln!("opened 10,000 waiting pulls in {:?}", opening.elapsed());
    thread::sleep(Duration::from_secs(1));
    let held = vm_rss_kib(server.pid().expect("running"));
    send_ok(addr, &format!("many{woken}"), "u", "wake");
    let mut buf = [0u8; 4096];
    for (i, c) in conns
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| chat_of(*i) == woken)
    {
        c.set_read_timeout(Some(WOKEN_WITHIN)).unwrap();
        let n = c.read(&mut buf).expect("a woken pull answers");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("wake"),
            "pull {i}: {text}"
        );
    }
    // ... and no other pull got it (one may have reached its deadline on a
    // slow machine: then it answered an empty page).
    thread::sleep(Duration::from_millis(300));
    for (i, c) in conns
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| chat_of(*i) != woken)
    {
        c.set_nonblocking(true).unwrap();
        match c.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok(n) if !String::from_utf8_lossy(&buf[..n]).contains("wake") => {}
            other => panic!("pull {i} (chat many{}) was woken: {other:?}", chat_of(i)),
        }
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    eprintln!(
        "10,000 waiting pulls: VmRSS {:.1} MiB idle, {:.1} MiB holding them ({:.1} KiB per pull)",
        mib(before),
        mib(held),
        (held.saturating_sub(before)) as f64 / 10_000.0
    );
    // Measured 78 MiB in one debug-built `all` process (7.3 KiB per waiting
    // pull, gateway and RPC server together; release builds, three tiers:
    // 4.9 KiB in the gateway, 2.4 in the RPC server, bench/longpoll --held);
    // the bound only catches a leak or a per-pull page reservation.
    assert!(
        held < 160 * 1024,
        "holding 10,000 waiting pulls took {:.1} MiB",
        mib(held)
    );
}
