//! Discovery against real processes: our etcd client against a real etcd,
//! and (below) gateways balancing over several real RPC servers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use im_server::discovery::etcd::{Etcd as EtcdClient, WatchEvent, WatchMessage};

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<WatchMessage>) -> WatchMessage {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("watch message in time")
        .expect("watch open")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Lease, put, range by prefix, watch from the revision after the range,
/// keepalive, revoke (which deletes the key), and a dead first endpoint.
#[test]
fn etcd_client_speaks_the_json_gateway() {
    let etcd = Etcd::start();
    // The first endpoint refuses connections: every call moves on to etcd.
    let dead = format!("127.0.0.1:{}", free_port());
    let client = EtcdClient::new(vec![dead, etcd.addr().to_string()]);
    runtime().block_on(async {
        let lease = client.grant(10).await.expect("grant");
        assert!(client.keepalive(lease).await.expect("keepalive"));
        client
            .put(b"/t/a", b"127.0.0.1:1", lease)
            .await
            .expect("put");
        client.put(b"/u/x", b"other", 0).await.expect("put outside");
        let (revision, pairs) = client.range_prefix(b"/t/").await.expect("range");
        assert_eq!(pairs, vec![(b"/t/a".to_vec(), b"127.0.0.1:1".to_vec())]);

        // Changes after the range arrive on the watch, none before it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = {
            let client = EtcdClient::new(vec![etcd.addr().to_string()]);
            tokio::spawn(async move {
                let _ = client
                    .watch_prefix(b"/t/", revision + 1, |m| {
                        let _ = tx.send(m);
                        true
                    })
                    .await;
            })
        };
        assert_eq!(next(&mut rx).await, WatchMessage::Created);
        client
            .put(b"/t/b", b"127.0.0.1:2", lease)
            .await
            .expect("put b");
        assert_eq!(
            next(&mut rx).await,
            WatchMessage::Events(vec![WatchEvent::Put((
                b"/t/b".to_vec(),
                b"127.0.0.1:2".to_vec()
            ))])
        );
        client.delete(b"/t/b").await.expect("delete");
        assert_eq!(
            next(&mut rx).await,
            WatchMessage::Events(vec![WatchEvent::Delete(b"/t/b".to_vec())])
        );
        // Revoking the lease deletes what it held.
        client.revoke(lease).await.expect("revoke");
        assert_eq!(
            next(&mut rx).await,
            WatchMessage::Events(vec![WatchEvent::Delete(b"/t/a".to_vec())])
        );
        assert!(!client.keepalive(lease).await.expect("keepalive answers"));
        let (_, pairs) = client.range_prefix(b"/t/").await.expect("range");
        assert!(pairs.is_empty());
        watcher.abort();
    });
}

