//! `GET /api/stream`: a chat's messages as Server-Sent Events, first those
//! after the cursor, oldest first, then each new one as it is stored.
//!
//! The stream is a loop of ordinary pulls (oldest first, a full page, the
//! cursor the last message's `send_time`), so it is exact by construction,
//! each followed by a read of the chat's change log (edits and deletes,
//! `event: edit` / `event: delete`, see [`crate::store::lifecycle`]) after
//! the last change sent; a round's messages and changes go out merged in
//! time order. Every event's `id` is `<send_time>.<change seq>`, the two
//! cursors, and a client that reconnects with `Last-Event-ID` resumes
//! right after the last event it got, with no gap and no duplicate, for
//! messages and changes alike (an id without `.<seq>` resumes the changes
//! from its send_time). A resume older than the change log keeps gets one
//! `event: reset` (the client reloads) and goes on from there. The connection's policy
//! ([`crate::http::conn`]) decides when the next page is pulled: only once
//! the previous one has been written out, so a stream holds at most one page.
//! WebSocket subscriptions ([`super::ws`]) follow chats with the same
//! [`Position`], [`first_batch`], [`next_page`] and [`event_of`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;

use super::error::ApiError;
use super::pull_wire::{scalars, write_message};
use super::{Gateway, PendingReply, access, check_status, json};
use crate::budget::Account;
use crate::error::CODE_OK;
use crate::http::Request;
use crate::http::response::{Batch, EventSource};
use crate::proto::fields::{pull_response, stream_batch};
use crate::proto::{Change, ChangesRequest, ChangesResponse, PullRequest};
use crate::rpc::balanced::{BalancedCall, BalancedClient};
use crate::rpc::client::{Budgeted, RpcRequest};
use crate::rpc::frame::Frame;
use crate::wire::{Value, next_field};

/// How long the RPC server may hold a caught-up stream's pull until a
/// message is stored in its chat (`PullRequest.wait_ms`, capped by
/// `--pull-max-wait-ms`): well under the 30 s most proxies allow a silent
/// upstream, and heartbeats keep the client side alive meanwhile.
pub(super) const STREAM_WAIT_MS: i32 = 25_000;

/// Pause after an empty page that came back before its wait was up (waiting
/// turned off with `--pull-max-wait-ms 0`, the RPC server shutting down, a
/// wake-up that found nothing): without it the stream would pull in a loop.
const EARLY_EMPTY_PAUSE: Duration = Duration::from_millis(100);

/// The pull after `cursor`: oldest first, a full page, held up to `wait_ms`
/// by the RPC server while there is nothing new.
/// `changes_after`: the stream's change cursor (the pull does not wait if
/// the log has a change after it, and if it waited, its answer carries the
/// changes after it: see [`page_and_changes`]).
pub(super) fn page_request(
    chat: &str,
    cursor: i64,
    wait_ms: i32,
    changes_after: i64,
) -> PullRequest {
    PullRequest {
        chat: chat.to_string(),
        cursor,
        limit: crate::domain::MAX_LIMIT,
        reverse: true,
        wait_ms,
        changes_after,
        with_changes: true,
    }
}

impl Gateway {
    /// Checks a stream request as a pull is checked (one pull against the
    /// rate limit) and starts its first pull: errors up to its answer are
    /// ordinary JSON errors, before any event.
    pub(super) fn start_stream(
        &self,
        req: &Request,
        account: &Account,
    ) -> Result<PendingReply, ApiError> {
        let user = self.access.admit(req, access::Api::Pull)?;
        if !accepts_event_stream(req) {
            return Err(ApiError::NotAcceptable);
        }
        let (chat, cursor) = json::parse_stream(&req.body, req.path_and_query().1)?;
        // Changes are read from where the client left them; a new stream
        // (whose first page is read now) from a moment ago (0: the store
        // decides, by its clock).
        let (cursor, seq) = match last_event_id(req)? {
            Some((cursor, seq)) => (cursor, seq),
            None => (cursor, None),
        };
        if let Some(user) = &user {
            access::authorize(user, &chat, None)?;
        }
        let account = super::charged_to(account, user.as_ref(), self.access.client_ip(req));
        let held = self.held.hold(account.client())?;
        // The first pull does not wait: the head (and the history) go out at
        // once, so a client sees the stream open even in a silent chat.
        let call = self.rpc.start(RpcRequest::Pull(
            page_request(&chat, cursor, 0, 0),
            Some(Budgeted::Reserved(super::reserve_page(
                &account,
                crate::domain::MAX_LIMIT,
            )?)),
        ))?;
        let stream = ChatStream {
            rpc: self.rpc.clone(),
            account,
            chat: chat.into(),
            at: Position::new(cursor, seq),
            wait_ms: STREAM_WAIT_MS.min(self.max_wait_ms).max(0),
            until: user.as_ref().map(|claims| claims.until),
            page: Bytes::new(),
            pos: 0,
            scratch: Vec::new(),
            _held: held,
            _open: crate::metrics::track(crate::metrics::Gauge::OpenStreams),
        };
        Ok(PendingReply::Stream(call, Box::new(stream)))
    }

