//! Editing and deleting stored messages on Redis (standalone and Cluster),
//! and who may.
//!
//! The layout stays what sends write (one sorted set per chat, score =
//! `send_time`, member = `StoredMessage`): an edit replaces the member at
//! its score with one carrying the new text and `edited_at`; a delete
//! removes it, so pulls need no filter and stay exact. Beside the chat, in
//! its slot (the chat is the hash tag):
//!
//! Both hash to the chat's slot (one call's keys must share one on a
//! Cluster) unless the chat's name starts with `}` (`im:{}…` has an empty
//! hash tag): such chats refuse edits and deletes on every store
//! ([`crate::domain::validate_change`]), as they refuse idempotency keys.
//!
//! * `im:del:{<chat>}`: tombstones, score = the deleted message's
//!   `send_time`, member = that `send_time` (8 bytes) + its sender, so that
//!   deleting a deleted message answers as the first delete did (with the
//!   same permission check), while a message never stored is a 404.
//! * `im:chg:{<chat>}`: the change log, score = the change's sequence
//!   (assigned like a `send_time`; an edit's `edited_at`), member = a
//!   `Change` protobuf; trimmed to `--change-log-retention-s` on every
//!   change, and expiring that long after the last one.
//!
//! Each change is a compare-and-set in Lua (`im_edit`, `im_delete` in
//! `lifecycle.lua`): the caller reads the member, checks the sender, and
//! passes the member it read; Redis changes it only if it is still there.
//! Otherwise the caller reads again, at most [`MAX_ATTEMPTS`] times.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use super::redis::{chat_key, read_stored, stored_member};
use prost::Message as _;

use crate::error::Error;
use crate::proto::fields::change;
use crate::proto::{Change, ChangesResponse};
use crate::resp::{Reply, command};
use crate::wire;

/// Reads and compare-and-sets of one edit or delete, before it gives up
/// (503): each lost race means someone else changed the message meanwhile.
pub const MAX_ATTEMPTS: usize = 8;

/// The key of a chat's tombstones.
pub fn deleted_key(chat: &str) -> String {
    format!("im:del:{{{chat}}}")
}

/// The key of a chat's change log.
pub fn changes_key(chat: &str) -> String {
    format!("im:chg:{{{chat}}}")
}

/// Whether `actor` (the authenticated user; `None`: authentication is
/// off) may edit a message of `sender`.
pub fn may_edit(sender: &str, actor: Option<&str>) -> bool {
    actor.is_none_or(|a| a == sender)
}

/// Whether `actor` may delete a message of `sender`; an admin may delete any.
pub fn may_delete(sender: &str, actor: Option<&str>, admin: bool) -> bool {
    admin || may_edit(sender, actor)
}

/// What the change log's `keep` argument is: microseconds, at least 1 s.
pub fn keep_micros(retention: Duration) -> String {
    retention.as_micros().max(1_000_000).to_string()
}

/// The member at score `send_time` of `key` (none, or the one: scores are
/// unique send_times).
fn read_command(key: &str, send_time: i64) -> Bytes {
    let t = send_time.to_string();
    command::encode(&[
        b"ZRANGE",
        key.as_bytes(),
        t.as_bytes(),
        t.as_bytes(),
        b"BYSCORE",
    ])
}

fn first_member(reply: Reply) -> Result<Option<Bytes>, Error> {
    match reply {
        Reply::Array(items) => match items.into_iter().next() {
            None => Ok(None),
            Some(Reply::BulkString(member)) => Ok(Some(member)),
            Some(other) => Err(Error::Internal(format!("ZRANGE returned {other:?}"))),
        },
        other => Err(Error::Internal(format!("ZRANGE returned {other:?}"))),
    }
}

/// How a compare-and-set ended: the change's sequence, or lost the race.
fn cas_outcome(reply: Reply) -> Result<Option<i64>, Error> {
    match reply {
        Reply::Integer(seq) => Ok(Some(seq)),
        Reply::SimpleString(status) if status == "CHANGED" => Ok(None),
        other => Err(Error::Internal(format!(
            "im_edit/im_delete returned {other:?}"
        ))),
    }
}

/// Runs one command on the chat's node: how the standalone and Cluster
/// stores differ here. An error reply must come back as `Err`. A `change`
/// (an FCALL) waits for `--redis-wait-replicas` like a send.
pub(crate) trait Runner {
    fn run(
        &self,
        command: Bytes,
        change: bool,
    ) -> impl Future<Output = Result<Reply, Error>> + Send;

    /// The retention window's oldest send_time now (0: any): an older
    /// message is not there to change, trimmed yet or not.
    fn floor(&self) -> i64;
}

