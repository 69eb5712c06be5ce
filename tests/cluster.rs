//! The store on a real Redis Cluster (3 masters + 3 replicas, node timeout
//! 1 s): per-slot batching, resharding to a fresh master (ASK, then MOVED),
//! manual failover, a master SIGKILLed (with and without
//! `--redis-wait-replicas`) and a master frozen with SIGSTOP. The API
//! conformance suite runs on a cluster too (tests/conformance.rs).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Redis timeout of the servers under test; the RPC timeout is larger, so a
/// stalled Redis gives 503 (not 504).
const REDIS_TIMEOUT_MS: u64 = 1000;
const RPC_TIMEOUT_MS: u64 = 3000;

/// A server on `cluster`, given one node's URL (any node is enough).
fn start_server(cluster: &Cluster, extra: &[&str]) -> Server {
    start_server_at(&cluster.url(), extra)
}

fn start_server_at(url: &str, extra: &[&str]) -> Server {
    let redis_timeout = REDIS_TIMEOUT_MS.to_string();
    let rpc_timeout = RPC_TIMEOUT_MS.to_string();
    let mut args = vec![
        "--redis-timeout-ms",
        &redis_timeout,
        "--rpc-timeout-ms",
        &rpc_timeout,
    ];
    args.extend_from_slice(extra);
    Server::on_cluster(url, &args)
}

/// The highest `refresh #N` the server logged (map reads, including the first).
fn refreshes_logged(server: &Server) -> u64 {
    server
        .stderr()
        .lines()
        .filter_map(|l| l.split("refresh #").nth(1)?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
struct Outcome {
    chat: String,
    /// Empty for a pull.
    text: String,
    started: Instant,
    finished: Instant,
    /// 0: no response at all.
    status: u16,
    retry_after: bool,
    send_time: Option<i64>,
}

/// Client threads on keep-alive connections: senders send unique texts to
/// their chat, pullers pull theirs, until stopped. Every outcome is kept.
struct Load {
    stop: Arc<AtomicBool>,
    oks: Arc<AtomicUsize>,
    /// Per chat, when the latest request answered 200 was started.
    latest_ok: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
    workers: Vec<thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(addr: SocketAddr, senders: &[(String, usize)], pullers: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let oks = Arc::new(AtomicUsize::new(0));
        let latest_ok = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let mut workers = Vec::new();
        let jobs = senders
            .iter()
            .flat_map(|(chat, n)| (0..*n).map(move |_| (chat.clone(), true)))
            .chain(pullers.iter().map(|c| (c.clone(), false)));
        for (w, (chat, sends)) in jobs.enumerate() {
            let (stop, oks, latest_ok) = (stop.clone(), oks.clone(), latest_ok.clone());
            workers.push(thread::spawn(move || {
                let mut out = Vec::new();
                let mut conn = None;
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let c = conn.get_or_insert_with(|| HttpConn::connect(addr));
                    let text = if sends {
                        format!("w{w} #{i}")
                    } else {
                        String::new()
                    };
                    let started = Instant::now();
                    let r = if sends {
                        let body = serde_json::json!({"chat": chat, "text": text, "sender": "s"});
                        c.try_request("POST", "/api/send", JSON_CT, body.to_string().as_bytes())
                    } else {
                        let body = serde_json::json!({"chat": chat, "limit": 5});
                        c.try_request("GET", "/api/pull", JSON_CT, body.to_string().as_bytes())
                    };
                    let finished = Instant::now();
                    let (status, retry_after, send_time) = match &r {
                        Ok(r) => (
                            r.status,
                            r.header("retry-after").is_some(),
                            (sends && r.status == 200).then(|| send_time_of(r, &text)),
                        ),
                        Err(_) => {
                            conn = None;
                            (0, false, None)
                        }
                    };
                    if status == 200 {
                        oks.fetch_add(1, Ordering::SeqCst);
                        let mut latest = latest_ok.lock().expect("not poisoned");
                        let entry = latest.entry(chat.clone()).or_insert(started);
                        *entry = (*entry).max(started);
                    }
                    out.push(Outcome {
                        chat: chat.clone(),
                        text,
                        started,
                        finished,
                        status,
                        retry_after,
                        send_time,
                    });
                }
                out
            }));
        }
        Load {
            stop,
            oks,
            latest_ok,
            workers,
        }
    }

    /// Waits until a request to `chat` started after `after` got 200.
    fn wait_ok_on(&self, chat: &str, after: Instant, within: Duration) {
        wait_until(within, &format!("a 200 on {chat}"), || {
            let latest = self.latest_ok.lock().expect("not poisoned");
            latest.get(chat).is_some_and(|&t| t >= after).then_some(())
        });
    }

    fn oks(&self) -> usize {
        self.oks.load(Ordering::SeqCst)
    }

    /// Waits for `more` further 200s.
    fn wait_oks(&self, more: usize, what: &str) {
        let target = self.oks() + more;
        wait_until(Duration::from_secs(10), what, || {
            (self.oks() >= target).then_some(())
        });
    }

    fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        self.workers
            .into_iter()
            .flat_map(|w| w.join().expect("a load thread panicked"))
            .collect()
    }
}

