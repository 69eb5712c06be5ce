//! Message storage: one [`Store`] trait, implemented by Redis
//! ([`redis::RedisStore`], the real store; [`redis::ClusterStore`] on a
//! Redis Cluster) and by an embedded in-process
//! store ([`memory::MemoryStore`], used when no Redis URL is configured).
//! Both pass the same conformance suite (`tests/conformance.rs`).
//!
//! A store assigns each message its `send_time`: microseconds since the
//! epoch, unique and strictly increasing within a chat (the larger of the
//! clock and the chat's last `send_time` + 1).
//!
//! A send may carry an idempotency key: within the retention window, the
//! same key in the same chat stores one message, and every later send with
//! it gets the first one's `send_time` back (`replayed`), or
//! [`Error::IdempotencyKeyReused`] if its text or sender differ. The
//! check and the store are one atomic step, like the `send_time` rule.
//!
//! A store fails with [`Error`]: `Overloaded` when its queue is full (nothing
//! was stored); `Unavailable`, `Lost` or `Timeout` when it is down or did not
//! acknowledge in time (a send may or may not be stored); `Internal` when it
//! answered something it never should.

pub mod lifecycle;
pub mod memory;
pub mod redis;
pub mod retention;
pub mod subscriber;

use std::future::Future;

use crate::domain::PullQuery;
use crate::error::Error;
use crate::proto::fields::{message, pull_response};
use crate::wire;

/// A callback for the outcome of a send (or of a pull: `Completion<Page>`),
/// for a caller that would rather not wait ([`AnyStore::start_send`],
/// [`AnyStore::start_pull`]): it runs exactly once, where the
/// outcome is known (for Redis, in the task that reads the replies). Dropped
/// without having run (its batch or the store gone), it runs with
/// [`Error::Unavailable`], so no caller is left without an answer.
pub struct Completion<T = Sent>(Option<Then<T>>);

type Then<T> = Box<dyn FnOnce(Result<T, Error>) + Send>;

impl<T> Completion<T> {
    pub fn new(then: impl FnOnce(Result<T, Error>) + Send + 'static) -> Completion<T> {
        Completion(Some(Box::new(then)))
    }

    pub fn complete(mut self, outcome: Result<T, Error>) {
        if let Some(then) = self.0.take() {
            then(outcome);
        }
    }
}

impl<T> Drop for Completion<T> {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            then(Err(Error::Unavailable));
        }
    }
}

/// What a send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub send_time: i64,
    /// Nothing was stored: the idempotency key names an earlier, identical
    /// send, whose `send_time` this is.
    pub replayed: bool,
}

/// One page of a pull, already encoded as the body of an OK `PullResponse`
/// (code 0 and an empty msg are proto3 defaults and take no bytes), so the
/// RPC server sends it as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub wire: Vec<u8>,
    pub count: usize,
    pub has_more: bool,
    /// `send_time` of the last message when `has_more`, else 0.
    pub next_cursor: i64,
}

/// Builds a [`Page`] from messages given in page order, borrowed from the
/// store: nothing is copied but into the encoding.
pub struct PageWriter<'a> {
    chat: &'a str,
    limit: usize,
    page: Page,
    last_send_time: i64,
}

impl<'a> PageWriter<'a> {
    pub fn new(chat: &'a str, limit: usize) -> Self {
        PageWriter {
            chat,
            limit,
            page: Page::default(),
            last_send_time: 0,
        }
    }

    /// Makes room for messages whose text and sender take `bytes` in all
    /// (a store that knows its page's size before writing it): the page
    /// then grows once, not by doubling from nothing (eight reallocations
    /// for a page of ten short messages; `malloc`/`realloc`/`free` were
    /// 8.5% of the all-in-one's CPU under pulls).
    pub fn reserve(&mut self, messages: usize, bytes: usize) {
        let per_message = self.chat.len() + 32;
        let messages = messages.min(self.limit);
        self.page.wire.reserve(bytes + messages * per_message + 24);
    }

    /// Adds the next message. Stores fetch one more than the limit: pushing
    /// that one only records that there is more, and returns false.
    /// `edited_at`: 0 = never edited (then not on the wire).
    pub fn push(&mut self, text: &str, sender: &str, send_time: i64, edited_at: i64) -> bool {
        if self.page.count == self.limit {
            self.page.has_more = true;
            return false;
        }
        let strings = [
            (message::CHAT, self.chat),
            (message::TEXT, text),
            (message::SENDER, sender),
        ];
        let len: usize = strings
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|&(tag, s)| wire::bytes_field_len(tag, s.len()))
            .sum::<usize>()
            + wire::varint_field_len(message::SEND_TIME, send_time as u64)
            + match edited_at {
                0 => 0,
                t => wire::varint_field_len(message::EDITED_AT, t as u64),
            };
        let out = &mut self.page.wire;
        prost::encoding::encode_key(
            pull_response::MESSAGES,
            prost::encoding::WireType::LengthDelimited,
            out,
        );
        prost::encoding::encode_varint(len as u64, out);
        for (tag, s) in strings {
            wire::put_bytes_field(out, tag, s.as_bytes());
        }
        wire::put_varint_field(out, message::SEND_TIME, send_time as u64);
        if edited_at != 0 {
            wire::put_varint_field(out, message::EDITED_AT, edited_at as u64);
        }
        self.page.count += 1;
        self.last_send_time = send_time;
        true
    }

    pub fn finish(mut self) -> Page {
        if self.page.has_more {
            self.page.next_cursor = self.last_send_time;
            let out = &mut self.page.wire;
            wire::put_varint_field(out, pull_response::HAS_MORE, 1);
            wire::put_varint_field(out, pull_response::NEXT_CURSOR, self.last_send_time as u64);
        }
        self.page
    }
}