/// Replaces the text of the message at `send_time`; returns its `edited_at`.
pub(super) async fn edit(
    runner: &impl Runner,
    chat: &str,
    send_time: i64,
    text: &str,
    actor: Option<&str>,
    keep: &str,
) -> Result<i64, Error> {
    let key = chat_key(chat);
    let log = changes_key(chat);
    if send_time < runner.floor() {
        return Err(Error::MessageNotFound);
    }
    for _ in 0..MAX_ATTEMPTS {
        let Some(old) = first_member(runner.run(read_command(&key, send_time), false).await?)?
        else {
            return Err(Error::MessageNotFound);
        };
        let stored = read_stored(&old).map_err(undecodable)?;
        if !may_edit(stored.sender, actor) {
            return Err(Error::Forbidden);
        }
        let new = stored_member(send_time, text, stored.sender);
        let mut tail = Vec::with_capacity(new.len() + 4);
        wire::put_bytes_field(&mut tail, change::EDITED, &new);
        let (t, now) = (send_time.to_string(), crate::now_micros().to_string());
        let call = command::encode(&[
            b"FCALL",
            b"im_edit",
            b"2",
            key.as_bytes(),
            log.as_bytes(),
            t.as_bytes(),
            &old,
            &new,
            &tail,
            now.as_bytes(),
            keep.as_bytes(),
        ]);
        if let Some(edited_at) = cas_outcome(runner.run(call, true).await?)? {
            return Ok(edited_at);
        }
    }
    Err(Error::Unavailable)
}

/// Deletes the message at `send_time`: `Ok` also if it was deleted before
/// (by someone this actor could have deleted it as). The chat keeps the
/// newest `tombstones` tombstones (0: any number; see `im_delete`).
pub(super) async fn delete(
    runner: &impl Runner,
    chat: &str,
    send_time: i64,
    actor: Option<&str>,
    admin: bool,
    keep: &str,
    tombstones: usize,
) -> Result<(), Error> {
    let key = chat_key(chat);
    let tombs = deleted_key(chat);
    let log = changes_key(chat);
    if send_time < runner.floor() {
        return Err(Error::MessageNotFound);
    }
    for _ in 0..MAX_ATTEMPTS {
        let Some(old) = first_member(runner.run(read_command(&key, send_time), false).await?)?
        else {
            let tomb = first_member(runner.run(read_command(&tombs, send_time), false).await?)?;
            let Some(tomb) = tomb else {
                return Err(Error::MessageNotFound);
            };
            let sender = tomb.get(8..).and_then(|s| std::str::from_utf8(s).ok());
            let sender = sender.ok_or_else(|| Error::Internal("malformed tombstone".into()))?;
            return match may_delete(sender, actor, admin) {
                true => Ok(()),
                false => Err(Error::Forbidden),
            };
        };
        let stored = read_stored(&old).map_err(undecodable)?;
        if !may_delete(stored.sender, actor, admin) {
            return Err(Error::Forbidden);
        }
        let mut tomb = send_time.to_le_bytes().to_vec();
        tomb.extend_from_slice(stored.sender.as_bytes());
        let mut tail = vec![((change::DELETED << 3) | 1) as u8];
        tail.extend_from_slice(&send_time.to_le_bytes());
        let (t, now) = (send_time.to_string(), crate::now_micros().to_string());
        let cap = tombstones.to_string();
        let call = command::encode(&[
            b"FCALL",
            b"im_delete",
            b"3",
            key.as_bytes(),
            tombs.as_bytes(),
            log.as_bytes(),
            t.as_bytes(),
            &old,
            &tomb,
            &tail,
            now.as_bytes(),
            keep.as_bytes(),
            cap.as_bytes(),
        ]);
        if cas_outcome(runner.run(call, true).await?)?.is_some() {
            return Ok(());
        }
    }
    Err(Error::Unavailable)
}

/// Most changes one [`changes`] call answers.
pub const MAX_CHANGES: usize = 100;

/// How far back a change read trusts the clock (µs): a change committed
/// after a read gets a sequence above the read's clock minus this (so
/// clocks of RPC servers must agree within it). A new stream starts its
/// changes this far back, and a read that found nothing moves its caller's
/// cursor up to that point, so that a follower of a quiet chat stays within
/// the log's window. Replaying a change is harmless (an edit carries the
/// whole message, a delete is idempotent); missing one is not.
pub const FRESH_MARGIN_US: i64 = 5_000_000;

