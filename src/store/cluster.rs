//! The Redis Cluster store: the same keys, members and `im_send` function as
//! the standalone store ([`super::redis`]), routed by hash slot.
//!
//! * The slot map comes from `CLUSTER SLOTS` and is shared by every thread of
//!   the process ([`ClusterShared`]). A MOVED patches its one slot at once
//!   and asks for a refresh; refreshes are coalesced (one at a time per
//!   process) and rate-limited, so a burst of MOVEDs after a reshard or a
//!   failover costs one `CLUSTER SLOTS`, not one per reply. The map is also
//!   refreshed when a master's connection is lost or a command times out,
//!   every 0.5 s for a while after a timeout (a frozen master's promoted
//!   replica is found without waiting for the next timeout), and every 5 s.
//! * Each thread has one pipelined connection pool (the mux) per master,
//!   opened when first needed (a MOVED may name a node never seen), with
//!   AUTH and `FUNCTION LOAD REPLACE` on every new connection: a master
//!   promoted by failover or given slots by resharding gets the library.
//! * Sends queued together become one `im_send` call per slot (all keys of
//!   an FCALL must be in one slot, so CROSSSLOT cannot happen).
//! * MOVED, ASK, TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN and READONLY
//!   prove the command did not run: it is resent, at most
//!   [`MAX_REDIRECTIONS`] times and within the Redis timeout; so does
//!   `Function not found` (the library is loaded again on that node first).
//!   A lost connection or a timeout may have run it: never resent (503).
//! * Per-node connections have the standalone store's bounds: a send whose
//!   caller has given up is never written, and queued bytes are capped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::redis::{
    BatchWindow, MAX_SEND_BATCH, QueuedSend, RedisOptions, SendQueue, answer_batch, batch_deadline,
    chat_key, function_missing, im_send_command, load_library_command, next_batch, outcome,
    page_from_reply, pull_command, without_wait,
};
use super::{Completion, Page, Sent, Store};
use crate::domain::PullQuery;
use crate::error::Error;
use crate::metrics::{METRICS, Outcome, PeerKind, PeerStats, Redirection};
use crate::mux::{ByteBudget, Handle, MuxOptions, Pool, Stream};
use crate::notify::{Hub, Waiter};
use crate::resp::cluster::{Redirect, SlotMap, classify, is_cluster_info, key_slot};
use crate::resp::protocol::{RespProtocol, RespRequest, decode_reply};
use crate::resp::url::{Address, RedisTarget};
use crate::resp::{Reply, command};

/// Resends of one command after MOVED/ASK/TRYAGAIN/... (what redis-rs and
/// fred default to).
pub const MAX_REDIRECTIONS: usize = 5;
/// First pause before resending after TRYAGAIN, CLUSTERDOWN, ...; doubled
/// each time (20 + 40 + 80 + 160 + 320 ms fit in the default 800 ms
/// Redis timeout).
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// The reason of the refreshes nothing asked for (periodic, or polling a
/// suspect master): logged only when the map changed.
const QUIET_REFRESH: &str = "periodic";
/// At most one map refresh per this, per process.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(250);
/// The map is re-read at least this often, even if nothing went wrong
/// (a failover elsewhere, new nodes).
const PERIODIC_REFRESH: Duration = Duration::from_secs(5);
/// How often the map is re-read while a master is suspected of being
/// frozen, and for how long after its last timeout.
const SUSPECT_REFRESH: Duration = Duration::from_millis(500);
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// `CLUSTER SLOTS` asked of one node during a refresh; a frozen node must
/// not hold the refresh up, the next one is asked.
const REFRESH_TRY_TIMEOUT: Duration = Duration::from_millis(500);

/// What every thread of the process shares: the slot map and the refresh
/// bookkeeping.
pub struct ClusterShared {
    /// The configured seed nodes (`host:port`), asked when no master answers.
    seeds: Vec<Arc<str>>,
    /// Credentials for every node.
    template: RedisTarget,
    map: RwLock<SlotMap>,
    refresh: Mutex<RefreshState>,
    refreshes: AtomicU64,
}

