//! The policy of one HTTP connection, with no I/O and no clock: which
//! request may start, when output must be written, which deadline a read
//! waits for and what its expiry means. The driver in [`super::server`]
//! does the reading, writing and waiting, and tells this what happened
//! (bytes read at time T, a response finished), passing the time in so
//! that the rules are tested with a fake clock.
//!
//! The rules:
//! * Pipelined requests are started together only while they are safe (GET,
//!   HEAD); a request that changes state starts alone, once every earlier
//!   one has been answered, so a send never overtakes an earlier request
//!   (RFC 9112 §9.3.2).
//! * Responses go out in request order, each as soon as it is ready; no
//!   further request starts while the bytes the connection holds (its
//!   queued output and the replies it has received and not yet written,
//!   counted by their real size: [`Conn::holding`]) are over `max_output`.
//!   Up to [`MAX_PIPELINE`] requests may be in flight below that, while
//!   the replies still to come have reserved (at their largest, from the
//!   process's memory budget, [`crate::budget`]) no more than
//!   [`MAX_RESERVED_OUTPUTS`] output budgets. (A window of requests that
//!   grew after small replies let 64 pulls of 6.5 MB start unchecked; worst
//!   cases held to the output budget alone made pipelined big pulls to a
//!   stalled backend time out one after another; issue 20, items 1 and 4.)
//! * A new connection must send its first byte, and every request must
//!   arrive whole, within `request_timeout` of that request's first byte
//!   (408 if a request had begun); an idle keep-alive connection is closed
//!   after `idle_timeout`, or at once on shutdown.
//! * An event stream (SSE) is the last response of its connection: once its
//!   head is out, nothing further is started (requests pipelined after it
//!   are never answered) and the connection ends with the stream. Its
//!   events are rendered only while the queued output is under
//!   `max_output`, and the source is asked for more only once the output
//!   has drained, so a stream holds at most one batch and `max_output` of
//!   output. Output not drained within `write_timeout` of being queued
//!   means the reader lags: a final `lagged` event, then close. A heartbeat
//!   goes out after `heartbeat` of silence; shutdown ends the stream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::codec::{HttpError, Limits, Method, Request, RequestDecoder, Version};

/// Most requests of one connection in flight at once; more pipelined
/// requests wait in the input buffer.
pub const MAX_PIPELINE: usize = 64;
/// Output budgets' worth of replies still to come that a connection may
/// have reserved (at their largest) before its next request waits: 64 MiB
/// by default, ten full pages, as many as the RPC server makes at once for
/// one connection. Enough for pipelined full-page pulls to a stalled
/// backend to time out together; one connection still cannot take its
/// client's whole share of the memory budget.
pub const MAX_RESERVED_OUTPUTS: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub limits: Limits,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_output: usize,
    /// Silence on an event stream after which a heartbeat is written.
    pub heartbeat: Duration,
    /// How long an event stream's queued output may take to drain before
    /// its reader is deemed lagging.
    pub write_timeout: Duration,
}

/// What must be remembered of a started request to write its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub head_only: bool,
    pub keep_alive: bool,
    pub http10: bool,
    /// GET or HEAD: may run beside other safe requests.
    pub safe: bool,
}

/// What the driver reports of a finished response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub status: u16,
    pub body_len: usize,
    /// The response asks for the connection to close.
    pub close: bool,
}

/// What the driver should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Start serving this request; its response follows those started before.
    Start(Request),
    /// Wait for the oldest started request's response and write it
    /// (then report it with [`Conn::finished`]).
    Finish,
    /// Write out the queued output before anything else.
    Flush,
    /// Append `100 Continue` to the output.
    Continue,
    /// Read more input, until `deadline`.
    Read(ReadUntil),
    /// Answer this error, then close with a lingering close.
    Reject(HttpError),
    /// Write out the queued output, then close with a lingering close.
    Close,
    /// The connection carries an event stream (see [`Conn::start_stream`]).
    Stream(StreamStep),
}

