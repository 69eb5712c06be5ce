use std::time::{Duration, Instant};

use super::*;

fn settings() -> Settings {
    Settings {
        limits: Limits::default(),
        idle_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(10),
        max_output: 4 * 1024 * 1024,
        heartbeat: Duration::from_secs(15),
        write_timeout: Duration::from_secs(10),
    }
}

/// A 200 of `body_len` bytes.
fn done(body_len: usize, close: bool) -> Finished {
    Finished {
        status: 200,
        body_len,
        close,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
const POST: &[u8] = b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";

fn feed(conn: &mut Conn, bytes: &[u8], now: Instant) {
    conn.input.extend_from_slice(bytes);
    conn.received(bytes.len(), now);
}

fn target(action: &Action) -> Option<&[u8]> {
    match action {
        Action::Start(req) => Some(&req.target[..]),
        _ => None,
    }
}

#[test]
fn a_silent_connection_is_closed_at_the_request_timeout_without_a_408() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    let Action::Read(until) = conn.next(t0 + secs(3), 0) else {
        panic!("a fresh connection reads");
    };
    assert_eq!(until.deadline, t0 + secs(10), "counted from accept");
    assert_eq!(until.expiry, Expiry::Close);
    assert!(until.interruptible);
}

#[test]
fn each_request_timer_starts_at_its_own_first_byte() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    // Every read ends partway into the next request.
    let mut stream = Vec::new();
    for _ in 0..200 {
        stream.extend_from_slice(GET);
    }
    let mut now = t0;
    for part in stream.chunks(GET.len() + 7) {
        now += Duration::from_millis(50);
        feed(&mut conn, part, now);
        loop {
            match conn.next(now, 0) {
                Action::Start(_) => {}
                Action::Finish => {
                    conn.finished(done(10, false), false);
                }
                Action::Read(until) => {
                    assert!(
                        until.deadline >= now + secs(9),
                        "timer restarted per request"
                    );
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(now > t0 + secs(4));
}

#[test]
fn a_partial_request_is_timed_from_its_first_byte_and_answered_408() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, b"GET /a HTTP/1.1\r\n", t0 + secs(1));
    feed(&mut conn, b"Host: x\r\n", t0 + secs(5));
    let Action::Read(until) = conn.next(t0 + secs(5), 0) else {
        panic!("waits for the rest");
    };
    assert_eq!(until.deadline, t0 + secs(11));
    assert_eq!(until.expiry, Expiry::Timeout);
    assert!(
        !until.interruptible,
        "a request being received is finished first"
    );
}

#[test]
fn blank_lines_do_not_start_the_next_requests_timer() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, b"\r\n\n", t0);
    let Action::Read(until) = conn.next(t0, 0) else {
        panic!("blank lines are skipped");
    };
    assert_eq!(until.expiry, Expiry::Close, "idle, not a request");
    feed(&mut conn, b"GE", t0 + secs(50));
    let Action::Read(until) = conn.next(t0 + secs(50), 0) else {
        panic!("waits for the rest");
    };
    assert_eq!(
        until.deadline,
        t0 + secs(60),
        "timed from its own first byte"
    );
}

#[test]
fn idle_keep_alive_waits_the_idle_timeout_from_now() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, GET, t0);
    assert!(target(&conn.next(t0, 0)).is_some());
    assert_eq!(conn.next(t0, 0), Action::Finish);
    conn.finished(done(2, false), false);
    let Action::Read(until) = conn.next(t0 + secs(2), 0) else {
        panic!("idle");
    };
    assert_eq!(until.deadline, t0 + secs(62));
    assert!(until.interruptible);
}

#[test]
fn an_unsafe_request_waits_for_earlier_ones_and_runs_alone() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    let mut bytes = GET.to_vec();
    bytes.extend_from_slice(POST);
    bytes.extend_from_slice(GET);
    feed(&mut conn, &bytes, t0);
    assert_eq!(target(&conn.next(t0, 0)), Some(&b"/a"[..]));
    assert_eq!(conn.next(t0, 0), Action::Finish, "the POST waits");
    conn.finished(done(2, false), false);
    assert_eq!(target(&conn.next(t0, 0)), Some(&b"/s"[..]));
    assert_eq!(
        conn.next(t0, 0),
        Action::Finish,
        "nothing starts beside a POST"
    );
    conn.finished(done(2, false), false);
    assert_eq!(target(&conn.next(t0, 0)), Some(&b"/a"[..]));
}

#[test]
fn output_over_the_bound_is_written_before_anything_starts() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, GET, t0);
    assert_eq!(conn.next(t0, 5 * 1024 * 1024), Action::Flush);
    assert!(target(&conn.next(t0, 1024)).is_some());
}