#[derive(Default)]
struct RefreshState {
    running: bool,
    last: Option<Instant>,
    /// Until when a master is suspected of being frozen (a command timed
    /// out): the map is then re-read every [`SUSPECT_REFRESH`], so its
    /// replica's promotion is seen without waiting for another timeout.
    suspect_until: Option<Instant>,
}

impl ClusterShared {
    /// `targets`: the seed nodes (TCP; one or more); `map`: the start-up map
    /// if it could be read.
    pub fn new(targets: &[RedisTarget], map: Option<SlotMap>) -> Result<Arc<Self>, String> {
        let mut seeds = Vec::with_capacity(targets.len());
        for target in targets {
            match &target.address {
                Address::Tcp(addr) => seeds.push(Arc::from(addr.as_str())),
                Address::Unix(_) => return Err("a Redis Cluster is reached over TCP".into()),
            }
            if target.db != 0 {
                return Err(format!(
                    "{target}: a Redis Cluster has only database 0 (SELECT is refused)"
                ));
            }
        }
        let template = targets.first().ok_or("no Redis node given")?.clone();
        let loaded = map.is_some();
        let shared = Arc::new(ClusterShared {
            seeds,
            template,
            map: RwLock::new(map.unwrap_or_default()),
            refresh: Mutex::new(RefreshState::default()),
            refreshes: AtomicU64::new(0),
        });
        if loaded {
            shared.refreshes.fetch_add(1, Ordering::Relaxed);
            shared.lock_refresh().last = Some(Instant::now());
        }
        Ok(shared)
    }

    /// Completed map reads since start-up (including the first).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    fn lock_refresh(&self) -> std::sync::MutexGuard<'_, RefreshState> {
        self.refresh.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where to send a command for `slot`: its master, or, while the map does
    /// not know it, any node (which answers MOVED if it is not the owner).
    pub(super) fn owner(&self, slot: u16) -> Option<Arc<str>> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.owner(slot)
            .or_else(|| map.masters().into_iter().next())
            .or_else(|| self.seeds.first().cloned())
    }

    /// Every master of the map; the seeds while no map was read.
    pub(super) fn masters(&self) -> Vec<Arc<str>> {
        let masters = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .masters();
        match masters.is_empty() {
            true => self.seeds.clone(),
            false => masters,
        }
    }

    /// How to reach the node at `addr`: its address, the shared credentials.
    pub(super) fn node_target(&self, addr: &str) -> RedisTarget {
        RedisTarget {
            address: Address::Tcp(addr.to_string()),
            db: 0,
            ..self.template.clone()
        }
    }

    fn patch(&self, slot: u16, addr: &str) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.set(slot, addr);
    }

    /// Nodes to ask for the map: the known masters, then the seeds.
    fn refresh_candidates(&self) -> Vec<Arc<str>> {
        let mut nodes = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .masters();
        // Start at a different master each time: the first may be the dead one.
        let turn = self.refreshes() as usize;
        if !nodes.is_empty() {
            let len = nodes.len();
            nodes.rotate_left(turn % len);
        }
        for seed in &self.seeds {
            if !nodes.contains(seed) {
                nodes.push(seed.clone());
            }
        }
        nodes
    }
}

/// One thread's side of the cluster: its connections to each master.
struct Router {
    shared: Arc<ClusterShared>,
    options: RedisOptions,
    pools: Mutex<HashMap<Arc<str>, Node>>,
}

/// One master's connections and metrics, for one thread.
#[derive(Clone)]
struct Node {
    pool: Arc<Pool<RespProtocol>>,
    stats: Arc<PeerStats>,
}

