//! The accept loop and the per-connection driver: it does what the
//! connection's policy ([`super::conn::Conn`]) asks — start a request, write
//! a response as soon as it is ready, read until a deadline, close.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::codec::{HttpError, Limits, Request};
use super::conn::{
    Action, Conn, Expiry, Finished, Framing, ReadUntil, Settings, StreamEnd, StreamStep,
};
use super::response::{
    Batch, EventSource, LAST_CHUNK, Response, Upgrade, put_chunk, write_response,
};
use crate::accept::{drain, next_connection};
use crate::budget::{Account, Charge, ClientKey, MemoryBudget};
use crate::metrics::{self, Gauge, METRICS};
use crate::unwind::{catch_panic, catch_panic_sync};

/// What the HTTP layer asks of the application behind it.
pub trait Handler: Send + Sync + 'static {
    /// A request that has been started and not yet answered.
    type Pending: Send;
    /// Starts serving `req` without waiting (parsing, validation, enqueueing
    /// an RPC), so that all pipelined requests are in flight together. The
    /// replies it receives are charged to `account` (its connection's, see
    /// [`crate::budget`]) until written.
    fn start(&self, req: &Request, account: &Account) -> Self::Pending;
    /// Waits for the response to a started request.
    fn finish(&self, pending: Self::Pending) -> impl Future<Output = Response> + Send;
    /// The response to a request that could not be decoded.
    fn reject(&self, err: HttpError) -> Response;
    /// Whether a started request may be held long (a pull waiting for
    /// messages): while it is, the connection watches for the peer's close
    /// and gives the request up then, rather than hold it to its deadline.
    fn held(_pending: &Self::Pending) -> bool {
        false
    }
}

/// The server's options. The config maps into them, and their `Default`
/// is every option's default (both in `config/components.rs`).
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    pub limits: Limits,
    /// How long an idle keep-alive connection is kept open.
    pub idle_timeout: Duration,
    /// How long a client may take to send one whole request, from its first byte.
    pub request_timeout: Duration,
    /// Open connections; beyond it new ones get 503 and are closed.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Response bytes queued per connection before it stops starting requests.
    pub max_output_buffer: usize,
    /// How long a peer may accept no bytes of a response before it is closed
    /// (and how long an event stream's output may take to drain).
    pub write_timeout: Duration,
    /// Silence on an event stream after which a heartbeat comment is written.
    pub stream_heartbeat: Duration,
}

/// Bytes asked of each read.
const READ_CHUNK: usize = 16 * 1024;
/// Reads are made into at least this much free space.
const MIN_READ: usize = 2048;
const INITIAL_BUFFER: usize = 4096;

/// Reads once bytes have arrived, and only then makes room for them: an
/// empty read buffer is given back before waiting, so a connection whose
/// request is held (a pull waiting for messages) or that idles between
/// requests holds no read buffer (see also [`Io::finish`]). Measured with
/// 10,000 waiting pulls (bench/longpoll --held): the gateway held 15.4 KiB
/// per connection before this and the lazy output buffer, 11.4 KiB after,
/// 4.6 KiB once the wait released its buffers too and the task stopped
/// holding the response future twice (the rest is mostly the task: 3.5 KB);
/// the cost is one 4 KiB allocation per read.
///
/// The read itself is `read_buf` (tokio's `poll_read`), not `try_read_buf`:
/// a read shorter than the room offered has drained the socket, and
/// `poll_read` then clears the socket's readiness, where `try_read` clears
/// it only on `EAGAIN`. With `try_read_buf` every request cost one more
/// `recvfrom` that answered `EAGAIN` (measured with `perf trace -s` on the
/// all-in-one under wrk: 1.46 `recvfrom` per send against 0.93 at 6229c84,
/// which read this way). Only readiness left set by a read that filled the
/// room makes it wait holding the buffer.
async fn read_when_ready(socket: &mut TcpStream, input: &mut BytesMut) -> std::io::Result<usize> {
    release_if_empty(input);
    socket.readable().await?;
    if input.capacity() == 0 {
        input.reserve(INITIAL_BUFFER);
    }
    crate::buf::reserve_for_read(input, MIN_READ, READ_CHUNK);
    socket.read_buf(input).await
}
/// Gives back an empty buffer's memory.
fn release_if_empty(buffer: &mut BytesMut) {
    if buffer.is_empty() && buffer.capacity() > 0 {
        *buffer = BytesMut::new();
    }
}

