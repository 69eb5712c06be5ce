//! The embedded store: every chat a vector sorted by `send_time`, in memory,
//! lost on exit. Chats are spread over shards, each behind its own short
//! critical section, so concurrent chats rarely contend.
//!
//! Idempotency keys live in the shard of their chat, so checking a key and
//! storing the message happen under the same lock, as one step.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::lifecycle::{
    changes_response, may_delete, may_edit, must_reset, reset_response, watermark,
};
use super::retention::Retention;
use super::{Page, PageWriter, Sent, Store};
use crate::domain::PullQuery;
use crate::error::Error;
use crate::notify::{Hub, Waiter};
use crate::proto::{Change, ChangesResponse, StoredMessage};

struct Stored {
    send_time: i64,
    sender: Box<str>,
    text: Box<str>,
    /// 0: never edited.
    edited_at: i64,
}

/// One chat: its visible messages, in `send_time` order (a deleted one is
/// removed, so pages need no filter), and what edits and deletes need.
#[derive(Default)]
struct Chat {
    log: Vec<Stored>,
    /// Deleted messages' senders by `send_time`: a second delete answers as
    /// the first did (see `super::lifecycle`).
    deleted: BTreeMap<i64, Box<str>>,
    /// The last change's sequence (an edit's `edited_at`): changes get
    /// max(clock, this + 1), like send_times.
    last_seq: i64,
    /// The change log, oldest first, trimmed to the retention on write.
    changes: VecDeque<Change>,
}

impl Chat {
    fn next_seq(&mut self) -> i64 {
        self.last_seq = crate::now_micros().max(self.last_seq + 1);
        self.last_seq
    }

    /// Logs a change (an edit when `edited` holds the message) and drops
    /// those older than `keep`.
    fn log_change(&mut self, seq: i64, send_time: i64, edited: Option<&Stored>, keep: i64) {
        self.changes.push_back(Change {
            seq,
            deleted: if edited.is_none() { send_time } else { 0 },
            edited: edited.map(|m| StoredMessage {
                send_time,
                text: m.text.to_string(),
                sender: m.sender.to_string(),
                edited_at: 0,
            }),
        });
        // The newest change stays (see `lifecycle::must_reset`).
        while self.changes.len() > 1 && self.changes.front().is_some_and(|c| c.seq < seq - keep) {
            self.changes.pop_front();
        }
    }

    fn find(&mut self, send_time: i64) -> Option<usize> {
        self.log
            .binary_search_by_key(&send_time, |m| m.send_time)
            .ok()
    }

    /// Drops what is beyond the newest `keep` (0: any number) and up to
    /// `limit` messages older than `floor`, with their tombstones.
    fn trim(&mut self, keep: usize, floor: i64, limit: usize) {
        let mut cut = match keep {
            0 => 0,
            n => self.log.len().saturating_sub(n),
        };
        if floor > 0 {
            let old = self.log.partition_point(|m| m.send_time < floor);
            cut = cut.max(old.min(cut + limit));
        }
        if cut > 0 {
            let oldest_kept = self.log.get(cut).map_or(i64::MAX, |m| m.send_time);
            self.log.drain(..cut);
            self.deleted.retain(|&t, _| t >= oldest_kept);
        }
    }
}

#[derive(Default)]
struct ShardData {
    chats: HashMap<Box<str>, Chat>,
    keys: IdempotencyKeys,
}

type Shard = Mutex<ShardData>;

/// The idempotency keys remembered by one shard.
struct IdempotencyKeys {
    /// `"<chat>\0<key>"` (a key has no NUL, so this is unambiguous) → the
    /// send_time of the message the key stored, a fingerprint of its text
    /// and sender (what a retry is compared with: the message itself may
    /// have been edited or deleted since), and when it is forgotten.
    records: HashMap<Box<str>, (i64, u64, Instant)>,
    /// Expired records are swept out when the map has doubled since the last
    /// sweep: amortised O(1) per insert, and at most twice the live records.
    sweep_at: usize,
}

impl Default for IdempotencyKeys {
    fn default() -> Self {
        IdempotencyKeys {
            records: HashMap::new(),
            sweep_at: MIN_SWEEP,
        }
    }
}

/// Records a shard holds before it first sweeps expired ones.
const MIN_SWEEP: usize = 1024;

impl IdempotencyKeys {
    /// The send_time and fingerprint an unexpired record of `key` holds.
    fn get(&self, key: &str, now: Instant) -> Option<(i64, u64)> {
        match self.records.get(key) {
            Some(&(send_time, print, expires)) if expires > now => Some((send_time, print)),
            _ => None,
        }
    }

    fn insert(&mut self, key: String, sent: (i64, u64), expires: Instant, now: Instant) {
        self.records.insert(key.into(), (sent.0, sent.1, expires));
        if self.records.len() >= self.sweep_at {
            self.records.retain(|_, (_, _, expires)| *expires > now);
            self.sweep_at = (2 * self.records.len()).max(MIN_SWEEP);
        }
    }
}

