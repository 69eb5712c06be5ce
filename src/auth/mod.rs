//! Who may send and read: bearer-token authentication and the room rules,
//! with no I/O. The gateway asks [`Auth::authenticate`] and then
//! [`authorize`] before any RPC, so a refused request costs no store work.
//!
//! Rules (README, "Authentication"):
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
#[derive(Debug, Clone)]
pub struct Auth {
    pub rules: Validation,
}

impl Auth {
    /// The claims of the request whose `Authorization` header is `header`.
    pub fn authenticate(&self, header: Option<&[u8]>, now: i64) -> Result<Claims, Denied> {
        let header = header.ok_or(Denied::MissingToken)?;
        let token = jwt::bearer_token(header).ok_or(Denied::InvalidToken(
            TokenError::Malformed("the Authorization header is not `Bearer <token>`"),
        ))?;
        jwt::verify(token, &self.rules, now).map_err(Denied::InvalidToken)
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

    fn claims(sub: &str, chats: Option<&[&str]>) -> Claims {
        Claims {
            sub: sub.into(),
            chats: chats.map(|c| c.iter().map(|s| s.to_string()).collect()),
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
