//! Starting each role from a [`Config`]: bind, log where, serve until a
//! shutdown signal.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Role};
use crate::gateway::Gateway;
use crate::http::Limits;
use crate::http::server::ServerOptions;
use crate::rpc::client::{RpcClient, RpcClientOptions};
use crate::rpc::server::RpcServerOptions;
use crate::store::AnyStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisOptions, RedisStore};

/// Runs the configured role(s) until SIGINT or SIGTERM, then shuts down
/// gracefully: stop accepting, finish in-flight requests (gateway first, as
/// its requests need the RPC server), close, return.
pub async fn run(config: Config) -> Result<(), String> {
    match crate::rlimit::raise_open_files_limit() {
        Some(files) => eprintln!("im-server: open-file limit {files}"),
        None => eprintln!("im-server: could not read the open-file limit"),
    }
    // Two stop signals: in `all`, the RPC server must keep serving until the
    // gateway has drained, or the gateway's last requests would find it gone.
    let (stop_gateway, gateway_stopping) = watch::channel(false);
    let (stop_rpc, rpc_stopping) = watch::channel(false);
    let rpc = match config.role {
        Role::Rpc | Role::All => Some(start_rpc(&config, rpc_stopping).await?),
        Role::Gateway => None,
    };
    let gateway = if config.role != Role::Rpc {
        let target = match (&config.rpc_addr, &rpc) {
            (Some(addr), _) => addr.clone(),
            (None, Some((local, _))) => local.clone(),
            (None, None) => return Err("the gateway needs --rpc <addr>".into()),
        };
        Some(start_gateway(&config, target, gateway_stopping).await?)
    } else {
        None
    };
    shutdown_signal().await;
    eprintln!("im-server: shutting down: draining in-flight requests");
    let _ = stop_gateway.send(true);
    if let Some(gateway) = gateway {
        let _ = gateway.await;
    }
    let _ = stop_rpc.send(true);
    if let Some((_, rpc)) = rpc {
        let _ = rpc.await;
    }
    eprintln!("im-server: stopped");
    Ok(())
}

async fn bind(addr: &str, what: &str) -> Result<(TcpListener, String), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the {what} address: {e}"))?;
    Ok((listener, local.to_string()))
}

/// Starts the RPC server; returns the address it listens on and its task.
async fn start_rpc(
    config: &Config,
    stopping: watch::Receiver<bool>,
) -> Result<(String, JoinHandle<()>), String> {
    let store = match &config.redis_url {
        Some(url) => {
            let target = crate::resp::url::parse(url)?;
            eprintln!("im-server: store: Redis at {target}");
            let options = RedisOptions {
                connections: config.redis_connections,
                queue: config.queue,
                max_in_flight: config.max_in_flight,
                timeout: config.redis_timeout,
            };
            AnyStore::Redis(RedisStore::new(target, &options))
        }
        None => {
            eprintln!(
                "im-server: store: embedded memory store (no Redis URL configured; messages are lost on exit; set REDIS_URL or --redis to use Redis)"
            );
            AnyStore::Memory(MemoryStore::default())
        }
    };
    let (listener, local) = bind(&config.rpc_listen, "rpc").await?;
    eprintln!("im-server: rpc listening on {local}");
    let options = RpcServerOptions {
        max_frame: config.max_frame,
        max_in_flight: config.max_in_flight,
    };
    let server = crate::rpc::server::serve(
        listener,
        Arc::new(store),
        options,
        stopping,
        config.drain_timeout,
    );
    Ok((local, tokio::spawn(server)))
}

async fn start_gateway(
    config: &Config,
    rpc_target: String,
    stopping: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, String> {
    let rpc_options = RpcClientOptions {
        connections: config.rpc_connections,
        timeout: config.rpc_timeout,
        queue: config.queue,
        max_in_flight: config.max_in_flight,
        max_frame: config.max_frame,
    };
    eprintln!("im-server: gateway calls rpc server at {rpc_target}");
    let gateway = Arc::new(Gateway::new(RpcClient::new(rpc_target, &rpc_options)));
    let (listener, local) = bind(&config.http_addr, "http").await?;
    eprintln!("im-server: http listening on {local}");
    let options = ServerOptions {
        limits: Limits {
            max_head: config.max_head,
            max_body: config.max_body,
            ..Limits::default()
        },
        idle_timeout: config.idle_timeout,
        request_timeout: config.request_timeout,
        max_connections: config.max_connections,
        drain_timeout: config.drain_timeout,
    };
    Ok(tokio::spawn(crate::http::serve(
        listener, gateway, options, stopping,
    )))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
