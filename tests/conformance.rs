//! API-semantics conformance suite, written once and instantiated for every
//! store (embedded memory store, a real redis-server, and a real 6-node
//! Redis Cluster). Every test gets its
//! own server (and, for redis, its own redis-server), so tests run in parallel.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

macro_rules! conformance {
    ($store:ident, $make:expr) => {
        mod $store {
            conformance!(@tests $make;
                seed_curl_send_verbatim,
                seed_curl_pull_verbatim,
                seed_curl_binary,
                send_time_is_microseconds_near_now,
                pull_body_and_query_forms_agree,
                pull_query_is_percent_decoded,
                pull_with_both_body_and_query_is_400,
                pull_is_newest_first_by_default,
                pull_reverse_is_oldest_first,
                cursor_is_exclusive_newest_first,
                cursor_is_exclusive_oldest_first,
                pagination_walk_small_sequential,
                concurrent_senders_unique_times_and_full_walks,
                newest_first_walk_during_concurrent_writes,
                sequential_send_times_strictly_increase,
                limit_absent_or_zero_means_10,
                limit_above_100_is_clamped,
                limit_beyond_32_bits_is_clamped,
                limit_negative_is_400,
                has_more_and_next_cursor_exact,
                send_rejects_empty_fields,
                send_enforces_byte_length_limits,
                send_rejects_wrong_json_types,
                send_rejects_missing_fields,
                send_rejects_invalid_json,
                send_rejects_invalid_utf8,
                pull_rejects_invalid_body_params,
                pull_rejects_invalid_query_params,
                pull_query_invalid_utf8_is_400,
                dm_rooms_are_canonical,
                dm_concurrent_senders_on_both_spellings,
                non_dm_names_are_not_canonicalized,
                unicode_round_trips,
                json_escapes_round_trip,
                identical_messages_are_both_stored,
                pull_unknown_chat_is_empty,
                edit_replaces_text_in_place,
                edit_and_delete_take_every_form,
                delete_is_retry_safe_and_pages_stay_exact,
                unknown_messages_are_404,
                edit_and_delete_are_validated,
                walks_stay_exact_under_concurrent_changes,
            );
        }
    };
    (@tests $make:expr; $($t:ident),* $(,)?) => {
        $(
            #[test]
            fn $t() {
                let backend = ($make)();
                super::$t(&backend);
            }
        )*
    };
}

conformance!(memory, super::Backend::memory);
conformance!(redis, super::Backend::redis);
conformance!(cluster, super::Backend::cluster);
conformance!(redis_three_rpc, super::ThreeRpc::start);

/// A gateway balancing over three RPC servers on one Redis: the API must
/// not be able to tell.
struct ThreeRpc {
    backend: Backend,
    _rpcs: Vec<Server>,
}

impl ThreeRpc {
    fn start() -> ThreeRpc {
        let redis = Redis::start();
        let url = redis.url();
        let rpcs: Vec<Server> = (0..3).map(|_| Server::rpc(&["--redis", &url])).collect();
        let list: Vec<String> = rpcs.iter().map(|r| r.rpc_addr().to_string()).collect();
        let gateway = Server::start("gateway", &["--rpc", &list.join(",")], &[]);
        ThreeRpc {
            backend: Backend {
                server: gateway,
                redis: Some(redis),
                _cluster: None,
            },
            _rpcs: rpcs,
        }
    }
}

impl std::ops::Deref for ThreeRpc {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.backend
    }
}

// ---------------------------------------------------------------------------
// helpers local to this suite
// ---------------------------------------------------------------------------

/// The seed's send body, byte for byte (newline + TAB before each field).
const SEED_SEND_BODY: &str =
    "{\n\t\"chat\": \"chatroom12345\",\n\t\"text\": \"hi guys! :) \",\n\t\"sender\": \"kylie\"\n}";
/// The seed's pull body, byte for byte.
const SEED_PULL_BODY: &str =
    "{\n\t\"chat\": \"chatroom12345\",\n\t\"cursor\": 0,\n\t\"limit\": 3,\n\t\"reverse\": false\n}";

/// Exactly what `curl -H 'Content-Type: application/json' --data BODY` (7.88.1) sends.
fn curl_like_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends `n` messages with texts `{prefix}{i}` and returns their send_times.
fn send_n(addr: SocketAddr, chat: &str, prefix: &str, n: usize) -> Vec<i64> {
    let mut conn = HttpConn::connect(addr);
    (0..n)
        .map(|i| conn.send_ok(chat, "sender", &format!("{prefix}{i}")))
        .collect()
}

fn pull_all_newest_first(addr: SocketAddr, chat: &str) -> Vec<Msg> {
    walk(&mut HttpConn::connect(addr), chat, 100, false, Form::Json)
}

fn assert_chat_empty(addr: SocketAddr, chat: &str, ctx: &str) {
    let msgs = pull_all_newest_first(addr, chat);
    assert!(
        msgs.is_empty(),
        "{ctx}: chat {chat:?} should hold no messages after rejected sends, found {msgs:?}"
    );
}

fn assert_near_now(t: i64, before: i64, after: i64, ctx: &str) {
    const SLACK: i64 = 5_000_000; // 5 s in µs
    assert!(
        t >= before - SLACK && t <= after + SLACK,
        "{ctx}: send_time {t} is not within 5 s of the test clock [{before}, {after}] µs \
         (is it in microseconds since the epoch?)"
    );
}