/// A connection's read timer before its first read sets it (any deadline
/// is earlier than this, so the first read moves it there).
const UNSET_TIMER: Duration = Duration::from_secs(365 * 86_400);

/// Output the memory budget does not count (see [`Io::charge_output`]).
const UNCHARGED_OUTPUT: usize = 4096;

/// An output buffer grown past this by a large response is replaced once empty.
const SHRINK_OVER: usize = 64 * 1024;

/// One permit per open connection, shared by every thread accepting on the
/// same address: the connection limit, and the drain barrier at shutdown.
pub fn connection_slots(options: &ServerOptions) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(options.max_connections))
}

/// Accepts connections, one task each, until `shutdown` turns true; then
/// stops accepting and waits (up to the drain timeout) until every
/// connection holding one of `slots` has finished its in-flight requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServerOptions,
    slots: Arc<Semaphore>,
    budget: Arc<MemoryBudget>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((socket, peer)) = next_connection(&listener, &mut shutdown, "http").await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            METRICS.http_connection(false);
            refuse(&socket, handler.as_ref());
            continue;
        };
        METRICS.http_connection(true);
        let open = metrics::track(Gauge::HttpConnections);
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let account = budget.account(ClientKey::of_ip(peer.ip()));
        tokio::spawn(async move {
            let _ = connection(socket, peer.ip(), account, handler, options, shutdown).await;
            drop((slot, open));
        });
    }
    drop(listener);
    if let Err(open) = drain(&slots, options.max_connections, options.drain_timeout).await {
        crate::logging::warning!("http drain timed out with {open} connections open");
    }
}

/// Answers a connection over the limit with 503 and closes it, without
/// waiting on the client: a best-effort write into the empty socket buffer.
fn refuse<H: Handler>(socket: &TcpStream, handler: &H) {
    let mut output = BytesMut::new();
    write_response(
        &mut output,
        &handler.reject(HttpError::TooManyConnections),
        false,
        false,
        false,
    );
    let _ = socket.try_write(&output);
}

/// An event stream's source and what the driver keeps of it.
struct Streamed {
    events: Box<dyn EventSource>,
    /// The source's next batch, kept across heartbeats.
    more: Option<Pin<Box<dyn Future<Output = Batch> + Send>>>,
    /// Events rendered for the next chunk; reused.
    rendered: BytesMut,
    /// HTTP/1.1: chunked coding; HTTP/1.0: a close-delimited body.
    chunked: bool,
}

/// The I/O half of one connection: the socket and the output not yet written.
struct Io {
    socket: TcpStream,
    output: BytesMut,
    /// The output's charge against the memory budget ([`Io::charge_output`]).
    charged: Charge,
    write_timeout: Duration,
    max_output: usize,
}