/// Every answer is 200, or 503 with Retry-After; none hung or went missing.
fn assert_200_or_503(outcomes: &[Outcome], ctx: &str) {
    for o in outcomes {
        assert!(
            o.status == 200 || (o.status == 503 && o.retry_after),
            "{ctx}: {} {:?} to {} got {} (retry-after: {})",
            if o.text.is_empty() { "pull" } else { "send" },
            o.text,
            o.chat,
            o.status,
            o.retry_after
        );
    }
}

/// Per status, for the report.
fn statuses(outcomes: &[Outcome]) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for o in outcomes {
        *counts.entry(o.status).or_insert(0) += 1;
    }
    counts
}

/// Every acknowledged send is stored, and none twice.
fn assert_none_lost_or_duplicated(addr: SocketAddr, outcomes: &[Outcome]) {
    let (lost, duplicated) = lost_and_duplicated(addr, outcomes);
    assert!(
        lost.is_empty(),
        "{} acknowledged sends lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        duplicated.is_empty(),
        "{} stored twice: {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(10)]
    );
}

/// Acknowledged sends missing from a full walk of their chat, and texts
/// stored twice. Panics on a stored text no sender ever sent.
fn lost_and_duplicated(addr: SocketAddr, outcomes: &[Outcome]) -> (Vec<String>, Vec<String>) {
    let chats: HashSet<&str> = outcomes
        .iter()
        .filter(|o| !o.text.is_empty())
        .map(|o| o.chat.as_str())
        .collect();
    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    for chat in chats {
        let stored = walk(&mut HttpConn::connect(addr), chat, 100, true, Form::Json);
        let times = stored.iter().map(|m| m.send_time).collect::<Vec<_>>();
        assert_unique(&times, chat);
        let mut by_text: HashMap<&str, Vec<i64>> = HashMap::new();
        for m in &stored {
            by_text
                .entry(m.text.as_str())
                .or_default()
                .push(m.send_time);
        }
        duplicated.extend(
            by_text
                .iter()
                .filter(|(_, t)| t.len() > 1)
                .map(|(text, t)| format!("{chat}/{text} x{}", t.len())),
        );
        for o in outcomes
            .iter()
            .filter(|o| o.chat == chat && o.status == 200 && !o.text.is_empty())
        {
            if !by_text
                .get(o.text.as_str())
                .is_some_and(|t| t.contains(&o.send_time.unwrap_or(-1)))
            {
                lost.push(format!("{chat}/{}@{:?}", o.text, o.send_time));
            }
        }
    }
    (lost, duplicated)
}

/// Polls until the node on `port` is a master serving slots, per every
/// running node but `frozen` (SIGSTOPped: it would not answer).
fn wait_promoted(cluster: &Cluster, port: u16, frozen: Option<u16>, deadline: Duration) -> Instant {
    wait_until(deadline, "the replica's promotion", || {
        let awake = |n: &&ClusterNode| n.is_running() && Some(n.port) != frozen;
        let promoted = cluster.nodes.iter().filter(awake).all(|n| {
            n.try_cmd(&["CLUSTER", "NODES"]).is_ok_and(|text| {
                text.lines().any(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    f.len() > 8
                        && f[1].starts_with(&format!("127.0.0.1:{port}@"))
                        && f[2].contains("master")
                })
            })
        });
        promoted.then(Instant::now)
    })
}