pub trait Store: Send + Sync + 'static {
    /// Stores a message in the (canonical, validated) `chat`; returns the
    /// `send_time` it got. `Ok` only once the message is durably accepted by
    /// the store. With a (validated) `idempotency_key` already used in this
    /// chat within the retention window, stores nothing and answers as
    /// described in the module documentation.
    fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> impl Future<Output = Result<Sent, Error>> + Send;

    /// One page of `query.chat`, in the order `query.reverse` asks for.
    fn pull(&self, query: &PullQuery) -> impl Future<Output = Result<Page, Error>> + Send;

    /// Replaces the text of the message at `send_time` in the (canonical)
    /// `chat`, keeping its place; returns its `edited_at` (µs, unique and
    /// increasing within the chat). `actor`: the authenticated user, who
    /// must be its sender ([`Error::Forbidden`]); `None` = anyone.
    /// [`Error::MessageNotFound`] if the chat holds no such message.
    fn edit(
        &self,
        chat: &str,
        send_time: i64,
        text: &str,
        actor: Option<&str>,
    ) -> impl Future<Output = Result<i64, Error>> + Send;

    /// Deletes the message at `send_time`; a message already deleted
    /// answers `Ok` again (to whoever could have deleted it). `admin` may
    /// delete anyone's message.
    fn delete(
        &self,
        chat: &str,
        send_time: i64,
        actor: Option<&str>,
        admin: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The chat's changes after `after` (at most `limit`), oldest first;
    /// see `ChangesRequest` in `proto/im.proto`.
    fn changes(
        &self,
        chat: &str,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<crate::proto::ChangesResponse, Error>> + Send;
}

/// The store chosen at start-up, as every shard shares it: the one place
/// the kinds of store are listed ([`StoreChoice::open`] makes each shard's
/// [`AnyStore`] of it).
#[derive(Clone)]
pub enum StoreChoice {
    Memory(std::sync::Arc<memory::MemoryStore>),
    /// Each shard opens its own connections; waiting pulls share the hub
    /// that the process's one subscriber connection feeds.
    Redis(
        crate::resp::url::RedisTarget,
        std::sync::Arc<crate::notify::Hub>,
    ),
    /// The slot map is shared; each shard opens its own connections; the
    /// hub is fed by one subscriber connection per master.
    Cluster(
        std::sync::Arc<redis::ClusterShared>,
        std::sync::Arc<crate::notify::Hub>,
    ),
}

impl StoreChoice {
    /// One shard's store. Call on the shard's runtime.
    pub fn open(&self, options: &redis::RedisOptions) -> AnyStore {
        match self {
            StoreChoice::Memory(memory) => AnyStore::Memory(memory.clone()),
            StoreChoice::Redis(target, hub) => AnyStore::Redis(
                redis::RedisStore::new(target.clone(), options).with_hub(hub.clone()),
            ),
            StoreChoice::Cluster(shared, hub) => AnyStore::Cluster(
                redis::ClusterStore::new(shared.clone(), options).with_hub(hub.clone()),
            ),
        }
    }
}

/// One shard's store (see [`StoreChoice`]).
pub enum AnyStore {
    /// Shared by every thread of the process.
    Memory(std::sync::Arc<memory::MemoryStore>),
    Redis(redis::RedisStore),
    Cluster(redis::ClusterStore),
}

impl AnyStore {
    /// Registers a pull that will wait for new messages in `chat`; `None`
    /// if this store cannot announce them.
    pub fn waiter(&self, chat: &str) -> Option<crate::notify::Waiter> {
        match self {
            AnyStore::Memory(store) => Some(store.waiter(chat)),
            AnyStore::Redis(store) => store.waiter(chat),
            AnyStore::Cluster(store) => store.waiter(chat),
        }
    }

    /// Stores an un-keyed send and runs `done` with the outcome, without a
    /// task or a timer of its own: the RPC server's path for sends. (A task
    /// per call cost the RPC server ~20 % of its CPU per send under `perf`:
    /// its 2 KB, 128-aligned cell went through glibc's memalign and
    /// `malloc_consolidate`; the per-send timer and oneshot came on top.)
    /// `chat` is canonical and the send validated, as for [`Store::send`].
    /// The embedded store runs `done` at once; Redis, as a [`Completion`].
    pub fn start_send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        done: impl FnOnce(Result<Sent, Error>) + Send + 'static,
    ) {
        match self {
            AnyStore::Memory(store) => done(store.send_now(chat, sender, text, None)),
            AnyStore::Redis(store) => store.start_send(chat, sender, text, Completion::new(done)),
            AnyStore::Cluster(store) => store.start_send(chat, sender, text, Completion::new(done)),
        }
    }

    /// Reads one page (a pull that does not wait) and runs `done` with it,
    /// as [`AnyStore::start_send`] stores: the embedded store at once, a
    /// Redis through a [`Completion`] (see [`redis::RedisEngine::start_pull`]).
    pub fn start_pull(
        &self,
        query: PullQuery,
        done: impl FnOnce(Result<Page, Error>) + Send + 'static,
    ) {
        match self {
            AnyStore::Memory(store) => done(Ok(store.pull_now(&query))),
            AnyStore::Redis(store) => store.start_pull(query, Completion::new(done)),
            AnyStore::Cluster(store) => store.start_pull(query, Completion::new(done)),
        }
    }

    /// Whether the store answers now (the RPC `Ping` with `store` set, for
    /// the gateway's `GET /ready`): `Err` says why not. The embedded store
    /// always does.
    pub async fn ping(&self) -> Result<(), String> {
        match self {
            AnyStore::Memory(_) => Ok(()),
            AnyStore::Redis(store) => store.ping().await,
            AnyStore::Cluster(store) => store.ping().await,
        }
    }
}

