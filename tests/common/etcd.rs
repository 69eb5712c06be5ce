//! A real single-member `etcd`.

use std::net::SocketAddr;
use std::process::Command;

use serde_json::{Value, json};

use super::*;

/// A real single-member `etcd` on loopback ports, in its own data directory,
/// kept across [`Etcd::restart`]. Dropping it kills the process and removes
/// the directory.
pub struct Etcd {
    process: ChildProc,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
}

const ETCD_MISSING: &str =
    "etcd not found: run `apt-get install -y etcd-server` (or the project's .ci/test script)";

impl Etcd {
    pub fn start() -> Etcd {
        let mut etcd = Etcd::planned();
        etcd.spawn();
        etcd
    }

    /// Ports and directory chosen, not started yet ([`Etcd::restart`] starts
    /// it): for what must cope with an etcd that is not up yet.
    pub fn planned() -> Etcd {
        Etcd {
            process: ChildProc::default(),
            dir: unique_temp_dir("etcd"),
            client_port: free_port(),
            peer_port: free_port(),
        }
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")]);
        self.process
            .spawn_logged(&mut cmd, &self.dir.join("etcd.log"), ETCD_MISSING)
            .unwrap_or_else(|e| panic!("{e}"));
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

    /// `POST /v3/kv/range` of `key` (up to `range_end`, if given) in the v3
    /// JSON API; the answer, or `None` while etcd does not answer.
    pub fn range(&self, key: &[u8], range_end: Option<&[u8]>) -> Option<Value> {
        let b64 = im_server::discovery::etcd::base64::encode;
        let mut body = json!({ "key": b64(key) });
        if let Some(end) = range_end {
            body["range_end"] = json!(b64(end));
        }
        let r = try_request(
            self.addr(),
            "POST",
            "/v3/kv/range",
            JSON_CT,
            body.to_string().as_bytes(),
        )
        .ok()?;
        Some(r.json())
    }

    /// `etcd://127.0.0.1:P/<prefix>` for `--registry`.
    pub fn registry(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.addr())
    }

    /// SIGKILL + wait; the data directory stays.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Then `dir` is dropped: the directory goes once the process has.
        self.kill();
    }
}
