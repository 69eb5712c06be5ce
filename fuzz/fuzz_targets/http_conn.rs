//! The HTTP connection policy (`http::conn::Conn`) under arbitrary input
//! bytes, arbitrary read splits, arbitrary time steps and arbitrary output
//! backlog (a peer that reads slowly or not at all).
//!
//! Input layout: a sequence of steps, each `[op, arg, ...]`:
//! * op % 4 == 0: `arg` bytes of the rest of the input arrive (a read);
//! * op % 4 == 1: `arg * 50` ms pass;
//! * op % 4 == 2: the driver's output backlog becomes `arg * 64 KiB`;
//! * op % 4 == 3: the next finished response is `arg * 256 KiB` long
//!   (0: 20 bytes), status 504 if `arg` is odd, and closes if `arg == 255`;
//!   `arg == 254`: it is an event stream (SSE), driven by the steps that
//!   follow (see `drive_stream`).
//!
//! Checked, with the driver simulated as server.rs runs it:
//! * no panic, and `next` never loops without progress;
//! * responses are finished in request order and never more than started;
//! * an unsafe request (not GET/HEAD) never starts beside another request,
//!   and nothing starts beside it;
//! * at most `MAX_PIPELINE` requests in flight;
//! * a read is asked for only with nothing in flight and no output queued,
//!   and its deadline lies ahead; an expired deadline ends the connection.
//! * an event stream starts nothing further; it renders only below the
//!   output bound, asks for a batch only once the output has drained, its
//!   drain and heartbeat deadlines lie ahead, a backlog older than the write
//!   timeout ends it (lagged), and once ended it stays ended.

#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use im_server::http::codec::{Limits, Method};
use im_server::http::conn::{Action, Conn, Finished, MAX_PIPELINE, Settings, StreamEnd, StreamStep};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let settings = Settings {
        limits: Limits::default(),
        idle_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(10),
        max_output: 4 * 1024 * 1024,
        heartbeat: Duration::from_secs(15),
        write_timeout: Duration::from_secs(10),
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
    let mut next_stream = false;
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
                    // The driver asks to close after an event stream's head.
                    close: next_close || next_stream,
                };
                let framing = conn.finished(done, false);
                if !framing.keep_alive {
                    in_flight.clear();
                }
                // Replies of the same size arrived for those still in
                // flight: both admission paths are driven.
                conn.holding(next_len.saturating_mul(in_flight.len()), next_len << 6);
                output += next_len.min(settings.max_output);
                if next_stream && !framing.head_only {
                    assert!(!framing.keep_alive, "a stream is the last response");
                    conn.start_stream(now);
                    drive_stream(&mut conn, &settings, steps, now, output);
                    return;
                }
            }
            Action::Stream(step) => panic!("no stream was started: {step:?}"),
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
                            next_stream = *arg == 254;
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

/// Drives a started event stream with the remaining steps, each `[op, arg]`:
/// op % 4 == 0: the pending drain or wait ends with the output written (or
/// a batch arriving, `arg` odd: it renders nothing); 1: `arg * 100` ms pass
/// (no further than the step's deadline); 2: the source fails; 3: shutdown.
fn drive_stream(conn: &mut Conn, settings: &Settings, mut steps: &[u8], t0: Instant, mut output: usize) {
    let mut now = t0;
    let mut ended: Option<StreamStep> = None;
    let mut backlog_since: Option<Instant> = (output > 0).then_some(now);
    for _ in 0..100_000 {
        let Action::Stream(step) = conn.next(now, output) else {
            panic!("a streaming connection does only stream steps");
        };
        if output == 0 {
            backlog_since = None;
        }
        if let Some(end) = ended {
            assert_eq!(step, end, "an ended stream stays ended");
            return;
        }
        match step {
            StreamStep::Fill => {
                assert!(output < settings.max_output, "rendering above the bound");
                backlog_since.get_or_insert(now);
                output += 64 * 1024;
                conn.filled(output % 3 == 0, true, now);
            }
            StreamStep::Heartbeat => {
                assert_eq!(output, 0, "a heartbeat only in silence");
                output += 6;
                backlog_since.get_or_insert(now);
                conn.sent(now);
            }
            StreamStep::Drain(deadline) | StreamStep::Await(deadline) => {
                assert!(deadline > now, "{step:?} at {now:?}");
                let awaiting = matches!(step, StreamStep::Await(_));
                assert!(!awaiting || output == 0, "asks for a batch before the output drained");
                if let (StreamStep::Drain(_), Some(since)) = (step, backlog_since) {
                    assert!(deadline <= since + settings.write_timeout);
                }
                let [op, arg, rest @ ..] = steps else {
                    return;
                };
                steps = rest;
                match op % 4 {
                    0 if awaiting => {
                        conn.arrived();
                        if arg % 2 == 1 {
                            // A batch that renders nothing.
                            assert_eq!(conn.next(now, 0), Action::Stream(StreamStep::Fill));
                            conn.filled(false, false, now);
                        }
                    }
                    0 => output = 0,
                    1 => now = deadline.min(now + Duration::from_millis(u64::from(*arg) * 100)),
                    2 => {
                        output += 40;
                        conn.stream_failed(now);
                    }
                    _ => conn.shut_down(now),
                }
            }
            StreamStep::End { why, deadline } => {
                assert!(deadline > now, "the end has time to be written");
                if why == StreamEnd::Lagged {
                    let since = backlog_since.expect("lagging with a backlog");
                    assert!(now >= since + settings.write_timeout);
                }
                ended = Some(step);
            }
        }
    }
    panic!("no progress");
}
