//! Talking to Redis: command encoding ([`command`]), the pipelined
//! connection protocol ([`connection`], replies decoded by `redis-protocol`)
//! and `redis://` URLs ([`url`]).

pub mod command;
pub mod connection;
pub mod url;

pub use redis_protocol::resp2::types::BytesFrame as Reply;