/// With no etcd anywhere, calls fail (fast) instead of hanging.
#[test]
fn etcd_client_fails_cleanly_when_etcd_is_down() {
    let client = EtcdClient::new(vec![
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ]);
    let start = Instant::now();
    let result = runtime().block_on(client.range_prefix(b"/t/"));
    assert!(result.is_err());
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// many RPC servers behind one gateway
// ---------------------------------------------------------------------------

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Send and Pull calls an RPC server has served, from its Ping reply;
/// `None` if it does not answer within 2 s.
fn served(rpc: SocketAddr) -> Option<u64> {
    let mut conn = RpcConn::try_connect(rpc, Duration::from_secs(2)).ok()?;
    conn.stream
        .write_all(&rpc_frame(1, im_server::rpc::method::PING, &[]))
        .ok()?;
    let reply = conn.next_frame()?;
    if reply.method_or_status != im_server::rpc::status::OK {
        return None;
    }
    let reply = <im_server::proto::PingResponse as prost::Message>::decode(reply.body).ok()?;
    Some(reply.served)
}

fn served_now(rpc: SocketAddr) -> u64 {
    served(rpc).unwrap_or_else(|| panic!("rpc server {rpc} does not answer Ping"))
}

/// An RPC server on a fixed port (so that it can be restarted on it).
fn rpc_on(port: u16, store: &[&str]) -> Server {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--rpc-listen", listen.as_str()];
    args.extend_from_slice(store);
    Server::rpc(&args)
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Three RPC servers on one Redis and a gateway over all three.
struct RpcCluster {
    gateway: Server,
    rpcs: Vec<Server>,
    ports: Vec<u16>,
    redis: Redis,
}

impl RpcCluster {
    fn start() -> RpcCluster {
        let redis = Redis::start();
        let url = redis.url();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let rpcs: Vec<Server> = ports
            .iter()
            .map(|&p| rpc_on(p, &["--redis", &url]))
            .collect();
        let addrs: Vec<SocketAddr> = rpcs.iter().map(Server::rpc_addr).collect();
        let gateway = Server::start("gateway", &["--rpc", &list(&addrs)], &[]);
        RpcCluster {
            gateway,
            rpcs,
            ports,
            redis,
        }
    }

    fn restart(&mut self, i: usize) {
        let url = self.redis.url();
        self.rpcs[i] = rpc_on(self.ports[i], &["--redis", &url]);
    }
}

/// What a load run saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    /// Non-2xx responses and I/O errors, described.
    failures: Vec<String>,
    /// send_time of every send answered 200, per chat.
    acked: Vec<(String, i64)>,
    /// The longest any request took.
    slowest: Duration,
}

/// `threads` clients doing send + pull in a loop until `stop`.
fn load(
    addr: SocketAddr,
    threads: usize,
    tag: &str,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Tally>>, Vec<thread::JoinHandle<()>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let handles = (0..threads)
        .map(|t| {
            let (tally, stop) = (tally.clone(), stop.clone());
            let chat = format!("{tag}-{t}");
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let began = Instant::now();
                    let sent = conn.try_request(
                        "POST",
                        "/api/send",
                        JSON_CT,
                        serde_json::json!({"chat": chat, "sender": "s", "text": format!("m{n}")})
                            .to_string()
                            .as_bytes(),
                    );
                    let sent_took = began.elapsed();
                    let pulled = conn.try_request(
                        "GET",
                        &format!("/api/pull?chat={chat}&limit=5"),
                        &[],
                        b"",
                    );
                    let pull_took = began.elapsed() - sent_took;
                    let mut tally = tally.lock().expect("tally");
                    tally.slowest = tally.slowest.max(sent_took).max(pull_took);
                    for (what, r) in [("send", &sent), ("pull", &pulled)] {
                        match r {
                            Ok(r) if r.status == 200 => tally.ok += 1,
                            Ok(r) => tally.failures.push(format!("{what}: {}", r.describe())),
                            Err(e) => tally.failures.push(format!("{what}: {e}")),
                        }
                    }
                    if let Ok(r) = &sent
                        && r.status == 200
                    {
                        tally.acked.push((chat.clone(), send_time_of(r, "send")));
                    }
                    if sent.is_err() || pulled.is_err() {
                        drop(tally);
                        conn = HttpConn::connect(addr);
                    }
                }
            })
        })
        .collect();
    (tally, handles)
}

fn stop_load(stop: &AtomicBool, handles: Vec<thread::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("load thread");
    }
}

