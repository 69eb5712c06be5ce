//! Starting the configured roles: bind once, then run one single-threaded
//! tokio runtime per worker thread ("shard"), each with its own accept loop,
//! its own RPC/Redis connections and its own timers, so that a request is
//! served start to finish on one thread without cross-thread wake-ups.
//! (Measured under wrk: the RPC server used 17 µs of CPU per send on a
//! 2-thread work-stealing runtime and 5 µs on one current-thread runtime.)
//!
//! Shutdown on SIGINT/SIGTERM: the gateway stops accepting, finishes its
//! in-flight requests and closes; only then the RPC server does the same,
//! so the gateway's last requests still find it.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::auth::{Auth, Validation};
use crate::config::{Config, Role};
use crate::discovery::{self, Registration, Sources, Target};
use crate::gateway::Gateway;
use crate::gateway::access::Access;
use crate::http::server::{ServerOptions, connection_slots};
use crate::notify::Hub;
use crate::rpc::balanced::BalancedClient;
use crate::rpc::client::RpcClientOptions;
use crate::rpc::server::RpcServerOptions;
use crate::store::memory::MemoryStore;
use crate::store::redis::{ClusterShared, Probe, RedisOptions, probe};
use crate::store::{StoreChoice, subscriber};

/// What every shard shares.
struct Plan {
    config: Config,
    /// The store, when this process runs the RPC server.
    store: Option<StoreChoice>,
    /// The RPC server's connection limit, shared by every shard.
    rpc_slots: Arc<Semaphore>,
    /// When this process runs the gateway: the RPC servers it calls (kept
    /// current by discovery), and the connection limit.
    gateway: Option<(watch::Receiver<Vec<SocketAddr>>, Arc<Semaphore>)>,
    /// The gateway's memory budget for replies held until written, shared
    /// by every shard (`--max-buffered-bytes`).
    buffered: Arc<crate::budget::MemoryBudget>,
    /// The gateway's limits on held work, shared by every shard.
    held: Arc<crate::gateway::held::HeldWork>,
    /// Where this process's RPC server listens, when it runs one.
    rpc_local: Option<SocketAddr>,
    /// Authentication and rate limits, shared by the gateway's shards.
    access: Arc<Access>,
    /// The RPC handshake's shared secret (`--rpc-secret-file`), read once.
    rpc_secret: Option<Arc<[u8]>>,
}

/// One shard's listening sockets. The RPC and HTTP ones are each shard's
/// own socket on the shared port (`SO_REUSEPORT`), so the kernel spreads
/// new connections over the shards by a hash of their addresses. Shards
/// that shared one socket (duplicated descriptors) raced to accept, and the
/// first awake took them all: `wrk -c100` against two shards landed every
/// connection on one of them in 3 runs of 5 (one thread serving all HTTP,
/// 41-47k sends/s with 10,000 rooms; 51k/s when they were split). New
/// connections are refused once every shard has closed its socket.
#[derive(Default)]
struct Listeners {
    rpc: Option<StdListener>,
    http: Option<StdListener>,
    /// `--metrics-addr`: served by one shard only (scrapes are rare).
    metrics: Option<StdListener>,
}

impl Listeners {
    /// Every listener but the metrics one, which only the last shard takes.
    fn try_clone(&self) -> Result<Listeners, String> {
        let dup = |l: &Option<StdListener>| -> Result<Option<StdListener>, String> {
            l.as_ref()
                .map(|l| {
                    l.local_addr()
                        .and_then(shared_port_listener)
                        .map_err(|e| format!("cannot open a shard's listener: {e}"))
                })
                .transpose()
        };
        Ok(Listeners {
            rpc: dup(&self.rpc)?,
            http: dup(&self.http)?,
            metrics: None,
        })
    }
}

