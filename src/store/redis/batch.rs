//! Taking queued sends as batches (one `im_send` call each, or one per slot
//! on a Cluster), the window of batches in flight, and answering a batch's
//! senders.
//!
//! Sends arrive in bursts (one read of the RPC connection starts many
//! requests), and a Lua call costs far more than the ZADD inside it:
//! redis-benchmark, 8 messages to one chat per call, stores 238k messages/s
//! against 106k/s one per call. Batches are not waited for: several can be
//! in flight on the pipelined connection (with WAIT, at most a
//! [`BatchWindow`]).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::RedisOptions;
use super::queue::{QueuedSend, SendWaiter};
use super::schema::send_outcome;
use crate::error::Error;
use crate::mux::ByteBudget;
use crate::resp::Reply;

/// Most messages stored by one `im_send` call.
pub(super) const MAX_SEND_BATCH: usize = 64;
/// How many send batches may be in Redis at once: any number, except with
/// `--redis-wait-replicas`. Redis reads nothing more from a connection
/// blocked in WAIT, so batches pipelined behind one only queue there, each
/// as small as the moment it was cut; held back here instead, the sends that
/// arrive meanwhile go as one batch when a WAIT is answered.
#[derive(Clone)]
pub(super) struct BatchWindow(Option<Arc<Semaphore>>);

impl BatchWindow {
    /// Two batches per connection: one waiting for its replicas while the
    /// next is already written behind it.
    pub(super) fn new(options: &RedisOptions) -> BatchWindow {
        let limit = (options.wait_replicas > 0).then(|| 2 * options.connections.max(1));
        BatchWindow(limit.map(|n| Arc::new(Semaphore::new(n))))
    }

    /// Waits for room for one more batch; held until its reply, which is
    /// in by the batch's deadline (every batch times out then): a stalled
    /// Redis does not keep the window shut past it.
    pub(super) async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.0.as_ref()?.clone().acquire_owned().await.ok()
    }
}

/// Waits for queued sends and takes what is queued (up to
/// [`MAX_SEND_BATCH`]) into `batch`, leaving out sends whose caller has
/// already been answered; false once the queue is closed.
async fn next_batch(
    queue: &mut mpsc::Receiver<QueuedSend>,
    queued: &ByteBudget,
    batch: &mut Vec<QueuedSend>,
) -> bool {
    let Some(first) = queue.recv().await else {
        return false;
    };
    let now = Instant::now();
    take(first, now, queued, batch);
    while batch.len() < MAX_SEND_BATCH {
        match queue.try_recv() {
            Ok(send) => take(send, now, queued, batch),
            Err(_) => break,
        }
    }
    true
}

/// Adds `send` to the batch unless its caller has already been answered
/// (timed out, or gone): such a send must never reach Redis, since the
/// caller was told it failed.
fn take(send: QueuedSend, now: Instant, queued: &ByteBudget, batch: &mut Vec<QueuedSend>) {
    queued.release(send.bytes());
    if send.reply.is_closed() {
        return;
    }
    if send.deadline <= now {
        send.reply.answer(Err(Error::Unavailable));
        return;
    }
    batch.push(send);
}

/// The earliest deadline of a batch's sends: written any later, that
/// send's caller would already have been told "failed" and it would be
/// stored all the same.
pub(super) fn batch_deadline(batch: &[QueuedSend]) -> Instant {
    batch
        .iter()
        .map(|s| s.deadline)
        .min()
        .unwrap_or_else(Instant::now)
}

/// Takes what is queued, batch after batch, and hands each non-empty batch
/// to `start` (which leaves it empty) with its place in the `window`: the
/// loop of the standalone and the cluster batchers, which differ only in
/// where a batch goes. Returns once the queue is closed.
pub(super) async fn run_batches(
    mut queue: mpsc::Receiver<QueuedSend>,
    queued: ByteBudget,
    window: BatchWindow,
    mut start: impl FnMut(&mut Vec<QueuedSend>, Option<OwnedSemaphorePermit>),
) {
    let mut batch = Vec::with_capacity(MAX_SEND_BATCH);
    loop {
        let entered = window.enter().await;
        if !next_batch(&mut queue, &queued, &mut batch).await {
            return;
        }
        if !batch.is_empty() {
            start(&mut batch, entered);
        }
    }
}

/// Hands each sender of a batch its outcome, or the batch's failure.
pub(super) fn answer_batch(reply: Result<Reply, Error>, waiters: Vec<SendWaiter>) {
    let outcomes = match reply {
        Ok(Reply::Array(items)) if items.len() == waiters.len() => items,
        failed => {
            let err = match failed {
                // Refused whole (OOM: before the function ran), so none of
                // the batch was written.
                Ok(Reply::Error(err)) => Error::from_redis(&err),
                Ok(other) => Error::Internal(format!("im_send returned {other:?}")),
                Err(err) => err,
            };
            for waiter in waiters {
                waiter.answer(Err(err.clone()));
            }
            return;
        }
    };
    for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
        waiter.answer(send_outcome(outcome));
    }
}
