//! Shared helpers for the integration tests: a real `redis-server` guard, an
//! `im-server` process guard, and a tiny blocking HTTP/1.1 client built on
//! `std::net::TcpStream` (no extra crates).

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// How long to wait for a child process (im-server, redis-server) to come up.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// Read/write timeout of the HTTP client: a hung server fails the test instead of blocking it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// misc
// ---------------------------------------------------------------------------

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// Microseconds since the Unix epoch, from the test's own clock.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_micros() as i64
}

/// A fresh, empty directory under the system temp dir (pid + counter + nanos).
pub fn unique_temp_dir(tag: &str) -> PathBuf {
    let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("im-test-{tag}-{}-{n}-{nanos}", std::process::id());
    let mut base = std::env::temp_dir();
    // Unix socket paths are limited to ~108 bytes; fall back to /tmp if TMPDIR is long.
    if base.join(&name).join("redis.sock").as_os_str().len() > 100 {
        base = PathBuf::from("/tmp");
    }
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Picks a currently free TCP port on 127.0.0.1 (bind to port 0, then release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Redis guard
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum RedisEndpoint {
    Unix(PathBuf),
    Tcp(u16),
}

/// A real `redis-server` child process in its own temp dir, without persistence.
/// Dropping it kills the process and removes the directory.
pub struct Redis {
    child: Option<Child>,
    dir: PathBuf,
    endpoint: RedisEndpoint,
    password: Option<String>,
}

const REDIS_MISSING: &str = "redis-server not found: run `apt-get install -y redis-server` (or the project's .ci/test script, which installs it)";

impl Redis {
    /// Starts redis-server listening only on a unix socket in a fresh temp dir.
    pub fn start() -> Redis {
        let dir = unique_temp_dir("redis");
        let sock = dir.join("redis.sock");
        let mut r = Redis {
            child: None,
            dir,
            endpoint: RedisEndpoint::Unix(sock),
            password: None,
        };
        r.spawn();
        r
    }

    /// Starts redis-server on a free TCP port of 127.0.0.1.
    pub fn start_tcp() -> Redis {
        Self::start_tcp_inner(None)
    }

    /// Like [`Redis::start_tcp`], with `requirepass`.
    pub fn start_tcp_with_password(password: &str) -> Redis {
        Self::start_tcp_inner(Some(password.to_string()))
    }

    fn start_tcp_inner(password: Option<String>) -> Redis {
        let mut last_err = String::new();
        // The free port may be grabbed by someone else between picking and binding: retry.
        for _ in 0..5 {
            let mut r = Redis {
                child: None,
                dir: unique_temp_dir("redis-tcp"),
                endpoint: RedisEndpoint::Tcp(free_port()),
                password: password.clone(),
            };
            match r.try_spawn() {
                Ok(()) => return r,
                Err(e) => last_err = e, // dropping `r` cleans up
            }
        }
        panic!("could not start redis-server on a TCP port: {last_err}");
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

    pub fn socket_path(&self) -> Option<&Path> {
        match &self.endpoint {
            RedisEndpoint::Unix(p) => Some(p),
            RedisEndpoint::Tcp(_) => None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL (no persistence: all data is lost).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh (empty) redis-server on the same socket path / port.
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
        assert!(self.child.is_none(), "redis-server already running");
        let log_path = self.dir.join("redis.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
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
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!("{REDIS_MISSING}"),
            Err(e) => return Err(format!("spawn redis-server: {e}")),
        };
        self.child = Some(child);

        let start = Instant::now();
        let mut last: String;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server exited early ({status}); log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            match self.try_cmd(0, &["PING"]) {
                Ok(reply) if reply.starts_with("+PONG") => return Ok(()),
                Ok(reply) => last = reply,
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > STARTUP_DEADLINE {
                self.kill();
                return Err(format!(
                    "redis-server did not answer PING within {STARTUP_DEADLINE:?} (last: {last}); log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(20));
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
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
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

// ---------------------------------------------------------------------------
// im-server guard
// ---------------------------------------------------------------------------

/// A running `im-server` child process. Dropping it kills the process.
pub struct Server {
    child: Option<Child>,
    http: Option<SocketAddr>,
    rpc: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    role: String,
}

const SERVER_ENV_VARS: &[&str] = &[
    "IM_HTTP_ADDR",
    "IM_RPC_LISTEN",
    "IM_RPC_ADDR",
    "REDIS_URL",
    "IM_RPC_TIMEOUT_MS",
];

impl Server {
    /// `im-server` (role `all`) with the embedded memory store.
    pub fn memory() -> Server {
        Server::start("all", &[], &[])
    }

    /// `im-server` (role `all`) backed by the given redis.
    pub fn with_redis(redis: &Redis) -> Server {
        let url = redis.url();
        Server::start("all", &["--redis", &url], &[])
    }

    /// A standalone rpc server (`im-server rpc`) on a port chosen by the OS.
    pub fn rpc(args: &[&str]) -> Server {
        Server::start("rpc", args, &[])
    }

    /// A standalone gateway (`im-server gateway --rpc ADDR`).
    pub fn gateway(rpc: SocketAddr, args: &[&str]) -> Server {
        let rpc = rpc.to_string();
        let mut all = vec!["--rpc", rpc.as_str()];
        all.extend_from_slice(args);
        Server::start("gateway", &all, &[])
    }

    /// Spawns the binary and waits for its listening line(s); panics (with the
    /// collected stderr) if they don't appear within 10 s.
    ///
    /// `role` may be "" (no role argument: default `all`). Unless the listen
    /// addresses are given in `args` or `envs`, `--http-addr 127.0.0.1:0` and/or
    /// `--rpc-listen 127.0.0.1:0` are added (only the ones relevant to the role).
    pub fn start(role: &str, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::try_start(role, args, envs).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(role: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Server, String> {
        let wants_http = role != "rpc";
        let wants_rpc = role != "gateway";
        let has = |flag: &str, env: &str| {
            args.iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
                || envs.iter().any(|(k, _)| *k == env)
        };

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_im-server"));
        if !role.is_empty() {
            cmd.arg(role);
        }
        cmd.args(args);
        if wants_http && !has("--http-addr", "IM_HTTP_ADDR") {
            cmd.args(["--http-addr", "127.0.0.1:0"]);
        }
        if wants_rpc && !has("--rpc-listen", "IM_RPC_LISTEN") {
            cmd.args(["--rpc-listen", "127.0.0.1:0"]);
        }
        for v in SERVER_ENV_VARS {
            cmd.env_remove(v);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let cmdline = format!("{cmd:?}");
        let mut child = cmd.spawn().map_err(|e| format!("spawn {cmdline}: {e}"))?;

        // Drain stderr forever in a thread (so the child never blocks on a full pipe),
        // forwarding lines to us until we stop listening.
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let log = log.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).into_owned();
                            log.lock().unwrap().push_str(&line);
                            let _ = tx.send(line);
                        }
                    }
                }
            });
        }

        let mut http = None;
        let mut rpc = None;
        let deadline = Instant::now() + STARTUP_DEADLINE;
        while (wants_http && http.is_none()) || (wants_rpc && rpc.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let line = line.trim_end_matches(['\r', '\n']);
                    if let Some((head, addr)) = line.rsplit_once(' ') {
                        if head.ends_with("http listening on") {
                            http = addr.parse::<SocketAddr>().ok();
                        } else if head.ends_with("rpc listening on") {
                            rpc = addr.parse::<SocketAddr>().ok();
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    // give the reader thread a moment to finish appending
                    thread::sleep(Duration::from_millis(50));
                    return Err(format!(
                        "im-server exited ({status}) before printing its listening line(s)\ncommand: {cmdline}\nstderr:\n{}",
                        log.lock().unwrap()
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "im-server did not print its listening line(s) within {STARTUP_DEADLINE:?} \
                         (wanted http={wants_http} rpc={wants_rpc}, got http={http:?} rpc={rpc:?})\n\
                         command: {cmdline}\nstderr:\n{}",
                        log.lock().unwrap()
                    ));
                }
            }
        }
        Ok(Server {
            child: Some(child),
            http,
            rpc,
            log,
            role: role.to_string(),
        })
    }

    /// The gateway's HTTP address (panics for the `rpc` role).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .unwrap_or_else(|| panic!("server role {:?} has no http address", self.role))
    }

    /// The rpc server's address (panics for the `gateway` role).
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc
            .unwrap_or_else(|| panic!("server role {:?} has no rpc address", self.role))
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL + wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let log = self.log.lock().unwrap();
            let tail: String = {
                let start = log.len().saturating_sub(4000);
                let mut s = start;
                while !log.is_char_boundary(s) {
                    s += 1;
                }
                log[s..].to_string()
            };
            eprintln!(
                "--- im-server ({}) stderr (tail) ---\n{tail}\n--- end ---",
                self.role
            );
        }
    }
}

/// A server plus (for the redis backend) its own redis-server. Field order matters:
/// the server is dropped (killed) before redis.
pub struct Backend {
    pub server: Server,
    pub redis: Option<Redis>,
    pub cluster: Option<Cluster>,
}

impl Backend {
    pub fn memory() -> Backend {
        Backend {
            server: Server::memory(),
            redis: None,
            cluster: None,
        }
    }

    pub fn redis() -> Backend {
        let redis = Redis::start();
        Backend {
            server: Server::with_redis(&redis),
            redis: Some(redis),
            cluster: None,
        }
    }

    /// A server on a Redis Cluster of 3 masters and 3 replicas, given one node's URL.
    pub fn cluster() -> Backend {
        Backend::cluster_with(&[])
    }

    /// [`Backend::cluster`] with extra `im-server` arguments.
    pub fn cluster_with(args: &[&str]) -> Backend {
        let cluster = Cluster::start();
        let url = cluster.url();
        let mut all = vec!["--redis", url.as_str()];
        all.extend_from_slice(args);
        let server = Server::start("all", &all, &[]);
        assert!(
            server.stderr().contains("store: Redis Cluster"),
            "the server did not detect the cluster:\n{}",
            server.stderr()
        );
        Backend {
            server,
            redis: None,
            cluster: Some(cluster),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.http_addr()
    }

    /// [`Backend::memory`] with extra `im-server` arguments.
    pub fn memory_with(args: &[&str]) -> Backend {
        Backend {
            server: Server::start("all", args, &[]),
            redis: None,
            cluster: None,
        }
    }

    /// [`Backend::redis`] with extra `im-server` arguments.
    pub fn redis_with(args: &[&str]) -> Backend {
        let redis = Redis::start();
        let url = redis.url();
        let mut all = vec!["--redis", url.as_str()];
        all.extend_from_slice(args);
        Backend {
            server: Server::start("all", &all, &[]),
            redis: Some(redis),
            cluster: None,
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Header names are lowercased; order preserved.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Short description for assertion messages.
    pub fn describe(&self) -> String {
        let mut t = self.text();
        if t.len() > 600 {
            let mut cut = 600;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t.push_str("...");
        }
        format!("HTTP {} {} body={t}", self.status, self.reason)
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.describe()))
    }
}

/// Serializes a request. `Host` and `Content-Length` are added unless present in
/// `headers`; `Content-Length` is added when there is a body or the method is POST.
pub fn format_request(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("content-length") && (!body.is_empty() || method == "POST") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads one response. `head` = the request was HEAD (no body follows).
/// Interim 1xx responses are skipped.
pub fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Response> {
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed before a response arrived",
            ));
        }
        let status_line = String::from_utf8_lossy(&line).trim_end().to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_string();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            ));
        }
        let reason = parts.next().unwrap_or("").to_string();

        let mut headers = Vec::new();
        loop {
            let mut h = Vec::new();
            if r.read_until(b'\n', &mut h)? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "EOF inside headers",
                ));
            }
            let h = String::from_utf8_lossy(&h)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').ok_or_else(|| {
                io::Error::new(ErrorKind::InvalidData, format!("bad header line {h:?}"))
            })?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let mut resp = Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 {
            return Ok(resp);
        }
        if let Some(cl) = resp.header("content-length") {
            let n: usize = cl.parse().map_err(|_| {
                io::Error::new(ErrorKind::InvalidData, format!("bad content-length {cl:?}"))
            })?;
            resp.body = vec![0u8; n];
            r.read_exact(&mut resp.body)?;
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            resp.body = read_chunked(r)?;
        } else {
            r.read_to_end(&mut resp.body)?;
        }
        return Ok(resp);
    }
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size_s = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_s, 16).map_err(|_| {
            io::Error::new(ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
        })?;
        if size == 0 {
            // trailers
            loop {
                let mut t = String::new();
                if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk)?;
        chunk.truncate(size);
        body.extend(chunk);
    }
}

