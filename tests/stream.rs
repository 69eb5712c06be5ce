//! `GET /api/stream` (Server-Sent Events) against the real binary over
//! sockets: history then live events in order, exact resumption with
//! `Last-Event-ID` under concurrent sends, heartbeats, a reader that stops
//! reading, shutdown, errors before and after the stream starts, auth, the
//! connection limit, HTTP/1.0 framing and `curl -N`.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use im_server::auth::jwt;
use serde_json::json;

fn stream_path(chat: &str) -> String {
    format!("/api/stream?chat={}", pct(chat))
}

/// Every message of `chat`, oldest first, as pull sees it.
fn history(addr: std::net::SocketAddr, chat: &str) -> Vec<Msg> {
    let mut conn = HttpConn::connect(addr);
    walk(&mut conn, chat, 100, true, Form::Query)
}

/// Checks that `events` are exactly `messages` (same send_times as ids,
/// same JSON objects as pull's, same order).
fn assert_events_are(events: &[SseEvent], messages: &[Msg], ctx: &str) {
    let ids: Vec<i64> = events.iter().map(SseEvent::send_time).collect();
    let times: Vec<i64> = messages.iter().map(|m| m.send_time).collect();
    assert_eq!(ids, times, "{ctx}: event ids vs pull's send_times");
    for (event, message) in events.iter().zip(messages) {
        assert_eq!(
            event.event, None,
            "{ctx}: a message event has the default type"
        );
        let data = event.json();
        assert_eq!(
            data,
            json!({"chat": message.chat, "text": message.text, "sender": message.sender,
                   "send_time": message.send_time}),
            "{ctx}: the event's data is pull's message object"
        );
    }
}

fn history_then_live(backend: &Backend, chat: &str) {
    let addr = backend.addr();
    let mut sent = Vec::new();
    for i in 0..150 {
        sent.push(send_ok(
            addr,
            chat,
            "a",
            &format!("history {i} \"quoted\"\nnewline"),
        ));
    }
    let mut stream = SseStream::open(addr, &stream_path(chat), &[]);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-store"));
    assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
    assert_eq!(stream.header("content-length"), None);
    let old: Vec<SseEvent> = (0..150).map(|_| stream.next_event()).collect();
    // Live: sent after the stream caught up, from another thread.
    let live_chat = chat.to_string();
    let sender = thread::spawn(move || {
        (0..20)
            .map(|i| send_ok(addr, &live_chat, "b", &format!("live {i}")))
            .collect::<Vec<i64>>()
    });
    let live_times = sender.join().expect("sender");
    let live: Vec<SseEvent> = (0..20).map(|_| stream.next_event()).collect();
    let all = history(addr, chat);
    assert_eq!(all.len(), 170);
    assert_events_are(&old, &all[..150], "history");
    assert_events_are(&live, &all[150..], "live");
    assert_eq!(
        live.iter().map(SseEvent::send_time).collect::<Vec<_>>(),
        live_times
    );
    assert_eq!(
        old.iter().map(SseEvent::send_time).collect::<Vec<_>>(),
        sent
    );
}

#[test]
fn history_then_live_events_in_order() {
    history_then_live(&Backend::memory(), "live-room");
}

#[test]
fn history_then_live_events_in_order_without_long_poll() {
    // Waiting turned off: the stream pauses between empty pulls instead.
    history_then_live(
        &Backend::memory_with(&["--pull-max-wait-ms", "0"]),
        "live-room",
    );
}

#[test]
fn history_then_live_events_in_order_on_redis() {
    history_then_live(&Backend::redis(), "live-room");
}