async fn connection<H: Handler>(
    socket: TcpStream,
    peer: std::net::IpAddr,
    account: Account,
    handler: Arc<H>,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut conn = Conn::new(settings(&options), std::time::Instant::now());
    let mut io = Io {
        socket,
        // Allocated by the first response: a connection whose request is
        // held (a pull waiting for messages) holds no output buffer yet.
        output: BytesMut::new(),
        charged: account.empty(),
        write_timeout: options.write_timeout,
        max_output: options.max_output_buffer,
    };
    // The started requests, oldest first; `None` if `start` panicked.
    let mut pending: VecDeque<Option<H::Pending>> = VecDeque::new();
    // The clock as of the last wait: read once after each `.await`, not at
    // every step (a pipelined batch takes several steps and no time).
    let mut now = std::time::Instant::now();
    // The read deadline's timer and the shutdown wait are made once per
    // connection, not per read: a `timeout_at` and a `wait_for` made for
    // every read registered and removed a timer entry and a shutdown waiter
    // per request (`bench/cpu-ab send`: 8.45-8.63 -> 8.01-8.23 µs of the
    // all-in-one's CPU per send; the WebSocket loop does the same). The
    // timer is moved only to an earlier deadline or once it has fired (see
    // `Io::read`).
    let read_timer = tokio::time::sleep_until(Instant::from_std(now) + UNSET_TIMER);
    tokio::pin!(read_timer);
    let mut stop_watch = shutdown.clone();
    let stopping = async move {
        // An error means the sender is gone: the process is stopping too.
        let _ = stop_watch.wait_for(|&stop| stop).await;
    };
    tokio::pin!(stopping);
    loop {
        io.charge_output();
        conn.holding(
            account.held().saturating_sub(io.output.len()),
            account.reserved(),
        );
        match conn.next(now, io.output.len()) {
            Action::Start(mut req) => {
                req.peer = Some(peer);
                pending.push_back(catch_panic_sync(|| handler.start(&req, &account)));
            }
            Action::Finish => {
                let answered =
                    answer_oldest(&mut io, &mut conn, &mut pending, &*handler, &shutdown);
                let after = answered.await?;
                now = std::time::Instant::now();
                match after {
                    AfterResponse::Next => {}
                    // Boxed: a stream's driver is large, and inline it
                    // would make every connection's task that large.
                    AfterResponse::Stream(events, chunked) => {
                        return Box::pin(io.stream(&mut conn, events, chunked, &mut shutdown))
                            .await;
                    }
                    AfterResponse::Upgrade(upgrade) => {
                        io.flush().await?;
                        let input = std::mem::take(&mut conn.input);
                        upgrade.run(io.socket, input, shutdown).await;
                        return Ok(());
                    }
                }
            }
            Action::Stream(_) => return Ok(()),
            Action::Flush => {
                io.flush().await?;
                now = std::time::Instant::now();
            }
            Action::Continue => io.output.put_slice(b"HTTP/1.1 100 Continue\r\n\r\n"),
            Action::Read(until) => {
                match io
                    .read(
                        &mut conn,
                        until,
                        handler.as_ref(),
                        read_timer.as_mut(),
                        stopping.as_mut(),
                    )
                    .await?
                {
                    Some(read_at) => now = read_at,
                    None => return Ok(()),
                }
            }
            Action::Reject(err) => {
                write_response(&mut io.output, &handler.reject(err), false, false, false);
                return io.close().await;
            }
            Action::Close => return io.close().await,
        }
    }
}

/// The connection policy's settings from the server's options.
fn settings(options: &ServerOptions) -> Settings {
    Settings {
        limits: options.limits,
        idle_timeout: options.idle_timeout,
        request_timeout: options.request_timeout,
        max_output: options.max_output_buffer,
        heartbeat: options.stream_heartbeat,
        write_timeout: options.write_timeout,
    }
}

/// What the connection does after a response.
enum AfterResponse {
    Next,
    /// Drive this event stream (chunked or not).
    Stream(Box<dyn EventSource>, bool),
    /// Hand the connection over (after `101 Switching Protocols`).
    Upgrade(Box<dyn Upgrade>),
}