#[test]
fn pipelined_gets_start_together_until_the_held_replies_reach_the_output_budget() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, &GET.repeat(200), t0);
    // Nothing held: as many as the pipeline allows, whatever the replies
    // may weigh (the budget refuses a reply that does not fit on arrival).
    assert_eq!(started(&mut conn, t0).len(), MAX_PIPELINE);
    assert_eq!(conn.next(t0, 0), Action::Finish);
    conn.finished(done(20, false), false);
    // Replies of 3 MiB arrived for two of those in flight, and 2 MiB of
    // output is queued: over the 4 MiB budget, nothing more starts ...
    conn.holding(6 * 1024 * 1024, 0);
    assert_eq!(conn.next(t0, 1024 * 1024), Action::Finish);
    conn.holding(3 * 1024 * 1024, 0);
    assert_eq!(conn.next(t0, 2 * 1024 * 1024), Action::Finish);
    // ... until they are written.
    conn.holding(0, 0);
    assert_eq!(started(&mut conn, t0).len(), 1);
    // Replies still to come may reserve 16 output budgets, not more.
    conn.finished(done(20, false), false);
    conn.holding(0, 64 * 1024 * 1024);
    assert_eq!(started(&mut conn, t0).len(), 1);
    conn.finished(done(20, false), false);
    conn.holding(0, 64 * 1024 * 1024 + 1);
    assert_eq!(conn.next(t0, 0), Action::Finish);
    // Alone, a request starts whatever is held (its own reply is what
    // empties the output).
    let mut alone = Conn::new(settings(), t0);
    feed(&mut alone, GET, t0);
    alone.holding(usize::MAX, usize::MAX);
    assert!(target(&alone.next(t0, 0)).is_some());
}

#[test]
fn shutdown_and_close_end_the_connection_after_the_response() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, &GET.repeat(4), t0);
    assert!(target(&conn.next(t0, 0)).is_some());
    conn.finished(done(2, false), false);
    assert!(target(&conn.next(t0, 0)).is_some());
    assert!(target(&conn.next(t0, 0)).is_some());
    let framing = conn.finished(done(2, false), true);
    assert!(!framing.keep_alive, "Connection: close once shutting down");
    assert_eq!(
        conn.next(t0, 0),
        Action::Close,
        "the second is never answered"
    );
}

#[test]
fn garbage_is_rejected_after_the_requests_before_it() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    let mut bytes = GET.to_vec();
    bytes.extend_from_slice(b"BAD\x01 / HTTP/1.1\r\n\r\n");
    feed(&mut conn, &bytes, t0);
    assert!(target(&conn.next(t0, 0)).is_some());
    assert_eq!(conn.next(t0, 0), Action::Finish);
    conn.finished(done(2, false), false);
    assert!(matches!(conn.next(t0, 0), Action::Reject(_)));
}

#[test]
fn expect_continue_is_asked_for_once() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    feed(
        &mut conn,
        b"POST /s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        t0,
    );
    assert_eq!(conn.next(t0, 0), Action::Continue);
    assert_eq!(conn.next(t0, 25), Action::Flush);
    assert!(matches!(conn.next(t0, 0), Action::Read(_)));
    feed(&mut conn, b"hi", t0);
    assert_eq!(target(&conn.next(t0, 0)), Some(&b"/s"[..]));
}

