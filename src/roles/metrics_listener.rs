//! `--metrics-addr`: its listener, bound with the others, and its server,
//! run by one shard.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::http::server::{ServerOptions, connection_slots};

/// Connections the `--metrics-addr` listener serves at once: a few
/// scrapers, not clients.
const METRICS_CONNECTIONS: usize = 16;

/// Binds `--metrics-addr`, when it is given.
pub(super) fn bind(config: &Config) -> Result<Option<StdListener>, String> {
    let Some(addr) = &config.metrics_addr else {
        return Ok(None);
    };
    let (listener, local) = super::sockets::bind(addr, "metrics")?;
    crate::logging::info!("metrics listening on {local}");
    Ok(Some(listener))
}

/// Serves the metrics on this shard until `stopping`.
pub(super) fn spawn(
    listener: StdListener,
    config: &Config,
    stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(serve_metrics(
        listener,
        ServerOptions::from(config),
        stopping,
    ))
}

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
    let endpoint = Arc::new(crate::gateway::metrics_endpoint::MetricsEndpoint);
    // Scrapes hold no replies from the RPC server; their output is counted
    // on a budget of their own.
    let budget = crate::budget::MemoryBudget::new(crate::budget::DEFAULT_MAX);
    crate::http::serve(listener, endpoint, options, slots, budget, stopping).await;
}
