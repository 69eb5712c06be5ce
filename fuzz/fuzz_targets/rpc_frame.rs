//! RPC frame codec plus the protobuf messages carried in frame bodies.
//!
//! Input layout: `[max_frame selector, split seed, wire bytes...]`.
//!
//! Checked:
//! * no panic;
//! * each decoded frame fits `max_frame` and consumed exactly
//!   `4 + 9 + body.len()` bytes; `Ok(None)` consumes nothing;
//! * decoding the wire in two parts (split point from the input) gives the
//!   same frames and the same error as decoding it at once;
//! * every body that decodes as `SendRequest`, `PullRequest`, `SendResponse`
//!   or `PullResponse` round-trips through `frame::encode` + `frame::decode`
//!   with the same id, method-or-status byte and message;
//! * every frame round-trips byte-for-byte through `frame::encode_raw`.

#![no_main]

use bytes::BytesMut;
use im_server::proto::{PullRequest, PullResponse, SendRequest, SendResponse};
use im_server::config::Config;
use im_server::rpc::frame::{self, Frame, FrameError};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 2;

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    error: Option<FrameError>,
}

/// Decodes frames off `buf` until more bytes are needed or it fails.
fn drain(buf: &mut BytesMut, max_frame: usize, out: &mut Outcome) -> bool {
    loop {
        let before = buf.len();
        match frame::decode(buf, max_frame) {
            Ok(Some(f)) => {
                assert!(9 + f.body.len() <= max_frame, "frame over max_frame");
                assert_eq!(before - buf.len(), 4 + 9 + f.body.len(), "bytes consumed");
                out.frames.push(f);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                if buf.len() >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    assert!(buf.len() < 4 + len, "Ok(None) with a whole frame buffered");
                }
                return true;
            }
            Err(e) => {
                assert_eq!(buf.len(), before, "Err consumed bytes");
                out.error = Some(e);
                return false;
            }
        }
    }
}

fn decode_in_parts(parts: &[&[u8]], max_frame: usize) -> Outcome {
    let mut out = Outcome {
        frames: Vec::new(),
        error: None,
    };
    let mut buf = BytesMut::new();
    for part in parts {
        buf.extend_from_slice(part);
        if !drain(&mut buf, max_frame, &mut out) {
            break;
        }
    }
    out
}

/// If `frame.body` decodes as `M`, re-encode it as a frame and decode that.
fn round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(f: &Frame) {
    let Ok(msg) = M::decode(f.body.clone()) else {
        return;
    };
    let mut wire = BytesMut::new();
    frame::encode(&mut wire, f.id, f.method_or_status, &msg);
    assert_eq!(wire.len(), 4 + 9 + msg.encoded_len());
    let back = frame::decode(&mut wire, Config::defaults().max_frame)
        .expect("re-encoded frame is valid")
        .expect("re-encoded frame is complete");
    assert!(wire.is_empty(), "re-encoded frame left bytes behind");
    assert_eq!((back.id, back.method_or_status), (f.id, f.method_or_status));
    assert_eq!(&back.body[..], &msg.encode_to_vec()[..]);
    let again = M::decode(back.body).expect("re-encoded body decodes");
    assert_eq!(again, msg, "message changed across a frame round trip");
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let max_frame = if data[0] & 0x80 == 0 {
        Config::defaults().max_frame
    } else {
        usize::from(data[0] & 0x7f) * 4
    };
    let wire = &data[HEADER..];
    let whole = decode_in_parts(&[wire], max_frame);
    let split_at = usize::from(data[1]) % (wire.len() + 1);
    let (a, b) = wire.split_at(split_at);
    let split = decode_in_parts(&[a, b], max_frame);
    assert_eq!(
        split, whole,
        "split decoding disagrees (split at {split_at})"
    );

    for f in &whole.frames {
        let mut raw = BytesMut::new();
        frame::encode_raw(&mut raw, f.id, f.method_or_status, &f.body);
        let back = frame::decode(&mut raw, max_frame)
            .expect("raw re-encoding is valid")
            .expect("raw re-encoding is complete");
        assert_eq!(&back, f);
        assert!(raw.is_empty());

        round_trip::<SendRequest>(f);
        round_trip::<PullRequest>(f);
        round_trip::<SendResponse>(f);
        round_trip::<PullResponse>(f);
    }
});
