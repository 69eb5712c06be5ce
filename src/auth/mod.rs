//! Who may send and read: bearer-token authentication and the room rules,
//! with no I/O. The gateway asks [`Auth::authenticate`] and then
//! [`authorize`] before any RPC, so a refused request costs no store work.
//!
//! Rules (docs/auth.md):
//! * the user is the token's `sub`; a send's `sender` must be the user (or be
//!   omitted, and is then taken from it);
//! * a two-person room `a:b` is open to `a` and `b` only; the answer to anyone
//!   else is the same 403 whether or not the room has messages;
//! * any other room is open to every authenticated user, unless the token
//!   has a `chats` claim, which then lists the rooms it may use (`*` = all).
//!   The claim limits two-person rooms too: a token for `["general"]` cannot
//!   open the holder's private rooms.

pub mod base64url;
pub mod jwt;
pub mod token_cmd;

pub use jwt::{Claims, TokenError, Validation};

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use crate::domain::two_person_room;

/// A request refused before it reached the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no credentials were sent.
    MissingToken,
    /// 401: the credentials are not acceptable.
    InvalidToken(TokenError),
    /// 403: the user may not do this.
    Forbidden(&'static str),
}

/// Authentication, when it is turned on.
pub struct Auth {
    pub rules: Validation,
    /// Tokens already verified, with their claims: a client sends the same
    /// token with every request, and verifying it (base64, HMAC-SHA256, two
    /// JSON parses) cost the gateway 5 µs per request (bench/run --auth:
    /// sends 20 % slower than without authentication).
    verified: VerifiedTokens,
}

impl Auth {
    pub fn new(rules: Validation) -> Auth {
        Auth {
            rules,
            verified: VerifiedTokens::new(),
        }
    }

    /// The claims of the request whose `Authorization` header is `header`.
    pub fn authenticate(&self, header: Option<&[u8]>, now: i64) -> Result<Claims, Denied> {
        let header = header.ok_or(Denied::MissingToken)?;
        let token = jwt::bearer_token(header).ok_or(Denied::InvalidToken(
            TokenError::Malformed("the Authorization header is not `Bearer <token>`"),
        ))?;
        if let Some(claims) = self.verified.get(token, now) {
            return Ok(claims);
        }
        let (claims, window) =
            jwt::verify_with_window(token, &self.rules, now).map_err(Denied::InvalidToken)?;
        self.verified.insert(token, &claims, window);
        Ok(claims)
    }
}

impl Auth {
    /// [`Auth::authenticate`], also telling until when the token holds
    /// (its `exp`, Unix seconds; infinite without one): a WebSocket
    /// connection authenticated by it is closed then. Once per connection,
    /// so not through the cache.
    pub fn authenticate_until(
        &self,
        header: Option<&[u8]>,
        now: i64,
    ) -> Result<(Claims, f64), Denied> {
        let header = header.ok_or(Denied::MissingToken)?;
        let token = jwt::bearer_token(header).ok_or(Denied::InvalidToken(
            TokenError::Malformed("the Authorization header is not `Bearer <token>`"),
        ))?;
        let (claims, window) =
            jwt::verify_with_window(token, &self.rules, now).map_err(Denied::InvalidToken)?;
        Ok((claims, window.until))
    }
}

/// Verified tokens by their exact text, each with its claims and the
/// window it is valid in (checked on every hit, so an expired token is
/// verified again, and refused). Only tokens that passed every check are
/// kept, and a hit compares the whole token, so nothing unverified is ever
/// taken from here. Bounded: a stripe that is full is emptied.
struct VerifiedTokens {
    stripes: Vec<std::sync::Mutex<TokenStripe>>,
    hasher: RandomState,
}

/// A verified token's claims and validity, by the token's text.
type TokenStripe = HashMap<Box<str>, (Claims, jwt::Window)>;

/// Stripes (threads contend only within one) and tokens per stripe:
/// 16 × 1,024 tokens of a few hundred bytes, about 5 MB at most.
const TOKEN_STRIPES: usize = 16;
const TOKENS_PER_STRIPE: usize = 1024;