/// Runs the configured role(s) until SIGINT or SIGTERM, then shuts down
/// gracefully.
pub fn run(mut config: Config) -> Result<(), String> {
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    // Installed before anything starts: a SIGTERM during start-up (a script
    // that stops a server it has just started) is then a graceful shutdown
    // once the roles are up, exit status 0, instead of the default action
    // that killed the process (status 143).
    let mut signals = {
        let _runtime = control.enter();
        ShutdownSignals::install()
    };
    let files = crate::rlimit::raise_open_files_limit();
    let shards = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    match files {
        Some(files) => {
            crate::logging::info!("open-file limit {files}");
            fit_open_files(&mut config, files, shards);
        }
        None => crate::logging::warning!("could not read the open-file limit"),
    }
    let (plan, listeners) = plan(config)?;
    let registration = register(&plan)?;
    let plan = Arc::new(plan);
    let (stop_gateway, gateway_stopping) = watch::channel(false);
    let (stop_rpc, rpc_stopping) = watch::channel(false);
    let (gateway_drained, mut gateway_drains) = mpsc::channel::<()>(shards);
    // A shard that cannot start ends the process instead of leaving it half up.
    let (failed, mut failures) = mpsc::channel::<String>(shards);
    let mut threads = Vec::with_capacity(shards);
    let mut listeners = Some(listeners);
    for shard in 0..shards {
        // The last shard takes the original descriptors.
        let own = match (shard + 1 == shards, &mut listeners) {
            (true, spare) => spare.take().unwrap_or_default(),
            (false, Some(spare)) => spare.try_clone()?,
            (false, None) => Listeners::default(),
        };
        let plan = plan.clone();
        let gateway_stopping = gateway_stopping.clone();
        let rpc_stopping = rpc_stopping.clone();
        let gateway_drained = gateway_drained.clone();
        let failures = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("im-shard-{shard}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"));
                let result = runtime.and_then(|runtime| {
                    runtime.block_on(run_shard(
                        &plan,
                        own,
                        gateway_stopping,
                        rpc_stopping,
                        gateway_drained,
                    ))
                });
                if let Err(err) = &result {
                    let _ = failures.try_send(err.clone());
                }
                result
            })
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        threads.push(thread);
    }
    drop(gateway_drained);

    control.block_on(async {
        tokio::select! {
            _ = signals.recv() => {}
            Some(err) = failures.recv() => return Err(err),
        }
        crate::logging::info!("shutting down: draining in-flight requests");
        // Out of the registry first, so that gateways stop choosing this
        // server (GOAWAY tells those already connected).
        if let Some(registration) = registration {
            registration.deregister();
        }
        let _ = stop_gateway.send(true);
        // Every shard reports once its gateway has drained (or it has none).
        while gateway_drains.recv().await.is_some() {}
        let _ = stop_rpc.send(true);
        Ok(())
    })?;
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => return Err("a worker thread panicked".into()),
        }
    }
    crate::logging::info!("stopped");
    Ok(())
}

/// Lowers the connection limits left at their defaults until the
/// descriptors they can take fit in `files` (issue 20, item 10: under
/// `nofile 1024` the defaults allowed 10,000 + 1,024 connections, and 1,100
/// idle RPC connections took every descriptor, so HTTP `/ping` went
/// unanswered). What is free after the fixed needs is split 3:1 between
/// HTTP and RPC connections in `all`; a limit that was given is kept, and
/// if the given ones still do not fit, a warning says so.
fn fit_open_files(config: &mut Config, files: u64, shards: usize) {
    let needed = descriptors_needed(config, shards);
    if needed <= files {
        return;
    }
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    let (http_given, rpc_given) = (
        config.was_given("--max-connections"),
        config.was_given("--max-rpc-connections"),
    );
    let mut fixed = config.clone();
    fixed.max_connections = 0;
    fixed.max_rpc_connections = 0;
    let free = files.saturating_sub(descriptors_needed(&fixed, shards) as usize);
    let (http, rpc) = match config.role {
        Role::All => match (http_given, rpc_given) {
            (false, false) => (free - free / 4, free / 4),
            (true, _) => (0, free.saturating_sub(config.max_connections)),
            (false, true) => (free.saturating_sub(config.max_rpc_connections), 0),
        },
        Role::Gateway => (free, 0),
        Role::Rpc => (0, free),
    };
    // Never below a few: a limit of 0 would refuse everyone.
    if !http_given && config.role != Role::Rpc {
        config.max_connections = config.max_connections.min(http.max(16));
    }
    if !rpc_given && config.role != Role::Gateway {
        config.max_rpc_connections = config.max_rpc_connections.min(rpc.max(16));
    }
    if !http_given || !rpc_given {
        crate::logging::info!(
            "connection limits lowered to fit the open-file limit {files}: --max-connections {}, --max-rpc-connections {} (raise `ulimit -n` for more)",
            config.max_connections,
            config.max_rpc_connections
        );
    }
    let needed = descriptors_needed(config, shards);
    if needed as usize > files {
        crate::logging::warning!(
            "the connection limits can take {needed} descriptors, over the open-file limit {files}: lower --max-connections / --max-rpc-connections or raise `ulimit -n` (see docs/operations.md, Descriptor budget)"
        );
    }
}