impl Router {
    /// The pool of `addr`, opened on first use.
    fn pool(&self, addr: &Arc<str>) -> Node {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools
            .entry(addr.clone())
            .or_insert_with(|| {
                let target = self.shared.node_target(addr);
                let setup = [load_library_command()];
                let mux = MuxOptions {
                    name: "redis cluster node",
                    target: target.to_string(),
                    queue: self.options.queue,
                    max_in_flight: self.options.max_in_flight,
                    max_queued_bytes: self.options.max_queued_bytes,
                };
                let pool = Pool::spawn(
                    self.options.connections,
                    || RespProtocol::new(target.clone(), &setup),
                    mux,
                );
                let stats = crate::metrics::peer(PeerKind::Redis, addr);
                Node { pool, stats }
            })
            .clone()
    }

    /// Closes the pools of nodes that no longer serve a slot (their tasks
    /// end once the last in-flight command lets go of them).
    fn prune(&self) {
        let masters = self
            .shared
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .masters();
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|addr, _| masters.contains(addr));
    }

    /// Asks for a map refresh: at most one runs per process at a time, and
    /// one starts at most every [`MIN_REFRESH_INTERVAL`]. Requests made while
    /// one is due are covered by it.
    fn request_refresh(self: &Arc<Self>, reason: &'static str) {
        self.refresh_if_older(Duration::ZERO, reason);
    }

    fn refresh_if_older(self: &Arc<Self>, age: Duration, reason: &'static str) {
        let delay = {
            let mut state = self.shared.lock_refresh();
            let now = Instant::now();
            if state.running || state.last.is_some_and(|last| now < last + age) {
                return;
            }
            state.running = true;
            state.last.map_or(Duration::ZERO, |last| {
                (last + MIN_REFRESH_INTERVAL).saturating_duration_since(now)
            })
        };
        let router = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            router.refresh(reason).await;
        });
    }

    /// Reads `CLUSTER SLOTS` from the first node that answers and installs it.
    ///
    /// Each node is asked on a connection of its own, not through the pools:
    /// a seed may have become a replica (whose pool cannot load the library),
    /// and a frozen master's pipeline must not hold the refresh up.
    async fn refresh(&self, reason: &'static str) {
        let mut outcome = Err("no node answered CLUSTER SLOTS".to_string());
        for addr in self.shared.refresh_candidates() {
            let target = self.shared.node_target(&addr);
            match tokio::time::timeout(REFRESH_TRY_TIMEOUT, read_slot_map(&target, &addr)).await {
                Ok(Ok(map)) => {
                    outcome = Ok((addr, map));
                    break;
                }
                Ok(Err(err)) => outcome = Err(format!("{addr}: {err}")),
                Err(_elapsed) => outcome = Err(format!("{addr}: no answer in time")),
            }
        }
        let count = match &outcome {
            Ok(_) => self.shared.refreshes.fetch_add(1, Ordering::Relaxed) + 1,
            Err(_) => self.shared.refreshes(),
        };
        match outcome {
            Ok((addr, map)) => {
                let mut current = self
                    .shared
                    .map
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                // Periodic reads are logged only when something moved; the
                // others are rate-limited (a few lines a second at worst).
                if reason != QUIET_REFRESH || !current.same_owners(&map) {
                    crate::logging::info!(
                        "cluster map refresh #{count} ({reason}) from {addr}: {} masters, {} slots unserved",
                        map.masters().len(),
                        map.uncovered()
                    );
                }
                *current = map;
            }
            Err(err) => {
                crate::logging::warning!("cluster map refresh ({reason}) failed"; err = err)
            }
        }
        let mut state = self.shared.lock_refresh();
        state.running = false;
        state.last = Some(Instant::now());
    }

    /// Runs `request` on the master of `slot`, following redirections, and
    /// returns the reply of its (last) command: a redirection or retryable
    /// error never comes back, other error replies do. With `wait_replicas`,
    /// the request ends in a WAIT whose shortfall is `Unavailable`. Nothing
    /// is written after `deadline` (the earliest caller's).
    async fn execute(
        self: &Arc<Self>,
        slot: u16,
        request: RespRequest,
        wait_replicas: u32,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let mut ask: Option<Arc<str>> = None;
        let mut pause = RETRY_PAUSE;
        let mut reloaded = false;
        for _ in 0..=MAX_REDIRECTIONS {
            let asking = ask.is_some();
            let Some(addr) = ask.take().or_else(|| self.shared.owner(slot)) else {
                return Err(Error::Unavailable);
            };
            let sent = if asking {
                request.clone().asking()
            } else {
                request.clone()
            };
            let node = self.pool(&addr);
            let handle = node.pool.handle().clone();
            let stats = &node.stats;
            let reply = self.attempt(&handle, stats, sent.clone(), deadline).await?;
            let mut reply = without_wait(without_asking(reply, asking), wait_replicas);
            if function_missing(&reply) && !reloaded {
                // The node lost the library (flushed, restored): load it
                // and run the same command once more, in order on one
                // connection. The error came before the function ran, so
                // nothing was stored.
                reloaded = true;
                let load = handle.start_by(load_library_command(), deadline);
                let again = self.attempt(&handle, stats, sent, deadline).await?;
                drop(load);
                reply = without_wait(without_asking(again, asking), wait_replicas);
            }
            let reply = reply?;
            let Reply::Error(error) = &reply else {
                return Ok(reply);
            };
            match classify(error, &addr) {
                None => return Ok(reply),
                Some(Redirect::Moved { slot, addr }) => {
                    METRICS.redirection(Redirection::Moved);
                    self.shared.patch(slot, &addr);
                    self.request_refresh("MOVED");
                }
                Some(Redirect::Ask { addr, .. }) => {
                    METRICS.redirection(Redirection::Ask);
                    ask = Some(Arc::from(addr));
                }
                Some(Redirect::Retry { refresh }) => {
                    METRICS.redirection(Redirection::Retry);
                    if refresh {
                        self.request_refresh(retry_reason(error));
                    }
                    if Instant::now() + pause >= deadline {
                        return Err(Error::Unavailable);
                    }
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        Err(Error::Unavailable)
    }

    /// Writes `request` on `handle` (unless `deadline` passes first) and
    /// waits for its reply until `deadline`.
    async fn attempt(
        self: &Arc<Self>,
        handle: &Handle<RespProtocol>,
        stats: &Arc<PeerStats>,
        request: RespRequest,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let counted = stats.call();
        let reply = match handle.start_by(request, deadline) {
            Ok(pending) => tokio::time::timeout_at(deadline, pending.wait()).await,
            Err(err) => Ok(Err(err)),
        };
        counted.end(match &reply {
            Ok(reply) => outcome(reply),
            Err(_elapsed) => Outcome::Timeout,
        });
        match reply {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(Error::Unavailable)) => {
                // Not connected, or the connection broke with the command
                // maybe run: the master may be gone.
                self.request_refresh("connection lost");
                Err(Error::Unavailable)
            }
            // Overloaded, or Timeout: never written.
            Ok(Err(err)) => Err(err),
            // Maybe run: never resent. A master that stopped answering may
            // have been replaced (a stale map after timeouts kept clients
            // on a frozen node: fred #59).
            Err(_elapsed) => {
                self.shared.lock_refresh().suspect_until = Some(Instant::now() + SUSPECT_FOR);
                self.request_refresh("timeout");
                Err(Error::Unavailable)
            }
        }
    }
}

/// For the log line of the refresh a retryable error asked for.
fn retry_reason(error: &str) -> &'static str {
    match error.split_ascii_whitespace().next() {
        Some("READONLY") => "READONLY",
        Some("MASTERDOWN") => "MASTERDOWN",
        _ => "CLUSTERDOWN",
    }
}