    pub(super) async fn finish_stream(
        &self,
        call: BalancedCall,
        mut stream: Box<ChatStream>,
    ) -> Result<crate::http::Response, ApiError> {
        let batch = first_batch(&self.rpc, call, &stream.chat, &mut stream.at).await?;
        stream.take(batch);
        Ok(crate::http::Response::event_stream(stream))
    }
}

/// `Last-Event-ID` (what an `EventSource` sends when it reconnects): the
/// send_time to resume after, and the change sequence if the id has one.
/// It wins over the `cursor` parameter, because a reconnecting
/// `EventSource` repeats the URL it was first given.
fn last_event_id(req: &Request) -> Result<Option<(i64, Option<i64>)>, ApiError> {
    let mut values = req.header_values("last-event-id");
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::Invalid(
            "`Last-Event-ID` given more than once".into(),
        ));
    }
    let value = value.trim_ascii();
    if value.is_empty() {
        // What an EventSource sends after an event with an empty id: none.
        return Ok(None);
    }
    let number = |v: &str| v.parse::<i64>().ok().filter(|&n| n >= 0);
    let parsed = match std::str::from_utf8(value).ok().map(|v| v.split_once('.')) {
        Some(Some((t, s))) => number(t).zip(number(s)).map(|(t, s)| (t, Some(s))),
        Some(None) => std::str::from_utf8(value)
            .ok()
            .and_then(number)
            .map(|t| (t, None)),
        None => None,
    };
    parsed.map(Some).ok_or_else(|| {
        ApiError::Invalid(
            "`Last-Event-ID` must be an event id (`<send_time>.<seq>`) this stream sent".into(),
        )
    })
}

/// Whether the `Accept` fields allow `text/event-stream` (RFC 9110 §12.5.1):
/// no `Accept` means anything; otherwise the most specific range that
/// matches it (`text/event-stream`, `text/*`, `*/*`) decides, and `q=0`
/// refuses. A client that asks only for JSON gets 406, not a stream it
/// cannot read.
pub fn accepts_event_stream(req: &Request) -> bool {
    let mut any_field = false;
    let mut best: Option<(u8, bool)> = None;
    for field in req.header_values("accept") {
        for range in field.split(|&b| b == b',') {
            let mut parts = range.split(|&b| b == b';');
            let media = parts.next().unwrap_or_default().trim_ascii();
            if media.is_empty() {
                continue;
            }
            any_field = true;
            let specificity = match media.to_ascii_lowercase().as_slice() {
                b"text/event-stream" => 3,
                b"text/*" => 2,
                b"*/*" => 1,
                _ => continue,
            };
            let refused = parts.any(|p| is_q_zero(p.trim_ascii()));
            if best.is_none_or(|(s, _)| specificity > s) {
                best = Some((specificity, !refused));
            }
        }
    }
    match best {
        Some((_, allowed)) => allowed,
        None => !any_field,
    }
}

/// `q=0`, `q=0.0`, `q=0.000`: the weight that means "not acceptable".
fn is_q_zero(param: &[u8]) -> bool {
    let Some(value) = param
        .strip_prefix(b"q=")
        .or_else(|| param.strip_prefix(b"Q="))
    else {
        return false;
    };
    let value = value.trim_ascii();
    value.first() == Some(&b'0') && value[1..].iter().all(|&b| b == b'.' || b == b'0')
}

/// A pull reply's page, checked whole (so rendering it cannot fail half
/// way). The RPC client copied it out of its read buffer (which it would
/// otherwise pin for as long as a slow reader takes) when it charged it to
/// the memory budget, and the charge lasts as long as the page.
pub(super) fn page_of(frame: Frame) -> Result<Bytes, ApiError> {
    page_and_changes(frame).map(|(page, _)| page)
}

