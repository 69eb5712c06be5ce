//! The embedded store: every chat a vector sorted by `send_time`, in memory,
//! lost on exit. Chats are spread over shards, each behind its own short
//! critical section, so concurrent chats rarely contend.
//!
//! Idempotency keys live in the shard of their chat, so checking a key and
//! storing the message happen under the same lock, as one step.
//!
//! What the store holds is counted against a limit
//! (`--memory-store-max-bytes`, see [`Footprint`]): without one, any client
//! that may send could grow the process until the machine runs out of memory
//! (issue 20). A send or an edit that would pass it is refused with
//! [`Error::StorageFull`] before anything is written; deletes, retention and
//! expired idempotency records give the bytes back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The highest send_time given: the next is max(clock, this + 1). Not
    /// the log's last, which a delete or a trim may have taken: a new
    /// message must never get a deleted one's send_time (cursors and
    /// tombstones name messages by it).
    top: i64,
    /// The change log, oldest first, trimmed to the retention on write.
    changes: VecDeque<Change>,
}

impl Chat {
    /// Appends a message; returns its send_time and the bytes it added.
    fn append(&mut self, sender: &str, text: &str) -> (i64, usize) {
        let send_time = crate::now_micros().max(self.top + 1);
        self.top = send_time;
        let capacity = self.log.capacity();
        self.log.push(Stored {
            send_time,
            sender: sender.into(),
            text: text.into(),
            edited_at: 0,
        });
        let grown = (self.log.capacity() - capacity) * size_of::<Stored>();
        (send_time, grown + message_bytes(sender, text))
    }

    /// What appending a message adds, before it is appended: its bytes, the
    /// log's growth if it is full, less what count retention (`keep`) then
    /// removes, the oldest message.
    fn append_cost(&self, sender: &str, text: &str, keep: usize) -> (usize, usize) {
        let growth = match self.log.len() == self.log.capacity() {
            true => self.log.capacity().max(4) * size_of::<Stored>(),
            false => 0,
        };
        let freed = match self.log.first() {
            Some(oldest) if keep > 0 && self.log.len() >= keep => stored_bytes(oldest),
            _ => 0,
        };
        (message_bytes(sender, text) + growth, freed)
    }

    fn next_seq(&mut self) -> i64 {
        self.last_seq = crate::now_micros().max(self.last_seq + 1);
        self.last_seq
    }

    /// Logs a change (an edit when `edited` holds the message) and drops
    /// those older than `keep`; returns the bytes added and those freed.
    fn log_change(
        &mut self,
        seq: i64,
        send_time: i64,
        edited: Option<&Stored>,
        keep: i64,
    ) -> (usize, usize) {
        let change = Change {
            seq,
            deleted: if edited.is_none() { send_time } else { 0 },
            edited: edited.map(|m| StoredMessage {
                send_time,
                text: m.text.to_string(),
                sender: m.sender.to_string(),
                ..StoredMessage::default()
            }),
        };
        let added = change_bytes(&change);
        self.changes.push_back(change);
        let mut freed = 0;
        // The newest change stays (see `lifecycle::must_reset`).
        while self.changes.len() > 1 && self.changes.front().is_some_and(|c| c.seq < seq - keep) {
            freed += self.changes.pop_front().as_ref().map_or(0, change_bytes);
        }
        (added, freed)
    }

    fn find(&mut self, send_time: i64) -> Option<usize> {
        self.log
            .binary_search_by_key(&send_time, |m| m.send_time)
            .ok()
    }

    /// Drops what is beyond the newest `keep` (0: any number) and up to
    /// `limit` messages older than `floor`, with their tombstones; returns
    /// the bytes freed.
    fn trim(&mut self, keep: usize, floor: i64, limit: usize) -> usize {
        let mut cut = match keep {
            0 => 0,
            n => self.log.len().saturating_sub(n),
        };
        if floor > 0 {
            let old = self.log.partition_point(|m| m.send_time < floor);
            cut = cut.max(old.min(cut + limit));
        }
        if cut == 0 {
            return 0;
        }
        let oldest_kept = self.log.get(cut).map_or(i64::MAX, |m| m.send_time);
        let mut freed: usize = self.log.drain(..cut).map(|m| stored_bytes(&m)).sum();
        self.deleted.retain(|&t, sender| {
            let kept = t >= oldest_kept;
            if !kept {
                freed += tombstone_bytes(sender);
            }
            kept
        });
        freed
    }
}

