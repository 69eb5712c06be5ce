//! HTTP/1.1 server side: a pure request codec ([`codec`]), response
//! serialisation ([`response`]), a cached `Date` header ([`date`]), the
//! connection policy with no I/O ([`conn`]) and the accept loop and
//! per-connection driver ([`server`]).

pub mod codec;
pub mod conn;
pub mod date;
pub mod response;
pub mod server;

pub use codec::{HttpError, Limits, Method, Request, RequestDecoder, Version};
pub use response::Response;
pub use server::{Handler, serve};
