//! Retry-safe sends (docs/api.md, "Retry-safe sends"): a send with an idempotency
//! key stores its message once per chat within the retention window. Run
//! against both stores, then against Redis alone: two RPC server processes
//! on one Redis, the `im_send` call itself, a connection cut between the
//! write of a send and its reply, and a client resending after a 504.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

macro_rules! every_store {
    ($($t:ident),* $(,)?) => {
        mod memory {
            $(
                #[test]
                fn $t() {
                    super::$t(super::Backend::memory_with);
                }
            )*
        }
        mod redis {
            $(
                #[test]
                fn $t() {
                    super::$t(super::Backend::redis_with);
                }
            )*
        }
        mod cluster {
            $(
                #[test]
                fn $t() {
                    super::$t(super::Backend::cluster_with);
                }
            )*
        }
    };
}

every_store!(
    replay_after_200_returns_the_first_send_time,
    concurrent_duplicates_store_one_message,
    reuse_with_other_text_or_sender_is_422,
    keys_expire_after_the_ttl,
    invalid_or_conflicting_keys_are_400,
);

/// Starts a backend with extra `im-server` arguments.
type MakeBackend = fn(&[&str]) -> Backend;

/// Where a send carries its key.
#[derive(Clone, Copy, Debug)]
enum KeyIn {
    Header,
    Body,
    Both,
}

/// Where a send goes: a fresh connection to an address, or a given connection.
enum Via<'a> {
    Addr(SocketAddr),
    Conn(&'a mut HttpConn),
}

impl From<SocketAddr> for Via<'_> {
    fn from(addr: SocketAddr) -> Self {
        Via::Addr(addr)
    }
}

impl<'a> From<&'a mut HttpConn> for Via<'a> {
    fn from(conn: &'a mut HttpConn) -> Self {
        Via::Conn(conn)
    }
}

/// A send with an idempotency key in the header, the body or both.
fn send_keyed<'a>(
    via: impl Into<Via<'a>>,
    chat: &str,
    sender: &str,
    text: &str,
    key: &str,
    how: KeyIn,
) -> Response {
    let mut fresh;
    let conn = match via.into() {
        Via::Conn(conn) => conn,
        Via::Addr(addr) => {
            fresh = HttpConn::connect(addr);
            &mut fresh
        }
    };
    let mut body = json!({"chat": chat, "text": text, "sender": sender});
    if matches!(how, KeyIn::Body | KeyIn::Both) {
        body["idempotency_key"] = json!(key);
    }
    let mut headers = vec![("Content-Type", "application/json")];
    if matches!(how, KeyIn::Header | KeyIn::Both) {
        headers.push(("Idempotency-Key", key));
    }
    conn.request("POST", "/api/send", &headers, body.to_string().as_bytes())
}

/// Whether the answer says it replays an earlier send.
fn replayed(r: &Response) -> bool {
    r.header("Idempotent-Replayed") == Some("true")
}

/// Asserts a 200 that is (or is not) a replay; returns its send_time.
fn ok_send(r: &Response, replay: bool, ctx: &str) -> i64 {
    let t = send_time_of(r, ctx);
    assert_eq!(
        replayed(r),
        replay,
        "{ctx}: Idempotent-Replayed should be {replay}; headers {:?}",
        r.headers
    );
    t
}

/// Every message of `chat`, oldest first, read through the API.
fn messages(addr: SocketAddr, chat: &str) -> Vec<Msg> {
    walk(&mut HttpConn::connect(addr), chat, 100, true, Form::Json)
}

fn error_code(r: &Response) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------
// both stores
// ---------------------------------------------------------------------------

