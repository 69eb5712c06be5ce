//! `/api/stream` tells followers of edits and deletes (issue 21): live, in
//! order with new messages, and on resume with `Last-Event-ID` (the changes
//! made while the client was away); a resume older than the change log gets
//! one `event: reset`. On the embedded store, Redis and a Cluster.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn post(addr: SocketAddr, path: &str, body: Value) -> Response {
    let headers = [("Content-Type", "application/json")];
    let r = request(addr, "POST", path, &headers, body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{path} {body}: {}", r.describe());
    r
}

fn edit(addr: SocketAddr, chat: &str, t: i64, text: &str) -> i64 {
    let body = json!({"chat": chat, "send_time": t, "text": text});
    post(addr, "/api/edit", body).json()["edited_at"]
        .as_i64()
        .expect("edited_at")
}

fn delete(addr: SocketAddr, chat: &str, t: i64) {
    post(addr, "/api/delete", json!({"chat": chat, "send_time": t}));
}

fn path(chat: &str) -> String {
    format!("/api/stream?chat={}", pct(chat))
}

/// (kind, send_time, text) of an event: kind "message", "edit", "delete".
fn summary(e: &SseEvent) -> (String, i64, String) {
    let v = e.json();
    let kind = e.event.clone().unwrap_or_else(|| "message".into());
    let text = v["text"].as_str().unwrap_or("").to_string();
    (kind, v["send_time"].as_i64().expect("send_time"), text)
}

fn live_and_resumed(b: &Backend) {
    let addr = b.addr();
    let chat = "followed";
    let t1 = send_ok(addr, chat, "ann", "one");
    let mut stream = SseStream::open(addr, &path(chat), &[]);
    assert_eq!(
        summary(&stream.next_event()),
        ("message".into(), t1, "one".into())
    );
    let t2 = send_ok(addr, chat, "ann", "two");
    // Seen before it is deleted: a message deleted before the stream pulled
    // it comes only as its delete (the WebSocket twin of this test, in
    // tests/ws.rs, lost that race in CI).
    let mut events = vec![stream.next_event()];
    let e1 = edit(addr, chat, t1, "one, edited");
    delete(addr, chat, t2);
    let t3 = send_ok(addr, chat, "bob", "three");
    while events.len() < 4 {
        events.push(stream.next_event());
    }
    let got: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            ("message".into(), t2, "two".into()),
            ("edit".into(), t1, "one, edited".into()),
            ("delete".into(), t2, String::new()),
            ("message".into(), t3, "three".into()),
        ],
        "live, in order"
    );
    let edit_event = events[1].json();
    assert_eq!(edit_event["edited_at"], e1);
    assert_eq!(edit_event["sender"], "ann");
    assert_eq!(edit_event["chat"], chat);
    assert_eq!(events[2].json(), json!({"chat": chat, "send_time": t2}));
    // Ids carry both cursors, never going back.
    let ids: Vec<(i64, i64)> = events.iter().map(SseEvent::cursors).collect();
    assert!(
        ids.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "{ids:?}"
    );
    assert_eq!(ids[1].1, e1, "an edit's id carries its edited_at");
    // Away: what changes meanwhile comes on resume, then live again.
    let last = events[3].id.clone().expect("id");
    drop(stream);
    let e3 = edit(addr, chat, t3, "three, edited");
    delete(addr, chat, t1);
    let t4 = send_ok(addr, chat, "ann", "four");
    let mut stream = SseStream::open(addr, &path(chat), &[("Last-Event-ID", &last)]);
    let mut resumed: Vec<_> = (0..3).map(|_| summary(&stream.next_event())).collect();
    assert_eq!(
        resumed,
        [
            ("edit".into(), t3, "three, edited".into()),
            ("delete".into(), t1, String::new()),
            ("message".into(), t4, "four".into()),
        ],
        "what happened while away, once, in order"
    );
    let e4 = edit(addr, chat, t4, "four, edited");
    resumed.push(summary(&stream.next_event()));
    assert_eq!(resumed[3], ("edit".into(), t4, "four, edited".into()));
    assert!(e4 > e3);
}

#[test]
fn live_and_resumed_on_the_memory_store() {
    live_and_resumed(&Backend::memory());
}

#[test]
fn live_and_resumed_on_redis() {
    live_and_resumed(&Backend::redis());
}

#[test]
fn live_and_resumed_on_a_cluster() {
    live_and_resumed(&Backend::cluster());
}

/// With a 1 s change log, a client away for longer than that may have
/// missed trimmed changes: one `event: reset`, then the stream goes on.
fn reset_when_older_than_the_log(b: &Backend) {
    let addr = b.addr();
    let chat = "forgetful";
    let t1 = send_ok(addr, chat, "ann", "one");
    let mut stream = SseStream::open(addr, &path(chat), &[]);
    let first = stream.next_event();
    assert_eq!(first.send_time(), t1);
    let last = first.id.clone().expect("id");
    drop(stream);
    std::thread::sleep(Duration::from_millis(1_500));
    edit(addr, chat, t1, "edited while away");
    let mut stream = SseStream::open(addr, &path(chat), &[("Last-Event-ID", &last)]);
    let reset = stream.next_event();
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert_eq!(
        reset.send_time(),
        t1,
        "the message cursor is kept: {reset:?} after {last}"
    );
    let t2 = send_ok(addr, chat, "ann", "two");
    // (The change just before the reset may come again: a replay is
    // harmless, and the client reloads anyway.)
    loop {
        let next = stream.next_event();
        assert_ne!(next.event.as_deref(), Some("reset"), "one reset only");
        if summary(&next) == ("message".into(), t2, "two".into()) {
            break;
        }
        assert_eq!(
            summary(&next),
            ("edit".into(), t1, "edited while away".into())
        );
    }
    edit(addr, chat, t2, "live again");
    assert_eq!(summary(&stream.next_event()).0, "edit");
}

#[test]
fn reset_when_older_than_the_log_on_the_memory_store() {
    reset_when_older_than_the_log(&Backend::memory_with(&["--change-log-retention-s", "1"]));
}

#[test]
fn reset_when_older_than_the_log_on_redis() {
    reset_when_older_than_the_log(&Backend::redis_with(&["--change-log-retention-s", "1"]));
}