/// xorshift64*: deterministic, no crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random requests (and sometimes garbage), split at random points, with
/// random time steps and random output backlog. Invariants: requests start
/// in order and are finished in that order; no unsafe request starts while
/// another is in flight, and nothing starts beside an unsafe one; every read
/// deadline lies ahead or the driver ends the connection; the machine never
/// asks to read while requests are in flight.
#[test]
fn property_random_bytes_splits_and_time() {
    let pieces: [&[u8]; 6] = [
        GET,
        POST,
        b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"\r\n",
    ];
    for seed in 1..400u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut stream = Vec::new();
        for _ in 0..rng.below(30) {
            if rng.below(40) == 0 {
                stream.push(rng.next() as u8);
            } else {
                stream.extend_from_slice(pieces[rng.below(pieces.len())]);
            }
        }
        let t0 = Instant::now();
        let mut now = t0;
        let mut conn = Conn::new(settings(), t0);
        let mut sent = 0;
        // Started and not finished: whether each is safe.
        let mut in_flight: VecDeque<bool> = VecDeque::new();
        let mut output = 0usize;
        let mut ended = false;
        for _ in 0..10_000 {
            match conn.next(now, output) {
                Action::Start(req) => {
                    let safe = matches!(req.method, Method::Get | Method::Head);
                    assert!(
                        in_flight.is_empty() || (safe && in_flight.iter().all(|&s| s)),
                        "seed {seed}: an unsafe request overlapped another"
                    );
                    in_flight.push_back(safe);
                    assert!(in_flight.len() <= MAX_PIPELINE);
                }
                Action::Finish => {
                    assert!(
                        in_flight.pop_front().is_some(),
                        "seed {seed}: finish with none"
                    );
                    let big = rng.below(4) == 0;
                    let len = if big { 39_000_000 } else { 20 };
                    let framing = conn.finished(done(len, rng.below(50) == 0), false);
                    if !framing.keep_alive {
                        in_flight.clear();
                    }
                    output += rng.below(6 * 1024 * 1024);
                }
                Action::Flush => {
                    assert!(output > 0, "seed {seed}: flush with nothing queued");
                    output = 0;
                }
                Action::Continue => output += 25,
                Action::Stream(step) => panic!("seed {seed}: no stream was started: {step:?}"),
                Action::Read(until) => {
                    assert!(
                        in_flight.is_empty(),
                        "seed {seed}: read with requests in flight"
                    );
                    assert_eq!(output, 0, "seed {seed}: read before writing responses");
                    assert!(until.deadline > now, "seed {seed}: deadline already past");
                    // Mostly short steps; sometimes most of an idle timeout.
                    let step = if rng.below(8) == 0 { 59_000 } else { 4000 };
                    now += Duration::from_millis(rng.below(step) as u64);
                    if now >= until.deadline {
                        ended = true; // the driver closes (408 or silently)
                        break;
                    }
                    if sent == stream.len() {
                        ended = true; // the peer closes
                        break;
                    }
                    let n = 1 + rng.below((stream.len() - sent).min(80));
                    feed(&mut conn, &stream[sent..sent + n], now);
                    sent += n;
                }
                Action::Reject(_) | Action::Close => {
                    assert!(
                        in_flight.is_empty(),
                        "seed {seed}: closed with requests unanswered"
                    );
                    ended = true;
                    break;
                }
            }
        }
        assert!(
            ended,
            "seed {seed}: the connection neither ended nor waited"
        );
    }
}

/// Starts every request the connection will start now; their targets.
fn started(conn: &mut Conn, now: Instant) -> Vec<Vec<u8>> {
    let mut targets = Vec::new();
    while let Some(t) = target(&conn.next(now, 0)) {
        targets.push(t.to_vec());
    }
    targets
}

/// A connection whose first request (a GET) was answered with an event
/// stream at `t0`.
fn streaming(t0: Instant) -> Conn {
    let mut conn = Conn::new(settings(), t0);
    feed(&mut conn, GET, t0);
    assert!(matches!(conn.next(t0, 0), Action::Start(_)));
    assert_eq!(conn.next(t0, 0), Action::Finish);
    let framing = conn.finished(done(0, true), false);
    assert!(
        !framing.keep_alive,
        "a stream is the connection's last response"
    );
    conn.start_stream(t0);
    conn
}

fn step(conn: &mut Conn, now: Instant, output: usize) -> StreamStep {
    match conn.next(now, output) {
        Action::Stream(step) => step,
        other => panic!("a streaming connection does only stream steps, not {other:?}"),
    }
}

#[test]
fn a_stream_renders_then_drains_then_waits_until_the_heartbeat() {
    let t0 = Instant::now();
    let mut conn = streaming(t0);
    // The head is queued; the first page is rendered beside it.
    assert_eq!(step(&mut conn, t0, 200), StreamStep::Fill);
    conn.filled(false, true, t0);
    assert_eq!(step(&mut conn, t0, 900), StreamStep::Drain(t0 + secs(10)));
    let t1 = t0 + secs(1);
    assert_eq!(step(&mut conn, t1, 0), StreamStep::Await(t1 + secs(14)));
    // Nothing for 15 s since the last event: a heartbeat, then silence
    // counts from it.
    let t15 = t0 + secs(15);
    assert_eq!(step(&mut conn, t15, 0), StreamStep::Heartbeat);
    conn.sent(t15);
    assert_eq!(step(&mut conn, t15, 6), StreamStep::Drain(t15 + secs(10)));
    assert_eq!(step(&mut conn, t15, 0), StreamStep::Await(t15 + secs(15)));
    // A batch arrives: rendered, and the heartbeat is pushed back.
    let t20 = t0 + secs(20);
    conn.arrived();
    assert_eq!(step(&mut conn, t20, 0), StreamStep::Fill);
    conn.filled(false, true, t20);
    assert_eq!(step(&mut conn, t20, 0), StreamStep::Await(t20 + secs(15)));
    // A batch that renders nothing does not count as an event.
    conn.arrived();
    assert_eq!(step(&mut conn, t20 + secs(5), 0), StreamStep::Fill);
    conn.filled(false, false, t20 + secs(5));
    assert_eq!(
        step(&mut conn, t20 + secs(5), 0),
        StreamStep::Await(t20 + secs(15))
    );
}