/// The replies of a request sent after `ASKING`, without ASKING's own.
fn without_asking(reply: Reply, asking: bool) -> Result<Reply, Error> {
    if !asking {
        return Ok(reply);
    }
    let Reply::Array(mut replies) = reply else {
        return Err(Error::Unavailable);
    };
    if replies.is_empty() {
        return Err(Error::Unavailable);
    }
    replies.remove(0);
    Ok(match replies.len() {
        1 => replies.remove(0),
        _ => Reply::Array(replies),
    })
}

/// Groups a batch by hash slot, keeping each slot's sends in queue order.
/// A batch touches few slots, so a linear search beats a map.
fn split_by_slot(batch: &mut Vec<QueuedSend>) -> Vec<(u16, Vec<QueuedSend>)> {
    let mut groups: Vec<(u16, Vec<QueuedSend>)> = Vec::new();
    for send in batch.drain(..) {
        let slot = key_slot(send.key.as_bytes());
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, group)) => group.push(send),
            None => groups.push((slot, vec![send])),
        }
    }
    groups
}

/// Turns the sends queued since the last turn into one `im_send` per slot,
/// each routed (and redirected) on its own.
async fn store_send_batches(
    router: Arc<Router>,
    mut queue: mpsc::Receiver<QueuedSend>,
    queued: ByteBudget,
) {
    let mut batch = Vec::with_capacity(MAX_SEND_BATCH);
    // For the closing log line: each batch should cost one `im_send` per
    // distinct slot in it, which tests compare with Redis's own FCALL count.
    let (mut batches, mut slots) = (0u64, 0u64);
    let window = BatchWindow::new(&router.options);
    loop {
        // Shared by the round's calls, one per slot: the round leaves the
        // window when the last of them is answered.
        let entered = window.enter().await.map(Arc::new);
        if !next_batch(&mut queue, &queued, &mut batch).await {
            break;
        }
        let now = crate::now_micros();
        batches += 1;
        slots += batch
            .iter()
            .map(|s| key_slot(s.key.as_bytes()))
            .collect::<std::collections::HashSet<_>>()
            .len() as u64;
        for (slot, mut group) in split_by_slot(&mut batch) {
            let deadline = batch_deadline(&group);
            let request = router.options.send_request(im_send_command(
                &mut group,
                now,
                &router.options.retention,
            ));
            let waiters: Vec<_> = group.into_iter().map(|s| s.reply).collect();
            let (router, entered) = (router.clone(), entered.clone());
            tokio::spawn(async move {
                let wait = router.options.wait_replicas;
                // (Over by the deadline: nothing is written after it, and
                // no reply is waited for past it.)
                let reply = router.execute(slot, request, wait, deadline).await;
                drop(entered);
                answer_batch(reply, waiters)
            });
        }
    }
    crate::logging::info!(
        "cluster store closed after {batches} send batches touching {slots} slots"
    );
}

