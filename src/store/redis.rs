//! The Redis store: one sorted set per chat, score = `send_time`.
//!
//! * Key: `im:{<chat>}`. The chat is the hash tag, so in a Redis Cluster each
//!   chat lives whole in one slot and no data needs migrating.
//! * Member: a protobuf `StoredMessage` (`proto/im.proto`): `send_time`
//!   (unique within the chat, so identical texts never merge), text, sender;
//!   not the chat, which is the key.
//! * `send_time` is assigned inside Redis by the `im_send` function, atomically
//!   with the ZADD: max(the caller's clock in µs, the chat's highest score + 1).
//!   Any number of RPC server processes can write one chat and the values
//!   stay unique and increasing in the order Redis applies the writes,
//!   whatever their clocks say (skewed clocks only shift the values).
//!   Sends queued together go to Redis as one `im_send` call (a batch), which
//!   reads each chat's top score once and adds its messages with one ZADD.
//!   Measured with redis-benchmark: one message per call, 113k calls/s (61k/s
//!   for an earlier version calling TIME and building a varint in Lua);
//!   8 messages to one chat per call, 238k messages/s.
//! * Idempotency keys: a send with a key also names its record,
//!   [`idempotency_record_key`] (in the chat's slot), which `im_send` reads
//!   and writes (`SET ... EX`) in the same call as the ZADD; see [`LIBRARY`].
//!   With a key, a send whose connection failed is sent once more.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::retention::Retention;
use super::{Completion, Page, PageWriter, Sent, Store};
use crate::domain::PullQuery;
use crate::error::Error;
use crate::metrics::{Outcome, PeerCall, PeerKind, PeerStats};
use crate::mux::{ByteBudget, Handle, MuxOptions, Pending, Pool};
use crate::notify::{Hub, Waiter};
use crate::proto::fields::stored_message;
use crate::resp::protocol::{RespProtocol, RespRequest};
use crate::resp::url::RedisTarget;
use crate::resp::{Reply, command};
use crate::wire::{self, Malformed, Value, next_field, text};

