//! The RPC server: decodes request frames, validates, asks the store, and
//! writes replies as they complete (in any order), batched per connection.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};

use super::admission::{Admission, Ticket};
use super::frame::{self, Frame};
use super::local::LocalAccept;
use super::{handshake, method, status};
use crate::accept::{Accepting, drain, next_connection, pending};
use crate::domain::{
    DEFAULT_LIMIT, MAX_LIMIT, MAX_MESSAGE_WIRE_BYTES, PullQuery, canonical_chat,
    chat_keeps_records, validate_change, validate_idempotency_key, validate_pull, validate_send,
    validate_wait,
};
use crate::error::{CODE_OK, Error};
use crate::metrics::{self, Gauge, METRICS, RpcMethod};
use crate::mux::{MIN_READ, READ_CHUNK};
use crate::pipe::PipeStream;
use crate::proto::{
    ChangesRequest, ChangesResponse, DeleteRequest, DeleteResponse, EditRequest, EditResponse,
    Message, PingRequest, PingResponse, PullRequest, PullResponse, SendRequest, SendResponse,
};
use crate::store::lifecycle::MAX_CHANGES;
use crate::store::{AnyStore, Page, Sent, Store};
use crate::unwind::catch_panic;

#[derive(Debug, Clone)]
pub struct RpcServerOptions {
    pub max_frame: usize,
    /// Requests of one connection being served at once; more are refused
    /// with `Overloaded`.
    pub max_in_flight: usize,
    /// Reply bytes one connection may hold: replies being made (counted at
    /// the largest size they can have) and replies not yet written. Past it
    /// the connection is not read until its peer reads.
    pub max_output: usize,
    /// A connection with nothing in flight that sends nothing for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// Open connections (all shards together, through the shared slots).
    pub max_connections: usize,
    /// With a shared secret every connection must pass the handshake
    /// ([`super::handshake`]) before its first call.
    pub secret: Option<Arc<[u8]>>,
    /// `--rpc-advertise`: the address gateways dial when it is not the one
    /// this server listens on (NAT); the handshake accepts proofs for
    /// either.
    pub advertise: Option<String>,
}

/// Connections in the handshake at once, per accept loop (shard): what
/// clients that have proven nothing may hold (see [`super::admission`]).
pub const HANDSHAKE_SLOTS: usize = 64;

/// How long a new connection has to prove it knows the secret: a gateway
/// needs one round trip.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What every shard serving one RPC address shares: the connection limit
/// and the count of shards still accepting on its socket.
pub struct SharedListener {
    slots: Arc<Semaphore>,
    accepting: Accepting,
}

impl SharedListener {
    pub fn new(options: &RpcServerOptions) -> Arc<SharedListener> {
        Arc::new(SharedListener {
            slots: Arc::new(Semaphore::new(options.max_connections)),
            accepting: Accepting::default(),
        })
    }
}

/// Accepts connections until `shutdown` turns true, then stops accepting and
/// waits (up to `drain_timeout`) until every connection holding one of
/// the shared slots has finished the requests it had already read.
///
/// Connections are told to go away (GOAWAY) only once no shard accepts on
/// the address any more ([`Accepting`]), and what was still in the accept
/// queue is taken and told too, so that no connection is reset under the
/// calls written on it.
pub async fn serve(
    listener: TcpListener,
    mut local: Option<LocalAccept>,
    store: Arc<AnyStore>,
    options: RpcServerOptions,
    shared: Arc<SharedListener>,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    shared.accepting.opened();
    let mut acceptor = Acceptor {
        store,
        options,
        slots: shared.slots.clone(),
        going_away: shared.accepting.all_closed(),
        admission: Admission::new(HANDSHAKE_SLOTS),
        refusals: RefusalLog::default(),
    };
    loop {
        let incoming = tokio::select! {
            accepted = next_connection(&listener, &mut shutdown, "rpc") => match accepted {
                Some((socket, peer)) => Incoming::Tcp(socket, peer),
                None => break,
            },
            pair = async { Some(local.as_mut()?.next().await) }, if local.is_some() => match pair {
                Some(stream) => Incoming::Local(stream),
                None => continue,
            },
        };
        acceptor.admit(incoming);
    }
    for (socket, peer) in pending(&listener) {
        acceptor.admit(Incoming::Tcp(socket, peer));
    }
    drop(listener);
    shared.accepting.closed_one();
    let max_connections = acceptor.options.max_connections;
    if let Err(open) = drain(&shared.slots, max_connections, drain_timeout).await {
        crate::logging::warning!("rpc drain timed out with {open} connections open");
    }
}

/// What the accept loop needs to start serving a connection.
struct Acceptor {
    store: Arc<AnyStore>,
    options: RpcServerOptions,
    slots: Arc<Semaphore>,
    /// True once no shard accepts on the address: connections say GOAWAY.
    going_away: watch::Receiver<bool>,
    admission: Admission,
    refusals: RefusalLog,
}

impl Acceptor {
    /// Starts serving `incoming` in a task of its own, or closes it at once
    /// when every connection slot is taken.
    fn admit(&mut self, incoming: Incoming) {
        let incoming = match (incoming, self.options.secret.clone()) {
            (Incoming::Tcp(socket, peer), Some(secret)) => {
                // Proven nothing yet: a pre-handshake slot, not a connection slot.
                let (ticket, _evicted) = self.admission.admit();
                let serve = authenticate_then_serve(
                    (socket, peer, ticket, secret),
                    self.store.clone(),
                    self.options.clone(),
                    self.slots.clone(),
                    self.going_away.clone(),
                );
                tokio::spawn(serve);
                return;
            }
            (incoming, _) => incoming,
        };
        // Over the limit the connection is closed at once: there is no frame
        // to answer yet, and a gateway retries on its next call.
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.refusals.refused(self.options.max_connections);
            drop(incoming);
            return;
        };
        let store = self.store.clone();
        let going_away = self.going_away.clone();
        let options = self.options.clone();
        let counted = metrics::track(Gauge::RpcServerConnections);
        tokio::spawn(async move {
            let peer = incoming.peer();
            if let Err(err) = incoming.serve(store, options, going_away).await {
                crate::logging::warning!("rpc connection closed"; peer = peer, err = err);
            }
            drop((slot, counted));
        });
    }
}

/// A connection to serve: from the network, or from this shard's own
/// gateway ([`super::local`]).
enum Incoming {
    Tcp(TcpStream, std::net::SocketAddr),
    Local(PipeStream),
}

impl Incoming {
    fn peer(&self) -> String {
        match self {
            Incoming::Tcp(_, peer) => peer.to_string(),
            Incoming::Local(_) => "this shard's gateway".into(),
        }
    }