/// The next step of an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStep {
    /// Render the source's buffered events into the output, then report
    /// [`Conn::filled`].
    Fill,
    /// Append a heartbeat, then report [`Conn::sent`].
    Heartbeat,
    /// Write out the output, stopping at this deadline if it has not
    /// drained (the next step then ends the stream as lagging).
    Drain(Instant),
    /// Wait for the source's next batch until this time (the next
    /// heartbeat), shutdown or the peer's close; report [`Conn::arrived`],
    /// [`Conn::stream_failed`] or [`Conn::shut_down`].
    Await(Instant),
    /// Append the final event for `why` and the end of the body, write it
    /// out by `deadline`, then close.
    End { why: StreamEnd, deadline: Instant },
}

/// Why an event stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Its output did not drain within the write timeout.
    Lagged,
    /// The source failed (its final event is already in the output).
    Failed,
    /// The server is shutting down.
    Shutdown,
}

/// Most time a stream's last bytes get on shutdown: closing promptly comes
/// first (the drain waits for every connection).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The state of an event stream, after its head.
#[derive(Debug, Clone, Copy)]
struct Streaming {
    /// When an event or heartbeat was last queued.
    last_sent: Instant,
    /// Since when the output has been waiting to drain (`None`: empty).
    backlog_since: Option<Instant>,
    /// The source holds events not yet rendered.
    buffered: bool,
    end: Option<(StreamEnd, Instant)>,
}

impl Streaming {
    fn next(&mut self, settings: &Settings, now: Instant, output_queued: usize) -> StreamStep {
        if let Some((why, deadline)) = self.end {
            return StreamStep::End { why, deadline };
        }
        let backlog_since = if output_queued == 0 {
            self.backlog_since = None;
            None
        } else {
            Some(*self.backlog_since.get_or_insert(now))
        };
        if let Some(since) = backlog_since {
            let drain_by = since + settings.write_timeout;
            if now >= drain_by {
                return self.ending(StreamEnd::Lagged, now + settings.write_timeout);
            }
            if !self.buffered || output_queued >= settings.max_output {
                return StreamStep::Drain(drain_by);
            }
        }
        if self.buffered {
            return StreamStep::Fill;
        }
        let heartbeat_at = self.last_sent + settings.heartbeat;
        if now >= heartbeat_at {
            return StreamStep::Heartbeat;
        }
        StreamStep::Await(heartbeat_at)
    }

    fn ending(&mut self, why: StreamEnd, deadline: Instant) -> StreamStep {
        self.end = Some((why, deadline));
        StreamStep::End { why, deadline }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadUntil {
    pub deadline: Instant,
    /// What an expired deadline means.
    pub expiry: Expiry,
    /// Whether shutdown closes the connection at once (nothing of a request
    /// has been received); otherwise the request is finished first.
    pub interruptible: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Close without a word: no request had begun.
    Close,
    /// Answer 408, then close.
    Timeout,
}

/// Which timer the connection is under while it waits for input, named
/// after hyper's h1 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Accepted at this time, nothing received yet.
    Fresh(Instant),
    /// Between requests (keep-alive).
    KeepAlive,
    /// A request whose first byte arrived at this time.
    Request(Instant),
}

/// The state of one connection; see the module doc for the rules.
#[derive(Debug)]
pub struct Conn {
    settings: Settings,
    decoder: RequestDecoder,
    /// Received bytes not yet decoded into requests.
    pub input: BytesMut,
    in_flight: VecDeque<Framing>,
    /// An unsafe request decoded while earlier ones were still in flight.
    deferred: Option<Request>,
    /// Reply bytes received for the requests in flight and not yet
    /// written, and reserved for those still to come (reported by the
    /// driver, [`Conn::holding`]).
    held: usize,
    reserved: usize,
    reading: Reading,
    /// When the last bytes arrived.
    last_read: Instant,
    /// A request asked for the connection to close, or a response did:
    /// nothing further starts.
    closing: bool,
    /// The input cannot be decoded: answered once the requests before it are.
    failure: Option<HttpError>,
    /// An event stream is being written: the connection's last response.
    streaming: Option<Streaming>,
}

/// Whether `req` asks to switch to WebSocket (an `Upgrade` naming it).
pub fn is_websocket_upgrade(req: &Request) -> bool {
    req.upgrade_websocket
}

/// Small to start: thousands of idle connections should cost little.
const INITIAL_BUFFER: usize = 4096;

impl Conn {
    pub fn new(settings: Settings, accepted: Instant) -> Conn {
        Conn {
            settings,
            decoder: RequestDecoder::new(settings.limits),
            input: BytesMut::with_capacity(INITIAL_BUFFER),
            in_flight: VecDeque::new(),
            deferred: None,
            held: 0,
            reserved: 0,
            reading: Reading::Fresh(accepted),
            last_read: accepted,
            closing: false,
            failure: None,
            streaming: None,
        }
    }