/// Sends to chats on three masters, in bursts written at once (HTTP
/// pipelining), so that the store gets many sends per turn: each burst must
/// cost one `im_send` per slot, never a CROSSSLOT, and every send is stored.
#[test]
fn sends_batch_per_slot_across_masters() {
    const BURST: usize = 30;
    const BURSTS: usize = 20;
    let cluster = Cluster::start();
    // A list of seed nodes works as well as one node. One thread, so that
    // the one closing log line counts every batch.
    let mut server = start_server_at(&cluster.seed_url(), &["--threads", "1"]);
    let addr = server.http_addr();
    let chats = cluster.chats_on_distinct_masters("batch", 3);
    assert_eq!(chats.len(), 3, "three masters");
    let masters = cluster.masters();
    let slots: HashSet<u16> = chats.iter().map(|c| cluster.slot_of(c)).collect();
    assert_eq!(slots.len(), 3);
    let fcalls_before = cluster.fcall_calls(&masters);
    // Connect every master once, so bursts are not split by connecting.
    for chat in &chats {
        send_ok(addr, chat, "s", "warm-up");
    }

    // Bursts: one send on each of BURST connections, written back to back
    // (a connection runs its sends one at a time, so a burst needs many);
    // FCALLs per burst measured on the masters.
    let mut conns: Vec<HttpConn> = (0..BURST).map(|_| HttpConn::connect(addr)).collect();
    let mut per_burst = Vec::new();
    for b in 0..BURSTS {
        let before = cluster.fcall_calls(&masters);
        let wires: Vec<Vec<u8>> = (0..BURST)
            .map(|i| {
                let body = serde_json::json!({"chat": chats[i % 3], "text": format!("b{b} #{i}"), "sender": "s"});
                format_request("127.0.0.1", "POST", "/api/send", JSON_CT, body.to_string().as_bytes())
            })
            .collect();
        for (conn, wire) in conns.iter_mut().zip(&wires) {
            conn.write_raw(wire);
        }
        for (i, conn) in conns.iter_mut().enumerate() {
            let r = conn.read_response();
            assert_eq!(r.status, 200, "burst {b} send {i}: {}", r.describe());
        }
        per_burst.push(cluster.fcall_calls(&masters) - before);
    }
    println!("FCALLs per burst of {BURST} sends to 3 slots: {per_burst:?}");
    for (b, &fcalls) in per_burst.iter().enumerate() {
        assert!(
            (3..BURST as i64).contains(&fcalls),
            "burst {b}: {fcalls} FCALLs for {BURST} sends to 3 slots (at least one per slot, fewer than one per send)"
        );
    }

    // Concurrent bursts from several clients.
    let senders: Vec<_> = (0..6)
        .map(|t| {
            let chats = chats.clone();
            thread::spawn(move || {
                let mut conn = HttpConn::connect(addr);
                let mut acked = Vec::new();
                for b in 0..5 {
                    let mut wire = Vec::new();
                    let texts: Vec<(String, String)> = (0..BURST)
                        .map(|i| (chats[(i + t) % 3].clone(), format!("t{t} b{b} #{i}")))
                        .collect();
                    for (chat, text) in &texts {
                        let body = serde_json::json!({"chat": chat, "text": text, "sender": "s"});
                        wire.extend(format_request(
                            "127.0.0.1",
                            "POST",
                            "/api/send",
                            &[("Content-Type", "application/json")],
                            body.to_string().as_bytes(),
                        ));
                    }
                    conn.write_raw(&wire);
                    for (chat, text) in texts {
                        let r = conn.read_response();
                        assert_eq!(r.status, 200, "{text}: {}", r.describe());
                        acked.push((chat, text, send_time_of(&r, "concurrent burst")));
                    }
                }
                acked
            })
        })
        .collect();
    let acked: Vec<(String, String, i64)> = senders
        .into_iter()
        .flat_map(|t| t.join().expect("sender thread"))
        .collect();
    for chat in &chats {
        let stored: HashSet<(String, i64)> =
            walk(&mut HttpConn::connect(addr), chat, 100, true, Form::Json)
                .into_iter()
                .map(|m| (m.text, m.send_time))
                .collect();
        let expected = 1 + BURSTS * BURST / 3 + 6 * 5 * BURST / 3;
        assert_eq!(stored.len(), expected, "{chat}: stored count");
        for (c, text, t) in acked.iter().filter(|(c, _, _)| c == chat) {
            assert!(
                stored.contains(&(text.clone(), *t)),
                "{c}/{text}@{t} missing"
            );
        }
    }
    assert_eq!(cluster.error_count("CROSSSLOT"), 0, "CROSSSLOT errors");

    // Which sends formed a batch depends on timing; the server counts, per
    // batch, the distinct slots its keys are in. Redis must have run
    // exactly that many FCALLs: one per slot per batch.
    let fcalls = cluster.fcall_calls(&masters) - fcalls_before;
    server.signal("TERM");
    assert!(
        server.wait_exit(Duration::from_secs(15)).is_some(),
        "no exit after SIGTERM"
    );
    let closing = server
        .stderr()
        .lines()
        .find_map(|l| {
            let rest = l.split("cluster store closed after ").nth(1)?;
            let mut words = rest.split(' ');
            let batches: i64 = words.next()?.parse().ok()?;
            let slots: i64 = words.nth(3)?.parse().ok()?;
            Some((batches, slots))
        })
        .unwrap_or_else(|| panic!("no closing line:\n{}", server.stderr()));
    let sends = (3 + BURSTS * BURST + 6 * 5 * BURST) as i64;
    println!(
        "{sends} sends in {} batches touching {} slots in all; {fcalls} FCALLs on the masters",
        closing.0, closing.1
    );
    assert_eq!(
        fcalls, closing.1,
        "FCALLs = distinct slots summed over batches"
    );
    assert!(closing.0 < sends, "sends were batched");
}