fn replay_after_200_returns_the_first_send_time(make: MakeBackend) {
    let backend = make(&[]);
    let addr = backend.addr();
    let first = send_keyed(addr, "amy:bob", "amy", "hello", "key-1", KeyIn::Header);
    let t = ok_send(&first, false, "first keyed send");
    // Every way of giving the same key, and the other spelling of the room.
    let retries = [
        ("amy:bob", KeyIn::Header, "key-1"),
        ("amy:bob", KeyIn::Body, "key-1"),
        ("bob:amy", KeyIn::Both, "key-1"),
        ("amy:bob", KeyIn::Header, "\"key-1\""),
    ];
    for (chat, how, key) in retries {
        let r = send_keyed(addr, chat, "amy", "hello", key, how);
        let again = ok_send(&r, true, &format!("retry to {chat} with {key} in {how:?}"));
        assert_eq!(again, t, "a retry gets the first send's send_time");
    }
    let stored = messages(addr, "amy:bob");
    assert_eq!(stored.len(), 1, "one message for one key: {stored:?}");
    assert_eq!((stored[0].text.as_str(), stored[0].send_time), ("hello", t));

    // Another key, or no key, stores a new message; a key is per chat.
    let other_key = send_keyed(addr, "amy:bob", "amy", "hello", "key-2", KeyIn::Header);
    let t2 = ok_send(&other_key, false, "same message, another key");
    let unkeyed = send(addr, "amy:bob", "amy", "hello");
    let t3 = ok_send(&unkeyed, false, "same message, no key");
    let elsewhere = send_keyed(addr, "amy:cat", "amy", "hello", "key-1", KeyIn::Header);
    ok_send(&elsewhere, false, "same key in another chat");
    assert!(t < t2 && t2 < t3, "new messages: {t} < {t2} < {t3}");
    assert_eq!(messages(addr, "amy:bob").len(), 3);
    assert_eq!(messages(addr, "amy:cat").len(), 1);
}

fn concurrent_duplicates_store_one_message(make: MakeBackend) {
    const THREADS: usize = 16;
    const ROUNDS: usize = 5;
    let backend = make(&[]);
    let addr = backend.addr();
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(THREADS));
        let key = format!("dup-{round}");
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let barrier = barrier.clone();
                let key = key.clone();
                thread::spawn(move || {
                    let mut conn = HttpConn::connect(addr);
                    barrier.wait();
                    send_keyed(
                        &mut conn,
                        "room",
                        "s",
                        &format!("round {round}"),
                        &key,
                        KeyIn::Body,
                    )
                })
            })
            .collect();
        let answers: Vec<Response> = handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect();
        let times: Vec<i64> = answers
            .iter()
            .map(|r| send_time_of(r, &format!("round {round}: concurrent duplicate")))
            .collect();
        assert!(
            times.iter().all(|&t| t == times[0]),
            "round {round}: every duplicate gets the same send_time: {times:?}"
        );
        let fresh = answers.iter().filter(|r| !replayed(r)).count();
        assert_eq!(
            fresh, 1,
            "round {round}: exactly one send stored the message, the others replay it"
        );
    }
    let stored = messages(addr, "room");
    assert_eq!(
        stored.len(),
        ROUNDS,
        "one message per key after {ROUNDS} rounds of {THREADS} concurrent duplicates: {stored:?}"
    );
}

fn reuse_with_other_text_or_sender_is_422(make: MakeBackend) {
    let backend = make(&[]);
    let addr = backend.addr();
    let t = ok_send(
        &send_keyed(addr, "room", "amy", "first", "k", KeyIn::Header),
        false,
        "first send",
    );
    for (sender, text) in [("amy", "second"), ("bob", "first"), ("amy", "first ")] {
        let r = send_keyed(addr, "room", sender, text, "k", KeyIn::Header);
        let ctx = format!("key reused for sender {sender:?} text {text:?}");
        assert_error(&r, 422, &ctx);
        assert_eq!(
            error_code(&r),
            "idempotency_key_reused",
            "{ctx}: {}",
            r.describe()
        );
    }
    let again = send_keyed(addr, "room", "amy", "first", "k", KeyIn::Body);
    assert_eq!(ok_send(&again, true, "the original still replays"), t);
    let stored = messages(addr, "room");
    assert_eq!(
        stored.len(),
        1,
        "a refused reuse stores nothing: {stored:?}"
    );
}

fn keys_expire_after_the_ttl(make: MakeBackend) {
    let backend = make(&["--idempotency-ttl-s", "1"]);
    let addr = backend.addr();
    let started = Instant::now();
    let t1 = ok_send(
        &send_keyed(addr, "room", "s", "hi", "k", KeyIn::Header),
        false,
        "first send",
    );
    let replay = send_keyed(addr, "room", "s", "hi", "k", KeyIn::Header);
    if started.elapsed() < Duration::from_millis(900) {
        assert_eq!(ok_send(&replay, true, "retry within the TTL"), t1);
    }
    // Resend until the key is forgotten: then the same send stores anew.
    let t2 = wait_until(Duration::from_secs(10), "the key to expire", || {
        let r = send_keyed(addr, "room", "s", "hi", "k", KeyIn::Header);
        let t = send_time_of(&r, "resend while waiting for expiry");
        (!replayed(&r)).then_some(t)
    });
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the key was forgotten after {:?}, before its 1 s TTL",
        started.elapsed()
    );
    assert!(t2 > t1, "a new message after expiry: {t1} then {t2}");
    let stored = messages(addr, "room");
    assert_eq!(
        stored.iter().map(|m| m.send_time).collect::<Vec<_>>(),
        vec![t1, t2]
    );
    // The key now names the new message.
    let r = send_keyed(addr, "room", "s", "hi", "k", KeyIn::Header);
    assert_eq!(ok_send(&r, true, "retry of the second send"), t2);
}

