//! Message storage: one [`Store`] trait, implemented by Redis
//! ([`redis::RedisStore`], the real store) and by an embedded in-process
//! store ([`memory::MemoryStore`], used when no Redis URL is configured).
//! Both pass the same conformance suite (`tests/conformance.rs`).
//!
//! A store assigns each message its `send_time`: microseconds since the
//! epoch, unique and strictly increasing within a chat (the larger of the
//! clock and the chat's last `send_time` + 1).

pub mod memory;
pub mod redis;

use std::future::Future;

use crate::domain::PullQuery;
use crate::proto::Message;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store is down or did not acknowledge the command in time.
    Unavailable,
    /// Too many commands are queued.
    Overloaded,
    /// The store answered something it never should.
    Internal(String),
}

/// One page of a pull.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub messages: Vec<Message>,
    pub has_more: bool,
    /// `send_time` of the last message when `has_more`, else 0.
    pub next_cursor: i64,
}

impl Page {
    /// Builds a page from up to `limit + 1` messages fetched in page order:
    /// the extra one only tells that there is more.
    pub fn from_overfetch(mut messages: Vec<Message>, limit: usize) -> Page {
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        let next_cursor = match messages.last() {
            Some(last) if has_more => last.send_time,
            _ => 0,
        };
        Page {
            messages,
            has_more,
            next_cursor,
        }
    }
}

pub trait Store: Send + Sync + 'static {
    /// Stores a message in the (canonical, validated) `chat`; returns the
    /// `send_time` it got. `Ok` only once the message is durably accepted by
    /// the store.
    fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// One page of `query.chat`, in the order `query.reverse` asks for.
    fn pull(&self, query: &PullQuery) -> impl Future<Output = Result<Page, StoreError>> + Send;
}

/// The store chosen at start-up.
pub enum AnyStore {
    /// Shared by every thread of the process.
    Memory(std::sync::Arc<memory::MemoryStore>),
    Redis(redis::RedisStore),
}

impl Store for AnyStore {
    async fn send(&self, chat: &str, sender: &str, text: &str) -> Result<i64, StoreError> {
        match self {
            AnyStore::Memory(store) => store.send(chat, sender, text).await,
            AnyStore::Redis(store) => store.send(chat, sender, text).await,
        }
    }

    async fn pull(&self, query: &PullQuery) -> Result<Page, StoreError> {
        match self {
            AnyStore::Memory(store) => store.pull(query).await,
            AnyStore::Redis(store) => store.pull(query).await,
        }
    }
}