fn desc(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

fn asc(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

// ---------------------------------------------------------------------------
// the seed's curl examples
// ---------------------------------------------------------------------------

fn seed_curl_send_verbatim(b: &Backend) {
    let addr = b.addr();
    let before = now_us();
    let r = raw_request(
        addr,
        &curl_like_request(addr, "POST", "/api/send", SEED_SEND_BODY),
    );
    let after = now_us();
    let t = send_time_of(&r, "seed curl send");
    assert_near_now(t, before, after, "seed curl send");

    let page = pull_page(addr, "chatroom12345", 0, 10, false);
    assert_eq!(
        page.messages,
        vec![Msg {
            chat: "chatroom12345".into(),
            text: "hi guys! :) ".into(),
            sender: "kylie".into(),
            send_time: t,
            edited_at: None,
        }],
        "the seed message must be stored exactly as sent"
    );
}

fn seed_curl_pull_verbatim(b: &Backend) {
    let addr = b.addr();
    let mut times = Vec::new();
    for _ in 0..5 {
        let r = raw_request(
            addr,
            &curl_like_request(addr, "POST", "/api/send", SEED_SEND_BODY),
        );
        times.push(send_time_of(&r, "seed curl send"));
    }
    let r = raw_request(
        addr,
        &curl_like_request(addr, "GET", "/api/pull", SEED_PULL_BODY),
    );
    let page = parse_page(&r, "seed curl pull");
    assert_eq!(
        page.times(),
        desc(times.clone())[..3].to_vec(),
        "seed pull (limit 3, newest first) must return the 3 newest messages"
    );
    for m in &page.messages {
        assert_eq!(
            (m.chat.as_str(), m.text.as_str(), m.sender.as_str()),
            ("chatroom12345", "hi guys! :) ", "kylie"),
            "seed pull message content"
        );
    }
    assert!(page.has_more, "5 messages, limit 3: has_more must be true");
    assert_eq!(
        page.next_cursor, page.messages[2].send_time,
        "next_cursor = last send_time on the page"
    );
}

fn seed_curl_binary(b: &Backend) {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!(
            "NOTE: `curl` is not installed; skipping the real-curl test (the raw-HTTP seed tests still ran)"
        );
        return;
    }
    let addr = b.addr();
    let curl = |args: &[&str]| -> (u16, Value) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl {args:?} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, code) = stdout
            .rsplit_once('\n')
            .expect("curl output with status code");
        let v = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("curl {args:?}: body is not JSON ({e}): {body}"));
        (code.trim().parse().unwrap(), v)
    };
    let send_url = format!("http://{addr}/api/send");
    let pull_url = format!("http://{addr}/api/pull");
    let mut times = Vec::new();
    for _ in 0..4 {
        let (code, v) = curl(&[
            "-X",
            "POST",
            &send_url,
            "-H",
            "Content-Type: application/json",
            "--data",
            SEED_SEND_BODY,
        ]);
        assert_eq!(code, 200, "curl send: {v}");
        times.push(
            v["send_time"]
                .as_i64()
                .unwrap_or_else(|| panic!("curl send: no integer send_time in {v}")),
        );
    }
    let (code, v) = curl(&[
        "--request",
        "GET",
        &pull_url,
        "-H",
        "Content-Type: application/json",
        "--data",
        SEED_PULL_BODY,
    ]);
    assert_eq!(code, 200, "curl pull: {v}");
    let got: Vec<i64> = v["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("curl pull: no messages array in {v}"))
        .iter()
        .map(|m| m["send_time"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got,
        desc(times)[..3].to_vec(),
        "curl pull must return the 3 newest: {v}"
    );
    assert_eq!(v["has_more"], json!(true), "curl pull has_more: {v}");
    assert_eq!(
        v["next_cursor"],
        json!(got[2]),
        "curl pull next_cursor: {v}"
    );
    assert_eq!(
        v["messages"][0]["text"],
        json!("hi guys! :) "),
        "curl pull text: {v}"
    );
}

// ---------------------------------------------------------------------------
// send_time
// ---------------------------------------------------------------------------

fn send_time_is_microseconds_near_now(b: &Backend) {
    let addr = b.addr();
    let before = now_us();
    let r = send(addr, "time", "alice", "hello");
    let after = now_us();
    assert!(
        r.json()["send_time"].is_i64(),
        "send_time must be a JSON integer: {}",
        r.describe()
    );
    let t = send_time_of(&r, "send");
    assert_near_now(t, before, after, "send");
    let page = pull_page(addr, "time", 0, 10, false);
    assert_eq!(
        page.times(),
        vec![t],
        "the pulled send_time must equal the one returned by send"
    );
}

fn sequential_send_times_strictly_increase(b: &Backend) {
    let addr = b.addr();
    let mut conn = HttpConn::connect(addr);
    let before = now_us();
    let mut times_a = Vec::new();
    let mut times_b = Vec::new();
    for i in 0..200 {
        times_a.push(conn.send_ok("seq-a", "s", "same text"));
        if i % 4 == 0 {
            times_b.push(conn.send_ok("seq-b", "s", "same text"));
        }
    }
    let after = now_us();
    for (chat, times) in [("seq-a", &times_a), ("seq-b", &times_b)] {
        for w in times.windows(2) {
            assert!(
                w[0] < w[1],
                "{chat}: send_time must strictly increase in send order: {} then {}",
                w[0],
                w[1]
            );
        }
        for t in times.iter() {
            assert_near_now(*t, before, after, chat);
        }
        let stored = walk(&mut conn, chat, 100, true, Form::Json);
        let stored_times: Vec<i64> = stored.iter().map(|m| m.send_time).collect();
        assert_eq!(
            &stored_times, times,
            "{chat}: stored send_times (oldest first) must equal the returned ones"
        );
    }
}

// ---------------------------------------------------------------------------
// pull parameter forms
// ---------------------------------------------------------------------------

fn pull_body_and_query_forms_agree(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "forms", "m", 12);
    let mid = times[6];
    let cases: Vec<(Value, String)> = vec![
        (json!({"chat": "forms"}), "chat=forms".into()),
        (
            json!({"chat": "forms", "limit": 5}),
            "chat=forms&limit=5".into(),
        ),
        (
            json!({"chat": "forms", "cursor": 0, "limit": 3, "reverse": false}),
            "chat=forms&cursor=0&limit=3&reverse=false".into(),
        ),
        (
            json!({"chat": "forms", "cursor": mid, "limit": 4, "reverse": false}),
            format!("chat=forms&cursor={mid}&limit=4&reverse=false"),
        ),
        (
            json!({"chat": "forms", "cursor": mid, "limit": 4, "reverse": true}),
            format!("reverse=true&limit=4&cursor={mid}&chat=forms"),
        ),
        (
            json!({"chat": "forms", "reverse": true}),
            "chat=forms&reverse=true".into(),
        ),
    ];
    for (body, query) in cases {
        let from_body = parse_page(&pull_json(addr, body.clone()), &format!("pull body {body}"));
        let from_query = parse_page(&pull_query(addr, &query), &format!("pull ?{query}"));
        assert!(
            !from_body.messages.is_empty(),
            "pull body {body} returned nothing"
        );
        assert_eq!(
            from_body, from_query,
            "body {body} and query ?{query} must give the same page"
        );
    }
}

fn pull_query_is_percent_decoded(b: &Backend) {
    let addr = b.addr();
    let chat = "my room&co+é/ü?=#%";
    let t = send_ok(addr, chat, "s", "x");
    let encodings = [
        pct(chat),
        // `+` means space in a query string; a literal '+' must be %2B.
        "my+room%26co%2B%C3%A9%2F%C3%BC%3F%3D%23%25".to_string(),
        "my%20room%26co%2b%c3%a9/%c3%bc?%3d%23%25".to_string(),
    ];
    for enc in encodings {
        let q = format!("chat={enc}&limit=5");
        let page = parse_page(&pull_query(addr, &q), &format!("pull ?{q}"));
        assert_eq!(
            page.times(),
            vec![t],
            "pull ?{q} must find the message in chat {chat:?}"
        );
        assert_eq!(page.messages[0].chat, chat, "pull ?{q}: chat field");
    }
    // "my+room" must not match a chat named "my+room" literally.
    let other = send_ok(addr, "a+b", "s", "plus");
    let page = parse_page(&pull_query(addr, "chat=a%2Bb"), "pull ?chat=a%2Bb");
    assert_eq!(
        page.times(),
        vec![other],
        "a%2Bb must decode to the chat 'a+b'"
    );
    let page = parse_page(&pull_query(addr, "chat=a+b"), "pull ?chat=a+b");
    assert!(
        page.messages.is_empty(),
        "?chat=a+b means chat 'a b' (empty), got {page:?}"
    );
}

fn pull_with_both_body_and_query_is_400(b: &Backend) {
    let addr = b.addr();
    send_ok(addr, "both", "s", "x");
    let body = json!({"chat": "both"}).to_string();
    for path in [
        "/api/pull?chat=both",
        "/api/pull?limit=3",
        "/api/pull?chat=both&limit=3&reverse=true",
    ] {
        let r = request(addr, "GET", path, JSON_CT, body.as_bytes());
        assert_error(&r, 400, &format!("GET {path} with JSON body {body}"));
    }
}

// ---------------------------------------------------------------------------
// order and cursor
// ---------------------------------------------------------------------------

