//! Process lifecycle against the real binary: graceful shutdown on SIGTERM and
//! SIGINT (in-flight requests finish, idle connections close, exit status 0,
//! nothing accepted afterwards) and backpressure while Redis is frozen.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Stops a process with SIGSTOP; SIGCONT when dropped (also when a test
/// fails), so that a failing test never leaves redis-server frozen.
struct Frozen {
    pid: u32,
    resumed: bool,
}

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        send_signal(pid, "STOP");
        Frozen {
            pid,
            resumed: false,
        }
    }

    fn resume(&mut self) {
        if !self.resumed {
            self.resumed = true;
            send_signal(self.pid, "CONT");
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

fn redis_pid(redis: &Redis) -> u32 {
    redis.pid().expect("redis-server is running")
}

/// Whether a new TCP connection to `addr` is refused.
fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// Waits for the server to exit and asserts it exited with status 0 within `within`.
fn assert_clean_exit(server: &mut Server, within: Duration, ctx: &str) -> Duration {
    let start = Instant::now();
    let status = server.wait_exit(within).unwrap_or_else(|| {
        panic!(
            "{ctx}: the server is still running {within:?} after the signal; stderr:\n{}",
            server.stderr()
        )
    });
    assert!(
        status.success(),
        "{ctx}: the server must exit with status 0 after a graceful shutdown, got {status}; stderr:\n{}",
        server.stderr()
    );
    start.elapsed()
}

// ---------------------------------------------------------------------------
// graceful shutdown
// ---------------------------------------------------------------------------

/// Sends with Redis frozen are in flight when `sig` arrives; Redis is thawed
/// during the drain. Every send must be answered 200 and stored, the process
/// must exit 0, and nothing may be accepted once it stopped.
fn in_flight_requests_survive(sig: &str) {
    const N: usize = 8;
    let redis = Redis::start();
    let mut server = Server::on_redis(
        &redis,
        &["--redis-timeout-ms", "5000", "--rpc-timeout-ms", "5000"],
    );
    let addr = server.http_addr();
    let chat = format!("drain-{sig}");
    send_ok(addr, "warmup", "s", "redis connection is up");

    let mut frozen = Frozen::freeze(redis_pid(&redis));
    let started = Arc::new(Barrier::new(N + 1));
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let started = started.clone();
            let chat = chat.clone();
            thread::spawn(move || {
                let mut c = HttpConn::connect(addr);
                started.wait();
                let t0 = Instant::now();
                let body =
                    serde_json::json!({"chat": chat, "text": format!("m{i}"), "sender": "s"})
                        .to_string();
                let r = c.try_request("POST", "/api/send", JSON_CT, body.as_bytes());
                (r, t0.elapsed())
            })
        })
        .collect();
    started.wait();
    // Let the sends reach the server (they wait on the frozen Redis).
    thread::sleep(Duration::from_millis(300));
    assert!(
        clients.iter().all(|h| !h.is_finished()),
        "sends must be waiting on the frozen Redis before the signal"
    );
    server.signal(sig);
    let signalled = Instant::now();

    // The listener is closed at once: new connections are refused during the drain.
    let refused_during_drain = wait_until(
        Duration::from_secs(2),
        "new connections to be refused during the drain",
        || refused(addr).then_some(signalled.elapsed()),
    );
    thread::sleep(Duration::from_millis(200).saturating_sub(signalled.elapsed()));
    frozen.resume();

    let mut ok = 0;
    for (i, h) in clients.into_iter().enumerate() {
        let (r, took) = h.join().expect("client thread");
        let r = r.unwrap_or_else(|e| {
            panic!("SIG{sig}: in-flight send {i} got no response ({e}) after {took:?}")
        });
        send_time_of(&r, &format!("SIG{sig}: in-flight send {i}"));
        assert_eq!(
            r.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("close"),
            "SIG{sig}: a response written during the drain must say Connection: close: {:?}",
            r.headers
        );
        ok += 1;
    }
    let exit_after = assert_clean_exit(&mut server, Duration::from_secs(8), &format!("SIG{sig}"));
    eprintln!(
        "SIG{sig}: listener refused after {refused_during_drain:?}, process exited {:?} after the signal",
        signalled.elapsed()
    );
    let _ = exit_after;
    assert!(
        refused(addr),
        "SIG{sig}: connections must be refused after the exit"
    );
    assert_eq!(
        redis.zcard_chat(&chat),
        ok,
        "SIG{sig}: every send answered 200 must be in Redis (keys {})",
        redis.keys()
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_0() {
    in_flight_requests_survive("TERM");
}

#[test]
fn sigint_finishes_in_flight_requests_and_exits_0() {
    in_flight_requests_survive("INT");
}

/// An idle keep-alive connection is closed promptly on `sig`, and the process
/// exits 0 at once (nothing is in flight).
fn idle_connection_closed(sig: &str) {
    let mut server = Server::memory();
    let addr = server.http_addr();
    let mut idle = HttpConn::connect(addr);
    let r = idle.request("GET", "/ping", &[], b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    let mut raw_idle = HttpConn::connect(addr);
    thread::sleep(Duration::from_millis(100));

    server.signal(sig);
    let signalled = Instant::now();
    idle.assert_closed(&format!("SIG{sig}: idle keep-alive connection"));
    let closed_after = signalled.elapsed();
    // a connection that never sent a byte is closed too
    raw_idle.assert_closed_within(
        Duration::from_secs(3),
        &format!("SIG{sig}: a silent connection"),
    );
    let exit_after = assert_clean_exit(&mut server, Duration::from_secs(3), &format!("SIG{sig}"));
    eprintln!(
        "SIG{sig}: idle connection closed after {closed_after:?}, exit {:?} after the signal",
        signalled.elapsed()
    );
    let _ = exit_after;
    assert!(
        closed_after < Duration::from_secs(1),
        "SIG{sig}: an idle connection should be closed promptly, took {closed_after:?}"
    );
    assert!(refused(addr), "SIG{sig}: refused after the exit");
}

#[test]
fn sigterm_closes_idle_keep_alive_connections() {
    idle_connection_closed("TERM");
}

#[test]
fn sigint_closes_idle_keep_alive_connections() {
    idle_connection_closed("INT");
}

/// A request whose head is half received when SIGTERM arrives is finished
/// and answered (with `Connection: close`), not dropped.
#[test]
fn request_being_received_at_sigterm_is_answered() {
    let mut server = Server::memory();
    let addr = server.http_addr();
    let mut c = HttpConn::connect(addr);
    let body = br#"{"chat":"half","text":"finished after SIGTERM","sender":"s"}"#;
    let head = format!(
        "POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_raw(head.as_bytes());
    c.write_raw(&body[..10]);
    thread::sleep(Duration::from_millis(100));
    server.signal("TERM");
    thread::sleep(Duration::from_millis(200));
    c.write_raw(&body[10..]);
    let r = c.try_read_response().unwrap_or_else(|e| {
        panic!("a request being received at SIGTERM must still be answered, got: {e}")
    });
    send_time_of(&r, "send completed after SIGTERM");
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "the response during the drain must say Connection: close: {:?}",
        r.headers
    );
    c.assert_closed("after the last response of the drain");
    assert_clean_exit(&mut server, Duration::from_secs(3), "SIGTERM");
}

/// A request stuck on a frozen Redis does not hold the process beyond the
/// drain timeout.
#[test]
fn drain_timeout_bounds_the_shutdown() {
    let redis = Redis::start();
    let mut server = Server::on_redis(
        &redis,
        &[
            "--drain-timeout-s",
            "1",
            "--redis-timeout-ms",
            "30000",
            "--rpc-timeout-ms",
            "30000",
        ],
    );
    let addr = server.http_addr();
    send_ok(addr, "warmup", "s", "redis connection is up");
    let _frozen = Frozen::freeze(redis_pid(&redis));
    let stuck = thread::spawn(move || {
        let mut c = HttpConn::connect(addr);
        c.set_read_timeout(Duration::from_secs(10));
        c.try_request(
            "POST",
            "/api/send",
            JSON_CT,
            br#"{"chat":"stuck","text":"never","sender":"s"}"#,
        )
    });
    thread::sleep(Duration::from_millis(300));
    server.signal("TERM");
    let signalled = Instant::now();
    let status = server.wait_exit(Duration::from_secs(6)).unwrap_or_else(|| {
        panic!(
            "with --drain-timeout-s 1 and a request stuck on a frozen Redis, the server is still running 6 s after SIGTERM; stderr:\n{}",
            server.stderr()
        )
    });
    let exit_after = signalled.elapsed();
    eprintln!("drain timeout 1 s: exited {exit_after:?} after SIGTERM with {status}");
    assert!(
        exit_after < Duration::from_secs(4),
        "with --drain-timeout-s 1 the shutdown should take about 1-2 s, took {exit_after:?}"
    );
    let r = stuck.join().expect("client thread");
    assert!(
        r.as_ref().map_or(true, |r| r.status != 200),
        "a send cut off by the drain timeout cannot have succeeded: {:?}",
        r.map(|r| r.describe())
    );
}

// ---------------------------------------------------------------------------
// backpressure
// ---------------------------------------------------------------------------

struct Outcome {
    status: u16,
    code: String,
    retry_after: bool,
    took: Duration,
}

#[test]
fn backpressure_with_frozen_redis_answers_fast_and_never_hangs() {
    const N: usize = 200;
    let redis = Redis::start();
    let server = Server::on_redis(
        &redis,
        &[
            "--queue",
            "4",
            "--max-in-flight",
            "4",
            "--redis-connections",
            "1",
            "--rpc-connections",
            "1",
        ],
    );
    let addr = server.http_addr();
    send_ok(addr, "warmup", "s", "redis connection is up");

    let mut frozen = Frozen::freeze(redis_pid(&redis));
    let storm_start = Instant::now();
    let go = Arc::new(Barrier::new(N));
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let go = go.clone();
            thread::spawn(move || {
                let mut c = HttpConn::try_connect(addr)
                    .unwrap_or_else(|e| panic!("storm client {i}: connect: {e}"));
                c.set_read_timeout(Duration::from_secs(5));
                go.wait();
                let t0 = Instant::now();
                let body = format!(r#"{{"chat":"storm","text":"m{i}","sender":"s"}}"#);
                let r = c
                    .try_request("POST", "/api/send", JSON_CT, body.as_bytes())
                    .unwrap_or_else(|e| {
                        panic!(
                            "storm send {i} with Redis frozen: no answer within the 5 s hang guard ({e}) after {:?}",
                            t0.elapsed()
                        )
                    });
                let took = t0.elapsed();
                let code = serde_json::from_slice::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|v| v["error"]["code"].as_str().map(String::from))
                    .unwrap_or_default();
                assert!(
                    r.status == 503 || r.status == 504,
                    "storm send {i} with Redis frozen: expected 503 or 504, got {}",
                    r.describe()
                );
                assert_error(&r, r.status, &format!("storm send {i}"));
                Outcome {
                    status: r.status,
                    code,
                    retry_after: r.header("retry-after").is_some(),
                    took,
                }
            })
        })
        .collect();

    // The gateway itself stays responsive meanwhile.
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let ping = request(addr, "GET", "/ping", &[], b"");
    let ping_took = t0.elapsed();
    assert_eq!(
        ping.status,
        200,
        "ping during the storm: {}",
        ping.describe()
    );

    let outcomes: Vec<Outcome> = clients
        .into_iter()
        .map(|h| h.join().expect("storm client panicked (see above)"))
        .collect();
    let storm_took = storm_start.elapsed();
    frozen.resume();

    for (i, o) in outcomes.iter().enumerate() {
        if o.status == 503 {
            assert!(
                o.retry_after,
                "storm send {i}: 503 ({}) without Retry-After",
                o.code
            );
        }
    }
    let overloaded: Vec<&Outcome> = outcomes.iter().filter(|o| o.code == "overloaded").collect();
    let slowest_overloaded = overloaded.iter().map(|o| o.took).max().unwrap_or_default();
    let mut by_kind: std::collections::BTreeMap<(u16, &str), (usize, Duration)> =
        Default::default();
    for o in &outcomes {
        let e = by_kind.entry((o.status, o.code.as_str())).or_default();
        e.0 += 1;
        e.1 = e.1.max(o.took);
    }
    eprintln!(
        "storm of {N} sends with Redis frozen, --queue 4 --max-in-flight 4: {by_kind:?} \
         ((status, code) -> (count, slowest)); all answered within {storm_took:?}; ping took {ping_took:?}"
    );
    assert!(
        overloaded.len() >= N / 2,
        "with --queue 4 --max-in-flight 4 on one connection, most of {N} concurrent sends must be refused at once as overloaded; got {by_kind:?}"
    );
    // Sends beyond the bounded queues are refused at once. A few that were
    // admitted into a queue may still be refused later by the next tier
    // (its own in-flight limit), so the bound is on the bulk, not on each.
    let immediate = overloaded
        .iter()
        .filter(|o| o.took < Duration::from_millis(500))
        .count();
    assert!(
        immediate >= N / 2,
        "most `overloaded` 503s should be immediate (before any timeout): {immediate} of {} under 500 ms, slowest {slowest_overloaded:?}",
        overloaded.len()
    );

    // Redis is back: sends succeed again.
    let t = wait_until(
        Duration::from_secs(5),
        "sends to succeed after SIGCONT",
        || {
            let r = send(addr, "after", "s", "back");
            (r.status == 200).then(|| send_time_of(&r, "send after SIGCONT"))
        },
    );
    let mut last = t;
    for i in 0..20 {
        let t = send_ok(addr, "after", "s", &format!("again {i}"));
        assert!(t > last, "send_time increases after recovery");
        last = t;
    }
    eprintln!(
        "after the storm: {} of the refused/timed-out storm sends ended up in Redis anyway",
        redis.zcard_chat("storm")
    );
}

/// A clean SIGTERM of `all` on Redis, with a long poll waiting and a live
/// keep-alive client, logs no failure: the connections the process closes
/// itself (its gateway's to its RPC server, its RPC server's, Redis's) are
/// not errors. Read from the real binary's stderr, for every thread count
/// (shards shut down their gateways and RPC servers at different moments).
#[test]
fn sigterm_on_redis_with_a_long_poll_logs_no_connection_errors() {
    // Twice each: a reset logged by the RPC server was a race (1 run in
    // ~20 at 4 threads before connections were closed cleanly).
    for threads in ["1", "2", "4", "1", "2", "4"] {
        let redis = Redis::start();
        let mut server = Server::on_redis(&redis, &["--threads", threads]);
        let addr = server.http_addr();
        // Traffic on every shard's connections.
        for i in 0..20 {
            send_ok(addr, &format!("quiet{i}"), "a", "x");
        }
        let poll = thread::spawn(move || {
            let mut c = HttpConn::connect(addr);
            c.try_request("GET", "/api/pull?chat=quiet-poll&wait_ms=20000", &[], b"")
        });
        thread::sleep(Duration::from_millis(300));
        server.signal("TERM");
        assert_clean_exit(&mut server, Duration::from_secs(15), "SIGTERM");
        let answered = poll.join().expect("poll thread");
        let r = answered.expect("the long poll is answered on shutdown");
        assert_eq!(r.status, 200, "{}", r.describe());
        let log = server.stderr();
        let after = log
            .split_once("shutting down")
            .map_or("", |(_, after)| after);
        for alarm in [
            "cannot connect",
            "refused",
            "reset",
            "lost",
            "closed:",
            "timed out",
            "error",
        ] {
            assert!(
                !after.to_lowercase().contains(alarm),
                "--threads {threads}: {alarm:?} logged during a clean shutdown:\n{log}"
            );
        }
        assert!(after.contains("stopped"), "{log}");
    }
}
