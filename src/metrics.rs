//! Prometheus metrics: counters, gauges and histograms kept so that counting
//! costs nothing measurable on the request path, and their text exposition
//! (format 0.0.4) for `GET /metrics` (served by the gateway:
//! `gateway::metrics_endpoint`).
//!
//! Counting: every fixed metric lives in [`METRICS`], one [`Slot`] per
//! thread (threads take slots in turn, modulo [`SLOTS`]), each slot
//! cache-line aligned so that two shards never write the same line. A count
//! is one relaxed `fetch_add` on the thread's own slot: no lock, no
//! allocation, no lookup by name (labels are enum indexes fixed at compile
//! time). A scrape sums the slots.
//!
//! Per-endpoint metrics (RPC servers, Redis nodes) come and go with
//! discovery and the cluster map: each connection pool owns a
//! [`PeerStats`] handle made when the pool is (one lock, then), counts on
//! it directly, and the handle's series disappear once the pool is dropped
//! (the registry keeps only weak references).

pub mod process;
pub mod text;

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// Per-thread slots. More threads than this share slots (still correct:
/// the counters are atomics), fewer leave some unused.
pub const SLOTS: usize = 16;

/// The HTTP routes counted apart, at most: the gateway's route table
/// names them (`gateway::routes::Label`) and gives each its [`RouteId`];
/// the counters only know their places, and [`render`] their names.
pub const MAX_ROUTES: usize = 16;

/// A `route` label's place in the HTTP counters, below [`MAX_ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteId(pub usize);

/// The statuses the server emits (see `gateway::error`), counted exactly;
/// anything else is counted as `other`, so the label set stays bounded.
const CODES: [&str; 20] = [
    "200", "400", "401", "403", "404", "405", "406", "408", "413", "414", "422", "429", "431",
    "500", "501", "503", "504", "505", "507", "other",
];

fn code_index(status: u16) -> usize {
    match status {
        200 => 0,
        400 => 1,
        401 => 2,
        403 => 3,
        404 => 4,
        405 => 5,
        406 => 6,
        408 => 7,
        413 => 8,
        414 => 9,
        422 => 10,
        429 => 11,
        431 => 12,
        500 => 13,
        501 => 14,
        503 => 15,
        504 => 16,
        505 => 17,
        507 => 18,
        _ => 19,
    }
}

/// RPC methods with their own latency series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcMethod {
    Send,
    Pull,
    Ping,
    Edit,
    Delete,
    Changes,
}

impl RpcMethod {
    const ALL: [RpcMethod; 6] = [
        RpcMethod::Send,
        RpcMethod::Pull,
        RpcMethod::Ping,
        RpcMethod::Edit,
        RpcMethod::Delete,
        RpcMethod::Changes,
    ];
    const fn name(self) -> &'static str {
        match self {
            RpcMethod::Send => "send",
            RpcMethod::Pull => "pull",
            RpcMethod::Ping => "ping",
            RpcMethod::Edit => "edit",
            RpcMethod::Delete => "delete",
            RpcMethod::Changes => "changes",
        }
    }
}

const METHODS: usize = RpcMethod::ALL.len();

/// Gauges: incremented and decremented by [`track`]'s guard, so that a
/// request or connection dropped on any path is counted out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// HTTP requests started and not yet answered.
    HttpInFlight,
    /// Open HTTP connections.
    HttpConnections,
    /// Pulls held waiting for a new message (long poll), in the RPC server.
    WaitingPulls,
    /// Open event streams (SSE), in the gateway.
    OpenStreams,
    /// Open WebSocket connections (`/api/ws`), in the gateway.
    WsConnections,
    /// Chats followed by WebSocket subscriptions, in the gateway.
    WsSubscriptions,
    /// Rate-limit buckets held (send and pull limiters together).
    RateLimitBuckets,
    /// Requests the RPC server is serving.
    RpcServerInFlight,
    /// Open connections to the RPC server.
    RpcServerConnections,
    /// Bytes the embedded store holds, as its limit counts them.
    MemoryStoreBytes,
}

