//! Talking to Redis: command encoding ([`command`]), the pipelined
//! connection as a [`mux`](crate::mux) protocol ([`protocol::RespProtocol`],
//! replies decoded by `redis-protocol`), `redis://` URLs ([`url`]) and the
//! pure parts of Redis Cluster ([`cluster`]).

pub mod cluster;
pub mod command;
pub mod protocol;
pub mod url;

pub use redis_protocol::resp2::types::BytesFrame as Reply;
