//! The policy of one WebSocket connection, with no I/O and no clock (the
//! driver passes the time in): control frames are answered here, messages
//! handed up, and the timers decided.
//!
//! The rules:
//! * A ping is answered with a pong carrying its payload; a peer silent
//!   for `ping_after` is pinged, and closed (1001) if it stays silent for
//!   another `ping_after` once the ping is written out: any frame from it
//!   counts as a sign of life.
//! * A frame that breaks the protocol fails the connection: a close frame
//!   with the matching code (1002, 1007, 1009; 1003 for a binary message,
//!   which this protocol does not speak), then the TCP close, with no
//!   further frame read.
//! * The close handshake: a peer's close is echoed (its code) and the
//!   connection ends once that is written; a close of ours waits up to
//!   `write_timeout` for the peer's, reading and dropping messages meanwhile.
//! * Output lags when a byte queued `write_timeout` ago is still not
//!   written: the driver then ends the connection (1008) rather than hold
//!   more for a peer that does not read.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::frame::{Decoder, FrameError, Incoming, Side, close_code, opcode, put_close, put_frame};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest message accepted (1009 above).
    pub max_message: usize,
    /// Silence after which the peer is pinged, and then closed.
    pub ping_after: Duration,
    /// How long queued output may wait to be written; also how long our
    /// close waits for the peer's.
    pub write_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Our close frame is queued; the peer's is awaited until then.
    Closing(Instant),
    /// Nothing more is read or sent: write what is queued, then close TCP.
    Done,
}

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read, write and serve until this time, then ask again.
    Run(Instant),
    /// Output lags: end the connection (see [`WsConn::lagged`]).
    Lagged,
    /// Write out what is queued, then close the TCP connection.
    Finish,
}

/// A ping sent: where it ends in the output, and when it was written out.
/// Its answer is awaited from then: a peer busy reading megabytes queued
/// before it cannot answer sooner (and the lag rule covers one that reads
/// nothing).
#[derive(Debug, Clone, Copy)]
struct Ping {
    end: u64,
    written_at: Option<Instant>,
}

#[derive(Debug)]
pub struct WsConn {
    settings: Settings,
    decoder: Decoder,
    state: State,
    /// When a frame last arrived.
    last_heard: Instant,
    /// Our ping awaiting an answer (`None`: none out).
    ping: Option<Ping>,
    /// Bytes written to the socket so far.
    written: u64,
    /// Output marks, oldest first: the total queued after a batch, and when.
    marks: VecDeque<(u64, Instant)>,
}

impl WsConn {
    pub fn new(settings: Settings, now: Instant) -> WsConn {
        WsConn {
            decoder: Decoder::new(Side::Server, settings.max_message),
            settings,
            state: State::Open,
            last_heard: now,
            ping: None,
            written: 0,
            marks: VecDeque::new(),
        }
    }

    /// Whether messages may still be sent (no close sent or received).
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the driver should read.
    pub fn reads(&self) -> bool {
        self.state != State::Done
    }