/// What the limit counts per heap allocation besides its bytes: the
/// allocator's header and rounding (glibc: 8 bytes of header, 16-byte
/// steps).
const ALLOCATION: usize = 16;

/// A message's text and sender; its slot in the log is counted with the
/// log's capacity.
fn message_bytes(sender: &str, text: &str) -> usize {
    sender.len() + text.len() + 2 * ALLOCATION
}

fn stored_bytes(m: &Stored) -> usize {
    message_bytes(&m.sender, &m.text)
}

/// A change log entry (the deque's slots counted twice for its slack).
fn change_bytes(c: &Change) -> usize {
    match &c.edited {
        Some(m) => edit_change_bytes(&m.sender, &m.text),
        None => 2 * size_of::<Change>(),
    }
}

/// An edit's change log entry, which holds the edited message.
fn edit_change_bytes(sender: &str, text: &str) -> usize {
    2 * size_of::<Change>() + size_of::<StoredMessage>() + message_bytes(sender, text)
}

/// A deleted message's tombstone (a B-tree entry, nodes about half full).
fn tombstone_bytes(sender: &str) -> usize {
    2 * size_of::<(i64, Box<str>)>() + sender.len() + ALLOCATION
}

/// A chat's entry in its shard's map (slots counted twice for its slack).
fn chat_bytes(name: &str) -> usize {
    2 * size_of::<(Box<str>, Chat)>() + name.len() + ALLOCATION
}

/// An idempotency record (slots counted twice, as for chats).
fn record_bytes(key: &str) -> usize {
    2 * size_of::<(Box<str>, (i64, u64, Instant))>() + key.len() + ALLOCATION
}

/// The bytes the store holds, counted as the functions above count them,
/// against its limit. The count is exact for what the store holds (each
/// change adds or takes back what it changed) and leaves out the fixed
/// tables (64 shards, empty). Two threads may pass the check at once, so
/// the limit can be passed by one message per thread.
struct Footprint {
    held: AtomicUsize,
    limit: usize,
}

impl Footprint {
    /// Whether `incoming` more bytes fit once `freed` are given back.
    fn admits(&self, incoming: usize, freed: usize) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        held.saturating_add(incoming) <= self.limit.saturating_add(freed)
    }

    fn admit(&self, incoming: usize, freed: usize) -> Result<(), Error> {
        match self.admits(incoming, freed) {
            true => Ok(()),
            false => Err(Error::StorageFull),
        }
    }

    /// Counts `added` bytes more and `freed` fewer.
    fn apply(&self, added: usize, freed: usize) {
        if added == freed {
            return;
        }
        let delta = added as i64 - freed as i64;
        if added > freed {
            self.held.fetch_add(added - freed, Ordering::Relaxed);
        } else {
            self.held.fetch_sub(freed - added, Ordering::Relaxed);
        }
        crate::metrics::adjust(crate::metrics::Gauge::MemoryStoreBytes, delta);
    }
}

impl Drop for Footprint {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        crate::metrics::adjust(crate::metrics::Gauge::MemoryStoreBytes, -(held as i64));
    }
}