    async fn serve(
        self,
        store: Arc<AnyStore>,
        options: RpcServerOptions,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        match self {
            // (With a secret, authenticate_then_serve takes TCP connections.)
            Incoming::Tcp(socket, _) => {
                let (reader, writer) = socket.into_split();
                connection(reader, writer, store, options, shutdown).await
            }
            Incoming::Local(stream) => {
                let (reader, writer) = stream.into_split();
                connection(reader, writer, store, options, shutdown).await
            }
        }
    }
}

/// Runs the handshake of a new connection within its pre-handshake slot
/// (given up if evicted or late), then serves it in a connection slot.
/// Refusals are logged through the collapse of [`crate::logging`]: a flood
/// of them writes a line a second per reason.
async fn authenticate_then_serve(
    (mut socket, peer, mut ticket, secret): (TcpStream, std::net::SocketAddr, Ticket, Arc<[u8]>),
    store: Arc<AnyStore>,
    options: RpcServerOptions,
    slots: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    let mut names: Vec<String> = options
        .advertise
        .iter()
        .map(|a| handshake::identity(a))
        .collect();
    if let Ok(local) = socket.local_addr() {
        names.push(handshake::identity(&local.to_string()));
    }
    let proven = tokio::select! {
        result = handshake::accept(&mut socket, &secret, &names, HANDSHAKE_TIMEOUT) => result,
        () = ticket.evicted() => Err(std::io::Error::other(
            "evicted: every pre-handshake slot was taken by newer connections",
        )),
    };
    drop(ticket);
    if let Err(err) = proven {
        crate::logging::warning!("rpc handshake refused: {err}"; peer = peer);
        return;
    }
    let Ok(slot) = slots.try_acquire_owned() else {
        crate::logging::warning!(
            "rpc connection limit ({}) reached: closed an authenticated connection",
            options.max_connections;
            peer = peer
        );
        return;
    };
    let counted = metrics::track(Gauge::RpcServerConnections);
    let (reader, writer) = socket.into_split();
    if let Err(err) = connection(reader, writer, store, options, shutdown).await {
        crate::logging::warning!("rpc connection closed"; peer = peer, err = err);
    }
    drop((slot, counted));
}

/// Logs refused connections at most once per interval, with a count, so a
/// flood cannot flood the log too.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn refused(&mut self, limit: usize) {
        self.unlogged += 1;
        if self
            .last
            .is_none_or(|last| last.elapsed() >= Self::INTERVAL)
        {
            crate::logging::warning!(
                "rpc connection limit ({limit}) reached: closed {} new connection(s)",
                self.unlogged
            );
            self.last = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}

/// Send and Pull calls served by this process, reported in Ping replies.
static SERVED: AtomicU64 = AtomicU64::new(0);

/// Counts a call on messages served (see [`SERVED`]) by the local lane.
pub(super) fn count_served() {
    SERVED.fetch_add(1, Ordering::Relaxed);
}

/// After GOAWAY the server keeps reading: calls the client wrote before it
/// read the GOAWAY are served, not dropped. Our gateway closes the
/// connection once its last call is answered; a client that does not is
/// left once the connection has been this long without a new frame and
/// with nothing in flight. Generous, because a loaded gateway may take a
/// while to read the GOAWAY.
const GOAWAY_QUIET: Duration = Duration::from_secs(1);

/// A decoded request, or why it cannot be served.
enum Request {
    Send(SendRequest),
    Pull(PullRequest),
    Edit(EditRequest),
    Delete(DeleteRequest),
    Changes(ChangesRequest),
    /// `store`: the caller asks whether the store answers too.
    Ping {
        store: bool,
    },
    Bad(String),
}

impl Request {
    /// Whether it is a pull that may wait for new messages.
    fn waits(&self) -> bool {
        matches!(self, Request::Pull(p) if p.wait_ms > 0)
    }

    /// Whether it is counted in [`SERVED`]: the calls on messages.
    fn counts_as_served(&self) -> bool {
        !matches!(self, Request::Ping { .. } | Request::Bad(_))
    }
}

/// What the server writes in one frame: the reply to a request, or GOAWAY.
/// (Not [`crate::resp::Reply`], Redis's reply.)
pub(super) enum ServerFrame {
    Send(SendResponse),
    Pull(PullResponse),
    Edit(EditResponse),
    Delete(DeleteResponse),
    Changes(ChangesResponse),
    /// An OK PullResponse, encoded by the store.
    PullPage(Vec<u8>),
    /// Why the store did not answer, when the ping asked it (else empty).
    Pong(String),
    BadFrame(String),
    /// Not a reply: see [`status::GOAWAY`].
    GoAway,
}

/// A reply on its way to the writer, holding its share of the output budget
/// until it has been written.
struct Outgoing {
    id: u64,
    reply: ServerFrame,
    budget: OwnedSemaphorePermit,
}

/// How much of a connection's capacity is in use: requests being served
/// (a count) and reply bytes (reserved, made or unsent).
struct Capacity {
    in_flight: Arc<Semaphore>,
    /// Pulls that may wait for new messages have slots of their own, as
    /// many: held ones never take the slots ordinary calls need (issue 20,
    /// item 2: waiting pulls took all of them and every other call failed).
    waiting: Arc<Semaphore>,
    max_in_flight: usize,
    output: Arc<Semaphore>,
    max_output: usize,
}

impl Capacity {
    fn new(options: &RpcServerOptions) -> Capacity {
        let max_in_flight = options.max_in_flight.max(1);
        // Reservations are taken in one `acquire_many(u32)`.
        let max_output = options.max_output.clamp(1, u32::MAX as usize);
        Capacity {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            waiting: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            output: Arc::new(Semaphore::new(max_output)),
            max_output,
        }
    }

    /// Whether a request is being served or a reply is not yet written.
    fn busy(&self) -> bool {
        self.in_flight.available_permits() < self.max_in_flight
            || self.waiting.available_permits() < self.max_in_flight
            || self.output.available_permits() < self.max_output
    }
}

/// The reader's side of a connection: its socket, input buffer and idle timer.
struct FrameReader<R> {
    reader: R,
    input: BytesMut,
    max_frame: usize,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    /// GOAWAY has been sent: the idle timer is [`GOAWAY_QUIET`] now.
    going_away: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next request frame, or `None` when the connection should close
    /// quietly: end of stream, the writer gave up on the peer, or the idle
    /// timeout passed with nothing in flight. On shutdown it sends GOAWAY
    /// and goes on reading, with the shorter idle timer [`GOAWAY_QUIET`].
    async fn next(
        &mut self,
        capacity: &Capacity,
        replies: &mpsc::UnboundedSender<Outgoing>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = frame::decode(&mut self.input, self.max_frame)? {
                return Ok(Some(frame));
            }
            crate::buf::reserve_for_read(&mut self.input, MIN_READ, READ_CHUNK);
            tokio::select! {
                read = self.reader.read_buf(&mut self.input) => if read? == 0 {
                    return Ok(None);
                },
                _ = shutdown.wait_for(|&stop| stop), if !self.going_away => {
                    if !self.go_away(capacity, replies) {
                        return Ok(None);
                    }
                }
                _ = replies.closed() => return Ok(None),
                _ = &mut self.idle => if !capacity.busy() {
                    return Ok(None);
                },
            }
            let idle = if self.going_away {
                GOAWAY_QUIET
            } else {
                self.idle_timeout
            };
            let deadline = Instant::now() + idle;
            self.idle.as_mut().reset(deadline);
        }
    }
}