/// [`page_of`], and the changes the page carries if it does (a pull that
/// waited, asked `with_changes`, from an RPC server that knows the field),
/// found in the same pass. The page keeps the field: everything after
/// skips it.
fn page_and_changes(frame: Frame) -> Result<(Bytes, Option<ChangesResponse>), ApiError> {
    use prost::Message as _;
    check_status(&frame)?;
    let undecodable =
        |e: &dyn std::fmt::Display| ApiError::internal(format!("undecodable rpc reply: {e}"));
    let head = scalars(&frame.body).map_err(|e| undecodable(&e))?;
    if head.code != CODE_OK {
        return Err(ApiError::from_code(head.code, head.msg));
    }
    let mut rest = &frame.body[..];
    let mut scratch = Vec::new();
    let mut carried = None;
    while !rest.is_empty() {
        match next_field(&mut rest).map_err(|e| undecodable(&e))? {
            (pull_response::MESSAGES, Value::Bytes(message)) => {
                scratch.clear();
                write_message(&mut scratch, message).map_err(|e| undecodable(&e))?;
            }
            (pull_response::CHANGES, Value::Bytes(changes)) => {
                let changes = ChangesResponse::decode(changes).map_err(|e| undecodable(&e))?;
                carried = Some(changes);
            }
            _ => {}
        }
    }
    Ok((frame.body, carried))
}

/// The chat's changes after `after` (see `ChangesRequest`).
async fn fetch_changes(
    rpc: &BalancedClient,
    chat: &str,
    after: i64,
) -> Result<ChangesResponse, ApiError> {
    let call = rpc.start(RpcRequest::Changes(ChangesRequest {
        chat: chat.to_string(),
        after,
        limit: 0,
    }))?;
    let frame = rpc.finish(call).await?;
    // An RPC server from before edits (a rolling upgrade) does not know the
    // method: its chats have no changes, the stream goes on with messages.
    if frame.method_or_status == crate::rpc::status::BAD_FRAME
        && frame.body.starts_with(b"unknown method")
    {
        return Ok(ChangesResponse {
            next: after,
            ..ChangesResponse::default()
        });
    }
    let resp: ChangesResponse = super::decode_reply(frame)?;
    if resp.code != CODE_OK {
        return Err(ApiError::from_code(resp.code, resp.msg));
    }
    Ok(resp)
}

/// A `StreamBatch`: the page's messages and the changes, merged by time
/// (`send_time`, change `seq`: both the store's µs clock), the reset first.
/// Without changes and with the change cursor where it was (`after`), the
/// page as it is.
fn merge(page: Bytes, after: i64, changes: ChangesResponse) -> Bytes {
    if changes.changes.is_empty() && !changes.reset && changes.next == after {
        return page;
    }
    let next = changes.next;
    let mut out = Vec::with_capacity(page.len() + 64);
    if changes.reset {
        crate::wire::put_varint_field(&mut out, stream_batch::RESET, changes.next as u64);
    }
    if changes.has_more {
        crate::wire::put_varint_field(&mut out, stream_batch::MORE_CHANGES, 1);
    }
    let mut pending = changes.changes.into_iter().peekable();
    let mut rest = &page[..];
    // The page was decoded whole by `page_of`.
    while let Ok(field) = next_field(&mut rest) {
        if let (pull_response::MESSAGES, Value::Bytes(message)) = field {
            let time = send_time_of(message);
            while let Some(change) = pending.next_if(|c| c.seq < time) {
                put_change(&mut out, &change);
            }
            crate::wire::put_bytes_field(&mut out, stream_batch::MESSAGES, message);
        }
        if rest.is_empty() {
            break;
        }
    }
    for change in pending {
        put_change(&mut out, &change);
    }
    crate::wire::put_varint_field(&mut out, stream_batch::CHANGES_NEXT, next as u64);
    Bytes::from(out)
}

fn put_change(out: &mut Vec<u8>, change: &Change) {
    use prost::Message as _;
    crate::wire::put_bytes_field(out, stream_batch::CHANGES, &change.encode_to_vec());
}

fn send_time_of(mut message: &[u8]) -> i64 {
    let mut time = 0;
    while let Ok(field) = next_field(&mut message) {
        if let (crate::proto::fields::message::SEND_TIME, Value::Varint(t)) = field {
            time = t as i64;
        }
    }
    time
}