fn pull_is_newest_first_by_default(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "order", "m", 5);
    for params in [
        json!({"chat": "order"}),
        json!({"chat": "order", "reverse": false}),
    ] {
        let page = parse_page(&pull_json(addr, params.clone()), &format!("pull {params}"));
        assert_eq!(
            page.texts(),
            vec!["m4", "m3", "m2", "m1", "m0"],
            "pull {params} must be newest first"
        );
        assert_eq!(
            page.times(),
            desc(times.clone()),
            "pull {params} send_times"
        );
        assert!(!page.has_more, "pull {params}: has_more");
        assert_eq!(page.next_cursor, 0, "pull {params}: next_cursor");
    }
    let page = parse_page(&pull_query(addr, "chat=order"), "pull ?chat=order");
    assert_eq!(
        page.texts(),
        vec!["m4", "m3", "m2", "m1", "m0"],
        "query form must be newest first by default"
    );
}

fn pull_reverse_is_oldest_first(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "order", "m", 5);
    let page = parse_page(
        &pull_json(addr, json!({"chat": "order", "reverse": true})),
        "pull reverse",
    );
    assert_eq!(
        page.texts(),
        vec!["m0", "m1", "m2", "m3", "m4"],
        "reverse=true must be oldest first"
    );
    assert_eq!(page.times(), times, "reverse=true send_times");
    let page = parse_page(
        &pull_query(addr, "chat=order&reverse=true&limit=2"),
        "pull ?reverse=true&limit=2",
    );
    assert_eq!(
        page.texts(),
        vec!["m0", "m1"],
        "reverse=true, cursor 0 starts at the oldest end"
    );
}

fn cursor_is_exclusive_newest_first(b: &Backend) {
    let addr = b.addr();
    let t = send_n(addr, "cur", "m", 10);
    let page = pull_page(addr, "cur", t[5], 100, false);
    assert_eq!(
        page.times(),
        vec![t[4], t[3], t[2], t[1], t[0]],
        "cursor t5, newest-first: strictly older than t5"
    );
    assert!(!page.has_more);
    assert_eq!(page.next_cursor, 0);

    let page = pull_page(addr, "cur", t[5], 2, false);
    assert_eq!(page.times(), vec![t[4], t[3]], "cursor t5, limit 2");
    assert!(page.has_more, "cursor t5, limit 2: 5 older messages remain");
    assert_eq!(page.next_cursor, t[3]);

    let page = pull_page(addr, "cur", t[0], 10, false);
    assert!(
        page.messages.is_empty(),
        "nothing is older than the oldest message: {page:?}"
    );
    assert!(!page.has_more);
    assert_eq!(page.next_cursor, 0);

    let page = pull_page(addr, "cur", t[9] + 10_000_000, 100, false);
    assert_eq!(
        page.times(),
        desc(t.clone()),
        "a cursor in the future returns everything"
    );

    let page = pull_page(addr, "cur", t[9], 100, false);
    assert_eq!(
        page.times(),
        desc(t[..9].to_vec()),
        "cursor = newest excludes the newest"
    );
}

fn cursor_is_exclusive_oldest_first(b: &Backend) {
    let addr = b.addr();
    let t = send_n(addr, "cur", "m", 10);
    let page = pull_page(addr, "cur", t[5], 100, true);
    assert_eq!(
        page.times(),
        vec![t[6], t[7], t[8], t[9]],
        "cursor t5, oldest-first: strictly newer than t5"
    );
    assert!(!page.has_more);
    assert_eq!(page.next_cursor, 0);

    let page = pull_page(addr, "cur", t[5], 3, true);
    assert_eq!(page.times(), vec![t[6], t[7], t[8]], "cursor t5, limit 3");
    assert!(page.has_more);
    assert_eq!(page.next_cursor, t[8]);

    let page = pull_page(addr, "cur", t[9], 10, true);
    assert!(
        page.messages.is_empty(),
        "nothing is newer than the newest message: {page:?}"
    );
    assert!(!page.has_more);
    assert_eq!(page.next_cursor, 0);

    let page = pull_page(addr, "cur", 1, 100, true);
    assert_eq!(
        page.times(),
        t,
        "cursor 1 (long ago), oldest-first returns everything"
    );

    let page = pull_page(addr, "cur", t[0], 100, true);
    assert_eq!(
        page.times(),
        t[1..].to_vec(),
        "cursor = oldest excludes the oldest"
    );
}

// ---------------------------------------------------------------------------
// pagination walks
// ---------------------------------------------------------------------------

const LIMITS: [i64; 5] = [1, 3, 7, 10, 100];

fn pagination_walk_small_sequential(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "walk", "m", 23);
    let mut conn = HttpConn::connect(addr);
    for limit in LIMITS {
        for reverse in [false, true] {
            for form in [Form::Json, Form::Query] {
                let got: Vec<i64> = walk(&mut conn, "walk", limit, reverse, form)
                    .iter()
                    .map(|m| m.send_time)
                    .collect();
                let want = if reverse {
                    asc(times.clone())
                } else {
                    desc(times.clone())
                };
                assert_eq!(
                    got, want,
                    "walk limit={limit} reverse={reverse} {form:?} must return every message once, in order"
                );
            }
        }
    }
}

fn concurrent_senders_unique_times_and_full_walks(b: &Backend) {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 150;
    let addr = b.addr();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let mut sent = Vec::new();
                for i in 0..PER_THREAD {
                    // Lots of identical messages on purpose: same sender and text across threads.
                    let sender = format!("user{}", t % 2);
                    let text = format!("dup text {}", i % 3);
                    let st = conn.send_ok("busy", &sender, &text);
                    sent.push((st, sender, text));
                }
                sent
            })
        })
        .collect();
    let mut by_time: HashMap<i64, (String, String)> = HashMap::new();
    for h in handles {
        let sent = h.join().expect("sender thread panicked");
        for w in sent.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "one sender's consecutive sends must get increasing send_times: {} then {}",
                w[0].0,
                w[1].0
            );
        }
        for (st, sender, text) in sent {
            if let Some(prev) = by_time.insert(st, (sender.clone(), text.clone())) {
                panic!(
                    "send_time {st} was returned twice (for {prev:?} and {:?})",
                    (sender, text)
                );
            }
        }
    }
    assert_eq!(
        by_time.len(),
        THREADS * PER_THREAD,
        "every send must get a unique send_time"
    );
    let all: Vec<i64> = by_time.keys().copied().collect();

    let mut conn = HttpConn::connect(addr);
    for limit in LIMITS {
        for reverse in [false, true] {
            let form = if limit == 7 { Form::Query } else { Form::Json };
            let msgs = walk(&mut conn, "busy", limit, reverse, form);
            let got: Vec<i64> = msgs.iter().map(|m| m.send_time).collect();
            let want = if reverse {
                asc(all.clone())
            } else {
                desc(all.clone())
            };
            assert_eq!(
                got.len(),
                want.len(),
                "walk limit={limit} reverse={reverse}: message count"
            );
            assert_eq!(
                got, want,
                "walk limit={limit} reverse={reverse}: every send_time exactly once, in order"
            );
            for m in &msgs {
                let (sender, text) = &by_time[&m.send_time];
                assert_eq!(
                    (&m.chat[..], &m.sender, &m.text),
                    ("busy", sender, text),
                    "walk limit={limit} reverse={reverse}: content of message {}",
                    m.send_time
                );
            }
        }
    }
}

