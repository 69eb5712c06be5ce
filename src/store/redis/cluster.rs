//! The store on a Redis Cluster: the same keys, members, library, send
//! queue and calls as on one node (see [`super`]), routed by hash slot.
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
//! * What a reply means for its command is [`super::redirect`]'s: a command
//!   proven not to have run is resent, at most [`MAX_REDIRECTIONS`] times
//!   and within the Redis timeout; one that may have run never is (503).
//! * Per-node connections have the standalone store's bounds: a send whose
//!   caller has given up is never written, and queued bytes are capped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::batch::{BatchWindow, answer_batch, batch_deadline, run_batches};
use super::node::{Node, start_reload, sweep_step};
use super::probe::read_slot_map;
use super::queue::{QueuedSend, SendQueue};
use super::redirect::{Failure, Next, after_failure, after_reply};
use super::schema::{chat_key, im_send_command, without_wait};
use super::{RedisEngine, RedisOptions, Route, page_of};
use crate::domain::PullQuery;
use crate::error::Error;
use crate::metrics::METRICS;
use crate::mux::ByteBudget;
use crate::resp::cluster::{SlotMap, key_slot};
use crate::resp::protocol::RespRequest;
use crate::resp::url::{Address, RedisTarget};
use crate::resp::{Reply, command};
use crate::store::retention;
use crate::store::{Completion, Page};

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
    pub(in crate::store) fn owner(&self, slot: u16) -> Option<Arc<str>> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.owner(slot)
            .or_else(|| map.masters().into_iter().next())
            .or_else(|| self.seeds.first().cloned())
    }

    /// Every master of the map (none while no map was read).
    fn map_masters(&self) -> Vec<Arc<str>> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.masters()
    }

    /// Every master of the map; the seeds while no map was read.
    pub(super) fn masters(&self) -> Vec<Arc<str>> {
        let masters = self.map_masters();
        match masters.is_empty() {
            true => self.seeds.clone(),
            false => masters,
        }
    }

    /// How to reach the node at `addr`: its address, the shared credentials.
    pub(in crate::store) fn node_target(&self, addr: &str) -> RedisTarget {
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
        let mut nodes = self.map_masters();
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
    nodes: Mutex<HashMap<Arc<str>, Node>>,
}

impl Router {
    /// The connections to the master at `addr`, opened on first use.
    fn node(&self, addr: &Arc<str>) -> Node {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .entry(addr.clone())
            .or_insert_with(|| {
                let target = self.shared.node_target(addr);
                Node::open(&target, &self.options, "redis cluster node", addr)
            })
            .clone()
    }