fn invalid_or_conflicting_keys_are_400(make: MakeBackend) {
    let backend = make(&[]);
    let addr = backend.addr();
    let body = |key: Value| {
        json!({"chat": "room", "text": "t", "sender": "s", "idempotency_key": key}).to_string()
    };
    let raw = |headers: &str, body: &str| {
        format!(
            "POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let plain = json!({"chat": "room", "text": "t", "sender": "s"}).to_string();
    let long = "k".repeat(129);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty header", raw("Idempotency-Key: \r\n", &plain)),
        (
            "129-byte header",
            raw(&format!("Idempotency-Key: {long}\r\n"), &plain),
        ),
        (
            "non-ASCII header",
            raw("Idempotency-Key: caf\u{e9}\r\n", &plain),
        ),
        (
            "header given twice",
            raw("Idempotency-Key: a\r\nIdempotency-Key: a\r\n", &plain),
        ),
        (
            "unterminated quoted header",
            raw("Idempotency-Key: \"abc\r\n", &plain),
        ),
        ("empty field", raw("", &body(json!("")))),
        ("129-byte field", raw("", &body(json!(long)))),
        ("field with a tab", raw("", &body(json!("a\tb")))),
        ("non-ASCII field", raw("", &body(json!("café")))),
        ("field not a string", raw("", &body(json!(5)))),
        (
            "header and field differ",
            raw("Idempotency-Key: a\r\n", &body(json!("b"))),
        ),
    ];
    for (what, request) in cases {
        let r = raw_request(addr, &request);
        assert_error(&r, 400, what);
        assert_eq!(
            error_code(&r),
            "invalid_request",
            "{what}: {}",
            r.describe()
        );
    }
    assert!(
        messages(addr, "room").is_empty(),
        "a rejected send stores nothing"
    );
    // The bounds themselves are accepted.
    let longest = "~".repeat(128);
    for key in ["k", longest.as_str(), "with space"] {
        let r = send_keyed(addr, "room", "s", "t", key, KeyIn::Both);
        ok_send(&r, false, &format!("valid key {key:?}"));
    }
}

// ---------------------------------------------------------------------------
// Redis only
// ---------------------------------------------------------------------------

/// The record of `key` in `chat` (see `idempotency_record_key` in src/store/redis/schema.rs).
fn record_key(chat: &str, key: &str) -> String {
    format!("im:idem:{}:{{{chat}}}:{key}", chat.len())
}

/// What Redis Cluster hashes of a key: the part between the first `{` and
/// the next `}`, if not empty; else the whole key.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let close = key[open + 1..].find('}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key)
}

#[test]
fn redis_record_is_small_in_the_chat_slot_and_expires() {
    let backend = Backend::redis_with(&["--idempotency-ttl-s", "3600"]);
    let redis = backend.redis.as_ref().expect("redis backend");
    let key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let t = ok_send(
        &send_keyed(backend.addr(), "b:a", "a", "hello", key, KeyIn::Header),
        false,
        "keyed send",
    );
    let record = record_key("a:b", key);
    assert_eq!(
        redis.redis_int(&["STRLEN", &record]),
        40,
        "keys: {}",
        redis.keys()
    );
    let ttl = redis.redis_int(&["TTL", &record]);
    assert!(
        (3590..=3600).contains(&ttl),
        "record TTL {ttl}, configured 3600"
    );
    assert_eq!(
        hash_tag(&record),
        hash_tag("im:{a:b}"),
        "the record is in its chat's Redis Cluster slot"
    );
    let bytes = redis.redis_int(&["MEMORY", "USAGE", &record]);
    println!("MEMORY USAGE of a record with a 36-byte key in chat \"a:b\": {bytes} bytes");
    assert!(bytes < 200, "a record costs {bytes} bytes");
    assert_eq!(messages(backend.addr(), "a:b")[0].send_time, t);
}

