-- wrk script: bench/wrk-send.lua's send, each with its own Idempotency-Key
-- header (never repeated, so every send stores a message and a key record).
-- Usage: wrk -s bench/wrk-send-keyed.lua http://127.0.0.1:PORT   (shared code: common.lua)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")
common.install("send", 1)

local sent = 0
function request()
   sent = sent + 1
   local body = string.format(
      '{"chat":"%s","text":"random number %d","sender":"a2"}',
      common.chat, math.random(1, 100000))
   local headers = {
      ["Content-Type"] = "application/json",
      -- Unique across threads and runs: start time, thread, counter.
      ["Idempotency-Key"] = string.format("%d-%d-%d", run_start or 0, thread_id or 0, sent),
   }
   return wrk.format("POST", "/api/send", headers, body)
end

local base_init = init
function init(args)
   base_init(args)
   run_start = os.time()
end
