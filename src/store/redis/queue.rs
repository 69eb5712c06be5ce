//! The send queue, the front of the batcher: what a queued send is, who
//! waits for it, and the byte budget of what is queued.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::RedisOptions;
use super::schema::{chat_key, encode_member, idempotency_record_key};
use crate::error::Error;
use crate::mux::ByteBudget;
use crate::store::{Completion, Sent};

pub(in crate::store) struct QueuedSend {
    pub(in crate::store) key: String,
    pub(in crate::store) member: Vec<u8>,
    /// When the caller stops waiting (and answers 503): a send still queued
    /// then must never be written.
    pub(in crate::store) deadline: Instant,
    /// With an idempotency key, its record.
    pub(in crate::store) record: Option<IdempotencyRecord>,
    pub(in crate::store) reply: SendWaiter,
}

/// Who is told how a queued send ended.
pub(in crate::store) enum SendWaiter {
    /// A caller awaiting it ([`SendQueue::send`]).
    Caller(oneshot::Sender<Result<Sent, Error>>),
    /// A callback ([`SendQueue::start`]).
    Then(Completion),
}

impl SendWaiter {
    /// Whether nobody waits any more (a callback always runs).
    pub(super) fn is_closed(&self) -> bool {
        match self {
            SendWaiter::Caller(reply) => reply.is_closed(),
            SendWaiter::Then(_) => false,
        }
    }

    pub(in crate::store) fn answer(self, outcome: Result<Sent, Error>) {
        match self {
            SendWaiter::Caller(reply) => {
                let _ = reply.send(outcome);
            }
            SendWaiter::Then(done) => done.complete(outcome),
        }
    }
}

impl QueuedSend {
    /// What it counts against [`SendQueue`]'s byte budget.
    pub(super) fn bytes(&self) -> usize {
        self.key.len() + self.member.len() + self.record.as_ref().map_or(0, |r| r.key.len())
    }
}

#[derive(Clone)]
pub(in crate::store) struct IdempotencyRecord {
    pub(super) key: String,
    /// Seconds, as `SET ... EX` takes them.
    pub(super) ttl: String,
}
/// A keyed send whose first attempt failed without an answer is sent once
/// more after this pause, which lets the connection reconnect (its backoff
/// starts at 25 ms), if the Redis timeout leaves room for it.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The front of a send batcher, shared by the standalone and cluster
/// stores: the channel, the byte budget of what is in it, and what every
/// send is stored with (timeout, idempotency-record TTL).
pub(in crate::store) struct SendQueue {
    sends: mpsc::Sender<QueuedSend>,
    bytes: ByteBudget,
    timeout: Duration,
    /// `EX` of idempotency records, in seconds.
    idempotency_ttl: String,
}

impl SendQueue {
    /// The queue, and the batcher's end of it: the receiver and the budget
    /// it releases as it takes sends.
    pub(in crate::store) fn new(
        options: &RedisOptions,
    ) -> (SendQueue, mpsc::Receiver<QueuedSend>, ByteBudget) {
        let (sends, queue) = mpsc::channel(options.queue.max(1));
        let bytes = ByteBudget::new(options.max_queued_bytes);
        let front = SendQueue {
            sends,
            bytes: bytes.clone(),
            timeout: options.timeout,
            idempotency_ttl: options.idempotency_ttl.as_secs().max(1).to_string(),
        };
        (front, queue, bytes)
    }

    /// Stores `(chat, sender, text)` within the timeout. With an idempotency
    /// key, a first attempt whose outcome is unknown (connection lost, maybe
    /// after the write; or not connected) is made once more: the key makes a
    /// second store impossible. Without one, never: the first attempt may
    /// have stored the message.
    pub(in crate::store) async fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        let deadline = Instant::now() + self.timeout;
        let key = chat_key(chat);
        let member = encode_member(text, sender);
        let Some(idempotency_key) = idempotency_key else {
            return self.queue(key, member, None, deadline).await;
        };
        let record = IdempotencyRecord {
            key: idempotency_record_key(chat, idempotency_key),
            ttl: self.idempotency_ttl.clone(),
        };
        let first = self
            .queue(key.clone(), member.clone(), Some(record.clone()), deadline)
            .await;
        match first {
            Err(Error::Unavailable | Error::Lost | Error::Timeout)
                if Instant::now() + RETRY_PAUSE < deadline =>
            {
                tokio::time::sleep(RETRY_PAUSE).await;
                self.queue(key, member, Some(record), deadline).await
            }
            other => other,
        }
    }

    /// Queues an un-keyed send; `done` runs with its outcome, by the
    /// timeout at the latest (the batch's reply task times it out).
    pub(in crate::store) fn start(&self, chat: &str, sender: &str, text: &str, done: Completion) {
        self.enqueue(QueuedSend {
            key: chat_key(chat),
            member: encode_member(text, sender),
            deadline: Instant::now() + self.timeout,
            record: None,
            reply: SendWaiter::Then(done),
        });
    }

    /// Hands `queued` to the batcher, or answers it `Overloaded` at once.
    fn enqueue(&self, queued: QueuedSend) {
        let bytes = queued.bytes();
        if !self.bytes.add(bytes) {
            return queued.reply.answer(Err(Error::Overloaded));
        }
        if let Err(refused) = self.sends.try_send(queued) {
            self.bytes.release(bytes);
            refused.into_inner().reply.answer(Err(Error::Overloaded));
        }
    }

    /// Queues one send for the batcher and waits for its answer until `deadline`.
    async fn queue(
        &self,
        key: String,
        member: Vec<u8>,
        record: Option<IdempotencyRecord>,
        deadline: Instant,
    ) -> Result<Sent, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(QueuedSend {
            key,
            member,
            deadline,
            record,
            reply: SendWaiter::Caller(reply),
        });
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            // The batcher is gone, or Redis did not answer in time.
            Ok(Err(_)) | Err(_) => Err(Error::Unavailable),
        }
    }
}
