//! The deployment example of docs/deployment.md ("To try it on one
//! machine"), run as the script it is: pasted on a fresh machine it must
//! serve a send and a pull on the first try, and leave nothing running or on
//! disk. The block is read from docs/deployment.md, so the two cannot drift
//! apart; only its ports change (to free ones, so that runs side by side do
//! not meet) and its `cargo build --release` step (the test runs the binary
//! it was built with).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The ports the example uses, each to be replaced by a free one.
const PORTS: [&str; 8] = [
    "6380", "23790", "23800", "8881", "8882", "8883", "8080", "8081",
];

/// The block after "To try it on one machine".
fn example() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md"))
        .expect("docs/deployment.md");
    let (_, after) = doc
        .split_once("To try it on one machine")
        .expect("docs/deployment.md has the deployment example");
    let (_, block) = after.split_once("```bash\n").expect("a bash block follows");
    let (block, _) = block.split_once("```").expect("the block ends");
    block.to_string()
}

/// Replaces whole-number occurrences of `from` by `to` (not `16379`).
fn replace_port(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let before = rest[..i].chars().last();
        let after = rest[i + from.len()..].chars().next();
        let whole = !before.is_some_and(|c| c.is_ascii_digit())
            && !after.is_some_and(|c| c.is_ascii_digit());
        out.push_str(&rest[..i]);
        out.push_str(if whole { to } else { from });
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

fn open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

#[test]
fn the_deployment_example_works_pasted_as_written() {
    let block = example();
    let build = "cargo build --release && cd target/release\n";
    let mut script = block
        .strip_prefix(build)
        .unwrap_or_else(|| panic!("the example starts with {build:?}:\n{block}"))
        .to_string();
    for port in PORTS {
        assert!(
            script.contains(port),
            "the example no longer uses port {port}"
        );
    }
    let ports: Vec<u16> = PORTS.iter().map(|_| free_port()).collect();
    for (from, to) in PORTS.iter().zip(&ports) {
        script = replace_port(&script, from, &to.to_string());
    }
    let binary_dir = std::path::Path::new(env!("CARGO_BIN_EXE_im-server"))
        .parent()
        .expect("the binary's directory");
    let demo_parent = unique_temp_dir("readme-example");
    let started = Instant::now();
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(binary_dir)
        // `mktemp -d` makes the demo directory in here, so the test can
        // check that the script removed it.
        .env("TMPDIR", &demo_parent)
        .output()
        .expect("bash runs");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let leftovers: Vec<u16> = ports.iter().copied().filter(|&p| open(p)).collect();
    // Not `bash -e`: pasted, every line runs whatever the one before did,
    // the cleanup included; what it printed says whether it worked.
    eprintln!("the example's stderr:\n{stderr}");
    assert!(
        out.status.success(),
        "the example failed ({}) after {took:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with(r#"{"send_time":"#)),
        "the send's answer first: {stdout}"
    );
    let pulled = lines.get(1).copied().unwrap_or_default();
    assert!(
        pulled.contains(r#""text":"hi""#),
        "the pull finds the message: {stdout}"
    );
    assert!(
        lines.get(2).is_some_and(|l| l.contains(r#""text":"hi""#)),
        "a pull after the rolling restart: {stdout}"
    );
    assert!(leftovers.is_empty(), "still listening: {leftovers:?}");
    // Nothing refused, nothing failed: a pasted example that prints errors
    // reads as broken even when it ends well.
    assert!(
        stderr.trim().is_empty(),
        "the example printed errors:\n{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&demo_parent)
        .expect("the test's directory")
        .collect();
    assert!(
        left.is_empty(),
        "the demo directory was not removed: {left:?}"
    );
    eprintln!("the example ran in {took:?}");
}
