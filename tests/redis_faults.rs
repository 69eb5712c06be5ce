//! Fault tolerance: redis-server restarts, TCP / password / db URLs, env-var
//! configuration, gateway and rpc server as separate processes, rpc server
//! crashes and RPC timeouts.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long the system may take to recover by itself after a dependency comes back
/// (spec: ~5 s; one extra second of slack).
const RECOVERY_DEADLINE: Duration = Duration::from_secs(6);

/// A send/pull during an outage must be answered (503) and never hang or succeed.
fn assert_unavailable(addr: SocketAddr, chat: &str, status: u16, ctx: &str) {
    for i in 0..5 {
        let started = Instant::now();
        let body =
            serde_json::json!({"chat": chat, "text": format!("during outage {i}"), "sender": "s"});
        let r = try_request(addr, "POST", "/api/send", JSON_CT, body.to_string().as_bytes()).unwrap_or_else(|e| {
            panic!(
                "{ctx}: send #{i} during the outage got no response after {:?} (hang or dropped connection): {e}",
                started.elapsed()
            )
        });
        assert_ne!(
            r.status,
            200,
            "{ctx}: send #{i} during the outage must not succeed: {}",
            r.describe()
        );
        assert_error(
            &r,
            status,
            &format!(
                "{ctx}: send #{i} during the outage (took {:?})",
                started.elapsed()
            ),
        );
    }
    let started = Instant::now();
    let body = serde_json::json!({"chat": chat});
    let r = try_request(
        addr,
        "GET",
        "/api/pull",
        JSON_CT,
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{ctx}: pull during the outage got no response after {:?}: {e}",
            started.elapsed()
        )
    });
    assert_error(&r, status, &format!("{ctx}: pull during the outage"));
}