pub struct MemoryStore {
    shards: Box<[Shard]>,
    hasher: RandomState,
    idempotency_ttl: Duration,
    /// How long the change logs keep a change, in µs.
    change_log_keep: i64,
    /// How much history a chat keeps.
    retention: Retention,
    /// Pulls waiting for new messages (`wait_ms`), woken by `send`.
    hub: Arc<Hub>,
}

const SHARDS: usize = 64;

/// With `--idempotency-ttl-s`' default.
impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(crate::config::Config::defaults().idempotency_ttl)
    }
}

impl MemoryStore {
    /// A store that remembers idempotency keys for `idempotency_ttl`.
    pub fn new(idempotency_ttl: Duration) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            idempotency_ttl,
            change_log_keep: crate::config::Config::defaults()
                .change_log_retention
                .as_micros() as i64,
            retention: Retention::default(),
            hub: Hub::in_process(),
        }
    }

    /// Keeps what `retention` says (`--retain-messages`, `--retain-age-s`).
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Starts the sweep of chats nobody writes to (age retention only),
    /// on a thread of its own that ends with the store.
    pub fn start_sweeper(self: &Arc<Self>) {
        if !super::retention::take_sweeper(&self.retention) {
            return;
        }
        let store = Arc::downgrade(self);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(super::retention::SWEEP_PAUSE);
                let Some(store) = store.upgrade() else { return };
                store.sweep();
            }
        });
    }

    /// Removes every message older than the age window, shard by shard.
    fn sweep(&self) {
        let floor = self.retention.floor(crate::now_micros());
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for chat in shard.chats.values_mut() {
                chat.trim(0, floor, usize::MAX);
            }
        }
    }

    /// Keeps each change for `retention` (`--change-log-retention-s`).
    pub fn with_change_log_retention(mut self, retention: Duration) -> Self {
        self.change_log_keep = retention.as_micros().min(i64::MAX as u128) as i64;
        self
    }

    /// Registers a pull that will wait for `chat` (see [`crate::notify`]).
    pub fn waiter(&self, chat: &str) -> Waiter {
        self.hub.register(chat)
    }

    fn shard(&self, chat: &str) -> std::sync::MutexGuard<'_, ShardData> {
        let i = self.hasher.hash_one(chat) as usize % self.shards.len();
        // A panic while holding the lock cannot leave a chat half-written:
        // every mutation is a single push (for a keyed send, followed by
        // the insert of its record).
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A keyed send: replays the key's message, refuses another one, or
    /// stores it and remembers the key; all under the shard's one lock.
    fn send_once(
        &self,
        shard: &mut ShardData,
        chat: &str,
        sender: &str,
        text: &str,
        key: &str,
    ) -> Result<Sent, Error> {
        let record = format!("{chat}\0{key}");
        let now = Instant::now();
        // Looked up first: its name is allocated only for a new chat.
        let log = match shard.chats.get_mut(chat) {
            Some(log) => log,
            None => shard.chats.entry(chat.into()).or_default(),
        };
        let print = fingerprint(sender, text);
        if let Some((send_time, first)) = shard.keys.get(&record, now) {
            return match first == print {
                true => Ok(Sent {
                    send_time,
                    replayed: true,
                }),
                false => Err(Error::IdempotencyKeyReused),
            };
        }
        let send_time = append(&mut log.log, sender, text);
        self.trim_on_write(log);
        let expires = now + self.idempotency_ttl;
        shard.keys.insert(record, (send_time, print), expires, now);
        Ok(Sent {
            send_time,
            replayed: false,
        })
    }

    /// [`Store::send`], which never waits here: the shard's lock is held
    /// only while the message is appended.
    pub fn send_now(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        let sent = {
            let mut shard = self.shard(chat);
            match idempotency_key {
                Some(key) => self.send_once(&mut shard, chat, sender, text, key)?,
                None => {
                    // Looked up first: its name is allocated only for a new chat.
                    let log = match shard.chats.get_mut(chat) {
                        Some(log) => log,
                        None => shard.chats.entry(chat.into()).or_default(),
                    };
                    let send_time = append(&mut log.log, sender, text);
                    self.trim_on_write(log);
                    Sent {
                        send_time,
                        replayed: false,
                    }
                }
            }
        };
        // After the shard's lock is let go: a woken pull reads at once.
        if !sent.replayed {
            self.hub.notify(chat);
        }
        Ok(sent)
    }

    /// Retention on write: the count window exactly, up to 64 expired.
    fn trim_on_write(&self, chat: &mut Chat) {
        if self.retention.is_on() {
            let floor = self.retention.floor(crate::now_micros());
            chat.trim(self.retention.messages, floor, 64);
        }
    }

    /// [`Store::pull`], which never waits here either: the page is copied
    /// out under the shard's lock.
    pub fn pull_now(&self, query: &PullQuery) -> Page {
        let shard = self.shard(&query.chat);
        let Some(chat) = shard.chats.get(query.chat.as_str()) else {
            return Page::default();
        };
        // Nothing older than the retention window, trimmed yet or not.
        let floor = self.retention.floor(crate::now_micros());
        let log = &chat.log[chat.log.partition_point(|m| m.send_time < floor)..];
        let mut page = PageWriter::new(&query.chat, query.limit);
        let mut push = |m: &Stored| page.push(&m.text, &m.sender, m.send_time, m.edited_at);
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
        page.finish()
    }
}

