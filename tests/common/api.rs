//! The IM API seen from a client: messages, pages, walking a chat.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::*;
use serde_json::{Value, json};

/// Microseconds since the Unix epoch, from the test's own clock (the unit of `send_time`).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_micros() as i64
}

/// The JSON body of a send.
pub fn send_body(chat: &str, sender: &str, text: &str) -> String {
    json!({"chat": chat, "text": text, "sender": sender}).to_string()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub chat: String,
    pub text: String,
    pub sender: String,
    pub send_time: i64,
    /// Only on an edited message.
    pub edited_at: Option<i64>,
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
                edited_at: m.get("edited_at").map(|e| {
                    e.as_i64()
                        .unwrap_or_else(|| panic!("{ctx}: edited_at not an integer in {m}"))
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