impl<R> FrameReader<R> {
    /// Queues the GOAWAY frame; `false` if it cannot be (the peer is not
    /// reading its replies, or the writer is gone): then close at once.
    fn go_away(&mut self, capacity: &Capacity, replies: &mpsc::UnboundedSender<Outgoing>) -> bool {
        self.going_away = true;
        let Ok(budget) = capacity
            .output
            .clone()
            .try_acquire_many_owned(FRAME_HEADER as u32)
        else {
            return false;
        };
        let goaway = Outgoing {
            id: 0,
            reply: ServerFrame::GoAway,
            budget,
        };
        replies.send(goaway).is_ok()
    }
}

async fn connection<R, W>(
    reader: R,
    writer: W,
    store: Arc<AnyStore>,
    options: RpcServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Unbounded by count: what it holds is bounded in bytes by `capacity.output`.
    let (replies, outbox) = mpsc::unbounded_channel::<Outgoing>();
    let write_loop = tokio::spawn(write_replies(writer, outbox));
    let capacity = Capacity::new(&options);
    let mut waiting = WaitingPulls::default();
    let mut frames = FrameReader {
        reader,
        input: BytesMut::with_capacity(READ_CHUNK),
        max_frame: options.max_frame,
        idle_timeout: options.idle_timeout,
        idle: Box::pin(tokio::time::sleep(options.idle_timeout)),
        going_away: false,
    };
    let result = loop {
        let frame = match frames.next(&capacity, &replies, &mut shutdown).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        };
        let (id, method) = (frame.id, frame.method_or_status);
        if method == method::CANCEL {
            waiting.cancel(id);
            continue;
        }
        let request = decode_request(frame);
        let going_away = frames.going_away;
        let admitted = admit(
            &capacity,
            &replies,
            &mut shutdown,
            going_away,
            id,
            method,
            &request,
        );
        let reply_to = match admitted.await {
            Admitted::Serve(reply_to) => reply_to,
            Admitted::Refused => continue,
            Admitted::Close => break Ok(()),
        };
        // Only a pull that may wait watches for shutdown (answered at once then).
        let stop = request.waits().then(|| shutdown.clone());
        if let Some(task) = dispatch(&store, request, reply_to, stop) {
            waiting.add(id, task);
        }
    };
    // Wait for the requests in flight, then let the writer flush and finish.
    let all = capacity.max_in_flight as u32;
    let _ = capacity.in_flight.acquire_many(all).await;
    let _ = capacity.waiting.acquire_many(all).await;
    drop(replies);
    let _ = write_loop.await;
    result
}

/// What becomes of a request read: served, refused as overloaded (that
/// answer queued), or the connection closes.
enum Admitted {
    Serve(ReplyTo),
    Refused,
    Close,
}

/// Takes a place in flight and reserves the reply's bytes for `request`.
async fn admit(
    capacity: &Capacity,
    replies: &mpsc::UnboundedSender<Outgoing>,
    shutdown: &mut watch::Receiver<bool>,
    going_away: bool,
    id: u64,
    method: u8,
    request: &Request,
) -> Admitted {
    let waits = request.waits();
    // At the in-flight limit, refuse at once rather than stop reading:
    // waiting would hold every later frame behind the slowest request.
    let slots = match waits {
        true => &capacity.waiting,
        false => &capacity.in_flight,
    };
    let permit = slots.clone().try_acquire_owned().ok();
    // A pull that may wait reserves its reply's bytes only once it has
    // its page: reserving its largest page for the whole wait let ~100
    // waiting pulls fill a connection's budget and stop it being read.
    let reserve = match &permit {
        Some(_) if !waits => largest_reply(request),
        _ => SMALL_REPLY,
    }
    .min(capacity.max_output);
    // Over the output budget, stop reading instead: the peer is not
    // reading its replies, and every request read would add one more.
    let budget = tokio::select! {
        // Budget first: a frame read just as shutdown began is still
        // served (the GOAWAY follows from the next read).
        biased;
        budget = capacity.output.clone().acquire_many_owned(reserve as u32) => budget,
        _ = replies.closed() => return Admitted::Close,
        // (After GOAWAY, shutdown is already on: the quiet timer and the
        // drain timeout bound this wait instead.)
        _ = shutdown.wait_for(|&stop| stop), if !going_away => return Admitted::Close,
    };
    let Ok(budget) = budget else {
        return Admitted::Close;
    };
    let Some(permit) = permit else {
        let reply = overloaded(method);
        return match replies.send(Outgoing { id, reply, budget }) {
            Ok(()) => Admitted::Refused,
            Err(_) => Admitted::Close,
        };
    };
    Admitted::Serve(ReplyTo {
        id,
        replies: replies.clone(),
        output: capacity.output.clone(),
        max_output: capacity.max_output,
        budget,
        _permit: permit,
        _in_flight: metrics::track(Gauge::RpcServerInFlight),
        started: (metrics_method(request), Instant::now()),
    })
}

/// Serves an admitted request. An un-keyed send and a pull that does not
/// wait have no task of their own: the store answers through a callback
/// (the embedded store at once; Redis from the task reading its replies).
/// The rest get a task; `stop` (a pull that may wait: the shutdown signal)
/// makes it one a CANCEL can end, whose handle is returned.
fn dispatch(
    store: &Arc<AnyStore>,
    request: Request,
    reply_to: ReplyTo,
    stop: Option<watch::Receiver<bool>>,
) -> Option<tokio::task::AbortHandle> {
    if request.counts_as_served() {
        SERVED.fetch_add(1, Ordering::Relaxed);
    }
    let waits = stop.is_some();
    let request = match request {
        Request::Send(req) if req.idempotency_key.is_empty() => {
            start_send(store, req, move |reply| reply_to.send(reply));
            return None;
        }
        Request::Pull(req) if !waits => {
            start_pull(store, req, move |reply| reply_to.send(reply));
            return None;
        }
        request => request,
    };
    let store = store.clone();
    let task = tokio::spawn(async move {
        let handling = std::pin::pin!(handle(&store, request, stop));
        let reply = catch_panic(handling).await.unwrap_or_else(|| {
            ServerFrame::BadFrame("internal error while serving the request".into())
        });
        match waits {
            false => reply_to.send(reply),
            true => reply_to.send_when_room(reply).await,
        }
    });
    waits.then(|| task.abort_handle())
}