/// The process's retention sweep on a Cluster: each pass sweeps every
/// master in turn (`SCAN` is per node), on the connections of the thread
/// that started it; a command refused by a node (moved slots) is skipped.
async fn sweep_masters(router: std::sync::Weak<Router>) {
    loop {
        tokio::time::sleep(super::retention::SWEEP_PAUSE).await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let masters = router
            .shared
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .masters();
        let mut removed = 0;
        for addr in masters {
            let node = router.pool(&addr);
            let run = |command: bytes::Bytes| {
                let handle = node.pool.handle().clone();
                async move {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    match tokio::time::timeout_at(
                        deadline,
                        handle.start_by(command, deadline)?.wait(),
                    )
                    .await
                    {
                        Ok(Ok(Reply::Error(err))) => Err(Error::Internal(err.to_string())),
                        Ok(reply) => reply,
                        Err(_elapsed) => Err(Error::Timeout),
                    }
                }
            };
            removed += super::retention::sweep_node(run, &router.options.retention).await;
        }
        if removed > 0 {
            eprintln!("im-server: retention sweep removed {removed} expired messages");
        }
    }
}

/// Re-reads the map every [`PERIODIC_REFRESH`], or every
/// [`SUSPECT_REFRESH`] while a master is suspected of being frozen (once
/// per process, whichever thread's turn comes first), and lets go of nodes
/// that serve no slot every 5 s.
async fn refresh_periodically(router: std::sync::Weak<Router>) {
    let mut ticks = tokio::time::interval(MIN_REFRESH_INTERVAL);
    ticks.tick().await;
    for tick in 1u64.. {
        ticks.tick().await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let suspect = {
            let state = router.shared.lock_refresh();
            state
                .suspect_until
                .is_some_and(|until| Instant::now() < until)
        };
        if suspect {
            router.refresh_if_older(SUSPECT_REFRESH, QUIET_REFRESH);
        } else {
            router.refresh_if_older(PERIODIC_REFRESH, QUIET_REFRESH);
        }
        if tick % 20 == 0 {
            router.prune();
        }
    }
}