impl Store for AnyStore {
    async fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        match self {
            AnyStore::Memory(store) => store.send(chat, sender, text, idempotency_key).await,
            AnyStore::Redis(store) => store.send(chat, sender, text, idempotency_key).await,
            AnyStore::Cluster(store) => store.send(chat, sender, text, idempotency_key).await,
        }
    }

    async fn pull(&self, query: &PullQuery) -> Result<Page, Error> {
        match self {
            AnyStore::Memory(store) => store.pull(query).await,
            AnyStore::Redis(store) => store.pull(query).await,
            AnyStore::Cluster(store) => store.pull(query).await,
        }
    }

    async fn edit(
        &self,
        chat: &str,
        send_time: i64,
        text: &str,
        actor: Option<&str>,
    ) -> Result<i64, Error> {
        match self {
            AnyStore::Memory(store) => store.edit(chat, send_time, text, actor).await,
            AnyStore::Redis(store) => store.edit(chat, send_time, text, actor).await,
            AnyStore::Cluster(store) => store.edit(chat, send_time, text, actor).await,
        }
    }

    async fn delete(
        &self,
        chat: &str,
        send_time: i64,
        actor: Option<&str>,
        admin: bool,
    ) -> Result<(), Error> {
        match self {
            AnyStore::Memory(store) => store.delete(chat, send_time, actor, admin).await,
            AnyStore::Redis(store) => store.delete(chat, send_time, actor, admin).await,
            AnyStore::Cluster(store) => store.delete(chat, send_time, actor, admin).await,
        }
    }

    async fn changes(
        &self,
        chat: &str,
        after: i64,
        limit: usize,
    ) -> Result<crate::proto::ChangesResponse, Error> {
        match self {
            AnyStore::Memory(store) => store.changes(chat, after, limit).await,
            AnyStore::Redis(store) => store.changes(chat, after, limit).await,
            AnyStore::Cluster(store) => store.changes(chat, after, limit).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::{Message, PullResponse};

    #[test]
    fn a_completion_runs_once_and_a_dropped_one_answers_unavailable() {
        let (tx, rx) = std::sync::mpsc::channel();
        let completion =
            |tx: std::sync::mpsc::Sender<_>| Completion::new(move |o| tx.send(o).unwrap());
        let sent = Sent {
            send_time: 7,
            replayed: false,
        };
        completion(tx.clone()).complete(Ok(sent));
        drop(completion(tx));
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            [Ok(sent), Err(Error::Unavailable)]
        );
    }

    #[test]
    fn page_writer_encodes_what_prost_decodes() {
        let mut writer = PageWriter::new("a:b", 2);
        assert!(writer.push("hello 😀", "a", 30, 0));
        assert!(writer.push("", "b", 20, 25)); // empty strings are omitted, as proto3 does
        assert!(!writer.push("one too many", "a", 10, 0));
        let page = writer.finish();
        assert_eq!((page.count, page.has_more, page.next_cursor), (2, true, 20));
        let decoded = PullResponse::decode(&page.wire[..]).expect("valid PullResponse");
        let message = |text: &str, sender: &str, send_time, edited_at| Message {
            chat: "a:b".into(),
            text: text.into(),
            sender: sender.into(),
            send_time,
            edited_at,
        };
        assert_eq!(
            decoded,
            PullResponse {
                messages: vec![message("hello 😀", "a", 30, 0), message("", "b", 20, 25)],
                has_more: true,
                next_cursor: 20,
                ..PullResponse::default()
            }
        );
        let last_page = PageWriter::new("c", 10);
        assert_eq!(
            PullResponse::decode(&last_page.finish().wire[..]),
            Ok(PullResponse::default())
        );
    }
}
