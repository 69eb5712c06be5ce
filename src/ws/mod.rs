//! WebSocket (RFC 6455), in the style of [`crate::http`]: a pure frame
//! codec ([`frame`]), the opening handshake's checks and
//! `Sec-WebSocket-Accept` ([`handshake`]), the connection's policy with no
//! I/O and no clock ([`conn`]: pings, the close handshake, what lags), and
//! the thin driver that does its reading and writing ([`driver`]). The
//! JSON protocol spoken over it (`GET /api/ws`) is the gateway's
//! ([`crate::gateway::ws`]).

pub mod conn;
pub mod driver;
pub mod frame;
pub mod handshake;