/// Loaded (idempotently) on every connection. Needs Redis >= 7.0.
const LIBRARY: &str = concat!(
    r#"#!lua name=im
-- Stores a batch of messages, each atomically with its send_time.
-- Without idempotency keys: KEYS[i] = message i's chat; ARGV[i] = message i
-- as a StoredMessage protobuf without send_time; ARGV[#KEYS + 1] = the
-- caller's clock in microseconds.
-- With m keyed messages among the n, their record keys (each in its chat's
-- slot) follow the chats, and ARGV gains each one's message index, the
-- records' TTL in seconds and m:
--   KEYS = chat_1..chat_n, record_1..record_m
--   ARGV = member_1..member_n, index_1..index_m, ttl, m, clock
-- Returns, per message: its send_time (stored now); {send_time} (its key's
-- record matches it: nothing stored, this is the first send's send_time);
-- or the status REUSED (the key's record is for another text or sender).
-- Within a chat, each stored message gets max(clock, the chat's highest
-- score + 1), so send_times stay unique and increasing in the order Redis
-- applies them, whoever the caller is.
-- A record is the send_time (8 bytes) and 128 bits of the SHA-1 of the
-- member (text + sender): 40 bytes, an embedded string in Redis.
local function fingerprint(member)
  return string.sub(redis.sha1hex(member), 1, 32)
end

-- `trim`, if any, runs on each chat after its run's ZADD (retention: see
-- im_send_keep in lifecycle.lua).
local function send_batch(keys, args, trim)
  local n, nargs = #keys, #args
  -- The clock as the caller wrote it (a decimal integer) and packed: most
  -- messages get exactly `now` (every one in a batch to distinct chats), and
  -- reusing these spares a string.format (an sprintf) and a struct.pack per
  -- message, 1 µs of the 9 µs each message cost Redis with 10,000 rooms.
  local now_text = args[nargs]
  local now = tonumber(now_text)
  local now_packed = struct.pack('<i8', now)
  -- Batches without keys (the common case) skip every step below that
  -- concerns records: no more tables, no more calls.
  local records, ttl, seen
  if nargs > n + 1 then
    local m = tonumber(args[nargs - 1])
    ttl = args[nargs - 2]
    n = n - m
    records, seen = {}, {}
    for j = 1, m do records[tonumber(args[n + j])] = keys[n + j] end
  end
  -- The messages go in runs: those to one chat that follow each other. Each
  -- run reads the chat's top once and stores with one ZADD, and one
  -- SPUBLISH announces it to pulls waiting for the chat
  -- (src/store/subscriber.rs; a sharded channel in the chat's slot, so on
  -- a Cluster only the chat's shard carries it). The caller puts each
  -- chat's messages together; apart, they are still right (a later run of
  -- the chat reads the top an earlier one wrote), only dearer.
  local out, scored = {}, {}
  local i = 1
  while i <= n do
    local key, prev, count = keys[i], nil, 0
    while i <= n and keys[i] == key do
      local record = records and records[i]
      local digest, earlier
      if record then
        digest = fingerprint(args[i])
        -- A key may come several times in one batch (concurrent retries):
        -- `seen` spares a GET of the record written earlier in this call.
        earlier = seen[record] or redis.call('GET', record)
        seen[record] = earlier
      end
      if earlier then
        if string.sub(earlier, 9) == digest then
          out[i] = {(struct.unpack('<i8', earlier))}
        else
          out[i] = {ok = 'REUSED'}
        end
      else
        if prev == nil then
          -- The top member carries its send_time (see below): reading it
          -- there spares Redis printing the score as a double and Lua
          -- parsing it back. The indexes as strings: Redis 7.0 formats a
          -- Lua number argument with snprintf('%.17g').
          local top = redis.call('ZRANGE', key, '-1', '-1')[1]
          prev = top and struct.unpack('<i8', top, 2) or -1
        end
        local t, score, packed = now, now_text, now_packed
        if prev >= now then
          t = prev + 1
          -- The score as an integer string: Redis would print a Lua number
          -- with %.17g, which costs more than the ZADD.
          score, packed = string.format('%d', t), struct.pack('<i8', t)
        end
        prev = t
        -- Prepend field 1 (send_time, sfixed64: tag 0x09 + 8 bytes
        -- little-endian): the member becomes unique and carries its own
        -- send_time.
        scored[count + 1] = score
        scored[count + 2] = '\9' .. packed .. args[i]
        count = count + 2
        out[i] = t
        if record then
          local value = packed .. digest
          redis.call('SET', record, value, 'EX', ttl)
          seen[record] = value
        end
      end
      i = i + 1
    end
    if count > 0 then
      redis.call('ZADD', key, unpack(scored, 1, count))
      if trim then trim(key, prev) end
      redis.call('SPUBLISH', key .. ':new', '')
    end
  end
  return out
end

redis.register_function('im_send', function(keys, args)
  return send_batch(keys, args, nil)
end)
"#,
    include_str!("lifecycle.lua")
);

/// Most messages stored by one `im_send` call.
pub(super) const MAX_SEND_BATCH: usize = 64;

/// `FUNCTION LOAD REPLACE` of the library: run on every new connection, so a
/// restarted Redis, or in a cluster a newly promoted or resharded master,
/// has `im_send`.
pub(super) fn load_library_command() -> Bytes {
    command::encode(&[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()])
}

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub connections: usize,
    pub queue: usize,
    pub max_in_flight: usize,
    /// A command not answered within this is reported as unavailable.
    pub timeout: Duration,
    /// Bytes of commands queued per connection, and of sends waiting for
    /// the batcher; more are refused as overloaded.
    pub max_queued_bytes: usize,
    /// A send is acknowledged only once this many replicas have it (0: at once).
    pub wait_replicas: u32,
    /// How long an idempotency key is remembered (whole seconds, at least 1).
    pub idempotency_ttl: Duration,
    /// How long a chat's change log keeps an edit or delete.
    pub change_log_retention: Duration,
    /// How much history a chat keeps.
    pub retention: Retention,
}

impl RedisOptions {
    /// What a batch of sends is written as: the `im_send` call, followed in
    /// the same write by `WAIT` when replicas must confirm it (no extra
    /// round trip). WAIT gets half the Redis timeout, so that its "not
    /// enough replicas" answer arrives before the caller gives up.
    pub(super) fn send_request(&self, fcall: Bytes) -> RespRequest {
        let request = RespRequest::from(fcall);
        match self.wait_replicas {
            0 => request,
            n => request.then_wait(n, (self.timeout.as_millis() as u64 / 2).max(1)),
        }
    }
}

/// The `im_send` reply of a request built by [`RedisOptions::send_request`]:
/// with a WAIT, fewer replicas than asked for make the whole batch
/// unavailable ("maybe stored": it is on the master, not confirmed copied).
/// An error reply (a redirection) is returned as it is.
pub(super) fn without_wait(
    reply: Result<Reply, Error>,
    wait_replicas: u32,
) -> Result<Reply, Error> {
    if wait_replicas == 0 {
        return reply;
    }
    let Reply::Array(mut replies) = reply? else {
        return Err(Error::Unavailable);
    };
    let (Some(wait), Some(fcall)) = (replies.pop(), replies.pop()) else {
        return Err(Error::Unavailable);
    };
    match (fcall, wait) {
        (fcall @ Reply::Error(_), _) => Ok(fcall),
        (fcall, Reply::Integer(n)) if n >= i64::from(wait_replicas) => Ok(fcall),
        _ => Err(Error::Unavailable),
    }
}

pub struct RedisStore {
    pool: Arc<Pool<RespProtocol>>,
    /// Sends waiting for the [`Batcher`].
    sends: SendQueue,
    /// Pulls started by [`RedisStore::start_pull`], waiting for [`run_pulls`].
    pulls: mpsc::Sender<QueuedPull>,
    timeout: Duration,
    /// Pulls waiting for new messages, fed by the process's subscriber
    /// (src/store/subscriber.rs); `None`: pulls never wait.
    hub: Option<Arc<Hub>>,
    /// The node's metrics (commands, errors, timeouts, in flight).
    stats: Arc<PeerStats>,
    /// The change log's retention, as `im_edit` / `im_delete` take it.
    keep: String,
    /// How edits and deletes are written (`WAIT` after them, as after sends).
    options: RedisOptions,
}

pub(super) struct QueuedSend {
    pub(super) key: String,
    pub(super) member: Vec<u8>,
    /// When the caller stops waiting (and answers 503): a send still queued
    /// then must never be written.
    pub(super) deadline: Instant,
    /// With an idempotency key, its record.
    pub(super) record: Option<IdempotencyRecord>,
    pub(super) reply: SendWaiter,
}

/// Who is told how a queued send ended.
pub(super) enum SendWaiter {
    /// A caller awaiting it ([`SendQueue::send`]).
    Caller(oneshot::Sender<Result<Sent, Error>>),
    /// A callback ([`SendQueue::start`]).
    Then(Completion),
}

impl SendWaiter {
    /// Whether nobody waits any more (a callback always runs).
    fn is_closed(&self) -> bool {
        match self {
            SendWaiter::Caller(reply) => reply.is_closed(),
            SendWaiter::Then(_) => false,
        }
    }

    pub(super) fn answer(self, outcome: Result<Sent, Error>) {
        match self {
            SendWaiter::Caller(reply) => {
                let _ = reply.send(outcome);
            }
            SendWaiter::Then(done) => done.complete(outcome),
        }
    }
}

impl QueuedSend {
    /// What it counts against [`SendQueue`]'s byte budget.
    fn bytes(&self) -> usize {
        self.key.len() + self.member.len() + self.record.as_ref().map_or(0, |r| r.key.len())
    }
}

#[derive(Clone)]
pub(super) struct IdempotencyRecord {
    key: String,
    /// Seconds, as `SET ... EX` takes them.
    ttl: String,
}

/// The key of a chat's sorted set.
pub fn chat_key(chat: &str) -> String {
    format!("im:{{{chat}}}")
}

/// The key of the record of an idempotency key used in a chat:
/// `im:idem:<chat length>:{<chat>}:<key>`. The chat is the hash tag, as in
/// [`chat_key`], so the record is in the chat's slot. The length makes the
/// name unambiguous (a chat may contain `}:`, a key may too), and the prefix
/// keeps it apart from every chat key (`im:{`).
pub fn idempotency_record_key(chat: &str, key: &str) -> String {
    format!("im:idem:{}:{{{chat}}}:{key}", chat.len())
}

/// Whether the record of `key` in `chat` hashes to the chat's slot, as
/// `im_send` needs (one call's keys must share a slot on a cluster). It does
/// unless the chat's name starts with `}`: then `im:{}…` has an empty hash
/// tag, the whole key is hashed, and no record key can follow it there.
pub fn record_shares_the_chat_slot(chat: &str, key: &str) -> bool {
    let slot = |k: &str| redis_protocol::redis_keyslot(k.as_bytes());
    slot(&chat_key(chat)) == slot(&idempotency_record_key(chat, key))
}

/// A keyed send whose first attempt failed without an answer is sent once
/// more after this pause, which lets the connection reconnect (its backoff
/// starts at 25 ms), if the Redis timeout leaves room for it.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl RedisStore {
    pub fn new(target: RedisTarget, options: &RedisOptions) -> RedisStore {
        let load_library = load_library_command();
        let mux = MuxOptions {
            name: "redis",
            target: target.to_string(),
            queue: options.queue,
            max_in_flight: options.max_in_flight,
            max_queued_bytes: options.max_queued_bytes,
        };
        let setup = [load_library.clone()];
        let pool = Pool::spawn(
            options.connections,
            || RespProtocol::new(target.clone(), &setup),
            mux,
        );
        let (sends, queue, queued) = SendQueue::new(options);
        let stats = crate::metrics::peer(PeerKind::Redis, &target.to_string());
        let batcher = Batcher {
            pool: pool.clone(),
            queue,
            queued,
            load_library,
            options: options.clone(),
            stats: stats.clone(),
            window: BatchWindow::new(options),
        };
        tokio::spawn(batcher.run());
        let (pulls, pull_queue) = mpsc::channel(options.queue.max(1));
        let retention = options.retention;
        tokio::spawn(run_pulls(
            pool.clone(),
            pull_queue,
            stats.clone(),
            retention,
        ));
        if super::retention::take_sweeper(&retention) {
            tokio::spawn(sweep_standalone(pool.clone(), stats.clone(), retention));
        }
        RedisStore {
            pool,
            sends,
            pulls,
            timeout: options.timeout,
            hub: None,
            stats,
            keep: super::lifecycle::keep_micros(options.change_log_retention),
            options: options.clone(),
        }
    }

    /// Lets pulls wait for new messages announced through `hub`.
    pub fn with_hub(mut self, hub: Arc<Hub>) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Reads one page (a pull that does not wait) and runs `done` with it,
    /// without a task or a timer of its own: see [`run_pulls`]. (A task per
    /// pull is the RPC server's largest allocation; see
    /// [`crate::store::AnyStore::start_send`].)
    pub fn start_pull(&self, query: PullQuery, done: Completion<Page>) {
        let pull = QueuedPull {
            query,
            deadline: Instant::now() + self.timeout,
            done,
        };
        if let Err(refused) = self.pulls.try_send(pull) {
            refused.into_inner().done.complete(Err(Error::Overloaded));
        }
    }

    /// Registers a pull that will wait for `chat`, if pulls may wait.
    pub fn waiter(&self, chat: &str) -> Option<Waiter> {
        self.hub.as_ref().map(|hub| hub.register(chat))
    }

    async fn call(&self, command: Bytes) -> Result<Reply, Error> {
        let deadline = Instant::now() + self.timeout;
        StartedCall::new(&self.pool, &self.stats, command, deadline)
            .reply()
            .await
    }

    /// `PING` on the pipelined connection, within the Redis timeout: whether
    /// Redis answers commands now (`GET /ready`, through the RPC `Ping`).
    pub async fn ping(&self) -> Result<(), String> {
        match self.call(crate::resp::command::encode(&[b"PING"])).await {
            Ok(_) => Ok(()),
            Err(err) => Err(format!("Redis does not answer ({err:?})")),
        }
    }
}