/// A send's fingerprint for its idempotency record: SipHash with fixed
/// keys, the same in every run.
fn fingerprint(sender: &str, text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)] // SipHasher: stable output, unlike DefaultHasher's promise.
    let mut hasher = std::hash::SipHasher::new();
    (sender, text).hash(&mut hasher);
    hasher.finish()
}

/// Appends a message to a chat's log; returns its send_time.
fn append(log: &mut Vec<Stored>, sender: &str, text: &str) -> i64 {
    let now = crate::now_micros();
    let send_time = match log.last() {
        Some(last) if last.send_time >= now => last.send_time + 1,
        _ => now,
    };
    log.push(Stored {
        send_time,
        sender: sender.into(),
        text: text.into(),
        edited_at: 0,
    });
    send_time
}

impl Store for MemoryStore {
    async fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        self.send_now(chat, sender, text, idempotency_key)
    }

    async fn pull(&self, query: &PullQuery) -> Result<Page, Error> {
        Ok(self.pull_now(query))
    }

    async fn edit(
        &self,
        chat: &str,
        send_time: i64,
        text: &str,
        actor: Option<&str>,
    ) -> Result<i64, Error> {
        let edited_at = {
            let mut shard = self.shard(chat);
            let floor = self.retention.floor(crate::now_micros());
            let chat = shard.chats.get_mut(chat).ok_or(Error::MessageNotFound)?;
            let i = chat.find(send_time).filter(|_| send_time >= floor);
            let i = i.ok_or(Error::MessageNotFound)?;
            if !may_edit(&chat.log[i].sender, actor) {
                return Err(Error::Forbidden);
            }
            let edited_at = chat.next_seq();
            let message = &mut chat.log[i];
            message.text = text.into();
            message.edited_at = edited_at;
            let message = &chat.log[i];
            let edited = Stored {
                send_time,
                sender: message.sender.clone(),
                text: message.text.clone(),
                edited_at,
            };
            chat.log_change(edited_at, send_time, Some(&edited), self.change_log_keep);
            edited_at
        };
        self.hub.notify(chat);
        Ok(edited_at)
    }

    async fn delete(
        &self,
        chat: &str,
        send_time: i64,
        actor: Option<&str>,
        admin: bool,
    ) -> Result<(), Error> {
        {
            let mut shard = self.shard(chat);
            let floor = self.retention.floor(crate::now_micros());
            let chat = shard.chats.get_mut(chat).ok_or(Error::MessageNotFound)?;
            if send_time < floor {
                return Err(Error::MessageNotFound);
            }
            let Some(i) = chat.find(send_time) else {
                return match chat.deleted.get(&send_time) {
                    Some(sender) if may_delete(sender, actor, admin) => Ok(()),
                    Some(_) => Err(Error::Forbidden),
                    None => Err(Error::MessageNotFound),
                };
            };
            if !may_delete(&chat.log[i].sender, actor, admin) {
                return Err(Error::Forbidden);
            }
            let seq = chat.next_seq();
            chat.log_change(seq, send_time, None, self.change_log_keep);
            let gone = chat.log.remove(i);
            chat.deleted.insert(send_time, gone.sender);
        }
        self.hub.notify(chat);
        Ok(())
    }

    async fn changes(
        &self,
        chat: &str,
        after: i64,
        limit: usize,
    ) -> Result<ChangesResponse, Error> {
        let now = crate::now_micros();
        let mark = watermark(now, self.change_log_keep);
        let shard = self.shard(chat);
        let log = shard.chats.get(chat).map(|c| &c.changes);
        let oldest = log.and_then(|c| c.front()).map(|c| c.seq);
        if after != 0 && must_reset(after, oldest, now, self.change_log_keep) {
            return Ok(reset_response(mark));
        }
        let from = if after == 0 { mark } else { after };
        let mut newer = log.into_iter().flatten().skip_while(|c| c.seq <= from);
        let changes: Vec<Change> = newer.by_ref().take(limit).cloned().collect();
        let more = newer.next().is_some();
        Ok(changes_response(from, changes, more, mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_idempotency_records_are_swept() {
        let mut keys = IdempotencyKeys::default();
        let start = Instant::now();
        let ttl = Duration::from_secs(1);
        // Each record is expired by the time the next 10 are made.
        for i in 0..100_000u64 {
            let now = start + Duration::from_millis(100 * i);
            keys.insert(format!("c\0{i}"), (i as i64, 0), now + ttl, now);
            assert!(
                keys.records.len() < 2 * MIN_SWEEP,
                "{} records",
                keys.records.len()
            );
        }
        let now = start + Duration::from_millis(100 * 99_999);
        assert_eq!(keys.get("c\099999", now), Some((99_999, 0)));
        assert_eq!(keys.get("c\099999", now + ttl), None, "expired");
    }
}