/// `--memory-store-max-bytes` unset: 1 GiB, or a quarter of the machine's
/// memory if that is less.
pub fn default_limit() -> usize {
    const GIB: usize = 1 << 30;
    match crate::budget::machine_memory() {
        Some(ram) => GIB.min(ram / 4).max(64 << 20),
        None => GIB,
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

    /// Remembers a record; returns the bytes added and those of expired
    /// records swept out.
    fn insert(
        &mut self,
        key: String,
        sent: (i64, u64),
        expires: Instant,
        now: Instant,
    ) -> (usize, usize) {
        let added = record_bytes(&key);
        let freed = match self.records.insert(key.into(), (sent.0, sent.1, expires)) {
            // An expired record of the same key, replaced.
            Some(_) => added,
            None => 0,
        };
        if self.records.len() < self.sweep_at {
            return (added, freed);
        }
        let mut swept = 0;
        self.records.retain(|key, (_, _, expires)| {
            let live = *expires > now;
            if !live {
                swept += record_bytes(key);
            }
            live
        });
        self.sweep_at = (2 * self.records.len()).max(MIN_SWEEP);
        (added, freed + swept)
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
    /// What it holds, against `--memory-store-max-bytes`.
    footprint: Footprint,
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
            footprint: Footprint {
                held: AtomicUsize::new(0),
                limit: default_limit(),
            },
            hub: Hub::in_process(),
        }
    }

    /// Holds at most `bytes` (`--memory-store-max-bytes`).
    pub fn with_limit(mut self, bytes: usize) -> Self {
        self.footprint.limit = bytes;
        self
    }

    /// The bytes it holds, as the limit counts them.
    pub fn held_bytes(&self) -> usize {
        self.footprint.held.load(Ordering::Relaxed)
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
            let freed = shard
                .chats
                .values_mut()
                .map(|chat| chat.trim(0, floor, usize::MAX))
                .sum();
            self.footprint.apply(0, freed);
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

    /// Announces `chat` without storing anything: what a late announcement
    /// of a message already read looks like to a waiter (tests).
    #[cfg(test)]
    pub fn announce(&self, chat: &str) {
        self.hub.notify(chat);
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
        let print = fingerprint(sender, text);
        if let Some((send_time, first)) = shard.keys.get(&record, Instant::now()) {
            return match first == print {
                true => Ok(Sent {
                    send_time,
                    replayed: true,
                }),
                false => Err(Error::IdempotencyKeyReused),
            };
        }
        let send_time = self.append(shard, chat, sender, text, Some((record, print)))?;
        Ok(Sent {
            send_time,
            replayed: false,
        })
    }

    /// Stores a message (and its key's record, with the key's fingerprint
    /// of it) if it fits within the limit, all or nothing; returns its
    /// send_time.
    fn append(
        &self,
        shard: &mut ShardData,
        chat: &str,
        sender: &str,
        text: &str,
        record: Option<(String, u64)>,
    ) -> Result<i64, Error> {
        let keep = self.retention.messages;
        let record_cost = record.as_ref().map_or(0, |(key, _)| record_bytes(key));
        let (incoming, freed) = match shard.chats.get(chat) {
            Some(log) => log.append_cost(sender, text, keep),
            None => {
                let (bytes, _) = Chat::default().append_cost(sender, text, keep);
                (chat_bytes(chat) + bytes, 0)
            }
        };
        self.footprint.admit(incoming + record_cost, freed)?;
        let mut added = 0;
        // Looked up first: its name is allocated only for a new chat.
        let log = match shard.chats.get_mut(chat) {
            Some(log) => log,
            None => {
                added += chat_bytes(chat);
                shard.chats.entry(chat.into()).or_default()
            }
        };
        let (send_time, bytes) = log.append(sender, text);
        added += bytes;
        let mut freed = self.trim_on_write(log);
        if let Some((record, print)) = record {
            let now = Instant::now();
            let expires = now + self.idempotency_ttl;
            let (more, swept) = shard.keys.insert(record, (send_time, print), expires, now);
            added += more;
            freed += swept;
        }
        self.footprint.apply(added, freed);
        Ok(send_time)
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
                None => Sent {
                    send_time: self.append(&mut shard, chat, sender, text, None)?,
                    replayed: false,
                },
            }
        };
        // After the shard's lock is let go: a woken pull reads at once.
        if !sent.replayed {
            self.hub.notify(chat);
        }
        Ok(sent)
    }

    /// Retention on write: the count window exactly, up to 64 expired;
    /// returns the bytes freed.
    fn trim_on_write(&self, chat: &mut Chat) -> usize {
        if !self.retention.is_on() {
            return 0;
        }
        let floor = self.retention.floor(crate::now_micros());
        chat.trim(self.retention.messages, floor, 64)
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
        // The page's messages: oldest first strictly after the cursor, or
        // newest first strictly before it; one more than the limit, if
        // there is one, tells that there is more.
        let range = match (query.reverse, query.cursor) {
            (true, 0) => 0..log.len().min(query.limit + 1),
            (true, c) => {
                let start = log.partition_point(|m| m.send_time <= c);
                start..log.len().min(start + query.limit + 1)
            }
            (false, c) => {
                let end = match c {
                    0 => log.len(),
                    c => log.partition_point(|m| m.send_time < c),
                };
                end.saturating_sub(query.limit + 1)..end
            }
        };
        let messages = &log[range];
        let mut page = PageWriter::new(&query.chat, query.limit);
        let bytes = messages.iter().map(|m| m.text.len() + m.sender.len()).sum();
        page.reserve(messages.len(), bytes);
        let mut push = |m: &Stored| page.push(&m.text, &m.sender, m.send_time, m.edited_at);
        if query.reverse {
            messages.iter().take_while(|m| push(m)).for_each(drop);
        } else {
            messages.iter().rev().take_while(|m| push(m)).for_each(drop);
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
            let sender = &chat.log[i].sender;
            if !may_edit(sender, actor) {
                return Err(Error::Forbidden);
            }
            let old_text = chat.log[i].text.len();
            let logged = edit_change_bytes(sender, text);
            self.footprint.admit(text.len() + logged, old_text)?;
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
            let keep = self.change_log_keep;
            let (added, freed) = chat.log_change(edited_at, send_time, Some(&edited), keep);
            self.footprint.apply(text.len() + added, old_text + freed);
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
            let (added, freed) = chat.log_change(seq, send_time, None, self.change_log_keep);
            let gone = chat.log.remove(i);
            let (tombstone, message) = (tombstone_bytes(&gone.sender), stored_bytes(&gone));
            chat.deleted.insert(send_time, gone.sender);
            // Under count retention, the newest `keep` tombstones (as
            // `im_delete` keeps them on Redis).
            let mut dropped = 0;
            let keep = self.retention.messages;
            while keep > 0 && chat.deleted.len() > keep {
                dropped += chat
                    .deleted
                    .pop_first()
                    .map_or(0, |(_, s)| tombstone_bytes(&s));
            }
            // Deletes are never refused, full or not: they are how space is
            // made (and erasure requests must succeed).
            self.footprint
                .apply(added + tombstone, freed + message + dropped);
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

    /// What the store holds, counted from scratch.
    fn recount(store: &MemoryStore) -> usize {
        let mut bytes = 0;
        for shard in store.shards.iter() {
            let shard = shard.lock().unwrap();
            for (name, chat) in &shard.chats {
                bytes += chat_bytes(name) + chat.log.capacity() * size_of::<Stored>();
                bytes += chat.log.iter().map(stored_bytes).sum::<usize>();
                bytes += chat
                    .deleted
                    .values()
                    .map(|s| tombstone_bytes(s))
                    .sum::<usize>();
                bytes += chat.changes.iter().map(change_bytes).sum::<usize>();
            }
            bytes += shard
                .keys
                .records
                .keys()
                .map(|k| record_bytes(k))
                .sum::<usize>();
        }
        bytes
    }

    fn query(chat: &str) -> PullQuery {
        PullQuery {
            chat: chat.into(),
            cursor: 0,
            limit: 100,
            reverse: false,
        }
    }

    #[tokio::test]
    async fn the_count_of_held_bytes_follows_every_change() {
        let store = MemoryStore::new(Duration::from_secs(60))
            .with_retention(Retention {
                messages: 5,
                age: Duration::ZERO,
            })
            .with_change_log_retention(Duration::from_micros(1));
        assert_eq!(store.held_bytes(), 0);
        for i in 0..40 {
            let chat = format!("room{}", i % 3);
            let key = (i % 2 == 0).then(|| format!("k{i}"));
            let text = "x".repeat(i * 7);
            let sent = store
                .send_now(&chat, "alice", &text, key.as_deref())
                .unwrap();
            assert_eq!(store.held_bytes(), recount(&store), "after send {i}");
            if i % 4 == 1 {
                let longer = "y".repeat(i * 11);
                store
                    .edit(&chat, sent.send_time, &longer, None)
                    .await
                    .unwrap();
                assert_eq!(store.held_bytes(), recount(&store), "after edit {i}");
            }
            if i % 5 == 2 {
                store
                    .delete(&chat, sent.send_time, None, false)
                    .await
                    .unwrap();
                assert_eq!(store.held_bytes(), recount(&store), "after delete {i}");
            }
        }
        // Trimmed to 5 per chat by count: the bytes came back.
        assert!(store.pull_now(&query("room0")).count <= 5);
    }

    #[tokio::test]
    async fn a_full_store_refuses_sends_and_edits_whole_and_deletes_make_room() {
        let store = MemoryStore::new(Duration::from_secs(60)).with_limit(16384);
        let mut sent = Vec::new();
        let refused = loop {
            match store.send_now("room", "alice", &"m".repeat(1000), None) {
                Ok(s) => sent.push(s.send_time),
                Err(err) => break err,
            }
        };
        assert_eq!(refused, Error::StorageFull);
        assert!(store.held_bytes() <= 16384, "{}", store.held_bytes());
        let held = store.held_bytes();
        let stored = store.pull_now(&query("room")).count;
        assert_eq!(stored, sent.len(), "the refused send stored nothing");
        // A keyed send is refused whole: no record is left to replay.
        let keyed = store.send_now("room", "alice", &"m".repeat(1000), Some("k"));
        assert_eq!(keyed.unwrap_err(), Error::StorageFull);
        assert!(store.shard("room").keys.records.is_empty());
        let edit = store.edit("room", sent[0], &"e".repeat(5000), None).await;
        assert_eq!(edit.unwrap_err(), Error::StorageFull);
        assert_eq!(store.held_bytes(), held, "a refused edit changes nothing");
        // Deletes are never refused and give the text back (less their
        // tombstone and change log entry, ~230 bytes).
        for &t in &sent[..3] {
            store.delete("room", t, None, false).await.unwrap();
        }
        assert!(store.held_bytes() < held);
        assert!(store.send_now("room", "alice", "fits again", None).is_ok());
        assert_eq!(store.held_bytes(), recount(&store));
    }

    #[tokio::test]
    async fn a_new_message_never_gets_a_deleted_ones_send_time() {
        let store = MemoryStore::new(Duration::from_secs(60));
        let mut last = 0;
        for i in 0..200 {
            let sent = store
                .send_now("room", "alice", &format!("m{i}"), None)
                .unwrap();
            assert!(sent.send_time > last, "{} after {last}", sent.send_time);
            last = sent.send_time;
            // The chat is empty again: its log has no last message.
            store
                .delete("room", sent.send_time, None, false)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn count_retention_keeps_the_newest_tombstones() {
        let store = MemoryStore::new(Duration::from_secs(60)).with_retention(Retention {
            messages: 3,
            age: Duration::ZERO,
        });
        for i in 0..10 {
            let sent = store
                .send_now("room", "alice", &format!("m{i}"), None)
                .unwrap();
            store
                .delete("room", sent.send_time, None, false)
                .await
                .unwrap();
            // Repeated: answered as the first.
            store
                .delete("room", sent.send_time, None, false)
                .await
                .unwrap();
        }
        assert_eq!(store.shard("room").chats["room"].deleted.len(), 3);
        assert_eq!(store.held_bytes(), recount(&store));
    }

    #[test]
    fn count_retention_keeps_a_full_store_writable() {
        // Each chat keeps 3: once full, a send frees what it adds.
        let store = MemoryStore::new(Duration::from_secs(60))
            .with_retention(Retention {
                messages: 3,
                age: Duration::ZERO,
            })
            .with_limit(2048);
        let mut ok = 0;
        while store
            .send_now("room", "alice", &"m".repeat(200), None)
            .is_ok()
        {
            ok += 1;
            if ok == 1000 {
                break;
            }
        }
        assert_eq!(ok, 1000, "sends to a chat kept at 3 never fill the store");
        assert_eq!(store.held_bytes(), recount(&store));
    }

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
