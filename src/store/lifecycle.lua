
-- Message lifecycle (src/store/lifecycle.rs): edits and deletions, each
-- written with its entry in the chat's change log in one call.
-- Every function here is a compare-and-set: the caller read the message's
-- member at score T, checked who may change it, and passes that member; the
-- change is made only if it is still there, else CHANGED (the caller reads
-- again). So two concurrent edits cannot lose one another, and an edit
-- racing a delete cannot bring the message back.

-- The next change sequence of a chat: max(clock, the log's top + 1), like a
-- send_time. The log's members start with their sequence (tag + 8 bytes).
local function next_seq(log, now)
  local top = redis.call('ZRANGE', log, '-1', '-1')[1]
  local prev = top and struct.unpack('<i8', top, 2) or -1
  if prev >= now then return prev + 1 end
  return now
end

-- The member's key byte of StoredMessage.deleted_newer (field 15,
-- sfixed64): (15 << 3) | 1 = 121, 'y'. Every other member starts with
-- send_time's, 9.
local DELETED_NEWER_KEY = 121

-- Deleting a chat's newest message must not free its send_time: a client
-- that saw it holds it as its cursor, and the next message, if it got a
-- send_time at or below it (im_send gives max(clock, the newest + 1), and
-- send_times run ahead of a caller's clock by a burst or by the skew
-- between RPC hosts), would never reach that client. So the message that
-- becomes the newest (`below`, scored `score`) starts with field
-- deleted_newer: the deleted one's send_time, or the deleted_newer it
-- carried itself (higher still). im_send reads the 8 bytes after the
-- newest member's first key byte either way, so it costs sends nothing;
-- readers skip the field. (An emptied chat has its tombstones for that.)
local function carry_deleted_newer(chat, deleted, below, score)
  local floor = string.sub(deleted, 1, 9)
  if string.byte(floor, 1) ~= DELETED_NEWER_KEY then
    floor = string.char(DELETED_NEWER_KEY) .. string.sub(floor, 2)
  end
  local rest = below
  if string.byte(below, 1) == DELETED_NEWER_KEY then rest = string.sub(below, 10) end
  redis.call('ZREM', chat, below)
  redis.call('ZADD', chat, score, floor .. rest)
end

-- Adds a Change (its sequence prepended, as field 1: '\9' + 8 bytes) and
-- trims the log to `keep` microseconds; the whole log expires `keep` after
-- its last change, so an idle chat's log goes too.
local function log_change(log, seq, tail, keep)
  redis.call('ZADD', log, string.format('%d', seq), '\9' .. struct.pack('<i8', seq) .. tail)
  redis.call('ZREMRANGEBYSCORE', log, '-inf', string.format('(%d', seq - keep))
  redis.call('PEXPIRE', log, math.max(1, math.floor(keep / 1000)))
end

