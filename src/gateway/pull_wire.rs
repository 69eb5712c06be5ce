//! `PullResponse` protobuf straight to the pull JSON body, without building
//! the message structs: no allocation per message, strings copied once (into
//! the JSON). Decoding into `Message`s first cost the gateway 1.6 µs of its 13.4 µs
//! per pull (bench/run), allocating and freeing strings it only printed.
//!
//! Fields are read as protobuf defines them: any order, unknown ones skipped,
//! the last value of a repeated scalar wins.

use bytes::{Bytes, BytesMut};

use super::json::{put_i64, put_str};
use crate::error::CODE_OK;
use crate::http::response::BodySource;
use crate::proto::PullResponse;
use crate::proto::fields::{message, pull_response};
use crate::wire::{Malformed, Value, next_field, text};

/// Replies over this many wire bytes are rendered as the connection drains
/// ([`PullStream`]) rather than whole: rendering costs a second pass (for
/// Content-Length), worth it only where the whole JSON would be megabytes.
pub const STREAM_OVER: usize = 256 * 1024;

/// The pull body, whole or to be streamed.
pub enum PullBody {
    Whole(Vec<u8>),
    Stream(PullStream),
}

/// [`pull_json`] for an owned reply; large pages become a [`PullStream`].
pub fn pull_body(wire: Bytes) -> Result<Result<PullBody, Failed>, Malformed> {
    if wire.len() <= STREAM_OVER {
        return Ok(pull_json(&wire)?.map(PullBody::Whole));
    }
    let scalars = scalars(&wire)?;
    if scalars.code != CODE_OK {
        return Ok(Err(Failed {
            code: scalars.code,
            msg: scalars.msg,
        }));
    }
    // Not a view into the RPC connection's read buffer (which may be several
    // times larger, and would be pinned for as long as a slow client takes
    // to read): the RPC client copied it out when it charged it to the
    // memory budget ([`crate::rpc::client`]).
    Ok(Ok(PullBody::Stream(PullStream::new(wire, &scalars)?)))
}

/// The JSON of a pull page, rendered a message at a time into the output.
pub struct PullStream {
    wire: Bytes,
    /// Wire bytes already rendered.
    pos: usize,
    /// `{"messages":[` still to be written.
    opened: bool,
    /// Messages rendered so far (for the separating commas).
    rendered: usize,
    /// `],"has_more":…}`, written after the last message.
    tail: Vec<u8>,
    len: usize,
    /// One message's JSON; reused.
    scratch: Vec<u8>,
}

const HEAD: &[u8] = b"{\"messages\":[";

impl PullStream {
    fn new(wire: Bytes, scalars: &Scalars) -> Result<PullStream, Malformed> {
        let mut tail = Vec::with_capacity(64);
        tail.extend_from_slice(if scalars.has_more {
            b"],\"has_more\":true,\"next_cursor\":"
        } else {
            b"],\"has_more\":false,\"next_cursor\":"
        });
        put_i64(&mut tail, scalars.next_cursor);
        tail.push(b'}');
        // Length pass: render each message into the scratch buffer and
        // count; this also finds malformed messages before the head is sent.
        let mut scratch = Vec::new();
        let mut len = HEAD.len() + tail.len() + scalars.count.saturating_sub(1);
        let mut rest = &wire[..];
        while !rest.is_empty() {
            if let (pull_response::MESSAGES, Value::Bytes(message)) = next_field(&mut rest)? {
                scratch.clear();
                write_message(&mut scratch, message)?;
                len += scratch.len();
            }
        }
        Ok(PullStream {
            wire,
            pos: 0,
            opened: false,
            rendered: 0,
            tail,
            len,
            scratch,
        })
    }
}

impl BodySource for PullStream {
    fn len(&self) -> usize {
        self.len
    }

    fn fill(&mut self, out: &mut BytesMut, until: usize) -> bool {
        if !self.opened {
            out.extend_from_slice(HEAD);
            self.opened = true;
        }
        while out.len() < until {
            let mut rest = &self.wire[self.pos..];
            if rest.is_empty() {
                out.extend_from_slice(&self.tail);
                return true;
            }
            // Validated by the length pass in `new`.
            let Ok(field) = next_field(&mut rest) else {
                return true;
            };
            self.pos = self.wire.len() - rest.len();
            if let (pull_response::MESSAGES, Value::Bytes(message)) = field {
                self.scratch.clear();
                if write_message(&mut self.scratch, message).is_err() {
                    return true;
                }
                if self.rendered > 0 {
                    out.extend_from_slice(b",");
                }
                self.rendered += 1;
                out.extend_from_slice(&self.scratch);
            }
        }
        false
    }
}

/// The scalar fields of a `PullResponse`, and how many messages it holds.
pub(super) struct Scalars {
    pub code: i32,
    pub msg: String,
    has_more: bool,
    next_cursor: i64,
    pub count: usize,
}

