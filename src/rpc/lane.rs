//! The local lane: a gateway shard's un-keyed sends and pulls that do not
//! wait, handed to its own shard's store as calls, not frames, when one
//! process runs both (`im-server` with no role).
//!
//! Through the in-process pipe ([`super::local`]) such a call still went
//! through four tasks and two codecs: the mux task encoded its frame into
//! the pipe, the RPC server's connection task decoded it, admitted it and
//! started the store, its writer task encoded the reply, and the mux task
//! decoded that and woke the caller. Under `perf` those steps were ~14 % of
//! the all-in-one's CPU under sends (rpc server 9.7 %, rpc client mux 4.3 %).
//! Here the gateway's task starts the store itself, through the same
//! functions the RPC server's connection uses ([`super::server::start_send`],
//! [`super::server::start_pull`]: the same validation, the same replies),
//! and the store's answer comes back through a oneshot as the frame the
//! RPC server would have written. The gateway cannot tell the difference:
//! the balancer, timeouts, retries and the reply's charge to the memory
//! budget are the same.
//!
//! What the RPC server's connection did besides, the lane does too: at most
//! `--max-in-flight` calls at once (beyond that the answer is `overloaded`,
//! as the server answers), the served count that pings report, and the
//! server's metrics (calls served and their time, calls in flight). Its
//! per-connection output budget has no counterpart: a reply here is never
//! queued for a socket, and a pull's reply is charged to the gateway's
//! memory budget as over the pipe. Everything else (keyed sends, pulls
//! that may wait and their cancellation, edits, deletes, changes, pings,
//! GOAWAY) still goes over the pipe, to the RPC server's full machinery.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::client::{Body, Budgeted, RpcRequest, charge};
use super::frame::Frame;
use super::method;
use super::server::{self, ServerFrame};
use crate::error::Error;
use crate::metrics::{self, Gauge, METRICS, RpcMethod};
use crate::store::AnyStore;

/// One shard's store, as its gateway calls it.
pub struct Lane {
    store: Arc<AnyStore>,
    in_flight: Arc<Semaphore>,
}

/// The reply to a call on the lane.
pub struct LaneReply(oneshot::Receiver<Frame>);

impl LaneReply {
    /// The reply frame; [`Error::Lost`] if the store dropped the call
    /// unanswered (it answers every call, so only in a panic).
    pub async fn wait(self) -> Result<Frame, Error> {
        self.0.await.map_err(|_| Error::Lost)
    }
}

/// What a call holds while the store serves it: its place in flight, the
/// gauge, and what its reply is counted and charged as.
struct InLane {
    _permit: OwnedSemaphorePermit,
    _in_flight: metrics::Tracked,
    method: RpcMethod,
    started: Instant,
    budgeted: Option<Budgeted>,
    reply: oneshot::Sender<Frame>,
}

impl InLane {
    fn answer(self, reply: ServerFrame) {
        METRICS.rpc_served(self.method, self.started.elapsed());
        let frame = server::reply_frame(reply);
        let frame = match self.budgeted {
            Some(budgeted) => charge(budgeted, frame, Body::Own),
            None => frame,
        };
        // The caller may have stopped waiting (its client went away).
        let _ = self.reply.send(frame);
    }
}

