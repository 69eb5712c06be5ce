//! HTTP/1.1 request decoder: arbitrary bytes, fed in arbitrary chunks, under
//! arbitrary (often tiny) limits.
//!
//! Input layout: `[chunk seed, limits mode, head seed, headers seed, body
//! seed, request-line seed, wire bytes...]`. A chunk seed of 0 feeds the whole wire at once.
//!
//! Checked:
//! * no panic;
//! * `decode` never grows the buffer, so it never consumes more than given,
//!   and each request accounts for at least its target and body bytes;
//! * a decoded body is at most `max_body`;
//! * `take_expect_continue` is true at most once per request, and only while
//!   a body is pending;
//! * `path_and_query` returns slices that fit in the target;
//! * after `Ok(None)`, decoding again without new bytes is still `Ok(None)`;
//! * the requests decoded (and whether decoding fails) do not depend on how
//!   the bytes were split: the chunked run equals a one-shot run.

#![no_main]

use bytes::BytesMut;
use im_server::http::codec::{HttpError, Limits, Request, RequestDecoder};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 6;

fn limits(mode: u8, head: u8, headers: u8, body: u8, line: u8) -> Limits {
    match mode % 4 {
        0 => Limits::default(),
        // Tiny limits: every limit path is a few bytes away.
        1 => Limits {
            max_head: 8 + usize::from(head),
            max_headers: usize::from(headers % 8),
            max_body: usize::from(body),
            max_request_line: 4 + usize::from(line),
        },
        // Medium limits; max_headers may exceed MAX_HEADERS_CAP (128).
        2 => Limits {
            max_head: 16 + usize::from(head) * 16,
            max_headers: usize::from(headers),
            max_body: usize::from(body) * 8,
            max_request_line: 8 + usize::from(line) * 16,
        },
        // Edge values, each limit independently: tiny, default or huge.
        _ => {
            let d = Limits::default();
            Limits {
                // --max-header-bytes is at least 1. With 0, the lone CR of a
                // CRLF between requests, when it arrives alone, is over the
                // limit (an error) while the whole CRLF is skipped: a split
                // dependence only a zero limit can show.
                max_head: edge(head, d.max_head).max(1),
                max_headers: edge(headers, d.max_headers),
                max_body: edge(body, d.max_body),
                // Likewise (and it is not configurable: always the default).
                max_request_line: edge(line, d.max_request_line).max(1),
            }
        }
    }
}

/// `seed & 3`: 0 tiny (0..=7), 1 the default, 2 `usize::MAX`, 3 `usize::MAX - 1`.
/// (`usize::MAX` used to overflow `max + 1` in src/http/codec.rs: see
/// fuzz/regressions/http_request/.)
fn edge(seed: u8, default: usize) -> usize {
    match seed & 3 {
        0 => usize::from(seed >> 2) % 8,
        1 => default,
        2 => usize::MAX,
        _ => usize::MAX - 1,
    }
}

/// Chunk sizes derived from the seed byte (xorshift, so any split pattern is
/// reachable and reproducible from the input alone).
struct Chunks {
    state: u32,
    max: usize,
}

impl Chunks {
    fn new(seed: u8) -> Self {
        let max = match seed >> 6 {
            0 => 1,
            1 => 3,
            2 => 16,
            _ => 128,
        };
        Chunks {
            state: 0x9e37_79b9 ^ u32::from(seed).wrapping_mul(0x0101_0101),
            max,
        }
    }

    fn next(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + (self.state as usize % self.max)
    }
}

#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<Request>,
    failed: bool,
}

fn check_request(req: &Request, limits: &Limits, consumed: usize) {
    assert!(
        req.body.len() <= limits.max_body,
        "body of {} bytes over max_body {}",
        req.body.len(),
        limits.max_body
    );
    assert!(
        consumed >= req.target.len() + req.body.len(),
        "request accounts for {} bytes but only {consumed} were consumed",
        req.target.len() + req.body.len()
    );
    let (path, query) = req.path_and_query();
    let used = path.len() + query.map_or(0, |q| q.len() + 1);
    assert!(
        used <= req.target.len(),
        "path_and_query outgrew the target"
    );
    let target = req.target.as_ptr_range();
    for part in std::iter::once(path).chain(query) {
        let r = part.as_ptr_range();
        assert!(
            part.is_empty() || (r.start >= target.start && r.end <= target.end) || part == b"/",
            "path_and_query returned bytes outside the target"
        );
    }
}

/// Runs the decoder on `buf` until it needs more bytes or fails.
/// Returns false once the connection would be closed (an error).
fn drain(
    dec: &mut RequestDecoder,
    buf: &mut BytesMut,
    limits: &Limits,
    consumed_since_last: &mut usize,
    out: &mut Vec<Request>,
) -> bool {
    loop {
        let before = buf.len();
        let result: Result<Option<Request>, HttpError> = dec.decode(buf);
        let after = buf.len();
        assert!(
            after <= before,
            "decode grew the buffer: {before} -> {after}"
        );
        *consumed_since_last += before - after;
        match result {
            Ok(Some(req)) => {
                check_request(&req, limits, *consumed_since_last);
                *consumed_since_last = 0;
                // A finished request leaves no pending 100-continue.
                assert!(!dec.in_body());
                assert!(!dec.take_expect_continue());
                out.push(req);
            }
            Ok(None) => {
                if dec.take_expect_continue() {
                    assert!(dec.in_body(), "100-continue without a pending body");
                    assert!(!dec.take_expect_continue(), "100-continue given twice");
                }
                let again = buf.len();
                let second = dec.decode(buf);
                assert!(
                    matches!(second, Ok(None)),
                    "decode without new bytes changed its answer: {second:?}"
                );
                assert!(buf.len() <= again);
                *consumed_since_last += again - buf.len();
                return true;
            }
            Err(_) => return false,
        }
    }
}

fn run(wire: &[u8], limits: Limits, chunks: Option<Chunks>) -> Outcome {
    let mut dec = RequestDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    let mut consumed = 0;
    let mut rest = wire;
    let mut chunks = chunks;
    while !rest.is_empty() {
        let n = match chunks.as_mut() {
            Some(c) => c.next().min(rest.len()),
            None => rest.len(),
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        if !drain(&mut dec, &mut buf, &limits, &mut consumed, &mut requests) {
            return Outcome {
                requests,
                failed: true,
            };
        }
    }
    Outcome {
        requests,
        failed: false,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let limits = limits(data[1], data[2], data[3], data[4], data[5]);
    let wire = &data[HEADER..];
    let whole = run(wire, limits, None);
    if data[0] != 0 {
        let split = run(wire, limits, Some(Chunks::new(data[0])));
        assert_eq!(
            split, whole,
            "split decoding disagrees with one-shot decoding (limits {limits:?})"
        );
    }
});