/// A live chat's slot moves, under load, to a master that joined empty (no
/// function library): ASK while the slot migrates, MOVED once it has moved.
/// Nothing acknowledged is lost, nothing is stored twice, and sends keep
/// working on the new master (the server loaded the function there).
#[test]
fn slot_resharded_to_a_fresh_master_under_load() {
    let mut cluster = Cluster::start();
    let server = start_server(&cluster, &[]);
    let addr = server.http_addr();
    let chats = cluster.chats_on_distinct_masters("reshard", 2);
    let (moving, steady) = (chats[0].clone(), chats[1].clone());
    let slot = cluster.slot_of(&moving);
    let source = cluster.master_of(slot);
    let load = Load::start(
        addr,
        &[(moving.clone(), 3), (steady.clone(), 1)],
        std::slice::from_ref(&moving),
    );
    load.wait_oks(50, "200s before the reshard");

    let target = cluster.add_empty_master();
    let no_functions = cluster.node(target).cmd(&["FUNCTION", "LIST"]);
    assert!(
        !no_functions.contains("im_send"),
        "the new node starts without the library"
    );
    let (source_id, target_id) = (cluster.id_of(source), cluster.id_of(target));
    let slot_s = slot.to_string();
    let key = format!("im:{{{moving}}}");
    let ok = |port: u16, args: &[&str]| {
        let reply = cluster.node(port).cmd(args);
        assert!(reply.starts_with("+OK"), "{args:?} on {port}: {reply}");
    };
    ok(
        target,
        &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &source_id],
    );
    ok(
        source,
        &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &target_id],
    );
    let target_s = target.to_string();
    ok(
        source,
        &[
            "MIGRATE",
            "127.0.0.1",
            &target_s,
            "",
            "0",
            "5000",
            "KEYS",
            &key,
        ],
    );
    // The key is on the target, the slot still on the source: ASK.
    load.wait_oks(30, "200s while the slot migrates (ASK)");
    for port in cluster.masters().into_iter().chain([target]) {
        ok(port, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &target_id]);
    }
    let moved_at = Instant::now();
    load.wait_oks(100, "200s after the slot moved (MOVED)");
    thread::sleep(Duration::from_millis(300));
    let outcomes = load.stop();

    assert_200_or_503(&outcomes, "reshard");
    assert_none_lost_or_duplicated(addr, &outcomes);
    let after: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.chat == moving && !o.text.is_empty() && o.started > moved_at)
        .collect();
    assert!(
        after.iter().any(|o| o.status == 200),
        "no 200 on the moved slot"
    );
    assert!(
        cluster
            .node(target)
            .cmd(&["FUNCTION", "LIST"])
            .contains("im_send"),
        "the server did not load the library on the new master"
    );
    let stored_there = cluster.node(target).cmd(&["ZCARD", &key]);
    let walked = walk(&mut HttpConn::connect(addr), &moving, 100, true, Form::Json).len();
    assert_eq!(
        stored_there.trim(),
        format!(":{walked}"),
        "the chat lives on the new master"
    );
    let (asks, moveds) = (cluster.error_count("ASK"), cluster.error_count("MOVED"));
    println!(
        "reshard of slot {slot} ({source} -> {target}) under load: statuses {:?}, {asks} ASK and {moveds} MOVED replies, \
         {} map refreshes logged, {} sends to the moved chat after the move",
        statuses(&outcomes),
        refreshes_logged(&server),
        after.len()
    );
    assert!(asks > 0, "the migration was never seen as ASK");
    assert!(moveds > 0, "the move was never seen as MOVED");
}

