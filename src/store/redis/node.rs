//! One Redis node as both stores use it: its pipelined connection pool (the
//! mux) with the library loaded on every new connection, its metrics, and
//! the counted call: written by a deadline, answered by it, its outcome
//! counted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio::time::error::Elapsed;

use super::RedisOptions;
use super::schema::{function_missing, load_library_command, without_wait};
use crate::error::Error;
use crate::metrics::{Outcome, PeerCall, PeerKind, PeerStats};
use crate::mux::{Handle, MuxOptions, Pending, Pool};
use crate::resp::Reply;
use crate::resp::protocol::{RespProtocol, RespRequest};
use crate::resp::url::RedisTarget;

/// One node's connections and metrics, for one thread.
#[derive(Clone)]
pub(super) struct Node {
    pub(super) pool: Arc<Pool<RespProtocol>>,
    /// The node's metrics (commands, errors, timeouts, in flight).
    pub(super) stats: Arc<PeerStats>,
}

impl Node {
    /// Opens `options.connections` connections to `target`, each loading
    /// the library first (so a restarted Redis, or a newly promoted or
    /// resharded master, has `im_send`). `name` says which store in the
    /// mux's log lines; `label` is the node in the metrics.
    pub(super) fn open(
        target: &RedisTarget,
        options: &RedisOptions,
        name: &'static str,
        label: &str,
    ) -> Node {
        let setup = [load_library_command()];
        let mux = MuxOptions {
            name,
            target: target.to_string(),
            queue: options.queue,
            max_in_flight: options.max_in_flight,
            max_queued_bytes: options.max_queued_bytes,
        };
        let pool = Pool::spawn(
            options.connections,
            || RespProtocol::new(target.clone(), &setup),
            mux,
        );
        let stats = crate::metrics::peer(PeerKind::Redis, label);
        Node { pool, stats }
    }

    /// Writes `request` on the next connection (unless `deadline` passes
    /// first), counted until its reply; a call not even queued (overloaded,
    /// not connected) is counted and refused at once.
    pub(super) fn start(
        &self,
        request: impl Into<RespRequest>,
        deadline: Instant,
    ) -> Result<Call, Error> {
        self.start_on(self.pool.handle(), request, deadline)
    }

    /// [`Node::start`] on one given connection of the node.
    pub(super) fn start_on(
        &self,
        handle: &Handle<RespProtocol>,
        request: impl Into<RespRequest>,
        deadline: Instant,
    ) -> Result<Call, Error> {
        let counted = self.stats.call();
        match handle.start_by(request, deadline) {
            Ok(pending) => Ok(Call {
                pending,
                deadline,
                counted,
            }),
            Err(err) => {
                counted.end(match err {
                    Error::Timeout => Outcome::Timeout,
                    _ => Outcome::Error,
                });
                Err(err)
            }
        }
    }

    /// One command by `deadline` (a timeout is [`Error::Timeout`]), its
    /// WAIT judged; a function call that finds the library missing loads
    /// it and runs once more. Error replies come back as they are.
    pub(super) async fn call(
        &self,
        request: RespRequest,
        wait_replicas: u32,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let once = |request: RespRequest| async move {
            let raw = self.start(request, deadline)?.raw().await;
            without_wait(raw, wait_replicas)
        };
        let reply = once(request.clone()).await;
        if !function_missing(&reply) {
            return reply;
        }
        if let Reply::Error(err) = once(load_library_command().into()).await? {
            return Err(Error::from_redis(&err));
        }
        once(request).await
    }
}

/// Starts `FUNCTION LOAD REPLACE` on `handle`, uncounted: a command started
/// on the same connection right after it runs with the library loaded (one
/// connection runs its commands in order). Held until the command's reply:
/// a load whose caller is gone is not written.
pub(super) fn start_reload(
    handle: &Handle<RespProtocol>,
    deadline: Instant,
) -> Result<Pending<Reply>, Error> {
    handle.start_by(load_library_command(), deadline)
}

/// A command written (or queued to be) on a node, counted in its metrics
/// until its reply.
pub(super) struct Call {
    pending: Pending<Reply>,
    deadline: Instant,
    counted: PeerCall,
}

impl Call {
    /// The reply, and whatever `then` makes of it (a reload and a second
    /// run, on the same connection), by the deadline: unanswered then, the
    /// call is `Elapsed` and counted as a timeout, and so is an answer that
    /// came after it.
    pub(super) async fn answer_then<F>(
        self,
        then: impl FnOnce(Result<Reply, Error>) -> F,
    ) -> Result<Result<Reply, Error>, Elapsed>
    where
        F: Future<Output = Result<Reply, Error>>,
    {
        let answered = async { then(self.pending.wait().await).await };
        let reply = tokio::time::timeout_at(self.deadline, answered).await;
        self.counted.end(match &reply {
            Ok(reply) if Instant::now() <= self.deadline => outcome(reply),
            Ok(_) | Err(_) => Outcome::Timeout,
        });
        reply
    }

    /// The reply by the deadline, or `Elapsed`.
    pub(super) async fn answer(self) -> Result<Result<Reply, Error>, Elapsed> {
        self.answer_then(|reply| async { reply }).await
    }

    /// The reply by the deadline, else [`Error::Timeout`]; error replies as
    /// they are.
    pub(super) async fn raw(self) -> Result<Reply, Error> {
        self.answer().await.unwrap_or(Err(Error::Timeout))
    }

    /// The reply by the deadline, else [`Error::Timeout`]; an error reply
    /// is [`Error::from_redis`]'s.
    pub(super) async fn reply(self) -> Result<Reply, Error> {
        match self.raw().await {
            Ok(Reply::Error(err)) => Err(Error::from_redis(&err)),
            reply => reply,
        }
    }
}

/// How a command ended, for the metrics: an error reply is an error (on a
/// cluster, a redirection too: they are also counted by kind).
fn outcome(reply: &Result<Reply, Error>) -> Outcome {
    match reply {
        Ok(Reply::Error(_)) => Outcome::Error,
        Ok(_) => Outcome::Ok,
        Err(Error::Timeout) => Outcome::Timeout,
        Err(_) => Outcome::Error,
    }
}

/// How long one step of the retention sweep may take.
const SWEEP_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// One command of the retention sweep on `node` (see
/// [`crate::store::retention`]), the library loaded again if it is
/// missing; an error reply is an error (it ends the pass).
pub(super) async fn sweep_step(node: &Node, command: Bytes) -> Result<Reply, Error> {
    let deadline = Instant::now() + SWEEP_STEP_TIMEOUT;
    match node.call(command.into(), 0, deadline).await? {
        Reply::Error(err) => Err(Error::from_redis(&err)),
        reply => Ok(reply),
    }
}