/// Where a follower of a chat is (an `/api/stream` or a WebSocket
/// subscription: both follow a chat with this one loop of pulls and change
/// reads, so their events are the same, with the same ids).
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    /// The send_time of the last message taken: the next pull's cursor.
    pub cursor: i64,
    /// The sequence of the last change taken: the next change read's cursor
    /// (0 until the first read: a new follower, from a moment ago).
    pub seq: i64,
    /// The last batch left changes unread: the next pull must not wait.
    pub more_changes: bool,
    /// The (send_time, seq) of the last event rendered: the next event's id.
    pub id: (i64, i64),
}

impl Position {
    /// After the message `cursor` and the change `changes_after` (by
    /// default the changes after `cursor`'s time rounded down to the whole
    /// second, as for a new stream: see [`NEW_FOLLOWER_STEP_US`]).
    pub fn new(cursor: i64, changes_after: Option<i64>) -> Position {
        let seq = changes_after.unwrap_or_else(|| new_follower_seq(cursor));
        Position {
            cursor,
            seq,
            more_changes: false,
            id: (cursor, seq),
        }
    }

    /// Moves both cursors past a `StreamBatch` (oldest first: the last
    /// message is the newest, the next cursor; likewise the last change).
    /// `id` is left to rendering, which reaches the same place event by event.
    pub fn take(&mut self, batch: &[u8]) {
        let mut rest = batch;
        self.more_changes = false;
        while let Ok(field) = next_field(&mut rest) {
            match field {
                (pull_response::MESSAGES, Value::Bytes(message)) => {
                    self.cursor = send_time_of(message);
                }
                (stream_batch::CHANGES, Value::Bytes(change)) => {
                    if let Some(seq) = change_seq(change) {
                        self.seq = seq;
                    }
                }
                (stream_batch::RESET, Value::Varint(seq)) => self.seq = seq as i64,
                (stream_batch::MORE_CHANGES, Value::Varint(more)) => self.more_changes = more != 0,
                (stream_batch::CHANGES_NEXT, Value::Varint(next)) => self.seq = next as i64,
                _ => {}
            }
            if rest.is_empty() {
                break;
            }
        }
    }
}

/// What a new follower's change cursor is rounded down to (µs). Followers
/// of a chat share their fetches only when they stand at the same place
/// ([`next_page`]), and a change cursor moves only with changes or with the
/// store's watermark, which trails the clock by 5 s
/// (`store::lifecycle::watermark`, rounded to the same step). Started at
/// each one's own cursor, the subscribers of a room kept a change cursor
/// each for their first 5 s and shared nothing: ws_load fanout (1,000
/// subscribers over 100 rooms) made 6.1 pulls and 6.1 change reads per
/// message on two shards, where 2 of each would do. Rounding down only
/// reads a little more: a change replayed is harmless (an edit carries the
/// whole message, a delete is idempotent).
pub(super) const NEW_FOLLOWER_STEP_US: i64 = 1_000_000;

/// A new follower's change cursor: `cursor` rounded down to
/// [`NEW_FOLLOWER_STEP_US`], never to 0 (which asks the store to choose)
/// unless the cursor is 0.
fn new_follower_seq(cursor: i64) -> i64 {
    if cursor <= 0 {
        return cursor;
    }
    (cursor - cursor.rem_euclid(NEW_FOLLOWER_STEP_US)).max(1)
}

/// The first batch of a follower whose first pull is `call` (started
/// without waiting, so the head goes out at once): that page and the
/// changes after `pos.seq`, merged.
pub(super) async fn first_batch(
    rpc: &BalancedClient,
    call: BalancedCall,
    chat: &str,
    pos: &mut Position,
) -> Result<Bytes, ApiError> {
    let page = page_of(rpc.finish(call).await?)?;
    let changes = fetch_changes(rpc, chat, pos.seq).await?;
    if pos.seq == 0 {
        // A new follower: its first events resume before this batch's changes.
        pos.id.1 = changes.changes.first().map_or(changes.next, |c| c.seq - 1);
    }
    Ok(merge(page, pos.seq, changes))
}