/// Waits until `rpc` has served more calls than `before` (under load).
fn gets_traffic_within(rpc: SocketAddr, before: u64, within: Duration, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        if served(rpc).unwrap_or(0) > before {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: {rpc} got no traffic within {within:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Every acknowledged send is stored (read back through the gateway).
fn assert_acked_stored(addr: SocketAddr, acked: &[(String, i64)]) {
    let chats: HashSet<&String> = acked.iter().map(|(c, _)| c).collect();
    for chat in chats {
        let stored: HashSet<i64> = walk(&mut HttpConn::connect(addr), chat, 100, true, Form::Json)
            .iter()
            .map(|m| m.send_time)
            .collect();
        for (c, t) in acked {
            assert!(
                c != chat || stored.contains(t),
                "send {t} to {chat} got 200 but is not stored"
            );
        }
    }
}

#[test]
fn smoke_through_three_rpc_servers() {
    let cluster = RpcCluster::start();
    let addr = cluster.gateway.http_addr();
    let mut times = Vec::new();
    for i in 0..60 {
        times.push(send_ok(addr, "smoke", "a", &format!("m{i}")));
    }
    let walked = walk(&mut HttpConn::connect(addr), "smoke", 7, true, Form::Query);
    assert_eq!(
        walked.iter().map(|m| m.send_time).collect::<Vec<_>>(),
        times
    );
    // All three took part.
    for rpc in &cluster.rpcs {
        assert!(served_now(rpc.rpc_addr()) > 0, "{} idle", rpc.rpc_addr());
    }
}

/// Equal servers get a third of the calls each, ±10 %. One client at a
/// time: with several, power of two choices rightly steers calls away from
/// whichever server process the OS has just descheduled, and on a loaded
/// 2-core test machine that alone moved shares to [745, 1081, 1174] of 3,000
/// in a 0.6 s run. Sequential calls isolate the balancer's own fairness.
#[test]
fn calls_spread_evenly_over_three_equal_servers() {
    let rpcs: Vec<Server> = (0..3).map(|_| Server::rpc(&[])).collect();
    let addrs: Vec<SocketAddr> = rpcs.iter().map(Server::rpc_addr).collect();
    let gateway = Server::start("gateway", &["--rpc", &list(&addrs)], &[]);
    let mut conn = HttpConn::connect(gateway.http_addr());
    const TOTAL: u64 = 3000;
    for i in 0..TOTAL {
        conn.send_ok("spread", "s", &format!("{i}"));
    }
    let counts: Vec<u64> = addrs.iter().map(|&a| served_now(a)).collect();
    assert_eq!(counts.iter().sum::<u64>(), TOTAL, "{counts:?}");
    let share = TOTAL / 3;
    for c in &counts {
        assert!(
            c * 10 >= share * 9 && c * 10 <= share * 11,
            "not a third each ±10 %: {counts:?}; gateway:\n{}",
            gateway.stderr()
        );
    }
    eprintln!("spread of {TOTAL} sends over 3 servers: {counts:?}");
}

#[test]
fn rolling_restart_under_load_fails_nothing() {
    let mut cluster = RpcCluster::start();
    let addr = cluster.gateway.http_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, handles) = load(addr, 6, "rolling", stop.clone());
    thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        cluster.rpcs[i].signal("TERM");
        let status = cluster.rpcs[i]
            .wait_exit(Duration::from_secs(15))
            .expect("rpc server exits after SIGTERM");
        assert!(status.success(), "rpc server {i} exited {status}");
        cluster.restart(i);
        let took = gets_traffic_within(
            cluster.rpcs[i].rpc_addr(),
            0,
            Duration::from_secs(1),
            "restarted",
        );
        eprintln!("rpc server {i} restarted: traffic after {took:?}");
        thread::sleep(Duration::from_millis(300));
    }
    stop_load(&stop, handles);
    let tally = tally.lock().expect("tally");
    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed during the rolling restart: {:?}",
        tally.failures.len(),
        tally.ok + tally.failures.len() as u64,
        &tally.failures[..tally.failures.len().min(10)]
    );
    assert!(tally.ok > 100, "too little load: {}", tally.ok);
    assert_acked_stored(addr, &tally.acked);
    eprintln!("rolling restart: {} requests, 0 failed", tally.ok);
}

#[test]
fn sigkill_one_of_three_fails_only_calls_in_flight_to_it() {
    const THREADS: usize = 6;
    let mut cluster = RpcCluster::start();
    let addr = cluster.gateway.http_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, handles) = load(addr, THREADS, "kill", stop.clone());
    thread::sleep(Duration::from_millis(500));
    cluster.rpcs[1].kill();
    thread::sleep(Duration::from_secs(2));
    let failed_at_kill = tally.lock().expect("tally").failures.len();
    // Each client has at most one request in flight: at most that many fail.
    assert!(
        failed_at_kill <= THREADS,
        "{failed_at_kill} failures after one SIGKILL: {:?}",
        tally.lock().expect("tally").failures
    );
    // Ejected (or at least not failing calls): the next seconds are clean.
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        tally.lock().expect("tally").failures.len(),
        failed_at_kill,
        "failures continued after the kill"
    );
    let killed = cluster.rpcs[1].rpc_addr();
    assert!(
        cluster
            .gateway
            .stderr()
            .contains(&format!("rpc endpoint {killed} ejected")),
        "not ejected:\n{}",
        cluster.gateway.stderr()
    );
    cluster.restart(1);
    let took = gets_traffic_within(
        cluster.rpcs[1].rpc_addr(),
        0,
        Duration::from_secs(1),
        "after SIGKILL and restart",
    );
    thread::sleep(Duration::from_millis(300));
    stop_load(&stop, handles);
    let tally = tally.lock().expect("tally");
    assert_eq!(tally.failures.len(), failed_at_kill, "{:?}", tally.failures);
    for f in &tally.failures {
        assert!(
            f.starts_with("send: ") && f.contains("503"),
            "only un-keyed sends may fail: {f}"
        );
    }
    assert_acked_stored(addr, &tally.acked);
    eprintln!(
        "SIGKILL one of 3: {} ok, {} failed (in flight at the kill); back in {took:?}",
        tally.ok, failed_at_kill
    );
}

