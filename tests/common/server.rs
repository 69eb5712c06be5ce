//! The real `im-server` binary: one builder for any role, flags and env
//! ([`Server`]), and a server together with its store ([`Backend`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{ChildStderr, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// A running `im-server` child process. Dropping it kills the process.
pub struct Server {
    process: ChildProc,
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
        Server::on_redis(redis, &[])
    }

    /// `im-server` (role `all`) backed by the given redis, with extra arguments.
    pub fn on_redis(redis: &Redis, args: &[&str]) -> Server {
        Server::start("all", &with_redis_url(&redis.url(), args), &[])
    }

    /// `im-server` (role `all`) on the Redis Cluster one of whose nodes is at
    /// `url`, with extra arguments; asserts it detected the cluster.
    pub fn on_cluster(url: &str, args: &[&str]) -> Server {
        let server = Server::start("all", &with_redis_url(url, args), &[]);
        assert!(
            server.stderr().contains("store: Redis Cluster"),
            "the server did not detect the cluster:\n{}",
            server.stderr()
        );
        server
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
        Server::launch(
            Command::new(env!("CARGO_BIN_EXE_im-server")),
            role,
            args,
            envs,
        )
    }

    /// [`Server::start`] under an open-file limit of `files` (soft and hard),
    /// set before the binary starts (util-linux `prlimit`, which then
    /// executes it: the pid is the server's).
    pub fn start_with_open_files(role: &str, args: &[&str], files: u32) -> Server {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={files}:{files}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_im-server"));
        Server::launch(cmd, role, args, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn launch(
        mut cmd: Command,
        role: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Server, String> {
        let wants_http = role != "rpc";
        let wants_rpc = role != "gateway";
        let has = |flag: &str, env: &str| {
            args.iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
                || envs.iter().any(|(k, _)| *k == env)
        };

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
        let mut process = ChildProc::default();
        process.spawn(&mut cmd, "the im-server binary is missing")?;

        let (log, rx) = drain_stderr(process.take_stderr());

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
                    let status = process.wait();
                    // give the reader thread a moment to finish appending
                    thread::sleep(Duration::from_millis(50));
                    return Err(format!(
                        "im-server exited ({status}) before printing its listening line(s)\ncommand: {cmdline}\nstderr:\n{}",
                        log.lock().unwrap()
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    process.kill();
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
            process,
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

    /// Polls `GET /ready` until it answers 200: a gateway that discovers
    /// its RPC servers (DNS, etcd) serves 503 until it knows one.
    pub fn wait_ready(&self, deadline: Duration) {
        let addr = self.http_addr();
        let mut last = String::new();
        let start = Instant::now();
        while start.elapsed() < deadline {
            match try_request(addr, "GET", "/ready", &[], b"") {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = r.describe(),
                Err(err) => last = err.to_string(),
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "GET /ready not 200 within {deadline:?}; last: {last}\nstderr:\n{}",
            self.stderr()
        );
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL + wait.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.process.is_alive()
    }

    /// The process id, while the process is running (not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
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
        self.process.wait_exit(deadline)
    }

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

/// A server (role `all`) plus the store it runs on, if that is a process of
/// its own. Field order matters: the server is dropped (killed) before its store.
pub struct Backend {
    pub server: Server,
    pub redis: Option<Redis>,
    /// Held only to live as long as the server (killed on drop).
    pub _cluster: Option<Cluster>,
}

impl Backend {
    pub fn memory() -> Backend {
        Backend::memory_with(&[])
    }

    pub fn redis() -> Backend {
        Backend::redis_with(&[])
    }

    /// A server on a Redis Cluster of 3 masters and 3 replicas, given one node's URL.
    pub fn cluster() -> Backend {
        Backend::cluster_with(&[])
    }

    /// [`Backend::memory`] with extra `im-server` arguments.
    pub fn memory_with(args: &[&str]) -> Backend {
        Backend {
            server: Server::start("all", args, &[]),
            redis: None,
            _cluster: None,
        }
    }

    /// [`Backend::redis`] with extra `im-server` arguments.
    pub fn redis_with(args: &[&str]) -> Backend {
        let redis = Redis::start();
        Backend {
            server: Server::on_redis(&redis, args),
            redis: Some(redis),
            _cluster: None,
        }
    }

    /// [`Backend::cluster`] with extra `im-server` arguments.
    pub fn cluster_with(args: &[&str]) -> Backend {
        let cluster = Cluster::start();
        Backend {
            server: Server::on_cluster(&cluster.url(), args),
            redis: None,
            _cluster: Some(cluster),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.http_addr()
    }
}

/// `--redis URL` followed by `args`.
fn with_redis_url<'a>(url: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--redis", url];
    all.extend_from_slice(args);
    all
}

/// Drains the child's stderr forever in a thread (so the child never blocks on
/// a full pipe) into the returned log, forwarding each line to the receiver
/// while anyone listens.
fn drain_stderr(stderr: ChildStderr) -> (Arc<Mutex<String>>, mpsc::Receiver<String>) {
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel::<String>();
    let sink = log.clone();
    thread::spawn(move || {
        let mut r = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    sink.lock().unwrap().push_str(&line);
                    let _ = tx.send(line);
                }
            }
        }
    });
    (log, rx)
}