impl Lane {
    /// A lane to `store` taking at most `max_in_flight` calls at once.
    pub fn new(store: Arc<AnyStore>, max_in_flight: usize) -> Lane {
        Lane {
            store,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// Starts `request` if the lane takes it (an un-keyed send, a pull that
    /// does not wait), else gives it back.
    pub fn start(&self, request: RpcRequest) -> Result<LaneReply, RpcRequest> {
        match request {
            RpcRequest::Send(req) if req.idempotency_key.is_empty() => {
                Ok(self.admit(method::SEND, None, |store, call| {
                    server::start_send(store, req, move |reply| call.answer(reply))
                }))
            }
            RpcRequest::Pull(req, budgeted) if req.wait_ms == 0 => {
                Ok(self.admit(method::PULL, budgeted, |store, call| {
                    server::start_pull(store, req, move |reply| call.answer(reply))
                }))
            }
            other => Err(other),
        }
    }

    /// Takes a place in flight and runs `serve`, or answers `overloaded`
    /// at once when every place is taken.
    fn admit(
        &self,
        method: u8,
        budgeted: Option<Budgeted>,
        serve: impl FnOnce(&AnyStore, InLane),
    ) -> LaneReply {
        let (reply, waiter) = oneshot::channel();
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let _ = reply.send(server::reply_frame(server::overloaded(method)));
            return LaneReply(waiter);
        };
        server::count_served();
        let call = InLane {
            _permit: permit,
            _in_flight: metrics::track(Gauge::RpcServerInFlight),
            method: match method {
                method::SEND => RpcMethod::Send,
                _ => RpcMethod::Pull,
            },
            started: Instant::now(),
            budgeted,
            reply,
        };
        serve(&self.store, call);
        LaneReply(waiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CODE_OK;
    use crate::proto::{Message, PullRequest, PullResponse, SendRequest, SendResponse};
    use crate::rpc::status;
    use crate::store::memory::MemoryStore;

    fn lane(max_in_flight: usize) -> Lane {
        let store = AnyStore::Memory(Arc::new(MemoryStore::default()));
        Lane::new(Arc::new(store), max_in_flight)
    }

    fn send(chat: &str, text: &str, key: &str) -> RpcRequest {
        RpcRequest::Send(SendRequest {
            message: Some(Message {
                chat: chat.into(),
                text: text.into(),
                sender: "s".into(),
                ..Message::default()
            }),
            idempotency_key: key.into(),
        })
    }

    fn pull(chat: &str, wait_ms: i32) -> RpcRequest {
        RpcRequest::Pull(
            PullRequest {
                chat: chat.into(),
                limit: 10,
                wait_ms,
                ..PullRequest::default()
            },
            None,
        )
    }

    async fn reply<M: prost::Message + Default>(lane: &Lane, request: RpcRequest) -> M {
        let Ok(waiter) = lane.start(request) else {
            panic!("the lane gave the call back")
        };
        let frame = waiter.wait().await.expect("answered");
        assert_eq!(frame.method_or_status, status::OK);
        M::decode(frame.body).expect("a response")
    }

    /// A send and a pull are answered with the RPC server's replies: the
    /// stored send_time, then the page holding it.
    #[tokio::test]
    async fn sends_and_pulls_are_served_as_the_rpc_server_serves_them() {
        let lane = lane(8);
        let sent: SendResponse = reply(&lane, send("a:b", "hi", "")).await;
        assert_eq!(sent.code, CODE_OK, "{sent:?}");
        let page: PullResponse = reply(&lane, pull("b:a", 0)).await;
        assert_eq!(page.code, CODE_OK, "{page:?}");
        let texts: Vec<(&str, i64)> = page
            .messages
            .iter()
            .map(|m| (m.text.as_str(), m.send_time))
            .collect();
        assert_eq!(texts, [("hi", sent.send_time)], "the chat's canonical name");
        let invalid: SendResponse = reply(&lane, send("", "hi", "")).await;
        assert_eq!(invalid.code, Error::Invalid(String::new()).code());
    }

    /// Keyed sends and pulls that may wait are not the lane's: they go
    /// over the pipe, where the RPC server retries and holds them.
    #[tokio::test]
    async fn keyed_sends_and_waiting_pulls_are_given_back() {
        let lane = lane(8);
        assert!(matches!(
            lane.start(send("c", "t", "k")),
            Err(RpcRequest::Send(_))
        ));
        assert!(matches!(
            lane.start(pull("c", 100)),
            Err(RpcRequest::Pull(..))
        ));
        assert!(matches!(
            lane.start(RpcRequest::Ping),
            Err(RpcRequest::Ping)
        ));
    }

    /// Beyond `max_in_flight` calls at once the answer is `overloaded`, as
    /// the RPC server answers; a place comes back when its call is answered.
    #[tokio::test]
    async fn calls_beyond_the_limit_are_answered_overloaded() {
        let lane = lane(1);
        let held = lane.in_flight.clone().try_acquire_owned().expect("a place");
        let refused: SendResponse = reply(&lane, send("c", "t", "")).await;
        assert_eq!(refused.code, Error::Overloaded.code(), "{refused:?}");
        drop(held);
        let sent: SendResponse = reply(&lane, send("c", "t", "")).await;
        assert_eq!(sent.code, CODE_OK, "{sent:?}");
        assert_eq!(lane.in_flight.available_permits(), 1, "given back");
    }
}
