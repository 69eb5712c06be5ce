//! Authentication, authorization and rate limits, against the real binary
//! over sockets (issue: who may send and read). Tokens are minted here with
//! the library's own HS256 code, and a few by hand to be malformed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use im_server::auth::{base64url, jwt};
use serde_json::{Value, json};

const SECRET: &str = "an HS256 secret of at least 32 bytes, for tests";

fn now_s() -> i64 {
    now_us() / 1_000_000
}

/// A server (embedded store) with authentication on, plus `args`.
fn server(args: &[&str]) -> (Server, TempDir) {
    let (dir, path) = temp_file("auth", &format!("{SECRET}\n"));
    let mut all = vec!["--auth-jwt-secret-file", path.as_str()];
    all.extend_from_slice(args);
    (Server::start("all", &all, &[]), dir)
}

fn token(claims: Value) -> String {
    jwt::mint(SECRET.as_bytes(), &claims)
}

fn user(sub: &str) -> String {
    token(json!({"sub": sub, "exp": now_s() + 600}))
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn send_as(addr: std::net::SocketAddr, auth: Option<&str>, body: Value) -> Response {
    let value = auth.map(bearer);
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(v) = &value {
        headers.push(("Authorization", v.as_str()));
    }
    request(
        addr,
        "POST",
        "/api/send",
        &headers,
        body.to_string().as_bytes(),
    )
}

fn pull_as(addr: std::net::SocketAddr, auth: Option<&str>, chat: &str) -> Response {
    let value = auth.map(bearer);
    let mut headers = vec![];
    if let Some(v) = &value {
        headers.push(("Authorization", v.as_str()));
    }
    request(
        addr,
        "GET",
        &format!("/api/pull?chat={}", pct(chat)),
        &headers,
        b"",
    )
}

fn assert_401(r: &Response, code: &str, challenge: &str, ctx: &str) {
    assert_error(r, 401, ctx);
    assert_eq!(r.json()["error"]["code"], code, "{ctx}: {}", r.describe());
    assert_eq!(r.header("www-authenticate"), Some(challenge), "{ctx}");
}

const INVALID: &str = r#"Bearer realm="im", error="invalid_token""#;

#[test]
fn valid_tokens_send_and_pull_and_the_sender_is_the_user() {
    let (server, _dir) = server(&[]);
    let addr = server.http_addr();
    let alice = user("alice");
    let r = send_as(
        addr,
        Some(&alice),
        json!({"chat": "general", "text": "hi", "sender": "alice"}),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    // No sender: taken from the token.
    let r = send_as(
        addr,
        Some(&alice),
        json!({"chat": "general", "text": "implicit"}),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = pull_as(addr, Some(&alice), "general");
    assert_eq!(r.status, 200, "{}", r.describe());
    let page = r.json();
    let senders: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["sender"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(senders, ["alice", "alice"]);
    // Posting as someone else: 403, nothing stored.
    let r = send_as(
        addr,
        Some(&alice),
        json!({"chat": "general", "text": "x", "sender": "bob"}),
    );
    assert_error(&r, 403, "sender mismatch");
    assert_eq!(r.json()["error"]["code"], "forbidden");
    let r = pull_as(addr, Some(&alice), "general");
    assert_eq!(r.json()["messages"].as_array().map(Vec::len), Some(2));
}

#[test]
fn missing_and_invalid_tokens_are_401_with_a_bearer_challenge() {
    let (server, _dir) = server(&["--auth-issuer", "https://idp", "--auth-audience", "im"]);
    let addr = server.http_addr();
    let body = json!({"chat": "general", "text": "hi", "sender": "alice"});
    let r = send_as(addr, None, body.clone());
    assert_401(
        &r,
        "unauthorized",
        r#"Bearer realm="im""#,
        "no Authorization",
    );
    let r = pull_as(addr, None, "general");
    assert_401(
        &r,
        "unauthorized",
        r#"Bearer realm="im""#,
        "no Authorization on pull",
    );

    let now = now_s();
    let good = json!({"sub": "alice", "exp": now + 600, "iss": "https://idp", "aud": "im"});
    assert_eq!(
        send_as(addr, Some(&token(good.clone())), body.clone()).status,
        200
    );
    let with = |patch: Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            claims[k] = v.clone();
        }
        claims
    };
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    let key = SECRET.as_bytes();
    let cases: Vec<(&str, String)> = vec![
        ("expired", token(with(json!({"exp": now - 120})))),
        ("not yet valid", token(with(json!({"nbf": now + 120})))),
        ("wrong issuer", token(with(json!({"iss": "https://evil"})))),
        ("wrong audience", token(with(json!({"aud": ["other"]})))),
        ("bad signature", jwt::sign_with_header(header, &good, b"another secret entirely, 32+ bytes")),
        ("alg none", {
            let t = jwt::sign_with_header(r#"{"alg":"none"}"#, &good, key);
            format!("{}.", t.rsplit_once('.').map_or("", |(a, _)| a))
        }),
        ("alg HS512", jwt::sign_with_header(r#"{"alg":"HS512"}"#, &good, key)),
        (
            "HS256 keyed with a public key",
            jwt::sign_with_header(header, &good, b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n"),
        ),
        ("two segments", "abc.def".into()),
        ("bad base64", format!("{}.!!!.sig", base64url::encode(header.as_bytes()))),
        ("not JSON", jwt::sign_with_header(header, &json!("just a string"), key)),
    ];
    for (what, t) in cases {
        let r = send_as(addr, Some(&t), body.clone());
        assert_401(&r, "invalid_token", INVALID, what);
        let r = pull_as(addr, Some(&t), "general");
        assert_401(&r, "invalid_token", INVALID, what);
    }
    let r = request(
        addr,
        "GET",
        "/api/pull?chat=general",
        &[("Authorization", "Basic YWxpY2U6cHc=")],
        b"",
    );
    assert_401(&r, "invalid_token", INVALID, "Basic scheme");
    // Nothing but the one good send was stored.
    let r = pull_as(addr, Some(&token(good)), "general");
    assert_eq!(r.json()["messages"].as_array().map(Vec::len), Some(1));
}

#[test]
fn two_person_rooms_admit_their_members_only() {
    let (server, _dir) = server(&[]);
    let addr = server.http_addr();
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let r = send_as(
        addr,
        Some(&alice),
        json!({"chat": "alice:bob", "text": "hi bob"}),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = send_as(
        addr,
        Some(&bob),
        json!({"chat": "bob:alice", "text": "hi alice"}),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        pull_as(addr, Some(&bob), "alice:bob").json()["messages"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // An outsider: the same 403 for a room with messages and one without.
    for room in ["alice:bob", "bob:alice", "alice:dave"] {
        let r = pull_as(addr, Some(&carol), room);
        assert_error(&r, 403, room);
        let body = r.json();
        let r = send_as(
            addr,
            Some(&carol),
            json!({"chat": room, "text": "let me in"}),
        );
        assert_error(&r, 403, room);
        assert_eq!(
            body,
            pull_as(addr, Some(&carol), "eve:frank").json(),
            "same answer"
        );
    }
    assert_eq!(
        pull_as(addr, Some(&alice), "alice:bob").json()["messages"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

#[test]
fn the_chats_claim_limits_the_rooms_a_token_opens() {
    let (server, _dir) = server(&[]);
    let addr = server.http_addr();
    let limited =
        token(json!({"sub": "alice", "exp": now_s() + 600, "chats": ["room1", "alice:bob"]}));
    let everything = token(json!({"sub": "alice", "exp": now_s() + 600, "chats": ["*"]}));
    assert_eq!(
        send_as(addr, Some(&limited), json!({"chat": "room1", "text": "a"})).status,
        200
    );
    assert_eq!(pull_as(addr, Some(&limited), "bob:alice").status, 200);
    assert_error(
        &send_as(addr, Some(&limited), json!({"chat": "room2", "text": "a"})),
        403,
        "room2",
    );
    assert_error(&pull_as(addr, Some(&limited), "room2"), 403, "room2 pull");
    assert_error(
        &pull_as(addr, Some(&limited), "alice:carol"),
        403,
        "unlisted DM",
    );
    assert_eq!(pull_as(addr, Some(&everything), "room2").status, 200);
    assert_error(
        &pull_as(addr, Some(&everything), "bob:carol"),
        403,
        "`*` is not membership",
    );
}

/// `im-server token ARGS` with `envs`: the token it prints.
fn mint_with_the_binary(args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_im-server"))
        .arg("token")
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run im-server token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

#[test]
fn the_token_command_mints_what_the_server_accepts() {
    let (server, dir) = server(&[]);
    let addr = server.http_addr();
    let secret = dir.join("secret");
    let t = mint_with_the_binary(
        &["--sub", "zoe", "--ttl-s", "60", "--chats", "r1"],
        &[("IM_AUTH_JWT_SECRET_FILE", secret.as_os_str())],
    );
    assert_eq!(
        send_as(addr, Some(&t), json!({"chat": "r1", "text": "minted"})).status,
        200
    );
    assert_error(
        &pull_as(addr, Some(&t), "r2"),
        403,
        "chats claim from the command",
    );
}

#[test]
fn rate_limits_answer_429_with_retry_after_and_recover() {
    // Without authentication the bucket is the client address's.
    let server = Server::start(
        "all",
        &["--rate-limit-send", "2/s:3", "--rate-limit-pull", "1/m:2"],
        &[],
    );
    let addr = server.http_addr();
    let body = json!({"chat": "limited", "text": "t", "sender": "s"});
    for i in 0..3 {
        let r = send_as(addr, None, body.clone());
        assert_eq!(r.status, 200, "send {i} within the burst: {}", r.describe());
    }
    let r = send_as(addr, None, body.clone());
    assert_error(&r, 429, "over the burst");
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_eq!(r.header("retry-after"), Some("1"), "0.5 s rounded up");
    // Nothing of the refused send was stored; after the wait, sends pass again.
    std::thread::sleep(Duration::from_millis(600));
    let started = Instant::now();
    let r = wait_until(Duration::from_secs(5), "a send after the wait", || {
        let r = send_as(addr, None, body.clone());
        (r.status == 200).then_some(r)
    });
    assert_eq!(r.status, 200);
    eprintln!(
        "send accepted again {:?} after the first retry",
        started.elapsed()
    );
    let stored = server_messages(addr, "limited");
    assert_eq!(stored, 4, "3 in the burst + 1 after the wait");
    // Pulls have their own bucket: 1/min → Retry-After of a minute.
    // (the count above was the first of two)
    assert_eq!(pull_as(addr, None, "limited").status, 200);
    let r = pull_as(addr, None, "limited");
    assert_error(&r, 429, "pull over the burst");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((59..=60).contains(&retry), "Retry-After {retry}");
}

fn server_messages(addr: std::net::SocketAddr, chat: &str) -> usize {
    let r = pull_query(addr, &format!("chat={chat}&limit=100"));
    r.json()["messages"].as_array().map_or(0, Vec::len)
}

// --- the RPC tier's shared-secret handshake (`--rpc-secret-file`) ---------------

const RPC_SECRET: &str = "a shared rpc secret of at least 32 bytes";

fn secret_file(tag: &str, secret: &str) -> (TempDir, String) {
    temp_file(tag, &format!("{secret}\n"))
}

/// One frame read from a raw RPC connection, or `None` once it is closed.
#[test]
fn gateways_with_the_rpc_secret_are_served_and_others_refused() {
    let (_dir, path) = secret_file("rpc-secret", RPC_SECRET);
    let (_other_dir, other) =
        secret_file("rpc-secret-other", "another secret, also at least 32 bytes");
    let rpc = Server::rpc(&["--rpc-secret-file", &path]);
    let good = Server::gateway(rpc.rpc_addr(), &["--rpc-secret-file", &path]);
    let send_time = send_ok(good.http_addr(), "room", "alice", "through the handshake");
    let page = request(good.http_addr(), "GET", "/api/pull?chat=room", &[], b"");
    assert_eq!(page.status, 200, "{}", page.describe());
    assert_eq!(page.json()["messages"][0]["send_time"], send_time);

    for (name, args) in [
        ("no secret", vec![]),
        ("another secret", vec!["--rpc-secret-file", other.as_str()]),
    ] {
        let gateway = Server::gateway(rpc.rpc_addr(), &args);
        let r = send(gateway.http_addr(), "room", "mallory", "refused");
        assert_eq!(r.status, 503, "{name}: {}", r.describe());
        let p = request(gateway.http_addr(), "GET", "/api/pull?chat=room", &[], b"");
        assert_eq!(p.status, 503, "{name}: {}", p.describe());
    }
    // Nothing from the refused gateways was stored.
    let page = request(good.http_addr(), "GET", "/api/pull?chat=room", &[], b"");
    assert_eq!(page.json()["messages"].as_array().map(Vec::len), Some(1));
    // The refusal is written before it is logged: wait for the line.
    wait_until(
        Duration::from_secs(10),
        "the rpc server logs why it refused",
        || rpc.stderr().contains("shared secrets differ").then_some(()),
    );
}

#[test]
fn the_rpc_server_serves_nothing_before_a_valid_hello() {
    use im_server::proto::{Challenge, HelloRequest, HelloResponse};
    use im_server::rpc::handshake::{self, Role};
    use im_server::rpc::{method, status};
    use prost::Message as _;

    let (_dir, path) = secret_file("rpc-secret-raw", RPC_SECRET);
    let rpc = Server::rpc(&["--rpc-secret-file", &path]);
    let server = rpc.rpc_addr().to_string();
    let secret = RPC_SECRET.as_bytes();
    let connect = || {
        let c = RpcConn::connect(rpc.rpc_addr());
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    };
    let challenge_of = |frame: &im_server::rpc::frame::Frame| {
        assert_eq!(
            (frame.id, frame.method_or_status),
            (0, status::CHALLENGE),
            "a challenge first"
        );
        Challenge::decode(frame.body.clone())
            .expect("a Challenge")
            .nonce
    };
    let hello = |server: &str, ns: &[u8], nc: &[u8]| HelloRequest {
        proof: handshake::proof(secret, Role::Client, server, ns, nc),
        client_nonce: nc.to_vec(),
        server: server.to_string(),
    };
    let nc = [3u8; handshake::NONCE_BYTES];

    // A call without the handshake: refused with a reason, then closed, no Pong.
    let mut c = connect();
    let nonce = challenge_of(&c.next_frame().expect("challenge"));
    assert_eq!(nonce.len(), handshake::NONCE_BYTES);
    c.write_frame(5, method::PING, &[]);
    let reply = c.next_frame().expect("a refusal");
    assert_eq!((reply.id, reply.method_or_status), (5, status::BAD_FRAME));
    assert!(c.next_frame().is_none(), "closed after refusing");

    // A proof made for another connection's nonce (a replay): refused.
    let mut c2 = connect();
    let nonce2 = challenge_of(&c2.next_frame().expect("challenge"));
    assert_ne!(nonce, nonce2, "every connection gets a fresh nonce");
    c2.write_frame(
        0,
        method::HELLO,
        &hello(&server, &nonce, &nc).encode_to_vec(),
    );
    let reply = c2.next_frame().expect("a refusal");
    assert_eq!(reply.method_or_status, status::BAD_FRAME);
    assert!(c2.next_frame().is_none(), "closed after refusing");

    // A valid proof for another server's address (what a relay forwards):
    // refused.
    let mut c3 = connect();
    let nonce3 = challenge_of(&c3.next_frame().expect("challenge"));
    c3.write_frame(
        0,
        method::HELLO,
        &hello("127.0.0.1:1", &nonce3, &nc).encode_to_vec(),
    );
    let reply = c3.next_frame().expect("a refusal");
    assert_eq!(reply.method_or_status, status::BAD_FRAME);
    assert!(
        String::from_utf8_lossy(&reply.body).contains("another address"),
        "{reply:?}"
    );

    // The right proof: OK with the server's own proof, then calls are served.
    let mut c4 = connect();
    let nonce4 = challenge_of(&c4.next_frame().expect("challenge"));
    c4.write_frame(
        0,
        method::HELLO,
        &hello(&server, &nonce4, &nc).encode_to_vec(),
    );
    let ok = c4.next_frame().expect("an answer");
    assert_eq!((ok.id, ok.method_or_status), (0, status::OK));
    let welcome = HelloResponse::decode(ok.body.clone()).expect("a HelloResponse");
    assert!(handshake::verify(
        secret,
        Role::Server,
        &server,
        (&nonce4, &nc),
        &welcome.proof
    ));
    c4.write_frame(6, method::PING, &[]);
    let pong = c4.next_frame().expect("a pong");
    assert_eq!((pong.id, pong.method_or_status), (6, status::OK));
}

/// The relay of issue 20 item 6: a rogue endpoint (registered in etcd, or a
/// listed address someone took over) that the gateway dials, which dials
/// the real RPC server, forwards its challenge to the gateway and the
/// gateway's proof back, then tries to use the connection. The proof names
/// the relay's address, so the real server refuses it: the relay pulls
/// nothing, and the gateway behind it is not served (503) — while a gateway
/// that dials the server directly is.
#[test]
fn a_relay_forwarding_the_handshake_gets_no_connection() {
    use im_server::rpc::{method, status};
    use std::sync::{Arc, Mutex};

    let (_dir, path) = secret_file("rpc-relay", RPC_SECRET);
    let rpc = Server::rpc(&["--rpc-secret-file", &path]);
    let direct = Server::gateway(rpc.rpc_addr(), &["--rpc-secret-file", &path]);
    send_ok(direct.http_addr(), "alice:bob", "alice", "private");

    let relay = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let relay_addr = relay.local_addr().expect("relay address");
    // What the real server answered to each relayed hello, and whether the
    // relay's own pull of alice:bob was served.
    let outcomes: Arc<Mutex<Vec<(u8, bool)>>> = Arc::default();
    let seen = outcomes.clone();
    let server_addr = rpc.rpc_addr();
    std::thread::spawn(move || {
        for victim in relay.incoming() {
            let Ok(victim) = victim else { return };
            let mut victim = RpcConn::from_stream(victim);
            let mut real = RpcConn::connect(server_addr);
            let Some(challenge) = real.next_frame() else {
                continue;
            };
            victim.write_frame(challenge.id, challenge.method_or_status, &challenge.body);
            let Some(hello) = victim.next_frame() else {
                continue;
            };
            real.write_frame(hello.id, hello.method_or_status, &hello.body);
            let Some(answer) = real.next_frame() else {
                continue;
            };
            let mut pulled = false;
            if answer.method_or_status == status::OK {
                real.write_frame(9, method::PULL, &pull_request_body("alice:bob", 10));
                pulled = real.next_frame().is_some_and(|f| {
                    f.method_or_status == status::OK && response_code(&f.body) == 0
                });
            }
            seen.lock()
                .expect("outcomes")
                .push((answer.method_or_status, pulled));
            // Pass the answer on, as a relay would.
            victim.write_frame(answer.id, answer.method_or_status, &answer.body);
        }
    });
    let relayed = Server::gateway(relay_addr, &["--rpc-secret-file", &path]);
    let r = request(
        relayed.http_addr(),
        "GET",
        "/api/pull?chat=alice%3Abob",
        &[],
        b"",
    );
    assert_eq!(r.status, 503, "served through the relay: {}", r.describe());
    let outcomes = wait_until(Duration::from_secs(10), "a relayed handshake", || {
        let o = outcomes.lock().expect("outcomes").clone();
        (!o.is_empty()).then_some(o)
    });
    for (answer, pulled) in &outcomes {
        assert_eq!(
            *answer,
            status::BAD_FRAME,
            "the server accepted a relayed proof"
        );
        assert!(!pulled, "the relay pulled alice:bob");
    }
    // The direct gateway is served as before.
    let page = request(
        direct.http_addr(),
        "GET",
        "/api/pull?chat=alice%3Abob",
        &[],
        b"",
    );
    assert_eq!(page.status, 200, "{}", page.describe());
    assert_eq!(page.json()["messages"][0]["text"], "private");
    eprintln!("{} relayed handshakes, all refused", outcomes.len());
}

/// The gateway authenticates the server: a rogue endpoint without the
/// secret that opens with a challenge and accepts any answer gets no call
/// (the message a client sends never reaches it), and the client gets 503.
#[test]
fn a_gateway_sends_nothing_to_a_server_that_cannot_prove_the_secret() {
    use im_server::proto::Challenge;
    use im_server::rpc::{method, status};
    use prost::Message as _;
    use std::sync::{Arc, Mutex};

    let (_dir, path) = secret_file("rpc-rogue", RPC_SECRET);
    let rogue = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the rogue");
    let rogue_addr = rogue.local_addr().expect("rogue address");
    let calls: Arc<Mutex<Vec<u8>>> = Arc::default();
    let seen = calls.clone();
    std::thread::spawn(move || {
        for victim in rogue.incoming() {
            let Ok(victim) = victim else { return };
            let mut victim = RpcConn::from_stream(victim);
            let challenge = Challenge { nonce: vec![1; 32] };
            victim.write_frame(0, status::CHALLENGE, &challenge.encode_to_vec());
            if victim.next_frame().is_none() {
                continue;
            }
            victim.write_frame(0, status::OK, &[]);
            while let Some(call) = victim.next_frame() {
                seen.lock().expect("calls").push(call.method_or_status);
            }
        }
    });
    let gateway = Server::gateway(rogue_addr, &["--rpc-secret-file", &path]);
    let r = send(gateway.http_addr(), "alice:bob", "alice", "for bob only");
    assert_eq!(r.status, 503, "{}", r.describe());
    std::thread::sleep(Duration::from_millis(300));
    let calls = calls.lock().expect("calls").clone();
    assert!(
        !calls
            .iter()
            .any(|&m| m == method::SEND || m == method::PULL),
        "the rogue got calls: {calls:?}"
    );
}

/// Issue 20 item 7: ~1,100 idle TCP connections to the RPC port of a server
/// with a secret (never answering its challenge) do not keep a gateway
/// started meanwhile from being served: they hold pre-handshake slots of
/// their own (evicted by newer ones, closed after 2 s), not the connection
/// slots, and their refusals write a line a second, not one each.
#[test]
fn idle_unauthenticated_rpc_connections_do_not_keep_a_gateway_out() {
    prlimit(std::process::id(), "nofile", "12000:");
    let (_dir, path) = secret_file("rpc-idle-flood", RPC_SECRET);
    let rpc = Server::rpc(&["--rpc-secret-file", &path]);
    let lines_before = rpc.stderr().lines().count();
    let started = Instant::now();
    let idle: Vec<std::net::TcpStream> = (0..1_100)
        .filter_map(|_| std::net::TcpStream::connect(rpc.rpc_addr()).ok())
        .collect();
    assert!(
        idle.len() >= 1_050,
        "only {} idle connections opened",
        idle.len()
    );
    let gateway = Server::gateway(rpc.rpc_addr(), &["--rpc-secret-file", &path]);
    let addr = gateway.http_addr();
    let mut slowest = Duration::ZERO;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let asked = Instant::now();
        let r = send(addr, "flooded", "s", &format!("m{i}"));
        statuses.push(r.status);
        let p = request(addr, "GET", "/api/pull?chat=flooded", &[], b"");
        statuses.push(p.status);
        slowest = slowest.max(asked.elapsed());
    }
    let within = started.elapsed();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "{statuses:?} while {} idle connections were open",
        idle.len()
    );
    // Generous: a send and a pull on loopback take milliseconds.
    assert!(
        slowest < Duration::from_secs(1),
        "slowest send+pull {slowest:?}"
    );
    // After the handshake timeout the flood costs nothing; its log is short.
    std::thread::sleep(Duration::from_secs(3));
    let lines = rpc.stderr().lines().count() - lines_before;
    assert!(
        lines < 20,
        "{lines} log lines for the flood:\n{}",
        rpc.stderr()
    );
    eprintln!(
        "{} idle connections; 20 requests served within {within:?} of the flood (slowest send+pull {slowest:?}); {lines} rpc log lines",
        idle.len()
    );
    drop(idle);
}

/// A flood of distinct clients cannot grow the rate limiter without bound:
/// 110,000 users, each with its own token, hit the pull limit's table
/// (each request refused 403 right after admission: no store work), and
/// the buckets held stay at the limiter's bound (100,000), as the gauge
/// `im_rate_limit_buckets` reports over the socket.
#[test]
fn a_flood_of_distinct_users_keeps_the_rate_limit_table_bounded() {
    use std::io::{BufRead, BufReader, Write};
    // 1 per minute (burst 5): no bucket refills, and so none is dropped as
    // idle, during the test; only the bound can keep the table small.
    let (s, _dir) = server(&["--rate-limit-pull", "1/m:5"]);
    let addr = s.http_addr();
    const USERS: usize = 110_000;
    const THREADS: usize = 4;
    const BATCH: usize = 64;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let stream = std::net::TcpStream::connect(addr).expect("connect");
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                let mine: Vec<usize> = (t..USERS).step_by(THREADS).collect();
                for batch in mine.chunks(BATCH) {
                    let mut out = String::new();
                    for &i in batch {
                        let t = user(&format!("flood{i}"));
                        out.push_str(&format!(
                            "GET /api/pull?chat=x:y HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {t}\r\n\r\n"
                        ));
                    }
                    writer.write_all(out.as_bytes()).expect("write a batch");
                    for _ in batch {
                        let r = read_response(&mut reader, false).expect("a response");
                        // Admitted (a bucket made), then refused: not a member of x:y.
                        assert_eq!(r.status, 403, "{}", r.describe());
                    }
                }
                let _ = reader.read_line(&mut String::new());
            })
        })
        .collect();
    for w in workers {
        w.join().expect("flood thread");
    }
    let held = scrape(addr).value("im_rate_limit_buckets", &[]);
    eprintln!("{USERS} distinct users: {held} rate-limit buckets held");
    // The bound: 64 stripes of ceil(100,000 / 64) buckets each.
    assert!(held <= 100_032.0, "the table grew past its bound: {held}");
    assert!(
        held >= 90_000.0,
        "the gauge should show the table full: {held}"
    );
}

/// EdDSA (Ed25519) tokens: a server given the public key accepts tokens
/// signed with its private key, minted by the library or by `im-server
/// token --private-key-file`, and refuses every other signature, HS256
/// included (it has no secret, so none can be confused with the key).
#[test]
fn eddsa_tokens_are_accepted_with_the_configured_public_key_only() {
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
    let dir = unique_temp_dir("eddsa");
    let signing = SigningKey::from_bytes(&[42u8; 32]);
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("public key PEM");
    let (public, private) = (dir.join("public.pem"), dir.join("private.pem"));
    std::fs::write(&public, &public_pem).expect("write the public key");
    let private_pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .expect("private key PEM");
    std::fs::write(&private, private_pem.as_bytes()).expect("write the private key");
    let public_path = public.to_string_lossy().to_string();
    let server = Server::start("all", &["--auth-jwt-public-key-file", &public_path], &[]);
    let addr = server.http_addr();

    let claims = json!({"sub": "erin", "exp": now_s() + 600});
    let good = jwt::mint_eddsa(&signing, &claims);
    let r = send_as(addr, Some(&good), json!({"chat": "ed", "text": "signed"}));
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = pull_as(addr, Some(&good), "ed");
    assert_eq!(
        r.json()["messages"][0]["sender"],
        "erin",
        "{}",
        r.describe()
    );

    let private_path = private.to_string_lossy().to_string();
    let minted = mint_with_the_binary(&["--sub", "fay", "--private-key-file", &private_path], &[]);
    let r = send_as(addr, Some(&minted), json!({"chat": "ed", "text": "minted"}));
    assert_eq!(r.status, 200, "{}", r.describe());

    let other = SigningKey::from_bytes(&[43u8; 32]);
    let body = json!({"chat": "ed", "text": "refused"});
    let cases = [
        ("another key", jwt::mint_eddsa(&other, &claims)),
        ("HS256", jwt::mint(SECRET.as_bytes(), &claims)),
        (
            "HS256 keyed with the public key",
            jwt::sign_with_header(r#"{"alg":"HS256"}"#, &claims, public_pem.as_bytes()),
        ),
        ("alg none", {
            let t = jwt::sign_with_header(r#"{"alg":"none"}"#, &claims, b"");
            format!("{}.", t.rsplit_once('.').map_or("", |(a, _)| a))
        }),
    ];
    for (what, t) in cases {
        assert_401(
            &send_as(addr, Some(&t), body.clone()),
            "invalid_token",
            INVALID,
            what,
        );
    }
    let r = pull_as(addr, Some(&good), "ed");
    assert_eq!(
        r.json()["messages"].as_array().map(Vec::len),
        Some(2),
        "{}",
        r.describe()
    );
}

// --- issue 20 item 9: the smaller holes ---------------------------------------

fn send_with(addr: std::net::SocketAddr, headers: &[(&str, &str)], chat: &str) -> Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let body = json!({"chat": chat, "text": "t", "sender": "s"});
    request(addr, "POST", "/api/send", &all, body.to_string().as_bytes())
}

/// Two `Authorization` headers are 400 (not "the first wins"), and tokens
/// that fail verification count against the client address's bucket: 200
/// forged tokens meet 429 once the budget is spent, not 200 × 401.
#[test]
fn duplicate_authorization_is_400_and_forged_tokens_meet_the_rate_limit() {
    let (server, _dir) = server(&["--rate-limit-pull", "5/m"]);
    let addr = server.http_addr();
    let good = bearer(&user("alice"));
    let r = request(
        addr,
        "GET",
        "/api/pull?chat=room",
        &[("Authorization", &good), ("Authorization", "Bearer forged")],
        b"",
    );
    assert_error(&r, 400, "two Authorization headers");
    let forged = bearer(&jwt::mint(
        b"another secret of thirty-two bytes!!",
        &json!({"sub": "mallory", "exp": now_s() + 600}),
    ));
    let statuses: Vec<u16> = (0..200)
        .map(|_| {
            request(
                addr,
                "GET",
                "/api/pull?chat=room",
                &[("Authorization", &forged)],
                b"",
            )
            .status
        })
        .collect();
    let unauthorized = statuses.iter().filter(|&&s| s == 401).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(unauthorized, 5, "the budget: {statuses:?}");
    assert_eq!(limited, 195, "then 429: {statuses:?}");
    // A user's own bucket is not the address's: alice is still served.
    assert_eq!(pull_as(addr, Some(&user("alice")), "room").status, 200);
}

/// Without authentication the bucket is the client's: behind a trusted
/// proxy the address it names (`X-Forwarded-For`, `Forwarded`), and for
/// IPv6 the /64; from a peer that is not a trusted proxy the headers are
/// ignored.
#[test]
fn buckets_follow_trusted_proxies_and_ipv6_slash_64() {
    let limits = ["--rate-limit-send", "2/m"];
    let mut args = limits.to_vec();
    args.extend(["--trusted-proxies", "127.0.0.0/8,::1"]);
    let server = Server::start("all", &args, &[]);
    let addr = server.http_addr();
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    // One /64: two addresses share its two sends.
    assert_eq!(send_with(addr, &xff("2001:db8:1:2::1"), "p").status, 200);
    assert_eq!(send_with(addr, &xff("2001:db8:1:2::ffff"), "p").status, 200);
    assert_error(
        &send_with(addr, &xff("2001:db8:1:2::7"), "p"),
        429,
        "same /64",
    );
    // Another /64 and an IPv4 client have their own.
    assert_eq!(send_with(addr, &xff("2001:db8:1:3::1"), "p").status, 200);
    let fwd = [("Forwarded", "for=\"203.0.113.9:4711\"")];
    assert_eq!(send_with(addr, &fwd, "p").status, 200);
    assert_eq!(send_with(addr, &xff("203.0.113.9"), "p").status, 200);
    assert_error(&send_with(addr, &fwd, "p"), 429, "203.0.113.9's third");
    // Not a trusted proxy: the header is ignored, everyone is the peer.
    let plain = Server::start("all", &limits, &[]);
    let addr = plain.http_addr();
    assert_eq!(send_with(addr, &xff("198.51.100.1"), "p").status, 200);
    assert_eq!(send_with(addr, &xff("198.51.100.2"), "p").status, 200);
    assert_error(&send_with(addr, &xff("198.51.100.3"), "p"), 429, "one peer");
}

/// With authentication off, a browser's cross-origin send is refused (403,
/// nothing stored), as Go's http.CrossOriginProtection does; same-origin
/// pages, programs sending neither header, and `--allowed-origins` pass.
#[test]
fn cross_origin_sends_are_refused_without_authentication() {
    let server = Server::start("all", &["--allowed-origins", "https://app.example"], &[]);
    let addr = server.http_addr();
    let host = format!("{addr}");
    let same = format!("http://{addr}");
    let text_plain = |headers: &[(&str, &str)]| {
        let mut all = vec![("Content-Type", "text/plain")];
        all.extend_from_slice(headers);
        let body = json!({"chat": "xo", "text": "t", "sender": "s"});
        request(addr, "POST", "/api/send", &all, body.to_string().as_bytes())
    };
    for (headers, what) in [
        (vec![("Sec-Fetch-Site", "cross-site")], "Sec-Fetch-Site"),
        (vec![("Origin", "https://evil.example")], "Origin"),
        (
            vec![
                ("Sec-Fetch-Site", "same-site"),
                ("Origin", "https://evil.example"),
            ],
            "same-site",
        ),
    ] {
        let r = text_plain(&headers);
        assert_error(&r, 403, what);
    }
    assert_eq!(server_messages(addr, "xo"), 0, "nothing stored");
    for headers in [
        vec![],
        vec![("Sec-Fetch-Site", "same-origin"), ("Origin", same.as_str())],
        vec![("Origin", same.as_str()), ("Host", host.as_str())],
        vec![
            ("Sec-Fetch-Site", "cross-site"),
            ("Origin", "https://app.example"),
        ],
    ] {
        let r = send_with(addr, &headers, "xo");
        assert_eq!(r.status, 200, "{headers:?}: {}", r.describe());
    }
    // Reads are not state-changing: a cross-site pull is served.
    let r = request(
        addr,
        "GET",
        "/api/pull?chat=xo",
        &[("Sec-Fetch-Site", "cross-site")],
        b"",
    );
    assert_eq!(r.status, 200);
}
