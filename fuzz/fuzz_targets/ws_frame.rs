//! The WebSocket frame codec (`ws::frame::Decoder`) and the connection
//! policy (`ws::conn::WsConn`) under arbitrary client bytes.
//!
//! Input layout: `[split seed, max selector, ...frames]`:
//! * split seed: the input is fed in chunks whose sizes come from it (0:
//!   all at once);
//! * max selector: the message limit, `(selector as usize + 1) * 16` bytes
//!   (up to 4 KiB), so the 1009 path is reached.
//!
//! Checked, beyond never panicking:
//! * chunked decoding == one-shot decoding (the same messages, then the
//!   same error or the same end);
//! * a text message is UTF-8, a control payload at most 125 bytes, a
//!   message at most the limit;
//! * every decoded message re-encoded as a client frame decodes to itself;
//! * the connection policy's output (pongs, close) is a valid stream of
//!   server frames holding at most one close, which comes last, and after
//!   a close nothing more is read.

#![no_main]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use im_server::ws::conn::{Settings, WsConn};
use im_server::ws::frame::{Decoder, FrameError, Incoming, Side, opcode, put_client_frame};
use libfuzzer_sys::fuzz_target;

/// Every message decoded from `chunks`, then the error if one ended it.
fn decode(chunks: &[&[u8]], max: usize) -> (Vec<Incoming>, Option<FrameError>) {
    let mut decoder = Decoder::new(Side::Server, max);
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        input.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(err) => return (out, Some(err)),
            }
        }
    }
    (out, None)
}

fn check(message: &Incoming, max: usize) {
    match message {
        Incoming::Text(t) => {
            assert!(std::str::from_utf8(t).is_ok());
            assert!(t.len() <= max);
        }
        Incoming::Binary(b) => assert!(b.len() <= max),
        Incoming::Ping(p) | Incoming::Pong(p) => assert!(p.len() <= 125),
        Incoming::Close(Some((_, reason))) => assert!(reason.len() <= 123),
        Incoming::Close(None) => {}
    }
}

/// `message` as one masked client frame, decoded again.
fn round_trip(message: &Incoming, max: usize) {
    let (op, payload): (u8, Vec<u8>) = match message {
        Incoming::Text(t) => (opcode::TEXT, t.to_vec()),
        Incoming::Binary(b) => (opcode::BINARY, b.to_vec()),
        Incoming::Ping(p) => (opcode::PING, p.to_vec()),
        Incoming::Pong(p) => (opcode::PONG, p.to_vec()),
        Incoming::Close(None) => (opcode::CLOSE, Vec::new()),
        Incoming::Close(Some((code, reason))) => {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(reason.as_bytes());
            (opcode::CLOSE, body)
        }
    };
    let mut wire = BytesMut::new();
    put_client_frame(&mut wire, true, op, &payload, [0xA5, 0x5A, 0x01, 0xFE]);
    let (again, err) = decode(&[&wire], max);
    assert_eq!(err, None);
    assert_eq!(again.as_slice(), std::slice::from_ref(message));
}

/// Drives the policy over the chunks; checks what it sends.
fn drive(chunks: &[&[u8]], max: usize) {
    let settings = Settings {
        max_message: max,
        ping_after: Duration::from_secs(30),
        write_timeout: Duration::from_secs(10),
    };
    let now = Instant::now();
    let mut conn = WsConn::new(settings, now);
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in chunks {
        if !conn.reads() {
            break;
        }
        input.extend_from_slice(chunk);
        while conn.received(&mut input, &mut out, now).is_some() {}
    }
    conn.next(now, &mut out);
    let mut client = Decoder::new(Side::Client, 1 << 20);
    let mut closes = 0;
    while let Some(frame) = client.decode(&mut out).expect("the server's frames are valid") {
        assert_eq!(closes, 0, "nothing after a close");
        if matches!(frame, Incoming::Close(_)) {
            closes += 1;
        }
    }
    assert!(out.is_empty(), "the output is whole frames");
}

fuzz_target!(|data: &[u8]| {
    let [split, selector, wire @ ..] = data else {
        return;
    };
    let max = (*selector as usize + 1) * 16;
    let mut chunks = Vec::new();
    let mut rest = wire;
    let mut seed = *split as usize;
    while !rest.is_empty() {
        let n = if *split == 0 { rest.len() } else { 1 + seed % 97 }.min(rest.len());
        seed = seed.wrapping_mul(31).wrapping_add(7);
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    let (whole, whole_err) = decode(&[wire], max);
    let (split_msgs, split_err) = decode(&chunks, max);
    assert_eq!(whole, split_msgs);
    assert_eq!(whole_err, split_err);
    for message in &whole {
        check(message, max);
        round_trip(message, max);
    }
    drive(&chunks, max);
});