pub(super) fn scalars(mut wire: &[u8]) -> Result<Scalars, Malformed> {
    let (mut code, mut msg, mut has_more, mut next_cursor, mut count) =
        (0i32, "", false, 0i64, 0usize);
    while !wire.is_empty() {
        match next_field(&mut wire)? {
            (pull_response::CODE, Value::Varint(v)) => code = v as i32,
            (pull_response::MSG, Value::Bytes(b)) => msg = text(b)?,
            (pull_response::MESSAGES, Value::Bytes(_)) => count += 1,
            (pull_response::HAS_MORE, Value::Varint(v)) => has_more = v != 0,
            (pull_response::NEXT_CURSOR, Value::Varint(v)) => next_cursor = v as i64,
            (
                pull_response::CODE
                | pull_response::MSG
                | pull_response::MESSAGES
                | pull_response::HAS_MORE
                | pull_response::NEXT_CURSOR,
                _,
            ) => return Err(Malformed("field of the wrong type")),
            _ => {}
        }
    }
    Ok(Scalars {
        code,
        msg: msg.to_string(),
        has_more,
        next_cursor,
        count,
    })
}

/// What the wire held, when the response is an error.
#[derive(Debug, PartialEq, Eq)]
pub struct Failed {
    pub code: i32,
    pub msg: String,
}

/// The JSON body `{"messages":[...],"has_more":B,"next_cursor":N}` for an
/// OK response, or the code and message of a failed one.
pub fn pull_json(wire: &[u8]) -> Result<Result<Vec<u8>, Failed>, Malformed> {
    let whole = wire;
    // First pass: the scalars, which may come anywhere.
    let Scalars {
        code,
        msg,
        has_more,
        next_cursor,
        count,
    } = scalars(wire)?;
    if code != CODE_OK {
        return Ok(Err(Failed { code, msg }));
    }
    // Second pass: each message, written as it is read.
    let mut out = Vec::with_capacity(64 + whole.len() + count * 48);
    out.extend_from_slice(b"{\"messages\":[");
    let mut wire = whole;
    let mut first = true;
    while !wire.is_empty() {
        if let (pull_response::MESSAGES, Value::Bytes(message)) = next_field(&mut wire)? {
            if !first {
                out.push(b',');
            }
            first = false;
            write_message(&mut out, message)?;
        }
    }
    out.extend_from_slice(if has_more {
        b"],\"has_more\":true,\"next_cursor\":"
    } else {
        b"],\"has_more\":false,\"next_cursor\":"
    });
    put_i64(&mut out, next_cursor);
    out.push(b'}');
    Ok(Ok(out))
}

/// [`pull_json`] of a decoded response (its code and msg ignored): for
/// tests and fuzzing, through the same code the gateway runs on the wire.
pub fn pull_json_of(resp: &PullResponse) -> Vec<u8> {
    use prost::Message as _;
    let ok = PullResponse {
        code: 0,
        msg: String::new(),
        ..resp.clone()
    };
    match pull_json(&ok.encode_to_vec()) {
        Ok(Ok(body)) => body,
        // Unreachable: prost's own encoding of a code-0 response.
        _ => b"{\"messages\":[],\"has_more\":false,\"next_cursor\":0}".to_vec(),
    }
}

