//! The key schema, the members and the Lua library, and the commands and
//! replies of one call (pure: no I/O).
//!
//! * Key: `im:{<chat>}`. The chat is the hash tag, so in a Redis Cluster each
//!   chat lives whole in one slot and no data needs migrating.
//! * Member: a protobuf `StoredMessage` (`proto/im.proto`): `send_time`
//!   (unique within the chat, so identical texts never merge), text, sender;
//!   not the chat, which is the key.
//! * `send_time` is assigned inside Redis by the `im_send` function, atomically
//!   with the ZADD: max(the caller's clock in µs, the chat's highest score + 1).
//!   Any number of RPC server processes can write one chat and the values
//!   stay unique and increasing in the order Redis applies the writes,
//!   whatever their clocks say (skewed clocks only shift the values).
//!   Sends queued together go to Redis as one `im_send` call (a batch), which
//!   reads each chat's top score once and adds its messages with one ZADD.
//!   The clock comes from the caller and Lua only prepends a fixed-size
//!   field: measured with redis-benchmark, one message per call runs 113k
//!   calls/s so, against 61k/s calling TIME and building a varint in Lua;
//!   8 messages to one chat per call, 238k messages/s.
//! * Idempotency keys: a send with a key also names its record,
//!   [`idempotency_record_key`] (in the chat's slot), which `im_send` reads
//!   and writes (`SET ... EX`) in the same call as the ZADD; see [`LIBRARY`].
//!   With a key, a send whose connection failed is sent once more.

use bytes::Bytes;

use super::queue::{IdempotencyRecord, QueuedSend};
use crate::digits::Decimal;
use crate::domain::PullQuery;
use crate::error::Error;
use crate::proto::fields::stored_message;
use crate::resp::{Reply, command};
use crate::store::retention::Retention;
use crate::store::{Page, PageWriter, Sent};
use crate::wire::{self, Malformed, Value, next_field, text};