impl VerifiedTokens {
    fn new() -> VerifiedTokens {
        VerifiedTokens {
            stripes: (0..TOKEN_STRIPES)
                .map(|_| std::sync::Mutex::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    fn stripe(&self, token: &str) -> std::sync::MutexGuard<'_, TokenStripe> {
        let i = self.hasher.hash_one(token) as usize % TOKEN_STRIPES;
        self.stripes[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, token: &str, now: i64) -> Option<Claims> {
        let stripe = self.stripe(token);
        let (claims, window) = stripe.get(token)?;
        window.contains(now).then(|| claims.clone())
    }

    fn insert(&self, token: &str, claims: &Claims, window: jwt::Window) {
        let mut stripe = self.stripe(token);
        if stripe.len() >= TOKENS_PER_STRIPE {
            stripe.clear();
        }
        stripe.insert(token.into(), (claims.clone(), window));
    }
}

/// Whether `user` may use `chat` (send or pull).
pub fn authorize(claims: &Claims, chat: &str) -> Result<(), Denied> {
    if !claims.allows_chat(chat) && !claims.allows_chat(&crate::domain::canonical_chat(chat)) {
        return Err(Denied::Forbidden("the token does not grant this chat"));
    }
    match two_person_room(chat) {
        Some((a, b)) if a != claims.sub && b != claims.sub => Err(Denied::Forbidden(
            "a two-person room is open to its two members only",
        )),
        _ => Ok(()),
    }
}

/// The sender a send is stored with: the user, who must match `sender` if given.
pub fn authorize_sender<'a>(claims: &'a Claims, sender: &'a str) -> Result<&'a str, Denied> {
    match sender {
        "" => Ok(&claims.sub),
        s if s == claims.sub => Ok(s),
        _ => Err(Denied::Forbidden("`sender` must be the authenticated user")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_tokens_are_reused_only_whole_and_only_while_valid() {
        let secret = b"0123456789abcdef0123456789abcdef".to_vec();
        let auth = Auth::new(Validation {
            secret: Some(secret.clone()),
            public_key: None,
            issuer: None,
            audience: None,
            leeway_s: 0,
        });
        let token = jwt::mint(
            &secret,
            &serde_json::json!({"sub": "ann", "exp": 1000, "nbf": 500}),
        );
        let bearer = |t: &str| format!("Bearer {t}");
        let ok = auth.authenticate(Some(bearer(&token).as_bytes()), 900);
        assert_eq!(ok.map(|c| c.sub), Ok("ann".to_string()));
        assert!(
            auth.verified.get(&token, 900).is_some(),
            "kept once verified"
        );
        // Outside its window the cached token is refused as a fresh one is.
        let late = auth.authenticate(Some(bearer(&token).as_bytes()), 1001);
        assert_eq!(late, Err(Denied::InvalidToken(TokenError::Expired)));
        let early = auth.authenticate(Some(bearer(&token).as_bytes()), 400);
        assert_eq!(early, Err(Denied::InvalidToken(TokenError::NotYetValid)));
        // A token that differs in one signature character is verified, and fails.
        let mut forged = token.clone().into_bytes();
        let i = forged.len() - 5;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ascii");
        assert!(
            auth.authenticate(Some(bearer(&forged).as_bytes()), 900)
                .is_err()
        );
        // Full stripes are emptied, not grown.
        for i in 0..(TOKEN_STRIPES * TOKENS_PER_STRIPE * 2) {
            let t = jwt::mint(
                &secret,
                &serde_json::json!({"sub": format!("u{i}"), "exp": 1000}),
            );
            assert!(auth.authenticate(Some(bearer(&t).as_bytes()), 900).is_ok());
        }
        let kept: usize = auth
            .verified
            .stripes
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum();
        assert!(
            kept <= TOKEN_STRIPES * TOKENS_PER_STRIPE,
            "{kept} tokens kept"
        );
    }

    fn claims(sub: &str, chats: Option<&[&str]>) -> Claims {
        Claims {
            sub: sub.into(),
            chats: chats.map(|c| c.iter().map(|s| s.to_string()).collect()),
            until: i64::MAX,
            admin: false,
        }
    }

    #[test]
    fn two_person_rooms_admit_their_members_only() {
        let alice = claims("alice", None);
        assert_eq!(authorize(&alice, "alice:bob"), Ok(()));
        assert_eq!(authorize(&alice, "bob:alice"), Ok(()));
        assert!(matches!(
            authorize(&alice, "bob:carol"),
            Err(Denied::Forbidden(_))
        ));
        // Not two-person rooms: open to all.
        for room in ["general", "a:b:c", ":alice", "bob:"] {
            assert_eq!(authorize(&alice, room), Ok(()), "{room}");
        }
    }

    #[test]
    fn the_chats_claim_limits_every_room() {
        let limited = claims("alice", Some(&["general", "alice:bob"]));
        assert_eq!(authorize(&limited, "general"), Ok(()));
        assert_eq!(authorize(&limited, "bob:alice"), Ok(()), "either spelling");
        assert!(authorize(&limited, "random").is_err());
        assert!(authorize(&limited, "alice:carol").is_err());
        let all = claims("alice", Some(&["*"]));
        assert_eq!(authorize(&all, "random"), Ok(()));
        assert!(
            authorize(&all, "bob:carol").is_err(),
            "`*` does not open others' rooms"
        );
    }

    #[test]
    fn sender_is_the_user() {
        let alice = claims("alice", None);
        assert_eq!(authorize_sender(&alice, ""), Ok("alice"));
        assert_eq!(authorize_sender(&alice, "alice"), Ok("alice"));
        assert!(authorize_sender(&alice, "bob").is_err());
    }
}