/// Where a request's reply goes, with what it holds until then: its place
/// among the connection's requests in flight and its reservation of the
/// connection's output budget.
struct ReplyTo {
    id: u64,
    replies: mpsc::UnboundedSender<Outgoing>,
    output: Arc<Semaphore>,
    max_output: usize,
    budget: OwnedSemaphorePermit,
    /// Held for their drop: the place in flight, and its gauge.
    _permit: OwnedSemaphorePermit,
    _in_flight: metrics::Tracked,
    started: (Option<RpcMethod>, Instant),
}

impl ReplyTo {
    /// Hands `reply` to the writer, its reservation trimmed to its size (or
    /// topped up, where the budget has room).
    fn send(self, reply: ServerFrame) {
        let needed = self.served(&reply);
        self.hand_on(reply, needed);
    }

    /// [`ReplyTo::send`] for a waiting pull, which reserved little: waits
    /// for room for its page like any request read while the peer is slow
    /// to read replies; gives up if the connection closes meanwhile.
    async fn send_when_room(mut self, reply: ServerFrame) {
        let needed = self.served(&reply);
        match grow_budget(self.budget, &self.output, needed, &self.replies).await {
            Some(budget) => self.budget = budget,
            None => return,
        }
        self.hand_on(reply, needed);
    }

    /// Counts the request as served; returns the bytes its reply needs
    /// (never more than the whole budget, or it would wait forever). The
    /// in-flight permit and gauge go when `self` does, once it is handed on.
    fn served(&self, reply: &ServerFrame) -> usize {
        if let (Some(method), at) = self.started {
            METRICS.rpc_served(method, at.elapsed());
        }
        encoded_len(reply).min(self.max_output)
    }

    fn hand_on(self, reply: ServerFrame, needed: usize) {
        let budget = fit_budget(self.budget, &self.output, needed);
        let _ = self.replies.send(Outgoing {
            id: self.id,
            reply,
            budget,
        });
    }
}

/// An un-keyed send, served without a task of its own: validated here, and
/// `answer`ed by whoever learns its outcome ([`AnyStore::start_send`]). A
/// keyed send takes the task path: the store may retry it, and waits.
/// (Also the local lane's way in: [`super::lane`].)
pub(super) fn start_send(
    store: &AnyStore,
    req: SendRequest,
    answer: impl FnOnce(ServerFrame) + Send + 'static,
) {
    let answer = move |outcome| answer(ServerFrame::Send(send_response(outcome)));
    match checked_send(req) {
        Ok((chat, sender, text, _)) => store.start_send(&chat, &sender, &text, answer),
        Err(invalid) => answer(Err(invalid)),
    }
}

/// A pull that does not wait, served without a task of its own
/// ([`AnyStore::start_pull`]).
pub(super) fn start_pull(
    store: &AnyStore,
    req: PullRequest,
    answer: impl FnOnce(ServerFrame) + Send + 'static,
) {
    let answer = move |page| answer(page_frame(page));
    match checked_pull(&req) {
        Ok((query, _)) => store.start_pull(query, answer),
        Err(invalid) => answer(Err(invalid)),
    }
}

/// The pulls of one connection that may be waiting for messages, by call
/// id, so that a CANCEL can end one: a client that gave up (its own client
/// closed) frees the waiter at once instead of at the end of its `wait_ms`.
/// Owned by the connection's reader; finished ones are purged as it grows.
#[derive(Default)]
struct WaitingPulls {
    tasks: std::collections::HashMap<u64, tokio::task::AbortHandle>,
    /// Purge finished tasks when `tasks` reaches this size.
    purge_at: usize,
}

impl WaitingPulls {
    fn add(&mut self, id: u64, task: tokio::task::AbortHandle) {
        if self.tasks.len() >= self.purge_at {
            self.tasks.retain(|_, task| !task.is_finished());
            // Amortized: at most one sweep per as many insertions as are left.
            self.purge_at = (self.tasks.len() * 2).max(64);
        }
        self.tasks.insert(id, task);
    }

    fn cancel(&mut self, id: u64) {
        if let Some(task) = self.tasks.remove(&id) {
            task.abort();
        }
    }
}

/// Writes everything finished since the last write in one write; a peer
/// that accepts no byte for [`WRITE_STALL_TIMEOUT`] is given up on.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    // The budget of what `output` holds, released once it is written. Each
    // reply is dropped as soon as it is encoded, so `output` is its only copy.
    let mut held = Vec::new();
    while let Some(first) = outbox.recv().await {
        held.push(encode_reply(&mut output, first));
        while output.len() < MAX_BATCH {
            let Ok(next) = outbox.try_recv() else { break };
            held.push(encode_reply(&mut output, next));
        }
        let mut unsent = &output[..];
        while !unsent.is_empty() {
            match tokio::time::timeout(WRITE_STALL_TIMEOUT, writer.write(unsent)).await {
                Ok(Ok(n)) if n > 0 => unsent = &unsent[n..],
                _ => return,
            }
        }
        held.clear();
        output.clear();
        // One big page must not pin its buffer for the life of the connection.
        if output.capacity() > KEEP_OUTPUT_CAPACITY {
            output = BytesMut::with_capacity(READ_CHUNK);
        }
    }
}

/// A peer that accepts no reply byte for this long is gone or hostile: the
/// gateway reads whenever its socket is readable. Closing it frees the
/// connection's output budget and slot.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The writer stops taking replies into one write at this size: small
/// replies are still batched, and big ones wait as they are instead of being
/// copied into an ever-doubling buffer (which counted twice against memory).
const MAX_BATCH: usize = 256 * 1024;

/// The writer's buffer is kept up to this size between writes.
const KEEP_OUTPUT_CAPACITY: usize = 1024 * 1024;

/// Frame header: length, id, method or status.
const FRAME_HEADER: usize = 4 + 9;

/// Budget for a reply that echoes nothing of its request: a send's answer,
/// `Overloaded`, a bad-frame reason (their texts are under 200 bytes).
const SMALL_REPLY: usize = 1024;

/// The most bytes the reply to `request` can take, known before it is served.
/// A validation error may quote the request, hence its length for sends.
fn largest_reply(request: &Request) -> usize {
    match request {
        Request::Pull(req) => largest_page(req),
        Request::Send(req) => SMALL_REPLY + req.encoded_len(),
        Request::Edit(req) => SMALL_REPLY + req.encoded_len(),
        Request::Delete(req) => SMALL_REPLY + req.encoded_len(),
        // Each change at most one message.
        Request::Changes(req) => {
            SMALL_REPLY + req.chat.len() + MAX_CHANGES * (MAX_MESSAGE_WIRE_BYTES + 32)
        }
        Request::Ping { .. } => SMALL_REPLY,
        Request::Bad(why) => SMALL_REPLY + why.len(),
    }
}