/// The `im_send` function handles one key several times in one call (what
/// concurrent duplicates batched together become): the first stores, the
/// next replays, one with other content is refused.
#[test]
fn redis_one_call_with_a_key_three_times() {
    let backend = Backend::redis();
    let redis = backend.redis.as_ref().expect("redis backend");
    // The library is loaded on connecting; a send makes sure of it.
    send_ok(backend.addr(), "warm-up", "s", "t");
    let chat = "im:{room}";
    let record = record_key("room", "k");
    let (same, other) = (im_send_member("hi", "a"), im_send_member("bye", "a"));
    let now = now_us().to_string();
    let reply = redis.redis_cmd(&[
        "FCALL", "im_send", "6", chat, chat, chat, &record, &record, &record, &same, &same, &other,
        "1", "2", "3", "60", "3", &now,
    ]);
    let lines: Vec<&str> = reply.split("\r\n").collect();
    let t = lines[1]
        .strip_prefix(':')
        .unwrap_or_else(|| panic!("reply {reply:?}"));
    assert_eq!(
        &lines[..6],
        &[
            "*3",
            &format!(":{t}"),
            "*1",
            &format!(":{t}"),
            "+REUSED",
            ""
        ][..],
        "stored, replayed, refused: {reply:?}"
    );
    let stored = messages(backend.addr(), "room");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(
        (stored[0].text.as_str(), stored[0].send_time.to_string()),
        ("hi", t.to_string())
    );
}

#[test]
fn redis_two_rpc_servers_share_the_keys() {
    let redis = Redis::start();
    let url = redis.url();
    let rpcs = [
        Server::rpc(&["--redis", &url]),
        Server::rpc(&["--redis", &url]),
    ];
    let gateways: Vec<Server> = rpcs
        .iter()
        .map(|r| Server::gateway(r.rpc_addr(), &[]))
        .collect();
    let addrs: Vec<SocketAddr> = gateways.iter().map(Server::http_addr).collect();
    let t = ok_send(
        &send_keyed(addrs[0], "room", "s", "hi", "k", KeyIn::Header),
        false,
        "first send via rpc server 1",
    );
    let r = send_keyed(addrs[1], "room", "s", "hi", "k", KeyIn::Header);
    assert_eq!(ok_send(&r, true, "retry via rpc server 2"), t);
    let r = send_keyed(addrs[1], "room", "s", "other", "k", KeyIn::Header);
    assert_error(&r, 422, "reuse via rpc server 2");

    // Concurrent duplicates spread over both RPC servers.
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let addr = addrs[i % 2];
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                barrier.wait();
                send_keyed(&mut conn, "room", "s", "together", "k2", KeyIn::Header)
            })
        })
        .collect();
    let times: Vec<i64> = handles
        .into_iter()
        .map(|h| send_time_of(&h.join().expect("sender"), "concurrent duplicate"))
        .collect();
    assert!(times.iter().all(|&x| x == times[0]), "{times:?}");
    assert_eq!(redis.zcard_chat("room"), 2, "keys: {}", redis.keys());
}

/// A TCP proxy in front of Redis that, once armed with a marker, forwards the
/// chunk containing it, waits for Redis's reply, throws the reply away and
/// cuts both connections: the sender's outcome is unknown to it, though
/// Redis ran the command.
struct CutProxy {
    addr: SocketAddr,
    marker: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
}

