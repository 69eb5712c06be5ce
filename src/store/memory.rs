//! The embedded store: every chat a vector sorted by `send_time`, in memory,
//! lost on exit. Chats are spread over shards, each behind its own short
//! critical section, so concurrent chats rarely contend.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};

use super::{Page, PageWriter, Store, StoreError};
use crate::domain::PullQuery;

struct Stored {
    send_time: i64,
    sender: Box<str>,
    text: Box<str>,
}

type Shard = Mutex<HashMap<Box<str>, Vec<Stored>>>;

pub struct MemoryStore {
    shards: Box<[Shard]>,
    hasher: RandomState,
}

const SHARDS: usize = 64;

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl MemoryStore {
    fn shard(&self, chat: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Vec<Stored>>> {
        let i = self.hasher.hash_one(chat) as usize % self.shards.len();
        // A panic while holding the lock cannot leave a chat half-written:
        // every mutation is a single push.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    async fn send(&self, chat: &str, sender: &str, text: &str) -> Result<i64, StoreError> {
        let mut shard = self.shard(chat);
        let log = match shard.get_mut(chat) {
            Some(log) => log,
            None => shard.entry(chat.into()).or_default(),
        };
        let now = crate::now_micros();
        let send_time = match log.last() {
            Some(last) if last.send_time >= now => last.send_time + 1,
            _ => now,
        };
        log.push(Stored {
            send_time,
            sender: sender.into(),
            text: text.into(),
        });
        Ok(send_time)
    }

    async fn pull(&self, query: &PullQuery) -> Result<Page, StoreError> {
        let shard = self.shard(&query.chat);
        let Some(log) = shard.get(query.chat.as_str()) else {
            return Ok(Page::default());
        };
        let mut page = PageWriter::new(&query.chat, query.limit);
        let mut push = |m: &Stored| page.push(&m.text, &m.sender, m.send_time);
        if query.reverse {
            // Oldest first, strictly after the cursor.
            let start = match query.cursor {
                0 => 0,
                c => log.partition_point(|m| m.send_time <= c),
            };
            log[start..].iter().take_while(|m| push(m)).for_each(drop);
        } else {
            // Newest first, strictly before the cursor.
            let end = match query.cursor {
                0 => log.len(),
                c => log.partition_point(|m| m.send_time < c),
            };
            log[..end]
                .iter()
                .rev()
                .take_while(|m| push(m))
                .for_each(drop);
        }
        Ok(page.finish())
    }
}
