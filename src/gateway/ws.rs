//! `GET /api/ws`: the API over one WebSocket connection (docs/api.md,
//! "WebSocket"). Each text frame is one JSON request with a client-chosen
//! `id`, answered by a reply with the same `id`; requests run at once and
//! side by side, so replies come in the order they are ready.
//!
//! * `send` and `pull` are the RPCs of `POST /api/send` and `GET /api/pull`,
//!   checked the same way (authentication, rooms, `sender`, rate limits),
//!   their failures the same codes ([`super::error`]).
//! * `subscribe` follows a chat as `/api/stream` does: the same loop of
//!   pulls and change reads ([`super::stream::next_page`]), so its events
//!   are exact and the same as the stream's (history after the cursor
//!   oldest first, then each new message once, edits, deletes and resets in
//!   order with them, each with the stream's id `<send_time>.<seq>`; a
//!   subscribe with `cursor` and `changes_after` resumes after such an id).
//!   Each subscription holds at most one batch until it is written, and the connection's
//!   output is bounded as an event stream's is: a subscriber whose output
//!   is not written within the write timeout gets `{"event":"lagged"}` and
//!   close 1008.
//! * `auth` authenticates a connection whose upgrade carried no token (a
//!   browser cannot set headers on a WebSocket); it is closed (1008) when
//!   the token expires.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::access::{self, Access, Api};
use super::error::ApiError;
use super::stream::{EventKind, SharedFrames};
use super::{Gateway, PendingReply, decode_reply, json, stream};
use crate::auth::Claims;
use crate::budget::Account;
use crate::error::CODE_OK;
use crate::http::Request;
use crate::http::response::{Response, Upgrade};
use crate::proto::{Message, PullRequest, SendRequest, SendResponse};
use crate::rpc::balanced::BalancedClient;
use crate::rpc::client::Budgeted;
use crate::rpc::client::RpcRequest;
use crate::wire::next_field;
use crate::ws::driver::{self, Session};
use crate::ws::frame::{close_code, opcode, put_frame};

/// The WebSocket options (`--ws-*`, and the HTTP output limits they share);
/// mapped from the config, with their `Default`, in `config/components.rs`.
#[derive(Debug, Clone, Copy)]
pub struct WsOptions {
    pub max_subscriptions: usize,
    /// How long a connection may wait for its `auth` (`--request-timeout-s`,
    /// as a request must arrive whole within it).
    pub auth_timeout: std::time::Duration,
    pub driver: driver::Options,
}

/// Requests of one connection in flight at once; past it the connection
/// is not read until replies go out.
const MAX_IN_FLIGHT: usize = 64;

impl Gateway {
    /// Checks the handshake and the token it carries, if any (a bad one is
    /// a 401 as over HTTP; none leaves the `auth` op to come).
    pub(super) fn start_ws(
        &self,
        req: &Request,
        account: &Account,
    ) -> Result<PendingReply, ApiError> {
        let accept =
            crate::ws::handshake::accept(req).map_err(|why| ApiError::Invalid(why.into()))?;
        let mut auth = AuthState::Open;
        if let Some(checker) = &self.access.auth {
            auth = match req.header_values("authorization").next() {
                None => AuthState::Awaiting(tokio::time::Instant::now() + self.ws.auth_timeout),
                header => {
                    let now = crate::now_micros() / 1_000_000;
                    let (claims, until) = checker
                        .authenticate_until(header, now)
                        .map_err(access::denied)?;
                    AuthState::User(Arc::new(claims), expiry(until))
                }
            };
        }
        let client = self.access.client_ip(req);
        // Pages are charged like HTTP pulls: to the token's subject given
        // with the upgrade, else to the client's address.
        let user = match &auth {
            AuthState::User(claims, _) => Some(claims.as_ref()),
            _ => None,
        };
        let account = super::charged_to(account, user, client);
        let upgrade = WsUpgrade {
            accept,
            session: WsSession::new(self, auth, client, account),
            options: self.ws,
        };
        Ok(PendingReply::Ready(Response::switching(Box::new(upgrade))))
    }
}

