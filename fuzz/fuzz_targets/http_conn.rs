//! The HTTP connection policy (`http::conn::Conn`) under arbitrary input
//! bytes, arbitrary read splits, arbitrary time steps and arbitrary output
//! backlog (a peer that reads slowly or not at all).
//!
//! Input layout: a sequence of steps, each `[op, arg, ...]`:
//! * op % 4 == 0: `arg` bytes of the rest of the input arrive (a read);
//! * op % 4 == 1: `arg * 50` ms pass;
//! * op % 4 == 2: the driver's output backlog becomes `arg * 64 KiB`;
//! * op % 4 == 3: the next finished response is `arg * 256 KiB` long
//!   (0: 20 bytes), status 504 if `arg` is odd, and closes if `arg == 255`.
//!
//! Checked, with the driver simulated as server.rs runs it:
//! * no panic, and `next` never loops without progress;
//! * responses are finished in request order and never more than started;
//! * an unsafe request (not GET/HEAD) never starts beside another request,
//!   and nothing starts beside it;
//! * at most `MAX_PIPELINE` requests in flight;
//! * a read is asked for only with nothing in flight and no output queued,
//!   and its deadline lies ahead; an expired deadline ends the connection.

#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use im_server::http::codec::{Limits, Method};
use im_server::http::conn::{Action, Conn, Finished, MAX_PIPELINE, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let settings = Settings {
        limits: Limits::default(),
        idle_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(10),
        max_output: 4 * 1024 * 1024,
        // Every other GET claims a big reply: both admission paths are driven.
        reply_bound: |req| if req.target.len() % 2 == 0 { 1 << 20 } else { 0 },
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut conn = Conn::new(settings, t0);
    let mut steps = data;
    let mut in_flight: VecDeque<bool> = VecDeque::new();
    let mut output = 0usize;
    let mut next_len = 20usize;
    let mut next_status = 200u16;
    let mut next_close = false;
    let mut since_progress = 0;
    loop {
        since_progress += 1;
        assert!(since_progress < 1000, "no progress");
        match conn.next(now, output) {
            Action::Start(req) => {
                let safe = matches!(req.method, Method::Get | Method::Head);
                assert!(in_flight.is_empty() || (safe && in_flight.iter().all(|&s| s)));
                in_flight.push_back(safe);
                assert!(in_flight.len() <= MAX_PIPELINE);
            }
            Action::Finish => {
                assert!(in_flight.pop_front().is_some());
                let done = Finished {
                    status: next_status,
                    body_len: next_len,
                    close: next_close,
                };
                if !conn.finished(done, false).keep_alive {
                    in_flight.clear();
                }
                output += next_len.min(settings.max_output);
            }
            Action::Flush => {
                assert!(output > 0);
                output = 0;
            }
            Action::Continue => output += 25,
            Action::Reject(_) | Action::Close => {
                assert!(in_flight.is_empty());
                return;
            }
            Action::Read(until) => {
                assert!(in_flight.is_empty() && output == 0);
                assert!(until.deadline > now);
                // Control steps until a read (or the end of the input).
                loop {
                    let [op, arg, rest @ ..] = steps else {
                        return; // the peer closes
                    };
                    steps = rest;
                    match op % 4 {
                        0 => {
                            let n = usize::from(*arg).min(steps.len());
                            conn.input.extend_from_slice(&steps[..n]);
                            steps = &steps[n..];
                            conn.received(n, now);
                            since_progress = 0;
                            break;
                        }
                        1 => {
                            now += Duration::from_millis(u64::from(*arg) * 50);
                            if now >= until.deadline {
                                return; // expired: the driver closes
                            }
                        }
                        2 => output = usize::from(*arg) * 64 * 1024,
                        _ => {
                            next_len = if *arg == 0 { 20 } else { usize::from(*arg) * 256 * 1024 };
                            next_status = if arg % 2 == 1 { 504 } else { 200 };
                            next_close = *arg == 255;
                        }
                    }
                    if output > 0 {
                        // The driver writes queued output before reading.
                        break;
                    }
                }
            }
        }
    }
});
