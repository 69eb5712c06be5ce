//! The child-process guard every real process of the tests (redis-server,
//! etcd, im-server) is held by; readings of a running process from /proc; and
//! its resource limits.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A child process, killed (SIGKILL) and reaped on [`ChildProc::kill`] or drop.
/// Empty until spawned, and again once killed or reaped.
#[derive(Default)]
pub struct ChildProc {
    child: Option<Child>,
}

impl ChildProc {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to
    /// `log_path`; panics with `missing` if the program is not installed.
    pub fn spawn_logged(
        &mut self,
        cmd: &mut Command,
        log_path: &Path,
        missing: &str,
    ) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(log2).stderr(log);
        self.spawn(cmd, missing)
    }

    /// Spawns `cmd` as it is configured; panics with `missing` if the program
    /// is not installed.
    pub fn spawn(&mut self, cmd: &mut Command, missing: &str) -> Result<(), String> {
        assert!(self.child.is_none(), "{cmd:?}: already running");
        match cmd.spawn() {
            Ok(c) => {
                self.child = Some(c);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{missing}"),
            Err(e) => Err(format!("spawn {cmd:?}: {e}")),
        }
    }

    /// The child's piped stderr (once; panics if it was not piped).
    pub fn take_stderr(&mut self) -> std::process::ChildStderr {
        self.child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("spawned with Stdio::piped() stderr")
    }

    /// The process id, while the process is running (not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether there is a process that was neither killed nor reaped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process is still running (an exited process stays held,
    /// so [`ChildProc::wait_exit`] still returns its status).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The exit status if the process has exited (it is reaped), else `None`.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Waits up to `deadline` for the process to exit on its own and returns
    /// its status (the child is reaped); `None` if it is still running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            self.child.as_ref()?;
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for an exit that has already begun (e.g. after the process
    /// closed its stderr); the status as text.
    pub fn wait(&mut self) -> String {
        match self.child.take() {
            Some(mut c) => c.wait().map(|s| s.to_string()).unwrap_or_default(),
            None => String::new(),
        }
    }

    /// SIGKILL + wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` to the process if it is running.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            send_signal(pid, sig);
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` (e.g. "TERM", "INT", "STOP", "CONT") to `pid` with `kill(1)`.
pub fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("run kill -{sig} {pid}: {e}"));
    assert!(status.success(), "kill -{sig} {pid} failed: {status}");
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

/// The highest resident memory (`VmRSS`, bytes) of `pid` over `span`,
/// sampled every 100 ms: the peak a bound is checked against while the
/// server works through (or holds) what a test made it take on.
pub fn peak_rss_bytes(pid: u32, span: Duration) -> u64 {
    let end = Instant::now() + span;
    let mut peak = proc_status_bytes(pid, "VmRSS");
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
        peak = peak.max(proc_status_bytes(pid, "VmRSS"));
    }
    peak
}

/// A `kB` field of /proc/<pid>/status (`VmRSS`, `VmSize`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    proc_status_bytes(pid, field) / 1024
}

/// Resident memory of a process (`VmRSS`), in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// File descriptors the process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// Sets a resource limit of a running process with util-linux `prlimit`:
/// `limits` is `soft:hard`, `soft:` (soft only, which the hard limit must
/// allow) or `:hard`, e.g. `prlimit(pid, "nofile", "4096:")`.
pub fn prlimit(pid: u32, resource: &str, limits: &str) {
    let arg = format!("--{resource}={limits}");
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &arg])
        .output()
        .unwrap_or_else(|e| panic!("run prlimit (util-linux): {e}"));
    assert!(
        out.status.success(),
        "prlimit {arg} failed (hard limit too low?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