impl super::lifecycle::Runner for RedisStore {
    fn floor(&self) -> i64 {
        self.options.retention.floor(crate::now_micros())
    }

    /// One command; a function call that finds the library missing (a
    /// flushed or restored Redis, or one an older server loaded its
    /// library into) loads it and runs once more: the error came before
    /// the function ran.
    async fn run(&self, command: Bytes, change: bool) -> Result<Reply, Error> {
        if !change {
            return self.call(command).await;
        }
        let wait = self.options.wait_replicas;
        let once = |command: Bytes| async move {
            let deadline = Instant::now() + self.timeout;
            let request = self.options.send_request(command);
            let call = StartedCall::new(&self.pool, &self.stats, request, deadline);
            // `reply` makes an error reply `Internal`; WAIT's shortfall is
            // judged on the raw replies.
            let raw = match call.pending {
                Ok(pending) => tokio::time::timeout_at(deadline, pending.wait())
                    .await
                    .unwrap_or(Err(Error::Timeout)),
                Err(err) => Err(err),
            };
            call.counted.end(outcome(&raw));
            without_wait(raw, wait)
        };
        let reply = once(command.clone()).await;
        let reply = match function_missing(&reply) {
            true => {
                self.call(load_library_command()).await?;
                once(command).await?
            }
            false => reply?,
        };
        match reply {
            Reply::Error(err) => Err(Error::Internal(format!("redis: {err}"))),
            reply => Ok(reply),
        }
    }
}

