//! The one error type for service-level failures — what a call to the RPC
//! server, to Redis or to the store can end in — shared by the connection
//! actor ([`crate::mux`]), the RPC client, the stores and the RPC server.
//!
//! Its variants keep every distinction a caller acts on: whether a request
//! was certainly never carried out ([`Error::Unavailable`],
//! [`Error::Overloaded`]: safe to send elsewhere) or may have been
//! ([`Error::Lost`]: only an idempotent request may be sent again), see
//! `rpc::balanced` and the stores' send retry.
//!
//! On the RPC wire an error travels as a response's `code`
//! ([`Error::code`] / [`Error::from_code`], the only place those numbers
//! are written); it becomes an HTTP status and JSON body in one place, the
//! gateway's [`crate::gateway::error`]. Protocol errors (HTTP, frame, token,
//! protobuf) are not service failures and keep their own types.

/// `code` of a successful `SendResponse` / `PullResponse` (the proto3
/// default, so it takes no bytes); any other is an [`Error`].
pub const CODE_OK: i32 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not connected, or not reachable: the request was never written, so
    /// it is safe to send it elsewhere. From a store: not stored, or (a
    /// write not acknowledged in time) maybe stored.
    Unavailable,
    /// The connection broke after the request was written: it may or may
    /// not have been carried out.
    Lost,
    /// A queue is full (calls or bytes): the request was never queued.
    Overloaded,
    /// The deadline passed: before the request was written (the mux: the
    /// peer never saw it), or before its reply came (the RPC client).
    Timeout,
    /// The idempotency key was used in this chat for another message
    /// (other text or sender).
    IdempotencyKeyReused,
    /// The store is full (Redis at `maxmemory` with `noeviction` refuses
    /// every write): nothing was written, and retrying will fail until an
    /// operator frees or adds memory.
    StorageFull,
    /// The request is invalid; retrying it unchanged will fail again.
    Invalid(String),
    /// An edit or delete names a message the chat does not hold (never
    /// stored, or trimmed by retention).
    MessageNotFound,
    /// The caller may not change this message (not its sender; or an
    /// edit by an admin, who may only delete).
    Forbidden,
    /// A bug, or an answer that should never come (never the client's fault).
    Internal(String),
}

impl Error {
    /// The `code` this error is sent as in an RPC response. The RPC wire
    /// knows no `Lost` or `Timeout`: to the gateway both are "unavailable"
    /// (a 503), even a store command refused before it was written (certainly
    /// not stored), like one never answered.
    pub fn code(&self) -> i32 {
        match self {
            Error::Invalid(_) => 1,
            Error::Unavailable | Error::Lost | Error::Timeout => 2,
            Error::Overloaded => 3,
            Error::Internal(_) => 4,
            Error::IdempotencyKeyReused => 5,
            Error::StorageFull => 6,
            // 6 and 7 are left for other kinds being added at the same time.
            Error::MessageNotFound => 8,
            Error::Forbidden => 9,
        }
    }

    /// The error a Redis error reply stands for: `OOM` (the write refused
    /// before any of it ran: Redis checks `maxmemory` before a command or
    /// function that may write) is [`Error::StorageFull`]; anything else is
    /// a bug on our side (nothing the store sends should be refused).
    pub fn from_redis(reply: &str) -> Error {
        if reply.starts_with("OOM ") {
            Error::StorageFull
        } else {
            Error::Internal(format!("redis: {reply}"))
        }
    }

    /// The error for a non-OK `code` (and its `msg`) in an RPC response;
    /// an unknown code (or an "error" coded OK) is internal.
    pub fn from_code(code: i32, msg: String) -> Error {
        match code {
            1 => Error::Invalid(msg),
            2 => Error::Unavailable,
            3 => Error::Overloaded,
            5 => Error::IdempotencyKeyReused,
            6 => Error::StorageFull,
            8 => Error::MessageNotFound,
            9 => Error::Forbidden,
            _ => Error::Internal(format!("rpc code {code}: {msg}")),
        }
    }
}

impl From<crate::domain::Invalid> for Error {
    fn from(invalid: crate::domain::Invalid) -> Self {
        Error::Invalid(invalid.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_as_the_rpc_wire_carries_them() {
        let msg = || "why".to_string();
        for err in [
            Error::Invalid(msg()),
            Error::Unavailable,
            Error::Overloaded,
            Error::IdempotencyKeyReused,
            Error::StorageFull,
            Error::MessageNotFound,
            Error::Forbidden,
        ] {
            assert_eq!(Error::from_code(err.code(), msg()), err);
        }
        // What the wire cannot tell apart.
        for err in [Error::Lost, Error::Timeout] {
            assert_eq!(Error::from_code(err.code(), msg()), Error::Unavailable);
        }
        assert_eq!(
            Error::from_code(Error::Internal(msg()).code(), msg()),
            Error::Internal("rpc code 4: why".into())
        );
        assert_eq!(
            Error::from_redis("OOM command not allowed when used memory > 'maxmemory'."),
            Error::StorageFull
        );
        assert_eq!(
            Error::from_redis("ERR boom"),
            Error::Internal("redis: ERR boom".into())
        );
        assert_eq!(
            Error::from_code(CODE_OK, msg()),
            Error::Internal("rpc code 0: why".into())
        );
        assert_eq!(
            Error::from_code(99, msg()),
            Error::Internal("rpc code 99: why".into())
        );
    }
}