/// A server frozen with SIGSTOP for 2 s gets (almost) no new calls
/// meanwhile, and no request waits past the RPC timeout.
#[test]
fn frozen_server_is_avoided() {
    let cluster = RpcCluster::start();
    let addr = cluster.gateway.http_addr();
    let frozen = cluster.rpcs[1].rpc_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, handles) = load(addr, 6, "frozen", stop.clone());
    thread::sleep(Duration::from_millis(500));
    let before = served_now(frozen);
    let others_before: u64 = [0, 2]
        .iter()
        .map(|&i| served_now(cluster.rpcs[i].rpc_addr()))
        .sum();
    cluster.rpcs[1].signal("STOP");
    thread::sleep(Duration::from_secs(2));
    cluster.rpcs[1].signal("CONT");
    // What was sent to it while frozen waits in its socket and is served
    // right after SIGCONT: a few calls per gateway shard, until its stuck
    // in-flight count lost every draw (then it was ejected on timeouts).
    // Read first: calls sent after SIGCONT count too, and how many depends
    // on how soon this runs (the server can only be asked once awake):
    // printed, not checked. Each call sent to it while frozen timed out
    // (no call on messages is retried after a timeout): those are the
    // load's failures, which are checked.
    let during = served_now(frozen) - before;
    let others: u64 = [0, 2]
        .iter()
        .map(|&i| served_now(cluster.rpcs[i].rpc_addr()))
        .sum();
    stop_load(&stop, handles);
    let tally = tally.lock().expect("tally");
    eprintln!(
        "SIGSTOP 2 s: frozen server got {during} calls, the others {}; {} ok, {} failed, slowest {:?}",
        others - others_before,
        tally.ok,
        tally.failures.len(),
        tally.slowest
    );
    assert!(
        tally.failures.len() <= 20,
        "{} calls went to the frozen server: {:?}",
        tally.failures.len(),
        tally.failures
    );
    assert!(others - others_before > 100, "the others carried the load");
    // RPC timeout 1 s (default) + HTTP and scheduling slack.
    assert!(
        tally.slowest < Duration::from_millis(1800),
        "a request took {:?}",
        tally.slowest
    );
}

#[test]
fn etcd_registry_adds_and_drops_servers_live() {
    let mut etcd = Etcd::start();
    let registry = etcd.registry("/im/rpc");
    let redis = Redis::start();
    let url = redis.url();
    let first = Server::rpc(&["--redis", &url, "--registry", &registry]);
    let gateway = Server::start("gateway", &["--registry", &registry], &[]);
    gateway.wait_ready(Duration::from_secs(10));
    let addr = gateway.http_addr();
    send_ok(addr, "etcd", "a", "through the registry");
    assert!(served_now(first.rpc_addr()) > 0);

    let stop = Arc::new(AtomicBool::new(false));
    let (tally, handles) = load(addr, 4, "etcd", stop.clone());
    // A second server registers: traffic within a second.
    let mut second = Server::rpc(&["--redis", &url, "--registry", &registry]);
    let took = gets_traffic_within(
        second.rpc_addr(),
        0,
        Duration::from_secs(1),
        "newly registered",
    );
    eprintln!("registered server got traffic after {took:?}");
    // SIGKILLed: dropped (ejected at once, its key gone with the lease).
    let second_addr = second.rpc_addr();
    second.kill();
    wait_until(Duration::from_secs(5), "the killed server dropped", || {
        let log = gateway.stderr();
        (log.contains(&format!("rpc endpoint {second_addr} ejected"))
            || log.lines().last()?.contains("rpc endpoints")
                && !log.lines().last()?.contains(&second_addr.to_string()))
        .then_some(())
    });
    thread::sleep(Duration::from_millis(500));
    let failed = tally.lock().expect("tally").failures.len();
    assert!(failed <= 4, "{:?}", tally.lock().expect("tally").failures);
    // etcd SIGKILLed: traffic unaffected.
    etcd.kill();
    let before = tally.lock().expect("tally").ok;
    thread::sleep(Duration::from_secs(1));
    let tally_now = tally.lock().expect("tally");
    assert!(tally_now.ok > before, "no traffic while etcd is down");
    assert_eq!(tally_now.failures.len(), failed, "{:?}", tally_now.failures);
    drop(tally_now);
    // etcd back: the first server's registration is there again.
    etcd.restart();
    let key = format!("/im/rpc/{}", first.rpc_addr());
    wait_until(Duration::from_secs(15), "registration back in etcd", || {
        etcd.range(key.as_bytes(), None)?.get("kvs").map(|_| ())
    });
    stop_load(&stop, handles);
    let tally = tally.lock().expect("tally");
    assert_eq!(tally.failures.len(), failed, "{:?}", tally.failures);
}

