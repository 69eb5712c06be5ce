//! Real `redis-server` processes: a standalone [`Redis`] (unix socket or TCP,
//! optional password and extra arguments) and a [`Cluster`] of them.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

#[derive(Clone, Debug)]
enum RedisEndpoint {
    Unix(PathBuf),
    Tcp(u16),
}

/// A real `redis-server` child process in its own temp dir, without persistence
/// unless `extra` arguments ask for it. The extra arguments are given again on
/// every [`Redis::restart`], in the same directory and on the same socket or
/// port, so a persistent Redis (`--appendonly yes`) replays its data.
/// Dropping it kills the process and removes the directory.
pub struct Redis {
    process: ChildProc,
    dir: TempDir,
    endpoint: RedisEndpoint,
    password: Option<String>,
    extra: Vec<String>,
}

const REDIS_MISSING: &str = "redis-server not found: run `apt-get install -y redis-server` (or the project's .ci/test script, which installs it)";

impl Redis {
    fn new(
        dir: TempDir,
        endpoint: RedisEndpoint,
        password: Option<String>,
        extra: &[&str],
    ) -> Redis {
        Redis {
            process: ChildProc::default(),
            dir,
            endpoint,
            password,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts redis-server listening only on a unix socket in a fresh temp dir.
    pub fn start() -> Redis {
        Redis::start_with_args(&[])
    }

    /// [`Redis::start`] with `extra` appended to the command line; they
    /// override the defaults (`--appendonly no`, `--save ""`), since a later
    /// directive wins. `--dir` is the guard's temp dir unless `extra` sets it.
    pub fn start_with_args(extra: &[&str]) -> Redis {
        let dir = unique_temp_dir("redis");
        let sock = dir.join("redis.sock");
        let mut r = Redis::new(dir, RedisEndpoint::Unix(sock), None, extra);
        r.spawn();
        r
    }

    /// `start_with_args` with AOF persistence (`appendonly yes`,
    /// `appendfsync always`) in the guard's own directory. Not `everysec`:
    /// when a background fsync takes over a second (a busy disk, as in a
    /// parallel test run), Redis postpones writing its AOF buffer for up to
    /// 2 s while still replying, and a SIGKILL then loses acknowledged
    /// writes (seen here: 106 and 1,545 in two runs).
    pub fn start_persistent() -> Redis {
        Redis::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// Starts redis-server on a free TCP port of 127.0.0.1.
    pub fn start_tcp() -> Redis {
        Self::start_tcp_inner("redis-tcp", None, &[], free_port)
            .unwrap_or_else(|e| panic!("could not start redis-server on a TCP port: {e}"))
    }

    /// Like [`Redis::start_tcp`], with `requirepass`.
    pub fn start_tcp_with_password(password: &str) -> Redis {
        Self::start_tcp_inner("redis-tcp", Some(password), &[], free_port)
            .unwrap_or_else(|e| panic!("could not start redis-server on a TCP port: {e}"))
    }

    /// A TCP redis-server on a port from `pick_port`, retried a few times: the
    /// free port may be grabbed by someone else between picking and binding.
    fn start_tcp_inner(
        tag: &str,
        password: Option<&str>,
        extra: &[&str],
        pick_port: fn() -> u16,
    ) -> Result<Redis, String> {
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = pick_port();
            let dir = unique_temp_dir(&format!("{tag}-{port}"));
            let password = password.map(str::to_string);
            let mut r = Redis::new(dir, RedisEndpoint::Tcp(port), password, extra);
            match r.try_spawn() {
                Ok(()) => return Ok(r),
                Err(e) => last_err = e, // dropping `r` cleans up
            }
        }
        Err(last_err)
    }

    /// `unix:///path/redis.sock` or `redis://127.0.0.1:PORT` (with `:password@` if set).
    pub fn url(&self) -> String {
        match &self.endpoint {
            RedisEndpoint::Unix(p) => format!("unix://{}", p.display()),
            RedisEndpoint::Tcp(port) => match &self.password {
                Some(pw) => format!("redis://:{pw}@127.0.0.1:{port}"),
                None => format!("redis://127.0.0.1:{port}"),
            },
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self.endpoint {
            RedisEndpoint::Tcp(p) => Some(p),
            RedisEndpoint::Unix(_) => None,
        }
    }

    /// The redis-server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL (what it has written to the OS, e.g. its AOF, survives; without
    /// persistence all data is lost).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills (if running) and starts redis-server again with the same arguments,
    /// directory and socket / port; returns once it answers PING (after loading
    /// its data, if it persists any).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(!self.is_running(), "redis-server already running");
        let log_path = self.dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        match &self.endpoint {
            RedisEndpoint::Unix(sock) => {
                let _ = std::fs::remove_file(sock);
                cmd.arg("--port").arg("0");
                cmd.arg("--unixsocket").arg(sock);
                cmd.arg("--unixsocketperm").arg("700");
            }
            RedisEndpoint::Tcp(port) => {
                cmd.arg("--port").arg(port.to_string());
                cmd.arg("--bind").arg("127.0.0.1");
            }
        }
        cmd.arg("--save").arg("");
        cmd.arg("--appendonly").arg("no");
        cmd.arg("--daemonize").arg("no");
        cmd.arg("--dir").arg(&self.dir);
        if let Some(pw) = &self.password {
            cmd.arg("--requirepass").arg(pw);
        }
        cmd.args(&self.extra);
        self.process
            .spawn_logged(&mut cmd, &log_path, REDIS_MISSING)?;

        let start = Instant::now();
        loop {
            if let Some(status) = self.process.exited() {
                return Err(format!(
                    "redis-server {:?} exited early ({status}); log:\n{}",
                    self.extra,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            // While it loads its AOF, redis answers -LOADING: keep waiting.
            let last = match self.try_cmd(0, &["PING"]) {
                Ok(reply) if reply.starts_with("+PONG") => return Ok(()),
                Ok(reply) => reply,
                Err(e) => e.to_string(),
            };
            if start.elapsed() > STARTUP_DEADLINE {
                self.kill();
                return Err(format!(
                    "redis-server {:?} did not answer PING within {STARTUP_DEADLINE:?} (last: {last}); log:\n{}",
                    self.extra,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends one command in raw RESP and returns the raw reply text (e.g. ":5\r\n").
    pub fn redis_cmd(&self, args: &[&str]) -> String {
        self.redis_cmd_in(0, args)
    }

    /// Like [`Redis::redis_cmd`], after `SELECT db`.
    pub fn redis_cmd_in(&self, db: u32, args: &[&str]) -> String {
        self.try_cmd(db, args)
            .unwrap_or_else(|e| panic!("redis command {args:?} failed: {e}"))
    }

    /// Runs a command that returns an integer (e.g. ZCARD) and parses it.
    pub fn redis_int(&self, args: &[&str]) -> i64 {
        self.redis_int_in(0, args)
    }

    pub fn redis_int_in(&self, db: u32, args: &[&str]) -> i64 {
        let reply = self.redis_cmd_in(db, args);
        reply
            .strip_prefix(':')
            .and_then(|s| s.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("expected an integer reply to {args:?}, got {reply:?}"))
    }

    /// `ZCARD im:{chat}` (the key layout of the server's redis store).
    pub fn zcard_chat(&self, chat: &str) -> i64 {
        self.redis_int(&["ZCARD", &format!("im:{{{chat}}}")])
    }

    /// All keys (for assertion messages).
    pub fn keys(&self) -> String {
        self.redis_cmd(&["KEYS", "*"])
    }

    fn try_cmd(&self, db: u32, args: &[&str]) -> io::Result<String> {
        let mut preamble: Vec<Vec<&str>> = Vec::new();
        if let Some(pw) = &self.password {
            preamble.push(vec!["AUTH", pw]);
        }
        let db_s = db.to_string();
        if db != 0 {
            preamble.push(vec!["SELECT", &db_s]);
        }
        match &self.endpoint {
            RedisEndpoint::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                resp_exchange(s.try_clone()?, s, &preamble, args)
            }
            RedisEndpoint::Tcp(port) => {
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                resp_exchange(s.try_clone()?, s, &preamble, args)
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Then `dir` is dropped: the directory goes once the process has.
        self.kill();
    }
}

fn resp_encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn resp_exchange<R: Read, W: Write>(
    r: R,
    mut w: W,
    preamble: &[Vec<&str>],
    args: &[&str],
) -> io::Result<String> {
    let mut req = Vec::new();
    for p in preamble {
        req.extend(resp_encode(p));
    }
    req.extend(resp_encode(args));
    w.write_all(&req)?;
    let mut r = BufReader::new(r);
    for p in preamble {
        let mut reply = String::new();
        read_resp(&mut r, &mut reply)?;
        if reply.starts_with('-') {
            return Err(io::Error::other(format!("{p:?} -> {reply}")));
        }
    }
    let mut reply = String::new();
    read_resp(&mut r, &mut reply)?;
    Ok(reply)
}

fn read_resp(r: &mut impl BufRead, out: &mut String) -> io::Result<()> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "redis closed the connection",
        ));
    }
    out.push_str(&line);
    let bad = || io::Error::new(ErrorKind::InvalidData, format!("bad RESP line {line:?}"));
    let n = || -> io::Result<i64> { line[1..].trim_end().parse().map_err(|_| bad()) };
    match line.as_bytes().first() {
        Some(b'+' | b'-' | b':') => Ok(()),
        Some(b'$') => {
            let n = n()?;
            if n >= 0 {
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf)?;
                out.push_str(&String::from_utf8_lossy(&buf));
            }
            Ok(())
        }
        Some(b'*') => {
            for _ in 0..n()?.max(0) {
                read_resp(r, out)?;
            }
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// One `redis-server --cluster-enabled yes` node of a [`Cluster`]: a TCP
/// [`Redis`] with the cluster arguments.
pub struct ClusterNode {
    pub port: u16,
    redis: Redis,
}

const CLUSTER_NODE_ARGS: &[&str] = &[
    "--cluster-enabled",
    "yes",
    // in the node's --dir
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "1000",
    "--cluster-require-full-coverage",
    "no",
    // A replica's first sync starts at once, not after the default 5 s.
    "--repl-diskless-sync-delay",
    "0",
];

impl ClusterNode {
    /// A new node on a [`free_cluster_port`], not yet part of any cluster.
    fn spawn() -> ClusterNode {
        let redis = Redis::start_tcp_inner("cluster", None, CLUSTER_NODE_ARGS, free_cluster_port)
            .unwrap_or_else(|e| panic!("could not start a cluster node: {e}"));
        let port = redis.port().expect("a cluster node listens on TCP");
        ClusterNode { port, redis }
    }

    pub fn pid(&self) -> Option<u32> {
        self.redis.pid()
    }

    pub fn is_running(&self) -> bool {
        self.redis.is_running()
    }

    /// Sends one command; the raw RESP reply text (arrays flattened).
    pub fn try_cmd(&self, args: &[&str]) -> io::Result<String> {
        self.redis.try_cmd(0, args)
    }

    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("node {}: {args:?} failed: {e}", self.port))
    }

    /// SIGKILL (no persistence: its data is gone).
    pub fn kill(&mut self) {
        self.redis.kill();
    }

    pub fn signal(&self, sig: &str) {
        self.redis.process.signal(sig);
    }

    /// `(id, port, is_master, master id or "-")` of every node, per this node.
    pub fn nodes(&self) -> Vec<(String, u16, bool, String)> {
        let text = self.cmd(&["CLUSTER", "NODES"]);
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                if f.len() < 8 {
                    return None;
                }
                let port = f[1].split(['@', ':']).nth(1)?.parse().ok()?;
                Some((
                    f[0].to_string(),
                    port,
                    f[2].contains("master"),
                    f[3].to_string(),
                ))
            })
            .collect()
    }

    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let text = self.try_cmd(&["INFO", section]).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
    }
}

impl Drop for ClusterNode {
    /// A stopped node (`signal("STOP")`) is resumed first, so that it dies
    /// at once and the next test does not see it hold its port.
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // not send_signal: a failure must not panic inside a drop
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

static CLUSTER_PORT_TURN: AtomicUsize = AtomicUsize::new(0);

/// A port P in 20000..45000 with P and its cluster bus port P + 10000 free
/// (the bus makes port 0 impossible).
pub fn free_cluster_port() -> u16 {
    let base = (std::process::id() as usize).wrapping_mul(7919);
    for _ in 0..25_000 {
        let turn = CLUSTER_PORT_TURN.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + ((base + turn * 7) % 25_000) as u16;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// A real Redis Cluster on 127.0.0.1: `masters` masters with `replicas`
/// replicas each, node timeout 1 s, full coverage not required. Every node
/// is killed on drop.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    replicas: usize,
}

impl Cluster {
    /// 3 masters + 3 replicas.
    pub fn start() -> Cluster {
        Cluster::start_with(3, 1)
    }

    pub fn start_with(masters: usize, replicas: usize) -> Cluster {
        let count = masters * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        while nodes.len() < count {
            nodes.push(ClusterNode::spawn());
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = create
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes, replicas };
        cluster.wait_ready(Duration::from_secs(30));
        if replicas > 0 {
            cluster.wait_streaming(Duration::from_secs(10));
        }
        cluster
    }

    /// Waits until every master streams its writes to its replicas. After a
    /// diskless sync a master sends a replica its command stream only from
    /// the replica's first ACK, up to 1 s after it lists it `online`: a
    /// master frozen or killed before that loses everything acknowledged
    /// meanwhile. Seen in a CI run (2026-12-08): a replica at acknowledged
    /// offset 0 behind its master at 103,005 when a test froze the master,
    /// and every send of the test's chat lost with the failover. So: one
    /// write to each master (key `ready:{...}`, outside the server's `im:`
    /// keys), then its replicas' acknowledged offsets at or past it.
    pub fn wait_streaming(&self, deadline: Duration) {
        for master in self.masters() {
            let tag = (0..10_000)
                .map(|i| format!("ready-{i}"))
                .find(|tag| self.master_of(self.slot_of(tag)) == master)
                .expect("a key in every master's slots");
            let node = self.node(master);
            node.cmd(&["SET", &format!("ready:{{{tag}}}"), "1"]);
            let written: u64 = node
                .info_field("replication", "master_repl_offset")
                .and_then(|o| o.parse().ok())
                .expect("master_repl_offset");
            wait_until(deadline, "every replica to acknowledge a write", || {
                let info = node.try_cmd(&["INFO", "replication"]).unwrap_or_default();
                let acked: Vec<u64> = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("offset="))
                    .filter_map(|l| {
                        l.split(',')
                            .find_map(|f| f.strip_prefix("offset="))
                            .and_then(|o| o.trim().parse().ok())
                    })
                    .collect();
                (acked.len() >= self.replicas && acked.iter().all(|&o| o >= written)).then_some(())
            });
        }
    }

    /// Every running node says `cluster_state:ok`, every master has a
    /// replica, and every replica's link to its master is up (synced).
    pub fn wait_ready(&self, deadline: Duration) {
        wait_until(deadline, "the cluster to be ready", || {
            let running: Vec<&ClusterNode> = self.nodes.iter().filter(|n| n.is_running()).collect();
            let all_ok = running.iter().all(|n| {
                n.try_cmd(&["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            let masters = self.masters();
            let replicated = masters
                .iter()
                .all(|&m| self.replicas == 0 || self.replica_of(m).is_some());
            // A replica whose initial sync is not done can neither
            // acknowledge a WAIT nor be promoted. And after a diskless sync
            // the master streams to it only from its first ACK (up to 1 s
            // later): a master killed before that loses everything it
            // acknowledged meanwhile. So: every replica online, per its master.
            let synced = running.iter().all(|n| {
                n.info_field("replication", "role").as_deref() != Some("slave")
                    || n.info_field("replication", "master_link_status").as_deref() == Some("up")
            }) && masters.iter().all(|&m| {
                let info = self
                    .node(m)
                    .try_cmd(&["INFO", "replication"])
                    .unwrap_or_default();
                info.matches("state=online").count() >= self.replicas
            });
            (all_ok && !masters.is_empty() && replicated && synced).then_some(())
        });
    }

    pub fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node {port}"))
    }

    pub fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node {port}"))
    }

    /// A running node that answers (SIGSTOPped ones are skipped by the caller).
    fn any(&self) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.is_running() && n.try_cmd(&["PING"]).is_ok())
            .expect("no cluster node answers")
    }

    /// `redis://127.0.0.1:P` of the first node.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    /// `redis://127.0.0.1:P1,127.0.0.1:P2,...` of every node.
    pub fn seed_url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis://{}", nodes.join(","))
    }

    /// Ports of the masters serving slots, as a live node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let node = self.any();
        let text = node.cmd(&["CLUSTER", "NODES"]);
        let mut out: Vec<u16> = text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                let serving = f.len() > 8;
                let master = f.get(2)?.contains("master") && !f.get(2)?.contains("fail");
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                (master && serving).then_some(port)
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The port of a (healthy) replica of the master on `master`.
    pub fn replica_of(&self, master: u16) -> Option<u16> {
        let nodes = self.any().nodes();
        let id = nodes.iter().find(|n| n.1 == master)?.0.clone();
        nodes
            .iter()
            .find(|n| {
                !n.2 && n.3 == id && self.nodes.iter().any(|m| m.port == n.1 && m.is_running())
            })
            .map(|n| n.1)
    }

    /// The hash slot of chat `chat`'s key.
    pub fn slot_of(&self, chat: &str) -> u16 {
        let reply = self
            .any()
            .cmd(&["CLUSTER", "KEYSLOT", &format!("im:{{{chat}}}")]);
        reply[1..].trim().parse().expect("a slot number")
    }

    /// The port of the master serving `slot`, per a live node's CLUSTER NODES.
    pub fn master_of(&self, slot: u16) -> u16 {
        let text = self.any().cmd(&["CLUSTER", "NODES"]);
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            let serves = f[8..].iter().any(|range| {
                let mut ends = range.split('-');
                match (
                    ends.next().and_then(|a| a.parse::<u16>().ok()),
                    ends.next().map(|b| b.parse::<u16>().ok()),
                ) {
                    (Some(a), None) => a == slot,
                    (Some(a), Some(Some(b))) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                return f[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("port");
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// `count` chat names, each in a different slot served by a different
    /// master (as many masters as there are, at most), named `prefix-N`.
    pub fn chats_on_distinct_masters(&self, prefix: &str, count: usize) -> Vec<String> {
        let mut chats = Vec::new();
        let mut used = HashSet::new();
        for i in 0..10_000 {
            let chat = format!("{prefix}-{i}");
            let master = self.master_of(self.slot_of(&chat));
            if used.insert(master) {
                chats.push(chat);
            }
            if chats.len() == count {
                break;
            }
        }
        chats
    }

    /// `cmdstat_fcall` calls summed over the given nodes.
    pub fn fcall_calls(&self, ports: &[u16]) -> i64 {
        ports
            .iter()
            .map(|&p| {
                self.node(p)
                    .info_field("commandstats", "cmdstat_fcall")
                    .and_then(|v| v.strip_prefix("calls=")?.split(',').next()?.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// How many times `error` (e.g. "CROSSSLOT") was returned, over every running node.
    pub fn error_count(&self, error: &str) -> i64 {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| {
                n.info_field("errorstats", &format!("errorstat_{error}"))
                    .and_then(|v| v.strip_prefix("count=")?.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Starts an empty node and joins it to the cluster (`CLUSTER MEET`) as a
    /// master without slots; returns its port once every node knows it and
    /// it knows who serves every slot.
    pub fn add_empty_master(&mut self) -> u16 {
        let node = ClusterNode::spawn();
        let port = node.port;
        let meet = self
            .any()
            .cmd(&["CLUSTER", "MEET", "127.0.0.1", &port.to_string()]);
        assert!(meet.starts_with("+OK"), "CLUSTER MEET: {meet}");
        self.nodes.push(node);
        let total = self.nodes.iter().filter(|n| n.is_running()).count();
        wait_until(Duration::from_secs(20), "the new node to join", || {
            self.nodes
                .iter()
                .filter(|n| n.is_running())
                .all(|n| {
                    n.try_cmd(&["CLUSTER", "INFO"]).is_ok_and(|info| {
                        info.contains(&format!("cluster_known_nodes:{total}\r\n"))
                            && info.contains("cluster_state:ok")
                            && info.contains("cluster_slots_assigned:16384")
                    })
                })
                .then_some(())
        });
        port
    }

    /// The id of the node on `port`.
    pub fn id_of(&self, port: u16) -> String {
        self.node(port)
            .cmd(&["CLUSTER", "MYID"])
            .lines()
            .nth(1)
            .expect("an id")
            .to_string()
    }
}

/// A message as `im_send` takes it (an argument of `FCALL im_send`): a
/// StoredMessage without send_time, text (field 2) then sender (field 3).
/// The send_times in a raw reply of `im_send` or `im_send_stamped` (its
/// integers, in order).
pub fn send_times_in(reply: &str) -> Vec<i64> {
    reply
        .split("\r\n")
        .filter_map(|l| l.strip_prefix(':'))
        .map(|t| t.parse().expect("a send_time"))
        .collect()
}

pub fn im_send_member(text: &str, sender: &str) -> String {
    assert!(
        text.len() < 128 && sender.len() < 128,
        "one-byte lengths only"
    );
    format!(
        "\x12{}{text}\x1a{}{sender}",
        char::from(text.len() as u8),
        char::from(sender.len() as u8)
    )
}

/// Messages stored ahead of this server's clock (by an RPC server whose
/// clock runs ahead: `fcall` runs a command on the named chat's Redis) and then
/// deleted while they are the chat's newest: the next message must still
/// get a later send_time, because a client that saw a deleted one holds its
/// send_time as its cursor (issue 21). `im_send` reads only the newest
/// member still stored, so `im_delete` leaves the deleted send_time on the
/// member that becomes the newest (or the chat's tombstones hold it, once
/// the chat is empty). Checked: one delete, an edit of the new newest
/// message in between (it keeps what it carries), two deletes in a row,
/// and a chat emptied by its delete.
pub fn check_a_deleted_newest_send_time_is_not_given_again(
    addr: SocketAddr,
    chat: &str,
    fcall: impl Fn(&str, &[&str]) -> String,
) {
    let key = format!("im:{{{chat}}}");
    let store_at = |clock: i64, texts: &[&str]| -> Vec<i64> {
        let members: Vec<String> = texts.iter().map(|t| im_send_member(t, "s")).collect();
        let count = texts.len().to_string();
        let clock = clock.to_string();
        let mut args = vec!["FCALL", "im_send", &count];
        args.extend(texts.iter().map(|_| key.as_str()));
        args.extend(members.iter().map(String::as_str));
        args.push(&clock);
        send_times_in(&fcall(chat, &args))
    };
    let delete_in = |chat: &str, send_time: i64| {
        let body = serde_json::json!({"chat": chat, "send_time": send_time});
        let r = post_json(addr, "/api/delete", body);
        assert_eq!(r.status, 200, "delete {send_time}: {}", r.describe());
    };
    // `reverse=true`: oldest first, after the cursor, as a follower pulls.
    let after = |cursor: i64| -> Vec<String> {
        let page = pull_page(addr, chat, cursor, 10, true);
        page.texts().iter().map(|t| t.to_string()).collect()
    };
    let first = send_ok(addr, chat, "s", "first");
    let ahead = store_at(first + 1_000_000, &["ahead"])[0];
    assert_eq!(ahead, first + 1_000_000, "stored ahead");
    assert_eq!(after(first), ["ahead"], "a follower sees it");
    delete_in(chat, ahead);
    let body = serde_json::json!({"chat": chat, "send_time": first, "text": "first, edited"});
    let r = post_json(addr, "/api/edit", body);
    assert_eq!(r.status, 200, "edit: {}", r.describe());
    let next = send_ok(addr, chat, "s", "next");
    assert!(
        next > ahead,
        "the next send_time ({next}) must be after the deleted one's ({ahead})"
    );
    assert_eq!(after(ahead), ["next"], "the follower at the deleted one");
    let two = store_at(next + 2_000_000, &["ahead 2", "ahead 3"]);
    assert_eq!(two.len(), 2, "{two:?}");
    delete_in(chat, two[1]);
    delete_in(chat, two[0]);
    let last = send_ok(addr, chat, "s", "last");
    assert!(last > two[1], "after two deletes: {last} after {}", two[1]);
    assert_eq!(after(two[0]), ["last"], "the follower at the first deleted");
    assert_eq!(
        pull_page(addr, chat, 0, 10, true).texts(),
        ["first, edited", "next", "last"],
        "what is left, as it was written"
    );
    // A chat emptied by deletes: its tombstones hold the newest deleted
    // send_time. (The first send loads the library on the chat's master.)
    let alone = format!("{chat}-alone");
    delete_in(&alone, send_ok(addr, &alone, "s", "warm"));
    let key = format!("im:{{{alone}}}");
    let member = im_send_member("only", "s");
    let clock = (last + 1_000_000).to_string();
    let reply = fcall(&alone, &["FCALL", "im_send", "1", &key, &member, &clock]);
    assert_eq!(reply, format!("*1\r\n:{clock}\r\n"), "stored ahead, alone");
    delete_in(&alone, last + 1_000_000);
    let again = send_ok(addr, &alone, "s", "again");
    assert!(
        again > last + 1_000_000,
        "an emptied chat: {again} after {clock}"
    );
}
