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

use super::redis::{chat_key, encode_member, read_stored};
use crate::error::Error;
use crate::proto::fields::{change, stored_message};
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

/// A `StoredMessage` with its send_time and without `edited_at` (which
/// `im_edit` appends): the new member of an edit.
fn stored_member(send_time: i64, text: &str, sender: &str) -> Vec<u8> {
    let mut member = Vec::with_capacity(9 + text.len() + sender.len() + 8);
    member.push(((stored_message::SEND_TIME << 3) | 1) as u8);
    member.extend_from_slice(&send_time.to_le_bytes());
    member.extend(encode_member(text, sender));
    member
}

/// Runs one command on the chat's node: how the standalone and Cluster
/// stores differ here. An error reply must come back as `Err`. A `change`
/// (an FCALL) waits for `--redis-wait-replicas` like a send.
pub(super) trait Runner {
    fn run(
        &self,
        command: Bytes,
        change: bool,
    ) -> impl Future<Output = Result<Reply, Error>> + Send;
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
/// (by someone this actor could have deleted it as).
pub(super) async fn delete(
    runner: &impl Runner,
    chat: &str,
    send_time: i64,
    actor: Option<&str>,
    admin: bool,
    keep: &str,
) -> Result<(), Error> {
    let key = chat_key(chat);
    let tombs = deleted_key(chat);
    let log = changes_key(chat);
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
        ]);
        if cas_outcome(runner.run(call, true).await?)?.is_some() {
            return Ok(());
        }
    }
    Err(Error::Unavailable)
}

fn undecodable(err: wire::Malformed) -> Error {
    Error::Internal(format!("undecodable stored message: {err}"))
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::{Change, StoredMessage};

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
        };
        assert_eq!(StoredMessage::decode(&edited[..]), Ok(want));
        let view = read_stored(&edited).expect("readable");
        assert_eq!((view.text, view.edited_at), ("new", 77));
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