/// When the first 200 on `chat` of a request started at or after `since`
/// arrived; panics if there is none.
fn first_ok_since(outcomes: &[Outcome], chat: &str, since: Instant, what: &str) -> Instant {
    outcomes
        .iter()
        .filter(|o| o.chat == chat && o.status == 200 && o.started >= since)
        .map(|o| o.finished)
        .min()
        .unwrap_or_else(|| panic!("no 200 on {what} after the switch"))
}

/// The scene of the failover tests: a fresh cluster, a server on it, and load
/// on three chats on distinct masters (`senders` senders each, and a puller
/// each if `pull`), warmed up to `warm_oks` 200s. Returns
/// `(cluster, server, addr, chats, master, replica, load)`: `master` serves
/// `chats[0]`, `replica` is its replica. Bound in this order, they are dropped
/// load first and cluster last.
type UnderLoad = (Cluster, Server, SocketAddr, Vec<String>, u16, u16, Load);

fn under_load(tag: &str, extra: &[&str], senders: usize, pull: bool, warm_oks: usize) -> UnderLoad {
    let cluster = Cluster::start();
    let server = start_server(&cluster, extra);
    let addr = server.http_addr();
    let chats = cluster.chats_on_distinct_masters(tag, 3);
    let master = cluster.master_of(cluster.slot_of(&chats[0]));
    let replica = cluster.replica_of(master).expect("a replica");
    let senders: Vec<(String, usize)> = chats.iter().map(|c| (c.clone(), senders)).collect();
    let pullers: &[String] = if pull { &chats } else { &[] };
    let load = Load::start(addr, &senders, pullers);
    load.wait_oks(warm_oks, &format!("{tag}: 200s while warming up"));
    (cluster, server, addr, chats, master, replica, load)
}

/// `CLUSTER FAILOVER` (sent to a replica) under send and pull load: nothing
/// but 200 or 503 + Retry-After, nothing acknowledged lost, and 200s again
/// within 2 s of the switch.
#[test]
fn manual_failover_under_load() {
    let (cluster, server, addr, chats, master, replica, load) =
        under_load("failover", &[], 2, true, 100);
    let reply = cluster.node(replica).cmd(&["CLUSTER", "FAILOVER"]);
    assert!(reply.starts_with("+OK"), "CLUSTER FAILOVER: {reply}");
    let switched = wait_promoted(&cluster, replica, None, Duration::from_secs(10));
    load.wait_oks(100, "200s after the failover");
    thread::sleep(Duration::from_millis(500));
    let outcomes = load.stop();

    assert_200_or_503(&outcomes, "manual failover");
    assert_none_lost_or_duplicated(addr, &outcomes);
    let first_ok = first_ok_since(&outcomes, &chats[0], switched, "the failed-over master");
    assert!(
        first_ok - switched <= Duration::from_secs(2),
        "first 200 {:?} after the switch",
        first_ok - switched
    );
    println!(
        "manual failover {master} -> {replica}: statuses {:?}, first 200 {:?} after the switch, {} map refreshes logged",
        statuses(&outcomes),
        first_ok - switched,
        refreshes_logged(&server)
    );
}

/// SIGKILL of a master under send load (its replica frozen and cut off
/// for the 300 ms before), then the replica's promotion.
/// Returns (acknowledged sends lost on the killed master's chat, outcomes of
/// the other chats, the server's refreshes).
fn sigkill_master_under_load(
    extra: &[&str],
) -> (Vec<String>, Vec<Outcome>, Vec<Outcome>, u64, Instant) {
    let (mut cluster, server, addr, chats, master, replica, load) =
        under_load("crash", extra, 3, false, 150);
    // Healthy chats are judged from here; before, the load warmed up.
    let measured_from = Instant::now();
    // Replication over loopback is too quick for a kill to ever catch a
    // write the replica lacks. So first the replica is frozen and its link
    // cut (what the master wrote before stays in the replica's socket):
    // for 300 ms the master acknowledges writes it cannot pass on, the very
    // situation WAIT is for.
    cluster.node(replica).signal("STOP");
    cluster
        .node(master)
        .cmd(&["CLIENT", "KILL", "TYPE", "replica"]);
    thread::sleep(Duration::from_millis(300));
    cluster.node_mut(master).kill();
    let killed = Instant::now();
    cluster.node(replica).signal("CONT");
    wait_promoted(&cluster, replica, None, Duration::from_secs(15));
    let promoted = Instant::now();
    thread::sleep(Duration::from_millis(1500));
    let outcomes = load.stop();
    assert_200_or_503(&outcomes, "master SIGKILL");
    let (lost, duplicated) = lost_and_duplicated(addr, &outcomes);
    assert!(
        duplicated.is_empty(),
        "{} stored twice: {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(10)]
    );
    let (affected, others): (Vec<Outcome>, Vec<Outcome>) =
        outcomes.into_iter().partition(|o| o.chat == chats[0]);
    let (others, warm_up): (Vec<Outcome>, Vec<Outcome>) =
        others.into_iter().partition(|o| o.started >= measured_from);
    let zcard = cluster
        .node(replica)
        .cmd(&["ZCARD", &format!("im:{{{}}}", chats[0])]);
    println!(
        "master {master} SIGKILLed ({extra:?}): promotion of {replica} after {:?}; killed master's chat: {:?}, \
         {} acknowledged, ZCARD on the new master {}; other chats: {:?} (warm-up before: {:?})",
        promoted - killed,
        statuses(&affected),
        affected.iter().filter(|o| o.status == 200).count(),
        zcard.trim(),
        statuses(&others),
        statuses(&warm_up)
    );
    (lost, affected, others, refreshes_logged(&server), killed)
}