/// The next batch of a follower at `pos` (see [`fetch_page`]). Followers of
/// one chat at the same position on this shard share one fetch: the first
/// fetches, the others wait for its batch, which is the one each would
/// have fetched. Subscribers of a room are in step (each got the same last
/// batch), so a message in a room with N subscribers on this shard costs
/// one held pull and one change read instead of N of each (ws_load fanout,
/// 10 subscribers a room: 42 µs of gateway CPU per delivery when each
/// fetched its own). The batch is charged to the first one's account.
///
/// Kept per thread: a shard's followers all run on its thread, and its
/// runtime never moves them.
pub(super) async fn next_page(
    rpc: BalancedClient,
    account: Option<Account>,
    chat: Arc<str>,
    pos: Position,
    wait_ms: i32,
) -> Result<SharedBatch, ApiError> {
    let key = PageKey {
        chat: chat.clone(),
        cursor: pos.cursor,
        seq: pos.seq,
        more_changes: pos.more_changes,
        wait_ms,
    };
    let fetching = FETCHING.with(|f| f.borrow().get(&key).cloned());
    if let Some(mut fetched) = fetching {
        if let Ok(batch) = fetched.wait_for(Option::is_some).await
            && let Some(batch) = batch.clone()
        {
            return batch;
        }
        // The fetch was given up (its follower left): fetch alone.
        let batch = fetch_page(rpc, account, chat, pos, wait_ms).await;
        return batch.map(SharedBatch::new);
    }
    let (done, fetched) = watch::channel(None);
    FETCHING.with(|f| f.borrow_mut().insert(key.clone(), fetched));
    let _fetching = Fetching(key);
    let batch = fetch_page(rpc, account, chat, pos, wait_ms).await;
    let batch = batch.map(SharedBatch::new);
    done.send_replace(Some(batch.clone()));
    batch
}

/// A batch as its followers share it: the `StreamBatch`, and its events
/// as WebSocket frames once the first follower to render them has (every
/// follower that shares a fetch stood at the same place, so its events,
/// ids included, are the same for all: see `ws::WsSession::shared_frames`).
#[derive(Clone)]
pub(super) struct SharedBatch {
    pub page: Bytes,
    pub frames: SharedFrames,
}

/// A batch's events rendered as WebSocket frames, once, for all the
/// followers that shared its fetch, with the id of the event before them,
/// which every follower of a shared fetch has (it is the position the
/// fetch was keyed by).
pub(super) type SharedFrames = Arc<std::sync::OnceLock<((i64, i64), Bytes)>>;

impl SharedBatch {
    fn new(page: Bytes) -> SharedBatch {
        SharedBatch {
            page,
            frames: Arc::default(),
        }
    }
}

/// What makes two followers' next batches the same fetch.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PageKey {
    chat: Arc<str>,
    cursor: i64,
    seq: i64,
    more_changes: bool,
    wait_ms: i32,
}

type FetchedBatch = watch::Receiver<Option<Result<SharedBatch, ApiError>>>;

thread_local! {
    /// The fetches under way on this thread, by what they fetch.
    static FETCHING: RefCell<HashMap<PageKey, FetchedBatch>> = RefCell::new(HashMap::new());
}

/// Takes its fetch out of [`FETCHING`] when done or given up.
struct Fetching(PageKey);

impl Drop for Fetching {
    fn drop(&mut self) {
        FETCHING.with(|f| f.borrow_mut().remove(&self.0));
    }
}

/// Pulls until a page holds messages or changes came, each pull held by
/// the RPC server until a message is stored (or a message changed) or
/// `wait_ms` passes (at once if `pos.more_changes`); the `StreamBatch`, or
/// the error that ends the follower. Each page is charged to `account`'s
/// share of the memory budget when it arrives, if given.
async fn fetch_page(
    rpc: BalancedClient,
    account: Option<Account>,
    chat: Arc<str>,
    pos: Position,
    wait_ms: i32,
) -> Result<Bytes, ApiError> {
    let wait = Duration::from_millis(wait_ms.max(0) as u64);
    let mut wait_ms = if pos.more_changes { 0 } else { wait_ms };
    // Moved on by reads that found nothing (the store's watermark), so a
    // quiet follower's cursor stays within the log's window.
    let mut after = pos.seq;
    loop {
        let asked = tokio::time::Instant::now();
        let request = page_request(&chat, pos.cursor, wait_ms, after);
        // Held until a message comes: charged when the page arrives.
        let budgeted = account.clone().map(Budgeted::OnArrival);
        let call = rpc.start(RpcRequest::Pull(request, budgeted))?;
        let (page, carried) = page_and_changes(rpc.finish(call).await?)?;
        let changes = match carried {
            Some(changes) if changes.code == CODE_OK => changes,
            _ => fetch_changes(&rpc, &chat, after).await?,
        };
        if has_messages(&page) || !changes.changes.is_empty() || changes.reset {
            return Ok(merge(page, pos.seq, changes));
        }
        after = changes.next;
        if wait.is_zero() || asked.elapsed() < wait {
            tokio::time::sleep(EARLY_EMPTY_PAUSE).await;
        }
        wait_ms = wait.as_millis() as i32;
    }
}