/// Where a change read may move its cursor once it has read everything:
/// [`FRESH_MARGIN_US`] back (at most half the log's window), rounded down
/// to the whole second (at most a quarter of the window: the mark stays
/// within it, or every read from it would be a reset). Rounded, so that
/// followers of a chat that read within the same second stand at the same
/// place and can share their next fetch (`gateway::stream::next_page`):
/// with the exact clock every subscriber of a room had a change cursor of
/// its own and none shared. Rounding down only ever reads a little more; a
/// cursor never goes back (a read answers at least where it started).
pub fn watermark(now: i64, keep_us: i64) -> i64 {
    let mark = now - FRESH_MARGIN_US.min(keep_us / 2);
    let step = WATERMARK_STEP_US.min(keep_us / 4).max(1);
    mark - mark.rem_euclid(step)
}

/// What [`watermark`] rounds to.
const WATERMARK_STEP_US: i64 = 1_000_000;

/// Whether changes after `after` may have been trimmed: it is older than
/// the log keeps (by the clock: trimming is by sequence, which follows the
/// clock), and the oldest change left, if any, is newer than it (the log
/// always keeps its newest change until it expires whole).
pub fn must_reset(after: i64, oldest: Option<i64>, now: i64, keep_us: i64) -> bool {
    older_than_log(after, now, keep_us) && oldest.is_none_or(|o| o > after)
}

/// Whether `after` is older than the log keeps: only then can
/// [`must_reset`] say yes, so only then is the oldest change worth reading.
pub fn older_than_log(after: i64, now: i64, keep_us: i64) -> bool {
    after < now.saturating_sub(keep_us)
}

/// The answer to a read that found `changes` after its cursor `from`
/// (`more`: the limit cut it short).
pub fn changes_response(from: i64, changes: Vec<Change>, more: bool, mark: i64) -> ChangesResponse {
    let last = changes.last().map_or(from, |c| c.seq);
    ChangesResponse {
        next: if more { last } else { last.max(mark) },
        has_more: more,
        changes,
        ..ChangesResponse::default()
    }
}

/// The answer to a resume older than the log: start again from `mark`.
pub fn reset_response(mark: i64) -> ChangesResponse {
    ChangesResponse {
        next: mark,
        reset: true,
        ..ChangesResponse::default()
    }
}

/// The changes of `chat` after `after` (see `ChangesRequest`).
pub(super) async fn changes(
    runner: &impl Runner,
    chat: &str,
    after: i64,
    limit: usize,
    keep: &str,
) -> Result<ChangesResponse, Error> {
    let log = changes_key(chat);
    let now = crate::now_micros();
    let keep_us: i64 = keep.parse().unwrap_or(i64::MAX);
    let mark = watermark(now, keep_us);
    // A follower's cursor is recent: one read (the range), not two.
    if after != 0 && older_than_log(after, now, keep_us) {
        let oldest = command::encode(&[b"ZRANGE", log.as_bytes(), b"0", b"0"]);
        let oldest = first_member(runner.run(oldest, false).await?)?;
        let seq = oldest.as_deref().and_then(|m| m.get(1..9)?.try_into().ok());
        if must_reset(after, seq.map(i64::from_le_bytes), now, keep_us) {
            return Ok(reset_response(mark));
        }
    }
    let from = if after == 0 { mark } else { after };
    let (start, count) = (format!("({from}"), (limit + 1).to_string());
    let range = command::encode(&[
        b"ZRANGE",
        log.as_bytes(),
        start.as_bytes(),
        b"+inf",
        b"BYSCORE",
        b"LIMIT",
        b"0",
        count.as_bytes(),
    ]);
    let Reply::Array(members) = runner.run(range, false).await? else {
        return Err(Error::Internal(
            "ZRANGE of the change log: not an array".into(),
        ));
    };
    let more = members.len() > limit;
    let mut changes = Vec::with_capacity(members.len().min(limit));
    for member in members.into_iter().take(limit) {
        let Reply::BulkString(member) = member else {
            return Err(Error::Internal(
                "ZRANGE of the change log: not a string".into(),
            ));
        };
        let change = Change::decode(member)
            .map_err(|e| Error::Internal(format!("undecodable change: {e}")))?;
        changes.push(change);
    }
    Ok(changes_response(from, changes, more, mark))
}

