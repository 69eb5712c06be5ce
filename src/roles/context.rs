//! What the shards share, prepared once before they start: the listeners
//! bound, the store chosen, discovery started, keys read, limits made.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use super::sockets::{Listeners, bind_shared};
use crate::budget::MemoryBudget;
use crate::config::{Config, Role};
use crate::discovery::{self, Registration, Sources, Target};
use crate::gateway::access::Access;
use crate::gateway::held::HeldWork;
use crate::http::server::{ServerOptions, connection_slots};
use crate::rpc::server::RpcServerOptions;
use crate::store::StoreChoice;

/// What every shard shares.
pub(super) struct ShardContext {
    pub config: Config,
    /// The store, when this process runs the RPC server.
    pub store: Option<StoreChoice>,
    /// The RPC server's connection limit, shared by every shard.
    pub rpc_shared: Arc<crate::rpc::server::SharedListener>,
    /// When this process runs the gateway: the RPC servers it calls (kept
    /// current by discovery), and the connection limit.
    pub gateway: Option<(watch::Receiver<Vec<SocketAddr>>, Arc<Semaphore>)>,
    /// The gateway's memory budget for replies held until written, shared
    /// by every shard (`--max-buffered-bytes`).
    pub buffered: Arc<MemoryBudget>,
    /// The gateway's limits on held work, shared by every shard.
    pub held: Arc<HeldWork>,
    /// Where this process's RPC server listens, when it runs one.
    pub rpc_local: Option<SocketAddr>,
    /// Authentication and rate limits, shared by the gateway's shards.
    pub access: Arc<Access>,
    /// The RPC handshake's shared secret (`--rpc-secret-file`), read once.
    pub rpc_secret: Option<Arc<[u8]>>,
}

/// This process's RPC server, before its shards start.
struct RpcSide {
    listener: StdListener,
    store: StoreChoice,
    local: SocketAddr,
}

/// This process's gateway, before its shards start.
struct GatewaySide {
    listener: StdListener,
    endpoints: watch::Receiver<Vec<SocketAddr>>,
    slots: Arc<Semaphore>,
}

/// Binds every listener (once, before the shards start) and chooses the store.
pub(super) fn prepare(config: Config) -> Result<(ShardContext, Listeners), String> {
    let rpc = match config.role {
        Role::Rpc | Role::All => Some(prepare_rpc(&config)?),
        Role::Gateway => None,
    };
    let rpc_local = rpc.as_ref().map(|rpc| rpc.local);
    let gateway = match config.role {
        Role::Gateway | Role::All => Some(prepare_gateway(&config, rpc_local)?),
        Role::Rpc => None,
    };
    let (rpc_listener, store) = match rpc {
        Some(rpc) => (Some(rpc.listener), Some(rpc.store)),
        None => (None, None),
    };
    let (http_listener, gateway) = match gateway {
        Some(side) => (Some(side.listener), Some((side.endpoints, side.slots))),
        None => (None, None),
    };
    let rpc_shared = crate::rpc::server::SharedListener::new(&RpcServerOptions::from(&config));
    let access = Arc::new(super::access::access(&config)?);
    let rpc_secret = rpc_secret(&config)?;
    let buffered = MemoryBudget::new(
        config
            .max_buffered_bytes
            .unwrap_or_else(crate::budget::default_max),
    );
    let held = HeldWork::new(config.max_held_per_client, config.max_held);
    let metrics = super::metrics_listener::bind(&config)?;
    let context = ShardContext {
        config,
        store,
        rpc_shared,
        buffered,
        held,
        gateway,
        rpc_local,
        access,
        rpc_secret,
    };
    let listeners = Listeners {
        rpc: rpc_listener,
        http: http_listener,
        metrics,
    };
    Ok((context, listeners))
}

/// The store, then the RPC listener.
fn prepare_rpc(config: &Config) -> Result<RpcSide, String> {
    let store = super::store_start::start(config)?;
    let (listener, local) = bind_shared(&config.rpc_listen, "rpc")?;
    crate::logging::info!("rpc listening on {local}");
    Ok(RpcSide {
        listener,
        store,
        local,
    })
}

/// The HTTP listener, then discovery of the RPC servers.
fn prepare_gateway(config: &Config, local_rpc: Option<SocketAddr>) -> Result<GatewaySide, String> {
    // Listening before discovery has named a server: until one is
    // known, requests are answered 503 (`Retry-After`), not refused.
    let (listener, local) = bind_shared(&config.http_addr, "http")?;
    let endpoints = rpc_endpoints(config, local_rpc)?;
    crate::logging::info!("http listening on {local}");
    let slots = connection_slots(&ServerOptions::from(config));
    Ok(GatewaySide {
        listener,
        endpoints,
        slots,
    })
}

/// `--rpc-secret-file`, read once.
fn rpc_secret(config: &Config) -> Result<Option<Arc<[u8]>>, String> {
    let Some(path) = &config.rpc_secret_file else {
        return Ok(None);
    };
    crate::logging::info!("rpc connections authenticated with the shared secret in {path}");
    Ok(Some(Arc::from(crate::auth::token_cmd::load_secret(path)?)))
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
pub(super) fn register(context: &ShardContext) -> Result<Option<Registration>, String> {
    let (Some(url), Some(local)) = (&context.config.registry, context.rpc_local) else {
        return Ok(None);
    };
    let registry = discovery::etcd::parse_registry(url)?;
    let advertise = match &context.config.rpc_advertise {
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