/// Answers the oldest started request and queues its response; an event
/// stream's source (and whether it is chunked), or what takes the
/// connection over, is handed back for the connection to drive.
async fn answer_oldest<H: Handler>(
    io: &mut Io,
    conn: &mut Conn,
    pending: &mut VecDeque<Option<H::Pending>>,
    handler: &H,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<AfterResponse> {
    // The future is made and pinned here, in one place: an `async fn`
    // taking the started request or its future by value would hold it twice
    // (rust-lang/rust#62958), in every waiting connection's task.
    let held = pending
        .front()
        .and_then(Option::as_ref)
        .is_some_and(H::held);
    let mut finishing = std::pin::pin!(pending.pop_front().flatten().map(|p| handler.finish(p)));
    let release_idle = || {
        release_if_empty(&mut conn.input);
        if pending.is_empty() {
            *pending = VecDeque::new();
        }
    };
    let resp = match finishing.as_mut().as_pin_mut() {
        Some(future) => io.response(catch_panic(future), held, release_idle).await?,
        None => None,
    };
    let mut resp = resp.unwrap_or_else(|| handler.reject(HttpError::HandlerPanicked));
    let done = Finished {
        status: resp.status,
        body_len: resp.body_len(),
        close: resp.close || resp.events.is_some(),
    };
    let framing = conn.finished(done, *shutdown.borrow());
    if !framing.keep_alive {
        pending.clear();
    }
    if resp.upgrade.is_some() {
        write_response(&mut io.output, &resp, false, false, false);
    }
    if let Some(upgrade) = resp.upgrade.take() {
        return Ok(AfterResponse::Upgrade(upgrade));
    }
    Ok(match io.put_response(resp, framing).await? {
        Some(events) => {
            conn.start_stream(std::time::Instant::now());
            AfterResponse::Stream(events, !framing.http10)
        }
        None => AfterResponse::Next,
    })
}

impl Io {
    /// Waits for a started request's response (`None` if serving it
    /// panicked). One already answered is taken without writing first, so
    /// that pipelined responses share a write; before waiting on one that
    /// is not, the output goes out and `release_idle` gives back the
    /// buffers the wait does not need (a pull held waiting for messages kept
    /// 5 KB in them: the 4 KiB its request was read into and the queue of
    /// started requests; measured with 10,000 waiting pulls, bench/longpoll
    /// --held). A `held` request is given up if the peer closes meanwhile.
    async fn response<F: Future<Output = Option<Response>> + Unpin>(
        &mut self,
        mut finishing: F,
        held: bool,
        release_idle: impl FnOnce(),
    ) -> std::io::Result<Option<Response>> {
        if let Some(resp) = poll_once(Pin::new(&mut finishing)).await {
            return Ok(resp);
        }
        self.flush().await?;
        release_idle();
        if !held {
            return Ok(finishing.await);
        }
        tokio::select! {
            resp = &mut finishing => Ok(resp),
            () = peer_closed(&self.socket) => Err(std::io::ErrorKind::ConnectionAborted.into()),
        }
    }

    /// Queues `resp`; a streamed body is produced as the output drains, so
    /// that no more than about `max_output` of it is held at once. An event
    /// stream's source is handed back, its head queued.
    async fn put_response(
        &mut self,
        mut resp: Response,
        framing: Framing,
    ) -> std::io::Result<Option<Box<dyn EventSource>>> {
        write_response(
            &mut self.output,
            &resp,
            framing.head_only,
            framing.keep_alive,
            framing.http10,
        );
        if framing.head_only {
            return Ok(None);
        }
        if let Some(events) = resp.events.take() {
            return Ok(Some(events));
        }
        let Some(mut stream) = resp.stream else {
            return Ok(None);
        };
        while !stream.fill(&mut self.output, self.max_output) {
            self.flush().await?;
        }
        Ok(None)
    }

    /// Drives an event stream until it ends: the connection's policy says
    /// when to render, write, wait or stop ([`StreamStep`]).
    async fn stream(
        &mut self,
        conn: &mut Conn,
        events: Box<dyn EventSource>,
        chunked: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut stream = Streamed {
            events,
            more: None,
            rendered: BytesMut::new(),
            chunked,
        };
        loop {
            let now = std::time::Instant::now();
            self.charge_output();
            let Action::Stream(step) = conn.next(now, self.output.len()) else {
                return Ok(());
            };
            match step {
                StreamStep::Fill => {
                    let room = self.max_output.saturating_sub(self.output.len()).max(1);
                    let buffered = stream.events.fill(&mut stream.rendered, room);
                    put_chunk(&mut self.output, &stream.rendered, chunked);
                    conn.filled(buffered, !stream.rendered.is_empty(), now);
                    stream.rendered.clear();
                    // A burst grew it: give the memory back rather than
                    // hold megabytes per idle stream.
                    if stream.rendered.capacity() > SHRINK_OVER {
                        stream.rendered = BytesMut::new();
                    }
                }
                StreamStep::Heartbeat => {
                    put_chunk(&mut self.output, stream.events.heartbeat(), chunked);
                    conn.sent(now);
                }
                StreamStep::Drain(deadline) => tokio::select! {
                    written = self.write_until(deadline) => written?,
                    _ = shutdown.wait_for(|&stop| stop) => conn.shut_down(now),
                },
                StreamStep::Await(heartbeat_at) => {
                    if !self
                        .await_batch(conn, &mut stream, heartbeat_at, shutdown)
                        .await
                    {
                        return Ok(());
                    }
                }
                StreamStep::End { why, deadline } => {
                    if why == StreamEnd::Lagged {
                        put_chunk(&mut self.output, stream.events.lagged(), chunked);
                    }
                    if chunked {
                        self.output.put_slice(LAST_CHUNK);
                    }
                    // Best effort: the reader may never take these bytes.
                    let _ = self.write_until(deadline).await;
                    let _ = self.socket.shutdown().await;
                    return Ok(());
                }
            }
        }
    }

    /// Waits for the stream's next batch until `heartbeat_at`, shutdown or
    /// the peer's close, and tells `conn` what happened; false when the peer
    /// has gone.
    async fn await_batch(
        &mut self,
        conn: &mut Conn,
        stream: &mut Streamed,
        heartbeat_at: std::time::Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let now = std::time::Instant::now();
        let events = &mut stream.events;
        let batch = stream.more.get_or_insert_with(|| events.more());
        let mut sink = [0u8; 512];
        tokio::select! {
            batch = batch => {
                stream.more = None;
                match batch {
                    Ok(batch) => {
                        stream.events.take(batch);
                        conn.arrived();
                    }
                    Err(last_event) => {
                        put_chunk(&mut self.output, &last_event, stream.chunked);
                        conn.stream_failed(now);
                    }
                }
            }
            _ = tokio::time::sleep_until(Instant::from_std(heartbeat_at)) => {}
            _ = shutdown.wait_for(|&stop| stop) => conn.shut_down(now),
            // Whatever the peer sends now is not served (the stream is the
            // connection's last response); its close ends the stream at
            // once, not at the next write.
            read = self.socket.read(&mut sink) => return !matches!(read, Ok(0) | Err(_)),
        }
        true
    }

    /// Counts the output queued now against the memory budget: it is held
    /// until the peer takes it, and replies arriving meanwhile for this
    /// client are refused if it leaves no room.
    ///
    /// Output up to [`UNCHARGED_OUTPUT`] is not counted: a typical response
    /// (a send's ~200 bytes, a page of 10 short messages ~1.5 KB) is written
    /// at once, and counting it took the budget's process-wide lock twice
    /// per request (`Charge::resize` and `MemoryBudget::adjust`: 1.6 % of
    /// the all-in-one's CPU under `wrk` pulls, `perf record`). What it leaves
    /// uncounted is at most that much per connection, the size of the read
    /// buffer each connection holds uncounted anyway.
    fn charge_output(&mut self) {
        let held = match self.output.len() {
            n if n <= UNCHARGED_OUTPUT => 0,
            n => n,
        };
        self.charged.resize(held);
    }

    /// Writes the output until it is all out or `deadline` passes (then
    /// returns with output left, for the policy to judge).
    async fn write_until(&mut self, deadline: std::time::Instant) -> std::io::Result<()> {
        let deadline = Instant::from_std(deadline);
        self.charge_output();
        while !self.output.is_empty() {
            match tokio::time::timeout_at(deadline, self.socket.write(&self.output)).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => self.output.advance(n),
                Ok(Err(err)) => return Err(err),
                Err(_elapsed) => return Ok(()),
            }
        }
        self.charge_output();
        if self.output.capacity() > SHRINK_OVER {
            self.output = BytesMut::with_capacity(INITIAL_BUFFER);
        }
        Ok(())
    }

    /// Writes out what is queued (a final response), then closes.
    async fn close(mut self) -> std::io::Result<()> {
        self.flush().await?;
        Box::pin(lingering_close(self.socket)).await
    }

    /// Writes out the whole output. A peer that accepts no byte for the
    /// write timeout is given up on (it would hold the connection, its
    /// buffers and a connection slot for ever).
    async fn flush(&mut self) -> std::io::Result<()> {
        self.charge_output();
        // Almost every response fits the socket's buffer: written at once,
        // it needs no timer (each `timeout` reads the clock and makes a
        // timer entry; timers and clock reads together were 8 % of the
        // all-in-one's CPU under wrk pulls, issue 19).
        if !self.output.is_empty() {
            match self.socket.try_write(&self.output) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.output.advance(n),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        while !self.output.is_empty() {
            let written =
                tokio::time::timeout(self.write_timeout, self.socket.write(&self.output)).await;
            match written {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => self.output.advance(n),
                Ok(Err(err)) => return Err(err),
                Err(_elapsed) => return Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        self.charge_output();
        // A large response grew the buffer: give it back rather than keep
        // megabytes per idle connection.
        if self.output.capacity() > SHRINK_OVER {
            self.output = BytesMut::with_capacity(INITIAL_BUFFER);
        }
        Ok(())
    }

    /// Reads into the connection's input until `until.deadline`; the clock
    /// when the bytes came, or `None` when the connection is to end (closed
    /// by the peer, expired, shutdown). `timer` is the connection's: set to
    /// an earlier deadline than this one, it fires early and is moved on;
    /// `stopping` resolves once the server shuts down.
    async fn read<H: Handler>(
        &mut self,
        conn: &mut Conn,
        until: ReadUntil,
        handler: &H,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut stopping: Pin<&mut impl Future<Output = ()>>,
    ) -> std::io::Result<Option<std::time::Instant>> {
        let deadline = Instant::from_std(until.deadline);
        if deadline < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(deadline);
        }
        let read = loop {
            tokio::select! {
                read = read_when_ready(&mut self.socket, &mut conn.input) => break Ok(read),
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        break Err(());
                    }
                    timer.as_mut().reset(deadline);
                }
                // An idle keep-alive connection is closed at once on
                // shutdown; a request being received is finished first.
                () = stopping.as_mut(), if until.interruptible => return Ok(None),
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => Ok(None),
            Ok(Ok(n)) => {
                let now = std::time::Instant::now();
                conn.received(n, now);
                Ok(Some(now))
            }
            Err(()) => {
                if until.expiry == Expiry::Timeout {
                    write_response(
                        &mut self.output,
                        &handler.reject(HttpError::Timeout),
                        false,
                        false,
                        false,
                    );
                    let _ = self.flush().await;
                }
                Ok(None)
            }
        }
    }
}

/// Resolves when the peer has closed the connection (or reset it); never
/// if it sends bytes instead (the next pipelined request, read later): then
/// it cannot tell, and waiting on readiness again would spin.
async fn peer_closed(socket: &TcpStream) {
    let mut byte = [0u8; 1];
    match socket.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Polls `fut` once: its output if it is ready now, else `None` (it stays
/// pinned by the caller, to be awaited).
async fn poll_once<F: Future + ?Sized>(mut fut: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Closes after a final response without resetting the connection: unread
/// request bytes would make the kernel send RST, and the client could lose
/// the response. Half-close, then drain briefly (what nginx calls lingering close).
async fn lingering_close(mut socket: TcpStream) -> std::io::Result<()> {
    socket.shutdown().await?;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut drained = 0usize;
    while drained < 1024 * 1024 {
        match tokio::time::timeout_at(deadline, socket.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
    Ok(())
}