impl Gauge {
    const ALL: [Gauge; 10] = [
        Gauge::HttpInFlight,
        Gauge::HttpConnections,
        Gauge::WaitingPulls,
        Gauge::OpenStreams,
        Gauge::WsConnections,
        Gauge::WsSubscriptions,
        Gauge::RateLimitBuckets,
        Gauge::RpcServerInFlight,
        Gauge::RpcServerConnections,
        Gauge::MemoryStoreBytes,
    ];

    /// Name and help of its series.
    const fn describe(self) -> (&'static str, &'static str) {
        match self {
            Gauge::HttpInFlight => (
                "im_http_requests_in_flight",
                "HTTP requests started and not yet answered.",
            ),
            Gauge::HttpConnections => ("im_http_connections_open", "Open HTTP connections."),
            Gauge::WaitingPulls => (
                "im_pulls_waiting",
                "Pulls held waiting for a new message (long poll).",
            ),
            Gauge::OpenStreams => ("im_streams_open", "Open event streams (SSE)."),
            Gauge::WsConnections => ("im_ws_connections_open", "Open WebSocket connections."),
            Gauge::WsSubscriptions => (
                "im_ws_subscriptions",
                "Chats followed by WebSocket subscriptions.",
            ),
            Gauge::RateLimitBuckets => (
                "im_rate_limit_buckets",
                "Rate-limit buckets held (send and pull limiters together; at most about 100,000 each).",
            ),
            Gauge::RpcServerInFlight => (
                "im_rpc_server_requests_in_flight",
                "Requests the RPC server is serving.",
            ),
            Gauge::RpcServerConnections => (
                "im_rpc_server_connections_open",
                "Open connections to the RPC server.",
            ),
            Gauge::MemoryStoreBytes => (
                "im_memory_store_bytes",
                "Bytes the embedded store holds (messages, tombstones, change logs, idempotency records), as --memory-store-max-bytes counts them.",
            ),
        }
    }
}

const GAUGES: usize = Gauge::ALL.len();

/// Redis Cluster redirections and retries, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirection {
    Moved,
    Ask,
    /// TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN, READONLY: resent later.
    Retry,
}

impl Redirection {
    const ALL: [Redirection; 3] = [Redirection::Moved, Redirection::Ask, Redirection::Retry];
    const fn name(self) -> &'static str {
        match self {
            Redirection::Moved => "moved",
            Redirection::Ask => "ask",
            Redirection::Retry => "retry",
        }
    }
}

/// Upper bounds of the latency buckets, in nanoseconds, and as `le` labels
/// (seconds). From 100 µs (a pull on loopback takes ~0.3 ms) to 10 s
/// (past every timeout).
const BUCKETS_NS: [u64; 15] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];
const BUCKET_LABELS: [&str; 15] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
    "0.25", "0.5", "1", "2.5", "10",
];

/// A latency histogram's share in one slot: per-bucket counts (not
/// cumulative; the last is above every bound) and the sum in nanoseconds.
/// The count is the total of the buckets, so `_count` always equals the
/// `+Inf` bucket.
struct Histogram {
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS_NS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(BUCKETS_NS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// What one thread counts. Aligned to 128 bytes (two cache lines: the
/// adjacent-line prefetcher pairs them) so that slots never share a line.
#[repr(align(128))]
struct Slot {
    http_requests: [[AtomicU64; CODES.len()]; MAX_ROUTES],
    http_duration: [Histogram; MAX_ROUTES],
    http_connections: AtomicU64,
    http_refused: AtomicU64,
    gauges: [AtomicI64; GAUGES],
    rpc_duration: [Histogram; METHODS],
    rpc_server_requests: [AtomicU64; METHODS],
    rpc_server_duration: [Histogram; METHODS],
    redirections: [AtomicU64; Redirection::ALL.len()],
    store_full: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            http_requests: [const { [const { AtomicU64::new(0) }; CODES.len()] }; MAX_ROUTES],
            http_duration: [const { Histogram::new() }; MAX_ROUTES],
            http_connections: AtomicU64::new(0),
            http_refused: AtomicU64::new(0),
            gauges: [const { AtomicI64::new(0) }; GAUGES],
            rpc_duration: [const { Histogram::new() }; METHODS],
            rpc_server_requests: [const { AtomicU64::new(0) }; METHODS],
            rpc_server_duration: [const { Histogram::new() }; METHODS],
            redirections: [const { AtomicU64::new(0) }; Redirection::ALL.len()],
            store_full: AtomicU64::new(0),
        }
    }
}

