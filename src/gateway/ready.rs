//! `GET /ready`: readiness, as opposed to `/ping`'s liveness. Ready means a
//! send can succeed now: this gateway knows an RPC server, one answers, and
//! its store answers too (the RPC `Ping` with `store` set, which makes the
//! RPC server ping Redis). Not ready is `503` with `Retry-After: 1` and a
//! JSON body naming what is missing, so a load balancer or a Kubernetes
//! readiness probe keeps traffic away while a plain `curl` says why.

use prost::Message as _;

use super::PendingReply;
use crate::http::Response;
use crate::proto::PingResponse;
use crate::rpc::balanced::{BalancedCall, BalancedClient};
use crate::rpc::client::RpcRequest;
use crate::rpc::status;

/// What `/ready` found missing: the `missing` field of its 503 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The process is shutting down: no new traffic.
    ShuttingDown,
    /// No RPC server is known yet (discovery has named none), or none
    /// answered the ping.
    RpcServer,
    /// The RPC server answered but its store (Redis) did not.
    Store,
}

impl Missing {
    fn name(self) -> &'static str {
        match self {
            Missing::ShuttingDown => "shutting_down",
            Missing::RpcServer => "rpc_server",
            Missing::Store => "store",
        }
    }
}

/// `{"ready":true}`
pub fn ready() -> Response {
    Response::json(200, br#"{"ready":true}"#.to_vec())
}

/// `503 {"ready":false,"missing":…,"message":…}` with `Retry-After: 1`.
pub fn not_ready(missing: Missing, message: &str) -> Response {
    let body = serde_json::json!({
        "ready": false,
        "missing": missing.name(),
        "message": message,
    });
    let mut resp = Response::json(503, body.to_string().into_bytes());
    resp.retry_after = Some(1);
    resp
}

/// Starts the check, or answers at once when there is nothing to ask.
pub fn start(rpc: &BalancedClient, stopping: bool) -> PendingReply {
    if stopping {
        let answer = not_ready(Missing::ShuttingDown, "this gateway is shutting down");
        return PendingReply::Ready(answer);
    }
    if rpc.known() == 0 {
        return PendingReply::Ready(not_ready(
            Missing::RpcServer,
            "no RPC server is known yet (--rpc names none, or discovery has not found one)",
        ));
    }
    match rpc.start(RpcRequest::PingStore) {
        Ok(call) => PendingReply::Readiness(call),
        Err(err) => PendingReply::Ready(not_ready(Missing::RpcServer, &no_answer(rpc, &err))),
    }
}

/// The answer, once the RPC server replied (or did not).
pub async fn finish(rpc: &BalancedClient, call: BalancedCall) -> Response {
    let frame = match rpc.finish(call).await {
        Ok(frame) => frame,
        Err(err) => return not_ready(Missing::RpcServer, &no_answer(rpc, &err)),
    };
    let pong = match frame.method_or_status {
        status::OK => PingResponse::decode(frame.body).ok(),
        _ => None,
    };
    match pong {
        Some(pong) if pong.store_error.is_empty() => ready(),
        Some(pong) => not_ready(Missing::Store, &pong.store_error),
        None => not_ready(
            Missing::RpcServer,
            "the RPC server refused the ping (an older version, or a bad frame)",
        ),
    }
}

fn no_answer(rpc: &BalancedClient, err: &crate::error::Error) -> String {
    format!("no RPC server answers ({} known; {err:?})", rpc.known())
}