/// When a token whose `exp` is `until` (Unix seconds) runs out, on the
/// runtime's clock; `None` if never.
fn expiry(until: f64) -> Option<tokio::time::Instant> {
    if !until.is_finite() {
        return None;
    }
    let left = until - crate::now_micros() as f64 / 1e6;
    let left = std::time::Duration::from_secs_f64(left.clamp(0.0, 1e9));
    Some(tokio::time::Instant::now() + left)
}

struct WsUpgrade {
    accept: String,
    session: WsSession,
    options: WsOptions,
}

impl Upgrade for WsUpgrade {
    fn put_head(&self, out: &mut BytesMut) {
        out.extend_from_slice(
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
        );
        out.extend_from_slice(self.accept.as_bytes());
    }

    fn run(
        self: Box<Self>,
        socket: tokio::net::TcpStream,
        input: BytesMut,
        shutdown: watch::Receiver<bool>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let WsUpgrade {
            session, options, ..
        } = *self;
        Box::pin(driver::run(
            socket,
            input,
            session,
            options.driver,
            shutdown,
        ))
    }
}

/// Who the connection speaks for.
enum AuthState {
    /// Authentication is off.
    Open,
    /// On, and no token yet: only `auth` is served, until this time.
    Awaiting(tokio::time::Instant),
    /// This user, until this time (the token's `exp`).
    /// (Shared, not copied, with each op that acts as the user.)
    User(Arc<Claims>, Option<tokio::time::Instant>),
}