/// Every fixed metric of the process.
pub struct Metrics {
    slots: [Slot; SLOTS],
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's slot index, given out in turn on first use.
fn slot_index() -> usize {
    THREAD_SLOT.with(|slot| {
        let index = slot.get();
        if index != usize::MAX {
            return index;
        }
        let index = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
        slot.set(index);
        index
    })
}

impl Metrics {
    pub const fn new() -> Metrics {
        Metrics {
            slots: [const { Slot::new() }; SLOTS],
        }
    }

    fn slot(&self) -> &Slot {
        &self.slots[slot_index()]
    }

    /// An HTTP request answered `status` after `elapsed`.
    pub fn http_request(&self, route: RouteId, status: u16, elapsed: Duration) {
        let slot = self.slot();
        slot.http_requests[route.0][code_index(status)].fetch_add(1, Ordering::Relaxed);
        slot.http_duration[route.0].observe(elapsed);
    }

    /// A request refused before it was routed (counted under `route`,
    /// without a duration).
    pub fn http_rejected(&self, route: RouteId, status: u16) {
        self.slot().http_requests[route.0][code_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection accepted (`true`) or refused at the connection limit.
    pub fn http_connection(&self, accepted: bool) {
        let slot = self.slot();
        match accepted {
            true => slot.http_connections.fetch_add(1, Ordering::Relaxed),
            false => slot.http_refused.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// An RPC call (one attempt on one endpoint) ended after `elapsed`.
    pub fn rpc_call(&self, method: RpcMethod, elapsed: Duration) {
        self.slot().rpc_duration[method as usize].observe(elapsed);
    }

    /// The RPC server answered a request after `elapsed`.
    pub fn rpc_served(&self, method: RpcMethod, elapsed: Duration) {
        let slot = self.slot();
        slot.rpc_server_requests[method as usize].fetch_add(1, Ordering::Relaxed);
        slot.rpc_server_duration[method as usize].observe(elapsed);
    }

    pub fn redirection(&self, kind: Redirection) {
        self.slot().redirections[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A send refused because the store is full (Redis OOM).
    pub fn store_full(&self) {
        self.slot().store_full.fetch_add(1, Ordering::Relaxed);
    }

    fn add_gauge(&self, gauge: Gauge, delta: i64) {
        self.slot().gauges[gauge as usize].fetch_add(delta, Ordering::Relaxed);
    }

    fn sum(&self, read: impl Fn(&Slot) -> u64) -> u64 {
        self.slots.iter().map(read).fold(0, u64::wrapping_add)
    }

    fn gauge(&self, gauge: Gauge) -> i64 {
        self.slots
            .iter()
            .map(|s| s.gauges[gauge as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// One histogram summed over the slots: cumulative bucket counts (the
    /// last is `+Inf`, = the count) and the sum in seconds.
    fn histogram(&self, pick: impl Fn(&Slot) -> &Histogram) -> ([u64; BUCKETS_NS.len() + 1], f64) {
        let mut buckets = [0u64; BUCKETS_NS.len() + 1];
        let mut sum_ns = 0u64;
        for slot in &self.slots {
            let h = pick(slot);
            for (total, b) in buckets.iter_mut().zip(&h.buckets) {
                *total += b.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(h.sum_ns.load(Ordering::Relaxed));
        }
        for i in 1..buckets.len() {
            buckets[i] += buckets[i - 1];
        }
        (buckets, sum_ns as f64 / 1e9)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A gauge counted up while the guard lives.
pub struct Tracked(Gauge);

/// Counts one more in `gauge` until the returned guard is dropped.
pub fn track(gauge: Gauge) -> Tracked {
    METRICS.add_gauge(gauge, 1);
    Tracked(gauge)
}

/// Moves `gauge` by `delta` (for amounts, where [`track`] counts things).
pub fn adjust(gauge: Gauge, delta: i64) {
    METRICS.add_gauge(gauge, delta);
}

impl Drop for Tracked {
    fn drop(&mut self) {
        METRICS.add_gauge(self.0, -1);
    }
}

// ---------------------------------------------------------------------------
// Per-endpoint metrics
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerKind {
    /// An RPC server the gateway calls (label `endpoint`).
    Rpc,
    /// A Redis node the RPC server uses (label `node`).
    Redis,
}

/// How a call to a peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused, not written, connection lost, or an error reply.
    Error,
    /// No reply within its deadline.
    Timeout,
    /// The caller stopped waiting (its client went away): neither.
    Abandoned,
}

/// One connection pool's counts for one peer; the pools of every thread for
/// the same peer are summed into one series. Single writer in practice (the
/// owning shard), aligned so that two pools never share a cache line.
#[repr(align(128))]
pub struct PeerStats {
    kind: PeerKind,
    addr: String,
    calls: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    in_flight: AtomicI64,
}

impl std::fmt::Debug for PeerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStats")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .finish()
    }
}

static PEERS: Mutex<Vec<Weak<PeerStats>>> = Mutex::new(Vec::new());

/// A new pool's handle for `addr`, registered for scrapes until dropped.
/// Takes a lock: call once per pool, never per request.
pub fn peer(kind: PeerKind, addr: &str) -> Arc<PeerStats> {
    let stats = Arc::new(PeerStats {
        kind,
        addr: addr.to_string(),
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        in_flight: AtomicI64::new(0),
    });
    let mut peers = PEERS.lock().unwrap_or_else(PoisonError::into_inner);
    peers.retain(|p| p.strong_count() > 0);
    peers.push(Arc::downgrade(&stats));
    stats
}

impl PeerStats {
    /// A call is written (or queued to be): counted, and in flight until
    /// [`ended`](Self::ended).
    pub fn started(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ended(&self, outcome: Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Outcome::Error => self.errors.fetch_add(1, Ordering::Relaxed),
            Outcome::Timeout => self.timeouts.fetch_add(1, Ordering::Relaxed),
            Outcome::Ok | Outcome::Abandoned => 0,
        };
    }

    /// A guard that ends the call when dropped, `Abandoned` unless told
    /// otherwise.
    pub fn call(self: &Arc<Self>) -> PeerCall {
        self.started();
        PeerCall {
            peer: self.clone(),
            outcome: Outcome::Abandoned,
        }
    }
}

/// A call in flight to a peer; see [`PeerStats::call`].
pub struct PeerCall {
    peer: Arc<PeerStats>,
    outcome: Outcome,
}

impl PeerCall {
    /// Ends the call with `outcome`.
    pub fn end(mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for PeerCall {
    fn drop(&mut self) {
        self.peer.ended(self.outcome);
    }
}

/// One peer's counts, summed over the pools of every thread.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerTotals {
    kind: PeerKind,
    addr: String,
    calls: u64,
    errors: u64,
    timeouts: u64,
    in_flight: i64,
}

/// The live peers' totals, by kind then address.
fn peer_totals() -> Vec<PeerTotals> {
    let live: Vec<Arc<PeerStats>> = {
        let mut peers = PEERS.lock().unwrap_or_else(PoisonError::into_inner);
        peers.retain(|p| p.strong_count() > 0);
        peers.iter().filter_map(Weak::upgrade).collect()
    };
    let mut totals: Vec<PeerTotals> = Vec::with_capacity(live.len());
    for p in &live {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let i = totals
            .iter()
            .position(|t| t.kind == p.kind && t.addr == p.addr);
        let total = match i {
            Some(i) => &mut totals[i],
            None => {
                totals.push(PeerTotals {
                    kind: p.kind,
                    addr: p.addr.clone(),
                    calls: 0,
                    errors: 0,
                    timeouts: 0,
                    in_flight: 0,
                });
                let last = totals.len() - 1;
                &mut totals[last]
            }
        };
        total.calls += load(&p.calls);
        total.errors += load(&p.errors);
        total.timeouts += load(&p.timeouts);
        total.in_flight += p.in_flight.load(Ordering::Relaxed);
    }
    totals.sort_by(|a, b| (a.kind, &a.addr).cmp(&(b.kind, &b.addr)));
    totals
}

// ---------------------------------------------------------------------------
// Exposition
// ---------------------------------------------------------------------------

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything, in the text exposition format; `routes` names the HTTP
/// `route` labels, each at its [`RouteId`]'s place.
pub fn render(routes: &[&str]) -> String {
    let mut out = text::Writer::default();
    render_http(&METRICS, routes, &mut out);
    render_rpc(&METRICS, &mut out);
    render_peers(&peer_totals(), &mut out);
    render_redis(&METRICS, &mut out);
    process::render(&mut out);
    out.header("im_build_info", "gauge", "Build information; always 1.");
    out.sample(
        "im_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    out.finish()
}

fn render_http(m: &Metrics, routes: &[&str], out: &mut text::Writer) {
    let name = "im_http_requests_total";
    out.header(
        name,
        "counter",
        "HTTP requests answered, by route and status code.",
    );
    for (r, route) in routes.iter().enumerate().take(MAX_ROUTES) {
        for (c, code) in CODES.iter().enumerate() {
            let n = m.sum(|s| s.http_requests[r][c].load(Ordering::Relaxed));
            // Only the pairs that happened: most of the grid never does.
            if n > 0 {
                out.sample(name, &[("route", route), ("code", code)], n as f64);
            }
        }
    }
    let name = "im_http_request_duration_seconds";
    out.header(
        name,
        "histogram",
        "Time from a request's start to its response being ready, by route.",
    );
    for (r, route) in routes.iter().enumerate().take(MAX_ROUTES) {
        let (buckets, sum) = m.histogram(|s| &s.http_duration[r]);
        out.histogram(name, ("route", route), &BUCKET_LABELS, &buckets, sum);
    }
    let counters = [
        (
            "im_http_connections_accepted_total",
            "HTTP connections accepted.",
            m.sum(|s| s.http_connections.load(Ordering::Relaxed)),
        ),
        (
            "im_http_connections_refused_total",
            "HTTP connections refused at --max-connections (503).",
            m.sum(|s| s.http_refused.load(Ordering::Relaxed)),
        ),
    ];
    for (name, help, n) in counters {
        out.header(name, "counter", help);
        out.sample(name, &[], n as f64);
    }
    for gauge in Gauge::ALL {
        let (name, help) = gauge.describe();
        out.header(name, "gauge", help);
        out.sample(name, &[], m.gauge(gauge) as f64);
    }
}

fn render_rpc(m: &Metrics, out: &mut text::Writer) {
    render_method_histograms(
        m,
        out,
        "im_rpc_call_duration_seconds",
        "Gateway: time of one RPC call attempt until its reply or failure, by method.",
        |s, method| &s.rpc_duration[method as usize],
    );
    let name = "im_rpc_server_requests_total";
    out.header(name, "counter", "RPC server: requests served, by method.");
    for method in RpcMethod::ALL {
        let n = m.sum(|s| s.rpc_server_requests[method as usize].load(Ordering::Relaxed));
        out.sample(name, &[("method", method.name())], n as f64);
    }
    render_method_histograms(
        m,
        out,
        "im_rpc_server_request_duration_seconds",
        "RPC server: time from reading a request to its reply being ready, by method.",
        |s, method| &s.rpc_server_duration[method as usize],
    );
}

/// One latency histogram per RPC method that stores or reads (not Ping).
fn render_method_histograms(
    m: &Metrics,
    out: &mut text::Writer,
    name: &str,
    help: &str,
    pick: impl Fn(&Slot, RpcMethod) -> &Histogram,
) {
    out.header(name, "histogram", help);
    for method in [RpcMethod::Send, RpcMethod::Pull] {
        let (buckets, sum) = m.histogram(|s| pick(s, method));
        out.histogram(
            name,
            ("method", method.name()),
            &BUCKET_LABELS,
            &buckets,
            sum,
        );
    }
}

/// A per-peer family: name suffix, type, meaning, and its value.
type PeerSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PeerTotals) -> f64,
);

fn render_peers(totals: &[PeerTotals], out: &mut text::Writer) {
    for (kind, prefix, label, what) in [
        (PeerKind::Rpc, "im_rpc", "endpoint", "RPC calls to"),
        (PeerKind::Redis, "im_redis", "node", "Redis commands to"),
    ] {
        let peers: Vec<&PeerTotals> = totals.iter().filter(|t| t.kind == kind).collect();
        let series: [PeerSeries; 4] = [
            ("calls_total", "counter", "started", |t| t.calls as f64),
            (
                "errors_total",
                "counter",
                "failed (refused, connection lost, error reply)",
                |t| t.errors as f64,
            ),
            (
                "timeouts_total",
                "counter",
                "not answered within their deadline",
                |t| t.timeouts as f64,
            ),
            (
                "calls_in_flight",
                "gauge",
                "queued or awaiting their reply",
                |t| t.in_flight as f64,
            ),
        ];
        for (suffix, kind, meaning, value) in series {
            let name = format!("{prefix}_{suffix}");
            let help = format!("{what} each {label}: {meaning}.");
            out.header(&name, kind, &help);
            for peer in &peers {
                out.sample(&name, &[(label, &peer.addr)], value(peer));
            }
        }
    }
}

fn render_redis(m: &Metrics, out: &mut text::Writer) {
    let name = "im_redis_redirections_total";
    out.header(
        name,
        "counter",
        "Redis Cluster redirections and retries, by kind (moved, ask, retry).",
    );
    for kind in Redirection::ALL {
        let n = m.sum(|s| s.redirections[kind as usize].load(Ordering::Relaxed));
        out.sample(name, &[("kind", kind.name())], n as f64);
    }
    let name = "im_store_full_total";
    out.header(
        name,
        "counter",
        "RPC server: sends and edits refused because the store is full (Redis OOM at maxmemory, or the embedded store at --memory-store-max-bytes), 507.",
    );
    let n = m.sum(|s| s.store_full.load(Ordering::Relaxed));
    out.sample(name, &[], n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two routes' places (the gateway's labels are not known here).
    const SEND: RouteId = RouteId(0);
    const PULL: RouteId = RouteId(1);

    #[test]
    fn histograms_are_cumulative_and_count_every_observation() {
        let m = Box::new(Metrics::new());
        for us in [50, 100, 101, 3_000, 20_000_000] {
            m.slots[us as usize % SLOTS].http_duration[PULL.0].observe(Duration::from_micros(us));
        }
        let (buckets, sum) = m.histogram(|s| &s.http_duration[PULL.0]);
        // <= 100 µs: 50 and 100 (bounds are inclusive).
        assert_eq!(buckets[0], 2);
        assert_eq!(buckets[1], 3, "101 µs is under 250 µs");
        assert_eq!(buckets[5], 4, "3 ms is under 5 ms");
        assert_eq!(buckets[BUCKETS_NS.len() - 1], 4, "20 s is over 10 s");
        assert_eq!(buckets[BUCKETS_NS.len()], 5, "+Inf holds everything");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        assert!((sum - 20.003251).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn counts_from_any_thread_are_summed() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let threads: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.http_request(SEND, 200, Duration::from_micros(300));
                    }
                    m.http_request(SEND, 299, Duration::ZERO);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("counting thread");
        }
        let sum = |c: usize| m.sum(|s| s.http_requests[SEND.0][c].load(Ordering::Relaxed));
        assert_eq!(sum(code_index(200)), 20_000);
        assert_eq!(sum(code_index(299)), 20, "unknown statuses are `other`");
        assert_eq!(CODES[code_index(299)], "other");
        let (buckets, _) = m.histogram(|s| &s.http_duration[SEND.0]);
        assert_eq!(buckets[BUCKETS_NS.len()], 20_020);
    }

    #[test]
    fn every_listed_code_maps_to_its_own_label() {
        for (i, code) in CODES.iter().enumerate().take(CODES.len() - 1) {
            let status: u16 = code.parse().expect("numeric");
            assert_eq!(code_index(status), i);
        }
    }

    /// What one request costs in counting, measured: everything the
    /// gateway and the RPC server add per pull or send (gauges, three clock
    /// reads, request and latency counts, one RPC call and one Redis
    /// command on their peers' handles), on two threads at once.
    /// `cargo test --release --lib -- --ignored --nocapture counting_cost`
    #[test]
    #[ignore = "a measurement, run by hand in release"]
    fn counting_cost_per_request() {
        const N: u32 = 2_000_000;
        let per_thread = || {
            // Each shard has its own handles.
            let rpc = peer(PeerKind::Rpc, "192.0.2.9:1");
            let redis = peer(PeerKind::Redis, "192.0.2.9:2");
            let start = std::time::Instant::now();
            for _ in 0..N {
                let at = std::time::Instant::now();
                let in_flight = track(Gauge::HttpInFlight);
                rpc.started();
                let served = track(Gauge::RpcServerInFlight);
                let command = redis.call();
                command.end(Outcome::Ok);
                METRICS.rpc_served(RpcMethod::Pull, at.elapsed());
                drop(served);
                rpc.ended(Outcome::Ok);
                METRICS.rpc_call(RpcMethod::Pull, at.elapsed());
                METRICS.http_request(PULL, 200, at.elapsed());
                drop(in_flight);
            }
            start.elapsed() / N
        };
        let threads: Vec<_> = (0..2).map(|_| std::thread::spawn(per_thread)).collect();
        for t in threads {
            let each = t.join().expect("thread");
            eprintln!("counting per request: {each:?}");
            assert!(each < Duration::from_micros(5), "{each:?}");
        }
    }

    #[test]
    fn dropped_peers_leave_the_scrape() {
        let kept = peer(PeerKind::Rpc, "192.0.2.1:1");
        let twin = peer(PeerKind::Rpc, "192.0.2.1:1");
        let gone = peer(PeerKind::Rpc, "192.0.2.2:1");
        kept.call().end(Outcome::Ok);
        twin.call().end(Outcome::Timeout);
        let call = gone.call();
        let find = |addr: &str| peer_totals().into_iter().find(|t| t.addr == addr);
        let total = find("192.0.2.1:1").expect("registered");
        assert_eq!(
            (total.calls, total.errors, total.timeouts, total.in_flight),
            (2, 0, 1, 0),
            "the two pools are one series"
        );
        assert_eq!(find("192.0.2.2:1").map(|t| t.in_flight), Some(1));
        drop((gone, call));
        assert_eq!(find("192.0.2.2:1"), None);
        drop((kept, twin));
        assert_eq!(find("192.0.2.1:1"), None);
    }
}