/// Loaded (idempotently) on every connection. Needs Redis >= 7.0.
const LIBRARY: &str = concat!(
    r#"#!lua name=im
-- Stores a batch of messages, each atomically with its send_time.
-- Without idempotency keys: KEYS[i] = message i's chat; ARGV[i] = message i
-- as a StoredMessage protobuf without send_time; ARGV[#KEYS + 1] = the
-- caller's clock in microseconds.
-- With m keyed messages among the n, their record keys (each in its chat's
-- slot) follow the chats, and ARGV gains each one's message index, the
-- records' TTL in seconds and m:
--   KEYS = chat_1..chat_n, record_1..record_m
--   ARGV = member_1..member_n, index_1..index_m, ttl, m, clock
-- Returns, per message: its send_time (stored now); {send_time} (its key's
-- record matches it: nothing stored, this is the first send's send_time);
-- or the status REUSED (the key's record is for another text or sender).
-- Within a chat, each stored message gets max(clock, the chat's highest
-- score + 1), so send_times stay unique and increasing in the order Redis
-- applies them, whoever the caller is; and above a deleted newest message
-- (see im_delete in lifecycle.lua).
-- A record is the send_time (8 bytes) and 128 bits of the SHA-1 of the
-- member (text + sender): 40 bytes, an embedded string in Redis.
local function fingerprint(member)
  return string.sub(redis.sha1hex(member), 1, 32)
end

-- What the next send_time of a chat must be above. The top member carries
-- its send_time (see below): reading it there spares Redis printing the
-- score as a double and Lua parsing it back. The indexes as strings: Redis
-- 7.0 formats a Lua number argument with snprintf('%.17g').
-- (A member that became the chat's newest when a newer one was deleted
-- starts with that one's send_time instead: see im_delete. Either way the
-- first 8 bytes after the first key byte are what the next send_time must
-- be above.)
local function newest_send_time(key)
  local top = redis.call('ZRANGE', key, '-1', '-1')[1]
  if top then return struct.unpack('<i8', top, 2) end
  -- An empty chat (new, or all of it deleted or expired): the newest
  -- tombstone's send_time (its first 8 bytes; key 'im:del:{…}', in the
  -- chat's slot), if any, for the same reason. A chat whose name starts
  -- with '}' has none: it refuses deletes (its tombstone key hashes
  -- elsewhere).
  local tomb = string.sub(key, 5, 5) ~= '}'
    and redis.call('ZRANGE', 'im:del:' .. string.sub(key, 4), '-1', '-1')[1]
  return tomb and struct.unpack('<i8', tomb) or -1
end

-- `trim`, if any, runs on each chat after its run's ZADD (retention: see
-- im_send_keep in lifecycle.lua).
local function send_batch(keys, args, trim)
  local n, nargs = #keys, #args
  -- The clock as the caller wrote it (a decimal integer) and packed: most
  -- messages get exactly `now` (every one in a batch to distinct chats), and
  -- reusing these spares a string.format (an sprintf) and a struct.pack per
  -- message, 1 µs of the 9 µs each message cost Redis with 10,000 rooms.
  local now_text = args[nargs]
  local now = tonumber(now_text)
  local now_packed = struct.pack('<i8', now)
  -- Batches without keys (the common case) skip every step below that
  -- concerns records: no more tables, no more calls.
  local records, ttl, seen
  if nargs > n + 1 then
    local m = tonumber(args[nargs - 1])
    ttl = args[nargs - 2]
    n = n - m
    records, seen = {}, {}
    for j = 1, m do records[tonumber(args[n + j])] = keys[n + j] end
  end
  -- The messages go in runs: those to one chat that follow each other. Each
  -- run reads the chat's top once and stores with one ZADD, and one
  -- SPUBLISH announces it to pulls waiting for the chat
  -- (src/store/subscriber.rs; a sharded channel in the chat's slot, so on
  -- a Cluster only the chat's shard carries it). The caller puts each
  -- chat's messages together; apart, they are still right (a later run of
  -- the chat reads the top an earlier one wrote), only dearer.
  local out, scored = {}, {}
  local i = 1
  while i <= n do
    local key, prev, count = keys[i], nil, 0
    while i <= n and keys[i] == key do
      local record = records and records[i]
      local digest, earlier
      if record then
        digest = fingerprint(args[i])
        -- A key may come several times in one batch (concurrent retries):
        -- `seen` spares a GET of the record written earlier in this call.
        earlier = seen[record] or redis.call('GET', record)
        seen[record] = earlier
      end
      if earlier then
        if string.sub(earlier, 9) == digest then
          out[i] = {(struct.unpack('<i8', earlier))}
        else
          out[i] = {ok = 'REUSED'}
        end
      else
        if prev == nil then prev = newest_send_time(key) end
        local t, score, packed = now, now_text, now_packed
        if prev >= now then
          t = prev + 1
          -- The score as an integer string: Redis would print a Lua number
          -- with %.17g, which costs more than the ZADD.
          score, packed = string.format('%d', t), struct.pack('<i8', t)
        end
        prev = t
        -- Prepend field 1 (send_time, sfixed64: tag 0x09 + 8 bytes
        -- little-endian): the member becomes unique and carries its own
        -- send_time.
        scored[count + 1] = score
        scored[count + 2] = '\9' .. packed .. args[i]
        count = count + 2
        out[i] = t
        if record then
          local value = packed .. digest
          redis.call('SET', record, value, 'EX', ttl)
          seen[record] = value
        end
      end
      i = i + 1
    end
    if count > 0 then
      redis.call('ZADD', key, unpack(scored, 1, count))
      if trim then trim(key, prev) end
      redis.call('SPUBLISH', key .. ':new', '')
    end
  end
  return out
end

redis.register_function('im_send', function(keys, args)
  return send_batch(keys, args, nil)
end)

-- The common batch, without idempotency keys, stamped by the caller:
-- KEYS[i] = message i's chat, each chat's messages together; ARGV = the
-- caller's clock (decimal µs), then each message's member, which already
-- starts with a send_time field ('\9' + 8 bytes) holding the caller's
-- proposal: the clock for a chat's first message in the batch, + 1 for
-- each next one, whose member comes after its score (that proposal in
-- decimal):
--   ARGV = clock, member_1, [score_2, member_2, ...]
-- Returns each message's send_time. A chat whose newest send_time is below
-- the clock (nearly always) gets the proposals, stored straight from the
-- arguments with one ZADD: no string is made in Lua (im_send formats a
-- score, packs a send_time and joins three strings for each message but a
-- chat's first). Otherwise its messages get newest + 1, + 2, ...: the
-- proposals' field and score rewritten. Either way each message gets what
-- im_send would give it. A batch with runs of one message (distinct
-- chats) has as many arguments as im_send's.
local function send_stamped(keys, args, trim)
  local n, now_text = #keys, args[1]
  local now = tonumber(now_text)
  local out, i, a = {}, 1, 2
  while i <= n do
    local key, first = keys[i], i
    while i < n and keys[i + 1] == key do i = i + 1 end
    -- The run's members are at a, a + 2, ..., its last at `last`.
    local last = a + 2 * (i - first)
    local prev = newest_send_time(key)
    local t
    if prev < now then
      redis.call('ZADD', key, now_text, unpack(args, a, last))
      t = now + (i - first)
      for j = first, i do out[j] = now + (j - first) end
    else
      local scored = {}
      t = prev
      for m = a, last, 2 do
        t = t + 1
        scored[#scored + 1] = string.format('%d', t)
        scored[#scored + 1] = '\9' .. struct.pack('<i8', t) .. string.sub(args[m], 10)
        out[first + (m - a) / 2] = t
      end
      redis.call('ZADD', key, unpack(scored))
    end
    if trim then trim(key, t) end
    redis.call('SPUBLISH', key .. ':new', '')
    a, i = last + 1, i + 1
  end
  return out
end

redis.register_function('im_send_stamped', function(keys, args)
  return send_stamped(keys, args, nil)
end)
"#,
    include_str!("../lifecycle.lua")
);
/// The key byte of `StoredMessage.send_time` (sfixed64: wire type 1), the
/// first byte of every member `im_send` writes; the Lua in [`LIBRARY`]
/// writes it as `'\9'` (Lua has no access to the .proto: a test checks the
/// two agree).
pub(crate) const SEND_TIME_KEY: u8 = (stored_message::SEND_TIME << 3) as u8 | 1;
// One key byte, as the Lua assumes (field numbers up to 15).
const _: () = assert!(stored_message::SEND_TIME < 16);

/// `FUNCTION LOAD REPLACE` of the library: run on every new connection, so a
/// restarted Redis, or in a cluster a newly promoted or resharded master,
/// has `im_send`.
pub(in crate::store) fn load_library_command() -> Bytes {
    command::encode(&[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()])
}
/// The `im_send` reply of a request built by [`RedisOptions::send_request`]:
/// with a WAIT, fewer replicas than asked for make the whole batch
/// unavailable ("maybe stored": it is on the master, not confirmed copied).
/// An error reply (a redirection) is returned as it is.
pub(in crate::store) fn without_wait(
    reply: Result<Reply, Error>,
    wait_replicas: u32,
) -> Result<Reply, Error> {
    if wait_replicas == 0 {
        return reply;
    }
    let Reply::Array(mut replies) = reply? else {
        return Err(Error::Unavailable);
    };
    let (Some(wait), Some(fcall)) = (replies.pop(), replies.pop()) else {
        return Err(Error::Unavailable);
    };
    match (fcall, wait) {
        (fcall @ Reply::Error(_), _) => Ok(fcall),
        (fcall, Reply::Integer(n)) if n >= i64::from(wait_replicas) => Ok(fcall),
        _ => Err(Error::Unavailable),
    }
}
/// The key of a chat's sorted set: `im:{<chat>}`. Built by hand: with
/// `format!` it was 1.2 % of the all-in-one's CPU under sends.
pub fn chat_key(chat: &str) -> String {
    let mut key = String::with_capacity(chat.len() + 5);
    key.push_str("im:{");
    key.push_str(chat);
    key.push('}');
    key
}

/// The key of the record of an idempotency key used in a chat:
/// `im:idem:<chat length>:{<chat>}:<key>`. The chat is the hash tag, as in
/// [`chat_key`], so the record is in the chat's slot. The length makes the
/// name unambiguous (a chat may contain `}:`, a key may too), and the prefix
/// keeps it apart from every chat key (`im:{`).
pub fn idempotency_record_key(chat: &str, key: &str) -> String {
    format!("im:idem:{}:{{{chat}}}:{key}", chat.len())
}

/// Whether the record of `key` in `chat` hashes to the chat's slot, as
/// `im_send` needs (one call's keys must share a slot on a cluster). It does
/// unless the chat's name starts with `}`: then `im:{}…` has an empty hash
/// tag, the whole key is hashed, and no record key can follow it there.
/// The rule the stores apply is [`crate::domain::chat_keeps_records`]; this
/// checks it against the keys.
#[cfg(test)]
fn record_shares_the_chat_slot(chat: &str, key: &str) -> bool {
    let slot = |k: &str| redis_protocol::redis_keyslot(k.as_bytes());
    slot(&chat_key(chat)) == slot(&idempotency_record_key(chat, key))
}
/// Whether the reply says the function library is missing (a flushed or
/// restored Redis, or one an older server loaded its library into): the
/// error comes before the function runs, so nothing was stored.
pub(in crate::store) fn function_missing(reply: &Result<Reply, Error>) -> bool {
    matches!(reply, Ok(Reply::Error(err)) if err.contains("Function not found"))
}
/// The one `im_send` call storing `batch` (see [`LIBRARY`] for its
/// arguments; in a cluster every key of it must be in one slot); `now` is
/// the caller's clock in µs. First puts each chat's sends together, in
/// queue order (a stable sort), which `im_send` stores as one run: the
/// caller's waiters must be taken from `batch` after this.
/// A batch without idempotency keys (the common case) is `im_send_stamped`,
/// whose members come stamped with their send_times (cheaper for Redis);
/// one with keys is `im_send` with their records.
/// With retention on, the call is `im_send_keep` / `im_send_stamped_keep`
/// with the window after the other arguments.
pub(in crate::store) fn im_send_command(
    batch: &mut [QueuedSend],
    now: i64,
    keep: &Retention,
) -> Bytes {
    batch.sort_by(|a, b| a.key.cmp(&b.key));
    match batch.iter().any(|s| s.record.is_some()) {
        true => keyed_im_send_command(batch, now, keep),
        false => stamped_im_send_command(batch, now, keep),
    }
}

/// `im_send_stamped` of a batch without idempotency keys, grouped by chat:
/// each member after the send_time field holding its proposal (`now` for a
/// chat's first message, + 1 for each next), and each but a chat's first
/// after its score, the same number (see [`LIBRARY`]). Measured with
/// `bench/im_send_cost.py --rooms 1 --batch 15`: 2.0 µs of Redis per
/// message against 2.5-3.0 with `im_send`, which formats, packs and joins
/// those in Lua; the same over 10,000 rooms, where a batch's chats differ
/// and the arguments are as many as `im_send`'s.
fn stamped_im_send_command(batch: &[QueuedSend], now: i64, keep: &Retention) -> Bytes {
    let follows = |i: usize| i > 0 && batch[i].key == batch[i - 1].key;
    let scored = (0..batch.len()).filter(|&i| follows(i)).count();
    let args = 3 + 2 * batch.len() + 1 + scored + if keep.is_on() { 2 } else { 0 };
    let bytes: usize = batch
        .iter()
        .map(|s| s.key.len() + 9 + s.member.len() + 20)
        .sum();
    let mut command = command::Writer::new(args, bytes);
    command.arg(b"FCALL");
    command.arg(match keep.is_on() {
        false => b"im_send_stamped",
        true => b"im_send_stamped_keep",
    });
    command.arg(Decimal::unsigned(batch.len() as u64).as_bytes());
    for send in batch {
        command.arg(send.key.as_bytes());
    }
    command.arg(Decimal::new(now).as_bytes());
    let mut proposal = now;
    for (i, send) in batch.iter().enumerate() {
        if follows(i) {
            proposal += 1;
            command.arg(Decimal::new(proposal).as_bytes());
        } else {
            proposal = now;
        }
        command.arg_parts(&[&[SEND_TIME_KEY], &proposal.to_le_bytes(), &send.member]);
    }
    if keep.is_on() {
        command.arg(Decimal::unsigned(keep.messages as u64).as_bytes());
        command.arg(Decimal::new(keep.floor(now)).as_bytes());
    }
    command.finish()
}

/// `im_send` of a batch with idempotency keys, grouped by chat.
fn keyed_im_send_command(batch: &[QueuedSend], now: i64, keep: &Retention) -> Bytes {
    let (messages, floor) = (keep.messages.to_string(), keep.floor(now).to_string());
    let now = now.to_string();
    // (1-based message index, record) of the keyed sends.
    let keyed: Vec<(String, &IdempotencyRecord)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.record.as_ref().map(|r| ((i + 1).to_string(), r)))
        .collect();
    let count = (batch.len() + keyed.len()).to_string();
    let mut args: Vec<&[u8]> = Vec::with_capacity(4 + 2 * batch.len() + 2 * keyed.len() + 2);
    match keep.is_on() {
        false => args.extend([&b"FCALL"[..], b"im_send", count.as_bytes()]),
        true => args.extend([&b"FCALL"[..], b"im_send_keep", count.as_bytes()]),
    }
    args.extend(batch.iter().map(|s| s.key.as_bytes()));
    args.extend(keyed.iter().map(|(_, r)| r.key.as_bytes()));
    args.extend(batch.iter().map(|s| &s.member[..]));
    let keyed_count = keyed.len().to_string();
    if let Some((_, first)) = keyed.first() {
        args.extend(keyed.iter().map(|(index, _)| index.as_bytes()));
        // One store, one TTL: every record of a batch has the same.
        args.extend([first.ttl.as_bytes(), keyed_count.as_bytes()]);
    }
    args.push(now.as_bytes());
    if keep.is_on() {
        args.extend([messages.as_bytes(), floor.as_bytes()]);
    }
    command::encode(&args)
}
/// One message's entry in im_send's reply.
pub(super) fn send_outcome(reply: Reply) -> Result<Sent, Error> {
    let sent = |send_time, replayed| {
        Ok(Sent {
            send_time,
            replayed,
        })
    };
    match reply {
        Reply::Integer(send_time) => sent(send_time, false),
        Reply::Array(replay) => match replay[..] {
            [Reply::Integer(send_time)] => sent(send_time, true),
            _ => Err(Error::Internal(format!(
                "im_send returned {replay:?} for a message"
            ))),
        },
        Reply::SimpleString(status) if status == "REUSED" => Err(Error::IdempotencyKeyReused),
        other => Err(Error::Internal(format!(
            "im_send returned {other:?} for a message"
        ))),
    }
}
/// A `StoredMessage` without its send_time (im_send prepends it), encoded
/// from the borrowed fields: one allocation, no `String` copies.
pub(crate) fn encode_member(text: &str, sender: &str) -> Vec<u8> {
    let mut member = Vec::with_capacity(
        wire::bytes_field_len(stored_message::TEXT, text.len())
            + wire::bytes_field_len(stored_message::SENDER, sender.len()),
    );
    wire::put_bytes_field(&mut member, stored_message::TEXT, text.as_bytes());
    wire::put_bytes_field(&mut member, stored_message::SENDER, sender.as_bytes());
    member
}

/// A member as `im_send` stores it: the send_time field, then what
/// [`encode_member`] writes.
pub(crate) fn stored_member(send_time: i64, text: &str, sender: &str) -> Vec<u8> {
    let mut member = Vec::with_capacity(9 + text.len() + sender.len() + 4);
    member.push(SEND_TIME_KEY);
    member.extend_from_slice(&send_time.to_le_bytes());
    member.extend(encode_member(text, sender));
    member
}

/// A `StoredMessage` member, borrowed.
pub(in crate::store) struct StoredView<'a> {
    pub(in crate::store) send_time: i64,
    pub(in crate::store) text: &'a str,
    pub(in crate::store) sender: &'a str,
    /// 0: never edited.
    pub(in crate::store) edited_at: i64,
}

/// Reads a member; fields it does not know are skipped (a newer writer's).
pub(in crate::store) fn read_stored(mut member: &[u8]) -> Result<StoredView<'_>, Malformed> {
    let mut view = StoredView {
        send_time: 0,
        text: "",
        sender: "",
        edited_at: 0,
    };
    while !member.is_empty() {
        match next_field(&mut member)? {
            (stored_message::SEND_TIME, Value::Fixed64(t)) => view.send_time = t as i64,
            (stored_message::TEXT, Value::Bytes(b)) => view.text = text(b)?,
            (stored_message::SENDER, Value::Bytes(b)) => view.sender = text(b)?,
            (stored_message::EDITED_AT, Value::Fixed64(t)) => view.edited_at = t as i64,
            (
                stored_message::SEND_TIME
                | stored_message::TEXT
                | stored_message::SENDER
                | stored_message::EDITED_AT,
                _,
            ) => {
                return Err(Malformed("field of the wrong type"));
            }
            _ => {}
        }
    }
    Ok(view)
}
/// The range command reading one page (one more than the limit, to learn
/// whether there is more), from `floor` up (the retention window's oldest
/// send_time, inclusive; 0 = the whole chat, the command as it always was).
pub(in crate::store) fn pull_command(query: &PullQuery, floor: i64) -> Bytes {
    // "(" and the cursor: an exclusive bound.
    let cursor = Decimal::new(query.cursor).prefixed(b'(');
    let count = Decimal::unsigned((query.limit as u64).saturating_add(1));
    let floor_text = Decimal::new(floor);
    let low: &[u8] = if floor == 0 {
        b"-inf"
    } else {
        floor_text.as_bytes()
    };
    // The cursor is exclusive: "(" makes the bound open; below the floor,
    // the floor is where oldest first starts.
    let (verb, from, to): (&[u8], &[u8], &[u8]) = match (query.reverse, query.cursor) {
        (false, 0) => (b"ZREVRANGEBYSCORE", b"+inf", low),
        (false, _) => (b"ZREVRANGEBYSCORE", cursor.as_bytes(), low),
        (true, c) if c == 0 || c < floor => (b"ZRANGEBYSCORE", low, b"+inf"),
        (true, _) => (b"ZRANGEBYSCORE", cursor.as_bytes(), b"+inf"),
    };
    let mut command = command::Writer::new(7, 64 + query.chat.len());
    command.arg(verb);
    // The chat's key as chat_key writes it, without a String for it.
    command.arg_parts(&[b"im:{", query.chat.as_bytes(), b"}"]);
    for arg in [from, to, b"LIMIT", b"0", count.as_bytes()] {
        command.arg(arg);
    }
    command.finish()
}

/// The page of `query` from the reply to its [`pull_command`].
pub(in crate::store) fn page_from_reply(query: &PullQuery, reply: Reply) -> Result<Page, Error> {
    let Reply::Array(members) = reply else {
        return Err(Error::Internal("range did not return an array".into()));
    };
    let mut page = PageWriter::new(&query.chat, query.limit);
    let kept = members.len().min(query.limit);
    let bytes = members[..kept]
        .iter()
        .map(|m| match m {
            Reply::BulkString(b) => b.len(),
            _ => 0,
        })
        .sum();
    page.reserve(kept, bytes);
    for member in members {
        let Reply::BulkString(bytes) = member else {
            return Err(Error::Internal("range returned a non-string member".into()));
        };
        let stored = read_stored(&bytes)
            .map_err(|e| Error::Internal(format!("undecodable stored message: {e}")))?;
        if !page.push(
            stored.text,
            stored.sender,
            stored.send_time,
            stored.edited_at,
        ) {
            break;
        }
    }
    Ok(page.finish())
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use tokio::sync::oneshot;
    use tokio::time::Instant;

    use super::super::queue::SendWaiter;
    use super::*;
    use crate::proto::StoredMessage;

    /// `im_send` stores a run of one chat's messages with one read and one
    /// ZADD, so the command puts each chat's sends together, each chat's in
    /// queue order, and the batch (whose waiters are answered in order)
    /// with them.
    #[test]
    fn a_batch_is_grouped_by_chat_in_queue_order() {
        let mut batch: Vec<QueuedSend> = ["b", "a", "b", "a"]
            .iter()
            .enumerate()
            .map(|(i, chat)| queued(chat, &i.to_string(), None))
            .collect();
        let command = im_send_command(&mut batch, 1, &Retention::default());
        let order: Vec<(&str, Vec<u8>)> = batch
            .iter()
            .map(|s| (s.key.as_str(), s.member.clone()))
            .collect();
        let member = |text: &str| encode_member(text, "s");
        assert_eq!(
            order,
            [
                ("im:{a}", member("1")),
                ("im:{a}", member("3")),
                ("im:{b}", member("0")),
                ("im:{b}", member("2")),
            ]
        );
        let text = String::from_utf8_lossy(&command);
        let keys: Vec<&str> = text
            .split("\r\n")
            .filter(|l| l.starts_with("im:"))
            .collect();
        assert_eq!(keys, ["im:{a}", "im:{a}", "im:{b}", "im:{b}"]);
    }

    /// The arguments of a command, as Redis reads them.
    fn arguments(command: &[u8]) -> Vec<Vec<u8>> {
        use redis_protocol::resp2::decode::decode_bytes;
        use redis_protocol::resp2::types::BytesFrame;
        let (frame, used) = decode_bytes(&Bytes::copy_from_slice(command))
            .expect("valid RESP")
            .expect("complete");
        assert_eq!(used, command.len());
        let BytesFrame::Array(items) = frame else {
            panic!("not an array")
        };
        items
            .into_iter()
            .map(|item| match item {
                BytesFrame::BulkString(arg) => arg.to_vec(),
                other => panic!("not a bulk string: {other:?}"),
            })
            .collect()
    }

    fn queued(chat: &str, text: &str, record: Option<IdempotencyRecord>) -> QueuedSend {
        QueuedSend {
            key: chat_key(chat),
            member: encode_member(text, "s"),
            deadline: Instant::now(),
            record,
            reply: SendWaiter::Caller(oneshot::channel().0),
        }
    }

    /// Without idempotency keys a batch is `im_send_stamped`: each member
    /// stamped with its proposal (the clock for a chat's first, + 1 for each
    /// next), each next one after its score; with a key, `im_send`.
    #[test]
    fn a_batch_without_keys_is_stamped_with_proposals() {
        let mut batch: Vec<QueuedSend> = [("b", "0"), ("a", "1"), ("b", "2"), ("a", "3")]
            .iter()
            .map(|(chat, text)| queued(chat, text, None))
            .collect();
        let now = 1_765_000_000_000_000;
        let args = arguments(&im_send_command(&mut batch, now, &Retention::default()));
        let digits = |t: i64| t.to_string().into_bytes();
        let expected: Vec<Vec<u8>> = vec![
            b"FCALL".to_vec(),
            b"im_send_stamped".to_vec(),
            b"4".to_vec(),
            b"im:{a}".to_vec(),
            b"im:{a}".to_vec(),
            b"im:{b}".to_vec(),
            b"im:{b}".to_vec(),
            digits(now),
            stored_member(now, "1", "s"),
            digits(now + 1),
            stored_member(now + 1, "3", "s"),
            stored_member(now, "0", "s"),
            digits(now + 1),
            stored_member(now + 1, "2", "s"),
        ];
        assert_eq!(args, expected);

        let record = IdempotencyRecord {
            key: idempotency_record_key("a", "k"),
            ttl: "60".into(),
        };
        let mut keyed = vec![queued("a", "1", None), queued("a", "2", Some(record))];
        let args = arguments(&im_send_command(&mut keyed, now, &Retention::default()));
        assert_eq!(args[1], b"im_send");
        assert_eq!(args[6], encode_member("1", "s"), "unstamped");
    }

    /// A pull is one range read on the chat's key, the cursor exclusive,
    /// one more than the limit (for has_more), never below the floor.
    #[test]
    fn pulls_read_one_range_past_the_cursor() {
        let query = |cursor, reverse| PullQuery {
            chat: "a:b".into(),
            cursor,
            limit: 10,
            reverse,
        };
        let args = |query: &PullQuery, floor: i64| -> Vec<String> {
            arguments(&pull_command(query, floor))
                .into_iter()
                .map(|a| String::from_utf8(a).expect("text"))
                .collect()
        };
        let range = |verb: &str, from: &str, to: &str| -> Vec<String> {
            [verb, "im:{a:b}", from, to, "LIMIT", "0", "11"]
                .map(String::from)
                .to_vec()
        };
        assert_eq!(
            args(&query(0, false), 0),
            range("ZREVRANGEBYSCORE", "+inf", "-inf")
        );
        assert_eq!(
            args(&query(5, false), 3),
            range("ZREVRANGEBYSCORE", "(5", "3")
        );
        assert_eq!(
            args(&query(2, true), 3),
            range("ZRANGEBYSCORE", "3", "+inf")
        );
        assert_eq!(
            args(&query(5, true), 3),
            range("ZRANGEBYSCORE", "(5", "+inf")
        );
        assert_eq!(args(&query(0, true), 0)[1], chat_key("a:b"));
    }

    #[test]
    fn the_lua_prefix_is_the_send_time_field_key() {
        let lua = format!("'\\{SEND_TIME_KEY}' .. packed");
        assert!(
            LIBRARY.contains(&lua),
            "LIBRARY must prefix members with {lua}"
        );
        // `packed` is the send_time as 8 little-endian bytes, both ways.
        for packing in ["struct.pack('<i8', now)", "struct.pack('<i8', t)"] {
            assert!(LIBRARY.contains(packing), "LIBRARY must pack {packing}");
        }
        let lua_read = "struct.unpack('<i8', top, 2)";
        assert!(
            LIBRARY.contains(lua_read),
            "and read the send_time after that one byte"
        );
    }

    #[test]
    fn records_share_their_chat_slot_unless_the_tag_is_empty() {
        for chat in ["room", "a:b", "x}y", "{a}", "ä"] {
            assert!(record_shares_the_chat_slot(chat, "k-1"), "{chat:?}");
        }
        assert!(!record_shares_the_chat_slot("}x", "k-1"));
        // The rule every store applies is this one.
        for chat in ["room", "a:b", "x}y", "{a}", "ä", "}x", "}", "}}{a}"] {
            assert_eq!(
                record_shares_the_chat_slot(chat, "k-1"),
                crate::domain::chat_keeps_records(chat),
                "{chat:?}"
            );
        }
        assert!(
            !record_shares_the_chat_slot("", "k-1"),
            "empty chats are refused anyway"
        );
    }

    #[test]
    fn members_are_stored_messages() {
        let member = stored_member(1_795_800_000_000_123, "hi 😀", "kylie");
        let expected = StoredMessage {
            send_time: 1_795_800_000_000_123,
            text: "hi 😀".into(),
            sender: "kylie".into(),
            ..StoredMessage::default()
        };
        assert_eq!(StoredMessage::decode(&member[..]), Ok(expected));
        let view = read_stored(&member).expect("readable");
        assert_eq!(
            (view.send_time, view.text, view.sender),
            (1_795_800_000_000_123, "hi 😀", "kylie")
        );
        assert!(
            read_stored(&member[..member.len() - 1]).is_err(),
            "truncated"
        );
    }
}
