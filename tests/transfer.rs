//! `im-server export` / `im-server import` (issue 21): a chat as NDJSON,
//! oldest first, edits applied, deletions omitted; imported into an empty
//! chat of another Redis with its send_times, so that exporting it again
//! gives the same bytes. A 100,000-message chat round-trips, and the export
//! runs in constant memory (its peak RSS does not grow with the chat).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_im-server");

/// `im-server export`: (stdout, peak RSS in KiB per /usr/bin/time).
fn export(url: &str, chat: &str) -> (Vec<u8>, u64) {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", BIN, "export", "--chat", chat, "--redis", url])
        .output()
        .expect("run export");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "export failed: {stderr}");
    let peak = stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("peak RSS");
    (out.stdout, peak)
}

fn import(url: &str, chat: &str, ndjson: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["import", "--chat", chat, "--redis", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ndjson)
        .expect("write NDJSON");
    child.wait_with_output().expect("import output")
}

/// `n` messages, one a line, as an export writes them.
fn generated(chat: &str, n: usize) -> Vec<u8> {
    let start = 1_700_000_000_000_000i64;
    let mut out = Vec::new();
    for i in 0..n {
        // (In the order a pull writes the fields.)
        let (sender, t) = (i % 7, start + 3 * i as i64);
        let line = format!(
            r#"{{"chat":"{chat}","text":"message {i} ✓","sender":"u{sender}","send_time":{t}}}"#
        );
        writeln!(out, "{line}").unwrap();
    }
    out
}

#[test]
fn a_chat_round_trips_with_edits_and_deletes() {
    let (from, to) = (Redis::start(), Redis::start());
    let server = Server::with_redis(&from);
    let addr = server.http_addr();
    let times: Vec<i64> = (0..5)
        .map(|i| send_ok(addr, "moved", "ann", &format!("m{i}")))
        .collect();
    let headers = [("Content-Type", "application/json")];
    let body = json!({"chat": "moved", "send_time": times[1], "text": "m1 edited"});
    assert_eq!(
        request(
            addr,
            "POST",
            "/api/edit",
            &headers,
            body.to_string().as_bytes()
        )
        .status,
        200
    );
    let body = json!({"chat": "moved", "send_time": times[3]});
    assert_eq!(
        request(
            addr,
            "POST",
            "/api/delete",
            &headers,
            body.to_string().as_bytes()
        )
        .status,
        200
    );
    let (ndjson, _) = export(&from.url(), "moved");
    let lines: Vec<Value> = String::from_utf8(ndjson.clone())
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        ["m0", "m1 edited", "m2", "m4"],
        "oldest first, edits applied, deletions omitted"
    );
    assert!(lines[1]["edited_at"].as_i64().is_some());
    // GET /api/export serves the same bytes, streamed.
    let r = request(addr, "GET", "/api/export?chat=moved", &[], b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(r.body, ndjson, "the HTTP export is the CLI's");
    let r = request(addr, "GET", "/api/export?chat=nobody-here", &[], b"");
    assert_eq!(
        (r.status, r.body.len()),
        (200, 0),
        "an empty chat is an empty body"
    );
    let out = import(&to.url(), "moved", &ndjson);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        export(&to.url(), "moved").0,
        ndjson,
        "the same chat, byte for byte"
    );
    // The imported chat is served like any other, and goes on from there.
    let there = Server::with_redis(&to);
    let page = pull_page(there.http_addr(), "moved", 0, 10, true);
    assert_eq!(page.times(), [times[0], times[1], times[2], times[4]]);
    assert_eq!(page.messages[1].edited_at, lines[1]["edited_at"].as_i64());
    let later = send_ok(there.http_addr(), "moved", "bob", "after the move");
    assert!(later > times[4]);
    let again = import(&to.url(), "moved", &ndjson);
    assert!(
        !again.status.success(),
        "a chat that is not empty is refused"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}

#[test]
fn a_100k_message_chat_round_trips_in_constant_memory() {
    let (from, to) = (Redis::start(), Redis::start());
    let big = generated("big", 100_000);
    let small = generated("small", 10_000);
    for (chat, data) in [("big", &big), ("small", &small)] {
        let out = import(&from.url(), chat, data);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (exported, big_peak) = export(&from.url(), "big");
    assert_eq!(exported, big, "every message, in order, as given");
    let (_, small_peak) = export(&from.url(), "small");
    eprintln!("export peak RSS: {big_peak} KiB (100,000 messages), {small_peak} KiB (10,000)");
    assert!(
        big_peak < small_peak + 4 * 1024,
        "peak RSS {big_peak} KiB for 100,000 messages vs {small_peak} KiB for 10,000: not constant"
    );
    // Over HTTP too, page by page.
    let server = Server::with_redis(&from);
    let r = request(server.http_addr(), "GET", "/api/export?chat=big", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body == big, "GET /api/export of 100,000 messages");
    let out = import(&to.url(), "big", &exported);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(to.zcard_chat("big"), 100_000);
    assert_eq!(export(&to.url(), "big").0, big);
}

/// On a Redis Cluster the CLI does the same (the URL names one node or a
/// list of them): a chat imported there exports to the same bytes.
#[test]
fn a_chat_round_trips_on_a_cluster() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let chat = "moved-here";
    let lines = generated(chat, 250);
    let out = import(&url, chat, &lines);
    assert!(
        out.status.success(),
        "import into a cluster: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (exported, _) = export(&url, chat);
    assert!(
        exported == lines,
        "exported as imported: {} bytes against {}",
        exported.len(),
        lines.len()
    );
    let again = import(&url, chat, &lines);
    assert!(
        !again.status.success(),
        "a chat that is not empty is refused"
    );
}