/// The largest reply to a pull: a full page of the largest messages (with
/// the changes it carries, which are cut to stay within it).
fn largest_page(req: &PullRequest) -> usize {
    let limit = match req.limit {
        0 => DEFAULT_LIMIT,
        n => n.clamp(1, MAX_LIMIT),
    } as usize;
    SMALL_REPLY + req.chat.len() + limit * MAX_MESSAGE_WIRE_BYTES
}

/// Trims a reservation to the reply's real size, or tops it up if the reply
/// is larger than foreseen (without waiting: the reply exists already).
fn fit_budget(
    mut bytes: OwnedSemaphorePermit,
    budget: &Arc<Semaphore>,
    needed: usize,
) -> OwnedSemaphorePermit {
    let held = bytes.num_permits();
    if needed < held {
        drop(bytes.split(held - needed));
    } else if needed > held {
        let extra = u32::try_from(needed - held).unwrap_or(u32::MAX);
        if let Ok(extra) = budget.clone().try_acquire_many_owned(extra) {
            bytes.merge(extra);
        }
    }
    bytes
}

/// Grows a waiting pull's small reservation to its reply's size, waiting
/// for room like any request read while the peer is slow to read replies;
/// `None` if the connection closes meanwhile.
async fn grow_budget(
    mut bytes: OwnedSemaphorePermit,
    budget: &Arc<Semaphore>,
    needed: usize,
    replies: &mpsc::UnboundedSender<Outgoing>,
) -> Option<OwnedSemaphorePermit> {
    let held = bytes.num_permits();
    if needed <= held {
        return Some(bytes);
    }
    let extra = u32::try_from(needed - held).unwrap_or(u32::MAX);
    tokio::select! {
        extra = budget.clone().acquire_many_owned(extra) => bytes.merge(extra.ok()?),
        _ = replies.closed() => return None,
    }
    Some(bytes)
}

fn encoded_len(reply: &ServerFrame) -> usize {
    FRAME_HEADER
        + match reply {
            ServerFrame::Send(resp) => resp.encoded_len(),
            ServerFrame::Pull(resp) => resp.encoded_len(),
            ServerFrame::Edit(resp) => resp.encoded_len(),
            ServerFrame::Delete(resp) => resp.encoded_len(),
            ServerFrame::Changes(resp) => resp.encoded_len(),
            ServerFrame::PullPage(wire) => wire.len(),
            ServerFrame::BadFrame(why) => why.len(),
            ServerFrame::Pong(store_error) => PingResponse {
                served: u64::MAX,
                store_error: store_error.clone(),
            }
            .encoded_len(),
            ServerFrame::GoAway => 0,
        }
}

/// Appends the reply's frame and returns its budget, now held by `output`.
fn encode_reply(output: &mut BytesMut, outgoing: Outgoing) -> OwnedSemaphorePermit {
    let Outgoing { id, reply, budget } = outgoing;
    match reply {
        ServerFrame::Send(resp) => frame::encode(output, id, status::OK, &resp),
        ServerFrame::Pull(resp) => frame::encode(output, id, status::OK, &resp),
        ServerFrame::Edit(resp) => frame::encode(output, id, status::OK, &resp),
        ServerFrame::Delete(resp) => frame::encode(output, id, status::OK, &resp),
        ServerFrame::Changes(resp) => frame::encode(output, id, status::OK, &resp),
        ServerFrame::PullPage(wire) => frame::encode_raw(output, id, status::OK, &wire),
        ServerFrame::Pong(store_error) => {
            let served = SERVED.load(Ordering::Relaxed);
            let pong = PingResponse {
                served,
                store_error,
            };
            frame::encode(output, id, status::OK, &pong);
        }
        ServerFrame::BadFrame(why) => {
            frame::encode_raw(output, id, status::BAD_FRAME, why.as_bytes())
        }
        ServerFrame::GoAway => frame::encode_raw(output, 0, status::GOAWAY, b""),
    }
    budget
}

/// The frame `reply` would be written as, for a caller in this process
/// (the local lane): the same status and body, no header, no copy of a
/// page. [`encode_reply`] writes the others straight into the output.
pub(super) fn reply_frame(reply: ServerFrame) -> Frame {
    let ok = |body: Vec<u8>| (status::OK, Bytes::from(body));
    let (status, body) = match reply {
        ServerFrame::Send(resp) => ok(resp.encode_to_vec()),
        ServerFrame::Pull(resp) => ok(resp.encode_to_vec()),
        ServerFrame::Edit(resp) => ok(resp.encode_to_vec()),
        ServerFrame::Delete(resp) => ok(resp.encode_to_vec()),
        ServerFrame::Changes(resp) => ok(resp.encode_to_vec()),
        ServerFrame::PullPage(wire) => ok(wire),
        ServerFrame::Pong(store_error) => ok(PingResponse {
            served: SERVED.load(Ordering::Relaxed),
            store_error,
        }
        .encode_to_vec()),
        ServerFrame::BadFrame(why) => (status::BAD_FRAME, Bytes::from(why.into_bytes())),
        ServerFrame::GoAway => (status::GOAWAY, Bytes::new()),
    };
    Frame {
        id: 0,
        method_or_status: status,
        body,
    }
}

/// The method a request is counted under in the metrics (not bad frames).
fn metrics_method(request: &Request) -> Option<RpcMethod> {
    match request {
        Request::Send(_) => Some(RpcMethod::Send),
        Request::Pull(_) => Some(RpcMethod::Pull),
        Request::Edit(_) => Some(RpcMethod::Edit),
        Request::Delete(_) => Some(RpcMethod::Delete),
        Request::Changes(_) => Some(RpcMethod::Changes),
        Request::Ping { .. } => Some(RpcMethod::Ping),
        Request::Bad(_) => None,
    }
}

/// The reply to a request refused because too many are in flight.
pub(super) fn overloaded(method: u8) -> ServerFrame {
    let msg = "too many requests in flight; retry later".to_string();
    let code = Error::Overloaded.code();
    match method {
        method::SEND => ServerFrame::Send(SendResponse {
            code,
            msg,
            ..SendResponse::default()
        }),
        method::PULL => ServerFrame::Pull(PullResponse {
            code,
            msg,
            ..PullResponse::default()
        }),
        method::EDIT => ServerFrame::Edit(EditResponse {
            code,
            msg,
            ..EditResponse::default()
        }),
        method::DELETE => ServerFrame::Delete(DeleteResponse {
            code,
            msg,
            ..DeleteResponse::default()
        }),
        method::CHANGES => ServerFrame::Changes(ChangesResponse {
            code,
            msg,
            ..ChangesResponse::default()
        }),
        method::PING => ServerFrame::Pong(String::new()),
        other => ServerFrame::BadFrame(format!("unknown method {other}")),
    }
}

