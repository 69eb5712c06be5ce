//! `GET /ready` (readiness) against the real binary, next to `/ping`
//! (liveness): Redis stopped and started again, no RPC server, etcd not up
//! yet. A gateway that discovers its servers opens its port at once and
//! answers 503 with `Retry-After` until it knows one.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `GET /ready`, with what its 503 body says is missing.
fn ready(addr: std::net::SocketAddr) -> (u16, Option<String>, Response) {
    let r = request(addr, "GET", "/ready", &[], b"");
    let missing = (r.status != 200).then(|| r.json()["missing"].as_str().unwrap_or("").to_string());
    (r.status, missing, r)
}

fn assert_not_ready(addr: std::net::SocketAddr, missing: &str, ctx: &str) -> Response {
    let (status, why, r) = ready(addr);
    assert_eq!(status, 503, "{ctx}: {}", r.describe());
    assert_eq!(why.as_deref(), Some(missing), "{ctx}: {}", r.describe());
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "{ctx}: {}",
        r.describe()
    );
    assert_eq!(r.json()["ready"], false, "{ctx}");
    r
}

#[test]
fn ready_follows_redis_while_ping_stays_up() {
    let mut redis = Redis::start();
    let server = Server::with_redis(&redis);
    let addr = server.http_addr();
    server.wait_ready(Duration::from_secs(10));
    let r = request(addr, "GET", "/ready", &[], b"");
    assert_eq!(r.json(), serde_json::json!({ "ready": true }));
    let r = request(addr, "HEAD", "/ready", &[], b"");
    assert_eq!(r.status, 200, "HEAD /ready: {}", r.describe());
    assert_error(
        &request(addr, "POST", "/ready", &[], b""),
        405,
        "POST /ready",
    );

    redis.kill();
    // Sends fail while Redis is down; /ready says why, /ping does not.
    assert_eq!(send(addr, "ready", "a", "x").status, 503);
    let r = assert_not_ready(addr, "store", "Redis stopped");
    let message = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(message.contains("Redis"), "{message}");
    assert_alive(addr, "Redis stopped");

    redis.restart();
    // Back within the store's reconnect back-off (at most 250 ms) and the
    // probe's own timeout; 10 s is only a bound for a loaded machine.
    server.wait_ready(Duration::from_secs(10));
    send_ok(addr, "ready", "a", "after the restart");
    let s = scrape(addr);
    assert!(
        s.value(
            "im_http_requests_total",
            &[("route", "ready"), ("code", "503")]
        ) >= 1.0
    );
    assert!(
        s.value(
            "im_http_requests_total",
            &[("route", "ready"), ("code", "200")]
        ) >= 2.0
    );
}

#[test]
fn ready_is_503_without_a_reachable_rpc_server() {
    // A port nothing listens on.
    let nowhere = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gateway = Server::gateway(nowhere, &[]);
    let addr = gateway.http_addr();
    let r = assert_not_ready(addr, "rpc_server", "no RPC server listening");
    let message = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(
        message.contains("no RPC server answers (1 known"),
        "{message}"
    );
    assert_alive(addr, "no RPC server");
    // The RPC server comes up on that address: ready.
    let _rpc = Server::rpc(&["--rpc-listen", &nowhere.to_string()]);
    gateway.wait_ready(Duration::from_secs(10));
}

/// The gateway finds its servers through an etcd that is not up yet: its
/// port is open from the start (503 + `Retry-After`, never refused), and it
/// is ready once etcd and a registered RPC server are.
#[test]
fn a_discovering_gateway_serves_503_until_a_server_is_known() {
    let mut etcd = Etcd::planned();
    let registry = etcd.registry("/im/rpc");
    let started = Instant::now();
    let gateway = Server::start("gateway", &["--registry", &registry], &[]);
    let addr = gateway.http_addr();
    let r = assert_not_ready(addr, "rpc_server", "etcd not up");
    let answered = started.elapsed();
    let message = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(message.contains("no RPC server is known yet"), "{message}");
    // The gateway used to keep its port closed for 2 s waiting for a first
    // list; now it answers as soon as the process is up.
    assert!(
        answered < Duration::from_millis(1800),
        "first answer after {answered:?}"
    );
    let r = send(addr, "ready", "a", "x");
    assert_eq!(r.status, 503, "{}", r.describe());
    assert_eq!(r.header("retry-after"), Some("1"));

    etcd.restart();
    let _rpc = Server::rpc(&["--registry", &registry]);
    gateway.wait_ready(Duration::from_secs(15));
    send_ok(addr, "ready", "a", "through etcd");
}