pub struct ClusterStore {
    router: Arc<Router>,
    sends: SendQueue,
    timeout: Duration,
    /// The change log's retention, as `im_edit` / `im_delete` take it.
    keep: String,
    /// Pulls waiting for new messages (see [`RedisStore`]'s).
    hub: Option<Arc<Hub>>,
}

impl ClusterStore {
    /// One thread's store; `shared` is the process's map. Call on the
    /// thread's runtime.
    pub fn new(shared: Arc<ClusterShared>, options: &RedisOptions) -> ClusterStore {
        let router = Arc::new(Router {
            shared,
            options: options.clone(),
            pools: Mutex::new(HashMap::new()),
        });
        if router.shared.refreshes() == 0 {
            router.request_refresh("start-up");
        }
        let (sends, queue, queued) = SendQueue::new(options);
        tokio::spawn(store_send_batches(router.clone(), queue, queued));
        tokio::spawn(refresh_periodically(Arc::downgrade(&router)));
        if super::retention::take_sweeper(&options.retention) {
            tokio::spawn(sweep_masters(Arc::downgrade(&router)));
        }
        ClusterStore {
            router,
            sends,
            timeout: options.timeout,
            keep: super::lifecycle::keep_micros(options.change_log_retention),
            hub: None,
        }
    }

    /// Lets pulls wait for new messages announced through `hub`.
    pub fn with_hub(mut self, hub: Arc<Hub>) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Registers a pull that will wait for `chat`, if pulls may wait.
    pub fn waiter(&self, chat: &str) -> Option<Waiter> {
        self.hub.as_ref().map(|hub| hub.register(chat))
    }

    /// See [`crate::store::AnyStore::start_send`].
    pub fn start_send(&self, chat: &str, sender: &str, text: &str, done: Completion) {
        self.sends.start(chat, sender, text, done)
    }

    /// `PING` on every master of the map (each in turn, within one Redis
    /// timeout): a cluster answers for every chat only if each of them does.
    pub async fn ping(&self) -> Result<(), String> {
        let masters = self.router.shared.masters();
        if masters.is_empty() {
            return Err("no Redis Cluster master is known yet".into());
        }
        let deadline = Instant::now() + self.timeout;
        for addr in masters {
            let node = self.router.pool(&addr);
            let ping = RespRequest::from(command::encode(&[b"PING"]));
            let handle = node.pool.handle().clone();
            if let Err(err) = self
                .router
                .attempt(&handle, &node.stats, ping, deadline)
                .await
            {
                return Err(format!(
                    "Redis Cluster master {addr} does not answer ({err:?})"
                ));
            }
        }
        Ok(())
    }
}