/// A persistent HTTP/1.1 connection (keep-alive, pipelining, raw bytes).
pub struct HttpConn {
    addr: SocketAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        Self::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<HttpConn> {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            addr,
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// A second handle to the socket (e.g. to write a large body from another thread).
    pub fn clone_stream(&self) -> TcpStream {
        self.writer.try_clone().expect("clone TcpStream")
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.writer.set_read_timeout(Some(t)).unwrap();
    }

    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.addr));
    }

    pub fn try_write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    pub fn write_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) {
        let req = format_request(&self.addr.to_string(), method, path, headers, body);
        self.write_raw(&req);
    }

    pub fn read_response(&mut self) -> Response {
        self.try_read_response()
            .unwrap_or_else(|e| panic!("reading response from {}: {e}", self.addr))
    }

    pub fn try_read_response(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader, false)
    }

    /// Reads the response to a HEAD request (headers only).
    pub fn read_head_response(&mut self) -> Response {
        read_response(&mut self.reader, true)
            .unwrap_or_else(|e| panic!("reading HEAD response from {}: {e}", self.addr))
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} to {}: {e}", self.addr))
    }

    pub fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let req = format_request(&self.addr.to_string(), method, path, headers, body);
        self.writer.write_all(&req)?;
        read_response(&mut self.reader, method == "HEAD")
    }

    pub fn send(&mut self, chat: &str, sender: &str, text: &str) -> Response {
        let body = json!({"chat": chat, "text": text, "sender": sender}).to_string();
        self.request("POST", "/api/send", JSON_CT, body.as_bytes())
    }

    /// Sends and asserts 200; returns `send_time`.
    pub fn send_ok(&mut self, chat: &str, sender: &str, text: &str) -> i64 {
        let r = self.send(chat, sender, text);
        send_time_of(&r, &format!("send chat={chat:?} sender={sender:?}"))
    }

    pub fn pull_json(&mut self, params: &Value) -> Response {
        self.request("GET", "/api/pull", JSON_CT, params.to_string().as_bytes())
    }

    pub fn pull_query(&mut self, query: &str) -> Response {
        self.request("GET", &format!("/api/pull?{query}"), &[], b"")
    }

    /// Asserts the server closes the connection (EOF or reset) within 3 s and sends
    /// nothing more.
    pub fn assert_closed(&mut self, ctx: &str) {
        self.set_read_timeout(Duration::from_secs(3));
        let mut buf = [0u8; 256];
        match self.reader.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{ctx}: expected the server to close the connection, got {n} more bytes: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "{ctx}: expected the server to close the connection, but it is still open after 3 s"
                )
            }
            Err(e) => panic!("{ctx}: unexpected error while waiting for close: {e}"),
        }
    }
}