/// A command written (or queued to be) on the pool, counted in the node's
/// metrics until its reply.
struct StartedCall {
    pending: Result<Pending<Reply>, Error>,
    deadline: Instant,
    counted: PeerCall,
}

impl StartedCall {
    fn new(
        pool: &Pool<RespProtocol>,
        stats: &Arc<PeerStats>,
        command: impl Into<RespRequest>,
        deadline: Instant,
    ) -> StartedCall {
        let counted = stats.call();
        let pending = pool.handle().start_by(command, deadline);
        StartedCall {
            pending,
            deadline,
            counted,
        }
    }

    /// The reply, by the deadline (else `Timeout`); an error reply is
    /// [`Error::from_redis`]'s.
    async fn reply(self) -> Result<Reply, Error> {
        let reply = match self.pending {
            Ok(pending) => tokio::time::timeout_at(self.deadline, pending.wait())
                .await
                .unwrap_or(Err(Error::Timeout)),
            Err(err) => Err(err),
        };
        self.counted.end(outcome(&reply));
        match reply {
            Ok(Reply::Error(err)) => Err(Error::from_redis(&err)),
            reply => reply,
        }
    }
}

/// A pull for [`run_pulls`].
struct QueuedPull {
    query: PullQuery,
    /// Not written after it; unanswered by then, it fails as a timeout.
    deadline: Instant,
    done: Completion<Page>,
}

/// Most pulls one [`run_pulls`] round takes.
const MAX_PULL_ROUND: usize = 64;

/// Starts every pull queued since its last turn on the pipelined
/// connection(s), and hands their pages on from one task per round, in the
/// order they were started (each waits at most until its own deadline): one
/// task per round of pulls instead of one per pull.
async fn run_pulls(
    pool: Arc<Pool<RespProtocol>>,
    mut queue: mpsc::Receiver<QueuedPull>,
    stats: Arc<PeerStats>,
    retention: Retention,
) {
    let mut round = Vec::with_capacity(MAX_PULL_ROUND);
    while let Some(first) = queue.recv().await {
        round.push(first);
        while round.len() < MAX_PULL_ROUND {
            match queue.try_recv() {
                Ok(pull) => round.push(pull),
                Err(_) => break,
            }
        }
        let floor = retention.floor(crate::now_micros());
        let started: Vec<_> = round
            .drain(..)
            .map(|pull| {
                let command = pull_command(&pull.query, floor);
                (
                    StartedCall::new(&pool, &stats, command, pull.deadline),
                    pull,
                )
            })
            .collect();
        tokio::spawn(async move {
            for (call, pull) in started {
                let page = call.reply().await;
                pull.done
                    .complete(page.and_then(|reply| page_from_reply(&pull.query, reply)));
            }
        });
    }
}

/// The process's retention sweep on a standalone Redis (see
/// [`super::retention`]): a pass every [`super::retention::SWEEP_PAUSE`].
async fn sweep_standalone(pool: Arc<Pool<RespProtocol>>, stats: Arc<PeerStats>, keep: Retention) {
    let run = |command: Bytes| {
        let (pool, stats) = (pool.clone(), stats.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            let reply = StartedCall::new(&pool, &stats, command.clone(), deadline)
                .reply()
                .await;
            match reply {
                Err(Error::Internal(why)) if why.contains("Function not found") => {
                    let load = load_library_command();
                    StartedCall::new(&pool, &stats, load, deadline)
                        .reply()
                        .await?;
                    StartedCall::new(&pool, &stats, command, deadline)
                        .reply()
                        .await
                }
                reply => reply,
            }
        }
    };
    loop {
        let removed = super::retention::sweep_node(run, &keep).await;
        if removed > 0 {
            eprintln!("im-server: retention sweep removed {removed} expired messages");
        }
        tokio::time::sleep(super::retention::SWEEP_PAUSE).await;
    }
}

/// How a command ended, for the metrics: an error reply is an error (on a
/// cluster, a redirection too: they are also counted by kind).
pub(super) fn outcome(reply: &Result<Reply, Error>) -> Outcome {
    match reply {
        Ok(Reply::Error(_)) => Outcome::Error,
        Ok(_) => Outcome::Ok,
        Err(Error::Timeout) => Outcome::Timeout,
        Err(_) => Outcome::Error,
    }
}

/// Turns every send queued since the last turn into one `im_send` call.
///
/// Sends arrive in bursts (one read of the RPC connection starts many
/// requests), and a Lua call costs far more than the ZADD inside it:
/// redis-benchmark, 8 messages to one chat per call, stores 238k messages/s
/// against 106k/s one per call. Batches are not waited for: several can be
/// in flight on the pipelined connection (with WAIT, at most a
/// [`BatchWindow`]).
struct Batcher {
    pool: Arc<Pool<RespProtocol>>,
    queue: mpsc::Receiver<QueuedSend>,
    /// Bytes of the sends in `queue`; released as they are taken.
    queued: ByteBudget,
    /// `FUNCTION LOAD REPLACE` of [`LIBRARY`], for a Redis that lost it.
    load_library: Bytes,
    options: RedisOptions,
    stats: Arc<PeerStats>,
    window: BatchWindow,
}

