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
//!
//! This module runs the shards and the shutdown; `context` prepares what
//! they share, `sockets` their listeners, `store_start` the store,
//! `access` authentication and rate limits, `open_files` the descriptor
//! budget, `metrics_listener` `--metrics-addr`. The components' options are
//! built from the configuration in `crate::config::components`.

mod access;
mod context;
mod metrics_listener;
mod open_files;
mod sockets;
mod store_start;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::discovery::Registration;
use crate::gateway::Gateway;
use crate::http::server::ServerOptions;
use crate::rpc::balanced::BalancedClient;
use crate::rpc::client::RpcClientOptions;
use crate::rpc::lane::Lane;
use crate::rpc::local::LocalAccept;
use crate::rpc::server::RpcServerOptions;
use crate::store::AnyStore;
use context::ShardContext;
use sockets::{Listeners, shard_listener};

/// Runs the configured role(s) until SIGINT or SIGTERM, then shuts down
/// gracefully.
pub fn run(mut config: Config) -> Result<(), String> {
    let control = crate::runtime::current_thread()?;
    // Installed before anything starts: a SIGTERM during start-up (a script
    // that stops a server it has just started) is then a graceful shutdown
    // once the roles are up, exit status 0, instead of the default action
    // that killed the process (status 143).
    let mut signals = {
        let _runtime = control.enter();
        ShutdownSignals::install()
    };
    let shards = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    open_files::raise_and_fit(&mut config, shards);
    let (context, listeners) = context::prepare(config)?;
    let registration = context::register(&context)?;
    let context = Arc::new(context);
    let (stop_gateway, gateway_stopping) = watch::channel(false);
    let (stop_rpc, rpc_stopping) = watch::channel(false);
    let (gateway_drained, gateway_drains) = mpsc::channel::<()>(shards);
    // A shard that cannot start ends the process instead of leaving it half up.
    let (failed, failures) = mpsc::channel::<String>(shards);
    let stop = ShardStop {
        gateway_stopping,
        rpc_stopping,
        gateway_drained,
    };
    let threads = spawn_shards(&context, listeners, shards, &stop, &failed)?;
    drop(stop.gateway_drained);
    let mut shutdown = Shutdown {
        registration,
        stop_gateway,
        gateway_drains,
        stop_rpc,
    };
    control.block_on(shutdown.after_signal(&mut signals, failures))?;
    // The senders in `shutdown` live until every shard has ended: a shard
    // still draining sees its stop signal set, not its channel closed.
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => return Err("a worker thread panicked".into()),
        }
    }
    crate::logging::info!("stopped");
    Ok(())
}

/// One shard's ends of the shutdown channels.
#[derive(Clone)]
struct ShardStop {
    gateway_stopping: watch::Receiver<bool>,
    rpc_stopping: watch::Receiver<bool>,
    /// Dropped once this shard's gateway has drained (or at once, if the
    /// shard runs none).
    gateway_drained: mpsc::Sender<()>,
}

/// The control thread's ends of the shutdown channels.
struct Shutdown {
    registration: Option<Registration>,
    stop_gateway: watch::Sender<bool>,
    /// Closed once every shard has dropped its `gateway_drained`.
    gateway_drains: mpsc::Receiver<()>,
    stop_rpc: watch::Sender<bool>,
}

impl Shutdown {
    /// Waits for SIGINT/SIGTERM (or a shard that failed to start: its
    /// error), then stops the roles in order: out of the registry, the
    /// gateway drained, then the RPC server.
    async fn after_signal(
        &mut self,
        signals: &mut ShutdownSignals,
        mut failures: mpsc::Receiver<String>,
    ) -> Result<(), String> {
        tokio::select! {
            _ = signals.recv() => {}
            Some(err) = failures.recv() => return Err(err),
        }
        crate::logging::info!("shutting down: draining in-flight requests");
        // Out of the registry first, so that gateways stop choosing this
        // server (GOAWAY tells those already connected).
        if let Some(registration) = self.registration.take() {
            registration.deregister();
        }
        let _ = self.stop_gateway.send(true);
        // Every shard reports once its gateway has drained (or it has none).
        while self.gateway_drains.recv().await.is_some() {}
        let _ = self.stop_rpc.send(true);
        Ok(())
    }
}