/// With `--redis-wait-replicas 1` every 200 survives the loss of its master,
/// and chats on the other masters never see an error.
#[test]
fn master_sigkill_with_wait_loses_no_acknowledged_send() {
    let (lost, affected, others, refreshes, killed) =
        sigkill_master_under_load(&["--redis-wait-replicas", "1"]);
    assert!(
        lost.is_empty(),
        "acknowledged sends lost despite WAIT 1: {lost:?}"
    );
    assert!(
        affected.iter().any(|o| o.status == 200),
        "no 200 before the kill"
    );
    let errors: Vec<String> = others
        .iter()
        .filter(|o| o.status != 200)
        .map(|o| {
            let at = |t: Instant| match t.checked_duration_since(killed) {
                Some(d) => format!("+{d:?}"),
                None => format!("-{:?}", killed - t),
            };
            format!(
                "{} {:?}: {} from {} to {} after the kill",
                o.chat,
                o.text,
                o.status,
                at(o.started),
                at(o.finished)
            )
        })
        .collect();
    assert!(
        errors.is_empty(),
        "chats on healthy masters saw {} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    println!("with WAIT 1: 0 acknowledged sends lost; {refreshes} map refreshes logged");
}

/// The same crash without WAIT: acknowledged sends may be lost (replication
/// is asynchronous). Printed, not asserted; the chat must recover.
#[test]
fn master_sigkill_without_wait_reports_losses() {
    let (lost, affected, others, refreshes, killed) = sigkill_master_under_load(&[]);
    // Recovery: the first 200 of a send to the killed master's chat started
    // after the kill, within node timeout (1 s) + 3 s of it.
    let recovered = affected
        .iter()
        .filter(|o| o.status == 200 && o.started > killed)
        .map(|o| o.finished - killed)
        .min();
    println!(
        "without WAIT: {} acknowledged sends lost after the master SIGKILL: {:?}; \
         first 200 on its chat {recovered:?} after the kill; {refreshes} map refreshes logged",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let errors = others.iter().filter(|o| o.status != 200).count();
    assert_eq!(errors, 0, "chats on healthy masters saw {errors} errors");
    let recovered = recovered.expect("the killed master's chat never recovered");
    assert!(
        recovered <= Duration::from_secs(4),
        "the killed master's chat recovered only {recovered:?} after the kill"
    );
}

/// A master frozen with SIGSTOP: no request waits past the Redis timeout
/// (plus slack); its replica takes over and traffic moves on.
#[test]
fn master_sigstop_bounded_waits_and_failover() {
    let (cluster, server, addr, chats, master, replica, load) =
        under_load("frozen", &[], 2, true, 100);
    // Shown only if the test fails: in one CI run of 2026-12-08 every send
    // acknowledged on this chat before the freeze, from the first, was
    // missing after the failover (not only the last few an asynchronous
    // replica may miss), and it never failed alone or again. Whether the
    // replica was following this master, and how far behind, tells a
    // replica that was not replicating from a lost tail.
    let replication = |port: u16| {
        let node = cluster.node(port);
        ["role", "master_repl_offset", "master_link_status", "slave0"]
            .map(|f| format!("{f}={:?}", node.info_field("replication", f)))
            .join(" ")
    };
    eprintln!(
        "before SIGSTOP: master {master}: {}; replica {replica}: {}",
        replication(master),
        replication(replica)
    );
    cluster.node(master).signal("STOP");
    let stopped = Instant::now();
    let switched = wait_promoted(&cluster, replica, Some(master), Duration::from_secs(15));
    // Traffic moves on: the frozen master's chat answers 200 again.
    load.wait_ok_on(&chats[0], switched, Duration::from_secs(10));
    load.wait_oks(100, "200s after the failover");
    let outcomes = load.stop();
    cluster.node(master).signal("CONT");

    assert_200_or_503(&outcomes, "SIGSTOP");
    let bound = Duration::from_millis(REDIS_TIMEOUT_MS + 1000);
    let slowest = outcomes
        .iter()
        .map(|o| o.finished - o.started)
        .max()
        .expect("outcomes");
    assert!(
        slowest <= bound,
        "a request took {slowest:?} (bound {bound:?})"
    );
    assert_none_lost_or_duplicated(addr, &outcomes);
    let recovered = first_ok_since(&outcomes, &chats[0], switched, "the frozen master's chat");
    let others_errors = outcomes
        .iter()
        .filter(|o| o.chat != chats[0] && o.status != 200)
        .count();
    println!(
        "master {master} SIGSTOPped: promotion after {:?}, first 200 {:?} after it, slowest answer {slowest:?}, \
         {others_errors} errors on other masters' chats, statuses {:?}, {} map refreshes logged",
        switched - stopped,
        recovered - switched,
        statuses(&outcomes),
        refreshes_logged(&server)
    );
    assert_eq!(others_errors, 0, "chats on healthy masters saw errors");
}

/// A standalone Redis on TCP and one replica of it, in sync.
fn master_and_replica() -> (Redis, Redis) {
    let master = Redis::start_tcp();
    let port = master.port().expect("tcp").to_string();
    let replica = Redis::start_with_args(&["--replicaof", "127.0.0.1", &port]);
    wait_until(Duration::from_secs(10), "the replica's sync", || {
        replica
            .redis_cmd(&["INFO", "replication"])
            .contains("master_link_status:up")
            .then_some(())
    });
    (master, replica)
}

/// `--redis-wait-replicas` on a standalone Redis with one replica: 200 while
/// the replica confirms; asking for more replicas than exist, or losing the
/// replica, gives 503 (the message is on the master: "maybe stored").
#[test]
fn wait_replicas_on_standalone_redis() {
    let (master, mut replica) = master_and_replica();
    let url = master.url();
    let one = Server::start("all", &["--redis", &url, "--redis-wait-replicas", "1"], &[]);
    let two = Server::start("all", &["--redis", &url, "--redis-wait-replicas", "2"], &[]);
    send_ok(one.http_addr(), "waited", "s", "confirmed by one replica");
    assert_eq!(
        replica.zcard_chat("waited"),
        1,
        "the replica has the message once the send is answered"
    );
    let started = Instant::now();
    let r = send(
        two.http_addr(),
        "waited",
        "s",
        "two replicas asked, one exists",
    );
    assert_error(&r, 503, "WAIT 2 with one replica");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "WAIT is bounded by half the Redis timeout: took {:?}",
        started.elapsed()
    );
    replica.kill();
    let r = send(one.http_addr(), "waited", "s", "the replica is gone");
    assert_error(&r, 503, "WAIT 1 without a replica");
    // 503 means "maybe stored": both refused sends are on the master.
    let texts: Vec<String> = walk(
        &mut HttpConn::connect(one.http_addr()),
        "waited",
        100,
        true,
        Form::Json,
    )
    .into_iter()
    .map(|m| m.text)
    .collect();
    assert_eq!(
        texts,
        [
            "confirmed by one replica",
            "two replicas asked, one exists",
            "the replica is gone"
        ]
    );
}

/// With `--redis-wait-replicas`, Redis reads nothing more from a connection
/// blocked in WAIT, so the RPC server holds later sends back (two batches in
/// Redis per connection) and sends them together once a WAIT is answered,
/// rather than one `im_send` per send, each queued behind the WAIT. Here the
/// replica is frozen, so every WAIT runs to its timeout (400 ms) while 12
/// sends, 20 ms apart, arrive: without the window each is its own FCALL;
/// with it (one thread, so one batcher), the first two go alone and the
/// rest together.
#[test]
fn sends_behind_a_pending_wait_go_as_one_batch() {
    let (master, replica) = master_and_replica();
    let url = master.url();
    let args = [
        "--redis",
        &url,
        "--redis-wait-replicas",
        "1",
        "--threads",
        "1",
    ];
    let server = Server::start("all", &args, &[]);
    send_ok(server.http_addr(), "window", "s", "loads the library");
    master.redis_cmd(&["CONFIG", "RESETSTAT"]);
    let replica_pid = replica.pid().expect("the replica runs");
    send_signal(replica_pid, "STOP");
    let addr = server.http_addr();
    let senders: Vec<_> = (0..12u64)
        .map(|i| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20 * i));
                send(addr, "window", "s", &format!("behind a wait {i}")).status
            })
        })
        .collect();
    let statuses: Vec<u16> = senders
        .into_iter()
        .map(|t| t.join().expect("sender thread"))
        .collect();
    send_signal(replica_pid, "CONT");
    // Answered once every FCALL written before it has run (one connection,
    // in order), including any still queued behind a WAIT when the 503s came.
    send_ok(addr, "window", "s", "after the replica is back");
    let stats = master.redis_cmd(&["INFO", "commandstats"]);
    let fcalls: u64 = stats
        .split("cmdstat_fcall:calls=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no FCALL count in {stats}"));
    let fcalls = fcalls - 1; // the last send's
    assert!(
        fcalls <= 4,
        "12 sends behind a pending WAIT took {fcalls} FCALLs (statuses {statuses:?})"
    );
    assert!(
        statuses.iter().all(|&s| s == 503 || s == 504),
        "no replica confirmed them: 503 or 504 each, got {statuses:?}"
    );
}