/// A reader that drops the connection every few events and reconnects with
/// `Last-Event-ID` (and a stale `cursor` in the URL, as an `EventSource`
/// repeats it) while messages are being sent sees each message exactly once.
fn resume_exactly(backend: &Backend) {
    let addr = backend.addr();
    let chat = "resume-room";
    const TOTAL: usize = 400;
    let sender = thread::spawn(move || {
        let mut conn = HttpConn::connect(addr);
        for i in 0..TOTAL {
            conn.send_ok(chat, "s", &format!("m{i}"));
            if i % 16 == 0 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let mut seen: Vec<SseEvent> = Vec::new();
    let mut reconnects = 0;
    while seen.len() < TOTAL {
        let last = seen.last().map(|e| e.id.clone().expect("id"));
        let headers: Vec<(&str, &str)> = match &last {
            Some(id) => vec![("Last-Event-ID", id.as_str())],
            None => vec![],
        };
        // cursor=0 would replay everything: the header must win.
        let mut stream =
            SseStream::open(addr, &format!("{}&cursor=0", stream_path(chat)), &headers);
        let take = 1 + reconnects % 37;
        for _ in 0..take {
            if seen.len() == TOTAL {
                break;
            }
            seen.push(stream.next_event());
        }
        reconnects += 1;
        drop(stream);
    }
    sender.join().expect("sender");
    let all = history(addr, chat);
    assert_eq!(all.len(), TOTAL);
    assert_events_are(&seen, &all, "across reconnects");
    assert!(reconnects > 10, "reconnected {reconnects} times");
}

#[test]
fn reconnecting_with_last_event_id_resumes_exactly_under_concurrent_sends() {
    resume_exactly(&Backend::memory());
}

#[test]
fn reconnecting_with_last_event_id_resumes_exactly_on_redis() {
    resume_exactly(&Backend::redis());
}

#[test]
fn cursor_starts_after_the_given_send_time() {
    let backend = Backend::memory();
    let addr = backend.addr();
    let times: Vec<i64> = (0..5)
        .map(|i| send_ok(addr, "c", "a", &format!("{i}")))
        .collect();
    let path = format!("/api/stream?chat=c&cursor={}", times[2]);
    let mut stream = SseStream::open(addr, &path, &[]);
    assert_eq!(stream.next_event().send_time(), times[3]);
    assert_eq!(stream.next_event().send_time(), times[4]);
}

#[test]
fn a_silent_stream_gets_heartbeats() {
    let backend = Backend::memory_with(&["--stream-heartbeat-s", "1"]);
    let mut stream = SseStream::open(backend.addr(), &stream_path("quiet"), &[]);
    let start = Instant::now();
    let mut beats = Vec::new();
    while beats.len() < 3 {
        match stream.next_item().expect("read") {
            Some(SseItem::Comment(c)) => {
                assert_eq!(c, "hb");
                beats.push(start.elapsed());
            }
            other => panic!("only heartbeats on a silent stream, got {other:?}"),
        }
    }
    // About one a second: not a flood, not missing (generous for a loaded machine).
    assert!(beats[0] >= Duration::from_millis(900), "{beats:?}");
    assert!(beats[2] >= Duration::from_millis(2700), "{beats:?}");
    assert!(beats[2] < Duration::from_secs(8), "{beats:?}");
    // An event resets the silence; the stream goes on after heartbeats.
    let t = send_ok(backend.addr(), "quiet", "a", "after the heartbeats");
    assert_eq!(stream.next_event().send_time(), t);
}

/// A reader that stops reading: the gateway holds at most about one page
/// and `--max-output-buffer` for it (RSS stays bounded), and once its output
/// has not drained within the write timeout it gets a final `lagged` event
/// and the stream ends; what it got before is an exact prefix.
#[test]
fn a_reader_that_stops_reading_is_closed_with_a_lagged_event_and_bounded_memory() {
    let backend = Backend::memory_with(&[
        "--write-timeout-s",
        "3",
        "--max-output-buffer",
        "65536",
        "--threads",
        "1",
    ]);
    let addr = backend.addr();
    let pid = backend.server.pid().expect("pid");
    // 300 messages of 60 KiB of control characters: 18 MB stored, ~110 MB
    // of event JSON (each \u0001 is 6 bytes) if it were all buffered.
    let text = "\u{1}".repeat(60 * 1024);
    let mut conn = HttpConn::connect(addr);
    for _ in 0..300 {
        conn.send_ok("flood", "a", &text);
    }
    let before = proc_status_bytes(pid, "VmRSS");
    let mut stream = SseStream::open(addr, &stream_path("flood"), &[]);
    stream.set_read_timeout(Duration::from_secs(30));
    // Stop reading for longer than the write timeout.
    let peak = peak_rss_bytes(pid, Duration::from_millis(4500)).max(before);
    let items = stream.read_to_end();
    let events: Vec<&SseEvent> = items
        .iter()
        .filter_map(|i| match i {
            SseItem::Event(e) => Some(e),
            SseItem::Comment(_) => None,
        })
        .collect();
    let (last, messages) = events.split_last().expect("some events");
    assert_eq!(last.event.as_deref(), Some("lagged"), "the final event");
    assert_eq!(last.json()["error"]["code"], "lagged");
    assert!(stream.clean_end, "the body ends with the last chunk");
    assert!(
        messages.len() < 300,
        "a reader paused for longer than the write timeout is not sent everything ({} events)",
        messages.len()
    );
    let all = history(addr, "flood");
    let times: Vec<i64> = messages.iter().map(|e| e.send_time()).collect();
    let expected: Vec<i64> = all.iter().take(times.len()).map(|m| m.send_time).collect();
    assert_eq!(times, expected, "what was sent is an exact prefix");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "stalled stream: VmRSS {} MiB before, peak {} MiB (+{} MiB), {} events delivered",
        before >> 20,
        peak >> 20,
        growth >> 20,
        messages.len()
    );
    assert!(
        growth < 48 << 20,
        "the gateway grew by {} MiB for one stalled stream",
        growth >> 20
    );
}

#[test]
fn shutdown_ends_streams_promptly() {
    let mut backend = Backend::memory();
    let addr = backend.addr();
    let mut streams: Vec<SseStream> = (0..3)
        .map(|i| SseStream::open(addr, &stream_path(&format!("s{i}")), &[]))
        .collect();
    let t = send_ok(addr, "s0", "a", "before shutdown");
    assert_eq!(streams[0].next_event().send_time(), t);
    let start = Instant::now();
    backend.server.signal("TERM");
    for stream in &mut streams {
        let rest = stream.read_to_end();
        assert!(
            rest.iter().all(|i| matches!(i, SseItem::Comment(_))),
            "{rest:?}"
        );
        assert!(stream.clean_end, "ended with the last chunk");
    }
    let status = backend
        .server
        .wait_exit(Duration::from_secs(5))
        .expect("the server exits");
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "streams and server ended {:?} after SIGTERM",
        start.elapsed()
    );
}

#[test]
fn errors_before_the_stream_are_json_with_statuses() {
    let backend = Backend::memory();
    let addr = backend.addr();
    let refused = |path: &str, headers: &[(&str, &str)]| match SseStream::try_open(
        addr, path, headers, "HTTP/1.1",
    ) {
        Ok(_) => panic!("{path} {headers:?}: expected an error"),
        Err(r) => r,
    };
    let r = refused(&stream_path("c"), &[("Accept", "application/json")]);
    assert_error(&r, 406, "Accept without text/event-stream");
    let r = refused(
        &stream_path("c"),
        &[("Accept", "text/event-stream;q=0, */*")],
    );
    assert_error(&r, 406, "text/event-stream refused by q=0");
    assert_error(&refused("/api/stream", &[]), 400, "no chat");
    assert_error(
        &refused("/api/stream?chat=c&cursor=x", &[]),
        400,
        "bad cursor",
    );
    assert_error(&refused("/api/stream?chat=c&limit=5", &[]), 400, "limit");
    assert_error(
        &refused("/api/stream?chat=c&wait_ms=5", &[]),
        400,
        "wait_ms",
    );
    assert_error(
        &refused(&stream_path("c"), &[("Last-Event-ID", "not-a-number")]),
        400,
        "bad Last-Event-ID",
    );
    let r = request(addr, "POST", "/api/stream?chat=c", &[], b"");
    assert_error(&r, 405, "POST");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    // HEAD: the stream's head alone, then the connection closes.
    let mut conn = HttpConn::connect(addr);
    conn.write_request("HEAD", &stream_path("c"), &[], b"");
    let head = conn.read_head_response();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    conn.assert_closed("after the head of a stream");
    // No Accept at all, or */*: a stream (RFC 9110: no preference).
    for accept in [None, Some("*/*"), Some("text/*")] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
        let stream = SseStream::open(addr, &stream_path("c"), &headers);
        assert_eq!(stream.status, 200);
    }
}