fn decode_request(frame: Frame) -> Request {
    match frame.method_or_status {
        method::SEND => match SendRequest::decode(frame.body) {
            Ok(req) => Request::Send(req),
            Err(err) => Request::Bad(format!("undecodable SendRequest: {err}")),
        },
        method::PULL => match PullRequest::decode(frame.body) {
            Ok(req) => Request::Pull(req),
            Err(err) => Request::Bad(format!("undecodable PullRequest: {err}")),
        },
        method::EDIT => match EditRequest::decode(frame.body) {
            Ok(req) => Request::Edit(req),
            Err(err) => Request::Bad(format!("undecodable EditRequest: {err}")),
        },
        method::DELETE => match DeleteRequest::decode(frame.body) {
            Ok(req) => Request::Delete(req),
            Err(err) => Request::Bad(format!("undecodable DeleteRequest: {err}")),
        },
        method::CHANGES => match ChangesRequest::decode(frame.body) {
            Ok(req) => Request::Changes(req),
            Err(err) => Request::Bad(format!("undecodable ChangesRequest: {err}")),
        },
        method::PING => match PingRequest::decode(frame.body) {
            Ok(req) => Request::Ping { store: req.store },
            Err(err) => Request::Bad(format!("undecodable PingRequest: {err}")),
        },
        other => Request::Bad(format!("unknown method {other}")),
    }
}

async fn handle(
    store: &AnyStore,
    request: Request,
    stop: Option<watch::Receiver<bool>>,
) -> ServerFrame {
    match request {
        Request::Send(req) => ServerFrame::Send(send(store, req).await),
        Request::Edit(req) => ServerFrame::Edit(edit(store, req).await),
        Request::Delete(req) => ServerFrame::Delete(delete(store, req).await),
        Request::Changes(req) => ServerFrame::Changes(changes(store, req).await),
        Request::Pull(req) => pull(store, req, stop).await,
        Request::Ping { store: false } => ServerFrame::Pong(String::new()),
        Request::Ping { store: true } => {
            ServerFrame::Pong(store.ping().await.err().unwrap_or_default())
        }
        Request::Bad(why) => ServerFrame::BadFrame(why),
    }
}

/// The response code and message for a failed request.
fn failure(err: Error) -> (i32, String) {
    let code = err.code();
    let msg = match err {
        Error::Invalid(why) => why,
        Error::Unavailable | Error::Lost | Error::Timeout => "the store is unavailable".into(),
        Error::Overloaded => "the store is overloaded".into(),
        Error::StorageFull => {
            crate::metrics::METRICS.store_full();
            crate::logging::error!("the store is full: sends refused until memory is freed");
            "the store is full".into()
        }
        Error::IdempotencyKeyReused => {
            "this idempotency key was already used in this chat for a different message".into()
        }
        Error::MessageNotFound => "no such message".into(),
        Error::Forbidden => "not allowed to change this message".into(),
        Error::Internal(why) => {
            crate::logging::error!("store error"; why = why);
            "internal store error".into()
        }
    };
    (code, msg)
}

async fn send(store: &AnyStore, req: SendRequest) -> SendResponse {
    send_response(match checked_send(req) {
        Ok((chat, sender, text, key)) => {
            // Empty (the proto3 default) = no key.
            let key = Some(key.as_str()).filter(|k| !k.is_empty());
            store.send(&chat, &sender, &text, key).await
        }
        Err(invalid) => Err(invalid),
    })
}

/// A send's chat (canonical), sender, text and idempotency key, once valid.
fn checked_send(req: SendRequest) -> Result<(String, String, String, String), Error> {
    let Some(Message {
        chat, text, sender, ..
    }) = req.message
    else {
        return Err(Error::Invalid("`message` is required".into()));
    };
    validate_send(&chat, &sender, &text)?;
    let key = req.idempotency_key;
    if !key.is_empty() {
        validate_idempotency_key(&key)?;
    }
    // (Moved, not copied, when already canonical.)
    let chat = match canonical_chat(&chat) {
        Cow::Owned(canonical) => Some(canonical),
        Cow::Borrowed(_) => None,
    }
    .unwrap_or(chat);
    if !key.is_empty() && !chat_keeps_records(&chat) {
        return Err(Error::Invalid(
            "idempotency keys cannot be used in a chat whose name starts with `}`".into(),
        ));
    }
    Ok((chat, sender, text, key))
}

fn send_response(outcome: Result<Sent, Error>) -> SendResponse {
    match outcome {
        Ok(sent) => SendResponse {
            code: CODE_OK,
            msg: String::new(),
            send_time: sent.send_time,
            replayed: sent.replayed,
        },
        Err(err) => {
            let (code, msg) = failure(err);
            SendResponse {
                code,
                msg,
                ..SendResponse::default()
            }
        }
    }
}

/// The actor of an edit or delete: empty = authentication is off.
fn actor(actor: &str) -> Option<&str> {
    Some(actor).filter(|a| !a.is_empty())
}

async fn edit(store: &AnyStore, req: EditRequest) -> EditResponse {
    let outcome = match validate_change(&req.chat, req.send_time, Some(&req.text)) {
        Ok(()) => {
            let chat = canonical_chat(&req.chat);
            store
                .edit(&chat, req.send_time, &req.text, actor(&req.actor))
                .await
        }
        Err(invalid) => Err(invalid.into()),
    };
    match outcome {
        Ok(edited_at) => EditResponse {
            send_time: req.send_time,
            edited_at,
            ..EditResponse::default()
        },
        Err(err) => {
            let (code, msg) = failure(err);
            EditResponse {
                code,
                msg,
                ..EditResponse::default()
            }
        }
    }
}

async fn delete(store: &AnyStore, req: DeleteRequest) -> DeleteResponse {
    let outcome = match validate_change(&req.chat, req.send_time, None) {
        Ok(()) => {
            let chat = canonical_chat(&req.chat);
            let actor = actor(&req.actor);
            store.delete(&chat, req.send_time, actor, req.admin).await
        }
        Err(invalid) => Err(invalid.into()),
    };
    match outcome {
        Ok(()) => DeleteResponse {
            send_time: req.send_time,
            ..DeleteResponse::default()
        },
        Err(err) => {
            let (code, msg) = failure(err);
            DeleteResponse {
                code,
                msg,
                ..DeleteResponse::default()
            }
        }
    }
}