/// How many send batches may be in Redis at once: any number, except with
/// `--redis-wait-replicas`. Redis reads nothing more from a connection
/// blocked in WAIT, so batches pipelined behind one only queue there, each
/// as small as the moment it was cut; held back here instead, the sends that
/// arrive meanwhile go as one batch when a WAIT is answered.
#[derive(Clone)]
pub(super) struct BatchWindow(Option<Arc<Semaphore>>);

impl BatchWindow {
    /// Two batches per connection: one waiting for its replicas while the
    /// next is already written behind it.
    pub(super) fn new(options: &RedisOptions) -> BatchWindow {
        let limit = (options.wait_replicas > 0).then(|| 2 * options.connections.max(1));
        BatchWindow(limit.map(|n| Arc::new(Semaphore::new(n))))
    }

    /// Waits for room for one more batch; held until its reply, which is
    /// in by the batch's deadline (every batch times out then): a stalled
    /// Redis does not keep the window shut past it.
    pub(super) async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.0.as_ref()?.clone().acquire_owned().await.ok()
    }
}

/// Waits for queued sends and takes what is queued (up to
/// [`MAX_SEND_BATCH`]) into `batch`, leaving out sends whose caller has
/// already been answered; false once the queue is closed.
pub(super) async fn next_batch(
    queue: &mut mpsc::Receiver<QueuedSend>,
    queued: &ByteBudget,
    batch: &mut Vec<QueuedSend>,
) -> bool {
    let Some(first) = queue.recv().await else {
        return false;
    };
    let now = Instant::now();
    take(first, now, queued, batch);
    while batch.len() < MAX_SEND_BATCH {
        match queue.try_recv() {
            Ok(send) => take(send, now, queued, batch),
            Err(_) => break,
        }
    }
    true
}

/// Adds `send` to the batch unless its caller has already been answered
/// (timed out, or gone): such a send must never reach Redis, since the
/// caller was told it failed.
fn take(send: QueuedSend, now: Instant, queued: &ByteBudget, batch: &mut Vec<QueuedSend>) {
    queued.release(send.bytes());
    if send.reply.is_closed() {
        return;
    }
    if send.deadline <= now {
        send.reply.answer(Err(Error::Unavailable));
        return;
    }
    batch.push(send);
}

/// The earliest deadline of a batch's sends: written any later, that
/// send's caller would already have been told "failed" and it would be
/// stored all the same.
pub(super) fn batch_deadline(batch: &[QueuedSend]) -> Instant {
    batch
        .iter()
        .map(|s| s.deadline)
        .min()
        .unwrap_or_else(Instant::now)
}

impl Batcher {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_SEND_BATCH);
        loop {
            let entered = self.window.enter().await;
            if !next_batch(&mut self.queue, &self.queued, &mut batch).await {
                return;
            }
            if !batch.is_empty() {
                self.start(&mut batch, entered);
            }
        }
    }

    /// Starts one `im_send` call for `batch` (left empty), answered by a
    /// task of its own.
    fn start(&self, batch: &mut Vec<QueuedSend>, entered: Option<OwnedSemaphorePermit>) {
        let deadline = batch_deadline(batch);
        let request = self.options.send_request(im_send_command(
            batch,
            crate::now_micros(),
            &self.options.retention,
        ));
        let waiters: Vec<_> = batch.drain(..).map(|s| s.reply).collect();
        let handle = self.pool.handle();
        let counted = self.stats.call();
        match handle.start_by(request.clone(), deadline) {
            Ok(pending) => {
                let retry = Retry {
                    handle: handle.clone(),
                    request,
                    deadline,
                    load_library: self.load_library.clone(),
                    wait_replicas: self.options.wait_replicas,
                };
                tokio::spawn(async move {
                    let answered = async { retry.if_function_missing(pending.wait().await).await };
                    // Unanswered at the earliest deadline, the whole batch
                    // fails: its sends do not each keep a timer.
                    let answered = async {
                        tokio::time::timeout_at(deadline, answered)
                            .await
                            .unwrap_or(Err(Error::Unavailable))
                    };
                    let reply = answered.await;
                    drop(entered);
                    // An answer, or its absence, after the earliest
                    // deadline came too late.
                    counted.end(match outcome(&reply) {
                        Outcome::Ok | Outcome::Error if Instant::now() > deadline => {
                            Outcome::Timeout
                        }
                        other => other,
                    });
                    answer_batch(reply, waiters);
                });
            }
            Err(err) => {
                let reply = Err(err);
                counted.end(outcome(&reply));
                answer_batch(reply, waiters)
            }
        }
    }
}

/// What it takes to run a batch again on the connection it went to.
struct Retry {
    handle: Handle<RespProtocol>,
    request: RespRequest,
    deadline: Instant,
    load_library: Bytes,
    wait_replicas: u32,
}

impl Retry {
    /// `reply`, or, if it says the function is missing (the Redis was
    /// flushed or restored without the library), the reply to the same
    /// batch sent again once the library is loaded again. That error comes
    /// before the function would run, so nothing of the batch was stored
    /// and running it again stores nothing twice.
    async fn if_function_missing(self, reply: Result<Reply, Error>) -> Result<Reply, Error> {
        let reply = without_wait(reply, self.wait_replicas);
        if !function_missing(&reply) {
            return reply;
        }
        // One connection runs its commands in order: the load comes first.
        let load = self.handle.start_by(self.load_library, self.deadline)?;
        let again = self.handle.start_by(self.request, self.deadline)?;
        // Held until here: a call whose caller is gone is not written.
        let _ = load.wait().await;
        without_wait(again.wait().await, self.wait_replicas)
    }
}