pub const JSON_CT: &[(&str, &str)] = &[("Content-Type", "application/json")];

/// One request on a fresh connection (panics on I/O errors or timeouts).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    HttpConn::connect(addr).request(method, path, headers, body)
}

/// One request on a fresh connection; I/O errors (including the 5 s read timeout) are returned.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    HttpConn::try_connect(addr)?.try_request(method, path, headers, body)
}

/// Writes raw bytes on a fresh connection and reads one response.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut c = HttpConn::connect(addr);
    c.write_raw(bytes);
    c.read_response()
}

pub fn send(addr: SocketAddr, chat: &str, sender: &str, text: &str) -> Response {
    HttpConn::connect(addr).send(chat, sender, text)
}

pub fn send_ok(addr: SocketAddr, chat: &str, sender: &str, text: &str) -> i64 {
    HttpConn::connect(addr).send_ok(chat, sender, text)
}

/// POST /api/send with an arbitrary raw body.
pub fn send_raw_body(addr: SocketAddr, body: &[u8]) -> Response {
    request(addr, "POST", "/api/send", JSON_CT, body)
}

/// GET /api/pull with the parameters as a JSON body.
pub fn pull_json(addr: SocketAddr, params: Value) -> Response {
    HttpConn::connect(addr).pull_json(&params)
}