    /// Closes the pools of nodes that no longer serve a slot (their tasks
    /// end once the last in-flight command lets go of them).
    fn prune(&self) {
        let masters = self.shared.map_masters();
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.retain(|addr, _| masters.contains(addr));
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
        // Where an ASK redirection sends the next attempt (after `ASKING`).
        let mut asked_to: Option<Arc<str>> = None;
        let mut pause = RETRY_PAUSE;
        let mut reloaded = false;
        for _ in 0..=MAX_REDIRECTIONS {
            let asking = asked_to.is_some();
            let Some(addr) = asked_to.take().or_else(|| self.shared.owner(slot)) else {
                return Err(Error::Unavailable);
            };
            let sent = match asking {
                true => request.clone().asking(),
                false => request.clone(),
            };
            let node = self.node(&addr);
            let handle = node.pool.handle();
            let raw = self.attempt(&node, handle, sent.clone(), deadline).await?;
            let mut reply = without_wait(without_asking(raw, asking), wait_replicas)?;
            let mut next = after_reply(&reply, &addr, reloaded);
            if next == Next::ReloadLibrary {
                reloaded = true;
                let load = start_reload(handle, deadline);
                let again = self.attempt(&node, handle, sent, deadline).await?;
                drop(load);
                reply = without_wait(without_asking(again, asking), wait_replicas)?;
                next = after_reply(&reply, &addr, reloaded);
            }
            if let Some(redirection) = next.redirection() {
                METRICS.redirection(redirection);
            }
            match next {
                Next::Return | Next::ReloadLibrary => return Ok(reply),
                Next::Moved { slot, addr } => {
                    self.shared.patch(slot, &addr);
                    self.request_refresh("MOVED");
                }
                Next::Ask { addr } => asked_to = Some(Arc::from(addr)),
                Next::Retry { refresh } => {
                    if let Some(reason) = refresh {
                        self.request_refresh(reason);
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

    /// Writes `request` on `handle` of `node` (unless `deadline` passes
    /// first) and waits for its reply until `deadline`; a command that got
    /// none may have run, and is never resent.
    async fn attempt(
        self: &Arc<Self>,
        node: &Node,
        handle: &crate::mux::Handle<crate::resp::protocol::RespProtocol>,
        request: RespRequest,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let failure = match node.start_on(handle, request, deadline) {
            Ok(call) => match call.answer().await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(err)) => Failure::Failed(err),
                Err(_elapsed) => Failure::Elapsed,
            },
            Err(err) => Failure::Failed(err),
        };
        let give_up = after_failure(failure);
        if give_up.suspect {
            self.shared.lock_refresh().suspect_until = Some(Instant::now() + SUSPECT_FOR);
        }
        if let Some(reason) = give_up.refresh {
            self.request_refresh(reason);
        }
        Err(give_up.error)
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
    queue: mpsc::Receiver<QueuedSend>,
    queued: ByteBudget,
) {
    // For the closing log line: each batch should cost one `im_send` per
    // distinct slot in it, which tests compare with Redis's own FCALL count.
    let (mut batches, mut slots) = (0u64, 0u64);
    let window = BatchWindow::new(&router.options);
    run_batches(queue, queued, window, |batch, entered| {
        batches += 1;
        slots += start_slot_batches(&router, batch, entered);
    })
    .await;
    crate::logging::info!(
        "cluster store closed after {batches} send batches touching {slots} slots"
    );
}

/// Starts one `im_send` per slot of `batch` (left empty), each in a task
/// of its own; returns how many.
fn start_slot_batches(
    router: &Arc<Router>,
    batch: &mut Vec<QueuedSend>,
    entered: Option<OwnedSemaphorePermit>,
) -> u64 {
    // Shared by the round's calls, one per slot: the round leaves the
    // window when the last of them is answered.
    let entered = entered.map(Arc::new);
    let now = crate::now_micros();
    let groups = split_by_slot(batch);
    let count = groups.len() as u64;
    for (slot, mut group) in groups {
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
    count
}

/// The process's retention sweep on a Cluster: each pass sweeps every
/// master in turn (`SCAN` is per node), on the connections of the thread
/// that started it; a command refused by a node (moved slots) is skipped.
async fn sweep_masters(router: std::sync::Weak<Router>) {
    loop {
        tokio::time::sleep(retention::SWEEP_PAUSE).await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let masters = router.shared.map_masters();
        let mut removed = 0;
        for addr in masters {
            let node = router.node(&addr);
            let run = |command| sweep_step(&node, command);
            removed += retention::sweep_node(run, &router.options.retention).await;
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

/// The store on a Redis Cluster (one per thread).
pub type ClusterStore = RedisEngine<SlotRoute>;

/// Where a cluster store's commands go: the master of the chat's slot.
pub struct SlotRoute(Arc<Router>);

impl ClusterStore {
    /// One thread's store; `shared` is the process's map. Call on the
    /// thread's runtime.
    pub fn new(shared: Arc<ClusterShared>, options: &RedisOptions) -> ClusterStore {
        let router = Arc::new(Router {
            shared,
            options: options.clone(),
            nodes: Mutex::new(HashMap::new()),
        });
        if router.shared.refreshes() == 0 {
            router.request_refresh("start-up");
        }
        let (sends, queue, queued) = SendQueue::new(options);
        tokio::spawn(store_send_batches(router.clone(), queue, queued));
        tokio::spawn(refresh_periodically(Arc::downgrade(&router)));
        if retention::take_sweeper(&options.retention) {
            tokio::spawn(sweep_masters(Arc::downgrade(&router)));
        }
        RedisEngine::with_route(SlotRoute(router), sends, options)
    }
}

impl Route for SlotRoute {
    async fn call(
        &self,
        chat: &str,
        request: RespRequest,
        wait_replicas: u32,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let slot = key_slot(chat_key(chat).as_bytes());
        self.0.execute(slot, request, wait_replicas, deadline).await
    }

    /// A task per pull: the pull may be redirected (and wait between tries).
    fn start_pull(&self, query: PullQuery, deadline: Instant, done: Completion<Page>) {
        let router = self.0.clone();
        tokio::spawn(async move {
            let slot = key_slot(chat_key(&query.chat).as_bytes());
            let floor = router.options.retention.floor(crate::now_micros());
            let request = RespRequest::from(super::schema::pull_command(&query, floor));
            let reply = router.execute(slot, request, 0, deadline).await;
            done.complete(page_of(&query, reply));
        });
    }

    /// `PING` on every master of the map (each in turn, within one Redis
    /// timeout): a cluster answers for every chat only if each of them does.
    async fn ping(&self, deadline: Instant) -> Result<(), String> {
        let masters = self.0.shared.masters();
        if masters.is_empty() {
            return Err("no Redis Cluster master is known yet".into());
        }
        for addr in masters {
            let node = self.0.node(&addr);
            let ping = RespRequest::from(command::encode(&[b"PING"]));
            if let Err(err) = self
                .0
                .attempt(&node, node.pool.handle(), ping, deadline)
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::*;
    use crate::store::redis::queue::SendWaiter;
    use crate::store::redis::schema::encode_member;

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
