//! The options built from the configuration whose structs live in the
//! store and the RPC server, and the gateway's authentication and rate
//! limits. (The HTTP server's, the WebSocket's and the RPC client's are
//! built next to their structs.)

use crate::auth::{Auth, Validation};
use crate::config::Config;
use crate::gateway::access::Access;
use crate::rpc::server::RpcServerOptions;
use crate::store::redis::RedisOptions;
use crate::store::retention::Retention;

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

/// Authentication (its keys read once, at start-up) and rate limits.
pub(super) fn access(config: &Config) -> Result<Access, String> {
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