/// GET /api/pull?{query}
pub fn pull_query(addr: SocketAddr, query: &str) -> Response {
    HttpConn::connect(addr).pull_query(query)
}

/// GET /api/pull with an arbitrary raw body.
pub fn pull_raw_body(addr: SocketAddr, body: &[u8]) -> Response {
    request(addr, "GET", "/api/pull", JSON_CT, body)
}

/// Asserts a 200 `{"send_time": i64}` and returns the send_time.
pub fn send_time_of(r: &Response, ctx: &str) -> i64 {
    assert_eq!(r.status, 200, "{ctx}: expected 200, got {}", r.describe());
    let v = r.json();
    v.get("send_time")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{ctx}: no integer send_time in {}", r.describe()))
}

/// Asserts `status` and the error body shape `{"error":{"code":"...","message":"..."}}`.
pub fn assert_error(r: &Response, status: u16, ctx: &str) {
    assert_eq!(
        r.status,
        status,
        "{ctx}: expected {status}, got {}",
        r.describe()
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{ctx}: error body is not JSON ({e}): {}", r.describe()));
    let err = v
        .get("error")
        .unwrap_or_else(|| panic!("{ctx}: no \"error\" object in {}", r.describe()));
    assert!(
        err.get("code").is_some_and(Value::is_string),
        "{ctx}: error.code must be a string: {}",
        r.describe()
    );
    assert!(
        err.get("message").is_some_and(Value::is_string),
        "{ctx}: error.message must be a string: {}",
        r.describe()
    );
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub chat: String,
    pub text: String,
    pub sender: String,
    pub send_time: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub messages: Vec<Msg>,
    pub has_more: bool,
    pub next_cursor: i64,
}

impl Page {
    pub fn times(&self) -> Vec<i64> {
        self.messages.iter().map(|m| m.send_time).collect()
    }
    pub fn texts(&self) -> Vec<&str> {
        self.messages.iter().map(|m| m.text.as_str()).collect()
    }
}

/// Asserts 200 and parses a pull response, checking every field's JSON type.
pub fn parse_page(r: &Response, ctx: &str) -> Page {
    assert_eq!(r.status, 200, "{ctx}: expected 200, got {}", r.describe());
    let v = r.json();
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{ctx}: no messages array in {}", r.describe()));
    let messages = msgs
        .iter()
        .map(|m| {
            let s = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| {
                        panic!("{ctx}: message field {k:?} missing or not a string in {m}")
                    })
                    .to_string()
            };
            Msg {
                chat: s("chat"),
                text: s("text"),
                sender: s("sender"),
                send_time: m
                    .get("send_time")
                    .and_then(Value::as_i64)
                    .unwrap_or_else(|| {
                        panic!("{ctx}: message send_time missing or not an integer in {m}")
                    }),
            }
        })
        .collect();
    Page {
        messages,
        has_more: v
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| panic!("{ctx}: has_more missing or not a bool in {}", r.describe())),
        next_cursor: v
            .get("next_cursor")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| {
                panic!(
                    "{ctx}: next_cursor missing or not an integer in {}",
                    r.describe()
                )
            }),
    }
}