async fn changes(store: &AnyStore, req: ChangesRequest) -> ChangesResponse {
    let limit = match req.limit {
        n if n <= 0 => MAX_CHANGES,
        n => (n as usize).min(MAX_CHANGES),
    };
    // (A pull's checks: the chat's name, and `after` like a cursor.)
    let outcome = match validate_pull(&req.chat, req.after, 0, false) {
        // Its changes cannot be logged (see `validate_change`): none.
        Ok(query) if !chat_keeps_records(&query.chat) => Ok(ChangesResponse {
            next: req.after,
            ..ChangesResponse::default()
        }),
        Ok(query) => store.changes(&query.chat, req.after, limit).await,
        Err(invalid) => Err(invalid.into()),
    };
    outcome.unwrap_or_else(|err| {
        let (code, msg) = failure(err);
        ChangesResponse {
            code,
            msg,
            ..ChangesResponse::default()
        }
    })
}

/// A pull's query and how long it may wait, once valid.
fn checked_pull(req: &PullRequest) -> Result<(PullQuery, Duration), Error> {
    let query = validate_pull(&req.chat, req.cursor, req.limit, req.reverse)?;
    let wait = validate_wait(req.wait_ms)?;
    Ok((query, wait))
}

fn page_frame(page: Result<Page, Error>) -> ServerFrame {
    match page {
        Ok(page) => ServerFrame::PullPage(page.wire),
        Err(err) => pull_failed(err),
    }
}

fn pull_failed(err: Error) -> ServerFrame {
    let (code, msg) = failure(err);
    ServerFrame::Pull(PullResponse {
        code,
        msg,
        ..PullResponse::default()
    })
}

async fn pull(
    store: &AnyStore,
    req: PullRequest,
    stop: Option<watch::Receiver<bool>>,
) -> ServerFrame {
    let (query, wait) = match checked_pull(&req) {
        Ok(checked) => checked,
        Err(invalid) => return pull_failed(invalid),
    };
    let waits = !wait.is_zero() && query.may_wait();
    // A waiting pull woken by a change read the log to know it: as much of
    // it as the answer carries, so that it is read once, not twice.
    let check = match req.with_changes {
        true => MAX_CHANGES,
        false => 1,
    };
    let (page, read) = match waits {
        false => (store.pull(&query).await, None),
        true => match pull_waiting(store, &query, wait, stop, (req.changes_after, check)).await {
            Ok((page, read)) => (Ok(page), read),
            Err(err) => (Err(err), None),
        },
    };
    match page {
        Ok(mut page) if waits && req.with_changes => {
            let room = largest_page(&req).saturating_sub(page.wire.len());
            if let Some(changes) =
                changes_for_page(store, &query.chat, req.changes_after, room, read).await
            {
                let changes = changes.encode_to_vec();
                let field = crate::proto::fields::pull_response::CHANGES;
                crate::wire::put_bytes_field(&mut page.wire, field, &changes);
            }
            page_frame(Ok(page))
        }
        page => page_frame(page),
    }
}

/// The changes a waiting pull that asked for them carries
/// (`PullResponse.changes`), read after its page: what a Changes call would
/// answer, cut short to fit in `room` bytes. One RPC call per round of a
/// follower instead of two (ws_load fanout on Redis, 100k deliveries/s:
/// 135,000 Changes calls in 8 s -> 1,000, the first batches'; p99 18-23 ->
/// 16 ms). `read`: the changes the wait already read (see `pull`), else
/// they are read here. `None` if the read failed: the follower makes the
/// Changes call, which reports the error.
async fn changes_for_page(
    store: &AnyStore,
    chat: &str,
    after: i64,
    room: usize,
    read: Option<ChangesResponse>,
) -> Option<ChangesResponse> {
    if !chat_keeps_records(chat) {
        return Some(ChangesResponse {
            next: after,
            ..ChangesResponse::default()
        });
    }
    let mut changes = match read {
        Some(read) => read,
        None => store.changes(chat, after, MAX_CHANGES).await.ok()?,
    };
    let mut used = 0;
    let fits = changes
        .changes
        .iter()
        .take_while(|change| {
            // Each within the embedded message and the list: tag and length.
            used += change.encoded_len() + 2 * MAX_VARINT_BYTES;
            used <= room.saturating_sub(SMALL_REPLY)
        })
        .count();
    if fits < changes.changes.len() {
        changes.changes.truncate(fits);
        changes.has_more = true;
        changes.next = changes.changes.last().map_or(after, |c| c.seq);
    }
    Some(changes)
}

/// A length or tag, as a varint, at its longest.
const MAX_VARINT_BYTES: usize = 10;