fn undecodable(err: wire::Malformed) -> Error {
    Error::Internal(format!("undecodable stored message: {err}"))
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::fields::stored_message;

    #[test]
    fn the_watermark_is_shared_within_a_step_and_stays_inside_the_log() {
        let now = 1_796_649_689_029_313;
        for keep in [1_000_000, 10_000_000, 3_600_000_000] {
            let mark = watermark(now, keep);
            assert!(mark <= now - FRESH_MARGIN_US.min(keep / 2), "{keep}");
            assert!(
                mark > now - keep,
                "inside the window: no reset from it ({keep})"
            );
            assert!(!must_reset(mark, None, now, keep));
        }
        // Two reads a moment apart, in the same second: the same place.
        let keep = 3_600_000_000;
        let base = watermark(now, keep);
        assert_eq!(watermark(base + FRESH_MARGIN_US + 1_000, keep), base);
        assert_eq!(watermark(base + FRESH_MARGIN_US + 999_999, keep), base);
    }
    use crate::proto::{Change, StoredMessage};

    #[test]
    fn a_resume_resets_only_when_changes_may_be_gone() {
        let (now, keep) = (1_000_000_000, 100);
        assert!(!must_reset(now - 50, None, now, keep), "within the window");
        assert!(must_reset(now - 150, None, now, keep), "older, log gone");
        assert!(
            must_reset(now - 150, Some(now - 90), now, keep),
            "older than the log"
        );
        assert!(
            !must_reset(now - 150, Some(now - 150), now, keep),
            "the log still holds `after` itself: nothing after it was trimmed"
        );
    }

    #[test]
    fn who_may_change_a_message() {
        assert!(may_edit("ann", None), "authentication off: anyone");
        assert!(may_edit("ann", Some("ann")));
        assert!(!may_edit("ann", Some("bob")));
        assert!(may_delete("ann", Some("bob"), true), "an admin deletes");
        assert!(!may_delete("ann", Some("bob"), false));
        let slot = |k: &str| redis_protocol::redis_keyslot(k.as_bytes());
        for chat in ["room", "a:b", "x}y", "{a}"] {
            assert_eq!(slot(&chat_key(chat)), slot(&changes_key(chat)), "{chat}");
            assert_eq!(slot(&chat_key(chat)), slot(&deleted_key(chat)), "{chat}");
        }
    }

    fn lifecycle_lua() -> &'static str {
        include_str!("lifecycle.lua")
    }

    /// What the Lua appends and prepends, checked against prost.
    #[test]
    fn members_and_changes_decode_as_the_proto_says() {
        let mut edited = stored_member(42, "new", "ann");
        // im_edit: '!' .. struct.pack('<i8', seq)
        assert_eq!(((stored_message::EDITED_AT << 3) | 1) as u8, b'!');
        edited.push(b'!');
        edited.extend_from_slice(&77i64.to_le_bytes());
        let want = StoredMessage {
            send_time: 42,
            text: "new".into(),
            sender: "ann".into(),
            edited_at: 77,
            deleted_newer: 0,
        };
        assert_eq!(StoredMessage::decode(&edited[..]), Ok(want.clone()));
        let view = read_stored(&edited).expect("readable");
        assert_eq!((view.text, view.edited_at), ("new", 77));
        // im_delete: the new newest member with deleted_newer first
        // (DELETED_NEWER_KEY .. pack(T)); read as the message it was.
        let key = ((stored_message::DELETED_NEWER << 3) | 1) as u8;
        assert!(
            lifecycle_lua().contains(&format!("local DELETED_NEWER_KEY = {key}\n")),
            "lifecycle.lua's DELETED_NEWER_KEY is StoredMessage.deleted_newer's key byte"
        );
        let mut carried = vec![key];
        carried.extend_from_slice(&99i64.to_le_bytes());
        carried.extend_from_slice(&edited);
        let want_carried = StoredMessage {
            deleted_newer: 99,
            ..want.clone()
        };
        assert_eq!(StoredMessage::decode(&carried[..]), Ok(want_carried));
        let view = read_stored(&carried).expect("readable");
        assert_eq!((view.send_time, view.text, view.edited_at), (42, "new", 77));
        // A change: '\9' .. pack(seq) .. tail.
        let mut entry = vec![9u8];
        entry.extend_from_slice(&77i64.to_le_bytes());
        wire::put_bytes_field(&mut entry, change::EDITED, &stored_member(42, "new", "ann"));
        let decoded = Change::decode(&entry[..]).expect("a Change");
        // Readers skip fields they do not know (how an old RPC server reads
        // an edited member): an unknown fixed64 and an unknown string.
        let mut newer = stored_member(42, "t", "ann");
        newer.push((9 << 3) | 1);
        newer.extend_from_slice(&1i64.to_le_bytes());
        wire::put_bytes_field(&mut newer, 10, b"future");
        let view = read_stored(&newer).expect("unknown fields skipped");
        assert_eq!((view.send_time, view.text, view.sender), (42, "t", "ann"));
        assert_eq!((decoded.seq, decoded.deleted), (77, 0));
        assert_eq!(decoded.edited.map(|m| m.text), Some("new".into()));
    }
}