/// Polls with sends, each on a new connection, until [`RECOVERED_IN_A_ROW`]
/// in a row get 200; every answer must be 200 or 503. Returns the send_times
/// of the successful sends. In a row, because each shard of the server has
/// its own Redis connection and reconnects on its own backoff: a new
/// connection may land on a shard still waiting to reconnect (503) just
/// after another shard has answered 200.
fn wait_recovered(addr: SocketAddr, chat: &str, ctx: &str) -> Vec<i64> {
    let started = Instant::now();
    let mut attempts = 0;
    let mut ok_times = Vec::new();
    let mut in_a_row = 0;
    loop {
        attempts += 1;
        let body = serde_json::json!({"chat": chat, "text": format!("recovery probe {attempts}"), "sender": "s"});
        match try_request(
            addr,
            "POST",
            "/api/send",
            JSON_CT,
            body.to_string().as_bytes(),
        ) {
            Ok(r) if r.status == 200 => {
                ok_times.push(send_time_of(&r, ctx));
                in_a_row += 1;
                if in_a_row == RECOVERED_IN_A_ROW {
                    return ok_times;
                }
                continue;
            }
            Ok(r) if r.status == 503 => in_a_row = 0,
            Ok(r) => panic!(
                "{ctx}: while recovering, expected 200 or 503, got {}",
                r.describe()
            ),
            Err(e) => panic!("{ctx}: while recovering, a send got no response: {e}"),
        }
        if started.elapsed() > RECOVERY_DEADLINE {
            panic!(
                "{ctx}: did not recover within {RECOVERY_DEADLINE:?} ({attempts} attempts, never {RECOVERED_IN_A_ROW} answered 200 in a row)"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// With two shards, 8 new connections in a row all landing on one of them
/// happens once in 128 recoveries.
const RECOVERED_IN_A_ROW: usize = 8;

/// The send_times of every message in `chat`, read back through the API
/// (a full oldest-first walk).
fn stored_send_times(addr: SocketAddr, chat: &str) -> HashSet<i64> {
    walk(&mut HttpConn::connect(addr), chat, 100, true, Form::Json)
        .iter()
        .map(|m| m.send_time)
        .collect()
}

/// Every send_time in `acked` (sends that got 200) is in `chat`, read back
/// through the API.
fn assert_all_stored(addr: SocketAddr, chat: &str, acked: &[i64], ctx: &str) {
    let stored = stored_send_times(addr, chat);
    for t in acked {
        assert!(
            stored.contains(t),
            "{ctx}: send {t} got 200 but is missing from a full pull of {chat:?}"
        );
    }
}

/// The full redis outage scenario against a gateway at `addr` backed by `redis`.
fn redis_outage_cycle(redis: &mut Redis, addr: SocketAddr, chat: &str) {
    let mut conn = HttpConn::connect(addr);
    for i in 0..5 {
        conn.send_ok(chat, "s", &format!("before {i}"));
    }
    assert_eq!(
        redis.zcard_chat(chat),
        5,
        "5 acknowledged sends must be in redis under the key im:{{{chat}}} (keys present: {})",
        redis.keys()
    );
    drop(conn);

    redis.kill();
    assert_unavailable(addr, chat, 503, "redis killed");

    redis.restart();
    let mut ok_times = wait_recovered(addr, chat, "after redis restart");
    let mut conn = HttpConn::connect(addr);
    for i in 0..20 {
        let r = conn.send(chat, "s", &format!("after {i}"));
        ok_times.push(send_time_of(&r, &format!("send #{i} after recovery")));
    }

    // Every send acknowledged after the restart is in redis (older data died with it).
    let zcard = redis.zcard_chat(chat);
    assert!(
        zcard >= ok_times.len() as i64,
        "{} sends got 200 after the restart but ZCARD im:{{{chat}}} is {zcard} (keys: {})",
        ok_times.len(),
        redis.keys()
    );
    assert_all_stored(addr, chat, &ok_times, "after the redis restart");
}

#[test]
fn redis_unix_socket_restart_mid_run() {
    let mut redis = Redis::start();
    let server = Server::with_redis(&redis);
    redis_outage_cycle(&mut redis, server.http_addr(), "room");
    // and a second outage on the same server
    redis_outage_cycle(&mut redis, server.http_addr(), "room2");
}

#[test]
fn redis_tcp_url_round_trip_and_restart() {
    let mut redis = Redis::start_tcp();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    let server = Server::with_redis(&redis);
    let addr = server.http_addr();
    let t = send_ok(addr, "tcp", "s", "over tcp");
    let page = pull_page(addr, "tcp", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
    assert_eq!(redis.zcard_chat("tcp"), 1, "keys: {}", redis.keys());
    redis_outage_cycle(&mut redis, addr, "tcp-outage");
}

#[test]
fn redis_url_with_password_and_db() {
    let redis = Redis::start_tcp_with_password("s3cret");
    let url = format!("{}/3", redis.url());
    let server = Server::start("all", &["--redis", &url], &[]);
    let addr = server.http_addr();
    let mut times = Vec::new();
    for i in 0..3 {
        times.push(send_ok(addr, "pw", "s", &format!("{i}")));
    }
    let page = pull_page(addr, "pw", 0, 10, true);
    assert_eq!(page.times(), times);
    assert_eq!(
        redis.redis_int_in(3, &["ZCARD", "im:{pw}"]),
        3,
        "messages must be stored in db 3 given by {url} (db 3 keys: {})",
        redis.redis_cmd_in(3, &["KEYS", "*"])
    );
    assert_eq!(
        redis.redis_int_in(0, &["DBSIZE"]),
        0,
        "nothing must be stored in db 0"
    );
}

#[test]
fn redis_wrong_password_gives_503() {
    let redis = Redis::start_tcp_with_password("right");
    let port = redis.port().unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{port}");
    // The server may refuse to start or may start and answer 503; it must never store or hang.
    match Server::try_start("all", &["--redis", &url], &[]) {
        Err(_) => {}
        Ok(server) => {
            let r = try_request(
                server.http_addr(),
                "POST",
                "/api/send",
                JSON_CT,
                br#"{"chat":"x","text":"t","sender":"s"}"#,
            )
            .unwrap_or_else(|e| panic!("send with a wrong redis password got no response: {e}"));
            assert_error(&r, 503, "send with a wrong redis password");
        }
    }
    assert_eq!(redis.redis_int(&["DBSIZE"]), 0);
}

#[test]
fn configuration_from_env_vars() {
    let redis = Redis::start();
    let url = redis.url();
    let server = Server::start(
        "",
        &[],
        &[
            ("REDIS_URL", url.as_str()),
            ("IM_HTTP_ADDR", "127.0.0.1:0"),
            ("IM_RPC_LISTEN", "127.0.0.1:0"),
            ("IM_RPC_TIMEOUT_MS", "2000"),
        ],
    );
    let addr = server.http_addr();
    send_ok(addr, "env", "s", "a");
    send_ok(addr, "env", "s", "b");
    assert_eq!(
        redis.zcard_chat("env"),
        2,
        "REDIS_URL from the environment must be used (keys: {})",
        redis.keys()
    );
}

#[test]
fn split_gateway_and_rpc_processes_with_redis() {
    let mut redis = Redis::start();
    let url = redis.url();
    let rpc = Server::rpc(&["--redis", &url]);
    let gw = Server::gateway(rpc.rpc_addr(), &[]);
    let addr = gw.http_addr();
    let t1 = send_ok(addr, "a:b", "a", "hello");
    let t2 = send_ok(addr, "b:a", "b", "hi");
    let page = pull_page(addr, "b:a", 0, 10, false);
    assert_eq!(page.times(), vec![t2, t1]);
    assert!(page.messages.iter().all(|m| m.chat == "a:b"));
    assert_eq!(redis.zcard_chat("a:b"), 2, "keys: {}", redis.keys());
    redis_outage_cycle(&mut redis, addr, "split");
}

/// Starts `im-server rpc` on exactly `addr`, retrying for a while in case the port
/// is not yet reusable.
fn start_rpc_on(addr: SocketAddr, extra: &[&str]) -> Server {
    let listen = addr.to_string();
    let mut args = vec!["--rpc-listen", listen.as_str()];
    args.extend_from_slice(extra);
    let started = Instant::now();
    loop {
        match Server::try_start("rpc", &args, &[]) {
            Ok(s) => {
                assert_eq!(
                    s.rpc_addr(),
                    addr,
                    "rpc server must listen on the requested address"
                );
                return s;
            }
            Err(e) if started.elapsed() > Duration::from_secs(5) => {
                panic!("could not restart rpc server on {addr}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn rpc_server_killed_gives_503_then_recovers() {
    let mut rpc = Server::rpc(&[]);
    let rpc_addr = rpc.rpc_addr();
    let gw = Server::gateway(rpc_addr, &[]);
    let addr = gw.http_addr();
    let mut conn = HttpConn::connect(addr);
    conn.send_ok("r", "s", "before");

    rpc.kill();
    assert_unavailable(addr, "r", 503, "rpc server killed");
    // the kept-alive client connection is still served (with 503s)
    let r = conn
        .try_request(
            "POST",
            "/api/send",
            JSON_CT,
            br#"{"chat":"r","text":"t","sender":"s"}"#,
        )
        .unwrap_or_else(|e| panic!("kept-alive connection during rpc outage got no response: {e}"));
    assert_error(
        &r,
        503,
        "send on a kept-alive connection while the rpc server is down",
    );

    let _rpc2 = start_rpc_on(rpc_addr, &[]);
    let mut times = wait_recovered(addr, "r", "after rpc server restart");
    for i in 0..10 {
        times.push(send_ok(addr, "r", "s", &format!("after {i}")));
    }
    assert_all_stored(addr, "r", &times, "after the rpc restart");
}

#[test]
fn gateway_started_before_rpc_server() {
    let rpc_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Server::gateway(rpc_addr, &[]);
    let addr = gw.http_addr();
    assert_unavailable(addr, "early", 503, "no rpc server listening yet");
    let _rpc = start_rpc_on(rpc_addr, &[]);
    let t = wait_recovered(addr, "early", "after the rpc server came up");
    // Newest first: the acknowledged sends, latest to earliest.
    let page = pull_page(addr, "early", 0, 10, false);
    assert_eq!(page.times(), t.iter().rev().copied().collect::<Vec<_>>());
}

/// A TCP server that accepts connections, reads everything, and never answers.
fn silent_rpc_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[test]
fn rpc_timeout_gives_504() {
    let silent = silent_rpc_server();
    let gw = Server::gateway(silent, &["--rpc-timeout-ms", "300"]);
    assert_unavailable(
        gw.http_addr(),
        "slow",
        504,
        "rpc server never answers (--rpc-timeout-ms 300)",
    );

    let silent = silent_rpc_server();
    let rpc = silent.to_string();
    let gw = Server::start(
        "gateway",
        &[],
        &[("IM_RPC_ADDR", rpc.as_str()), ("IM_RPC_TIMEOUT_MS", "300")],
    );
    assert_unavailable(
        gw.http_addr(),
        "slow",
        504,
        "rpc server never answers (IM_RPC_TIMEOUT_MS=300)",
    );
}

#[test]
fn redis_restart_under_concurrent_load() {
    let mut redis = Redis::start();
    let server = Server::with_redis(&redis);
    let addr = server.http_addr();
    let senders = Senders::start(addr, "load", 4);

    thread::sleep(Duration::from_millis(300));
    let kill_done = {
        redis.kill();
        Instant::now()
    };
    thread::sleep(Duration::from_millis(700));
    let restart_begin = Instant::now();
    redis.restart();
    let restart_done = Instant::now();
    // let the load run until it recovered, plus a while
    wait_until(RECOVERY_DEADLINE, "a 200 after the redis restart", || {
        let r = try_request(addr, "GET", "/api/pull?chat=load", &[], b"").ok()?;
        (r.status == 200).then_some(())
    });
    thread::sleep(Duration::from_millis(500));
    let outcomes = senders.stop();
    for o in &outcomes {
        assert!(
            o.status == 200 || o.status == 503,
            "send {:?} must get 200 or 503, got {}",
            o.text,
            o.status
        );
    }

    for o in ran_within(&outcomes, kill_done, restart_begin) {
        assert_eq!(
            o.status, 503,
            "a send that ran entirely while redis was down must get 503, got {}",
            o.status
        );
    }
    let after: Vec<i64> = outcomes
        .iter()
        .filter(|o| o.started > restart_done)
        .filter_map(|o| o.send_time)
        .collect();
    assert!(!after.is_empty(), "no send succeeded after the restart");
    let zcard = redis.zcard_chat("load");
    assert!(
        zcard >= after.len() as i64,
        "{} sends started after the restart got 200, but ZCARD im:{{load}} = {zcard}",
        after.len()
    );
    assert_all_stored(addr, "load", &after, "started after the redis restart");
}

// ---------------------------------------------------------------------------
// several processes on one redis
// ---------------------------------------------------------------------------

#[test]
fn two_servers_share_one_redis() {
    let redis = Redis::start();
    let s1 = Server::with_redis(&redis);
    let s2 = Server::with_redis(&redis);
    let addrs = [s1.http_addr(), s2.http_addr()];
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let addr = addrs[t % 2];
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let mut times = Vec::new();
                for i in 0..100 {
                    // DM room written through both spellings and both servers
                    let chat = if t % 3 == 0 { "p:q" } else { "q:p" };
                    times.push(conn.send_ok(chat, &format!("t{t}"), &format!("{i}")));
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        let times = h.join().expect("sender thread panicked");
        for w in times.windows(2) {
            assert!(
                w[0] < w[1],
                "one sender's send_times must increase: {} then {}",
                w[0],
                w[1]
            );
        }
        all.extend(times);
    }
    assert_unique(&all, "send_times assigned by two servers sharing one redis");
    all.sort_unstable();
    for addr in addrs {
        let got: Vec<i64> = walk(&mut HttpConn::connect(addr), "p:q", 10, true, Form::Json)
            .iter()
            .map(|m| m.send_time)
            .collect();
        assert_eq!(
            got, all,
            "walk via {addr}: every message from both servers exactly once, in order"
        );
    }
    assert_eq!(redis.zcard_chat("p:q"), 600, "keys: {}", redis.keys());
}

#[test]
fn send_times_keep_increasing_across_rpc_server_restart() {
    let redis = Redis::start();
    let url = redis.url();
    let mut rpc = Server::rpc(&["--redis", &url]);
    let rpc_addr = rpc.rpc_addr();
    let gw = Server::gateway(rpc_addr, &[]);
    let addr = gw.http_addr();
    let mut conn = HttpConn::connect(addr);
    let before: Vec<i64> = (0..300)
        .map(|i| conn.send_ok("mono", "s", &format!("before {i}")))
        .collect();
    rpc.kill();
    let _rpc2 = start_rpc_on(rpc_addr, &["--redis", &url]);
    let mut after = wait_recovered(addr, "mono", "after rpc server restart");
    let mut conn = HttpConn::connect(addr);
    for i in 0..50 {
        after.push(conn.send_ok("mono", "s", &format!("after {i}")));
    }
    let sent: Vec<i64> = before.iter().chain(after.iter()).copied().collect();
    for w in sent.windows(2) {
        assert!(
            w[0] < w[1],
            "send_times must keep increasing across an rpc server restart: {} then {}",
            w[0],
            w[1]
        );
    }
    let stored: Vec<i64> = walk(&mut conn, "mono", 100, true, Form::Json)
        .iter()
        .map(|m| m.send_time)
        .collect();
    assert_eq!(
        stored, sent,
        "all messages from before and after the rpc restart, oldest first"
    );
}

/// A chat's messages, oldest first, as (send_time, text).
fn times_and_texts(conn: &mut HttpConn, chat: &str) -> Vec<(i64, String)> {
    walk(conn, chat, 10, true, Form::Json)
        .into_iter()
        .map(|m| (m.send_time, m.text))
        .collect()
}

/// A caller whose clock is behind the chat's newest message (a skewed RPC
/// server) still gets send_times after it, one apart, each stored with its
/// own: `im_send` formats those itself, where a clock ahead is passed through.
#[test]
fn a_clock_behind_the_chat_still_gets_increasing_send_times() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut conn = HttpConn::connect(server.http_addr());
    let newest = conn.send_ok("skew", "s", "from a good clock");
    // Three messages at a clock of 1 µs, in one call, then one at a clock
    // ahead of them all.
    let member = |text: &str| im_send_member(text, "s");
    let (a, b, c) = (member("late a"), member("late b"), member("late c"));
    let chat = "im:{skew}";
    let late = redis.redis_cmd(&["FCALL", "im_send", "3", chat, chat, chat, &a, &b, &c, "1"]);
    let expected: Vec<i64> = (1..=3).map(|i| newest + i).collect();
    let replied: Vec<String> = expected.iter().map(|t| format!(":{t}")).collect();
    assert_eq!(
        late.split("\r\n").skip(1).take(3).collect::<Vec<_>>(),
        replied,
        "a clock behind: the chat's newest + 1, + 2, + 3: {late:?}"
    );
    let ahead = (newest + 1_000_000).to_string();
    let d = member("ahead");
    let reply = redis.redis_cmd(&["FCALL", "im_send", "1", chat, &d, &ahead]);
    assert_eq!(
        reply,
        format!("*1\r\n:{ahead}\r\n"),
        "a clock ahead is taken as is"
    );
    let stored = times_and_texts(&mut conn, "skew");
    let mut want = vec![(newest, "from a good clock".to_string())];
    for (t, text) in expected.iter().zip(["late a", "late b", "late c"]) {
        want.push((*t, text.to_string()));
    }
    want.push((newest + 1_000_000, "ahead".to_string()));
    assert_eq!(
        stored, want,
        "each message read back with its send_time, in order"
    );
}

/// `im_send_stamped`, what the server calls for batches without
/// idempotency keys: members come stamped with proposed send_times (the
/// caller's clock, + 1 for each next message of a chat). Proposals above
/// the chat's newest are stored as they are; below it (a skewed clock), or
/// for a chat's messages apart in one call, the chat's newest + 1, + 2, ...
/// are given and written into the members instead, as `im_send` would.
#[test]
fn stamped_sends_take_their_proposals_only_above_the_chats_newest() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut conn = HttpConn::connect(server.http_addr());
    let newest = conn.send_ok("stamped", "s", "from a good clock");
    // A member stamped with `t`. The test's clocks are chosen so that the
    // eight bytes are ASCII: redis_cmd takes UTF-8 arguments.
    let stamped = |t: i64, text: &str| {
        let mut member = String::from("\x09");
        for byte in t.to_le_bytes() {
            assert!(byte < 0x80, "{t}: not ASCII");
            member.push(char::from(byte));
        }
        member + &im_send_member(text, "s")
    };
    let chat = "im:{stamped}";
    // A clock behind the chat: proposals 1, 2, 3 are below its newest.
    let (a, b, c) = (
        stamped(1, "late a"),
        stamped(2, "late b"),
        stamped(3, "late c"),
    );
    let late = redis.redis_cmd(&[
        "FCALL",
        "im_send_stamped",
        "3",
        chat,
        chat,
        chat,
        "1",
        &a,
        "2",
        &b,
        "3",
        &c,
    ]);
    let behind: Vec<i64> = (1..=3).map(|i| newest + i).collect();
    assert_eq!(
        send_times_in(&late),
        behind,
        "newest + 1, + 2, + 3: {late:?}"
    );
    // A clock ahead (2032), with another chat between two of this chat's
    // messages: the first run takes its proposal, the other chat too, and
    // the chat's second run, proposed the clock again, gets the next one.
    let ahead: i64 = 0x0007_0000_0000_0000;
    assert!(ahead > newest + 3);
    let clock = ahead.to_string();
    let reply = redis.redis_cmd(&[
        "FCALL",
        "im_send_stamped",
        "3",
        chat,
        "im:{stamped-other}",
        chat,
        &clock,
        &stamped(ahead, "ahead"),
        &stamped(ahead, "elsewhere"),
        &stamped(ahead, "ahead, apart"),
    ]);
    assert_eq!(
        send_times_in(&reply),
        [ahead, ahead, ahead + 1],
        "{reply:?}"
    );
    let stored = times_and_texts(&mut conn, "stamped");
    let mut want = vec![(newest, "from a good clock".to_string())];
    for (t, text) in behind.iter().zip(["late a", "late b", "late c"]) {
        want.push((*t, text.to_string()));
    }
    want.push((ahead, "ahead".to_string()));
    want.push((ahead + 1, "ahead, apart".to_string()));
    assert_eq!(
        stored, want,
        "each message read back with the send_time it was given, in order"
    );
}

/// A deleted newest message's send_time, ahead of the clock, is not given
/// again (see the check).
#[test]
fn a_deleted_newest_send_time_is_not_given_again() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    check_a_deleted_newest_send_time_is_not_given_again(server.http_addr(), "gone", |_, args| {
        redis.redis_cmd(args)
    });
}

/// The RPC server puts each chat's messages together in an `im_send` call;
/// a caller that does not (messages of one chat apart, even with a clock
/// behind) still gets them stored in order with increasing send_times.
#[test]
fn a_chats_messages_apart_in_one_call_stay_in_order() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut conn = HttpConn::connect(server.http_addr());
    let newest = conn.send_ok("apart", "s", "first");
    let member = |text: &str| im_send_member(text, "s");
    let (a, b) = ("im:{apart}", "im:{other}");
    let reply = redis.redis_cmd(&[
        "FCALL",
        "im_send",
        "3",
        a,
        b,
        a,
        &member("second"),
        &member("elsewhere"),
        &member("third"),
        "1",
    ]);
    let times = send_times_in(&reply);
    assert_eq!(times.len(), 3, "{reply:?}");
    assert_eq!((times[0], times[2]), (newest + 1, newest + 2), "{reply:?}");
    let stored = times_and_texts(&mut conn, "apart");
    assert_eq!(
        stored,
        [
            (newest, "first".to_string()),
            (newest + 1, "second".to_string()),
            (newest + 2, "third".to_string()),
        ]
    );
}

// ---------------------------------------------------------------------------
// durability: redis with AOF, SIGKILLed under load
// ---------------------------------------------------------------------------

/// What one send of a [`Senders`] load saw.
struct Outcome {
    text: String,
    started: Instant,
    finished: Instant,
    status: u16,
    send_time: Option<i64>,
}

/// The sends that ran entirely between `from` and `to` (an outage); asserts
/// there are some.
fn ran_within(outcomes: &[Outcome], from: Instant, to: Instant) -> Vec<&Outcome> {
    let inside: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.started > from && o.finished < to)
        .collect();
    assert!(
        !inside.is_empty(),
        "no send ran entirely inside the outage window"
    );
    inside
}

/// Client threads, each on its own keep-alive connection, sending unique
/// texts (`w{worker} #{n}`) to one chat until stopped. Every answer must be
/// 200, or 503/504 with the standard error body, and must arrive (the
/// client's read timeout turns a hang into a failure).
struct Senders {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    oks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    workers: Vec<thread::JoinHandle<Vec<Outcome>>>,
}

impl Senders {
    fn start(addr: SocketAddr, chat: &'static str, count: usize) -> Senders {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let oks = Arc::new(AtomicUsize::new(0));
        let workers = (0..count)
            .map(|w| {
                let (stop, oks) = (stop.clone(), oks.clone());
                thread::spawn(move || {
                    let mut out = Vec::new();
                    let mut conn = HttpConn::connect(addr);
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let text = format!("w{w} #{i}");
                        let body = serde_json::json!({"chat": chat, "text": text, "sender": format!("w{w}")});
                        let started = Instant::now();
                        let r = conn
                            .try_request("POST", "/api/send", JSON_CT, body.to_string().as_bytes())
                            .unwrap_or_else(|e| {
                                panic!(
                                    "worker {w}: send {text:?} got no response after {:?} (hang or dropped connection): {e}",
                                    started.elapsed()
                                )
                            });
                        let finished = Instant::now();
                        let send_time = match r.status {
                            200 => {
                                oks.fetch_add(1, Ordering::SeqCst);
                                Some(send_time_of(&r, &format!("worker {w}: send {text:?}")))
                            }
                            503 | 504 => {
                                assert_error(&r, r.status, &format!("worker {w}: send {text:?}"));
                                None
                            }
                            _ => panic!(
                                "worker {w}: send {text:?} must get 200, 503 or 504, got {}",
                                r.describe()
                            ),
                        };
                        out.push(Outcome { text, started, finished, status: r.status, send_time });
                        if send_time.is_none() {
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                    out
                })
            })
            .collect();
        Senders { stop, oks, workers }
    }

    /// Sends answered 200 so far.
    fn oks(&self) -> usize {
        self.oks.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker panicked"))
            .collect()
    }
}

/// Redis with `appendonly yes` + `appendfsync always` writes every command to
/// its AOF before it replies, so a SIGKILL of redis-server
/// (not a machine crash) loses nothing: every send that got 200 before, during
/// or after the outage must be readable after the restart.
#[test]
fn redis_sigkill_under_load_loses_no_acknowledged_send() {
    use std::collections::HashMap;

    const WORKERS: usize = 6;
    const CHAT: &str = "durable";
    const RPC_TIMEOUT_MS: u64 = 1000;
    /// No answer may take longer than the RPC timeout plus this.
    const SLACK: Duration = Duration::from_millis(1000);
    /// Generous: the server's reconnect backoff is at most 250 ms.
    const RECOVERY_BOUND: Duration = Duration::from_secs(5);

    let mut redis = Redis::start_persistent();
    let url = redis.url();
    let rpc_timeout = RPC_TIMEOUT_MS.to_string();
    let server = Server::start(
        "all",
        &["--redis", &url, "--rpc-timeout-ms", &rpc_timeout],
        &[],
    );
    let addr = server.http_addr();
    let senders = Senders::start(addr, CHAT, WORKERS);

    // Load before the kill.
    wait_until(Duration::from_secs(5), "200s before the kill", || {
        (senders.oks() >= 50).then_some(())
    });
    thread::sleep(Duration::from_millis(300));
    let redis_pid = redis.pid().expect("redis-server is running");
    redis.kill(); // SIGKILL + reap
    let kill_done = Instant::now();
    thread::sleep(Duration::from_millis(700));
    let restart_begin = Instant::now();
    redis.restart(); // same dir (AOF replayed) and socket; returns once it answers PING
    let restart_done = Instant::now();
    let oks_at_restart = senders.oks();
    wait_until(RECOVERY_BOUND, "a 200 after the redis restart", || {
        (senders.oks() > oks_at_restart).then_some(())
    });
    thread::sleep(Duration::from_millis(500));
    let outcomes = senders.stop();

    // No answer hung past the RPC timeout + slack.
    let bound = Duration::from_millis(RPC_TIMEOUT_MS) + SLACK;
    let slowest = outcomes
        .iter()
        .max_by_key(|o| o.finished - o.started)
        .expect("no sends at all");
    assert!(
        slowest.finished - slowest.started <= bound,
        "send {:?} took {:?} (status {}), more than the RPC timeout + slack ({bound:?})",
        slowest.text,
        slowest.finished - slowest.started,
        slowest.status
    );

    // Sends that ran entirely while redis was down were all refused.
    let inside = ran_within(&outcomes, kill_done, restart_begin);
    for o in &inside {
        assert!(
            o.status == 503 || o.status == 504,
            "send {:?} ran entirely while redis was down ({:?} after the kill) and got {} (send_time {:?})",
            o.text,
            o.started - kill_done,
            o.status,
            o.send_time
        );
    }

    // Recovery time: restart done -> the first 200 of a send started after it.
    let first_ok = outcomes
        .iter()
        .filter(|o| o.status == 200 && o.started >= restart_done)
        .map(|o| o.finished)
        .min()
        .expect("no send started after the restart got 200");
    let recovery = first_ok - restart_done;
    assert!(
        recovery <= RECOVERY_BOUND,
        "first 200 only {recovery:?} after the restart (bound {RECOVERY_BOUND:?})"
    );

    // Every acknowledged send is stored, with its send_time and text.
    let acked: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 200).collect();
    let acked_before = acked.iter().filter(|o| o.started < kill_done).count();
    let acked_after = acked.len() - acked_before;
    let refused: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    let refused_503 = refused.iter().filter(|o| o.status == 503).count();
    let stored: HashMap<i64, Msg> = walk(&mut HttpConn::connect(addr), CHAT, 100, true, Form::Json)
        .into_iter()
        .map(|m| (m.send_time, m))
        .collect();
    let zcard = redis.zcard_chat(CHAT);
    let stored_texts: HashSet<&str> = stored.values().map(|m| m.text.as_str()).collect();
    let refused_but_stored = refused
        .iter()
        .filter(|o| stored_texts.contains(o.text.as_str()))
        .count();
    println!(
        "redis pid {redis_pid} SIGKILLed under {WORKERS} senders: {} sends in all; acknowledged (200) \
         {acked_before} started before the kill + {acked_after} after; refused {} ({refused_503} x 503, \
         {} x 504), {} of them entirely inside the outage, {refused_but_stored} refused but stored anyway; \
         outage {:?}, restart took {:?}; first 200 {recovery:?} after the restart; slowest answer {:?}; \
         stored {} (ZCARD {zcard})",
        outcomes.len(),
        refused.len(),
        refused.len() - refused_503,
        inside.len(),
        restart_begin - kill_done,
        restart_done - restart_begin,
        slowest.finished - slowest.started,
        stored.len(),
    );
    assert_eq!(
        zcard,
        stored.len() as i64,
        "ZCARD and a full walk of the chat disagree"
    );
    let missing: Vec<String> = acked
        .iter()
        .filter(|o| {
            stored
                .get(&o.send_time.unwrap())
                .is_none_or(|m| m.text != o.text)
        })
        .map(|o| format!("{:?}@{}", o.text, o.send_time.unwrap()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged sends are missing after the redis SIGKILL + AOF restart \
         ({acked_before} acknowledged before the kill): {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        acked_before > 0 && acked_after > 0,
        "acknowledged before the kill: {acked_before}, after: {acked_after}"
    );
}

/// The RPC server process is SIGKILLed while senders keep the gateway busy:
/// the gateway answers 503 (or 504 for a call caught in flight) meanwhile,
/// never hangs, reconnects by itself once a new RPC server listens on the same
/// address, and every send it acknowledged is in Redis.
#[test]
fn rpc_server_killed_under_load_gateway_recovers() {
    const CHAT: &str = "rpc-outage";
    let redis = Redis::start();
    let url = redis.url();
    let mut rpc = Server::rpc(&["--redis", &url]);
    let rpc_addr = rpc.rpc_addr();
    let gateway = Server::gateway(rpc_addr, &[]);
    let addr = gateway.http_addr();
    let senders = Senders::start(addr, CHAT, 4);

    wait_until(Duration::from_secs(5), "200s before the kill", || {
        (senders.oks() >= 50).then_some(())
    });
    rpc.kill();
    let kill_done = Instant::now();
    thread::sleep(Duration::from_millis(700));
    let restart_begin = Instant::now();
    let _rpc2 = start_rpc_on(rpc_addr, &["--redis", &url]);
    let restart_done = Instant::now();
    let oks_at_restart = senders.oks();
    wait_until(
        RECOVERY_DEADLINE,
        "a 200 after the rpc server restart",
        || (senders.oks() > oks_at_restart).then_some(()),
    );
    thread::sleep(Duration::from_millis(300));
    let outcomes = senders.stop();

    let inside = ran_within(&outcomes, kill_done, restart_begin);
    assert!(
        inside.iter().all(|o| o.status == 503),
        "sends made while the rpc server was down must all get 503: {:?}",
        inside.iter().map(|o| o.status).collect::<Vec<_>>()
    );
    let first_ok = outcomes
        .iter()
        .filter(|o| o.status == 200 && o.started >= restart_done)
        .map(|o| o.finished - restart_done)
        .min()
        .expect("no send started after the restart got 200");
    let acked: HashSet<i64> = outcomes.iter().filter_map(|o| o.send_time).collect();
    let stored = stored_send_times(addr, CHAT);
    let missing = acked.difference(&stored).count();
    println!(
        "rpc server killed under 4 senders: {} sends, {} acknowledged, {} refused inside the outage; \
         first 200 {first_ok:?} after the new rpc server started",
        outcomes.len(),
        acked.len(),
        inside.len()
    );
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged sends are not stored",
        acked.len()
    );
}

/// A full Redis (`maxmemory` with `noeviction`: every write refused with
/// `OOM command not allowed`) (issue 20 item 8): each send is `507
/// insufficient_storage` with a message that says so, none of it is
/// written (the chat holds exactly the sends answered 200; an
/// idempotency key refused with 507 is not remembered), pulls still work,
/// `im_store_full_total` counts the refusals, and thousands of refused
/// sends within a few seconds write a handful of log lines, not one each.
#[test]
fn a_full_redis_answers_507_writes_nothing_and_logs_a_line_a_second() {
    let redis = Redis::start_with_args(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let server = Server::with_redis(&redis);
    let addr = server.http_addr();
    let text = "x".repeat(500);
    let mut conn = HttpConn::connect(addr);
    let mut stored = 0i64;
    let full = loop {
        let r = conn.send("full", "s", &text);
        match r.status {
            200 => stored += 1,
            _ => break r,
        }
        assert!(stored < 20_000, "3 MB never filled");
    };
    assert_error(&full, 507, "a send into a full Redis");
    assert_eq!(full.json()["error"]["code"], "insufficient_storage");
    let message = full.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("full"), "{message}");
    let lines_before = server.stderr().lines().count();
    // The flood: 4 clients, 1,500 sends each, every one refused.
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let text = text.clone();
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let mut statuses = Vec::new();
                for i in 0..1_500 {
                    let key = format!("k{w}-{i}");
                    let body = serde_json::json!({"chat": "full", "text": text, "sender": "s",
                        "idempotency_key": key});
                    let r = conn.request("POST", "/api/send", JSON_CT, body.to_string().as_bytes());
                    statuses.push(r.status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    let took = started.elapsed();
    let refused = statuses.iter().filter(|&&s| s == 507).count();
    assert_eq!(refused, statuses.len(), "every send refused with 507");
    // Nothing half-written: the chat holds what was acknowledged, and a
    // refused idempotency key was not remembered.
    assert_eq!(redis.zcard_chat("full"), stored);
    let keys = redis.keys();
    assert!(
        !keys.contains("im:idem"),
        "a refused send's idempotency key was stored: {keys}"
    );
    // Reads still work.
    let r = conn.pull_query("chat=full&limit=5");
    assert_eq!(r.status, 200, "{}", r.describe());
    let m = scrape(server.http_addr());
    assert_eq!(m.value("im_store_full_total", &[]), (refused + 1) as f64);
    assert_eq!(
        m.value(
            "im_http_requests_total",
            &[("route", "send"), ("code", "507")]
        ),
        (refused + 1) as f64
    );
    let log = server.stderr();
    let flood_lines = log.lines().count() - lines_before;
    let seconds = took.as_secs() + 2;
    assert!(
        flood_lines as u64 <= seconds + 2 && flood_lines < 20,
        "{refused} refused sends in {took:?} wrote {flood_lines} log lines:\n{log}"
    );
    assert!(log.contains("store is full"), "{log}");
    eprintln!(
        "{stored} sends stored before Redis was full; {refused} refused sends in {took:?} wrote {flood_lines} log lines"
    );
}