    /// The next step, given the output bytes queued and not yet written.
    pub fn next(&mut self, now: Instant, output_queued: usize) -> Action {
        if let Some(stream) = &mut self.streaming {
            return Action::Stream(stream.next(&self.settings, now, output_queued));
        }
        if output_queued > self.settings.max_output {
            return Action::Flush;
        }
        if let Some(req) = self.next_request(output_queued) {
            return Action::Start(req);
        }
        if !self.in_flight.is_empty() {
            return Action::Finish;
        }
        if let Some(err) = self.failure.filter(|_| !self.closing) {
            return Action::Reject(err);
        }
        if self.closing {
            return Action::Close;
        }
        if self.deferred.is_some() {
            // Unreachable: a deferred request starts once nothing is in flight.
            return Action::Reject(HttpError::BadRequest("request could not be scheduled"));
        }
        if self.decoder.take_expect_continue() {
            return Action::Continue;
        }
        if output_queued > 0 {
            return Action::Flush;
        }
        Action::Read(self.read_until(now))
    }

    /// The next request that may start now, if any.
    fn next_request(&mut self, output_queued: usize) -> Option<Request> {
        if self.in_flight.len() >= MAX_PIPELINE || self.closing || self.failure.is_some() {
            return None;
        }
        let req = match self.deferred.take() {
            Some(req) => req,
            None => match self.decoder.decode(&mut self.input) {
                Ok(Some(req)) => {
                    self.request_decoded();
                    req
                }
                Ok(None) => return None,
                Err(err) => {
                    self.failure = Some(err);
                    return None;
                }
            },
        };
        // A WebSocket handshake is the connection's last HTTP request: the
        // bytes after it are frames (or, if it is refused, nothing more is
        // served), never requests to decode.
        if is_websocket_upgrade(&req) {
            self.closing = true;
        }
        let safe = matches!(req.method, Method::Get | Method::Head);
        let unsafe_in_flight = self.in_flight.iter().any(|f| !f.safe);
        if !self.in_flight.is_empty() && (!safe || unsafe_in_flight) {
            self.deferred = Some(req);
            return None;
        }
        // What is held already, not what the request might add: see the
        // module doc.
        let holds = self.held.saturating_add(output_queued);
        let promised = self
            .settings
            .max_output
            .saturating_mul(MAX_RESERVED_OUTPUTS);
        let full = holds > self.settings.max_output || self.reserved > promised;
        if !self.in_flight.is_empty() && full {
            self.deferred = Some(req);
            return None;
        }
        self.closing = !req.keep_alive;
        self.in_flight.push_back(Framing {
            head_only: req.method == Method::Head,
            keep_alive: req.keep_alive,
            http10: req.version == Version::Http10,
            safe,
        });
        Some(req)
    }

    /// A whole request was taken off the input: what is left, if anything,
    /// is the start of the next one, which arrived with the last read (or
    /// later than it, never earlier: reads stop while requests are served).
    fn request_decoded(&mut self) {
        self.reading = if self.input.is_empty() {
            Reading::KeepAlive
        } else {
            Reading::Request(self.last_read)
        };
    }

