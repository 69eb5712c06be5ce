//! RESP2 reply decoding (on `redis-protocol`), as the Redis connection does it.
//!
//! Input layout: `[split seed, wire bytes...]`; a seed of 0 feeds the whole
//! wire at once only.
//!
//! Checked:
//! * no panic, no endless loop: every `Ok(Some(_))` consumes bytes, and
//!   `Ok(None)` consumes none;
//! * decoding the wire in chunks (sizes from the seed) gives the same replies
//!   as decoding it at once, and fails iff the one-shot decoding fails.

#![no_main]

use bytes::BytesMut;
use im_server::resp::Reply;
use im_server::resp::protocol::decode_reply;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
struct Outcome {
    replies: Vec<Reply>,
    failed: bool,
}

fn drain(buf: &mut BytesMut, out: &mut Outcome) -> bool {
    loop {
        let before = buf.len();
        match decode_reply(buf) {
            Ok(Some(reply)) => {
                assert!(buf.len() < before, "a reply decoded from no bytes");
                out.replies.push(reply);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return true;
            }
            Err(_) => return false,
        }
    }
}

fn run(wire: &[u8], seed: Option<u8>) -> Outcome {
    let mut out = Outcome {
        replies: Vec::new(),
        failed: false,
    };
    let mut buf = BytesMut::new();
    let mut state = 0x2545_f491u32 ^ u32::from(seed.unwrap_or(0)).wrapping_mul(0x0101_0101);
    let max = match seed.unwrap_or(0) >> 6 {
        0 => 1,
        1 => 3,
        2 => 16,
        _ => 128,
    };
    let mut rest = wire;
    while !rest.is_empty() {
        let n = match seed {
            None => rest.len(),
            Some(_) => {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (1 + state as usize % max).min(rest.len())
            }
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        if !drain(&mut buf, &mut out) {
            out.failed = true;
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, wire)) = data.split_first() else {
        return;
    };
    let whole = run(wire, None);
    if seed != 0 {
        let split = run(wire, Some(seed));
        assert_eq!(
            split, whole,
            "split decoding disagrees with one-shot decoding"
        );
    }
});