impl CutProxy {
    fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let marker: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let cuts = Arc::new(AtomicUsize::new(0));
        let (m, c) = (marker.clone(), cuts.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (m, c) = (m.clone(), c.clone());
                thread::spawn(move || relay(client, server, &m, &c));
            }
        });
        CutProxy { addr, marker, cuts }
    }

    fn arm(&self, marker: &str) {
        *self.marker.lock().expect("marker lock") = Some(marker.as_bytes().to_vec());
    }

    fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    marker: &Mutex<Option<Vec<u8>>>,
    cuts: &AtomicUsize,
) {
    let cut = Arc::new(AtomicBool::new(false));
    let discarded = Arc::new(AtomicBool::new(false));
    let (Ok(mut from), Ok(mut to)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    let (down_cut, down_discarded) = (cut.clone(), discarded.clone());
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if down_cut.load(Ordering::SeqCst) {
                down_discarded.store(true, Ordering::SeqCst);
            } else if to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let hit = {
            let mut armed = marker.lock().expect("marker lock");
            let hit = armed
                .as_ref()
                .is_some_and(|m| chunk.windows(m.len()).any(|w| w == &m[..]));
            if hit {
                *armed = None;
            }
            hit
        };
        // Set before the write, so the reply to this chunk is never forwarded.
        cut.store(hit, Ordering::SeqCst);
        if server.write_all(chunk).is_err() {
            break;
        }
        if hit {
            let waited = Instant::now();
            while !discarded.load(Ordering::SeqCst) && waited.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(5));
            }
            cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Waits until pulls succeed: a cut connection reconnects after a short
/// backoff, and a pull that meets it before then gets 503. Several in a
/// row, since each server thread has its own Redis connection.
fn wait_reachable(addr: SocketAddr) {
    let mut in_a_row = 0;
    wait_until(
        Duration::from_secs(5),
        "Redis to be reachable again",
        || {
            let ok = pull_json(addr, json!({"chat": "room"})).status == 200;
            in_a_row = if ok { in_a_row + 1 } else { 0 };
            (in_a_row >= 8).then_some(())
        },
    );
}

#[test]
fn redis_connection_cut_after_the_write_stores_a_keyed_send_once() {
    let redis = Redis::start_tcp();
    let port = redis.port().expect("tcp redis");
    let proxy = CutProxy::start(format!("127.0.0.1:{port}").parse().expect("address"));
    let url = format!("redis://{}", proxy.addr);
    let server = Server::start("all", &["--redis", &url], &[]);
    let addr = server.http_addr();
    send_ok(addr, "room", "s", "warm-up");

    proxy.arm("cut-me-keyed");
    let r = send_keyed(addr, "room", "s", "cut-me-keyed", "k", KeyIn::Header);
    assert_eq!(
        proxy.cuts(),
        1,
        "the proxy cut the connection after the write"
    );
    // The server resent once; Redis had run the first attempt, so the
    // second found its record.
    let t = ok_send(&r, true, "keyed send whose first attempt was cut");
    wait_reachable(addr);
    let stored = messages(addr, "room");
    let keyed: Vec<&Msg> = stored.iter().filter(|m| m.text == "cut-me-keyed").collect();
    assert_eq!(keyed.len(), 1, "stored exactly once: {stored:?}");
    assert_eq!(keyed[0].send_time, t);

    proxy.arm("cut-me-plain");
    let r = send(addr, "room", "s", "cut-me-plain");
    assert_eq!(
        proxy.cuts(),
        2,
        "the proxy cut the connection after the write"
    );
    assert_error(
        &r,
        503,
        "un-keyed send whose connection was cut: maybe stored, never retried",
    );
    wait_reachable(addr);
    let stored = messages(addr, "room");
    let plain = stored.iter().filter(|m| m.text == "cut-me-plain").count();
    assert_eq!(
        plain, 1,
        "Redis ran it once, and the server did not resend it: {stored:?}"
    );
    assert_eq!(redis.zcard_chat("room"), 3, "warm-up + one each");
}

/// What docs/api.md tells clients: on 503 or 504, resend with the same key.
/// Redis stalls writes for longer than the server waits; the first send's
/// command runs once the stall ends, and the resends find its record.
fn client_resending_after_a_stall_gets_one_message(args: &[&str], status: u16) {
    let backend = Backend::redis_with(args);
    let redis = backend.redis.as_ref().expect("redis backend");
    let addr = backend.addr();
    send_ok(addr, "room", "s", "warm-up");
    let reply = redis.redis_cmd(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    assert!(reply.starts_with("+OK"), "CLIENT PAUSE: {reply}");
    let r = send_keyed(addr, "room", "s", "stalled", "k", KeyIn::Header);
    assert_error(&r, status, "send while Redis stalls writes");
    let t = wait_until(Duration::from_secs(10), "a resend to succeed", || {
        let r = send_keyed(addr, "room", "s", "stalled", "k", KeyIn::Header);
        match r.status {
            200 => Some(send_time_of(&r, "resend")),
            503 | 504 => None,
            _ => panic!("resend: expected 200, 503 or 504, got {}", r.describe()),
        }
    });
    let stored = messages(addr, "room");
    let stalled: Vec<&Msg> = stored.iter().filter(|m| m.text == "stalled").collect();
    assert_eq!(
        stalled.len(),
        1,
        "one message however many resends: {stored:?}"
    );
    assert_eq!(stalled[0].send_time, t);
    let r = send_keyed(addr, "room", "s", "stalled", "k", KeyIn::Header);
    assert_eq!(ok_send(&r, true, "a later resend"), t);
}

/// The Redis timeout (by default inside the RPC timeout) fires: 503.
#[test]
fn redis_client_resending_after_503_gets_one_message() {
    client_resending_after_a_stall_gets_one_message(&["--rpc-timeout-ms", "300"], 503);
}

/// The gateway gives up first: 504.
#[test]
fn redis_client_resending_after_504_gets_one_message() {
    client_resending_after_a_stall_gets_one_message(
        &["--rpc-timeout-ms", "300", "--redis-timeout-ms", "2000"],
        504,
    );
}
