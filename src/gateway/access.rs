//! Who may call the API, checked in the gateway before any RPC: bearer
//! tokens (when `--auth-jwt-secret-file` is set) and per-client rate limits
//! (when `--rate-limit-send` / `--rate-limit-pull` are set). With neither,
//! [`Access::admit`] is one branch and the seed's curl examples work as
//! they always did.

use std::net::IpAddr;

use tokio::time::Instant;

use super::client_addr::{Cidr, bucket_key, client_address};
use super::error::ApiError;
use super::origin::cross_origin_refusal;
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
    /// `--trusted-proxies`: peers whose `Forwarded` / `X-Forwarded-For`
    /// name the client.
    pub trusted_proxies: Vec<Cidr>,
    /// `--allowed-origins`: origins exempt from the cross-origin check.
    pub allowed_origins: Vec<String>,
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
            ..Access::default()
        }
    }

    /// Authenticates `req` (if tokens are required; else refuses a browser's
    /// cross-origin send) and takes one token from its client's bucket (if
    /// `api` is limited): the user's when authenticated, else the client
    /// address's. A token that fails costs its address a token too, so
    /// forged tokens meet the limit (429) like anything else.
    pub fn admit(&self, req: &Request, api: Api) -> Result<Option<Claims>, ApiError> {
        let limiter = match api {
            Api::Send => &self.send_limit,
            Api::Pull => &self.pull_limit,
        };
        let claims = match &self.auth {
            None => {
                if let Some(why) = cross_origin_refusal(req, &self.allowed_origins) {
                    return Err(ApiError::Forbidden(why));
                }
                None
            }
            Some(auth) => {
                let mut values = req.header_values("authorization");
                let header = values.next();
                if values.next().is_some() {
                    return Err(ApiError::Invalid(
                        "`Authorization` given more than once".into(),
                    ));
                }
                Some(self.authenticate(auth, header, req, limiter)?)
            }
        };
        if let Some(limiter) = limiter {
            let client = match &claims {
                Some(c) => [b"u:", c.sub.as_bytes()].concat(),
                None => self.address_key(req),
            };
            self.take(limiter, &client)?;
        }
        Ok(claims)
    }

    /// The token's claims. Each failure takes a token from the client
    /// address's bucket, so forged tokens meet the limit (429). (Not checked
    /// before verifying: behind a proxy, or a NAT, one address is many
    /// users, and their valid tokens must not be refused for a forger's.)
    fn authenticate(
        &self,
        auth: &Auth,
        header: Option<&[u8]>,
        req: &Request,
        limiter: &Option<Limiter>,
    ) -> Result<Claims, ApiError> {
        let now = crate::now_micros() / 1_000_000;
        match auth.authenticate(header, now) {
            Ok(claims) => Ok(claims),
            Err(why @ Denied::InvalidToken(_)) => {
                if let Some(limiter) = limiter {
                    self.take(limiter, &self.address_key(req))?;
                }
                Err(denied(why))
            }
            Err(why) => Err(denied(why)),
        }
    }

    fn take(&self, limiter: &Limiter, client: &[u8]) -> Result<(), ApiError> {
        limiter
            .check(client, Instant::now())
            .map_err(|wait| ApiError::RateLimited(retry_after_secs(wait)))
    }

    /// The bucket of a request without a user: `ip:` and its client's
    /// address (or /64), so a user named like an address never shares one
    /// with it.
    fn address_key(&self, req: &Request) -> Vec<u8> {
        match self.client_ip(req) {
            Some(client) => bucket_key(client),
            None => b"ip:".to_vec(),
        }
    }

    /// The client's address: the connection's peer, or, when that is a
    /// trusted proxy, the address it forwarded (see [`client_address`]).
    pub fn client_ip(&self, req: &Request) -> Option<IpAddr> {
        let peer = req.peer?;
        if self.trusted_proxies.is_empty() {
            return Some(peer);
        }
        let forwarded: Vec<&[u8]> = req.header_values("forwarded").collect();
        let xff: Vec<&[u8]> = req.header_values("x-forwarded-for").collect();
        Some(client_address(
            peer,
            &forwarded,
            &xff,
            &self.trusted_proxies,
        ))
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

/// The bucket of a WebSocket request: `u:<user>`, or the client's address
/// bucket ([`bucket_key`]: an IPv6 client by its /64), `peer` being the
/// address [`Access::client_ip`] found at the upgrade.
fn client_key(claims: Option<&Claims>, peer: Option<IpAddr>) -> Vec<u8> {
    match (claims, peer) {
        (Some(c), _) => [b"u:", c.sub.as_bytes()].concat(),
        (None, Some(ip)) => bucket_key(ip),
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
