-- wrk script: a random mix, half POST /api/send (as wrk-send.lua) and half
-- GET /api/pull with a JSON body (as wrk-pull.lua), chosen per request, one
-- request at a time. Used by bench/soak.
-- Usage: wrk -s bench/wrk-mixed.lua http://127.0.0.1:PORT   (shared code: common.lua)
--
-- common.install("send", 1) defines the hooks (thread numbering, RNG seeding,
-- the RESULT line); this script keeps them and wraps three of them: request()
-- picks send or pull, setup() remembers the threads, done() renames the
-- script in the RESULT line to "mixed" and adds a line with the mix:
--   MIX sends=N pulls=M
-- (requests built per kind, summed over threads; wrk may build a few more
-- requests than it completes).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "common.lua")
common.install("send", 1)

-- Main state: keep the thread objects, to read their counters in done().
local threads = {}
local common_setup = setup
function setup(thread)
   common_setup(thread)
   threads[#threads + 1] = thread
end

-- Thread states: the pull request is constant, so build it once.
local pull
sends, pulls = 0, 0 -- globals, so thread:get() can read them
local common_init = init
function init(args)
   common_init(args)
   pull = common.pull_request()
end

function request()
   if math.random(2) == 1 then
      sends = sends + 1
      return common.send_request() -- a fresh random text per send
   end
   pulls = pulls + 1
   return pull
end

local common_done = done
function done(summary, latency, requests)
   local write = io.write
   io.write = function(s)
      write((s:gsub("^RESULT script=send ", "RESULT script=mixed ")))
   end
   local ok, err = pcall(common_done, summary, latency, requests)
   io.write = write
   assert(ok, err)
   local s, p = 0, 0
   for _, t in ipairs(threads) do
      s = s + (t:get("sends") or 0)
      p = p + (t:get("pulls") or 0)
   end
   io.write(string.format("MIX sends=%d pulls=%d\n", s, p))
end