/// SIGTERM deregisters at once (the key is gone before the process exits).
#[test]
fn sigterm_deregisters_from_etcd() {
    let etcd = Etcd::start();
    let registry = etcd.registry("/im/rpc");
    let mut rpc = Server::rpc(&["--registry", &registry]);
    let range = |etcd: &Etcd| etcd.range(b"/im/rpc/", Some(b"/im/rpc0"));
    wait_until(Duration::from_secs(5), "registration", || {
        range(&etcd)?.get("kvs").map(|_| ())
    });
    rpc.signal("TERM");
    let status = rpc.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success());
    let after = range(&etcd).expect("etcd answers");
    assert!(after.get("kvs").is_none(), "still registered: {after}");
    assert!(rpc.stderr().contains("deregistered"), "{}", rpc.stderr());
}

/// A host name with several addresses (an /etc/hosts entry made here) is
/// several endpoints.
#[test]
fn host_name_with_several_addresses_is_several_endpoints() {
    let name = format!("im-test-rpc-{}", std::process::id());
    let Some(mut hosts) = HostsEntry::add(&name, &["127.0.0.2", "127.0.0.3"]) else {
        eprintln!("skipped: /etc/hosts is not writable here");
        return;
    };
    let port = free_port();
    let a = Server::rpc(&["--rpc-listen", &format!("127.0.0.2:{port}")]);
    let b = Server::rpc(&["--rpc-listen", &format!("127.0.0.3:{port}")]);
    let gateway = Server::start("gateway", &["--rpc", &format!("{name}:{port}")], &[]);
    gateway.wait_ready(Duration::from_secs(10));
    let addr = gateway.http_addr();
    for i in 0..60 {
        send_ok(addr, &format!("dns{}", i % 3), "s", "x");
    }
    let (ca, cb) = (served_now(a.rpc_addr()), served_now(b.rpc_addr()));
    assert_eq!(ca + cb, 60);
    assert!(ca > 0 && cb > 0, "both addresses used: {ca} {cb}");
    // The name loses an address: re-resolved, that server is left alone.
    hosts.remove(&format!("127.0.0.3 {name}"));
    let only_a = format!("rpc endpoints: [{}]", a.rpc_addr());
    wait_until(Duration::from_secs(6), "re-resolution", || {
        gateway.stderr().contains(&only_a).then_some(())
    });
    for i in 0..30 {
        send_ok(addr, &format!("dns{}", i % 3), "s", "y");
    }
    assert_eq!(
        served_now(b.rpc_addr()),
        cb,
        "a dropped address still got calls"
    );
    assert_eq!(served_now(a.rpc_addr()), ca + 30);
}

/// Lines appended to /etc/hosts, removed on drop.
struct HostsEntry {
    lines: Vec<String>,
}

impl HostsEntry {
    fn add(name: &str, ips: &[&str]) -> Option<HostsEntry> {
        let lines: Vec<String> = ips.iter().map(|ip| format!("{ip} {name}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .ok()?;
        file.write_all(format!("{}\n", lines.join("\n")).as_bytes())
            .ok()?;
        Some(HostsEntry { lines })
    }

    /// Takes one of the lines out again.
    fn remove(&mut self, line: &str) {
        self.drop_lines(&[line.to_string()]);
        self.lines.retain(|l| l != line);
    }

    fn drop_lines(&self, lines: &[String]) {
        if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !lines.iter().any(|m| m == l))
                .collect();
            let _ = std::fs::write("/etc/hosts", format!("{}\n", kept.join("\n")));
        }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        self.drop_lines(&self.lines);
    }
}

