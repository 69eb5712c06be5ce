//! Who may call the API, checked in the gateway before any RPC: bearer
//! tokens (when `--auth-jwt-secret-file` is set) and per-client rate limits
//! (when `--rate-limit-send` / `--rate-limit-pull` are set). With neither,
//! [`Access::admit`] is one branch and the seed's curl examples work as
//! they always did.

use std::net::IpAddr;

use tokio::time::Instant;

use super::error::ApiError;
use crate::auth::{self, Auth, Claims, Denied};
use crate::http::Request;
use crate::ratelimit::{Limiter, retry_after_secs};

/// Buckets remembered per limiter (~40 bytes each): a flood of distinct
/// clients costs at most a few MiB (see [`crate::ratelimit`]).
const MAX_BUCKETS: usize = 100_000;

/// Which limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Send,
    Pull,
}

#[derive(Default)]
pub struct Access {
    pub auth: Option<Auth>,
    pub send_limit: Option<Limiter>,
    pub pull_limit: Option<Limiter>,
}

impl Access {
    pub fn new(
        auth: Option<Auth>,
        send_rate: Option<crate::ratelimit::Rate>,
        pull_rate: Option<crate::ratelimit::Rate>,
    ) -> Access {
        Access {
            auth,
            send_limit: send_rate.map(|r| Limiter::new(r, MAX_BUCKETS)),
            pull_limit: pull_rate.map(|r| Limiter::new(r, MAX_BUCKETS)),
        }
    }

    /// Authenticates `req` (if tokens are required) and takes one token from
    /// its client's bucket (if `api` is limited): the user's when
    /// authenticated, else the client address's.
    pub fn admit(&self, req: &Request, api: Api) -> Result<Option<Claims>, ApiError> {
        let claims = match &self.auth {
            None => None,
            Some(auth) => {
                let header = req.header_values("authorization").next();
                let now = crate::now_micros() / 1_000_000;
                Some(auth.authenticate(header, now).map_err(denied)?)
            }
        };
        let limiter = match api {
            Api::Send => &self.send_limit,
            Api::Pull => &self.pull_limit,
        };
        if let Some(limiter) = limiter {
            let client = client_key(claims.as_ref(), req.peer);
            if let Err(wait) = limiter.check(&client, Instant::now()) {
                return Err(ApiError::RateLimited(retry_after_secs(wait)));
            }
        }
        Ok(claims)
    }
}

impl Access {
    /// Takes one token from the bucket of `user` (or of `peer` without
    /// authentication) if `api` is limited: the limit of [`Access::admit`],
    /// for a request that arrived on a WebSocket.
    pub fn limit(
        &self,
        user: Option<&Claims>,
        peer: Option<IpAddr>,
        api: Api,
    ) -> Result<(), ApiError> {
        let limiter = match api {
            Api::Send => &self.send_limit,
            Api::Pull => &self.pull_limit,
        };
        if let Some(limiter) = limiter
            && let Err(wait) = limiter.check(&client_key(user, peer), Instant::now())
        {
            return Err(ApiError::RateLimited(retry_after_secs(wait)));
        }
        Ok(())
    }
}

/// The bucket of a request: `u:<user>` or `ip:<address octets>`, so a user
/// named like an address never shares one with it.
fn client_key(claims: Option<&Claims>, peer: Option<IpAddr>) -> Vec<u8> {
    match (claims, peer) {
        (Some(c), _) => [b"u:", c.sub.as_bytes()].concat(),
        (None, Some(IpAddr::V4(ip))) => [&b"ip:"[..], &ip.octets()].concat(),
        (None, Some(IpAddr::V6(ip))) => [&b"ip:"[..], &ip.octets()].concat(),
        (None, None) => b"ip:".to_vec(),
    }
}

/// The status a refusal is answered with.
pub fn denied(why: Denied) -> ApiError {
    match why {
        Denied::MissingToken => ApiError::Unauthorized {
            missing: true,
            why: "an `Authorization: Bearer <token>` header is required",
        },
        Denied::InvalidToken(err) => ApiError::Unauthorized {
            missing: false,
            why: err.describe(),
        },
        Denied::Forbidden(why) => ApiError::Forbidden(why),
    }
}

/// Checks that the user may use `chat`; for a send, settles its sender
/// (the user: `sender` must be it, or empty).
pub fn authorize(claims: &Claims, chat: &str, sender: Option<&mut String>) -> Result<(), ApiError> {
    auth::authorize(claims, chat).map_err(denied)?;
    if let Some(sender) = sender {
        let user = auth::authorize_sender(claims, sender)
            .map_err(denied)?
            .to_string();
        *sender = user;
    }
    Ok(())
}