/// Descriptors the configured limits allow this process to hold at once:
/// the connection limits of the roles it runs, every shard's pooled
/// connections, and a margin for listeners, epoll and the runtime's own.
fn descriptors_needed(config: &Config, shards: usize) -> u64 {
    let (gateway, rpc) = match config.role {
        Role::All => (true, true),
        Role::Gateway => (true, false),
        Role::Rpc => (false, true),
    };
    let mut needed = 64 + 4 * shards;
    if gateway {
        needed += config.max_connections + shards * config.rpc_connections;
    }
    if rpc {
        needed += config.max_rpc_connections;
        if config.redis_url.is_some() {
            needed += shards * config.redis_connections;
        }
    }
    needed as u64
}

/// Binds every listener (once, before the shards start) and chooses the store.
fn plan(config: Config) -> Result<(Plan, Listeners), String> {
    let rpc = match config.role {
        Role::Rpc | Role::All => {
            let store = match &config.redis_url {
                Some(url) => redis_store(url, config.redis_timeout())?,
                None => {
                    crate::logging::info!(
                        "store: embedded memory store (no Redis URL configured; messages are lost on exit; set REDIS_URL or --redis to use Redis)"
                    );
                    {
                        let store = Arc::new(
                            MemoryStore::new(config.idempotency_ttl)
                                .with_change_log_retention(config.change_log_retention)
                                .with_retention(retention(&config)),
                        );
                        store.start_sweeper();
                        StoreChoice::Memory(store)
                    }
                }
            };
            let (listener, local) = bind_shared(&config.rpc_listen, "rpc")?;
            crate::logging::info!("rpc listening on {local}");
            Some((listener, store, local))
        }
        Role::Gateway => None,
    };
    let gateway = match config.role {
        Role::Gateway | Role::All => {
            let local_rpc = rpc.as_ref().map(|(_, _, local)| *local);
            // Listening before discovery has named a server: until one is
            // known, requests are answered 503 (`Retry-After`), not refused.
            let (listener, local) = bind_shared(&config.http_addr, "http")?;
            let endpoints = rpc_endpoints(&config, local_rpc)?;
            crate::logging::info!("http listening on {local}");
            let slots = connection_slots(&ServerOptions::from(&config));
            Some((listener, endpoints, slots))
        }
        Role::Rpc => None,
    };
    let rpc_local = rpc.as_ref().map(|(_, _, local)| *local);
    let (rpc_listener, store) = match rpc {
        Some((listener, store, _)) => (Some(listener), Some(store)),
        None => (None, None),
    };
    let (http_listener, gateway) = match gateway {
        Some((listener, target, slots)) => (Some(listener), Some((target, slots))),
        None => (None, None),
    };
    let rpc_slots = crate::rpc::server::connection_slots(&rpc_server_options(&config));
    let access = Arc::new(access(&config)?);
    let rpc_secret = match &config.rpc_secret_file {
        Some(path) => {
            crate::logging::info!("rpc connections authenticated with the shared secret in {path}");
            Some(Arc::from(crate::auth::token_cmd::load_secret(path)?))
        }
        None => None,
    };
    let buffered = crate::budget::MemoryBudget::new(
        config
            .max_buffered_bytes
            .unwrap_or_else(crate::budget::default_max),
    );
    let held = crate::gateway::held::HeldWork::new(config.max_held_per_client, config.max_held);
    let plan = Plan {
        config,
        store,
        rpc_slots,
        buffered,
        held,
        gateway,
        rpc_local,
        access,
        rpc_secret,
    };
    let metrics = match &plan.config.metrics_addr {
        Some(addr) => {
            let (listener, local) = bind(addr, "metrics")?;
            crate::logging::info!("metrics listening on {local}");
            Some(listener)
        }
        None => None,
    };
    let listeners = Listeners {
        rpc: rpc_listener,
        http: http_listener,
        metrics,
    };
    Ok((plan, listeners))
}