#[test]
fn the_rpc_server_going_down_mid_stream_ends_it_with_an_error_event() {
    let mut rpc = Server::rpc(&[]);
    let gateway = Server::gateway(rpc.rpc_addr(), &[]);
    let addr = gateway.http_addr();
    let t = send_ok(addr, "c", "a", "one");
    let mut stream = SseStream::open(addr, &stream_path("c"), &[]);
    stream.set_read_timeout(Duration::from_secs(10));
    assert_eq!(stream.next_event().send_time(), t);
    rpc.kill();
    let items = stream.read_to_end();
    let Some(SseItem::Event(last)) = items.last() else {
        panic!("expected a final error event, got {items:?}");
    };
    assert_eq!(last.event.as_deref(), Some("error"), "{items:?}");
    assert_eq!(last.json()["error"]["code"], "unavailable");
    assert!(stream.clean_end);
    // Before a stream starts, the same failure is a plain 503.
    let r = SseStream::try_open(addr, &stream_path("c"), &[], "HTTP/1.1")
        .err()
        .expect("no stream without the RPC server");
    assert_error(&r, 503, "RPC server down");
}

#[test]
fn auth_on_refuses_like_pull() {
    const SECRET: &str = "an HS256 secret of at least 32 bytes, for tests";
    let (_dir, path) = temp_file("stream-auth", SECRET);
    let server = Server::start("all", &["--auth-jwt-secret-file", &path], &[]);
    let addr = server.http_addr();
    let exp = now_us() / 1_000_000 + 600;
    let token = |sub: &str| {
        format!(
            "Bearer {}",
            jwt::mint(SECRET.as_bytes(), &json!({"sub": sub, "exp": exp}))
        )
    };
    let open = |chat: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        SseStream::try_open(addr, &stream_path(chat), &headers, "HTTP/1.1")
    };
    let r = open("alice:bob", None).err().expect("401");
    assert_error(&r, 401, "no token");
    assert!(r.header("www-authenticate").is_some());
    let r = open("alice:bob", Some("Bearer nonsense"))
        .err()
        .expect("401");
    assert_error(&r, 401, "bad token");
    let carol = token("carol");
    let r = open("alice:bob", Some(&carol)).err().expect("403");
    assert_error(&r, 403, "not a member of the two-person room");
    let alice = token("alice");
    let mut stream = open("alice:bob", Some(&alice)).expect("alice may stream");
    let r = request(
        addr,
        "POST",
        "/api/send",
        &[
            ("Authorization", &alice),
            ("Content-Type", "application/json"),
        ],
        json!({"chat": "alice:bob", "text": "hi bob"})
            .to_string()
            .as_bytes(),
    );
    let t = send_time_of(&r, "alice sends");
    let event = stream.next_event();
    assert_eq!(event.send_time(), t);
    assert_eq!(event.json()["sender"], "alice");
}