/// Pulls one page with JSON-body parameters and parses it.
pub fn pull_page(addr: SocketAddr, chat: &str, cursor: i64, limit: i64, reverse: bool) -> Page {
    let params = json!({"chat": chat, "cursor": cursor, "limit": limit, "reverse": reverse});
    let r = pull_json(addr, params.clone());
    parse_page(&r, &format!("pull {params}"))
}

/// Which way to pass pull parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Json,
    Query,
}

/// Walks a chat page by page following `next_cursor`, asserting the page
/// invariants on the way (page size, order, `next_cursor`), and returns all
/// messages in walk order.
pub fn walk(conn: &mut HttpConn, chat: &str, limit: i64, reverse: bool, form: Form) -> Vec<Msg> {
    let mut out: Vec<Msg> = Vec::new();
    let mut cursor = 0i64;
    for page_no in 0.. {
        assert!(page_no < 100_000, "walk of {chat:?} did not terminate");
        let (r, ctx) = match form {
            Form::Json => {
                let p = json!({"chat": chat, "cursor": cursor, "limit": limit, "reverse": reverse});
                (conn.pull_json(&p), format!("walk page {page_no}: pull {p}"))
            }
            Form::Query => {
                let q = format!(
                    "chat={}&cursor={cursor}&limit={limit}&reverse={reverse}",
                    pct(chat)
                );
                (
                    conn.pull_query(&q),
                    format!("walk page {page_no}: pull ?{q}"),
                )
            }
        };
        let page = parse_page(&r, &ctx);
        assert!(
            page.messages.len() as i64 <= limit,
            "{ctx}: page has {} messages, more than limit {limit}",
            page.messages.len()
        );
        for m in &page.messages {
            if cursor != 0 {
                if reverse {
                    assert!(
                        m.send_time > cursor,
                        "{ctx}: {m:?} is not newer than cursor {cursor}"
                    );
                } else {
                    assert!(
                        m.send_time < cursor,
                        "{ctx}: {m:?} is not older than cursor {cursor}"
                    );
                }
            }
        }
        for w in page.messages.windows(2) {
            if reverse {
                assert!(
                    w[0].send_time < w[1].send_time,
                    "{ctx}: page not oldest-first: {w:?}"
                );
            } else {
                assert!(
                    w[0].send_time > w[1].send_time,
                    "{ctx}: page not newest-first: {w:?}"
                );
            }
        }
        out.extend(page.messages.iter().cloned());
        if page.has_more {
            assert_eq!(
                page.messages.len() as i64,
                limit,
                "{ctx}: has_more=true but the page is not full"
            );
            let last = page.messages.last().unwrap().send_time;
            assert_eq!(
                page.next_cursor, last,
                "{ctx}: next_cursor must be the send_time of the last message on the page"
            );
            cursor = page.next_cursor;
        } else {
            assert_eq!(
                page.next_cursor, 0,
                "{ctx}: has_more=false requires next_cursor=0"
            );
            break;
        }
    }
    out
}

/// Asserts that `times` has no duplicates.
pub fn assert_unique(times: &[i64], ctx: &str) {
    let mut seen = HashSet::new();
    for t in times {
        assert!(
            seen.insert(*t),
            "{ctx}: send_time {t} appears more than once"
        );
    }
}

/// Resolves "host:port" for tests that need it.
pub fn resolve(s: &str) -> SocketAddr {
    s.to_socket_addrs().unwrap().next().unwrap()
}

// ---------------------------------------------------------------------------
// process ids and signals (used by tests/lifecycle.rs)
// ---------------------------------------------------------------------------

/// Sends `sig` (e.g. "TERM", "INT", "STOP", "CONT") to `pid` with `kill(1)`.
pub fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("run kill -{sig} {pid}: {e}"));
    assert!(status.success(), "kill -{sig} {pid} failed: {status}");
}