/// Starts discovery of the RPC servers the gateway calls: `--rpc`, else the
/// one in this process, plus those in `--registry`.
fn rpc_endpoints(
    config: &Config,
    local_rpc: Option<SocketAddr>,
) -> Result<watch::Receiver<Vec<SocketAddr>>, String> {
    let targets = match (&config.rpc_addr, local_rpc) {
        (Some(list), _) => discovery::parse_targets(list)?,
        (None, Some(local)) => vec![Target::Addr(local)],
        (None, None) => Vec::new(),
    };
    let registry = config
        .registry
        .as_deref()
        .map(discovery::etcd::parse_registry)
        .transpose()?;
    if targets.is_empty() && registry.is_none() {
        return Err("the gateway needs --rpc <addr,...> or --registry <etcd://...>".into());
    }
    let listed = match (&config.rpc_addr, local_rpc) {
        (Some(list), _) => list.clone(),
        (None, Some(local)) => format!("{local} (this process)"),
        (None, None) => "none listed".into(),
    };
    let registered = config
        .registry
        .as_deref()
        .map(|r| format!(", and those registered at {r}"))
        .unwrap_or_default();
    crate::logging::info!("gateway calls rpc servers: {listed}{registered}");
    discovery::start(Sources { targets, registry })
}

/// Registers this process's RPC server in etcd, when it runs one and a
/// registry is configured.
fn register(plan: &Plan) -> Result<Option<Registration>, String> {
    let (Some(url), Some(local)) = (&plan.config.registry, plan.rpc_local) else {
        return Ok(None);
    };
    let registry = discovery::etcd::parse_registry(url)?;
    let advertise = match &plan.config.rpc_advertise {
        Some(addr) => addr
            .parse::<SocketAddr>()
            .map_err(|_| format!("--rpc-advertise {addr:?} is not ip:port"))?,
        None if local.ip().is_unspecified() => {
            return Err(format!(
                "the rpc server listens on the wildcard {local}: give --rpc-advertise <ip:port> to register it"
            ));
        }
        None => local,
    };
    Registration::start(registry, advertise).map(Some)
}

/// `im-server export|import --chat CHAT --redis URL` (see
/// `store::transfer`).
pub fn transfer(name: &str, args: Vec<String>) -> Result<(), String> {
    crate::store::transfer::main(name, args)
}

/// Standalone Redis or a cluster: asks the node(s) (`INFO cluster`) before
/// the shards start. A list of nodes is a cluster; a single node that does
/// not answer is taken as standalone, as before clusters were supported.
fn redis_store(url: &str, timeout: std::time::Duration) -> Result<StoreChoice, String> {
    let targets = crate::resp::url::parse_list(url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let probe = runtime.block_on(async {
        tokio::time::timeout(
            timeout.max(std::time::Duration::from_secs(1)),
            probe(&targets),
        )
        .await
        .unwrap_or_else(|_| Probe::Unreachable("no answer in time".into()))
    });
    let list = targets.len() > 1;
    let map = match (probe, list) {
        (Probe::Cluster(map), _) => map,
        (Probe::Unreachable(err), true) => {
            crate::logging::warning!("no cluster node answers yet; reading the map later"; err = err);
            None
        }
        (Probe::Standalone, true) => {
            return Err(format!(
                "{url}: a list of nodes is for a Redis Cluster, and this Redis is not in cluster mode"
            ));
        }
        (probe, false) => {
            if let Probe::Unreachable(err) = probe {
                crate::logging::warning!("Redis does not answer yet; taking it as standalone"; err = err);
            }
            let target = targets.into_iter().next().ok_or("no Redis node given")?;
            crate::logging::info!("store: Redis at {target}");
            let (hub, requests) = Hub::with_upstream();
            let subscriber = subscriber::run_standalone(target.clone(), hub.clone(), requests);
            crate::discovery::spawn_on_own_runtime("redis subscriber", subscriber)?;
            return Ok(StoreChoice::Redis(target, hub));
        }
    };
    let shared = ClusterShared::new(&targets, map)?;
    let seeds: Vec<String> = targets.iter().map(ToString::to_string).collect();
    crate::logging::info!("store: Redis Cluster via {}", seeds.join(", "));
    let (hub, requests) = Hub::with_upstream();
    let subscriber = subscriber::run_cluster(shared.clone(), hub.clone(), requests);
    crate::discovery::spawn_on_own_runtime("redis subscriber", subscriber)?;
    Ok(StoreChoice::Cluster(shared, hub))
}

fn bind(addr: &str, what: &str) -> Result<(StdListener, SocketAddr), String> {
    let listener = listen(addr).map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure the {what} socket: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the {what} address: {e}"))?;
    Ok((listener, local))
}

/// [`bind`] for an address every shard listens on with a socket of its own
/// ([`Listeners`]). A first bind, without `SO_REUSEPORT`, checks the port
/// is free and resolves port 0: a second server started on a port in use
/// must fail, as it always has, not join the first one's group.
fn bind_shared(addr: &str, what: &str) -> Result<(StdListener, SocketAddr), String> {
    let (probe, local) = bind(addr, what)?;
    drop(probe);
    let listener = shared_port_listener(local)
        .map_err(|e| format!("cannot listen for {what} on {local}: {e}"))?;
    Ok((listener, local))
}

/// A non-blocking listening socket on `local` (an address [`listen`] has
/// bound, so dual-stack if it is the IPv6 wildcard) with `SO_REUSEPORT`.
fn shared_port_listener(local: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if local.is_ipv6() && local.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&local.into())?;
    socket.listen(libc::SOMAXCONN)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A listening socket on `addr`. The IPv6 wildcard (`[::]:port`, the
/// gateway's default) is made dual-stack: `IPV6_V6ONLY` off, whatever the
/// system's `net.ipv6.bindv6only` says, so IPv4 clients connect too and
/// `localhost` works whether it resolves to 127.0.0.1 or ::1. Where the OS
/// has no IPv6 at all, it falls back to `0.0.0.0:port`, and says so.
fn listen(addr: &str) -> std::io::Result<StdListener> {
    let v6 = match addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(v6)) if v6.ip().is_unspecified() => v6,
        _ => return StdListener::bind(addr),
    };
    match dual_stack(SocketAddr::V6(v6)) {
        Err(err) if no_ipv6(&err) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], v6.port()));
            crate::logging::warning!(
                "no IPv6 on this host ({err}); listening on {v4} instead of {addr}"
            );
            StdListener::bind(v4)
        }
        result => result,
    }
}