pub(super) fn function_missing(reply: &Result<Reply, Error>) -> bool {
    matches!(reply, Ok(Reply::Error(err)) if err.contains("Function not found"))
}

/// The one `im_send` call storing `batch` (see [`LIBRARY`] for its
/// arguments; in a cluster every key of it must be in one slot); `now` is
/// the caller's clock in µs. First puts each chat's sends together, in
/// queue order (a stable sort), which `im_send` stores as one run: the
/// caller's waiters must be taken from `batch` after this.
/// A batch without idempotency keys is encoded exactly as before they existed.
/// With retention on, the call is `im_send_keep` with the window first.
pub(super) fn im_send_command(batch: &mut [QueuedSend], now: i64, keep: &Retention) -> Bytes {
    batch.sort_by(|a, b| a.key.cmp(&b.key));
    let (messages, floor) = (keep.messages.to_string(), keep.floor(now).to_string());
    let now = now.to_string();
    // (1-based message index, record) of the keyed sends.
    let keyed: Vec<(String, &IdempotencyRecord)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.record.as_ref().map(|r| ((i + 1).to_string(), r)))
        .collect();
    let count = (batch.len() + keyed.len()).to_string();
    let mut args: Vec<&[u8]> = Vec::with_capacity(4 + 2 * batch.len() + 2 * keyed.len() + 2);
    match keep.is_on() {
        false => args.extend([&b"FCALL"[..], b"im_send", count.as_bytes()]),
        true => args.extend([&b"FCALL"[..], b"im_send_keep", count.as_bytes()]),
    }
    args.extend(batch.iter().map(|s| s.key.as_bytes()));
    args.extend(keyed.iter().map(|(_, r)| r.key.as_bytes()));
    args.extend(batch.iter().map(|s| &s.member[..]));
    let keyed_count = keyed.len().to_string();
    if let Some((_, first)) = keyed.first() {
        args.extend(keyed.iter().map(|(index, _)| index.as_bytes()));
        // One store, one TTL: every record of a batch has the same.
        args.extend([first.ttl.as_bytes(), keyed_count.as_bytes()]);
    }
    args.push(now.as_bytes());
    if keep.is_on() {
        args.extend([messages.as_bytes(), floor.as_bytes()]);
    }
    command::encode(&args)
}

/// Hands each sender of a batch its outcome, or the batch's failure.
pub(super) fn answer_batch(reply: Result<Reply, Error>, waiters: Vec<SendWaiter>) {
    let outcomes = match reply {
        Ok(Reply::Array(items)) if items.len() == waiters.len() => items,
        failed => {
            let err = match failed {
                // Refused whole (OOM: before the function ran), so none of
                // the batch was written.
                Ok(Reply::Error(err)) => Error::from_redis(&err),
                Ok(other) => Error::Internal(format!("im_send returned {other:?}")),
                Err(err) => err,
            };
            for waiter in waiters {
                waiter.answer(Err(err.clone()));
            }
            return;
        }
    };
    for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
        waiter.answer(send_outcome(outcome));
    }
}

/// One message's entry in im_send's reply.
fn send_outcome(reply: Reply) -> Result<Sent, Error> {
    let sent = |send_time, replayed| {
        Ok(Sent {
            send_time,
            replayed,
        })
    };
    match reply {
        Reply::Integer(send_time) => sent(send_time, false),
        Reply::Array(replay) => match replay[..] {
            [Reply::Integer(send_time)] => sent(send_time, true),
            _ => Err(Error::Internal(format!(
                "im_send returned {replay:?} for a message"
            ))),
        },
        Reply::SimpleString(status) if status == "REUSED" => Err(Error::IdempotencyKeyReused),
        other => Err(Error::Internal(format!(
            "im_send returned {other:?} for a message"
        ))),
    }
}

/// A `StoredMessage` without its send_time (im_send prepends it), encoded
/// from the borrowed fields: one allocation, no `String` copies.
pub(super) fn encode_member(text: &str, sender: &str) -> Vec<u8> {
    let mut member = Vec::with_capacity(
        wire::bytes_field_len(stored_message::TEXT, text.len())
            + wire::bytes_field_len(stored_message::SENDER, sender.len()),
    );
    wire::put_bytes_field(&mut member, stored_message::TEXT, text.as_bytes());
    wire::put_bytes_field(&mut member, stored_message::SENDER, sender.as_bytes());
    member
}

/// A `StoredMessage` member, borrowed.
pub(super) struct StoredView<'a> {
    pub(super) send_time: i64,
    pub(super) text: &'a str,
    pub(super) sender: &'a str,
    /// 0: never edited.
    pub(super) edited_at: i64,
}

/// Reads a member; fields it does not know are skipped (a newer writer's).
pub(super) fn read_stored(mut member: &[u8]) -> Result<StoredView<'_>, Malformed> {
    let mut view = StoredView {
        send_time: 0,
        text: "",
        sender: "",
        edited_at: 0,
    };
    while !member.is_empty() {
        match next_field(&mut member)? {
            (stored_message::SEND_TIME, Value::Fixed64(t)) => view.send_time = t as i64,
            (stored_message::TEXT, Value::Bytes(b)) => view.text = text(b)?,
            (stored_message::SENDER, Value::Bytes(b)) => view.sender = text(b)?,
            (stored_message::EDITED_AT, Value::Fixed64(t)) => view.edited_at = t as i64,
            (
                stored_message::SEND_TIME
                | stored_message::TEXT
                | stored_message::SENDER
                | stored_message::EDITED_AT,
                _,
            ) => {
                return Err(Malformed("field of the wrong type"));
            }
            _ => {}
        }
    }
    Ok(view)
}