impl Store for ClusterStore {
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
        let slot = key_slot(chat_key(&query.chat).as_bytes());
        let floor = self.router.options.retention.floor(crate::now_micros());
        let request = RespRequest::from(pull_command(query, floor));
        let deadline = Instant::now() + self.timeout;
        match self.router.execute(slot, request, 0, deadline).await? {
            Reply::Error(err) => Err(Error::from_redis(&err)),
            reply => page_from_reply(query, reply),
        }
    }

    async fn edit(
        &self,
        chat: &str,
        send_time: i64,
        text: &str,
        actor: Option<&str>,
    ) -> Result<i64, Error> {
        let runner = ChatRunner::new(self, chat);
        super::lifecycle::edit(&runner, chat, send_time, text, actor, &self.keep).await
    }

    async fn delete(
        &self,
        chat: &str,
        send_time: i64,
        actor: Option<&str>,
        admin: bool,
    ) -> Result<(), Error> {
        let runner = ChatRunner::new(self, chat);
        super::lifecycle::delete(&runner, chat, send_time, actor, admin, &self.keep).await
    }

    async fn changes(
        &self,
        chat: &str,
        after: i64,
        limit: usize,
    ) -> Result<crate::proto::ChangesResponse, Error> {
        let runner = ChatRunner::new(self, chat);
        super::lifecycle::changes(&runner, chat, after, limit, &self.keep).await
    }
}

/// Runs an edit's or delete's commands on its chat's master (every key of
/// theirs is in the chat's slot), redirections followed.
struct ChatRunner<'a> {
    router: &'a Arc<Router>,
    slot: u16,
    timeout: Duration,
    wait_replicas: u32,
}

impl<'a> ChatRunner<'a> {
    fn new(store: &'a ClusterStore, chat: &str) -> ChatRunner<'a> {
        ChatRunner {
            router: &store.router,
            slot: key_slot(chat_key(chat).as_bytes()),
            timeout: store.timeout,
            wait_replicas: store.router.options.wait_replicas,
        }
    }
}

impl super::lifecycle::Runner for ChatRunner<'_> {
    fn floor(&self) -> i64 {
        self.router.options.retention.floor(crate::now_micros())
    }

    async fn run(&self, command: bytes::Bytes, change: bool) -> Result<Reply, Error> {
        let deadline = Instant::now() + self.timeout;
        // Changes wait for replicas like sends; reads need not.
        let (request, wait) = match change {
            true => (
                self.router.options.send_request(command),
                self.wait_replicas,
            ),
            false => (RespRequest::from(command), 0),
        };
        match self
            .router
            .execute(self.slot, request, wait, deadline)
            .await?
        {
            Reply::Error(err) => Err(Error::Internal(format!("redis: {err}"))),
            reply => Ok(reply),
        }
    }
}

/// What the configured Redis turned out to be at start-up.
pub enum Probe {
    Standalone,
    /// In cluster mode, with the map if `CLUSTER SLOTS` could be read.
    Cluster(Option<SlotMap>),
    /// No node answered.
    Unreachable(String),
}

/// Asks the seed nodes, in order, whether they run in cluster mode
/// (`INFO cluster`), and if so for the slot map.
pub async fn probe(targets: &[RedisTarget]) -> Probe {
    let mut last_error = String::from("no Redis node given");
    for target in targets {
        match probe_one(target).await {
            Ok(probe) => return probe,
            Err(err) => last_error = format!("{target}: {err}"),
        }
    }
    Probe::Unreachable(last_error)
}

async fn probe_one(target: &RedisTarget) -> std::io::Result<Probe> {
    use crate::mux::Protocol as _;
    // Only AUTH: SELECT fails in cluster mode, which is what we ask about.
    let bare = RedisTarget {
        db: 0,
        ..target.clone()
    };
    let stream = RespProtocol::new(bare, &[]).connect().await?;
    let info = ask(&stream, &[b"INFO", b"cluster"]).await?;
    let Reply::BulkString(info) = info else {
        return Err(std::io::Error::other(format!("INFO returned {info:?}")));
    };
    if !is_cluster_info(&info) {
        return Ok(Probe::Standalone);
    }
    let Address::Tcp(addr) = &target.address else {
        return Ok(Probe::Cluster(None));
    };
    let slots = ask(&stream, &[b"CLUSTER", b"SLOTS"]).await?;
    let map = crate::resp::cluster::parse_cluster_slots(&slots, addr)
        .ok()
        .map(|ranges| SlotMap::from_ranges(&ranges));
    Ok(Probe::Cluster(map))
}