fn dual_stack(addr: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    // As std's bind does: a restarted server can take its port back while
    // the old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    // The kernel caps it at net.core.somaxconn.
    socket.listen(libc::SOMAXCONN)?;
    Ok(socket.into())
}

/// Errors that mean the host cannot do IPv6 (no kernel support, or IPv6
/// disabled so `::` is not an address it has), as opposed to a port in use.
fn no_ipv6(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Registers this shard's descriptor of a shared listening socket. Every
/// shard polls the same socket; whichever is free accepts, which also
/// balances the load.
fn shard_listener(listener: Option<StdListener>) -> Result<TcpListener, String> {
    let listener = listener.ok_or("a shard is missing its listener")?;
    TcpListener::from_std(listener).map_err(|e| format!("cannot register a listener: {e}"))
}

/// Authentication (its keys read once, at start-up) and rate limits.
fn access(config: &Config) -> Result<Access, String> {
    let secret = config.auth_jwt_secret_file.as_deref();
    let public_key = config.auth_jwt_public_key_file.as_deref();
    let auth = match (secret, public_key) {
        (None, None) => None,
        _ => Some(Auth::new(Validation {
            secret: secret
                .map(crate::auth::token_cmd::load_secret)
                .transpose()?,
            public_key: public_key
                .map(crate::auth::jwt::load_public_key)
                .transpose()?,
            issuer: config.auth_issuer.clone(),
            audience: config.auth_audience.clone(),
            leeway_s: AUTH_LEEWAY_S,
        })),
    };
    if let Some(auth) = &auth {
        let algorithms = match (&auth.rules.secret, &auth.rules.public_key) {
            (Some(_), Some(_)) => "HS256 or EdDSA",
            (Some(_), None) => "HS256",
            _ => "EdDSA",
        };
        crate::logging::info!("authentication on: bearer tokens ({algorithms}) required");
    }
    Ok(Access {
        trusted_proxies: config.trusted_proxies.clone(),
        allowed_origins: config.allowed_origins.clone(),
        ..Access::new(auth, config.rate_limit_send, config.rate_limit_pull)
    })
}

/// Clock skew tolerated on a token's `exp` and `nbf`, in seconds.
const AUTH_LEEWAY_S: i64 = 30;

fn redis_options(config: &Config) -> RedisOptions {
    RedisOptions {
        connections: config.redis_connections,
        queue: config.queue,
        max_in_flight: config.max_in_flight,
        timeout: config.redis_timeout(),
        wait_replicas: config.redis_wait_replicas,
        max_queued_bytes: config.max_queued_bytes,
        idempotency_ttl: config.idempotency_ttl,
        change_log_retention: config.change_log_retention,
        retention: retention(config),
    }
}

/// `--retain-messages` and `--retain-age-s`.
fn retention(config: &Config) -> crate::store::retention::Retention {
    crate::store::retention::Retention {
        messages: config.retain_messages,
        age: config.retain_age,
    }
}

fn rpc_server_options(config: &Config) -> RpcServerOptions {
    RpcServerOptions {
        max_frame: config.max_frame,
        max_in_flight: config.max_in_flight,
        max_output: config.max_rpc_output,
        idle_timeout: config.rpc_idle_timeout,
        max_connections: config.max_rpc_connections,
        // Read once into the plan (`Plan::rpc_secret`).
        secret: None,
        advertise: config.rpc_advertise.clone(),
    }
}

async fn run_shard(
    plan: &Plan,
    listeners: Listeners,
    gateway_stopping: watch::Receiver<bool>,
    rpc_stopping: watch::Receiver<bool>,
    gateway_drained: mpsc::Sender<()>,
) -> Result<(), String> {
    let config = &plan.config;
    // Up until the RPC server stops, so the last scrape sees the drain.
    let metrics = listeners.metrics.map(|listener| {
        let stopping = rpc_stopping.clone();
        tokio::spawn(serve_metrics(
            listener,
            ServerOptions::from(config),
            stopping,
        ))
    });
    // A gateway shard calls its own shard's RPC server without TCP.
    let (local_rpc, local_accept) = match (&plan.store, &plan.gateway, plan.rpc_local) {
        (Some(_), Some(_), Some(addr)) => {
            let (connect, accept) = crate::rpc::local::channel(addr);
            (Some(connect), Some(accept))
        }
        _ => (None, None),
    };
    let rpc = match &plan.store {
        Some(store) => {
            let store = store.open(&redis_options(config));
            let server = crate::rpc::server::serve(
                shard_listener(listeners.rpc)?,
                local_accept,
                Arc::new(store),
                RpcServerOptions {
                    secret: plan.rpc_secret.clone(),
                    ..rpc_server_options(config)
                },
                plan.rpc_slots.clone(),
                rpc_stopping,
                config.drain_timeout,
            );
            Some(tokio::spawn(server))
        }
        None => None,
    };
    if let Some((endpoints, slots)) = &plan.gateway {
        let rpc_options = RpcClientOptions {
            connections: config.rpc_connections,
            timeout: config.rpc_timeout,
            queue: config.queue,
            max_in_flight: config.max_in_flight,
            max_frame: config.max_frame,
            secret: plan.rpc_secret.clone(),
            local: local_rpc,
        };
        let rpc = BalancedClient::new(endpoints.clone(), rpc_options);
        let gateway = Arc::new(
            Gateway::new(
                rpc.clone(),
                plan.access.clone(),
                config.pull_max_wait_ms,
                plan.held.clone(),
                gateway_stopping.clone(),
            )
            .with_ws(crate::gateway::ws::WsOptions::from(config)),
        );
        crate::http::serve(
            shard_listener(listeners.http)?,
            gateway,
            ServerOptions::from(config),
            slots.clone(),
            plan.buffered.clone(),
            gateway_stopping,
        )
        .await;
        // Drained: its RPC connections are closed by this side now, not
        // found closed (and reopened, refused) when the RPC server stops.
        rpc.close();
    }
    drop(gateway_drained);
    if let Some(rpc) = rpc {
        let _ = rpc.await;
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    Ok(())
}

/// Connections the `--metrics-addr` listener serves at once: a few
/// scrapers, not clients.
const METRICS_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `--metrics-addr` with the gateway's HTTP code.
/// The HTTP limits and timeouts are the gateway's.
async fn serve_metrics(
    listener: StdListener,
    http: ServerOptions,
    stopping: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            crate::logging::error!("cannot register the metrics listener"; err = err);
            return;
        }
    };
    let options = ServerOptions {
        max_connections: METRICS_CONNECTIONS,
        drain_timeout: Duration::from_secs(1),
        ..http
    };
    let slots = connection_slots(&options);
    let endpoint = Arc::new(crate::metrics::MetricsEndpoint);
    // Scrapes hold no replies from the RPC server; their output is counted
    // on a budget of their own.
    let budget = crate::budget::MemoryBudget::new(crate::budget::DEFAULT_MAX);
    crate::http::serve(listener, endpoint, options, slots, budget, stopping).await;
}