-- KEYS = chat, log; ARGV = T, old member, new member (without edited_at),
-- change tail (the Change's field 3), clock (µs), keep (µs).
-- Returns edited_at (the change's sequence) or the status CHANGED.
redis.register_function('im_edit', function(keys, args)
  local chat, log = keys[1], keys[2]
  local t = args[1]
  if redis.call('ZRANGE', chat, t, t, 'BYSCORE')[1] ~= args[2] then
    return {ok = 'CHANGED'}
  end
  local seq = next_seq(log, tonumber(args[5]))
  redis.call('ZREM', chat, args[2])
  -- edited_at: field 4, sfixed64 (tag 0x21 = '!'). The message keeps the
  -- deleted_newer field it may start with (see im_delete).
  local kept = ''
  if string.byte(args[2], 1) == DELETED_NEWER_KEY then kept = string.sub(args[2], 1, 9) end
  redis.call('ZADD', chat, t, kept .. args[3] .. '!' .. struct.pack('<i8', seq))
  log_change(log, seq, args[4], tonumber(args[6]))
  redis.call('SPUBLISH', chat .. ':new', '')
  return seq
end)

-- KEYS = chat, tombstones, log; ARGV = T, old member, tombstone, change
-- tail (field 2), clock (µs), keep (µs), and (optional) the most
-- tombstones the chat keeps (--retain-messages; 0 or absent: any number).
-- The tombstone (T as 8 bytes + the sender), scored T, lets a repeated
-- delete answer as the first did. Under count retention only the newest
-- `cap` stay: the chat keeps that many messages, and without the cap
-- deletes would pile tombstones up for ever (the age sweep, im_trim, takes
-- them by age). Returns the change's sequence or CHANGED.
redis.register_function('im_delete', function(keys, args)
  local chat, tombs, log = keys[1], keys[2], keys[3]
  local t = args[1]
  if redis.call('ZRANGE', chat, t, t, 'BYSCORE')[1] ~= args[2] then
    return {ok = 'CHANGED'}
  end
  local seq = next_seq(log, tonumber(args[5]))
  local newest = redis.call('ZRANGE', chat, '-2', '-1', 'WITHSCORES')
  redis.call('ZREM', chat, args[2])
  if #newest == 4 and newest[3] == args[2] then
    carry_deleted_newer(chat, args[2], newest[1], newest[2])
  end
  redis.call('ZADD', tombs, t, args[3])
  local cap = tonumber(args[7] or '0')
  if cap > 0 then
    redis.call('ZREMRANGEBYRANK', tombs, '0', string.format('%d', -cap - 1))
  end
  log_change(log, seq, args[4], tonumber(args[6]))
  redis.call('SPUBLISH', chat .. ':new', '')
  return seq
end)

-- Retention (--retain-messages, --retain-age-s): removes from a chat what
-- is outside its window. Bounded work: at most `limit` members by age (a
-- pull never shows them anyway: it reads from the floor up); by count,
-- whatever is beyond the newest `keep` (a send adds at most its batch, so
-- at most that, unless the option was just lowered).
local function trim_chat(key, keep, floor, limit)
  if keep > 0 then
    redis.call('ZREMRANGEBYRANK', key, '0', string.format('%d', -keep - 1))
  end
  if floor ~= '0' then
    local old = redis.call('ZRANGE', key, '-inf', '(' .. floor, 'BYSCORE', 'LIMIT', '0', limit)
    if #old > 0 then redis.call('ZREM', key, unpack(old)) end
  end
end

-- The trim after each run of a send with retention: keep (messages per
-- chat, 0 = any) and floor (the oldest send_time kept, 0 = any) are taken
-- off the end of `args` (no copy of the arguments).
local function keep_trim(args)
  local floor = table.remove(args)
  local keep = tonumber(table.remove(args))
  return function(key, t)
    -- By age, amortised: one run in 16 (by its last send_time) also
    -- removes up to 64 expired messages; reads skip them meanwhile, and
    -- the sweep takes the rest.
    local by_age = floor
    if t % 16 ~= 0 then by_age = '0' end
    trim_chat(key, keep, by_age, '64')
  end
end

-- im_send and im_send_stamped with retention: ARGV = their own arguments,
-- then keep and floor (see keep_trim). Kept apart from them so that sends
-- without retention cost what they always did.
redis.register_function('im_send_keep', function(keys, args)
  local trim = keep_trim(args)
  return send_batch(keys, args, trim)
end)

redis.register_function('im_send_stamped_keep', function(keys, args)
  local trim = keep_trim(args)
  return send_stamped(keys, args, trim)
end)

-- The background sweep for chats nobody writes to: KEYS = a chat and its
-- tombstones (one slot), ARGV = floor. Removes up to 256 expired messages
-- and the tombstones below the floor; returns how many messages went.
redis.register_function('im_trim', function(keys, args)
  local before = redis.call('ZCARD', keys[1])
  trim_chat(keys[1], 0, args[1], '256')
  redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', '(' .. args[1])
  return before - redis.call('ZCARD', keys[1])
end)