/// A stream ends when its token does (issue 20 item 5): opened with a token
/// that has about 3 s left (`exp` 27 s ago, within the server's 30 s
/// leeway), it delivers while the token is valid, then ends with a final
/// `event: error` (`token_expired`), and a message sent after that is not
/// delivered on it; the same token is then refused by pull too.
#[test]
fn a_stream_ends_with_token_expired_when_its_token_expires() {
    const SECRET: &str = "an HS256 secret of at least 32 bytes, for tests";
    let (_dir, path) = temp_file("stream-exp", SECRET);
    let server = Server::start("all", &["--auth-jwt-secret-file", &path], &[]);
    let addr = server.http_addr();
    let now = now_us() / 1_000_000;
    let bearer = |exp: i64| {
        let t = jwt::mint(SECRET.as_bytes(), &json!({"sub": "alice", "exp": exp}));
        format!("Bearer {t}")
    };
    let (short, long) = (bearer(now - 27), bearer(now + 600));
    let send = |text: &str| {
        let r = request(
            addr,
            "POST",
            "/api/send",
            &[
                ("Authorization", &long),
                ("Content-Type", "application/json"),
            ],
            json!({"chat": "alice:bob", "text": text})
                .to_string()
                .as_bytes(),
        );
        send_time_of(&r, text)
    };
    let opened = Instant::now();
    let mut stream = SseStream::try_open(
        addr,
        &stream_path("alice:bob"),
        &[("Authorization", &short)],
        "HTTP/1.1",
    )
    .expect("the token is still valid");
    let t = send("while valid");
    assert_eq!(stream.next_event().send_time(), t);
    stream.set_read_timeout(Duration::from_secs(10));
    let last = stream.next_event();
    let ended = opened.elapsed();
    assert_eq!(last.event.as_deref(), Some("error"), "{last:?}");
    assert_eq!(last.json()["error"]["code"], "token_expired", "{last:?}");
    assert!(
        ended < Duration::from_secs(8),
        "ended {ended:?} after opening, the token had ~3 s left"
    );
    let rest = stream.read_to_end();
    send("after expiry");
    assert!(rest.is_empty(), "nothing after the final error: {rest:?}");
    let r = request(
        addr,
        "GET",
        &format!("/api/pull?chat={}", pct("alice:bob")),
        &[("Authorization", &short)],
        b"",
    );
    assert_error(&r, 401, "the same token on pull");
    eprintln!("stream ended with token_expired {ended:?} after it opened");
}

