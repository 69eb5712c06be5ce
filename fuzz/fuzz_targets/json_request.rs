//! Gateway JSON: request bodies and query strings in, response bodies out.
//!
//! The input is split at its first NUL byte: before it is the body, after it
//! the query string (no NUL: the whole input is the body, no query).
//!
//! Checked:
//! * `parse_send`, `parse_send_any` and `parse_pull` never panic;
//! * an accepted form or query-string send, re-encoded as a query string,
//!   parses to the same request;
//! * an accepted send body, re-serialised as JSON, parses to the same request;
//! * an accepted pull request, re-written as a percent-encoded query string,
//!   parses to the same request;
//! * `pull_body` (for a `PullResponse` built from the input, strings through
//!   `String::from_utf8_lossy`) and `send_body` are valid JSON holding exactly
//!   the values they were given.

#![no_main]

use im_server::gateway::json::{parse_pull, parse_send, parse_send_any, send_body};
use im_server::gateway::pull_wire::pull_json_of as pull_body;
use im_server::proto::{Message, PullRequest, PullResponse, SendRequest};
use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The same bytes as a form body and as a query string: accepted ones,
/// re-encoded as a query string, parse to the same request.
fn check_send_forms(encoded: &[u8]) {
    for parsed in [
        parse_send_any(encoded, true, None),
        parse_send_any(b"", false, Some(encoded)),
    ] {
        let Ok(req) = parsed else {
            continue;
        };
        let m = req.message.as_ref().expect("parse_send_any fills message");
        let mut q = format!(
            "chat={}&text={}&sender={}",
            percent_encode(&m.chat),
            percent_encode(&m.text),
            percent_encode(&m.sender)
        );
        if !req.idempotency_key.is_empty() {
            q.push_str(&format!(
                "&idempotency_key={}",
                percent_encode(&req.idempotency_key)
            ));
        }
        let back =
            parse_send_any(b"", false, Some(q.as_bytes())).expect("re-encoded query is accepted");
        assert_eq!(back, req, "query {q}");
    }
}

fn check_send(body: &[u8]) {
    check_send_forms(body);
    let Ok(req) = parse_send(body) else {
        return;
    };
    assert_eq!(parse_send_any(body, false, None).as_ref(), Ok(&req));
    let m = req.message.as_ref().expect("parse_send fills message");
    assert_eq!(m.send_time, 0);
    let mut fields = json!({
        "chat": m.chat,
        "text": m.text,
        "sender": m.sender,
    });
    if !req.idempotency_key.is_empty() {
        fields["idempotency_key"] = json!(req.idempotency_key);
    }
    let again = serde_json::to_vec(&fields).expect("serialisable");
    let back: SendRequest = parse_send(&again).expect("re-serialised send body is accepted");
    assert_eq!(back, req);
}

fn check_pull(body: &[u8], query: Option<&[u8]>) {
    let Ok(req) = parse_pull(body, false, query) else {
        return;
    };
    let q = format!(
        "chat={}&cursor={}&limit={}&reverse={}",
        percent_encode(&req.chat),
        req.cursor,
        req.limit,
        req.reverse
    );
    let back: PullRequest =
        parse_pull(b"", false, Some(q.as_bytes())).expect("re-encoded query is accepted");
    assert_eq!(back, req, "query {q}");
    // The same parameters as a JSON body.
    let body = serde_json::to_vec(&json!({
        "chat": req.chat,
        "cursor": req.cursor,
        "limit": req.limit,
        "reverse": req.reverse,
    }))
    .expect("serialisable");
    let back = parse_pull(&body, false, None).expect("re-serialised pull body is accepted");
    assert_eq!(back, req);
}

fn lossy(u: &mut Unstructured<'_>) -> String {
    let bytes = <&[u8]>::arbitrary(u).unwrap_or_default();
    String::from_utf8_lossy(bytes).into_owned()
}

fn build_pull_response(data: &[u8]) -> PullResponse {
    let mut u = Unstructured::new(data);
    let n = u.int_in_range(0..=8u8).unwrap_or(0);
    let mut messages = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        messages.push(Message {
            chat: lossy(&mut u),
            text: lossy(&mut u),
            sender: lossy(&mut u),
            send_time: i64::arbitrary(&mut u).unwrap_or(0),
            edited_at: i64::arbitrary(&mut u).unwrap_or(0),
        });
    }
    PullResponse {
        code: i32::arbitrary(&mut u).unwrap_or(0),
        msg: lossy(&mut u),
        messages,
        has_more: bool::arbitrary(&mut u).unwrap_or(false),
        next_cursor: i64::arbitrary(&mut u).unwrap_or(0),
        changes: None,
    }
}

fn check_pull_body(data: &[u8]) {
    let resp = build_pull_response(data);
    let out = pull_body(&resp);
    let v: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!(
            "pull_body is not valid JSON ({e}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    };
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 3, "unexpected keys: {v}");
    let msgs = v["messages"].as_array().expect("messages is an array");
    assert_eq!(msgs.len(), resp.messages.len());
    for (got, want) in msgs.iter().zip(&resp.messages) {
        // `edited_at` only for an edited message.
        let keys = 4 + usize::from(want.edited_at != 0);
        assert_eq!(got.as_object().expect("message object").len(), keys);
        let edited = got.get("edited_at").and_then(Value::as_i64);
        assert_eq!(edited.unwrap_or(0), want.edited_at);
        assert_eq!(got["chat"].as_str(), Some(want.chat.as_str()));
        assert_eq!(got["text"].as_str(), Some(want.text.as_str()));
        assert_eq!(got["sender"].as_str(), Some(want.sender.as_str()));
        assert_eq!(got["send_time"].as_i64(), Some(want.send_time));
    }
    assert_eq!(v["has_more"].as_bool(), Some(resp.has_more));
    assert_eq!(v["next_cursor"].as_i64(), Some(resp.next_cursor));

    let t = resp.next_cursor;
    let v: Value = serde_json::from_slice(&send_body(t)).expect("send_body is valid JSON");
    assert_eq!(v, json!({ "send_time": t }));
}

fuzz_target!(|data: &[u8]| {
    let (body, query) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    check_send(data);
    if query.is_some() {
        check_send(body);
    }
    check_pull(body, query);
    check_pull(body, None);
    if let Some(q) = query {
        check_pull(b"", Some(q));
    }
    check_pull_body(data);
});