/// What the connection's tasks hand back.
pub(super) enum Event {
    /// A reply to a request (see [`AwaitedReply`]), and the reply bytes its
    /// request had reserved.
    Reply(Vec<u8>, usize),
    /// A reply made without a task (a refusal, `unsubscribe`, `auth`).
    Answer(Vec<u8>),
    /// A subscription's batch (a `StreamBatch`: messages and changes), its
    /// chat and generation, and the id of the event before it; the task
    /// pulls the next batch once `rendered` is dropped.
    Page {
        chat: Arc<str>,
        generation: u64,
        id: (i64, i64),
        page: Bytes,
        /// Its events as frames, shared by the followers that shared its
        /// fetch (the first batch, the history, is not shared: `None`).
        frames: Option<SharedFrames>,
        rendered: oneshot::Sender<()>,
    },
    /// A subscription ended (it failed); its final event, if any.
    Ended {
        chat: Arc<str>,
        generation: u64,
        event: Vec<u8>,
    },
    /// More of the page being rendered.
    More,
    /// Close the connection (a refused `auth`, the token's expiry).
    Close(u16, &'static str),
}

/// A batch being rendered, one event per message or change, and its
/// task's signal.
struct Rendering {
    events: PageEvents,
    /// The batch's events already rendered as frames (by this connection
    /// or another follower of the chat), and how far they are copied out;
    /// else `events` renders them one by one.
    frames: Option<(Bytes, usize)>,
    _rendered: oneshot::Sender<()>,
}

/// A batch's events as rendered so far.
struct PageEvents {
    chat: Arc<str>,
    /// The id of the last event rendered.
    id: (i64, i64),
    page: Bytes,
    pos: usize,
}

/// Largest batch whose frames are rendered once and shared: a live batch
/// (a few messages) is; a page of history with large messages is rendered
/// event by event as the subscriber's output drains, as before, so that
/// no subscriber's output holds more than its budget. The shared frames
/// are charged to the account of the follower that rendered them, and
/// weigh about what the batch does (JSON escapes aside).
const SHARED_RENDER_MAX: usize = 64 * 1024;

/// A subscription's task, stopped when dropped (unsubscribed, or the
/// connection ended).
struct Subscription {
    generation: u64,
    task: JoinHandle<()>,
    /// Held for its drop: `im_ws_subscriptions`.
    _counted: crate::metrics::Tracked,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct WsSession {
    rpc: BalancedClient,
    access: Arc<Access>,
    auth: AuthState,
    /// The client's address (a trusted proxy's forwarded one), for rate limits.
    client: Option<IpAddr>,
    /// What its pages are charged to in the gateway's memory budget.
    account: Account,
    max_wait_ms: i32,
    max_subscriptions: usize,
    events: mpsc::UnboundedReceiver<Event>,
    sender: mpsc::UnboundedSender<Event>,
    subscriptions: HashMap<Arc<str>, Subscription>,
    generation: u64,
    /// Requests started and not yet answered.
    in_flight: usize,
    /// The most reply bytes those may hold (pulls: a page each), and the
    /// output budget they must fit (one may exceed it alone), as over HTTP.
    reserved: usize,
    max_output: usize,
    /// Replies made without a task (refusals), to go out first.
    ready: std::collections::VecDeque<Vec<u8>>,
    /// Requests waiting for their RPC reply, polled by the connection's own
    /// task (at most [`MAX_IN_FLIGHT`]).
    pending: Vec<AwaitedReply>,
    /// A close to send (a failed `auth`).
    closing: Option<(u16, &'static str)>,
    /// The timer for `auth`'s deadline (the token's expiry, or the `auth`
    /// op's), made once and moved only when the deadline does: a
    /// `sleep_until` made in each [`Session::next`] registered and dropped
    /// a timer entry on every turn of the connection's loop.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    rendering: Option<Rendering>,
    /// One event's data and one event; reused.
    scratch: Vec<u8>,
    event: Vec<u8>,
    /// Held for its drop: `im_ws_connections_open`.
    _open: crate::metrics::Tracked,
}

/// One request frame. Fields an op does not use are ignored.
#[derive(Deserialize)]
struct Op {
    #[serde(default)]
    id: serde_json::Value,
    #[serde(default)]
    op: String,
    #[serde(default)]
    chat: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    cursor: Option<i64>,
    #[serde(default)]
    changes_after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    reverse: Option<bool>,
    #[serde(default)]
    token: Option<String>,
}

impl WsSession {
    fn new(
        gateway: &Gateway,
        auth: AuthState,
        client: Option<IpAddr>,
        account: Account,
    ) -> WsSession {
        let (sender, events) = mpsc::unbounded_channel();
        WsSession {
            account,
            rpc: gateway.rpc.clone(),
            access: gateway.access.clone(),
            auth,
            client,
            max_wait_ms: gateway.max_wait_ms,
            max_subscriptions: gateway.ws.max_subscriptions,
            events,
            sender,
            subscriptions: HashMap::new(),
            generation: 0,
            in_flight: 0,
            reserved: 0,
            max_output: gateway.ws.driver.max_output,
            ready: Default::default(),
            pending: Vec::new(),
            closing: None,
            deadline: None,
            rendering: None,
            scratch: Vec::new(),
            event: Vec::new(),
            _open: crate::metrics::track(crate::metrics::Gauge::WsConnections),
        }
    }

    /// Serves one request: a refusal is answered at once, an RPC in a task.
    fn serve(&mut self, op: Op) {
        let id = op.id.clone();
        if let Err(err) = self.start(op) {
            self.ready.push_back(error_reply(&id, &err));
        }
    }

    fn start(&mut self, op: Op) -> Result<(), ApiError> {
        if op.op == "auth" {
            return self.authenticate(op);
        }
        let user = match &self.auth {
            AuthState::Awaiting(_) => {
                return Err(ApiError::Unauthorized {
                    missing: true,
                    why: "authenticate first: {\"op\":\"auth\",\"token\":\"<token>\"}",
                });
            }
            AuthState::User(claims, _) => Some(claims.clone()),
            AuthState::Open => None,
        };
        match op.op.as_str() {
            "send" => self.start_send(op, user.as_deref()),
            "pull" => self.start_pull(op, user.as_deref()),
            "subscribe" => self.subscribe(op, user.as_deref()),
            "unsubscribe" => self.unsubscribe(op),
            "" => Err(ApiError::Invalid("`op` is required".into())),
            other => Err(ApiError::Invalid(format!(
                "unknown op `{}`; use send, pull, subscribe, unsubscribe or auth",
                json::quote(other)
            ))),
        }
    }

    /// `auth`: the connection's user from here on; a refused token closes
    /// the connection (1008) after its reply.
    fn authenticate(&mut self, op: Op) -> Result<(), ApiError> {
        let Some(checker) = &self.access.auth else {
            self.ready.push_back(ok_reply(&op.id, b""));
            return Ok(());
        };
        if matches!(self.auth, AuthState::User(..)) {
            return Err(ApiError::Invalid(
                "this connection is authenticated already".into(),
            ));
        }
        let header = format!("Bearer {}", op.token.unwrap_or_default());
        let now = crate::now_micros() / 1_000_000;
        match checker.authenticate_until(Some(header.as_bytes()), now) {
            Ok((claims, until)) => {
                self.auth = AuthState::User(Arc::new(claims), expiry(until));
                self.ready.push_back(ok_reply(&op.id, b""));
                Ok(())
            }
            Err(denied) => {
                self.closing = Some((close_code::POLICY_VIOLATION, "authentication failed"));
                Err(access::denied(denied))
            }
        }
    }

    /// Takes one token of the op's rate limit, as an HTTP request would.
    fn admit(&self, user: Option<&Claims>, api: Api) -> Result<(), ApiError> {
        self.access.limit(user, self.client, api)
    }

    fn start_send(&mut self, op: Op, user: Option<&Claims>) -> Result<(), ApiError> {
        self.admit(user, Api::Send)?;
        let key = op.idempotency_key.unwrap_or_default();
        if !key.is_empty() {
            crate::domain::validate_idempotency_key(&key).map_err(|e| ApiError::Invalid(e.0))?;
        }
        let mut message = Message {
            chat: op.chat.unwrap_or_default(),
            text: op.text.unwrap_or_default(),
            sender: op.sender.unwrap_or_default(),
            send_time: 0,
            edited_at: 0,
        };
        if let Some(user) = user {
            access::authorize(user, &message.chat, Some(&mut message.sender))?;
        }
        let request = SendRequest {
            message: Some(message),
            idempotency_key: key,
        };
        let call = self.rpc.start(RpcRequest::Send(request))?;
        let rpc = self.rpc.clone();
        self.spawn_reply(op.id, 0, async move {
            let resp: SendResponse = decode_reply(rpc.finish(call).await?)?;
            if resp.code != CODE_OK {
                return Err(ApiError::from_code(resp.code, resp.msg));
            }
            let mut body = b"\"send_time\":".to_vec();
            json::put_i64(&mut body, resp.send_time);
            if resp.replayed {
                body.extend_from_slice(b",\"replayed\":true");
            }
            Ok(body)
        });
        Ok(())
    }

    fn start_pull(&mut self, op: Op, user: Option<&Claims>) -> Result<(), ApiError> {
        self.admit(user, Api::Pull)?;
        let request = PullRequest {
            chat: op.chat.unwrap_or_default(),
            cursor: op.cursor.unwrap_or(0),
            limit: op
                .limit
                .unwrap_or(0)
                .clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
            reverse: op.reverse.unwrap_or(false),
            ..PullRequest::default()
        };
        if let Some(user) = user {
            access::authorize(user, &request.chat, None)?;
        }
        // The page it may hold until written (a refused limit holds none).
        let messages = match request.limit {
            0 => crate::domain::DEFAULT_LIMIT,
            n => n.clamp(1, crate::domain::MAX_LIMIT),
        };
        let bound = messages as usize * crate::domain::MAX_MESSAGE_WIRE_BYTES;
        let reserved = super::reserve_page(&self.account, request.limit)?;
        let call = self.rpc.start(RpcRequest::Pull(
            request,
            Some(Budgeted::Reserved(reserved)),
        ))?;
        let rpc = self.rpc.clone();
        self.reserved += bound;
        self.spawn_reply(op.id, bound, async move {
            let frame = rpc.finish(call).await?;
            super::check_status(&frame)?;
            match super::pull_wire::pull_json(&frame.body) {
                // `{"messages":...}` without its braces.
                Ok(Ok(body)) => Ok(body[1..body.len() - 1].to_vec()),
                Ok(Err(failed)) => Err(ApiError::from_code(failed.code, failed.msg)),
                Err(err) => Err(ApiError::internal(format!("undecodable rpc reply: {err}"))),
            }
        });
        Ok(())
    }

    /// Awaits `reply` on the connection's task; its fields (or error)
    /// become the reply to `id`. `bound`: the reply bytes it may hold
    /// (reserved until rendered). Not a task of its own: with a task and a
    /// trip through the event channel per request, a WebSocket send cost
    /// the server 11.0 µs of CPU, without them 10.3 (HTTP: 9.2; ws_load
    /// sends, one in flight per connection).
    fn spawn_reply<F>(&mut self, id: serde_json::Value, bound: usize, reply: F)
    where
        F: Future<Output = Result<Vec<u8>, ApiError>> + Send + 'static,
    {
        self.in_flight += 1;
        self.pending.push(Box::pin(async move {
            let reply = match reply.await {
                Ok(fields) => ok_reply(&id, &fields),
                Err(err) => error_reply(&id, &err),
            };
            Event::Reply(reply, bound)
        }));
    }
}

/// A request's reply on its way: the RPC call, then the reply's JSON.
type AwaitedReply = std::pin::Pin<Box<dyn Future<Output = Event> + Send>>;

/// The first of `pending` that is done, taken out of it; each polled
/// registers `cx`'s waker.
fn poll_pending(
    pending: &mut Vec<AwaitedReply>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Event> {
    for i in 0..pending.len() {
        if let std::task::Poll::Ready(event) = pending[i].as_mut().poll(cx) {
            drop(pending.swap_remove(i));
            return std::task::Poll::Ready(event);
        }
    }
    std::task::Poll::Pending
}

impl WsSession {
    /// `subscribe`: checked as a pull (one token of the pull limit), its
    /// first pull started here; the task replies once it is answered.
    fn subscribe(&mut self, op: Op, user: Option<&Claims>) -> Result<(), ApiError> {
        self.admit(user, Api::Pull)?;
        let chat: Arc<str> = op.chat.unwrap_or_default().into();
        if let Some(user) = user {
            access::authorize(user, &chat, None)?;
        }
        if self.subscriptions.contains_key(&chat) {
            return Err(ApiError::Invalid("already subscribed to this chat".into()));
        }
        if self.subscriptions.len() >= self.max_subscriptions {
            return Err(ApiError::Invalid(format!(
                "at most {} subscriptions per connection (--ws-max-subscriptions)",
                self.max_subscriptions
            )));
        }
        let cursor = op.cursor.unwrap_or(0);
        if op.changes_after.is_some_and(|seq| seq < 0) {
            return Err(ApiError::Invalid(
                "`changes_after` must be the `<seq>` of an event id `<send_time>.<seq>`".into(),
            ));
        }
        // The first pull does not wait: the history goes out at once.
        let first = self.rpc.start(RpcRequest::Pull(
            stream::page_request(&chat, cursor, 0, 0),
            Some(Budgeted::OnArrival(self.account.clone())),
        ))?;
        self.generation += 1;
        self.in_flight += 1;
        let follow = Follow {
            rpc: self.rpc.clone(),
            account: self.account.clone(),
            chat: chat.clone(),
            generation: self.generation,
            at: stream::Position::new(cursor, op.changes_after),
            wait_ms: stream::STREAM_WAIT_MS.min(self.max_wait_ms).max(0),
            sender: self.sender.clone(),
        };
        let task = tokio::spawn(follow.run(op.id, first));
        let subscription = Subscription {
            generation: self.generation,
            task,
            _counted: crate::metrics::track(crate::metrics::Gauge::WsSubscriptions),
        };
        self.subscriptions.insert(chat, subscription);
        Ok(())
    }

    fn unsubscribe(&mut self, op: Op) -> Result<(), ApiError> {
        let chat = op.chat.unwrap_or_default();
        if self.subscriptions.remove(chat.as_str()).is_none() {
            return Err(ApiError::Invalid("not subscribed to this chat".into()));
        }
        if self
            .rendering
            .as_ref()
            .is_some_and(|r| *r.events.chat == *chat)
        {
            self.rendering = None;
        }
        self.ready.push_back(ok_reply(&op.id, b""));
        Ok(())
    }

    /// Whether `generation` is still the chat's subscription.
    fn current(&self, chat: &str, generation: u64) -> bool {
        self.subscriptions
            .get(chat)
            .is_some_and(|s| s.generation == generation)
    }

    /// Renders the batch in progress until `out` holds `until` bytes:
    /// its shared frames copied out whole, or one event per message or
    /// change.
    fn render_page(&mut self, out: &mut BytesMut, until: usize) {
        let Some(rendering) = &mut self.rendering else {
            return;
        };
        let done = match &mut rendering.frames {
            Some((frames, pos)) => copy_frames(out, until, frames, pos),
            None => render_events(
                out,
                until,
                &mut rendering.events,
                &mut self.scratch,
                &mut self.event,
            ),
        };
        if done {
            self.rendering = None;
        }
    }

    /// The frames of a batch its followers on this thread shared: rendered
    /// here if no follower has yet, and charged to this connection's
    /// account; `None` (render event by event) for a large batch, or when
    /// the account has no room for them.
    fn shared_frames(
        &mut self,
        cell: &SharedFrames,
        chat: &Arc<str>,
        id: (i64, i64),
        page: &Bytes,
    ) -> Option<Bytes> {
        if let Some((rendered_from, frames)) = cell.get() {
            // Always so for followers that shared the fetch; checked, as
            // the frames' ids depend on it.
            return (*rendered_from == id).then(|| frames.clone());
        }
        if page.len() > SHARED_RENDER_MAX {
            return None;
        }
        let mut whole = PageEvents {
            chat: chat.clone(),
            id,
            page: page.clone(),
            pos: 0,
        };
        let mut buf = BytesMut::new();
        render_events(
            &mut buf,
            usize::MAX,
            &mut whole,
            &mut self.scratch,
            &mut self.event,
        );
        let frames = crate::budget::held(&buf, self.account.charge(buf.len())?);
        let (rendered_from, frames) = cell.get_or_init(|| (id, frames));
        (*rendered_from == id).then(|| frames.clone())
    }
}

/// Copies whole frames of `frames` from `pos` until `out` holds `until`
/// bytes; true once all are out.
fn copy_frames(out: &mut BytesMut, until: usize, frames: &Bytes, pos: &mut usize) -> bool {
    while out.len() < until {
        let rest = &frames[*pos..];
        // Frames this process wrote, so each is whole; a short one ends it.
        let Some(len) = crate::ws::frame::sent_frame_len(rest) else {
            return true;
        };
        out.extend_from_slice(&rest[..len]);
        *pos += len;
    }
    *pos >= frames.len()
}

/// Renders `rendering`'s page from its `pos`, one event per message or
/// change, until `out` holds `until` bytes; true once the page is done.
fn render_events(
    out: &mut BytesMut,
    until: usize,
    rendering: &mut PageEvents,
    scratch: &mut Vec<u8>,
    event: &mut Vec<u8>,
) -> bool {
    while out.len() < until {
        let mut rest = &rendering.page[rendering.pos..];
        if rest.is_empty() {
            return true;
        }
        // The batch was decoded whole by `stream::page_of`.
        let Ok(field) = next_field(&mut rest) else {
            return true;
        };
        rendering.pos = rendering.page.len() - rest.len();
        let (id, chat) = (&mut rendering.id, &rendering.chat);
        if let Some(kind) = stream::event_of(id, chat, field, scratch) {
            event_json(event, chat, *id, kind, scratch);
            put_frame(out, opcode::TEXT, event);
        }
    }
    rendering.pos >= rendering.page.len()
}

/// `{"event":<kind>,"chat":…,"id":"<send_time>.<seq>",…}`: a message or
/// an edit with its `"message"` (`data`), a delete with its `"send_time"`,
/// a reset with nothing more. The `id` is the SSE event's id: subscribing
/// with `cursor` = its send_time and `changes_after` = its seq resumes
/// right after it.
fn event_json(out: &mut Vec<u8>, chat: &str, id: (i64, i64), kind: EventKind, data: &[u8]) {
    out.clear();
    out.extend_from_slice(b"{\"event\":\"");
    out.extend_from_slice(kind.name());
    out.extend_from_slice(b"\",\"chat\":");
    json::put_str(out, chat);
    out.extend_from_slice(b",\"id\":\"");
    json::put_i64(out, id.0.max(0));
    out.push(b'.');
    json::put_i64(out, id.1.max(0));
    out.push(b'"');
    match kind {
        EventKind::Message | EventKind::Edit => {
            out.extend_from_slice(b",\"message\":");
            out.extend_from_slice(data);
        }
        EventKind::Delete(send_time) => {
            out.extend_from_slice(b",\"send_time\":");
            json::put_i64(out, send_time);
        }
        EventKind::Reset => {}
    }
    out.push(b'}');
}

/// A subscription's task: its first batch (then the reply), and the loop
/// of pulls and change reads of `/api/stream` ([`stream::next_page`]), each
/// batch handed to the connection and the next pulled once it is rendered.
struct Follow {
    rpc: BalancedClient,
    /// Each page is charged to it while held (till rendered).
    account: Account,
    chat: Arc<str>,
    generation: u64,
    at: stream::Position,
    wait_ms: i32,
    sender: mpsc::UnboundedSender<Event>,
}

impl Follow {
    async fn run(mut self, id: serde_json::Value, first: crate::rpc::balanced::BalancedCall) {
        let mut batch = match stream::first_batch(&self.rpc, first, &self.chat, &mut self.at).await
        {
            Ok(batch) => batch,
            Err(err) => {
                // Ended first: once the client reads the refusal, the chat
                // may be subscribed to again.
                self.end(Vec::new());
                let _ = self.sender.send(Event::Reply(error_reply(&id, &err), 0));
                return;
            }
        };
        let _ = self.sender.send(Event::Reply(ok_reply(&id, b""), 0));
        let mut frames = None;
        loop {
            let before = self.at.id;
            self.at.take(&batch);
            // Rendering moves the id event by event to where `take` put the
            // cursors (see `stream::event_of`).
            self.at.id = (self.at.cursor, self.at.seq);
            if !batch.is_empty() {
                let (rendered, wait) = oneshot::channel();
                let page = Event::Page {
                    chat: self.chat.clone(),
                    generation: self.generation,
                    id: before,
                    page: batch,
                    frames: frames.take(),
                    rendered,
                };
                if self.sender.send(page).is_err() {
                    return;
                }
                // Dropped when rendered (or dropped with the connection).
                let _ = wait.await;
            }
            let next = stream::next_page(
                self.rpc.clone(),
                Some(self.account.clone()),
                self.chat.clone(),
                self.at,
                self.wait_ms,
            );
            batch = match next.await {
                Ok(shared) => {
                    frames = Some(shared.frames);
                    shared.page
                }
                Err(err) => return self.end(event_error(&self.chat, &err)),
            };
        }
    }

    fn end(&self, event: Vec<u8>) {
        let chat = self.chat.clone();
        let generation = self.generation;
        let _ = self.sender.send(Event::Ended {
            chat,
            generation,
            event,
        });
    }
}

impl Session for WsSession {
    type Event = Event;

    fn message(&mut self, text: &[u8]) {
        match parse_op(text) {
            Ok(op) => self.serve(op),
            Err((id, err)) => self.ready.push_back(error_reply(&id, &err)),
        }
    }

    /// Lazy: the driver's `select!` makes this future on every turn, even
    /// when it will not poll it, so nothing is taken until it is polled
    /// (an event taken by a future then dropped would be lost).
    async fn next(&mut self) -> Event {
        if let Some(event) = self.try_next() {
            return event;
        }
        let (expires, why) = match &self.auth {
            AuthState::User(_, expires) => (*expires, "token expired"),
            AuthState::Awaiting(until) => (Some(*until), "no auth op in time"),
            AuthState::Open => (None, ""),
        };
        let timer = expires.map(|at| {
            let timer = self
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            timer
        });
        let expired = async move {
            match timer {
                Some(timer) => timer.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let pending = &mut self.pending;
        tokio::select! {
            event = self.events.recv() => event.unwrap_or(Event::Close(close_code::INTERNAL_ERROR, "")),
            event = std::future::poll_fn(|cx| poll_pending(pending, cx)) => event,
            () = expired => Event::Close(close_code::POLICY_VIOLATION, why),
        }
    }

    fn try_next(&mut self) -> Option<Event> {
        if let Some(reply) = self.ready.pop_front() {
            return Some(Event::Answer(reply));
        }
        if let Some((code, reason)) = self.closing.take() {
            return Some(Event::Close(code, reason));
        }
        if self.rendering.is_some() {
            return Some(Event::More);
        }
        if !self.pending.is_empty() {
            // Polled again, with the real waker, by `next` if not done.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if let std::task::Poll::Ready(event) = poll_pending(&mut self.pending, &mut cx) {
                return Some(event);
            }
        }
        self.events.try_recv().ok()
    }

    fn render(
        &mut self,
        event: Event,
        out: &mut BytesMut,
        until: usize,
    ) -> Option<(u16, &'static str)> {
        match event {
            Event::Reply(reply, bound) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.reserved = self.reserved.saturating_sub(bound);
                put_frame(out, opcode::TEXT, &reply);
            }
            Event::Answer(reply) => put_frame(out, opcode::TEXT, &reply),
            Event::Page {
                chat,
                generation,
                id,
                page,
                frames,
                rendered,
            } => {
                if self.current(&chat, generation) {
                    let frames =
                        frames.and_then(|cell| self.shared_frames(&cell, &chat, id, &page));
                    self.rendering = Some(Rendering {
                        events: PageEvents {
                            chat,
                            id,
                            page,
                            pos: 0,
                        },
                        frames: frames.map(|frames| (frames, 0)),
                        _rendered: rendered,
                    });
                    self.render_page(out, until);
                }
            }
            Event::More => self.render_page(out, until),
            Event::Ended {
                chat,
                generation,
                event,
            } => {
                if self.current(&chat, generation) {
                    self.subscriptions.remove(&chat);
                    if !event.is_empty() {
                        put_frame(out, opcode::TEXT, &event);
                    }
                }
            }
            Event::Close(code, reason) => return Some((code, reason)),
        }
        None
    }

    fn busy(&self) -> bool {
        self.in_flight >= MAX_IN_FLIGHT || (self.in_flight > 0 && self.reserved > self.max_output)
    }
}

/// A request frame, or why it is not one (with its `id` if it had one).
fn parse_op(text: &[u8]) -> Result<Op, (serde_json::Value, ApiError)> {
    // An object straight into `Op`: one parse instead of two (to a `Value`,
    // then from it) for every well-formed request. Anything else takes the
    // way below, which finds the `id` to answer and the error (an array
    // must not reach `Op`: serde reads a struct from a sequence too).
    if text.trim_ascii_start().starts_with(b"{")
        && let Ok(op) = serde_json::from_slice::<Op>(text)
    {
        return Ok(op);
    }
    let value: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| (serde_json::Value::Null, json::invalid_json(e)))?;
    let id = value.get("id").cloned().unwrap_or_default();
    if !value.is_object() {
        let why = "each frame is one JSON object: {\"id\",\"op\",...}";
        return Err((serde_json::Value::Null, ApiError::Invalid(why.into())));
    }
    serde_json::from_value(value).map_err(|e| (id, json::invalid_json(e)))
}

/// `{"id":…,"ok":true,<fields>}`.
fn ok_reply(id: &serde_json::Value, fields: &[u8]) -> Vec<u8> {
    let mut out = b"{\"id\":".to_vec();
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b",\"ok\":true");
    if !fields.is_empty() {
        out.push(b',');
        out.extend_from_slice(fields);
    }
    out.push(b'}');
    out
}

/// `{"id":…,"ok":false,"error":{"code","message"}}`: the codes of HTTP.
fn error_reply(id: &serde_json::Value, err: &ApiError) -> Vec<u8> {
    let body = err.json_body();
    let mut out = b"{\"id\":".to_vec();
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b",\"ok\":false,");
    // `{"error":…}` without its opening brace.
    out.extend_from_slice(&body[1..]);
    out
}

/// `{"event":"error","chat":…,"error":{…}}`: a subscription's end.
fn event_error(chat: &str, err: &ApiError) -> Vec<u8> {
    let mut out = b"{\"event\":\"error\",\"chat\":".to_vec();
    json::put_str(&mut out, chat);
    out.push(b',');
    out.extend_from_slice(&err.json_body()[1..]);
    out
}