impl RedisStore {
    /// See [`crate::store::AnyStore::start_send`].
    pub fn start_send(&self, chat: &str, sender: &str, text: &str, done: Completion) {
        self.sends.start(chat, sender, text, done)
    }
}

impl Store for RedisStore {
    async fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        self.sends.send(chat, sender, text, idempotency_key).await
    }

    async fn pull(&self, query: &PullQuery) -> Result<Page, Error> {
        let floor = self.options.retention.floor(crate::now_micros());
        let reply = self.call(pull_command(query, floor)).await?;
        page_from_reply(query, reply)
    }

    async fn edit(
        &self,
        chat: &str,
        send_time: i64,
        text: &str,
        actor: Option<&str>,
    ) -> Result<i64, Error> {
        super::lifecycle::edit(self, chat, send_time, text, actor, &self.keep).await
    }

    async fn delete(
        &self,
        chat: &str,
        send_time: i64,
        actor: Option<&str>,
        admin: bool,
    ) -> Result<(), Error> {
        super::lifecycle::delete(self, chat, send_time, actor, admin, &self.keep).await
    }

    async fn changes(
        &self,
        chat: &str,
        after: i64,
        limit: usize,
    ) -> Result<crate::proto::ChangesResponse, Error> {
        super::lifecycle::changes(self, chat, after, limit, &self.keep).await
    }
}

/// The front of a send batcher, shared by the standalone and cluster
/// stores: the channel, the byte budget of what is in it, and what every
/// send is stored with (timeout, idempotency-record TTL).
pub(super) struct SendQueue {
    sends: mpsc::Sender<QueuedSend>,
    bytes: ByteBudget,
    timeout: Duration,
    /// `EX` of idempotency records, in seconds.
    idempotency_ttl: String,
}

impl SendQueue {
    /// The queue, and the batcher's end of it: the receiver and the budget
    /// it releases as it takes sends.
    pub(super) fn new(
        options: &RedisOptions,
    ) -> (SendQueue, mpsc::Receiver<QueuedSend>, ByteBudget) {
        let (sends, queue) = mpsc::channel(options.queue.max(1));
        let bytes = ByteBudget::new(options.max_queued_bytes);
        let front = SendQueue {
            sends,
            bytes: bytes.clone(),
            timeout: options.timeout,
            idempotency_ttl: options.idempotency_ttl.as_secs().max(1).to_string(),
        };
        (front, queue, bytes)
    }

    /// Stores `(chat, sender, text)` within the timeout. With an idempotency
    /// key, a first attempt whose outcome is unknown (connection lost, maybe
    /// after the write; or not connected) is made once more: the key makes a
    /// second store impossible. Without one, never: the first attempt may
    /// have stored the message.
    pub(super) async fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        let deadline = Instant::now() + self.timeout;
        let key = chat_key(chat);
        let member = encode_member(text, sender);
        let Some(idempotency_key) = idempotency_key else {
            return self.queue(key, member, None, deadline).await;
        };
        let record = IdempotencyRecord {
            key: idempotency_record_key(chat, idempotency_key),
            ttl: self.idempotency_ttl.clone(),
        };
        let first = self
            .queue(key.clone(), member.clone(), Some(record.clone()), deadline)
            .await;
        match first {
            Err(Error::Unavailable | Error::Lost | Error::Timeout)
                if Instant::now() + RETRY_PAUSE < deadline =>
            {
                tokio::time::sleep(RETRY_PAUSE).await;
                self.queue(key, member, Some(record), deadline).await
            }
            other => other,
        }
    }

    /// Queues an un-keyed send; `done` runs with its outcome, by the
    /// timeout at the latest (the batch's reply task times it out).
    pub(super) fn start(&self, chat: &str, sender: &str, text: &str, done: Completion) {
        self.enqueue(QueuedSend {
            key: chat_key(chat),
            member: encode_member(text, sender),
            deadline: Instant::now() + self.timeout,
            record: None,
            reply: SendWaiter::Then(done),
        });
    }

    /// Hands `queued` to the batcher, or answers it `Overloaded` at once.
    fn enqueue(&self, queued: QueuedSend) {
        let bytes = queued.bytes();
        if !self.bytes.add(bytes) {
            return queued.reply.answer(Err(Error::Overloaded));
        }
        if let Err(refused) = self.sends.try_send(queued) {
            self.bytes.release(bytes);
            refused.into_inner().reply.answer(Err(Error::Overloaded));
        }
    }

    /// Queues one send for the batcher and waits for its answer until `deadline`.
    async fn queue(
        &self,
        key: String,
        member: Vec<u8>,
        record: Option<IdempotencyRecord>,
        deadline: Instant,
    ) -> Result<Sent, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(QueuedSend {
            key,
            member,
            deadline,
            record,
            reply: SendWaiter::Caller(reply),
        });
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            // The batcher is gone, or Redis did not answer in time.
            Ok(Err(_)) | Err(_) => Err(Error::Unavailable),
        }
    }
}