/// A cluster has only database 0, a node list is only for a cluster, and a
/// dead seed in the list is skipped.
#[test]
fn cluster_urls_seeds_and_databases() {
    let cluster = Cluster::start_with(3, 0);
    let port = cluster.nodes[1].port;
    let dead_first = format!("redis://127.0.0.1:{},127.0.0.1:{port}", free_port());
    let server = start_server_at(&dead_first, &[]);
    for chat in cluster.chats_on_distinct_masters("seeded", 3) {
        send_ok(server.http_addr(), &chat, "s", "via the second seed");
    }
    let url = format!("{}/2", cluster.url());
    let err = Server::try_start("all", &["--redis", &url], &[])
        .err()
        .expect("db 2 on a cluster must not start");
    assert!(err.contains("database 0"), "{err}");
    let redis = Redis::start_tcp();
    let list = format!("{},127.0.0.1:1", redis.url());
    let err = Server::try_start("all", &["--redis", &list], &[])
        .err()
        .expect("a node list naming a standalone Redis must not start");
    assert!(err.contains("not in cluster mode"), "{err}");
}

/// A master that lost the function library (`FUNCTION FLUSH`) gets it
/// loaded again by the server, and the send that found it missing is
/// stored once.
#[test]
fn flushed_library_is_reloaded_on_that_master() {
    let cluster = Cluster::start_with(3, 0);
    // One thread, so the send after the flush uses the connection that
    // loaded the library before it (a new connection would load it anyway).
    let server = start_server(&cluster, &["--threads", "1"]);
    let addr = server.http_addr();
    let chat = cluster.chats_on_distinct_masters("flushed", 1).remove(0);
    let master = cluster.master_of(cluster.slot_of(&chat));
    send_ok(addr, &chat, "s", "before the flush");
    let flushed = cluster.node(master).cmd(&["FUNCTION", "FLUSH"]);
    assert!(flushed.starts_with("+OK"), "FUNCTION FLUSH: {flushed}");
    send_ok(addr, &chat, "s", "after the flush");
    assert!(
        cluster
            .node(master)
            .cmd(&["FUNCTION", "LIST"])
            .contains("im_send"),
        "library reloaded"
    );
    let texts: Vec<String> = walk(&mut HttpConn::connect(addr), &chat, 100, true, Form::Json)
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["before the flush", "after the flush"]);
}

/// The same check as on standalone Redis: `im_send` reads the chat's
/// tombstones (a key it is not given, in the chat's slot), which a Cluster
/// allows.
#[test]
fn a_deleted_newest_send_time_is_not_given_again() {
    let cluster = Cluster::start_with(3, 0);
    let server = start_server(&cluster, &[]);
    check_a_deleted_newest_send_time_is_not_given_again(
        server.http_addr(),
        "gone",
        |chat, args| {
            let master = cluster.master_of(cluster.slot_of(chat));
            cluster.node(master).cmd(args)
        },
    );
}
