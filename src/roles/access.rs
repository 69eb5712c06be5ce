//! The gateway's authentication and rate limits, built from the
//! configuration (reading the key files once, at start-up).

use crate::auth::{Auth, Validation};
use crate::config::Config;
use crate::gateway::access::Access;

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
