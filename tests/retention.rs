//! Retention (issue 21): `--retain-messages N` keeps each chat's newest N,
//! `--retain-age-s S` what is younger than S seconds. Reads (pull, stream
//! and edits) never see a message outside the window, trimmed yet or not;
//! sends trim their chat, and a background sweep trims chats nobody writes
//! to. On the embedded store, Redis and a Cluster.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Every message of `chat`, walked both ways (page invariants checked).
fn walk_both(b: &Backend, chat: &str, limit: i64) -> Vec<i64> {
    let mut conn = HttpConn::connect(b.addr());
    let newest: Vec<i64> = walk(&mut conn, chat, limit, false, Form::Json)
        .iter()
        .map(|m| m.send_time)
        .collect();
    let mut oldest: Vec<i64> = walk(&mut conn, chat, limit, true, Form::Query)
        .iter()
        .map(|m| m.send_time)
        .collect();
    oldest.reverse();
    assert_eq!(newest, oldest, "both directions agree");
    newest
}

/// The size of the sorted set `key` (in `chat`'s slot), if the store can
/// be asked (Redis or a Cluster).
fn zcard(b: &Backend, chat: &str, key: &str) -> Option<i64> {
    if let Some(redis) = &b.redis {
        return Some(redis.redis_int(&["ZCARD", key]));
    }
    let cluster = b._cluster.as_ref()?;
    let master = cluster.master_of(cluster.slot_of(chat));
    let reply = cluster.node(master).cmd(&["ZCARD", key]);
    Some(reply.trim_start_matches(':').trim().parse().expect("ZCARD"))
}

/// How many messages the store holds for `chat`, if it can be asked.
fn stored(b: &Backend, chat: &str) -> Option<i64> {
    zcard(b, chat, &format!("im:{{{chat}}}"))
}

/// How many tombstones the store holds for `chat`, if it can be asked.
fn tombstones(b: &Backend, chat: &str) -> Option<i64> {
    zcard(b, chat, &format!("im:del:{{{chat}}}"))
}

/// Sends each deleted at once, 20 times: under count retention the chat
/// keeps the newest 5 tombstones, not one per delete for ever; the last
/// delete, repeated, still answers 200.
fn deletes_keep_bounded_tombstones(b: &Backend) {
    let addr = b.addr();
    let mut conn = HttpConn::connect(addr);
    let mut last = String::new();
    for i in 0..20 {
        let t = conn.send_ok("churn", "s", &format!("gone {i}"));
        last = json!({"chat": "churn", "send_time": t}).to_string();
        let r = conn.request("POST", "/api/delete", JSON_CT, last.as_bytes());
        assert_eq!(r.status, 200, "{}", r.describe());
    }
    let again = conn.request("POST", "/api/delete", JSON_CT, last.as_bytes());
    assert_eq!(again.status, 200, "a repeated delete: {}", again.describe());
    assert_eq!(walk_both(b, "churn", 10), Vec::<i64>::new());
    if let Some(n) = tombstones(b, "churn") {
        assert_eq!(n, 5, "tombstones kept under --retain-messages 5");
    }
}

fn by_count(b: &Backend) {
    deletes_keep_bounded_tombstones(b);
    let addr = b.addr();
    let mut conn = HttpConn::connect(addr);
    let times: Vec<i64> = (0..12)
        .map(|i| conn.send_ok("kept", "s", &format!("m{i}")))
        .collect();
    let want: Vec<i64> = times[7..].iter().rev().copied().collect();
    for limit in [1, 2, 5, 100] {
        assert_eq!(walk_both(b, "kept", limit), want, "limit {limit}");
    }
    if let Some(n) = stored(b, "kept") {
        assert_eq!(n, 5, "trimmed on write");
    }
    let r = request(
        addr,
        "POST",
        "/api/edit",
        &[("Content-Type", "application/json")],
        json!({"chat": "kept", "send_time": times[0], "text": "x"})
            .to_string()
            .as_bytes(),
    );
    assert_error(&r, 404, "an edit of a trimmed message");
}

#[test]
fn by_count_on_the_memory_store() {
    by_count(&Backend::memory_with(&["--retain-messages", "5"]));
}

#[test]
fn by_count_on_redis() {
    by_count(&Backend::redis_with(&["--retain-messages", "5"]));
}

#[test]
fn by_count_on_a_cluster() {
    by_count(&Backend::cluster_with(&["--retain-messages", "5"]));
}

/// Messages older than 2 s vanish from reads at once, and from the store
/// by the sweep (and, amortised, by sends to their chat).
fn by_age(b: &Backend) {
    let addr = b.addr();
    let mut conn = HttpConn::connect(addr);
    let old: Vec<i64> = (0..5)
        .map(|i| conn.send_ok("aging", "s", &format!("o{i}")))
        .collect();
    let headers = [("Content-Type", "application/json")];
    let deleted = json!({"chat": "aging", "send_time": old[4]}).to_string();
    assert_eq!(
        request(addr, "POST", "/api/delete", &headers, deleted.as_bytes()).status,
        200
    );
    for i in 0..4 {
        conn.send_ok("idle", "s", &format!("i{i}"));
    }
    assert_eq!(walk_both(b, "aging", 2).len(), 4);
    std::thread::sleep(Duration::from_millis(2_300));
    assert_eq!(
        walk_both(b, "aging", 2),
        Vec::<i64>::new(),
        "outside the window"
    );
    assert_eq!(
        walk_both(b, "idle", 2),
        Vec::<i64>::new(),
        "outside the window"
    );
    let r = request(
        addr,
        "POST",
        "/api/delete",
        &[("Content-Type", "application/json")],
        json!({"chat": "aging", "send_time": old[0]})
            .to_string()
            .as_bytes(),
    );
    assert_error(&r, 404, "a delete of an expired message");
    let fresh = conn.send_ok("aging", "s", "new");
    assert_eq!(walk_both(b, "aging", 2), [fresh]);
    // (By age, a send trims its chat in one run of 16: amortised.)
    if stored(b, "aging").is_some() {
        wait_until(Duration::from_secs(30), "the sweep trims the chats", || {
            // ("new" itself may have expired by then too.)
            let aging = stored(b, "aging").unwrap_or(-1);
            (stored(b, "idle") == Some(0) && (0..=1).contains(&aging)).then_some(())
        });
        if let Some(redis) = &b.redis {
            assert_eq!(
                redis.redis_int(&["EXISTS", "im:del:{aging}"]),
                0,
                "the expired message's tombstone went with it"
            );
        }
    }
}

#[test]
fn by_age_on_the_memory_store() {
    by_age(&Backend::memory_with(&["--retain-age-s", "2"]));
}

#[test]
fn by_age_on_redis() {
    by_age(&Backend::redis_with(&["--retain-age-s", "2"]));
}

#[test]
fn by_age_on_a_cluster() {
    by_age(&Backend::cluster_with(&["--retain-age-s", "2"]));
}