    fn read_until(&self, now: Instant) -> ReadUntil {
        let request = |started: Instant| ReadUntil {
            deadline: started + self.settings.request_timeout,
            expiry: Expiry::Timeout,
            interruptible: false,
        };
        match self.reading {
            // Bytes of a request are in (or were, for a body still to come).
            _ if !self.input.is_empty() || self.decoder.in_body() => match self.reading {
                Reading::Request(started) => request(started),
                // Unreachable: bytes arriving start a request timer.
                Reading::Fresh(started) => request(started),
                Reading::KeepAlive => request(self.last_read),
            },
            Reading::Fresh(accepted) => ReadUntil {
                deadline: accepted + self.settings.request_timeout,
                expiry: Expiry::Close,
                interruptible: true,
            },
            Reading::KeepAlive | Reading::Request(_) => ReadUntil {
                deadline: now + self.settings.idle_timeout,
                expiry: Expiry::Close,
                interruptible: true,
            },
        }
    }

    /// `n` bytes (already appended to [`Conn::input`]) arrived at `now`.
    pub fn received(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.last_read = now;
        // The first bytes since the buffer was emptied start a request's
        // timer; bytes added to a partial request do not. (Blank lines
        // between requests are skipped and leave the buffer empty: the
        // request after them is timed from its own first byte, found by
        // fuzzing the `http_conn` target.)
        let buffer_was_empty = self.input.len() == n && !self.decoder.in_body();
        if buffer_was_empty || !matches!(self.reading, Reading::Request(_)) {
            self.reading = Reading::Request(now);
        }
    }

    /// The oldest request in flight has its response: `status`, `body_len`
    /// bytes, asking to close the connection if `close`. Returns how to
    /// frame it: `keep_alive` false means this is the last response.
    pub fn finished(&mut self, done: Finished, shutting_down: bool) -> Framing {
        let Finished { close, .. } = done;
        let mut framing = self.in_flight.pop_front().unwrap_or(Framing {
            head_only: false,
            keep_alive: false,
            http10: false,
            safe: true,
        });
        // Once shutting down, every response says the connection closes.
        framing.keep_alive &= !close && !shutting_down;
        if !framing.keep_alive {
            self.closing = true;
            // Requests started after this one are never answered.
            self.in_flight.clear();
        }
        framing
    }

    /// The driver's count of the reply bytes this connection has received
    /// and not yet written, and of those reserved for replies still to come
    /// (its share of [`crate::budget`]).
    pub fn holding(&mut self, held: usize, reserved: usize) {
        self.held = held;
        self.reserved = reserved;
    }

    /// The response just finished (a GET's, framed with `keep_alive`
    /// false) is an event stream whose head is in the output: from now on
    /// [`Conn::next`] answers only [`Action::Stream`] steps. Its source
    /// holds a first batch (perhaps empty).
    pub fn start_stream(&mut self, now: Instant) {
        self.closing = true;
        self.in_flight.clear();
        self.deferred = None;
        self.streaming = Some(Streaming {
            last_sent: now,
            backlog_since: None,
            buffered: true,
            end: None,
        });
    }

    /// After [`StreamStep::Fill`]: whether the source still holds events,
    /// and whether any were rendered.
    pub fn filled(&mut self, buffered: bool, rendered: bool, now: Instant) {
        if let Some(stream) = &mut self.streaming {
            stream.buffered = buffered;
            if rendered {
                stream.last_sent = now;
            }
        }
    }

    /// A heartbeat was queued.
    pub fn sent(&mut self, now: Instant) {
        if let Some(stream) = &mut self.streaming {
            stream.last_sent = now;
        }
    }

    /// The source has a new batch.
    pub fn arrived(&mut self) {
        if let Some(stream) = &mut self.streaming {
            stream.buffered = true;
        }
    }

    /// The source failed; its final event has been queued.
    pub fn stream_failed(&mut self, now: Instant) {
        let write_timeout = self.settings.write_timeout;
        if let Some(stream) = &mut self.streaming {
            stream
                .end
                .get_or_insert((StreamEnd::Failed, now + write_timeout));
        }
    }

    /// The server is shutting down: a stream ends (a request-response
    /// connection learns it from [`Conn::finished`] and its reads).
    pub fn shut_down(&mut self, now: Instant) {
        let grace = self.settings.write_timeout.min(SHUTDOWN_GRACE);
        if let Some(stream) = &mut self.streaming {
            stream.end.get_or_insert((StreamEnd::Shutdown, now + grace));
        }
    }

    /// Whether an event stream is being written.
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// Requests started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