/// The range command reading one page (one more than the limit, to learn
/// whether there is more), from `floor` up (the retention window's oldest
/// send_time, inclusive; 0 = the whole chat, the command as it always was).
pub(super) fn pull_command(query: &PullQuery, floor: i64) -> Bytes {
    let key = chat_key(&query.chat);
    let cursor = format!("({}", query.cursor);
    let count = (query.limit + 1).to_string();
    let floor_text = floor.to_string();
    let low: &[u8] = if floor == 0 {
        b"-inf"
    } else {
        floor_text.as_bytes()
    };
    // The cursor is exclusive: "(" makes the bound open; below the floor,
    // the floor is where oldest first starts.
    let (verb, from, to): (&[u8], &[u8], &[u8]) = match (query.reverse, query.cursor) {
        (false, 0) => (b"ZREVRANGEBYSCORE", b"+inf", low),
        (false, _) => (b"ZREVRANGEBYSCORE", cursor.as_bytes(), low),
        (true, c) if c == 0 || c < floor => (b"ZRANGEBYSCORE", low, b"+inf"),
        (true, _) => (b"ZRANGEBYSCORE", cursor.as_bytes(), b"+inf"),
    };
    command::encode(&[
        verb,
        key.as_bytes(),
        from,
        to,
        b"LIMIT",
        b"0",
        count.as_bytes(),
    ])
}

/// The page of `query` from the reply to its [`pull_command`].
pub(super) fn page_from_reply(query: &PullQuery, reply: Reply) -> Result<Page, Error> {
    let Reply::Array(members) = reply else {
        return Err(Error::Internal("range did not return an array".into()));
    };
    let mut page = PageWriter::new(&query.chat, query.limit);
    for member in members {
        let Reply::BulkString(bytes) = member else {
            return Err(Error::Internal("range returned a non-string member".into()));
        };
        let stored = read_stored(&bytes)
            .map_err(|e| Error::Internal(format!("undecodable stored message: {e}")))?;
        if !page.push(
            stored.text,
            stored.sender,
            stored.send_time,
            stored.edited_at,
        ) {
            break;
        }
    }
    Ok(page.finish())
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::StoredMessage;

    /// The key byte of `StoredMessage.send_time` (sfixed64: wire type 1),
    /// which the Lua in [`LIBRARY`] writes as `'\9'` (Lua has no access to
    /// the .proto): checked here against the generated field number.
    const SEND_TIME_KEY: u8 = (stored_message::SEND_TIME << 3) as u8 | 1;
    // One key byte, as the Lua assumes (field numbers up to 15).
    const _: () = assert!(stored_message::SEND_TIME < 16);

    /// `im_send` stores a run of one chat's messages with one read and one
    /// ZADD, so the command puts each chat's sends together, each chat's in
    /// queue order, and the batch (whose waiters are answered in order)
    /// with them.
    #[test]
    fn a_batch_is_grouped_by_chat_in_queue_order() {
        let mut batch: Vec<QueuedSend> = ["b", "a", "b", "a"]
            .iter()
            .enumerate()
            .map(|(i, chat)| QueuedSend {
                key: chat_key(chat),
                member: encode_member(&i.to_string(), "s"),
                deadline: Instant::now(),
                record: None,
                reply: SendWaiter::Caller(oneshot::channel().0),
            })
            .collect();
        let command = im_send_command(&mut batch, 1, &Retention::default());
        let order: Vec<(&str, Vec<u8>)> = batch
            .iter()
            .map(|s| (s.key.as_str(), s.member.clone()))
            .collect();
        let member = |text: &str| encode_member(text, "s");
        assert_eq!(
            order,
            [
                ("im:{a}", member("1")),
                ("im:{a}", member("3")),
                ("im:{b}", member("0")),
                ("im:{b}", member("2")),
            ]
        );
        let text = String::from_utf8_lossy(&command);
        let keys: Vec<&str> = text
            .split("\r\n")
            .filter(|l| l.starts_with("im:"))
            .collect();
        assert_eq!(keys, ["im:{a}", "im:{a}", "im:{b}", "im:{b}"]);
    }

    #[test]
    fn the_lua_prefix_is_the_send_time_field_key() {
        let lua = format!("'\\{SEND_TIME_KEY}' .. packed");
        assert!(
            LIBRARY.contains(&lua),
            "LIBRARY must prefix members with {lua}"
        );
        // `packed` is the send_time as 8 little-endian bytes, both ways.
        for packing in ["struct.pack('<i8', now)", "struct.pack('<i8', t)"] {
            assert!(LIBRARY.contains(packing), "LIBRARY must pack {packing}");
        }
        let lua_read = "struct.unpack('<i8', top, 2)";
        assert!(
            LIBRARY.contains(lua_read),
            "and read the send_time after that one byte"
        );
    }

    /// The member as Redis stores it: im_send's prefix (the send_time's key,
    /// then the send_time as 8 little-endian bytes) before what
    /// `encode_member` wrote.
    fn stored(send_time: i64, text: &str, sender: &str) -> Vec<u8> {
        let mut member = vec![SEND_TIME_KEY];
        member.extend_from_slice(&send_time.to_le_bytes());
        member.extend(encode_member(text, sender));
        member
    }

    #[test]
    fn records_share_their_chat_slot_unless_the_tag_is_empty() {
        for chat in ["room", "a:b", "x}y", "{a}", "ä"] {
            assert!(record_shares_the_chat_slot(chat, "k-1"), "{chat:?}");
        }
        assert!(!record_shares_the_chat_slot("}x", "k-1"));
        assert!(
            !record_shares_the_chat_slot("", "k-1"),
            "empty chats are refused anyway"
        );
    }

    #[test]
    fn members_are_stored_messages() {
        let member = stored(1_795_800_000_000_123, "hi 😀", "kylie");
        let expected = StoredMessage {
            send_time: 1_795_800_000_000_123,
            text: "hi 😀".into(),
            sender: "kylie".into(),
            edited_at: 0,
        };
        assert_eq!(StoredMessage::decode(&member[..]), Ok(expected));
        let view = read_stored(&member).expect("readable");
        assert_eq!(
            (view.send_time, view.text, view.sender),
            (1_795_800_000_000_123, "hi 😀", "kylie")
        );
        assert!(
            read_stored(&member[..member.len() - 1]).is_err(),
            "truncated"
        );
    }
}