fn newest_first_walk_during_concurrent_writes(b: &Backend) {
    let addr = b.addr();
    let preseed = send_n(addr, "live", "pre", 300);

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            let started = started.clone();
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let mut acked = Vec::new(); // (send_time, when the 200 arrived)
                for i in 0..3000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let st = conn.send_ok("live", &format!("w{w}"), &format!("live {i}"));
                    acked.push((st, Instant::now()));
                    if i == 5 {
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                }
                acked
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), "writers to start", || {
        (started.load(Ordering::SeqCst) == 4).then_some(())
    });

    let mut conn = HttpConn::connect(addr);
    let walk_start = Instant::now();
    let newest_first = walk(&mut conn, "live", 7, false, Form::Json);
    // An oldest-first walk during writes must at least never duplicate and stay ordered
    // (walk() checks the order, assert_unique the duplicates).
    let oldest_first_live = walk(&mut conn, "live", 10, true, Form::Json);
    stop.store(true, Ordering::SeqCst);
    let mut acked_all = Vec::new();
    for w in writers {
        acked_all.extend(w.join().expect("writer thread panicked"));
    }

    let walked: Vec<i64> = newest_first.iter().map(|m| m.send_time).collect();
    assert_unique(&walked, "newest-first walk during writes");
    for w in walked.windows(2) {
        assert!(
            w[0] > w[1],
            "newest-first walk during writes must be strictly descending: {w:?}"
        );
    }
    let walked_set: HashSet<i64> = walked.iter().copied().collect();
    let existed_at_start: Vec<i64> = preseed
        .iter()
        .copied()
        .chain(
            acked_all
                .iter()
                .filter(|(_, at)| *at < walk_start)
                .map(|(t, _)| *t),
        )
        .collect();
    let missing: Vec<i64> = existed_at_start
        .iter()
        .copied()
        .filter(|t| !walked_set.contains(t))
        .collect();
    assert!(
        missing.is_empty(),
        "newest-first walk during writes skipped {} messages that existed when it started, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let all_sent: HashSet<i64> = preseed
        .iter()
        .copied()
        .chain(acked_all.iter().map(|(t, _)| *t))
        .collect();
    assert_eq!(
        all_sent.len(),
        preseed.len() + acked_all.len(),
        "send_times must be unique under concurrent writers"
    );
    for t in &walked {
        assert!(
            all_sent.contains(t),
            "walk returned send_time {t} that no send returned"
        );
    }
    assert_unique(
        &oldest_first_live
            .iter()
            .map(|m| m.send_time)
            .collect::<Vec<_>>(),
        "oldest-first walk during writes",
    );

    // After all writers finished, an oldest-first walk sees everything exactly once.
    let final_walk: Vec<i64> = walk(&mut conn, "live", 10, true, Form::Json)
        .iter()
        .map(|m| m.send_time)
        .collect();
    assert_eq!(
        final_walk,
        asc(all_sent.into_iter().collect()),
        "oldest-first walk after writers finished"
    );
}

// ---------------------------------------------------------------------------
// limit, has_more, next_cursor
// ---------------------------------------------------------------------------

fn limit_absent_or_zero_means_10(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "lim", "m", 25);
    let want = desc(times)[..10].to_vec();
    for params in [json!({"chat": "lim"}), json!({"chat": "lim", "limit": 0})] {
        let page = parse_page(&pull_json(addr, params.clone()), &format!("pull {params}"));
        assert_eq!(page.times(), want, "pull {params}: default limit is 10");
        assert!(page.has_more, "pull {params}: has_more");
        assert_eq!(page.next_cursor, want[9], "pull {params}: next_cursor");
    }
    for q in ["chat=lim", "chat=lim&limit=0"] {
        let page = parse_page(&pull_query(addr, q), &format!("pull ?{q}"));
        assert_eq!(page.times(), want, "pull ?{q}: default limit is 10");
    }
}

fn limit_above_100_is_clamped(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "big", "m", 130);
    let want = desc(times)[..100].to_vec();
    check_clamped(addr, &want, &[100, 101, 1000, 1_000_000]);
}

/// Limits that don't fit in 32 bits are still valid JSON integers "above 100".
fn limit_beyond_32_bits_is_clamped(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "big", "m", 130);
    let want = desc(times)[..100].to_vec();
    check_clamped(
        addr,
        &want,
        &[i64::from(i32::MAX) + 1, i64::from(u32::MAX) + 1, i64::MAX],
    );
}

fn check_clamped(addr: SocketAddr, want: &[i64], limits: &[i64]) {
    for &limit in limits {
        let params = json!({"chat": "big", "limit": limit});
        let page = parse_page(&pull_json(addr, params.clone()), &format!("pull {params}"));
        assert_eq!(
            page.messages.len(),
            100,
            "pull {params}: limit is clamped to 100"
        );
        assert_eq!(page.times(), want, "pull {params}: the 100 newest");
        assert!(page.has_more, "pull {params}: 30 more remain");
        assert_eq!(page.next_cursor, want[99], "pull {params}: next_cursor");
        let q = format!("chat=big&limit={limit}");
        let page = parse_page(&pull_query(addr, &q), &format!("pull ?{q}"));
        assert_eq!(page.times(), want, "pull ?{q}: the 100 newest");
    }
}

fn limit_negative_is_400(b: &Backend) {
    let addr = b.addr();
    send_n(addr, "neg", "m", 3);
    for limit in [-1i64, -100, i64::MIN] {
        let params = json!({"chat": "neg", "limit": limit});
        assert_error(
            &pull_json(addr, params.clone()),
            400,
            &format!("pull {params}"),
        );
        let q = format!("chat=neg&limit={limit}");
        assert_error(&pull_query(addr, &q), 400, &format!("pull ?{q}"));
    }
}

fn has_more_and_next_cursor_exact(b: &Backend) {
    let addr = b.addr();
    let t = send_n(addr, "exact", "m", 10);

    // exactly-full page
    let page = pull_page(addr, "exact", 0, 10, false);
    assert_eq!(page.times(), desc(t.clone()));
    assert!(
        !page.has_more,
        "10 messages, limit 10: has_more must be false"
    );
    assert_eq!(
        page.next_cursor, 0,
        "10 messages, limit 10: next_cursor must be 0"
    );
    let page = pull_page(addr, "exact", 0, 10, true);
    assert_eq!(page.times(), t);
    assert!(
        !page.has_more,
        "reverse, 10 messages, limit 10: has_more must be false"
    );
    assert_eq!(
        page.next_cursor, 0,
        "reverse, 10 messages, limit 10: next_cursor must be 0"
    );

    // one short
    let page = pull_page(addr, "exact", 0, 9, false);
    assert!(page.has_more, "10 messages, limit 9: has_more");
    assert_eq!(
        page.next_cursor, t[1],
        "limit 9 newest-first: next_cursor = t1"
    );
    let page = pull_page(addr, "exact", t[1], 1, false);
    assert_eq!(page.times(), vec![t[0]]);
    assert!(!page.has_more, "the last remaining message: has_more false");
    assert_eq!(page.next_cursor, 0);
    let page = pull_page(addr, "exact", 0, 9, true);
    assert!(page.has_more, "reverse, limit 9: has_more");
    assert_eq!(
        page.next_cursor, t[8],
        "limit 9 oldest-first: next_cursor = t8"
    );

    // a cursor page that is exactly full
    let page = pull_page(addr, "exact", t[0], 9, true);
    assert_eq!(page.times(), t[1..].to_vec());
    assert!(
        !page.has_more,
        "cursor t0, limit 9, reverse: exactly the 9 remaining, has_more false"
    );
    assert_eq!(page.next_cursor, 0);
    let page = pull_page(addr, "exact", t[9], 9, false);
    assert_eq!(page.times(), desc(t[..9].to_vec()));
    assert!(
        !page.has_more,
        "cursor t9, limit 9: exactly the 9 remaining, has_more false"
    );
    assert_eq!(page.next_cursor, 0);

    // one more message makes the full page have more
    let t10 = send_ok(addr, "exact", "s", "m10");
    let page = pull_page(addr, "exact", 0, 10, false);
    assert!(page.has_more, "11 messages, limit 10: has_more");
    assert_eq!(page.next_cursor, t[1]);
    assert_eq!(page.messages[0].send_time, t10);
}

