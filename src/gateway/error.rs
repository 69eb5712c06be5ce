//! Every way a gateway request can fail, and the one place where each
//! becomes an HTTP status and a JSON error body.

use crate::error::Error;
use crate::http::{HttpError, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The client's input is invalid.
    Invalid(String),
    NotFound,
    MethodNotAllowed(&'static str),
    /// The request's `Accept` excludes what the endpoint serves.
    NotAcceptable,
    Http(HttpError),
    /// The message service failed: the RPC server or the store is
    /// unreachable or overloaded, did not answer in time, refused the send's
    /// idempotency key, or hit a bug on our side (never the client's fault).
    /// (Its `Invalid` is answered as [`ApiError::Invalid`].)
    Service(Error),
    /// No acceptable bearer token; `missing` when none was sent at all.
    Unauthorized {
        missing: bool,
        why: &'static str,
    },
    /// An event stream's token expired while it was open: its final event.
    TokenExpired,
    /// The user may not do this.
    Forbidden(&'static str),
    /// Over the client's rate limit; retry after this many seconds.
    RateLimited(u32),
    /// The client holds as many waiting pulls and open streams as it may
    /// ([`super::held`]).
    TooManyHeld,
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Invalid(_) | ApiError::Service(Error::Invalid(_)) => 400,
            ApiError::NotFound => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::NotAcceptable => 406,
            ApiError::Http(HttpError::BadRequest(_)) => 400,
            ApiError::Http(HttpError::Timeout) => 408,
            ApiError::Http(HttpError::PayloadTooLarge) => 413,
            ApiError::Http(HttpError::HeadersTooLarge) => 431,
            ApiError::Http(HttpError::UriTooLong) => 414,
            ApiError::Http(HttpError::NotImplemented(_)) => 501,
            ApiError::Http(HttpError::TooManyConnections) => 503,
            ApiError::Http(HttpError::HandlerPanicked) => 500,
            ApiError::Service(Error::Unavailable | Error::Lost | Error::Overloaded) => 503,
            ApiError::Service(Error::Timeout) => 504,
            ApiError::Service(Error::IdempotencyKeyReused) => 422,
            ApiError::Service(Error::StorageFull) => 507,
            ApiError::Service(Error::MessageNotFound) => 404,
            ApiError::Service(Error::Forbidden) => 403,
            ApiError::Service(Error::Internal(_)) => 500,
            ApiError::Unauthorized { .. } | ApiError::TokenExpired => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::RateLimited(_) | ApiError::TooManyHeld => 429,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_)
            | ApiError::Service(Error::Invalid(_))
            | ApiError::Http(HttpError::BadRequest(_)) => "invalid_request",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::NotAcceptable => "not_acceptable",
            ApiError::Http(HttpError::Timeout) => "request_timeout",
            ApiError::Http(HttpError::PayloadTooLarge) => "payload_too_large",
            ApiError::Http(HttpError::HeadersTooLarge) => "headers_too_large",
            ApiError::Http(HttpError::UriTooLong) => "uri_too_long",
            ApiError::Http(HttpError::NotImplemented(_)) => "not_implemented",
            ApiError::Http(HttpError::TooManyConnections) => "overloaded",
            ApiError::Http(HttpError::HandlerPanicked) => "internal",
            ApiError::Service(Error::Unavailable | Error::Lost) => "unavailable",
            ApiError::Service(Error::Overloaded) => "overloaded",
            ApiError::Service(Error::Timeout) => "timeout",
            ApiError::Service(Error::IdempotencyKeyReused) => "idempotency_key_reused",
            ApiError::Service(Error::StorageFull) => "insufficient_storage",
            ApiError::Service(Error::MessageNotFound) => "message_not_found",
            ApiError::Service(Error::Forbidden) => "forbidden",
            ApiError::Service(Error::Internal(_)) => "internal",
            ApiError::Unauthorized { missing: true, .. } => "unauthorized",
            ApiError::Unauthorized { missing: false, .. } => "invalid_token",
            ApiError::TokenExpired => "token_expired",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::RateLimited(_) | ApiError::TooManyHeld => "rate_limited",
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Invalid(why) | ApiError::Service(Error::Invalid(why)) => why.clone(),
            ApiError::NotFound => "no such endpoint".into(),
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::NotAcceptable => {
                "this endpoint serves text/event-stream only; accept it (Accept: text/event-stream)"
                    .into()
            }
            ApiError::Http(HttpError::BadRequest(why) | HttpError::NotImplemented(why)) => {
                (*why).into()
            }
            ApiError::Http(HttpError::Timeout) => "the request took too long to arrive".into(),
            ApiError::Http(HttpError::PayloadTooLarge) => "the request body is too large".into(),
            ApiError::Http(HttpError::HeadersTooLarge) => {
                "the request header section is too large".into()
            }
            ApiError::Http(HttpError::TooManyConnections) => {
                "too many connections; retry later".into()
            }
            ApiError::Http(HttpError::UriTooLong) => "the request line is too long".into(),
            ApiError::Http(HttpError::HandlerPanicked) | ApiError::Service(Error::Internal(_)) => {
                "internal error".into()
            }
            ApiError::Service(Error::Unavailable | Error::Lost) => {
                "the message service is unavailable; retry later".into()
            }
            ApiError::Service(Error::Overloaded) => {
                "the message service is overloaded; retry later".into()
            }
            ApiError::Service(Error::Timeout) => {
                "the message service did not answer in time".into()
            }
            ApiError::Service(Error::IdempotencyKeyReused) => {
                "this idempotency key was already used in this chat for a different message".into()
            }
            ApiError::Service(Error::StorageFull) => {
                "the message store is full: the message was not stored; retry after the operator frees space".into()
            }
            ApiError::Service(Error::MessageNotFound) => {
                "the chat holds no message with this send_time".into()
            }
            ApiError::Service(Error::Forbidden) => {
                "only the message's sender may edit it, or its sender or an admin delete it".into()
            }
            ApiError::Unauthorized { why, .. } | ApiError::Forbidden(why) => (*why).into(),
            ApiError::TokenExpired => {
                "the stream's token has expired; reconnect with a fresh one".into()
            }
            ApiError::RateLimited(secs) => {
                format!("too many requests from this client; retry in {secs} s")
            }
            ApiError::TooManyHeld => {
                "too many waiting pulls and open streams from this client; retry when one ends"
                    .into()
            }
        }
    }

    /// `{"error":{"code":…,"message":…}}`
    pub fn json_body(&self) -> Vec<u8> {
        let body =
            serde_json::json!({ "error": { "code": self.code(), "message": self.message() } });
        body.to_string().into_bytes()
    }

    /// A bug on our side, or an answer that should never come.
    pub fn internal(why: String) -> ApiError {
        ApiError::Service(Error::Internal(why))
    }

    /// The error for a non-OK `code` (and its `msg`) in an RPC response.
    pub fn from_code(code: i32, msg: String) -> ApiError {
        Error::from_code(code, msg).into()
    }

    /// The response for this error.
    pub fn into_response(self) -> Response {
        if let ApiError::Service(Error::Internal(why)) = &self {
            crate::logging::error!("internal error"; why = why);
        }
        let mut resp = Response::json(self.status(), self.json_body());
        match self {
            ApiError::MethodNotAllowed(allow) => resp.allow = Some(allow),
            ApiError::Service(Error::Unavailable | Error::Lost | Error::Overloaded) => {
                resp.retry_after = Some(1)
            }
            ApiError::RateLimited(secs) => resp.retry_after = Some(secs),
            ApiError::TooManyHeld => resp.retry_after = Some(1),
            // RFC 6750 §3: no error code when no credentials were sent.
            ApiError::Unauthorized { missing: true, .. } => {
                resp.extra_header = Some(("WWW-Authenticate", r#"Bearer realm="im""#));
            }
            ApiError::Unauthorized { missing: false, .. } | ApiError::TokenExpired => {
                resp.extra_header = Some((
                    "WWW-Authenticate",
                    r#"Bearer realm="im", error="invalid_token""#,
                ));
            }
            ApiError::Http(HttpError::TooManyConnections) => {
                resp.retry_after = Some(1);
                resp.close = true;
            }
            // The connection stays usable after a handler's panic.
            ApiError::Http(HttpError::HandlerPanicked) => {}
            ApiError::Http(_) => resp.close = true,
            _ => {}
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(why) => ApiError::Invalid(why),
            err => ApiError::Service(err),
        }
    }
}