/// SIGTERM and SIGINT, caught from when they are installed: one that
/// arrives before [`ShutdownSignals::recv`] is polled is kept, not lost.
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Call within a runtime.
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{SignalKind, signal};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn recv(&mut self) {
        let term = async {
            match &mut self.term {
                Some(term) => term.recv().await,
                None => std::future::pending().await,
            }
        };
        let int = async {
            match &mut self.int {
                Some(int) => int.recv().await,
                None => tokio::signal::ctrl_c().await.ok(),
            }
        };
        tokio::select! {
            _ = term => {}
            _ = int => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Parsed;

    fn config(args: &[&str]) -> Config {
        match Config::parse(args.iter().map(|s| s.to_string()), |_| None) {
            Ok(Parsed::Run(config)) => *config,
            _ => panic!("{args:?} should parse"),
        }
    }

    /// Connections queued before anyone accepts: one socket per shard means
    /// each shard's queue gets a share (with a shared socket, the first
    /// shard to accept would drain them all).
    #[test]
    fn each_shard_listener_gets_a_share_of_new_connections() {
        let (first, local) = bind_shared("127.0.0.1:0", "test").expect("binds");
        let shards = Listeners {
            http: Some(first),
            ..Listeners::default()
        };
        let second = shards.try_clone().expect("second shard");
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(local).expect("connects"))
            .collect();
        let drain = |l: &Option<StdListener>| {
            let l = l.as_ref().expect("listener");
            std::iter::from_fn(|| l.accept().ok()).count()
        };
        let (a, b) = (drain(&shards.http), drain(&second.http));
        assert_eq!(a + b, clients.len());
        // All 64 on one socket: a chance of 2^-63 with the kernel's hash.
        assert!(a > 0 && b > 0, "one shard took them all: {a} and {b}");
    }

    #[test]
    fn a_second_server_on_a_port_in_use_fails_to_bind() {
        let (_first, local) = bind_shared("127.0.0.1:0", "test").expect("binds");
        let err = bind_shared(&local.to_string(), "http").expect_err("port in use");
        assert!(err.contains("cannot listen for http"), "{err}");
    }

    #[test]
    fn descriptor_budget_counts_the_limits_of_the_roles_run() {
        let limits = ["--max-connections", "400", "--max-rpc-connections", "512"];
        let all = config(&limits);
        // 400 HTTP + 2 gateway→RPC + 512 RPC + 64 + 2 × 4
        assert_eq!(descriptors_needed(&all, 2), 986);
        let mut gateway_args = vec!["gateway", "--rpc", "h:1"];
        gateway_args.extend(limits);
        assert_eq!(descriptors_needed(&config(&gateway_args), 2), 400 + 2 + 72);
        let mut rpc_args = vec!["rpc", "--redis", "redis://h", "--redis-connections", "3"];
        rpc_args.extend(limits);
        assert_eq!(descriptors_needed(&config(&rpc_args), 2), 512 + 6 + 72);
    }

    #[test]
    fn default_connection_limits_are_lowered_to_fit_the_open_file_limit() {
        // Under 1024 files, `all` with two shards: 1024 - 74 fixed = 950
        // free, split 3:1.
        let mut all = config(&[]);
        fit_open_files(&mut all, 1024, 2);
        assert_eq!((all.max_connections, all.max_rpc_connections), (713, 237));
        assert!(descriptors_needed(&all, 2) <= 1024);
        // A given limit is kept; the other takes what is left.
        let mut given = config(&["--max-rpc-connections", "100"]);
        fit_open_files(&mut given, 1024, 2);
        assert_eq!(
            (given.max_connections, given.max_rpc_connections),
            (850, 100)
        );
        let mut both = config(&["--max-connections", "5000", "--max-rpc-connections", "100"]);
        fit_open_files(&mut both, 1024, 2);
        assert_eq!(both.max_connections, 5000, "given, even if it does not fit");
        // Room enough: nothing changes.
        let mut roomy = config(&[]);
        fit_open_files(&mut roomy, 20_000, 2);
        assert_eq!(roomy.max_connections, 10_000);
        let mut gateway = config(&["gateway", "--rpc", "h:1"]);
        fit_open_files(&mut gateway, 1024, 2);
        assert_eq!(gateway.max_connections, 1024 - 74);
    }
}