/// Writes one message's JSON object; returns its send_time.
pub fn write_message(out: &mut Vec<u8>, mut wire: &[u8]) -> Result<i64, Malformed> {
    let (mut chat, mut message_text, mut sender, mut send_time) = ("", "", "", 0i64);
    let mut edited_at = 0i64;
    while !wire.is_empty() {
        match next_field(&mut wire)? {
            (message::CHAT, Value::Bytes(b)) => chat = text(b)?,
            (message::TEXT, Value::Bytes(b)) => message_text = text(b)?,
            (message::SENDER, Value::Bytes(b)) => sender = text(b)?,
            (message::SEND_TIME, Value::Varint(v)) => send_time = v as i64,
            (message::EDITED_AT, Value::Varint(v)) => edited_at = v as i64,
            (
                message::CHAT
                | message::TEXT
                | message::SENDER
                | message::SEND_TIME
                | message::EDITED_AT,
                _,
            ) => {
                return Err(Malformed("message field of the wrong type"));
            }
            _ => {}
        }
    }
    out.extend_from_slice(b"{\"chat\":");
    put_str(out, chat);
    out.extend_from_slice(b",\"text\":");
    put_str(out, message_text);
    out.extend_from_slice(b",\"sender\":");
    put_str(out, sender);
    out.extend_from_slice(b",\"send_time\":");
    put_i64(out, send_time);
    // Only on an edited message: the seed's clients see the fields they know.
    if edited_at != 0 {
        out.extend_from_slice(b",\"edited_at\":");
        put_i64(out, edited_at);
    }
    out.push(b'}');
    Ok(send_time)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::Message;

    fn page() -> PullResponse {
        PullResponse {
            messages: vec![
                Message {
                    chat: "a:b".into(),
                    text: "quote \" backslash \\ newline \n emoji 😀".into(),
                    sender: "a".into(),
                    send_time: 1_700_000_000_000_002,
                    edited_at: 0,
                },
                Message {
                    chat: "a:b".into(),
                    text: String::new(),
                    sender: "b".into(),
                    send_time: 1_700_000_000_000_001,
                    edited_at: 1_700_000_000_000_009,
                },
            ],
            has_more: true,
            next_cursor: 1_700_000_000_000_001,
            ..PullResponse::default()
        }
    }

    #[test]
    fn matches_the_decoded_form() {
        let resp = page();
        let json = pull_json(&resp.encode_to_vec())
            .expect("well formed")
            .expect("ok");
        let parsed: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        for (i, m) in resp.messages.iter().enumerate() {
            assert_eq!(parsed["messages"][i]["chat"], m.chat.as_str());
            assert_eq!(parsed["messages"][i]["text"], m.text.as_str());
            assert_eq!(parsed["messages"][i]["sender"], m.sender.as_str());
            assert_eq!(parsed["messages"][i]["send_time"], m.send_time);
            // Only an edited message carries `edited_at`.
            match m.edited_at {
                0 => assert!(parsed["messages"][i].get("edited_at").is_none()),
                t => assert_eq!(parsed["messages"][i]["edited_at"], t),
            }
        }
        assert_eq!(parsed["has_more"], true);
        assert_eq!(parsed["next_cursor"], 1_700_000_000_000_001i64);
        let empty = pull_json(&PullResponse::default().encode_to_vec()).expect("well formed");
        assert_eq!(
            empty,
            Ok(br#"{"messages":[],"has_more":false,"next_cursor":0}"#.to_vec())
        );
    }

    #[test]
    fn streamed_body_matches_the_whole_one() {
        let mut resp = page();
        let big = "\u{1}".repeat(64 * 1024);
        for i in 0..8 {
            resp.messages.push(Message {
                chat: "c".into(),
                text: big.clone(),
                sender: format!("s{i}"),
                send_time: i,
                edited_at: 0,
            });
        }
        let wire = resp.encode_to_vec();
        assert!(wire.len() > STREAM_OVER);
        let whole = pull_json(&wire).expect("well formed").expect("ok");
        for until in [1, 1000, 300_000, usize::MAX] {
            let Ok(Ok(PullBody::Stream(mut stream))) = pull_body(Bytes::from(wire.clone())) else {
                panic!("a large page is streamed");
            };
            assert_eq!(stream.len(), whole.len());
            let mut out = BytesMut::new();
            let mut all = Vec::new();
            let mut parts = 0;
            while !stream.fill(&mut out, until) {
                all.extend_from_slice(&out);
                out.clear();
                parts += 1;
                assert!(parts < 10_000, "fill makes progress");
            }
            all.extend_from_slice(&out);
            assert_eq!(&all[..], &whole[..], "until={until}");
        }
    }

    #[test]
    fn failures_and_garbage() {
        let failed = PullResponse {
            code: 2,
            msg: "down".into(),
            ..PullResponse::default()
        };
        assert_eq!(
            pull_json(&failed.encode_to_vec()),
            Ok(Err(Failed {
                code: 2,
                msg: "down".into()
            }))
        );
        let wire = page().encode_to_vec();
        for cut in 1..wire.len() {
            // Truncation anywhere either still parses (at a field boundary) or is an error; never a panic.
            let _ = pull_json(&wire[..cut]);
        }
        assert!(
            pull_json(&[0x1a, 0x05, 0x0a, 0x03, 0xff, 0xfe, 0xfd]).is_err(),
            "invalid UTF-8"
        );
        assert!(pull_json(&[0x0b]).is_err(), "group");
    }

    #[test]
    fn pull_json_of_is_valid_json() {
        let resp = PullResponse {
            messages: vec![Message {
                chat: "a:b".into(),
                text: "quote \" backslash \\ newline \n emoji 😀".into(),
                sender: "a".into(),
                send_time: 1_700_000_000_000_001,
                edited_at: 0,
            }],
            has_more: true,
            next_cursor: 1_700_000_000_000_001,
            ..PullResponse::default()
        };
        let parsed: serde_json::Value =
            serde_json::from_slice(&pull_json_of(&resp)).expect("valid JSON");
        assert_eq!(
            parsed["messages"][0]["text"],
            resp.messages[0].text.as_str()
        );
        assert_eq!(parsed["next_cursor"], 1_700_000_000_000_001i64);
        assert_eq!(parsed["has_more"], true);
    }
}