impl Server {
    /// The process id, while the process is running (not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("signal {sig}: the server process is already reaped"));
        send_signal(pid, sig);
    }

    /// Waits up to `deadline` for the process to exit on its own and returns
    /// its status (the child is reaped); `None` if it is still running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Redis {
    /// The redis-server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

// ---------------------------------------------------------------------------
// Redis with extra arguments (e.g. AOF persistence), kept across restarts
// ---------------------------------------------------------------------------

/// A [`Redis`] started with extra `redis-server` arguments that are given again
/// on every restart, in the same directory and on the same unix socket, so a
/// persistent Redis (`--appendonly yes`) replays its data after [`Self::restart`].
/// Derefs to [`Redis`] for `url`, `redis_cmd`, `zcard_chat`, `pid`, ...
pub struct RedisWithArgs {
    redis: Redis,
    extra: Vec<String>,
}

impl Redis {
    /// Starts redis-server on a unix socket in a fresh temp dir (like
    /// [`Redis::start`]) with `extra` appended to the command line; they
    /// override the defaults (`--appendonly no`, `--save ""`), since a later
    /// directive wins. `--dir` is the guard's temp dir unless `extra` sets it.
    pub fn start_with_args(extra: &[&str]) -> RedisWithArgs {
        let dir = unique_temp_dir("redis");
        let sock = dir.join("redis.sock");
        let mut r = RedisWithArgs {
            redis: Redis {
                child: None,
                dir,
                endpoint: RedisEndpoint::Unix(sock),
                password: None,
            },
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    /// `start_with_args` with AOF persistence (`appendonly yes`,
    /// `appendfsync always`) in the guard's own directory. Not `everysec`:
    /// when a background fsync takes over a second (a busy disk, as in a
    /// parallel test run), Redis postpones writing its AOF buffer for up to
    /// 2 s while still replying, and a SIGKILL then loses acknowledged
    /// writes (seen here: 106 and 1,545 in two runs).
    pub fn start_persistent() -> RedisWithArgs {
        Redis::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// The directory redis-server runs in (its `--dir` by default).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl std::ops::Deref for RedisWithArgs {
    type Target = Redis;
    fn deref(&self) -> &Redis {
        &self.redis
    }
}

impl RedisWithArgs {
    /// SIGKILL of the process (what it has written to the OS, e.g. its AOF, survives).
    pub fn kill(&mut self) {
        self.redis.kill();
    }

    /// Kills (if running) and starts redis-server again with the same arguments,
    /// directory and socket; returns once it answers PING (after loading its data).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let r = &mut self.redis;
        assert!(r.child.is_none(), "redis-server already running");
        let RedisEndpoint::Unix(sock) = r.endpoint.clone() else {
            unreachable!("RedisWithArgs listens on a unix socket")
        };
        let log_path = r.dir.join("redis.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port").arg("0");
        cmd.arg("--unixsocket").arg(&sock);
        cmd.arg("--unixsocketperm").arg("700");
        cmd.arg("--save").arg("");
        cmd.arg("--appendonly").arg("no");
        cmd.arg("--daemonize").arg("no");
        cmd.arg("--dir").arg(&r.dir);
        cmd.args(&self.extra);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        r.child = Some(match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!("{REDIS_MISSING}"),
            Err(e) => panic!("spawn redis-server: {e}"),
        });
        let start = Instant::now();
        loop {
            if let Some(c) = r.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                r.child = None;
                panic!(
                    "redis-server {:?} exited early ({status}); log:\n{}",
                    self.extra,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            // While it loads its AOF, redis answers -LOADING: keep waiting.
            let last = match r.try_cmd(0, &["PING"]) {
                Ok(reply) if reply.starts_with("+PONG") => return,
                Ok(reply) => reply,
                Err(e) => e.to_string(),
            };
            if start.elapsed() > STARTUP_DEADLINE {
                r.kill();
                panic!(
                    "redis-server {:?} did not answer PING within {STARTUP_DEADLINE:?} (last: {last}); log:\n{}",
                    self.extra,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A `kB` field of /proc/<pid>/status (e.g. "VmRSS", "VmSize"), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// File descriptors the process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

// ---------------------------------------------------------------------------
// Redis Cluster guard
// ---------------------------------------------------------------------------

/// One `redis-server --cluster-enabled yes` node of a [`Cluster`].
pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl ClusterNode {
    fn spawn(port: u16) -> Result<ClusterNode, String> {
        let dir = unique_temp_dir(&format!("cluster-{port}"));
        let log_path = dir.join("redis.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("create log: {e}"))?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", "1000"])
            .args(["--cluster-require-full-coverage", "no"])
            // A replica's first sync starts at once, not after the default 5 s.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!("{REDIS_MISSING}"),
            Err(e) => return Err(format!("spawn redis-server: {e}")),
        };
        let mut node = ClusterNode {
            port,
            child: Some(child),
            dir,
        };
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                node.child = None;
                return Err(format!(
                    "cluster node {port} exited ({status}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if node
                .try_cmd(&["PING"])
                .is_ok_and(|r| r.starts_with("+PONG"))
            {
                return Ok(node);
            }
            if start.elapsed() > STARTUP_DEADLINE {
                return Err(format!("cluster node {port} did not answer PING"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends one command; the raw RESP reply text (arrays flattened).
    pub fn try_cmd(&self, args: &[&str]) -> io::Result<String> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        resp_exchange(s.try_clone()?, s, &[], args)
    }

    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("node {}: {args:?} failed: {e}", self.port))
    }

    /// SIGKILL (no persistence: its data is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            send_signal(pid, sig);
        }
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
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
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
            let port = free_cluster_port();
            match ClusterNode::spawn(port) {
                Ok(node) => nodes.push(node),
                Err(e) => eprintln!("retrying a cluster node: {e}"),
            }
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
        cluster
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
        let node = loop {
            match ClusterNode::spawn(free_cluster_port()) {
                Ok(node) => break node,
                Err(e) => eprintln!("retrying a cluster node: {e}"),
            }
        };
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

// ---------------------------------------------------------------------------
// etcd guard (tests/discovery.rs)
// ---------------------------------------------------------------------------

/// A real single-member `etcd` on loopback ports, in its own data directory,
/// kept across [`Etcd::restart`]. Dropping it kills the process and removes
/// the directory.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

const ETCD_MISSING: &str =
    "etcd not found: run `apt-get install -y etcd-server` (or the project's .ci/test script)";

impl Etcd {
    pub fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: unique_temp_dir("etcd"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.join("etcd.log")).expect("create etcd.log"),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("{ETCD_MISSING} ({e})"));
        self.child = Some(child);
        let addr = self.addr();
        wait_until(STARTUP_DEADLINE, "etcd to answer /health", || {
            let r = try_request(addr, "GET", "/health", &[], b"").ok()?;
            (r.status == 200 && r.text().contains("true")).then_some(())
        });
    }

    /// The client address, `127.0.0.1:P`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// `etcd://127.0.0.1:P/<prefix>` for `--registry`.
    pub fn registry(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.addr())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL + wait; the data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Server-Sent Events client (tests/stream.rs)
// ---------------------------------------------------------------------------

/// One item of an event stream: an event, or a comment (a heartbeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    Event(SseEvent),
    Comment(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `event:`; `None` is the default type, `message`.
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The id as a send_time (panics if absent or not a number).
    pub fn send_time(&self) -> i64 {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("no id: {self:?}"));
        id.parse()
            .unwrap_or_else(|_| panic!("id {id:?} is not a send_time"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data of {self:?} is not JSON: {e}"))
    }
}

/// A client of `GET /api/stream`: the response head, then items as they
/// come, decoding chunked (HTTP/1.1) or close-delimited (HTTP/1.0) bodies.
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    socket: TcpStream,
    chunked: bool,
    /// Body bytes received and not yet parsed into items.
    pending: Vec<u8>,
    /// The body ended: the last chunk (`clean`) or EOF.
    ended: bool,
    /// The body ended with chunked coding's last chunk.
    pub clean_end: bool,
}

impl SseStream {
    /// `GET path` with `Accept: text/event-stream` (unless `headers` has an
    /// `Accept`); panics unless the answer is a 200 event stream.
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseStream {
        match SseStream::try_open(addr, path, headers, "HTTP/1.1") {
            Ok(stream) => stream,
            Err(r) => panic!("GET {path}: expected an event stream, got {}", r.describe()),
        }
    }

    /// The stream, or the (non-200) response.
    pub fn try_open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        version: &str,
    ) -> Result<SseStream, Response> {
        let socket = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        socket.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            all.push(("Accept", "text/event-stream"));
        }
        let mut req = format_request(&addr.to_string(), "GET", path, &all, b"");
        if version != "HTTP/1.1" {
            let line_end = req.iter().position(|&b| b == b'\r').expect("request line");
            let line = String::from_utf8_lossy(&req[..line_end]).replace("HTTP/1.1", version);
            req.splice(..line_end, line.into_bytes());
        }
        (&socket).write_all(&req).expect("write the request");
        let mut reader = BufReader::new(socket.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        let mut parts = line.trim_end().splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).expect("status");
        let reason = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header field");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if status != 200 {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).expect("error body");
            return Err(Response {
                version,
                status,
                reason,
                headers,
                body,
            });
        }
        let chunked = header("transfer-encoding").is_some_and(|v| v == "chunked");
        Ok(SseStream {
            status,
            headers,
            reader,
            socket,
            chunked,
            pending: Vec::new(),
            ended: false,
            clean_end: false,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.socket.set_read_timeout(Some(t)).expect("timeout");
    }

    /// The next item; `Ok(None)` once the body has ended.
    pub fn next_item(&mut self) -> io::Result<Option<SseItem>> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..end + 2).collect();
                return Ok(Some(parse_sse_block(&String::from_utf8_lossy(&block))));
            }
            if self.ended {
                return Ok(None);
            }
            self.read_body()?;
        }
    }

    /// The next event, skipping comments; panics at the end or on error.
    pub fn next_event(&mut self) -> SseEvent {
        loop {
            match self.next_item() {
                Ok(Some(SseItem::Event(e))) => return e,
                Ok(Some(SseItem::Comment(_))) => {}
                Ok(None) => panic!("the stream ended while an event was expected"),
                Err(e) => panic!("reading the stream: {e}"),
            }
        }
    }

    /// Reads the rest of the body: every item until the end (panics if it
    /// does not end within the read timeout).
    pub fn read_to_end(&mut self) -> Vec<SseItem> {
        let mut items = Vec::new();
        loop {
            match self.next_item() {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return items,
                Err(e) => panic!("the stream did not end: {e} (after {} items)", items.len()),
            }
        }
    }

    fn read_body(&mut self) -> io::Result<()> {
        if !self.chunked {
            let mut buf = [0u8; 16 * 1024];
            match self.reader.read(&mut buf)? {
                0 => self.ended = true,
                n => self.pending.extend_from_slice(&buf[..n]),
            }
            return Ok(());
        }
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            self.ended = true;
            return Ok(());
        }
        let size = usize::from_str_radix(line.trim_end(), 16)
            .map_err(|_| io::Error::new(ErrorKind::InvalidData, format!("chunk size {line:?}")))?;
        let mut data = vec![0u8; size + 2];
        self.reader.read_exact(&mut data)?;
        assert_eq!(&data[size..], b"\r\n", "chunk not followed by CRLF");
        if size == 0 {
            self.ended = true;
            self.clean_end = true;
        }
        self.pending.extend_from_slice(&data[..size]);
        Ok(())
    }
}

fn parse_sse_block(block: &str) -> SseItem {
    let mut event = SseEvent::default();
    let mut comment = None;
    for line in block.lines().filter(|l| !l.is_empty()) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => comment = Some(value.to_string()),
            "id" => event.id = Some(value.to_string()),
            "event" => event.event = Some(value.to_string()),
            "data" if event.data.is_empty() => event.data = value.to_string(),
            "data" => event.data = format!("{}\n{value}", event.data),
            other => panic!("unexpected SSE field {other:?} in {block:?}"),
        }
    }
    match comment {
        Some(c) if event == SseEvent::default() => SseItem::Comment(c),
        _ => SseItem::Event(event),
    }
}