/// `page`, unless the token expires first (or already has): then the
/// stream's final `event: error` with code `token_expired`. A page that
/// arrives is delivered even if the token expires while it is written: it
/// was pulled while the token was valid.
async fn until_expiry(page: impl Future<Output = Batch>, until: i64) -> Batch {
    let now = crate::now_micros() as f64 / 1e6;
    let end = until.saturating_add(1) as f64;
    let left = Duration::try_from_secs_f64(end - now).unwrap_or(Duration::ZERO);
    if left.is_zero() {
        return Err(error_event(&ApiError::TokenExpired));
    }
    tokio::select! {
        batch = page => batch,
        _ = tokio::time::sleep(left) => Err(error_event(&ApiError::TokenExpired)),
    }
}

pub(super) fn has_messages(page: &[u8]) -> bool {
    scalars(page).is_ok_and(|s| s.count > 0)
}

/// `event: error` with the error's JSON body: the stream ends after it
/// (a browser's `EventSource` then reconnects with `Last-Event-ID`).
fn error_event(err: &ApiError) -> Vec<u8> {
    let mut out = b"event: error\ndata: ".to_vec();
    out.extend_from_slice(&err.json_body());
    out.extend_from_slice(b"\n\n");
    out
}

/// One chat's event stream.
pub struct ChatStream {
    rpc: BalancedClient,
    /// What its pages are charged to while held.
    account: Account,
    chat: Arc<str>,
    /// Its cursors and the id of its last event.
    at: Position,
    /// How long each pull after the first may be held (see [`STREAM_WAIT_MS`]).
    wait_ms: i32,
    /// With authentication, the last second the stream's token is accepted
    /// in (since the epoch): the stream ends when it is over, as a pull
    /// with that token is refused from then on.
    until: Option<i64>,
    /// The page being rendered (a `PullResponse`), from `pos` on.
    page: Bytes,
    pos: usize,
    /// One message's JSON; reused.
    scratch: Vec<u8>,
    /// Its place among the held work, for as long as it is open.
    _held: super::held::Held,
    /// Counts this stream in `im_streams_open` while it lives.
    _open: crate::metrics::Tracked,
}

/// `<send_time>.<seq>`: an event's id, both cursors (SSE's `id:`, a
/// WebSocket event's `"id"`).
fn put_id(out: &mut BytesMut, (send_time, seq): (i64, i64)) {
    crate::digits::put_u64(out, send_time.max(0) as u64);
    out.put_u8(b'.');
    crate::digits::put_u64(out, seq.max(0) as u64);
}

/// `id: <send_time>.<seq>`, `event: <kind>` unless a message,
/// `data: <JSON>` (one line: JSON strings escape newlines), blank line.
fn put_event(out: &mut BytesMut, id: (i64, i64), kind: &[u8], json: &[u8]) {
    out.put_slice(b"id: ");
    put_id(out, id);
    if !kind.is_empty() {
        out.put_slice(b"\nevent: ");
        out.put_slice(kind);
    }
    out.put_slice(b"\ndata: ");
    out.put_slice(json);
    out.put_slice(b"\n\n");
}

/// What a field of a `StreamBatch` is to a follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventKind {
    /// A new message; its data is the message.
    Message,
    /// An edit; its data is the whole message, with `edited_at`.
    Edit,
    /// A delete of the message with this send_time; its data is
    /// `{"chat","send_time"}`.
    Delete(i64),
    /// The change log no longer reaches back to the follower's change
    /// cursor: the client reloads. Its data is `{}`.
    Reset,
}

impl EventKind {
    pub fn name(self) -> &'static [u8] {
        match self {
            EventKind::Message => b"message",
            EventKind::Edit => b"edit",
            EventKind::Delete(_) => b"delete",
            EventKind::Reset => b"reset",
        }
    }
}