/// `CLUSTER SLOTS` of the node at `addr`, on a connection of its own.
async fn read_slot_map(target: &RedisTarget, addr: &str) -> std::io::Result<SlotMap> {
    use crate::mux::Protocol as _;
    let stream = RespProtocol::new(target.clone(), &[]).connect().await?;
    let reply = ask(&stream, &[b"CLUSTER", b"SLOTS"]).await?;
    let ranges =
        crate::resp::cluster::parse_cluster_slots(&reply, addr).map_err(std::io::Error::other)?;
    Ok(SlotMap::from_ranges(&ranges))
}

/// One command, one reply, on a connection of its own.
async fn ask(stream: &Stream, args: &[&[u8]]) -> std::io::Result<Reply> {
    stream.write_all(&command::encode(args)).await?;
    let mut input = BytesMut::new();
    loop {
        if let Some(reply) = decode_reply(&mut input)? {
            return Ok(reply);
        }
        stream.read_some(&mut input).await?;
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::*;
    use crate::store::redis::{SendWaiter, encode_member};

    fn queued(chat: &str, text: &str) -> QueuedSend {
        QueuedSend {
            key: chat_key(chat),
            member: encode_member(text, "s"),
            deadline: Instant::now(),
            record: None,
            reply: SendWaiter::Caller(oneshot::channel().0),
        }
    }

    #[test]
    fn a_batch_splits_into_one_group_per_slot_in_order() {
        // Chats whose slots differ, one of them twice.
        let chats = ["a", "b", "c", "a", "d", "b"];
        let mut batch: Vec<_> = chats
            .iter()
            .enumerate()
            .map(|(i, c)| queued(c, &i.to_string()))
            .collect();
        let mut groups = split_by_slot(&mut batch);
        assert!(batch.is_empty());
        let slots: std::collections::HashSet<u16> = chats
            .iter()
            .map(|c| key_slot(chat_key(c).as_bytes()))
            .collect();
        assert_eq!(groups.len(), slots.len());
        for (slot, group) in &mut groups {
            assert!(
                group.iter().all(|s| key_slot(s.key.as_bytes()) == *slot),
                "one slot per group"
            );
            let command = im_send_command(group, 1, &Default::default());
            assert!(command.starts_with(b"*"));
        }
        let a = groups
            .iter()
            .find(|(slot, _)| *slot == key_slot(b"im:{a}"))
            .map(|(_, g)| g.iter().map(|s| s.member.clone()).collect::<Vec<_>>());
        assert_eq!(
            a,
            Some(vec![encode_member("0", "s"), encode_member("3", "s")]),
            "queue order kept within a slot"
        );
    }

    #[test]
    fn asking_replies_are_dropped() {
        let ok = Reply::SimpleString(Bytes::from_static(b"OK"));
        assert_eq!(
            without_asking(Reply::Array(vec![ok.clone(), Reply::Integer(7)]), true),
            Ok(Reply::Integer(7))
        );
        assert_eq!(
            without_asking(
                Reply::Array(vec![ok, Reply::Integer(7), Reply::Integer(1)]),
                true
            ),
            Ok(Reply::Array(vec![Reply::Integer(7), Reply::Integer(1)]))
        );
        assert_eq!(
            without_asking(Reply::Integer(7), false),
            Ok(Reply::Integer(7))
        );
        assert!(without_asking(Reply::Integer(7), true).is_err());
    }
}