/// A TCP proxy to `upstream` that can lose its connections the way a
/// network partition does: `partition()` freezes every connection open so
/// far — nothing forwarded, nothing closed, for ever — while connections
/// made later are forwarded normally.
struct LossyProxy {
    addr: SocketAddr,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<std::sync::atomic::AtomicU64>,
    opened: Arc<std::sync::atomic::AtomicU64>,
}

impl LossyProxy {
    fn start(upstream: SocketAddr) -> LossyProxy {
        use std::sync::atomic::AtomicU64;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let frozen_below = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let (frozen, count) = (frozen_below.clone(), opened.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let number = count.fetch_add(1, Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let frozen = frozen.clone();
                    thread::spawn(move || pump(from, to, number, &frozen));
                }
            }
        });
        LossyProxy {
            addr,
            frozen_below,
            opened,
        }
    }

    fn partition(&self) {
        let opened = self.opened.load(Ordering::SeqCst);
        self.frozen_below.store(opened, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes, or for ever without a byte
/// once connection `number` is frozen.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    number: u64,
    frozen_below: &std::sync::atomic::AtomicU64,
) {
    let mut buf = [0u8; 16 * 1024];
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let frozen = || number < frozen_below.load(Ordering::SeqCst);
    loop {
        if frozen() {
            // Hold both sockets open and silent, as a dead link would.
            thread::sleep(Duration::from_secs(3600));
        }
        match from.read(&mut buf) {
            // Read as the link died: lost, like the packets of a partition.
            Ok(_) if frozen() => {}
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// A gateway whose etcd watch connection is lost without a reset (a
/// partition) still learns of servers registered after it: the watch is
/// renewed every 10 s.
#[test]
fn a_watch_lost_without_a_reset_is_renewed() {
    let etcd = Etcd::start();
    let direct = etcd.registry("/im/rpc");
    let proxy = LossyProxy::start(etcd.addr());
    let through_proxy = format!("etcd://{}/im/rpc", proxy.addr);
    let redis = Redis::start();
    let url = redis.url();
    let first = Server::rpc(&["--redis", &url, "--registry", &direct]);
    let gateway = Server::start("gateway", &["--registry", &through_proxy], &[]);
    gateway.wait_ready(Duration::from_secs(10));
    send_ok(gateway.http_addr(), "lossy", "a", "through the registry");
    assert!(served_now(first.rpc_addr()) > 0);
    // The gateway's watch is now frozen; the next server registers directly.
    proxy.partition();
    let second = Server::rpc(&["--redis", &url, "--registry", &direct]);
    let addr = gateway.http_addr();
    let start = Instant::now();
    wait_until(Duration::from_secs(25), "the second server used", || {
        send_ok(addr, "lossy", "a", "after the partition");
        (served(second.rpc_addr()).unwrap_or(0) > 0).then_some(())
    });
    eprintln!(
        "second server got traffic {:?} after it started",
        start.elapsed()
    );
}

/// An RPC server says GOAWAY only once no shard accepts on its address any
/// more: a gateway that reconnects the moment it reads the GOAWAY is
/// refused, instead of landing in the accept queue of a socket about to
/// close, which resets the connection under the calls written on it. And
/// what was sent after the GOAWAY is still served.
#[test]
fn goaway_comes_after_the_listener_closed() {
    let mut rpc = Server::rpc(&["--threads", "2"]);
    let addr = rpc.rpc_addr();
    let mut conn = RpcConn::connect(addr);
    conn.assert_pull_ok(1, "before the shutdown");
    rpc.signal("TERM");
    let (id, kind, _) = conn.read_frame("GOAWAY");
    assert_eq!((id, kind), (0, im_server::rpc::status::GOAWAY), "a GOAWAY");
    let again = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    assert!(
        again.is_err(),
        "a connection made after the GOAWAY was accepted or queued: {again:?}"
    );
    conn.assert_pull_ok(2, "after the GOAWAY");
    drop(conn);
    let status = rpc
        .wait_exit(Duration::from_secs(10))
        .expect("the rpc server exits once its connection closes");
    assert!(status.success(), "exit {status}");
}
