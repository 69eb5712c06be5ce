//! The config mapped into the components' own options structs, in one
//! place, and some of those structs' defaults (every option at its declared
//! default): the HTTP codec and server, the WebSocket endpoint, the RPC
//! client and server and the Redis store take their options, not the
//! [`Config`], so they import nothing from here.

use super::Config;
use crate::gateway::ws::WsOptions;
use crate::http::codec::Limits;
use crate::http::server::ServerOptions;
use crate::rpc::client::RpcClientOptions;
use crate::rpc::server::RpcServerOptions;
use crate::store::redis::RedisOptions;
use crate::store::retention::Retention;
use crate::ws::{conn, driver};

impl From<&Config> for ServerOptions {
    fn from(config: &Config) -> Self {
        ServerOptions {
            limits: Limits::new(config.max_head, config.max_body),
            idle_timeout: config.idle_timeout,
            request_timeout: config.request_timeout,
            max_connections: config.max_connections,
            max_output_buffer: config.max_output_buffer,
            write_timeout: config.write_timeout,
            stream_heartbeat: config.stream_heartbeat,
            drain_timeout: config.drain_timeout,
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions::from(&Config::defaults())
    }
}

/// `--max-header-bytes` and `--max-body` at their defaults.
impl Default for Limits {
    fn default() -> Self {
        ServerOptions::default().limits
    }
}

impl From<&Config> for WsOptions {
    fn from(config: &Config) -> Self {
        WsOptions {
            max_subscriptions: config.ws_max_subscriptions,
            auth_timeout: config.request_timeout,
            driver: driver::Options {
                conn: conn::Settings {
                    max_message: config.ws_max_message,
                    ping_after: config.ws_ping_interval,
                    write_timeout: config.write_timeout,
                },
                max_output: config.max_output_buffer,
            },
        }
    }
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions::from(&Config::defaults())
    }
}

impl From<&Config> for RedisOptions {
    fn from(config: &Config) -> Self {
        RedisOptions {
            connections: config.redis_connections,
            queue: config.queue,
            max_in_flight: config.max_in_flight,
            timeout: config.redis_timeout(),
            wait_replicas: config.redis_wait_replicas,
            max_queued_bytes: config.max_queued_bytes,
            idempotency_ttl: config.idempotency_ttl,
            change_log_retention: config.change_log_retention,
            retention: Retention::from(config),
        }
    }
}

/// `--retain-messages` and `--retain-age-s`.
impl From<&Config> for Retention {
    fn from(config: &Config) -> Self {
        Retention {
            messages: config.retain_messages,
            age: config.retain_age,
        }
    }
}

impl From<&Config> for RpcServerOptions {
    fn from(config: &Config) -> Self {
        RpcServerOptions {
            max_frame: config.max_frame,
            max_in_flight: config.max_in_flight,
            max_output: config.max_rpc_output,
            idle_timeout: config.rpc_idle_timeout,
            max_connections: config.max_rpc_connections,
            // Read once, at start-up (`ShardContext::rpc_secret`).
            secret: None,
            advertise: config.rpc_advertise.clone(),
        }
    }
}

impl From<&Config> for RpcClientOptions {
    fn from(config: &Config) -> Self {
        RpcClientOptions {
            connections: config.rpc_connections,
            timeout: config.rpc_timeout,
            queue: config.queue,
            max_in_flight: config.max_in_flight,
            max_frame: config.max_frame,
            secret: None,
            local: None,
        }
    }
}