    /// Bytes arrived: a sign of life, as a frame is (a pong may be among
    /// them, behind requests not yet decoded while the session is busy).
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.ping = None;
    }

    /// Decodes what `input` holds: control frames are answered into `out`;
    /// the next text message is returned (call again until `None`).
    pub fn received(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        now: Instant,
    ) -> Option<Bytes> {
        while self.state != State::Done {
            let incoming = match self.decoder.decode(input) {
                Ok(Some(incoming)) => incoming,
                Ok(None) => return None,
                Err(err) => {
                    self.fail(&err, out);
                    return None;
                }
            };
            self.last_heard = now;
            self.ping = None;
            match incoming {
                Incoming::Text(text) if self.state == State::Open => return Some(text),
                Incoming::Text(_) => {}
                Incoming::Binary(_) => {
                    put_close(
                        out,
                        close_code::UNSUPPORTED_DATA,
                        "this protocol speaks text frames only",
                    );
                    self.end_now(input);
                }
                Incoming::Ping(payload) if self.state == State::Open => {
                    put_frame(out, opcode::PONG, &payload);
                }
                Incoming::Ping(_) | Incoming::Pong(_) => {}
                Incoming::Close(close) => {
                    if self.state == State::Open {
                        let code = close.map_or(close_code::NORMAL, |(code, _)| code);
                        put_close(out, code, "");
                    }
                    self.end_now(input);
                }
            }
        }
        None
    }

    /// Fails the connection for a broken rule: its close code, then TCP close.
    fn fail(&mut self, err: &FrameError, out: &mut BytesMut) {
        if self.state == State::Open {
            put_close(out, err.close_code(), err.reason());
        }
        self.state = State::Done;
    }

    fn end_now(&mut self, input: &mut BytesMut) {
        input.clear();
        self.state = State::Done;
    }

    /// Starts the close handshake with `code` (lagging, token expiry,
    /// shutdown, a silent peer); nothing if it has begun already.
    pub fn close(&mut self, code: u16, reason: &str, out: &mut BytesMut, now: Instant) {
        self.close_within(code, reason, out, now + self.settings.write_timeout);
    }

    /// [`WsConn::close`], the peer's close awaited only until `deadline`
    /// (on shutdown: closing promptly comes first, the drain waits for
    /// every connection).
    pub fn close_within(&mut self, code: u16, reason: &str, out: &mut BytesMut, deadline: Instant) {
        if self.state == State::Open {
            put_close(out, code, reason);
            self.state = State::Closing(deadline);
        }
    }

    /// The output that just lagged gets no more: what is queued is written
    /// (with the close the driver appends) while the peer's close is awaited.
    pub fn lagged(&mut self, out: &mut BytesMut, final_event: &[u8], now: Instant) {
        if self.state == State::Open {
            put_frame(out, opcode::TEXT, final_event);
        }
        self.close(close_code::POLICY_VIOLATION, "lagged", out, now);
        // Its own deadline from here: the lag is not reported again.
        self.marks.clear();
    }

    /// Records the output queued so far (`queued`: bytes not yet written),
    /// at `now`, for the lag rule.
    pub fn queued(&mut self, queued: usize, now: Instant) {
        let end = self.written + queued as u64;
        if self.marks.back().is_none_or(|&(last, _)| last < end) {
            self.marks.push_back((end, now));
        }
    }

    /// `n` more bytes were written, at `now`.
    pub fn wrote(&mut self, n: usize, now: Instant) {
        self.written += n as u64;
        if let Some(ping) = &mut self.ping
            && ping.written_at.is_none()
            && self.written >= ping.end
        {
            ping.written_at = Some(now);
        }
        while self
            .marks
            .front()
            .is_some_and(|&(end, _)| end <= self.written)
        {
            self.marks.pop_front();
        }
    }

    /// The next step, given the output bytes queued and not yet written;
    /// queues a ping, or a close to a silent peer, when their time has come.
    pub fn next(&mut self, now: Instant, out: &mut BytesMut) -> Step {
        match self.state {
            State::Done => return Step::Finish,
            State::Closing(until) if now >= until => {
                self.state = State::Done;
                return Step::Finish;
            }
            _ => {}
        }
        let write_timeout = self.settings.write_timeout;
        let lag_at =
            |marks: &VecDeque<(u64, Instant)>| marks.front().map(|&(_, at)| at + write_timeout);
        if lag_at(&self.marks).is_some_and(|at| now >= at) && self.state == State::Open {
            return Step::Lagged;
        }
        let ping_after = self.settings.ping_after;
        let ping_at = self.last_heard + ping_after;
        if self.state == State::Open && self.ping.is_none() && now >= ping_at {
            put_frame(out, opcode::PING, b"");
            self.queued(out.len(), now);
            let end = self.written + out.len() as u64;
            self.ping = Some(Ping {
                end,
                written_at: None,
            });
        }
        let answer_by = self
            .ping
            .and_then(|p| p.written_at)
            .map(|at| at + ping_after);
        if answer_by.is_some_and(|by| now >= by) {
            self.close(close_code::GOING_AWAY, "no answer to ping", out, now);
        }
        let ping_wake = match self.ping {
            None => Some(ping_at),
            Some(_) => answer_by,
        };
        let lag_wake = lag_at(&self.marks).filter(|_| self.state == State::Open);
        let wake = match self.state {
            State::Closing(until) => until,
            _ => [ping_wake, lag_wake]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now + ping_after),
        };
        Step::Run(wake.max(now))
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
