//! The store the RPC server serves, chosen once before the shards start:
//! the embedded memory store, or Redis (standalone or a cluster, as the
//! probe finds) with the subscriber that feeds waiting pulls. Each shard
//! then opens its own store on it (`StoreChoice::open`).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::notify::Hub;
use crate::resp::url::RedisTarget;
use crate::runtime::spawn_on_own_runtime;
use crate::store::memory::MemoryStore;
use crate::store::redis::{ClusterShared, Probe, not_a_cluster, probe};
use crate::store::retention::Retention;
use crate::store::{StoreChoice, subscriber};

/// `--redis`, else the embedded memory store (its sweeper started).
pub(super) fn start(config: &Config) -> Result<StoreChoice, String> {
    match &config.redis_url {
        Some(url) => redis_store(url, config.redis_timeout()),
        None => {
            let limit = config
                .memory_store_max_bytes
                .unwrap_or_else(crate::store::memory::default_limit);
            crate::logging::info!(
                "store: embedded memory store (no Redis URL configured; messages are lost on exit; set REDIS_URL or --redis to use Redis)";
                max_bytes = limit
            );
            let store = Arc::new(
                MemoryStore::new(config.idempotency_ttl)
                    .with_change_log_retention(config.change_log_retention)
                    .with_retention(Retention::from(config))
                    .with_limit(limit),
            );
            store.start_sweeper();
            Ok(StoreChoice::Memory(store))
        }
    }
}

/// Standalone Redis or a cluster: asks the node(s) (`INFO cluster`) before
/// the shards start. A list of nodes is a cluster. A single node that does
/// not answer yet is taken as standalone, what one URL names in every
/// deployment but a cluster's, so that the server starts and connects once
/// Redis is up rather than refusing to start.
fn redis_store(url: &str, timeout: Duration) -> Result<StoreChoice, String> {
    let targets = crate::resp::url::parse_list(url)?;
    let runtime = crate::runtime::current_thread()?;
    let probe = runtime.block_on(async {
        tokio::time::timeout(timeout.max(Duration::from_secs(1)), probe(&targets))
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
            return Err(not_a_cluster(url));
        }
        (probe, false) => {
            if let Probe::Unreachable(err) = probe {
                crate::logging::warning!("Redis does not answer yet; taking it as standalone"; err = err);
            }
            let target = targets.into_iter().next().ok_or("no Redis node given")?;
            return start_standalone(target);
        }
    };
    let shared = ClusterShared::new(&targets, map)?;
    let seeds: Vec<String> = targets.iter().map(ToString::to_string).collect();
    crate::logging::info!("store: Redis Cluster via {}", seeds.join(", "));
    let (hub, requests) = Hub::with_upstream();
    let subscriber = subscriber::run_cluster(shared.clone(), hub.clone(), requests);
    spawn_on_own_runtime("redis subscriber", subscriber)?;
    Ok(StoreChoice::Cluster(shared, hub))
}

/// Standalone Redis at `target`, with its subscriber connection started.
fn start_standalone(target: RedisTarget) -> Result<StoreChoice, String> {
    crate::logging::info!("store: Redis at {target}");
    let (hub, requests) = Hub::with_upstream();
    let subscriber = subscriber::run_standalone(target.clone(), hub.clone(), requests);
    spawn_on_own_runtime("redis subscriber", subscriber)?;
    Ok(StoreChoice::Redis(target, hub))
}
