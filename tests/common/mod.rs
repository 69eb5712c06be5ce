//! Shared helpers for the integration tests, one module per concept:
//!
//! - [`redis`]: real `redis-server` processes, standalone and Cluster;
//! - [`etcd`]: a real `etcd`;
//! - [`server`]: the real `im-server` binary with any role, flags and env;
//! - [`proc`]: the child-process guard all of them share, /proc readings, limits;
//! - [`client`]: one raw HTTP/1.1 client and the assertions on responses and connections;
//! - [`rpc`]: one raw client of the internal RPC protocol;
//! - [`api`]: the IM API (send, pull, pages) on top of [`client`];
//! - [`sse`], [`metrics`]: event streams and Prometheus scrapes;
//! - [`ws`]: a raw WebSocket client (any frame, valid or not).
//!
//! Everything is re-exported here, so a test file says `use common::*;`.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long to wait for a child process (im-server, redis-server) to come up.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// Read/write timeout of the HTTP client: a hung server fails the test instead of blocking it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// misc
// ---------------------------------------------------------------------------

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory under the system temp dir (pid + counter +
/// nanos), removed with all it holds when the guard is dropped: the tests
/// write token secrets and Redis data there, and a run of the suite left
/// about 100 such directories behind before this was a guard.
pub fn unique_temp_dir(tag: &str) -> TempDir {
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
    TempDir(dir)
}

/// A file holding `contents` (as they are) in a fresh [`unique_temp_dir`],
/// and its path as a flag's value (`--auth-jwt-secret-file`,
/// `--rpc-secret-file`). Keep the directory alive while the file is read.
#[allow(dead_code)] // used by some test files only: see the modules' `allow`s below
pub fn temp_file(tag: &str, contents: &str) -> (TempDir, String) {
    let dir = unique_temp_dir(tag);
    let file = dir.join("secret");
    std::fs::write(&file, contents).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let path = file.to_string_lossy().to_string();
    (dir, path)
}

/// A directory made by [`unique_temp_dir`]; dropping it removes it. Keep it
/// alive (bound to a name, not `_`) as long as anything uses its files.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<OsStr> for TempDir {
    fn as_ref(&self) -> &OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Not a failure of the test if it cannot be removed (a child still
        // writing into it as it dies): at worst it is left behind.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ports handed out come from here, below the kernel's ephemeral range
/// (32768-60999 on Linux), and so that port + 10000 (a Redis Cluster node's
/// bus port) is below it too. A port from `bind(0)` is an ephemeral port:
/// between handing it out and the server binding it, any outgoing
/// connection (a client, a gateway's RPC connection, curl) may take it as
/// its local port, and the server then fails to start (seen in CI: one RPC
/// server of the deployment example exited at once).
const PORT_RANGE: std::ops::Range<usize> = 10_000..22_000;
/// The next candidate, as an offset into [`PORT_RANGE`]; starts at a place
/// that depends on the process, and every port is handed out once.
static NEXT_PORT: AtomicUsize = AtomicUsize::new(usize::MAX);

fn bindable(port: usize) -> bool {
    TcpListener::bind(("127.0.0.1", port as u16)).is_ok()
}

/// Picks a currently free TCP port on 127.0.0.1 outside the ephemeral
/// range, never the same one twice in one test process.
pub fn free_port() -> u16 {
    let span = PORT_RANGE.len();
    let start = (std::process::id() as usize).wrapping_mul(7919) % span;
    let _ = NEXT_PORT.compare_exchange(usize::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let port = PORT_RANGE.start + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % span;
        if bindable(port) && bindable(port + 10_000) {
            return port as u16;
        }
    }
    panic!("no free port in 127.0.0.1:{PORT_RANGE:?}");
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

// Each tests/*.rs file compiles this module into a crate of its own and uses
// a part of it, so a helper used by some test files is "never used" in the
// others. That, and only that, is what these `allow`s are for: a helper that
// no test file uses is deleted (checked when this harness was split, by
// building every test target without them and keeping what was unused in all).
#[allow(dead_code)]
mod api;
#[allow(dead_code)]
mod client;
#[allow(dead_code)]
mod etcd;
#[allow(dead_code)]
mod metrics;
#[allow(dead_code)]
mod proc;
#[allow(dead_code)]
mod redis;
#[allow(dead_code)]
mod rpc;
#[allow(dead_code)]
mod server;
#[allow(dead_code)]
mod sse;
#[allow(dead_code)]
mod ws;

#[allow(unused_imports)]
pub use {
    api::*, client::*, etcd::*, metrics::*, proc::*, redis::*, rpc::*, server::*, sse::*, ws::*,
};
