//! The config mapped into the components' own options structs, and those
//! structs' defaults (every option at its declared default): the HTTP
//! codec and server and the WebSocket endpoint take their options, not the
//! [`Config`], so they import nothing from here.

use super::Config;
use crate::gateway::ws::WsOptions;
use crate::http::codec::Limits;
use crate::http::server::ServerOptions;
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