// ---------------------------------------------------------------------------
// Prometheus metrics (used by tests/metrics.rs)
// ---------------------------------------------------------------------------

/// One scrape of `GET /metrics`: the text, and each sample by its series
/// (`name{label="value",...}`, labels in the order the server prints them).
pub struct Scrape {
    pub text: String,
    pub samples: Vec<(String, f64)>,
}

impl Scrape {
    /// The sample of `name` with exactly `labels`; 0 if absent (a counter
    /// that never moved may be left out).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sample of `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = series_key(name, labels);
        self.samples
            .iter()
            .find(|(series, _)| *series == key)
            .map(|(_, v)| *v)
    }

    /// Every sample of `name` (any labels), as (labels text, value).
    pub fn family(&self, name: &str) -> Vec<(String, f64)> {
        self.samples
            .iter()
            .filter_map(|(series, v)| {
                let rest = series.strip_prefix(name)?;
                (rest.is_empty() || rest.starts_with('{')).then(|| (rest.to_string(), *v))
            })
            .collect()
    }
}

/// `name{a="x",b="y"}` as the server prints a series.
pub fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// Parses the text format's sample lines (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("malformed value in {l:?}")),
            };
            (series.to_string(), value)
        })
        .collect()
}

/// `GET /metrics` at `addr`: checks the status and the exposition format's
/// `Content-Type`, and parses the samples.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let r = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.describe());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "GET /metrics content type"
    );
    let text = r.text();
    Scrape {
        samples: parse_metrics(&text),
        text,
    }
}

/// Runs `promtool check metrics` on `text`; panics with its complaints.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run promtool (Debian package prometheus): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- scrape ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Server {
    /// The `--metrics-addr` address the server printed (`metrics listening on ...`).
    pub fn metrics_addr(&self) -> SocketAddr {
        wait_until(STARTUP_DEADLINE, "the metrics listening line", || {
            self.stderr().lines().find_map(|l| {
                let (_, addr) = l.split_once("metrics listening on ")?;
                addr.trim().parse().ok()
            })
        })
    }
}