// ---------------------------------------------------------------------------
// validation
// ---------------------------------------------------------------------------

fn send_rejects_empty_fields(b: &Backend) {
    let addr = b.addr();
    let cases = [
        json!({"chat": "", "text": "t", "sender": "s"}),
        json!({"chat": "v", "text": "", "sender": "s"}),
        json!({"chat": "v", "text": "t", "sender": ""}),
    ];
    for body in cases {
        assert_error(
            &send_raw_body(addr, body.to_string().as_bytes()),
            400,
            &format!("send {body}"),
        );
    }
    assert_chat_empty(addr, "v", "empty fields");
}

fn send_enforces_byte_length_limits(b: &Backend) {
    let addr = b.addr();
    let mut accepted = Vec::new();
    let mut check = |chat: String, sender: String, text: String, ok: bool, what: &str| {
        let r = send(addr, &chat, &sender, &text);
        let ctx = format!(
            "{what} (chat {} bytes, sender {} bytes, text {} bytes)",
            chat.len(),
            sender.len(),
            text.len()
        );
        if ok {
            let t = send_time_of(&r, &ctx);
            accepted.push((chat, sender, text, t));
        } else {
            assert_error(&r, 400, &ctx);
        }
    };
    let a = |n: usize| "a".repeat(n);
    let s = || "s".to_string();
    let t = || "t".to_string();
    // chat
    check(a(256), s(), t(), true, "chat of exactly 256 bytes");
    check(a(257), s(), t(), false, "chat of 257 bytes");
    check(
        "é".repeat(128),
        s(),
        t(),
        true,
        "chat of 128 'é' = 256 bytes",
    );
    check(
        "é".repeat(129),
        s(),
        t(),
        false,
        "chat of 129 'é' = 258 bytes (only 129 chars)",
    );
    // sender
    check(
        "len".into(),
        a(256),
        t(),
        true,
        "sender of exactly 256 bytes",
    );
    check("len".into(), a(257), t(), false, "sender of 257 bytes");
    check(
        "len".into(),
        "€".repeat(86),
        t(),
        false,
        "sender of 86 '€' = 258 bytes (only 86 chars)",
    );
    // text
    check(
        "len".into(),
        s(),
        a(65536),
        true,
        "text of exactly 65536 bytes",
    );
    check("len".into(), s(), a(65537), false, "text of 65537 bytes");
    check(
        "len".into(),
        s(),
        "😀".repeat(16384),
        true,
        "text of 16384 '😀' = 65536 bytes",
    );
    check(
        "len".into(),
        s(),
        "€".repeat(21846),
        false,
        "text of 21846 '€' = 65538 bytes (only 21846 chars)",
    );

    // accepted ones round-trip exactly, rejected ones are not stored
    for (chat, sender, text, t) in &accepted {
        let stored: Vec<Msg> = pull_all_newest_first(addr, chat)
            .into_iter()
            .filter(|m| m.send_time == *t)
            .collect();
        assert_eq!(
            stored.len(),
            1,
            "accepted message at {t} in chat of {} bytes must be stored",
            chat.len()
        );
        assert_eq!(
            &stored[0].sender,
            sender,
            "sender of {} bytes must round-trip",
            sender.len()
        );
        assert!(
            stored[0].text == *text,
            "text of {} bytes must round-trip exactly",
            text.len()
        );
    }
    let in_len = pull_all_newest_first(addr, "len");
    assert_eq!(
        in_len.len(),
        3,
        "chat 'len' must hold only the 3 accepted messages, got {}",
        in_len.len()
    );
}

fn send_rejects_wrong_json_types(b: &Backend) {
    let addr = b.addr();
    let wrong = [
        json!(5),
        json!(true),
        json!(null),
        json!(["x"]),
        json!({"x": 1}),
        json!(1.5),
    ];
    for field in ["chat", "text", "sender"] {
        for value in &wrong {
            let mut body = json!({"chat": "types", "text": "t", "sender": "s"});
            body[field] = value.clone();
            assert_error(
                &send_raw_body(addr, body.to_string().as_bytes()),
                400,
                &format!("send with {field}: {value}"),
            );
        }
    }
    assert_chat_empty(addr, "types", "wrong JSON types");
    assert_chat_empty(addr, "5", "chat: 5 must not be coerced to \"5\"");
}

fn send_rejects_missing_fields(b: &Backend) {
    let addr = b.addr();
    let cases = [
        json!({"text": "t", "sender": "s"}),
        json!({"chat": "miss", "sender": "s"}),
        json!({"chat": "miss", "text": "t"}),
        json!({}),
    ];
    for body in cases {
        assert_error(
            &send_raw_body(addr, body.to_string().as_bytes()),
            400,
            &format!("send {body}"),
        );
    }
    assert_chat_empty(addr, "miss", "missing fields");
}

fn send_rejects_invalid_json(b: &Backend) {
    let addr = b.addr();
    let cases: [&[u8]; 10] = [
        b"",
        b"{",
        b"not json",
        b"[]",
        b"null",
        b"\"j\"",
        b"{\"chat\": \"j\", \"text\": \"t\", \"sender\": \"s\"} trailing",
        b"{\"chat\": \"j\", \"text\": \"t\", \"sender\": \"s\",}",
        b"{'chat': 'j', 'text': 't', 'sender': 's'}",
        b"{\"chat\": \"j\", \"text\": \"t\", \"sender\": \"s\"",
    ];
    for body in cases {
        assert_error(
            &send_raw_body(addr, body),
            400,
            &format!(
                "send with invalid JSON body {:?}",
                String::from_utf8_lossy(body)
            ),
        );
    }
    assert_chat_empty(addr, "j", "invalid JSON");
}

