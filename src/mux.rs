//! A multiplexed client connection, owned by one task.
//!
//! Callers hand requests to the task over a bounded channel and get a
//! [`Pending`] reply back at once. The task writes everything queued with one
//! `write` (batching under load for free), matches each reply to its caller
//! by tag, and reconnects with backoff when the connection breaks. Callers of
//! a broken or not-yet-restored connection get [`Error::Unavailable`]
//! immediately instead of hanging; a full queue gives [`Error::Overloaded`].
//! Calls written on a connection that then breaks get [`Error::Lost`]: the
//! peer may have carried them out (an RPC client must not resend a send).
//!
//! A call may carry a deadline. One whose deadline has passed, or whose
//! caller stopped waiting, by the time the task takes it off the queue is
//! never written: it gets [`Error::Timeout`]. So a caller that gave up on
//! a queued call knows the peer never saw it; only a call already written can
//! have run without its caller hearing back.
//!
//! The RPC client (tags = request ids, replies in any order) and the Redis
//! client (tags = position in the pipeline) are both [`Protocol`]s over this.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{Interest, Ready};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::pipe::PipeStream;

/// A connected socket: TCP, a unix socket for a local Redis, or the
/// in-process pipe to this thread's own RPC server ([`crate::rpc::local`]).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Local(PipeStream),
}

