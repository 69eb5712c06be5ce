//! The store on one Redis node: every command goes to its pool. A batch of
//! sends is written by the batcher itself, in queue order, and pulls that
//! do not wait are written in rounds, each answered from one task.

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::batch::{BatchWindow, answer_batch, batch_deadline, run_batches};
use super::node::{Node, start_reload, sweep_step};
use super::queue::{QueuedSend, SendQueue};
use super::schema::{
    function_missing, im_send_command, page_from_reply, pull_command, without_wait,
};
use super::{RedisEngine, RedisOptions, Route};
use crate::domain::PullQuery;
use crate::error::Error;
use crate::mux::Handle;
use crate::resp::Reply;
use crate::resp::protocol::{RespProtocol, RespRequest};
use crate::resp::url::RedisTarget;
use crate::store::retention::{self, Retention};
use crate::store::{Completion, Page};

/// The store on one Redis node.
pub type RedisStore = RedisEngine<NodeRoute>;

/// Where a standalone store's commands go: its one node.
pub struct NodeRoute {
    node: Node,
    /// Pulls started by [`RedisEngine::start_pull`], waiting for [`run_pulls`].
    pulls: mpsc::Sender<QueuedPull>,
}

impl RedisStore {
    pub fn new(target: RedisTarget, options: &RedisOptions) -> RedisStore {
        let node = Node::open(&target, options, "redis", &target.to_string());
        let (sends, queue, queued) = SendQueue::new(options);
        let batcher = node.clone();
        let batch_options = options.clone();
        tokio::spawn(run_batches(
            queue,
            queued,
            BatchWindow::new(options),
            move |batch, entered| start_batch(&batcher, &batch_options, batch, entered),
        ));
        let (pulls, pull_queue) = mpsc::channel(options.queue.max(1));
        tokio::spawn(run_pulls(node.clone(), pull_queue, options.retention));
        if retention::take_sweeper(&options.retention) {
            tokio::spawn(sweep(node.clone(), options.retention));
        }
        RedisEngine::with_route(NodeRoute { node, pulls }, sends, options)
    }
}

impl Route for NodeRoute {
    async fn call(
        &self,
        _chat: &str,
        request: RespRequest,
        wait_replicas: u32,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        self.node.call(request, wait_replicas, deadline).await
    }

    /// Queued for [`run_pulls`]: no task or timer of its own.
    fn start_pull(&self, query: PullQuery, deadline: Instant, done: Completion<Page>) {
        let pull = QueuedPull {
            query,
            deadline,
            done,
        };
        if let Err(refused) = self.pulls.try_send(pull) {
            refused.into_inner().done.complete(Err(Error::Overloaded));
        }
    }

    /// `PING` on the pipelined connection.
    async fn ping(&self, deadline: Instant) -> Result<(), String> {
        let ping = crate::resp::command::encode(&[b"PING"]);
        let reply = match self.node.start(ping, deadline) {
            Ok(call) => call.reply().await,
            Err(err) => Err(err),
        };
        match reply {
            Ok(_) => Ok(()),
            Err(err) => Err(format!("Redis does not answer ({err:?})")),
        }
    }
}

/// Starts one `im_send` call for `batch` (left empty) on the node, written
/// now, in queue order; answered by a task of its own.
fn start_batch(
    node: &Node,
    options: &RedisOptions,
    batch: &mut Vec<QueuedSend>,
    entered: Option<OwnedSemaphorePermit>,
) {
    let deadline = batch_deadline(batch);
    let request = options.send_request(im_send_command(
        batch,
        crate::now_micros(),
        &options.retention,
    ));
    let waiters: Vec<_> = batch.drain(..).map(|s| s.reply).collect();
    let handle = node.pool.handle();
    let call = match node.start_on(handle, request.clone(), deadline) {
        Ok(call) => call,
        Err(err) => return answer_batch(Err(err), waiters),
    };
    let retry = Retry {
        handle: handle.clone(),
        request,
        deadline,
        wait_replicas: options.wait_replicas,
    };
    tokio::spawn(async move {
        // Unanswered at the earliest deadline, the whole batch fails: its
        // sends do not each keep a timer. (An answer after it came too
        // late, and is counted as a timeout.)
        let reply = call
            .answer_then(|reply| retry.if_function_missing(reply))
            .await
            .unwrap_or(Err(Error::Unavailable));
        drop(entered);
        answer_batch(reply, waiters);
    });
}

/// What it takes to run a batch again on the connection it went to.
struct Retry {
    handle: Handle<RespProtocol>,
    request: RespRequest,
    deadline: Instant,
    wait_replicas: u32,
}

impl Retry {
    /// `reply`, or, if it says the function is missing (the Redis was
    /// flushed or restored without the library), the reply to the same
    /// batch sent again once the library is loaded again. That error comes
    /// before the function would run, so nothing of the batch was stored
    /// and running it again stores nothing twice.
    async fn if_function_missing(self, reply: Result<Reply, Error>) -> Result<Reply, Error> {
        let reply = without_wait(reply, self.wait_replicas);
        if !function_missing(&reply) {
            return reply;
        }
        // One connection runs its commands in order: the load comes first.
        let load = start_reload(&self.handle, self.deadline)?;
        let again = self.handle.start_by(self.request, self.deadline)?;
        // Held until here: a call whose caller is gone is not written.
        let _ = load.wait().await;
        without_wait(again.wait().await, self.wait_replicas)
    }
}

/// A pull for [`run_pulls`].
struct QueuedPull {
    query: PullQuery,
    /// Not written after it; unanswered by then, it fails as a timeout.
    deadline: Instant,
    done: Completion<Page>,
}

/// Most pulls one [`run_pulls`] round takes.
const MAX_PULL_ROUND: usize = 64;

/// Starts every pull queued since its last turn on the pipelined
/// connection(s), and hands their pages on from one task per round, in the
/// order they were started (each waits at most until its own deadline): one
/// task per round of pulls instead of one per pull.
async fn run_pulls(node: Node, mut queue: mpsc::Receiver<QueuedPull>, retention: Retention) {
    let mut round = Vec::with_capacity(MAX_PULL_ROUND);
    while let Some(first) = queue.recv().await {
        round.push(first);
        while round.len() < MAX_PULL_ROUND {
            match queue.try_recv() {
                Ok(pull) => round.push(pull),
                Err(_) => break,
            }
        }
        let floor = retention.floor(crate::now_micros());
        let started: Vec<_> = round
            .drain(..)
            .map(|pull| {
                let command = pull_command(&pull.query, floor);
                (node.start(command, pull.deadline), pull)
            })
            .collect();
        tokio::spawn(async move {
            for (call, pull) in started {
                let page = match call {
                    Ok(call) => call.reply().await,
                    Err(err) => Err(err),
                };
                pull.done
                    .complete(page.and_then(|reply| page_from_reply(&pull.query, reply)));
            }
        });
    }
}

/// The process's retention sweep on a standalone Redis (see
/// [`retention`]): a pass every [`retention::SWEEP_PAUSE`].
async fn sweep(node: Node, keep: Retention) {
    let run = |command: Bytes| sweep_step(&node, command);
    loop {
        let removed = retention::sweep_node(run, &keep).await;
        if removed > 0 {
            eprintln!("im-server: retention sweep removed {removed} expired messages");
        }
        tokio::time::sleep(retention::SWEEP_PAUSE).await;
    }
}