fn send_rejects_invalid_utf8(b: &Backend) {
    let addr = b.addr();
    let bad: [&[u8]; 4] = [b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80"];
    for seq in bad {
        for field in ["chat", "text", "sender"] {
            let mut body = Vec::new();
            body.extend_from_slice(b"{");
            for (i, f) in ["chat", "text", "sender"].iter().enumerate() {
                if i > 0 {
                    body.extend_from_slice(b",");
                }
                body.extend_from_slice(format!("\"{f}\":\"").as_bytes());
                body.extend_from_slice(if *f == "chat" { b"u" } else { b"x" });
                if *f == field {
                    body.extend_from_slice(seq);
                }
                body.extend_from_slice(b"\"");
            }
            body.extend_from_slice(b"}");
            assert_error(
                &send_raw_body(addr, &body),
                400,
                &format!("send with invalid UTF-8 {seq:02x?} in {field}"),
            );
        }
    }
    assert_chat_empty(addr, "u", "invalid UTF-8");
}

fn pull_rejects_invalid_body_params(b: &Backend) {
    let addr = b.addr();
    send_ok(addr, "c", "s", "x");
    let cases: Vec<Vec<u8>> = vec![
        b"{}".to_vec(),
        br#"{"cursor": 0, "limit": 3}"#.to_vec(),
        br#"{"chat": 5}"#.to_vec(),
        br#"{"chat": null}"#.to_vec(),
        br#"{"chat": ["c"]}"#.to_vec(),
        br#"{"chat": "c", "limit": "3"}"#.to_vec(),
        br#"{"chat": "c", "limit": 2.5}"#.to_vec(),
        br#"{"chat": "c", "limit": -1}"#.to_vec(),
        br#"{"chat": "c", "reverse": "yes"}"#.to_vec(),
        br#"{"chat": "c", "reverse": 1}"#.to_vec(),
        br#"{"chat": "c", "cursor": "0"}"#.to_vec(),
        br#"{"chat": "c", "cursor": 1.5}"#.to_vec(),
        br#"{"chat": "c", "cursor": true}"#.to_vec(),
        br#"{"chat": "c""#.to_vec(),
        b"not json".to_vec(),
        b"[]".to_vec(),
        b"{\"chat\": \"c\xff\"}".to_vec(),
    ];
    for body in cases {
        assert_error(
            &pull_raw_body(addr, &body),
            400,
            &format!("pull with body {:?}", String::from_utf8_lossy(&body)),
        );
    }
}

fn pull_rejects_invalid_query_params(b: &Backend) {
    let addr = b.addr();
    send_ok(addr, "c", "s", "x");
    let r = request(addr, "GET", "/api/pull", &[], b"");
    assert_error(
        &r,
        400,
        "GET /api/pull without any parameters (missing chat)",
    );
    for q in [
        "limit=3",
        "cursor=0&limit=3&reverse=false",
        "chat=c&limit=abc",
        "chat=c&limit=3x",
        "chat=c&limit=-1",
        "chat=c&reverse=yes",
        "chat=c&cursor=abc",
        "chat=c&cursor=1.5",
    ] {
        assert_error(&pull_query(addr, q), 400, &format!("pull ?{q}"));
    }
}

fn pull_query_invalid_utf8_is_400(b: &Backend) {
    let addr = b.addr();
    for q in ["chat=%FF", "chat=c%C3%28"] {
        assert_error(
            &pull_query(addr, q),
            400,
            &format!("pull ?{q} (percent-decodes to invalid UTF-8)"),
        );
    }
}

// ---------------------------------------------------------------------------
// chat naming, content
// ---------------------------------------------------------------------------

fn dm_rooms_are_canonical(b: &Backend) {
    let addr = b.addr();
    let t1 = send_ok(addr, "bob:alice", "bob", "hi alice");
    let t2 = send_ok(addr, "alice:bob", "alice", "hi bob");
    for spelling in ["alice:bob", "bob:alice"] {
        let page = pull_page(addr, spelling, 0, 10, false);
        assert_eq!(
            page.times(),
            vec![t2, t1],
            "pull {spelling:?}: both spellings are one room"
        );
        for m in &page.messages {
            assert_eq!(
                m.chat, "alice:bob",
                "pull {spelling:?}: the chat field carries the sorted form"
            );
        }
    }
    let page = parse_page(
        &pull_query(addr, "chat=bob%3Aalice"),
        "pull ?chat=bob%3Aalice",
    );
    assert_eq!(
        page.times(),
        vec![t2, t1],
        "query form with the other spelling"
    );
    let page = parse_page(
        &pull_query(addr, "chat=bob:alice&reverse=true"),
        "pull ?chat=bob:alice",
    );
    assert_eq!(page.times(), vec![t1, t2], "query form, unencoded colon");

    // byte order, not case-insensitive or locale order: 'Z' (0x5A) < 'a' (0x61)
    let t = send_ok(addr, "alice:Zed", "alice", "x");
    let page = pull_page(addr, "Zed:alice", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
    assert_eq!(
        page.messages[0].chat, "Zed:alice",
        "sorted by bytes: 'Zed' < 'alice'"
    );
    // multi-byte: 'z' (0x7A) < 'é' (0xC3..)
    let t = send_ok(addr, "é:z", "z", "x");
    let page = pull_page(addr, "z:é", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
    assert_eq!(page.messages[0].chat, "z:é", "sorted by bytes: 'z' < 'é'");
    // prefix ordering: "ab" < "abc"
    let t = send_ok(addr, "abc:ab", "ab", "x");
    let page = pull_page(addr, "ab:abc", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
    assert_eq!(page.messages[0].chat, "ab:abc");
    // same person on both sides
    let t = send_ok(addr, "me:me", "me", "note to self");
    let page = pull_page(addr, "me:me", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
    assert_eq!(page.messages[0].chat, "me:me");
}

fn dm_concurrent_senders_on_both_spellings(b: &Backend) {
    let addr = b.addr();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                let (chat, sender) = if t % 2 == 0 {
                    ("xavier:yann", "xavier")
                } else {
                    ("yann:xavier", "yann")
                };
                let mut conn = HttpConn::connect(addr);
                (0..100)
                    .map(|i| conn.send_ok(chat, sender, &format!("{i}")))
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().expect("sender thread panicked"));
    }
    assert_unique(
        &all,
        "send_times in one DM room written through both spellings",
    );
    for spelling in ["xavier:yann", "yann:xavier"] {
        let msgs = walk(
            &mut HttpConn::connect(addr),
            spelling,
            100,
            false,
            Form::Json,
        );
        let got: Vec<i64> = msgs.iter().map(|m| m.send_time).collect();
        assert_eq!(
            got,
            desc(all.clone()),
            "walk of {spelling:?} must return all 400 messages of the room once"
        );
        assert!(
            msgs.iter().all(|m| m.chat == "xavier:yann"),
            "chat field must be the sorted form"
        );
    }
}

fn non_dm_names_are_not_canonicalized(b: &Backend) {
    let addr = b.addr();
    let names = [
        "chatroom12345",
        "a:b:c",
        "c:b:a",
        ":b",
        "b:",
        "b::a",
        "a::b",
        ":",
        "::",
        "with space",
        "new\nline\ttab",
        "brace}{x",
        "im:{x}",
        "*",
        "quote\"back\\slash",
    ];
    let mut times = HashMap::new();
    for name in names {
        times.insert(name, send_ok(addr, name, "s", &format!("in {name}")));
    }
    for name in names {
        let page = pull_page(addr, name, 0, 10, false);
        assert_eq!(
            page.times(),
            vec![times[name]],
            "chat {name:?} must be its own room"
        );
        assert_eq!(
            page.messages[0].chat, name,
            "chat {name:?} must be returned as given"
        );
        assert_eq!(page.messages[0].text, format!("in {name}"));
    }
}

fn unicode_round_trips(b: &Backend) {
    let addr = b.addr();
    let chat = "聊天室🎉";
    let sender = "Zoë 🙂";
    let texts = [
        "你好, мир! 👋🏽 نص عربي",
        "combining: e\u{301} ñ, ZWJ family: 👨\u{200d}👩\u{200d}👧, flags: 🇫🇷🇯🇵",
        "\u{FEFF}BOM and \u{10FFFF} max code point",
    ];
    let mut times = Vec::new();
    for text in texts {
        times.push(send_ok(addr, chat, sender, text));
    }
    let page = pull_page(addr, chat, 0, 10, true);
    assert_eq!(page.times(), times);
    for (m, text) in page.messages.iter().zip(texts) {
        assert_eq!(m.chat, chat, "unicode chat must round-trip");
        assert_eq!(m.sender, sender, "unicode sender must round-trip");
        assert_eq!(m.text, text, "unicode text must round-trip");
    }
    let q = format!("chat={}&reverse=true", pct(chat));
    let page2 = parse_page(&pull_query(addr, &q), &format!("pull ?{q}"));
    assert_eq!(
        page2, page,
        "percent-encoded unicode chat in the query form"
    );

    // escaped surrogate pair in the request JSON decodes to the real character
    let t = send_time_of(
        &send_raw_body(
            addr,
            br#"{"chat": "esc", "sender": "\u00e9", "text": "\ud83d\ude00 \u4f60"}"#,
        ),
        "send with \\u escapes",
    );
    let page = pull_page(addr, "esc", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
    assert_eq!(
        page.messages[0].text, "😀 你",
        "\\u escapes (with a surrogate pair) must be decoded"
    );
    assert_eq!(page.messages[0].sender, "é");
}

fn json_escapes_round_trip(b: &Backend) {
    let addr = b.addr();
    let texts = [
        "quote \" backslash \\ slash / ",
        "newline \n tab \t cr \r formfeed \u{c} backspace \u{8}",
        "control \u{1} \u{1f} del \u{7f}",
        "nul \u{0} inside",
        "  leading and trailing spaces  ",
        "{\"looks\": [\"like\", \"json\"]}",
        "line1\r\n\r\nHTTP/1.1 200 OK\r\n",
    ];
    let mut times = Vec::new();
    for text in texts {
        times.push(send_ok(addr, "esc", "s\"\\\n", text));
    }
    let page = pull_page(addr, "esc", 0, 10, true);
    assert_eq!(page.times(), times);
    for (m, text) in page.messages.iter().zip(texts) {
        assert_eq!(
            m.text, text,
            "text with JSON escapes must round-trip exactly"
        );
        assert_eq!(
            m.sender, "s\"\\\n",
            "sender with JSON escapes must round-trip exactly"
        );
    }
}

fn identical_messages_are_both_stored(b: &Backend) {
    let addr = b.addr();
    let t1 = send_ok(addr, "dup", "kylie", "same");
    let t2 = send_ok(addr, "dup", "kylie", "same");
    let t3 = send_ok(addr, "dup", "kylie", "same");
    assert!(
        t1 < t2 && t2 < t3,
        "identical messages get distinct increasing send_times: {t1} {t2} {t3}"
    );
    let page = pull_page(addr, "dup", 0, 10, false);
    assert_eq!(
        page.times(),
        vec![t3, t2, t1],
        "all three identical messages must be stored"
    );
    for m in &page.messages {
        assert_eq!(
            (m.chat.as_str(), m.sender.as_str(), m.text.as_str()),
            ("dup", "kylie", "same")
        );
    }
}

fn pull_unknown_chat_is_empty(b: &Backend) {
    let addr = b.addr();
    send_ok(addr, "known", "s", "x");
    let empty = Page {
        messages: vec![],
        has_more: false,
        next_cursor: 0,
    };
    for params in [
        json!({"chat": "unknown"}),
        json!({"chat": "unknown", "reverse": true}),
        json!({"chat": "unknown", "cursor": now_us(), "limit": 5}),
        json!({"chat": "x:y"}),
    ] {
        let r = pull_json(addr, params.clone());
        assert_eq!(
            parse_page(&r, &format!("pull {params}")),
            empty,
            "pull {params} of an unknown chat"
        );
    }
    let r = pull_query(addr, "chat=unknown");
    assert_eq!(parse_page(&r, "pull ?chat=unknown"), empty);
}

// ---------------------------------------------------------------------------
// editing and deleting (issue 21)
// ---------------------------------------------------------------------------

fn edit_ok(addr: SocketAddr, chat: &str, send_time: i64, text: &str) -> i64 {
    let r = post_json(
        addr,
        "/api/edit",
        json!({"chat": chat, "send_time": send_time, "text": text}),
    );
    assert_eq!(r.status, 200, "edit {send_time}: {}", r.describe());
    assert_eq!(r.json()["send_time"], send_time, "{}", r.describe());
    r.json()["edited_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("edited_at missing: {}", r.describe()))
}

fn delete_ok(addr: SocketAddr, chat: &str, send_time: i64) {
    let r = post_json(
        addr,
        "/api/delete",
        json!({"chat": chat, "send_time": send_time}),
    );
    assert_eq!(r.status, 200, "delete {send_time}: {}", r.describe());
    assert_eq!(
        r.json(),
        json!({"send_time": send_time, "deleted": true}),
        "delete {send_time}"
    );
}

fn edit_replaces_text_in_place(b: &Backend) {
    let addr = b.addr();
    let before = now_us();
    let times = send_n(addr, "ed", "m", 3);
    let edited_at = edit_ok(addr, "ed", times[1], "changed 😀");
    assert!(edited_at > before && edited_at < now_us() + 1_000_000);
    let second = edit_ok(addr, "ed", times[1], "changed again");
    assert!(
        second > edited_at,
        "edited_at increases: {edited_at} then {second}"
    );
    let page = pull_page(addr, "ed", 0, 10, false);
    assert_eq!(
        page.times(),
        desc(times.clone()),
        "same place, same send_times"
    );
    assert_eq!(page.texts(), ["m2", "changed again", "m0"]);
    let edits: Vec<Option<i64>> = page.messages.iter().map(|m| m.edited_at).collect();
    assert_eq!(edits, [None, Some(second), None]);
    assert_eq!(page.messages[1].sender, "sender", "the sender is kept");
    // A DM room edited under its other spelling is the same room.
    let t = send_ok(addr, "bob:amy", "amy", "dm");
    edit_ok(addr, "amy:bob", t, "dm edited");
    assert_eq!(
        pull_page(addr, "bob:amy", 0, 10, false).texts(),
        ["dm edited"]
    );
}

fn edit_and_delete_take_every_form(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "forms", "m", 4);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let body = format!("chat=forms&send_time={}&text=by+form", times[0]);
    let r = request(addr, "POST", "/api/edit", &form, body.as_bytes());
    assert_eq!(r.status, 200, "form edit: {}", r.describe());
    let path = format!(
        "/api/edit?chat=forms&send_time={}&text=by%20query",
        times[1]
    );
    let r = request(addr, "POST", &path, &[], b"");
    assert_eq!(r.status, 200, "query edit: {}", r.describe());
    let body = format!("chat=forms&send_time={}", times[2]);
    let r = request(addr, "POST", "/api/delete", &form, body.as_bytes());
    assert_eq!(r.status, 200, "form delete: {}", r.describe());
    let path = format!("/api/delete?chat=forms&send_time={}", times[3]);
    let r = request(addr, "POST", &path, &[], b"");
    assert_eq!(r.status, 200, "query delete: {}", r.describe());
    let page = pull_page(addr, "forms", 0, 10, true);
    assert_eq!(page.texts(), ["by form", "by query"]);
    let r = request(addr, "GET", "/api/delete?chat=forms&send_time=1", &[], b"");
    assert_eq!(r.status, 405, "{}", r.describe());
    assert_eq!(r.header("allow"), Some("POST"));
}

fn delete_is_retry_safe_and_pages_stay_exact(b: &Backend) {
    let addr = b.addr();
    let times = send_n(addr, "del", "m", 10);
    for &t in &[times[1], times[4], times[5], times[9]] {
        delete_ok(addr, "del", t);
        delete_ok(addr, "del", t);
    }
    let visible: Vec<i64> = [0, 2, 3, 6, 7, 8].iter().map(|&i| times[i]).collect();
    // `limit` counts visible messages; has_more and next_cursor are exact.
    let page = pull_page(addr, "del", 0, 3, false);
    assert_eq!(page.times(), [times[8], times[7], times[6]]);
    assert!(page.has_more);
    assert_eq!(page.next_cursor, times[6]);
    let page = pull_page(addr, "del", times[6], 3, false);
    assert_eq!(page.times(), [times[3], times[2], times[0]]);
    assert!(!page.has_more, "nothing visible is older");
    for reverse in [false, true] {
        for limit in [1, 2, 4, 100] {
            let got = walk(
                &mut HttpConn::connect(addr),
                "del",
                limit,
                reverse,
                Form::Json,
            );
            let got: Vec<i64> = got.iter().map(|m| m.send_time).collect();
            let want = if reverse {
                asc(visible.clone())
            } else {
                desc(visible.clone())
            };
            assert_eq!(got, want, "walk limit={limit} reverse={reverse}");
        }
    }
}

fn unknown_messages_are_404(b: &Backend) {
    let addr = b.addr();
    let t = send_ok(addr, "gone", "s", "x");
    for (path, body) in [
        (
            "/api/edit",
            json!({"chat": "gone", "send_time": t + 1, "text": "y"}),
        ),
        ("/api/delete", json!({"chat": "gone", "send_time": t - 1})),
        ("/api/delete", json!({"chat": "never", "send_time": t})),
    ] {
        let r = post_json(addr, path, body.clone());
        assert_error(&r, 404, &format!("{path} {body}"));
        assert_eq!(r.json()["error"]["code"], "message_not_found");
    }
    delete_ok(addr, "gone", t);
    let r = post_json(
        addr,
        "/api/edit",
        json!({"chat": "gone", "send_time": t, "text": "z"}),
    );
    assert_error(&r, 404, "editing a deleted message");
    assert_eq!(r.json()["error"]["code"], "message_not_found");
}

fn edit_and_delete_are_validated(b: &Backend) {
    let addr = b.addr();
    let t = send_ok(addr, "val", "s", "x");
    let too_long = "t".repeat(64 * 1024 + 1);
    for (path, body) in [
        (
            "/api/edit",
            json!({"chat": "val", "send_time": t, "text": ""}),
        ),
        (
            "/api/edit",
            json!({"chat": "val", "send_time": t, "text": too_long}),
        ),
        ("/api/edit", json!({"chat": "val", "text": "no send_time"})),
        (
            "/api/edit",
            json!({"chat": "", "send_time": t, "text": "y"}),
        ),
        ("/api/delete", json!({"chat": "val", "send_time": -1})),
        ("/api/delete", json!({"chat": "val", "send_time": "1"})),
        ("/api/delete", json!({"send_time": t})),
        ("/api/delete", json!({"chat": "}x", "send_time": t})),
    ] {
        let r = post_json(addr, path, body.clone());
        assert_error(&r, 400, &format!("{path} {}", quoted(&body)));
        assert_eq!(r.json()["error"]["code"], "invalid_request");
    }
    let r = request(addr, "POST", "/api/delete", &[], b"not json");
    assert_error(&r, 400, "a body that is not JSON");
    let path = format!("/api/delete?chat=val&send_time={t}");
    let body = json!({"chat": "val", "send_time": t}).to_string();
    let r = request(addr, "POST", &path, &[], body.as_bytes());
    assert_error(&r, 400, "fields in both the body and the query string");
    assert_eq!(
        pull_page(addr, "val", 0, 10, false).texts(),
        ["x"],
        "unchanged"
    );
}

fn quoted(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(80).collect()
}

/// A message's state in the property test's model.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Visible(String),
    /// Its delete was sent and may or may not have happened yet.
    Deleting,
    Deleted,
}

/// Concurrent senders, editors and deleters against a model: walks made
/// meanwhile return no message twice, never one deleted before the walk
/// began, every message that stayed visible throughout, and with full
/// pages wherever `has_more`; once quiet, every walk equals the model.
fn walks_stay_exact_under_concurrent_changes(b: &Backend) {
    const ROUNDS: usize = 120;
    let addr = b.addr();
    let seed = send_n(addr, "prop", "seed", 60);
    let model = Arc::new(std::sync::Mutex::new(
        seed.iter()
            .enumerate()
            .map(|(i, &t)| (t, State::Visible(format!("seed{i}"))))
            .collect::<HashMap<i64, State>>(),
    ));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (model, done) = (model.clone(), done.clone());
        thread::spawn(move || {
            let mut conn = HttpConn::connect(addr);
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            for round in 0..ROUNDS {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let visible: Vec<i64> = {
                    let m = model.lock().unwrap();
                    let mut v: Vec<i64> = m
                        .iter()
                        .filter(|(_, s)| matches!(s, State::Visible(_)))
                        .map(|(k, _)| *k)
                        .collect();
                    v.sort();
                    v
                };
                let pick = visible.get((rng as usize) % visible.len().max(1)).copied();
                match (rng % 3, pick) {
                    (0, Some(t)) => {
                        model.lock().unwrap().insert(t, State::Deleting);
                        delete_ok(addr, "prop", t);
                        model.lock().unwrap().insert(t, State::Deleted);
                    }
                    (1, Some(t)) => {
                        let text = format!("edit{round}");
                        edit_ok(addr, "prop", t, &text);
                        model.lock().unwrap().insert(t, State::Visible(text));
                    }
                    _ => {
                        let text = format!("new{round}");
                        let t = conn.send_ok("prop", "sender", &text);
                        model.lock().unwrap().insert(t, State::Visible(text));
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut conn = HttpConn::connect(addr);
    let mut walks = 0;
    while !done.load(Ordering::SeqCst) || walks < 2 {
        let reverse = walks % 2 == 1;
        let before: HashMap<i64, State> = model.lock().unwrap().clone();
        let got = walk(&mut conn, "prop", 7, reverse, Form::Json);
        let after: HashMap<i64, State> = model.lock().unwrap().clone();
        let times: Vec<i64> = got.iter().map(|m| m.send_time).collect();
        assert_unique(&times, "a walk during changes");
        for m in &got {
            assert_ne!(
                before.get(&m.send_time),
                Some(&State::Deleted),
                "{m:?} was deleted before the walk began"
            );
        }
        for (t, state) in &before {
            // A delete never starts again once started: visible after the
            // walk means visible throughout.
            let stayed = matches!(state, State::Visible(_))
                && matches!(after.get(t), Some(State::Visible(_)));
            assert!(
                !stayed || times.contains(t),
                "{t} stayed visible but the walk missed it"
            );
        }
        walks += 1;
    }
    writer.join().expect("writer thread");
    let model = model.lock().unwrap();
    let mut want: Vec<(i64, String)> = model
        .iter()
        .filter_map(|(t, state)| match state {
            State::Visible(text) => Some((*t, text.clone())),
            _ => None,
        })
        .collect();
    want.sort();
    for limit in [3, 100] {
        let got = walk(&mut conn, "prop", limit, true, Form::Query);
        let got: Vec<(i64, String)> = got.into_iter().map(|m| (m.send_time, m.text)).collect();
        assert_eq!(got, want, "quiet walk, limit {limit}");
    }
    assert!(walks >= 2);
}