#[test]
fn streams_count_against_the_connection_limit() {
    let backend = Backend::memory_with(&["--max-connections", "2", "--threads", "1"]);
    let addr = backend.addr();
    let _a = SseStream::open(addr, &stream_path("a"), &[]);
    let _b = SseStream::open(addr, &stream_path("b"), &[]);
    let r = SseStream::try_open(addr, &stream_path("c"), &[], "HTTP/1.1")
        .err()
        .expect("a third connection is refused");
    assert_eq!(r.status, 503);
    drop(_a);
    wait_until(
        Duration::from_secs(5),
        "a slot freed by a closed stream",
        || SseStream::try_open(addr, &stream_path("c"), &[], "HTTP/1.1").ok(),
    );
}

#[test]
fn http10_streams_are_close_delimited() {
    let backend = Backend::memory();
    let addr = backend.addr();
    let t = send_ok(addr, "c", "a", "for 1.0");
    let Ok(mut stream) = SseStream::try_open(addr, &stream_path("c"), &[], "HTTP/1.0") else {
        panic!("HTTP/1.0 gets a stream");
    };
    assert_eq!(stream.header("transfer-encoding"), None);
    assert_eq!(stream.header("connection"), Some("close"));
    assert_eq!(stream.next_event().send_time(), t);
    backend.server.signal("TERM");
    let rest = stream.read_to_end();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(!stream.clean_end, "the close ends an HTTP/1.0 body");
}