/// Starts one thread per shard, each on its own listeners; the last shard
/// takes the original descriptors (and the metrics listener).
fn spawn_shards(
    context: &Arc<ShardContext>,
    listeners: Listeners,
    shards: usize,
    stop: &ShardStop,
    failed: &mpsc::Sender<String>,
) -> Result<Vec<std::thread::JoinHandle<Result<(), String>>>, String> {
    let mut threads = Vec::with_capacity(shards);
    let mut listeners = Some(listeners);
    for shard in 0..shards {
        let own = match (shard + 1 == shards, &mut listeners) {
            (true, spare) => spare.take().unwrap_or_default(),
            (false, Some(spare)) => spare.try_clone()?,
            (false, None) => Listeners::default(),
        };
        let context = context.clone();
        let stop = stop.clone();
        let failed = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("im-shard-{shard}"))
            .spawn(move || {
                let result = crate::runtime::current_thread()
                    .and_then(|runtime| runtime.block_on(run_shard(&context, own, stop)));
                if let Err(err) = &result {
                    let _ = failed.try_send(err.clone());
                }
                result
            })
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        threads.push(thread);
    }
    Ok(threads)
}

async fn run_shard(
    context: &ShardContext,
    listeners: Listeners,
    stop: ShardStop,
) -> Result<(), String> {
    let ShardStop {
        gateway_stopping,
        rpc_stopping,
        gateway_drained,
    } = stop;
    // Up until the RPC server stops, so the last scrape sees the drain.
    let metrics = listeners
        .metrics
        .map(|listener| metrics_listener::spawn(listener, &context.config, rpc_stopping.clone()));
    let config = &context.config;
    let store = context
        .store
        .as_ref()
        .map(|store| Arc::new(store.open(&crate::store::redis::RedisOptions::from(config))));
    // A gateway shard calls its own shard's RPC server without TCP, and its
    // store without frames where it can (crate::rpc::lane).
    let (local_rpc, local_accept) = match (&store, &context.gateway, context.rpc_local) {
        (Some(store), Some(_), Some(addr)) => {
            let max_in_flight = RpcServerOptions::from(config).max_in_flight;
            let lane = Lane::new(store.clone(), max_in_flight);
            let (connect, accept) = crate::rpc::local::channel(addr, Some(lane));
            (Some(connect), Some(accept))
        }
        _ => (None, None),
    };
    let rpc = match store {
        Some(store) => Some(spawn_rpc_server(
            context,
            store,
            shard_listener(listeners.rpc)?,
            local_accept,
            rpc_stopping,
        )),
        None => None,
    };
    if let Some((endpoints, slots)) = &context.gateway {
        let listener = shard_listener(listeners.http)?;
        let rpc_options = RpcClientOptions {
            secret: context.rpc_secret.clone(),
            local: local_rpc,
            ..RpcClientOptions::from(&context.config)
        };
        let rpc = BalancedClient::new(endpoints.clone(), rpc_options);
        serve_gateway(context, listener, &rpc, slots, gateway_stopping).await;
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

/// This shard's RPC server, on its own store, until `stopping`.
fn spawn_rpc_server(
    context: &ShardContext,
    store: Arc<AnyStore>,
    listener: TcpListener,
    local_accept: Option<LocalAccept>,
    stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let config = &context.config;
    let server = crate::rpc::server::serve(
        listener,
        local_accept,
        store,
        RpcServerOptions {
            secret: context.rpc_secret.clone(),
            ..RpcServerOptions::from(config)
        },
        context.rpc_shared.clone(),
        stopping,
        config.drain_timeout,
    );
    tokio::spawn(server)
}

/// This shard's gateway, until it has drained after `stopping`.
async fn serve_gateway(
    context: &ShardContext,
    listener: TcpListener,
    rpc: &BalancedClient,
    slots: &Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
) {
    let config = &context.config;
    let gateway = Arc::new(
        Gateway::new(
            rpc.clone(),
            context.access.clone(),
            config.pull_max_wait_ms,
            context.held.clone(),
            stopping.clone(),
        )
        .with_ws(crate::gateway::ws::WsOptions::from(config)),
    );
    crate::http::serve(
        listener,
        gateway,
        ServerOptions::from(config),
        slots.clone(),
        context.buffered.clone(),
        stopping,
    )
    .await;
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