#[test]
fn a_stream_renders_no_more_than_the_output_bound_before_draining() {
    let t0 = Instant::now();
    let mut conn = streaming(t0);
    let max = settings().max_output;
    assert_eq!(step(&mut conn, t0, 100), StreamStep::Fill);
    // The source still holds events, but the output is full: drain first.
    conn.filled(true, true, t0);
    assert_eq!(step(&mut conn, t0, max), StreamStep::Drain(t0 + secs(10)));
    // Partly drained, under the bound: more is rendered; the backlog's
    // clock keeps running from when it formed.
    let t3 = t0 + secs(3);
    assert_eq!(step(&mut conn, t3, max / 2), StreamStep::Fill);
    conn.filled(false, true, t3);
    assert_eq!(step(&mut conn, t3, max), StreamStep::Drain(t0 + secs(10)));
    // Drained: the next batch is asked for only now (one batch held).
    assert_eq!(step(&mut conn, t3, 0), StreamStep::Await(t3 + secs(15)));
}

#[test]
fn a_reader_that_does_not_drain_within_the_write_timeout_gets_lagged_and_closed() {
    let t0 = Instant::now();
    let mut conn = streaming(t0);
    assert_eq!(step(&mut conn, t0, 100), StreamStep::Fill);
    conn.filled(false, true, t0);
    assert_eq!(step(&mut conn, t0, 5000), StreamStep::Drain(t0 + secs(10)));
    // Progress but not drained: still draining, against the same deadline.
    assert_eq!(
        step(&mut conn, t0 + secs(9), 10),
        StreamStep::Drain(t0 + secs(10))
    );
    let end = StreamStep::End {
        why: StreamEnd::Lagged,
        deadline: t0 + secs(20),
    };
    assert_eq!(step(&mut conn, t0 + secs(10), 10), end);
    // Whatever happens next, it stays ended.
    assert_eq!(step(&mut conn, t0 + secs(11), 0), end);
    conn.arrived();
    assert_eq!(step(&mut conn, t0 + secs(12), 0), end);
}

#[test]
fn a_drained_backlog_restarts_the_lag_clock() {
    let t0 = Instant::now();
    let mut conn = streaming(t0);
    let mut now = t0;
    // Many batches, each drained in 6 s: 60 s in all, never lagging.
    for _ in 0..10 {
        conn.arrived();
        assert_eq!(step(&mut conn, now, 0), StreamStep::Fill);
        conn.filled(false, true, now);
        assert_eq!(
            step(&mut conn, now, 4096),
            StreamStep::Drain(now + secs(10))
        );
        let filled_at = now;
        now += secs(6);
        // The heartbeat counts from the last event.
        assert_eq!(
            step(&mut conn, now, 0),
            StreamStep::Await(filled_at + secs(15))
        );
    }
}

#[test]
fn shutdown_and_failure_end_a_stream() {
    let t0 = Instant::now();
    let mut conn = streaming(t0);
    conn.filled(false, false, t0);
    assert_eq!(step(&mut conn, t0, 0), StreamStep::Await(t0 + secs(15)));
    conn.shut_down(t0 + secs(2));
    let end = StreamStep::End {
        why: StreamEnd::Shutdown,
        deadline: t0 + secs(3),
    };
    assert_eq!(step(&mut conn, t0 + secs(2), 0), end);
    // A later failure does not replace the first reason.
    conn.stream_failed(t0 + secs(2));
    assert_eq!(step(&mut conn, t0 + secs(2), 40), end);

    let mut conn = streaming(t0);
    conn.filled(false, false, t0);
    conn.stream_failed(t0 + secs(1));
    assert_eq!(
        step(&mut conn, t0 + secs(1), 80),
        StreamStep::End {
            why: StreamEnd::Failed,
            deadline: t0 + secs(11),
        }
    );
}

#[test]
fn requests_pipelined_behind_a_stream_are_never_started() {
    let t0 = Instant::now();
    let mut conn = Conn::new(settings(), t0);
    let mut input = GET.to_vec();
    input.extend_from_slice(POST);
    input.extend_from_slice(GET);
    feed(&mut conn, &input, t0);
    assert!(matches!(conn.next(t0, 0), Action::Start(_)));
    assert_eq!(conn.next(t0, 0), Action::Finish);
    conn.finished(done(0, true), false);
    conn.start_stream(t0);
    assert!(conn.is_streaming());
    assert_eq!(conn.in_flight(), 0);
    for t in 0..40 {
        let action = conn.next(t0 + secs(t), 0);
        assert!(matches!(action, Action::Stream(_)), "{action:?}");
        if let Action::Stream(StreamStep::Fill) = action {
            conn.filled(false, false, t0);
        }
    }
}