#[test]
fn a_request_pipelined_behind_a_stream_is_not_answered() {
    let backend = Backend::memory();
    let addr = backend.addr();
    let t = send_ok(addr, "c", "a", "one");
    let mut socket = std::net::TcpStream::connect(addr).expect("connect");
    let mut bytes = format_request(&addr.to_string(), "GET", &stream_path("c"), &[], b"");
    bytes.extend(format_request(&addr.to_string(), "GET", "/ping", &[], b""));
    std::io::Write::write_all(&mut socket, &bytes).expect("write");
    socket
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = std::io::Read::read(&mut socket, &mut buf) {
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
    assert!(text.contains(&format!("id: {t}")), "{text}");
    assert!(
        !text.contains("pong"),
        "the pipelined /ping must not be answered: {text}"
    );
}

#[test]
fn curl_n_prints_events_as_they_come() {
    let backend = Backend::memory();
    let addr = backend.addr();
    let url = format!("http://{addr}{}", stream_path("curl-room"));
    let child = std::process::Command::new("curl")
        .args(["-sN", "--max-time", "4", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run curl");
    thread::sleep(Duration::from_millis(800));
    let t1 = send_ok(addr, "curl-room", "a", "first");
    let t2 = send_ok(addr, "curl-room", "b", "second");
    let out = child.wait_with_output().expect("curl output");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .find(&format!("id: {t1}."))
        .unwrap_or_else(|| panic!("{text}"));
    let second = text
        .find(&format!("id: {t2}."))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(first < second, "{text}");
    assert!(text.contains(r#""text":"second""#), "{text}");
}

#[test]
fn a_stream_start_counts_as_one_pull_against_the_rate_limit() {
    let backend = Backend::memory_with(&["--rate-limit-pull", "2/m"]);
    let addr = backend.addr();
    let mut first = SseStream::open(addr, &stream_path("rl"), &[]);
    // The stream's own pulls (it polls while idle) do not count.
    thread::sleep(Duration::from_millis(500));
    let t = send_ok(addr, "rl", "a", "counted once");
    assert_eq!(first.next_event().send_time(), t);
    let _second = SseStream::open(addr, &stream_path("rl"), &[]);
    let r = SseStream::try_open(addr, &stream_path("rl"), &[], "HTTP/1.1")
        .err()
        .expect("the third start is over 2/m");
    assert_error(&r, 429, "third stream start");
    assert!(r.header("retry-after").is_some());
}

/// Idle streams wait in the RPC server (long poll) instead of pulling in a
/// loop: 500 of them, one chat each, cost little memory and almost no CPU,
/// and a send reaches its own chat's stream at once.
#[test]
fn many_idle_streams_are_cheap_and_each_gets_its_own_chat() {
    // One test client stands for 500: its limit on held work is lifted.
    let backend = Backend::memory_with(&["--threads", "1", "--max-held-per-client", "1000"]);
    let addr = backend.addr();
    let pid = backend.server.pid().expect("pid");
    let before = proc_status_bytes(pid, "VmRSS");
    let mut streams: Vec<SseStream> = (0..500)
        .map(|i| SseStream::open(addr, &stream_path(&format!("idle-{i}")), &[]))
        .collect();
    thread::sleep(Duration::from_millis(500));
    let cpu_ticks = || {
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
    let (ticks, start) = (cpu_ticks(), Instant::now());
    thread::sleep(Duration::from_secs(3));
    let cpu = (cpu_ticks() - ticks) as f64 / 100.0 / start.elapsed().as_secs_f64();
    let after = proc_status_bytes(pid, "VmRSS");
    eprintln!(
        "500 idle streams: VmRSS {} -> {} MiB, CPU {:.1}% of a core",
        before >> 20,
        after >> 20,
        cpu * 100.0
    );
    assert!(
        after.saturating_sub(before) < 64 << 20,
        "500 idle streams grew the server by {} MiB",
        (after - before) >> 20
    );
    for i in [0usize, 250, 499] {
        let t = send_ok(addr, &format!("idle-{i}"), "a", "wake one");
        assert_eq!(streams[i].next_event().send_time(), t);
    }
    // The others got nothing but (at most) heartbeats meanwhile.
    streams[1].set_read_timeout(Duration::from_millis(300));
    match streams[1].next_item() {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("an idle chat's stream got {other:?}"),
    }
}