/// One field of a `StreamBatch` (decoded whole by `page_of` and `merge`)
/// as its event, if it is one: its kind, its data's JSON in `out`, `id`
/// moved to it (the event's id). Fields that are not events still move the
/// id (`CHANGES_NEXT`), so the id after a whole batch is the follower's
/// [`Position`].
pub(super) fn event_of(
    id: &mut (i64, i64),
    chat: &str,
    field: (u32, Value<'_>),
    out: &mut Vec<u8>,
) -> Option<EventKind> {
    use prost::Message as _;
    out.clear();
    match field {
        (pull_response::MESSAGES, Value::Bytes(message)) => {
            id.0 = write_message(out, message).ok()?;
            Some(EventKind::Message)
        }
        (stream_batch::CHANGES, Value::Bytes(change)) => {
            let change = Change::decode(change).ok()?;
            id.1 = change.seq;
            Some(change_json(out, chat, &change))
        }
        (stream_batch::RESET, Value::Varint(seq)) => {
            id.1 = seq as i64;
            out.extend_from_slice(b"{}");
            Some(EventKind::Reset)
        }
        (stream_batch::CHANGES_NEXT, Value::Varint(next)) => {
            id.1 = next as i64;
            None
        }
        _ => None,
    }
}

/// A change's event kind and JSON: an edit's whole message (with
/// `edited_at`), a delete's `{"chat","send_time"}`.
fn change_json(out: &mut Vec<u8>, chat: &str, change: &Change) -> EventKind {
    use super::json::{put_i64, put_str};
    out.extend_from_slice(b"{\"chat\":");
    put_str(out, chat);
    match &change.edited {
        Some(message) => {
            out.extend_from_slice(b",\"text\":");
            put_str(out, &message.text);
            out.extend_from_slice(b",\"sender\":");
            put_str(out, &message.sender);
            out.extend_from_slice(b",\"send_time\":");
            put_i64(out, message.send_time);
            out.extend_from_slice(b",\"edited_at\":");
            put_i64(out, change.seq);
            out.push(b'}');
            EventKind::Edit
        }
        None => {
            out.extend_from_slice(b",\"send_time\":");
            put_i64(out, change.deleted);
            out.push(b'}');
            EventKind::Delete(change.deleted)
        }
    }
}

impl EventSource for ChatStream {
    fn fill(&mut self, out: &mut BytesMut, until: usize) -> bool {
        while out.len() < until {
            // (A reference count, not a copy: `render` needs `self`.)
            let page = self.page.clone();
            let mut rest = &page[self.pos..];
            if rest.is_empty() {
                // Rendered: its memory (and charge) need not wait for the
                // next page.
                (self.page, self.pos) = (Bytes::new(), 0);
                return false;
            }
            // The page was decoded whole by `page_of`.
            let Ok(field) = next_field(&mut rest) else {
                self.pos = self.page.len();
                return false;
            };
            self.pos = self.page.len() - rest.len();
            let id = &mut self.at.id;
            if let Some(kind) = event_of(id, &self.chat, field, &mut self.scratch) {
                // A message is SSE's default event type: no `event:` line.
                let name = if kind == EventKind::Message {
                    b"" as &[u8]
                } else {
                    kind.name()
                };
                put_event(out, *id, name, &self.scratch);
            }
        }
        self.pos < self.page.len()
    }

    fn more(&mut self) -> Pin<Box<dyn Future<Output = Batch> + Send>> {
        let (rpc, account, chat) = (self.rpc.clone(), self.account.clone(), self.chat.clone());
        let (at, wait_ms) = (self.at, self.wait_ms);
        let page = async move {
            next_page(rpc, Some(account), chat, at, wait_ms)
                .await
                .map(|batch| batch.page)
                .map_err(|err| error_event(&err))
        };
        match self.until {
            None => Box::pin(page),
            Some(until) => Box::pin(until_expiry(page, until)),
        }
    }

    fn take(&mut self, page: Bytes) {
        self.at.take(&page);
        self.page = page;
        self.pos = 0;
    }
}

fn change_seq(change: &[u8]) -> Option<i64> {
    use prost::Message as _;
    Change::decode(change).ok().map(|c| c.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::codec::{Limits, RequestDecoder};

    fn request(head: &str) -> Request {
        let mut input =
            BytesMut::from(format!("GET /api/stream HTTP/1.1\r\nHost: x\r\n{head}\r\n").as_str());
        RequestDecoder::new(Limits::default())
            .decode(&mut input)
            .expect("valid")
            .expect("whole")
    }

    #[test]
    fn accept_follows_the_most_specific_range() {
        for ok in [
            "",
            "Accept: text/event-stream\r\n",
            "Accept: */*\r\n",
            "Accept: text/*;q=0.5\r\n",
            "Accept: application/json, text/event-stream;q=0.1\r\n",
            "Accept: TEXT/Event-Stream\r\n",
            "Accept: text/event-stream, */*;q=0\r\n",
        ] {
            assert!(accepts_event_stream(&request(ok)), "{ok:?}");
        }
        for refused in [
            "Accept: application/json\r\n",
            "Accept: text/event-stream;q=0\r\n",
            "Accept: */*, text/event-stream;q=0.0\r\n",
            "Accept: text/*;q=0, application/json\r\n",
            "Accept: text/html\r\n",
        ] {
            assert!(!accepts_event_stream(&request(refused)), "{refused:?}");
        }
    }

    /// A merged batch's events come in time order with their ids, and the
    /// id after the last one is where `Position::take` puts the cursors
    /// (what a WebSocket subscription relies on between batches).
    #[test]
    fn a_batch_renders_in_time_order_and_ends_at_the_position_it_moves_to() {
        use crate::proto::{Message, PullResponse, StoredMessage};
        use prost::Message as _;
        let message = |t: i64| Message {
            chat: "c".into(),
            text: format!("m{t}"),
            sender: "s".into(),
            send_time: t,
            edited_at: 0,
        };
        let page = PullResponse {
            messages: vec![message(10), message(30)],
            ..PullResponse::default()
        };
        let edit = Change {
            seq: 20,
            edited: Some(StoredMessage {
                send_time: 10,
                text: "edited".into(),
                sender: "s".into(),
                ..StoredMessage::default()
            }),
            ..Change::default()
        };
        let delete = Change {
            seq: 40,
            deleted: 30,
            ..Change::default()
        };
        let changes = ChangesResponse {
            changes: vec![edit, delete],
            next: 45,
            ..ChangesResponse::default()
        };
        let batch = merge(Bytes::from(page.encode_to_vec()), 5, changes);
        let mut at = Position::new(5, Some(5));
        let mut id = at.id;
        let (mut rendered, mut data) = (Vec::new(), Vec::new());
        let mut rest = &batch[..];
        while !rest.is_empty() {
            let field = next_field(&mut rest).expect("decodable");
            if let Some(kind) = event_of(&mut id, "c", field, &mut data) {
                rendered.push((kind, id, String::from_utf8(data.clone()).expect("utf-8")));
            }
        }
        let kinds: Vec<_> = rendered.iter().map(|(k, id, _)| (*k, *id)).collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Message, (10, 5)),
                (EventKind::Edit, (10, 20)),
                (EventKind::Message, (30, 20)),
                (EventKind::Delete(30), (30, 40)),
            ]
        );
        assert!(
            rendered[1].2.contains("\"edited_at\":20"),
            "{}",
            rendered[1].2
        );
        assert_eq!(rendered[3].2, "{\"chat\":\"c\",\"send_time\":30}");
        at.take(&batch);
        assert_eq!((at.cursor, at.seq), (30, 45));
        assert_eq!(id, (30, 45), "the id after the batch is the position");
    }

    #[test]
    fn new_followers_within_a_second_start_their_changes_at_one_place() {
        let second = 1_700_000_000_000_000;
        for cursor in [second, second + 1, second + 999_999] {
            assert_eq!(Position::new(cursor, None).seq, second);
            assert_eq!(Position::new(cursor, None).cursor, cursor);
        }
        assert_eq!(
            Position::new(second + 1_000_000, None).seq,
            second + 1_000_000
        );
        // 0 asks the store to choose: only a cursor of 0 asks it.
        assert_eq!(Position::new(0, None).seq, 0);
        assert_eq!(Position::new(5, None).seq, 1);
        // A resume keeps its own change cursor.
        assert_eq!(Position::new(second + 7, Some(second + 3)).seq, second + 3);
    }

    #[test]
    fn last_event_id_is_a_send_time_and_a_seq() {
        assert_eq!(last_event_id(&request("")), Ok(None));
        assert_eq!(last_event_id(&request("Last-Event-ID: \r\n")), Ok(None));
        assert_eq!(
            last_event_id(&request("Last-Event-ID: 1700000000000001\r\n")),
            Ok(Some((1_700_000_000_000_001, None)))
        );
        assert_eq!(
            last_event_id(&request("Last-Event-ID: 17.25\r\n")),
            Ok(Some((17, Some(25))))
        );
        for bad in ["abc", "-1", "1.x", "1.-5", ".5", "99999999999999999999"] {
            let head = format!("Last-Event-ID: {bad}\r\n");
            assert!(last_event_id(&request(&head)).is_err(), "{bad}");
        }
        let twice = "Last-Event-ID: 1\r\nLast-Event-ID: 2\r\n";
        assert!(last_event_id(&request(twice)).is_err());
    }
}