/// How long a waiting pull waits for its registration to be confirmed
/// (Redis: the SSUBSCRIBE's reply) before it gives up waiting and answers
/// what it reads.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A pull that may wait (see [`crate::notify`]): registered before it reads,
/// so a message stored between the read and the wait still wakes it; an
/// empty page is read again when a message was stored in the chat (and
/// answered if it holds one, or the chat's changes moved, or the
/// registration broke), at the deadline, or at shutdown (answered at once
/// with what there is). `changes`: the follower's change cursor (0: not
/// asked) and how many changes to read when checking it; the changes that
/// ended the wait come back with the page.
async fn pull_waiting(
    store: &AnyStore,
    query: &PullQuery,
    wait: Duration,
    stop: Option<watch::Receiver<bool>>,
    changes: (i64, usize),
) -> Result<(Page, Option<ChangesResponse>), Error> {
    let deadline = Instant::now() + wait;
    let mut waiter = store.waiter(&query.chat);
    if let Some(w) = &mut waiter
        && !w.ready(deadline.min(Instant::now() + READY_TIMEOUT)).await
    {
        waiter = None;
    }
    let page = store.pull(query).await?;
    let Some(mut waiter) = waiter.filter(|_| page.count == 0) else {
        return Ok((page, None));
    };
    if let Some(moved) = changed_since(store, &query.chat, changes).await? {
        return Ok((page, Some(moved)));
    }
    let _waiting = metrics::track(Gauge::WaitingPulls);
    let mut stop = stop;
    loop {
        let stopped = async {
            match &mut stop {
                Some(stop) => drop(stop.wait_for(|&s| s).await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = waiter.changed(deadline) => {}
            () = stopped => return Ok((store.pull(query).await?, None)),
        }
        let page = store.pull(query).await?;
        // A wake-up that found nothing — the late announcement of a message
        // an earlier read already had, which happens more the busier a
        // room is — waits on while the registration holds. Answered empty,
        // the follower paused 100 ms (`gateway::stream`'s early-empty pause)
        // and the messages of that pause were late by as much.
        if page.count > 0 || Instant::now() >= deadline || !waiter.is_ready() {
            return Ok((page, None));
        }
        if let Some(moved) = changed_since(store, &query.chat, changes).await? {
            return Ok((page, Some(moved)));
        }
    }
}

/// `chat`'s changes past `after` (a follower's change cursor; 0: not
/// asked), up to `limit`, if its change log moved: then its pull answers
/// rather than waits.
async fn changed_since(
    store: &AnyStore,
    chat: &str,
    (after, limit): (i64, usize),
) -> Result<Option<ChangesResponse>, Error> {
    if after <= 0 || !chat_keeps_records(chat) {
        return Ok(None);
    }
    let changes = store.changes(chat, after, limit).await?;
    Ok((!changes.changes.is_empty() || changes.reset).then_some(changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{MAX_NAME_BYTES, MAX_TEXT_BYTES};

    /// A page of `n` messages with every field at its limit.
    fn full_page(n: usize) -> PullResponse {
        let message = Message {
            chat: "c".repeat(MAX_NAME_BYTES),
            text: "t".repeat(MAX_TEXT_BYTES),
            sender: "s".repeat(MAX_NAME_BYTES),
            send_time: i64::MAX,
            edited_at: i64::MAX,
        };
        PullResponse {
            code: 0,
            msg: String::new(),
            messages: vec![message; n],
            has_more: true,
            next_cursor: i64::MAX,
            changes: None,
        }
    }

    fn pull(limit: i32) -> Request {
        Request::Pull(PullRequest {
            chat: "c".repeat(MAX_NAME_BYTES),
            limit,
            ..PullRequest::default()
        })
    }

    /// An embedded store, and the same as the RPC server holds it.
    fn memory_store() -> (Arc<crate::store::memory::MemoryStore>, AnyStore) {
        let memory = Arc::new(crate::store::memory::MemoryStore::new(Duration::from_secs(
            60,
        )));
        (memory.clone(), AnyStore::Memory(memory))
    }

    #[tokio::test]
    async fn the_changes_a_page_carries_are_cut_to_its_room() {
        let (memory, store) = memory_store();
        let sent = memory
            .send_now("c", "a", "m", None)
            .expect("stored")
            .send_time;
        for i in 0..5 {
            store
                .edit("c", sent, &format!("edit {i}"), None)
                .await
                .expect("edited");
        }
        let all = changes_for_page(&store, "c", sent, usize::MAX, None)
            .await
            .expect("read");
        assert_eq!((all.changes.len(), all.has_more), (5, false));
        // Room for two (and a bit): the first two, and more to read from
        // the second's seq.
        let two: usize = all.changes[..2].iter().map(|c| c.encoded_len() + 20).sum();
        let cut = changes_for_page(&store, "c", sent, SMALL_REPLY + two + 5, None)
            .await
            .expect("read");
        assert_eq!(cut.changes, all.changes[..2]);
        assert!(cut.has_more);
        assert_eq!(cut.next, all.changes[1].seq);
        // No room: none, and the next read starts where this one did.
        let none = changes_for_page(&store, "c", sent, 0, None)
            .await
            .expect("read");
        assert_eq!(
            (none.changes.len(), none.has_more, none.next),
            (0, true, sent)
        );
        // Changes a waiting pull already read are carried as they are (cut
        // the same way), not read again: the last three only, as if read
        // before the first two were made.
        let earlier = ChangesResponse {
            changes: all.changes[2..].to_vec(),
            next: all.next,
            ..ChangesResponse::default()
        };
        let carried = changes_for_page(&store, "c", sent, usize::MAX, Some(earlier.clone()))
            .await
            .expect("carried");
        assert_eq!(carried, earlier);
    }

    #[tokio::test]
    async fn a_waiting_pull_woken_for_nothing_waits_on_for_the_next_message() {
        let (memory, store) = memory_store();
        let query = validate_pull("c", 0, 10, true).expect("valid");
        let started = Instant::now();
        let waiting = pull_waiting(&store, &query, Duration::from_secs(5), None, (0, 1));
        let sending = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            memory.announce("c");
            tokio::time::sleep(Duration::from_millis(100)).await;
            memory.send_now("c", "a", "late", None).expect("stored");
        };
        let (page, ()) = tokio::join!(waiting, sending);
        let (page, moved) = page.expect("a page");
        assert_eq!(page.count, 1, "answered with the message, not empty");
        assert!(moved.is_none(), "no change cursor, no changes read");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    /// A follower's waiting pull woken by an edit answers with the changes
    /// its check read, for the answer to carry (not read a second time).
    #[tokio::test]
    async fn a_waiting_pull_woken_by_an_edit_answers_with_the_changes_it_read() {
        let (memory, store) = memory_store();
        let sent = memory
            .send_now("c", "a", "m", None)
            .expect("stored")
            .send_time;
        let query = validate_pull("c", sent, 10, true).expect("valid");
        let waiting = pull_waiting(
            &store,
            &query,
            Duration::from_secs(5),
            None,
            (sent, MAX_CHANGES),
        );
        let editing = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store.edit("c", sent, "edited", None).await.expect("edited");
        };
        let (page, ()) = tokio::join!(waiting, editing);
        let (page, moved) = page.expect("a page");
        assert_eq!(page.count, 0, "no new message");
        let moved = moved.expect("the changes that ended the wait");
        let texts: Vec<&str> = moved
            .changes
            .iter()
            .filter_map(|c| c.edited.as_ref().map(|m| m.text.as_str()))
            .collect();
        assert_eq!(texts, ["edited"]);
    }

    #[test]
    fn the_reservation_for_a_pull_covers_its_largest_page() {
        for (limit, page) in [(0, 10), (1, 1), (10, 10), (100, 100), (1000, 100)] {
            let largest = encoded_len(&ServerFrame::Pull(full_page(page)));
            let reserved = largest_reply(&pull(limit));
            assert!(
                largest <= reserved,
                "limit {limit}: page of {largest} bytes, {reserved} reserved"
            );
            // And not wildly more: the budget is what bounds concurrency.
            assert!(
                reserved < largest + largest / 10 + SMALL_REPLY,
                "limit {limit}"
            );
        }
    }

    #[test]
    fn a_budget_is_trimmed_to_the_reply_or_topped_up_when_possible() {
        let output = Arc::new(Semaphore::new(1000));
        let held = output.clone().try_acquire_many_owned(600).expect("free");
        let held = fit_budget(held, &output, 100);
        assert_eq!((held.num_permits(), output.available_permits()), (100, 900));
        let held = fit_budget(held, &output, 300);
        assert_eq!((held.num_permits(), output.available_permits()), (300, 700));
        // More than is free: kept as it is rather than waiting.
        let other = output.clone().try_acquire_many_owned(700).expect("free");
        let held = fit_budget(held, &output, 500);
        assert_eq!(held.num_permits(), 300);
        drop((held, other));
        assert_eq!(output.available_permits(), 1000);
    }
}