impl Stream {
    pub async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        match self {
            Stream::Tcp(s) => s.ready(interest).await,
            Stream::Unix(s) => s.ready(interest).await,
            Stream::Local(s) => s.ready(interest).await,
        }
    }

    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read_buf(buf),
            Stream::Unix(s) => s.try_read_buf(buf),
            Stream::Local(s) => s.try_read_buf(buf),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(buf),
            Stream::Unix(s) => s.try_write(buf),
            Stream::Local(s) => s.try_write(buf),
        }
    }

    /// Writes all of `buf` (used for handshakes, before the actor loop).
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.ready(Interest::WRITABLE).await?;
            match self.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends this side's writing (TCP FIN): the peer reads end of stream
    /// while it may still answer what it had.
    pub fn shutdown_write(&self) -> io::Result<()> {
        let sock = match self {
            Stream::Tcp(s) => socket2::SockRef::from(s),
            Stream::Unix(s) => socket2::SockRef::from(s),
            Stream::Local(s) => {
                s.shutdown_write();
                return Ok(());
            }
        };
        sock.shutdown(std::net::Shutdown::Write)
    }

    /// Reads at least one byte into `buf`; end of stream is an error.
    pub async fn read_some(&self, buf: &mut BytesMut) -> io::Result<()> {
        loop {
            self.ready(Interest::READABLE).await?;
            crate::buf::reserve_for_read(buf, MIN_READ, READ_CHUNK);
            match self.try_read_buf(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A request/reply protocol spoken over a [`Stream`].
pub trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Reply: Send + 'static;

    /// Opens a connection ready for requests (including any handshake).
    fn connect(&mut self) -> impl Future<Output = io::Result<Stream>> + Send;
    /// Appends `request` to `out` and returns the tag its reply will carry.
    fn encode(&mut self, request: Self::Request, out: &mut BytesMut) -> u64;
    /// Takes one reply, with its tag, off the front of `input`.
    fn decode(&mut self, input: &mut BytesMut) -> io::Result<Option<(u64, Self::Reply)>>;
    /// Bytes `request` holds while queued, counted against
    /// [`MuxOptions::max_queued_bytes`]; 0 (the default) = not counted.
    fn queued_bytes(_request: &Self::Request) -> usize {
        0
    }
    /// Whether the peer asked this connection to be left (RPC GOAWAY): it is
    /// closed as soon as nothing written on it awaits a reply, and the next
    /// calls go out on a new connection. `false` (the default) = never.
    fn retiring(&self) -> bool {
        false
    }
    /// Appends a message telling the peer that nobody waits for the reply
    /// to the call tagged `tag` any more, if the protocol has one (RPC
    /// CANCEL); `false` (the default) = it has none, and the call's slot is
    /// kept until its reply comes.
    fn cancel(&mut self, _tag: u64, _out: &mut BytesMut) -> bool {
        false
    }
    /// Whether the peer may hold `request` long (a pull waiting for new
    /// messages): such calls have [`MuxOptions::max_in_flight`] slots of
    /// their own beside the ordinary calls', so that however many are
    /// waiting, ordinary calls are still written at once; one over its own
    /// slots is refused with `Overloaded`. `false` (the default) = never.
    fn held(_request: &Self::Request) -> bool {
        false
    }
}

struct Call<P: Protocol> {
    request: P::Request,
    reply: oneshot::Sender<Result<P::Reply, Error>>,
    deadline: Option<Instant>,
    /// What `request` counts against the queue's byte budget.
    bytes: usize,
}

/// A reply that has been asked for and not yet received.
pub struct Pending<R>(oneshot::Receiver<Result<R, Error>>);

impl<R> Pending<R> {
    pub async fn wait(self) -> Result<R, Error> {
        self.0.await.unwrap_or(Err(Error::Unavailable))
    }
}

#[derive(Debug, Clone)]
pub struct MuxOptions {
    /// For log lines: what this connection is ("rpc client", "redis").
    pub name: &'static str,
    /// For log lines: where it connects.
    pub target: String,
    /// Calls waiting for the task; more are refused with `Overloaded`.
    pub queue: usize,
    /// Requests written and not yet answered.
    pub max_in_flight: usize,
    /// Bytes of calls waiting for the task ([`Protocol::queued_bytes`]); a
    /// call that would go over is refused with `Overloaded`, unless the queue
    /// holds no counted bytes (so one call bigger than the budget still goes).
    /// The count alone does not bound memory: one Redis command can carry
    /// 64 messages of 64 KiB. The same bound applies to counted bytes taken
    /// and not yet answered: the task takes no more calls while it is
    /// reached, which also bounds what a stalled peer has been handed (and
    /// may yet act on after its callers gave up).
    pub max_queued_bytes: usize,
}

/// Bytes held by a queue, shared by its producers and its consumer: a
/// producer [`add`](Self::add)s before queuing, the consumer
/// [`release`](Self::release)s what it takes off.
#[derive(Clone)]
pub struct ByteBudget {
    queued: Arc<AtomicUsize>,
    max: usize,
}

impl ByteBudget {
    pub fn new(max: usize) -> Self {
        ByteBudget {
            queued: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Counts `bytes` in, unless that goes over the budget while something
    /// is already counted (so one item bigger than the whole budget still
    /// passes, alone).
    pub fn add(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        if before > 0 && before.saturating_add(bytes) > self.max {
            self.release(bytes);
            return false;
        }
        true
    }

    pub fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

/// Cheap to clone; the task ends when every handle is dropped.
pub struct Handle<P: Protocol> {
    calls: mpsc::Sender<Call<P>>,
    /// Bytes of the calls in `calls`; the task releases what it takes.
    queued: ByteBudget,
}

impl<P: Protocol> Clone for Handle<P> {
    fn clone(&self) -> Self {
        Handle {
            calls: self.calls.clone(),
            queued: self.queued.clone(),
        }
    }
}

impl<P: Protocol> Handle<P> {
    /// Starts the connection task.
    pub fn spawn(protocol: P, options: MuxOptions) -> Self {
        let (calls, receiver) = mpsc::channel(options.queue.max(1));
        let queued = ByteBudget::new(options.max_queued_bytes);
        let queue = Queue {
            calls: receiver,
            queued: queued.clone(),
        };
        tokio::spawn(run(protocol, queue, options));
        Handle { calls, queued }
    }

    /// Queues `request` without waiting; if it is still queued at `deadline`
    /// it is answered [`Error::Timeout`] and never written.
    pub fn start_by(
        &self,
        request: impl Into<P::Request>,
        deadline: Instant,
    ) -> Result<Pending<P::Reply>, Error> {
        self.start_call(request.into(), Some(deadline))
    }

    fn start_call(
        &self,
        request: P::Request,
        deadline: Option<Instant>,
    ) -> Result<Pending<P::Reply>, Error> {
        let bytes = P::queued_bytes(&request);
        if !self.queued.add(bytes) {
            return Err(Error::Overloaded);
        }
        let (reply, receiver) = oneshot::channel();
        let call = Call {
            request,
            reply,
            deadline,
            bytes,
        };
        match self.calls.try_send(call) {
            Ok(()) => Ok(Pending(receiver)),
            Err(err) => {
                self.queued.release(bytes);
                Err(match err {
                    mpsc::error::TrySendError::Full(_) => Error::Overloaded,
                    mpsc::error::TrySendError::Closed(_) => Error::Unavailable,
                })
            }
        }
    }
}

/// Several connections to one peer, used round-robin.
pub struct Pool<P: Protocol> {
    handles: Vec<Handle<P>>,
    next: AtomicUsize,
}

impl<P: Protocol> Pool<P> {
    pub fn spawn(size: usize, mut make: impl FnMut() -> P, options: MuxOptions) -> Arc<Self> {
        let handles = (0..size.max(1))
            .map(|_| Handle::spawn(make(), options.clone()))
            .collect();
        Arc::new(Pool {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    pub fn handle(&self) -> &Handle<P> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

/// How much a read buffer grows by (also the RPC server's, for the same peers).
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// Reads are made into at least this much free space.
pub(crate) const MIN_READ: usize = 4096;
/// Stop taking calls while this much is written and not yet accepted by the
/// socket: the peer is not keeping up.
const MAX_UNSENT: usize = 4 * 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(25);
/// Kept short so that a restarted peer is used again within a second.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection closed while idle is reopened without a backoff only if it
/// lived this long: a peer that closes every connection at once (e.g. at
/// its connection limit) still gets the backoff.
const MIN_LIFE_FOR_QUICK_RECONNECT: Duration = Duration::from_secs(1);
/// How often calls whose callers stopped waiting are looked for, to cancel
/// them at the peer ([`Protocol::cancel`]): a pull held for up to 30 s is
/// freed at the RPC server within about this long of its client leaving.
const CANCEL_SWEEP: Duration = Duration::from_secs(1);
/// Longest a connection closed by this side waits for its peer to close too
/// ([`Connection::close`]).
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// The task's end of a [`Handle`]'s channel: taking a call releases its
/// bytes from the budget.
struct Queue<P: Protocol> {
    calls: mpsc::Receiver<Call<P>>,
    queued: ByteBudget,
}

impl<P: Protocol> Queue<P> {
    fn taken(&self, call: Call<P>) -> Call<P> {
        self.queued.release(call.bytes);
        call
    }

    async fn recv(&mut self) -> Option<Call<P>> {
        let call = self.calls.recv().await?;
        Some(self.taken(call))
    }

    fn try_recv(&mut self) -> Result<Call<P>, mpsc::error::TryRecvError> {
        let call = self.calls.try_recv()?;
        Ok(self.taken(call))
    }
}

async fn run<P: Protocol>(mut protocol: P, mut calls: Queue<P>, options: MuxOptions) {
    let mut backoff = MIN_BACKOFF;
    let mut healthy = true;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, protocol.connect()).await {
            Ok(Ok(stream)) => {
                if !healthy {
                    crate::logging::info!("{} connected to {}", options.name, options.target);
                }
                backoff = MIN_BACKOFF;
                let mut connection = Connection {
                    stream,
                    input: BytesMut::with_capacity(READ_CHUNK),
                    output: BytesMut::with_capacity(READ_CHUNK),
                    waiting: HashMap::new(),
                    in_flight_bytes: 0,
                    held: 0,
                };
                let connected = Instant::now();
                let outcome = connection.serve(&mut protocol, &mut calls, &options).await;
                if outcome.is_ok() {
                    // Every handle dropped: this side closes, cleanly.
                    return connection.close(&mut protocol).await;
                }
                // Closed by the peer with no call waiting, after it had been
                // up a while: a server's idle timeout. Reconnect at once
                // instead of failing calls for a backoff: nothing is wrong.
                let idle_close = connection.waiting.is_empty()
                    && connected.elapsed() >= MIN_LIFE_FOR_QUICK_RECONNECT;
                for (_, (reply, _, _)) in connection.waiting.drain() {
                    let _ = reply.send(Err(Error::Lost));
                }
                match outcome {
                    Ok(()) => return,
                    // The peer said it is going away (GOAWAY: a graceful
                    // restart or shutdown, already logged where it is read)
                    // and this side closed: nothing failed. Not reopened at
                    // once: the peer no longer accepts (it says GOAWAY only
                    // after that), and it takes a restart to come back.
                    Err(_) if protocol.retiring() => healthy = false,
                    Err(_) if idle_close => continue,
                    Err(err) => {
                        crate::logging::warning!(
                            "{} connection to {} lost", options.name, options.target;
                            err = err
                        );
                        healthy = false;
                    }
                }
            }
            Ok(Err(err)) if healthy => {
                crate::logging::warning!(
                    "{} cannot connect to {}; retrying", options.name, options.target;
                    err = err
                );
                healthy = false;
            }
            Err(_) if healthy => {
                crate::logging::warning!(
                    "{} connect to {} timed out; retrying",
                    options.name,
                    options.target
                );
                healthy = false;
            }
            _ => {}
        }
        if !fail_fast_for(backoff, &mut calls).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Until the next connection attempt, fails calls at once (`Unavailable`:
/// never written, so the caller may send them elsewhere) rather than let
/// them queue; `false` once every handle is dropped.
async fn fail_fast_for<P: Protocol>(backoff: Duration, calls: &mut Queue<P>) -> bool {
    let retry = tokio::time::sleep(backoff);
    tokio::pin!(retry);
    loop {
        tokio::select! {
            _ = &mut retry => return true,
            call = calls.recv() => match call {
                Some(call) => { let _ = call.reply.send(Err(Error::Unavailable)); }
                None => return false,
            },
        }
    }
}

/// Each written call's reply channel, counted bytes and whether it is held
/// ([`Protocol::held`]), by tag.
type Waiting<P> = HashMap<
    u64,
    (
        oneshot::Sender<Result<<P as Protocol>::Reply, Error>>,
        usize,
        bool,
    ),
>;

struct Connection<P: Protocol> {
    stream: Stream,
    input: BytesMut,
    output: BytesMut,
    waiting: Waiting<P>,
    /// Counted bytes of the calls in `waiting`.
    in_flight_bytes: usize,
    /// Held calls in `waiting`.
    held: usize,
}

impl<P: Protocol> Connection<P> {
    /// Serves calls until the connection fails (`Err`) or every handle is
    /// dropped (`Ok`).
    async fn serve(
        &mut self,
        protocol: &mut P,
        calls: &mut Queue<P>,
        options: &MuxOptions,
    ) -> io::Result<()> {
        let mut sweep = tokio::time::interval_at(Instant::now() + CANCEL_SWEEP, CANCEL_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Take everything already queued, every turn: under a steady
            // stream of replies the socket is always readable, and waiting
            // for the select below to pick the channel would starve callers.
            while self.accepting(options) {
                match calls.try_recv() {
                    Ok(call) => self.enqueue(protocol, call, options),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            // Everything taken goes out in one write.
            self.flush()?;
            if self.waiting.is_empty() && self.output.is_empty() && protocol.retiring() {
                return Err(io::Error::other("the peer is going away"));
            }
            if self.ordinary() >= options.max_in_flight {
                // Callers that timed out leave their slot behind; reclaim them.
                // Not calls with counted bytes: those bytes stay with the
                // peer until it answers, and the answer releases them.
                self.waiting
                    .retain(|_, (reply, bytes, _)| *bytes > 0 || !reply.is_closed());
                self.recount_held();
            }
            let interest = if self.output.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let accepting = self.accepting(options);
            tokio::select! {
                ready = self.stream.ready(interest) => {
                    let ready = ready?;
                    if ready.is_readable() {
                        self.read_replies(protocol)?;
                    }
                    if ready.is_writable() {
                        self.flush()?;
                    }
                }
                call = calls.recv(), if accepting => match call {
                    Some(call) => self.enqueue(protocol, call, options),
                    None => return Ok(()),
                },
                _ = sweep.tick(), if !self.waiting.is_empty() => self.cancel_abandoned(protocol),
            }
        }
    }

    /// Ends the connection so that the peer sees a clean close, not a reset:
    /// the calls still waiting are cancelled at the peer (nobody is left to
    /// read their replies), what is queued is written, this side half-closes,
    /// and replies are read and dropped until the peer closes too, for at
    /// most [`CLOSE_LINGER`]. Closing with replies unread, or before the
    /// peer's last replies arrived, made the kernel answer with a reset,
    /// which the peer (the RPC server of this very process, on shutdown)
    /// logged as a failed connection.
    async fn close(mut self, protocol: &mut P) {
        let output = &mut self.output;
        for &tag in self.waiting.keys() {
            protocol.cancel(tag, output);
        }
        let closing = async {
            while !self.output.is_empty() {
                self.stream.ready(Interest::WRITABLE).await?;
                self.flush()?;
            }
            self.stream.shutdown_write()?;
            loop {
                self.input.clear();
                self.stream.read_some(&mut self.input).await?;
            }
        };
        // Ends with the peer's end of stream (an error to `read_some`), a
        // failure, or the linger bound: each leaves nothing more to do.
        let _: Result<io::Result<()>, _> = tokio::time::timeout(CLOSE_LINGER, closing).await;
    }

    /// Cancels at the peer the calls whose callers stopped waiting, and
    /// frees their slots; calls with counted bytes keep theirs (those bytes
    /// stay with the peer until it answers).
    fn cancel_abandoned(&mut self, protocol: &mut P) {
        let output = &mut self.output;
        self.waiting.retain(|&tag, (reply, bytes, _)| {
            *bytes > 0 || !reply.is_closed() || !protocol.cancel(tag, output)
        });
        self.recount_held();
    }

    fn recount_held(&mut self) {
        self.held = self.waiting.values().filter(|(_, _, held)| *held).count();
    }

    /// Ordinary (not held) calls written and not yet answered.
    fn ordinary(&self) -> usize {
        self.waiting.len().saturating_sub(self.held)
    }

    /// Whether to take more calls: not while the peer is behind.
    fn accepting(&self, options: &MuxOptions) -> bool {
        self.ordinary() < options.max_in_flight
            && self.output.len() < MAX_UNSENT
            && self.in_flight_bytes < options.max_queued_bytes
    }

    fn enqueue(&mut self, protocol: &mut P, call: Call<P>, options: &MuxOptions) {
        // The caller gave up (timed out) while the call was queued: sending
        // it would only load the peer with work nobody waits for.
        if call.reply.is_closed() {
            return;
        }
        // Too late to be useful, and the caller may already have been told
        // it failed: writing it now could make a refused call take effect.
        if call.deadline.is_some_and(|d| d <= Instant::now()) {
            let _ = call.reply.send(Err(Error::Timeout));
            return;
        }
        let held = P::held(&call.request);
        if held && self.held >= options.max_in_flight {
            let _ = call.reply.send(Err(Error::Overloaded));
            return;
        }
        let tag = protocol.encode(call.request, &mut self.output);
        self.in_flight_bytes += call.bytes;
        self.held += usize::from(held);
        self.waiting.insert(tag, (call.reply, call.bytes, held));
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.try_write(&self.output) {
                Ok(n) => self.output.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_replies(&mut self, protocol: &mut P) -> io::Result<()> {
        loop {
            crate::buf::reserve_for_read(&mut self.input, MIN_READ, READ_CHUNK);
            match self.stream.try_read_buf(&mut self.input) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed by peer",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
            while let Some((tag, reply)) = protocol.decode(&mut self.input)? {
                if let Some((waiter, bytes, held)) = self.waiting.remove(&tag) {
                    self.in_flight_bytes -= bytes;
                    self.held = self.held.saturating_sub(usize::from(held));
                    let _ = waiter.send(Ok(reply));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_budget_refuses_over_the_bound_but_always_takes_one() {
        let budget = ByteBudget::new(100);
        assert!(budget.add(60));
        assert!(budget.add(40), "exactly at the bound");
        assert!(!budget.add(1), "over the bound");
        budget.release(100);
        assert!(budget.add(500), "alone, even bigger than the budget");
        assert!(!budget.add(1));
        assert!(budget.add(0), "uncounted requests always pass");
        budget.release(500);
        assert!(budget.add(100));
    }
}
