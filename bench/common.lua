-- bench/common.lua: code shared by the wrk scripts in this folder.
--
-- Each wrk-*.lua script only loads this file and calls `install(kind, depth)`,
-- which defines wrk's global hooks (setup, init, request, done). wrk runs the
-- script once per thread (every thread has its own Lua state) and once more
-- in the main thread, where setup() and done() are called.
--
-- The URL given to wrk is only scheme://host:port; the paths are set here.

local M = {}

M.chat = "bench-room"

-- BENCH_ROOMS=N (bench/run --rooms N): each request picks one of N rooms
-- "bench-room-<0..N-1>" uniformly, so per-chat work in Redis no longer
-- amortises over one hot room. 1 (the default): every request uses M.chat.
M.rooms = tonumber(os.getenv("BENCH_ROOMS") or "") or 1

local function room()
   if M.rooms <= 1 then return M.chat end
   return M.chat .. "-" .. math.random(0, M.rooms - 1)
end

-- How many different pipelined batches each thread pre-builds, so the texts
-- (and rooms) still vary while request() only hands out a ready string.
local SEND_BATCHES = 8

-- BENCH_TOKEN (bench/run --stack auth): a bearer token sent with every request.
M.token = os.getenv("BENCH_TOKEN") or ""

local function json_headers()
   -- A fresh table per call: wrk.format() adds "Host" to the table it gets.
   local h = { ["Content-Type"] = "application/json" }
   if M.token ~= "" then h["Authorization"] = "Bearer " .. M.token end
   return h
end

-- BENCH_GATEWAYS="host:port,host:port" (bench/run --stack gwN): thread i
-- sends to gateway ((i - 1) mod N) + 1 instead of the URL's address, so the
-- load is split evenly when the thread count is a multiple of N.
local function gateways()
   local list = {}
   for host, port in string.gmatch(os.getenv("BENCH_GATEWAYS") or "", "([^,:]+):(%d+)") do
      list[#list + 1] = { host = host, port = port }
   end
   return list
end

-- POST /api/send with a new random number in the text on every call.
function M.send_request()
   local body = string.format(
      '{"chat":"%s","text":"random number %d","sender":"a2"}',
      room(), math.random(1, 100000))
   return wrk.format("POST", "/api/send", json_headers(), body)
end

-- GET /api/pull with a JSON body (a GET with a body, as the original clients
-- send it). wrk.format() adds Content-Length.
function M.pull_body()
   return string.format('{"chat":"%s","cursor":0,"limit":10}', room())
end

function M.pull_request()
   return wrk.format("GET", "/api/pull", json_headers(), M.pull_body())
end

-- `depth` requests in one string: wrk writes it at once, counts the requests
-- in it, and waits for that many responses before the next write (HTTP/1.1
-- pipelining).
local function batch(make, depth)
   local parts = {}
   for i = 1, depth do
      parts[i] = make()
   end
   return table.concat(parts)
end

-- wrk's latency percentile in µs, or "na". wrk corrects for coordinated
-- omission by adding synthetic samples, using as the expected interval
-- duration / (responses / connections); with pipelining that interval is
-- `depth` times too short, so many synthetic samples land below latency.min,
-- where percentile() (which scans only [min, max]) never counts them, and it
-- returns 0 for high percentiles. Debian's wrk gives Lua no access to the raw
-- histogram, so such a value is reported as unavailable rather than as 0.
local function percentile(latency, p)
   local v = latency:percentile(p)
   if v == 0 then return "na" end
   return string.format("%d", v)
end

-- wrk's done() hook (main state): ONE machine-readable line for bench/run.
-- Latencies are in µs; with pipelining wrk times a whole batch (the write of
-- `depth` requests to the last of their responses). err_status is wrk's count
-- of responses with a status >= 400.
local function install_done(name, depth)
   function done(summary, latency, _)
      local e = summary.errors
      local seconds = summary.duration / 1e6
      io.write(string.format(
         "RESULT script=%s depth=%d requests=%d duration_s=%.3f rps=%.1f " ..
         "p50_us=%s p99_us=%s p999_us=%s mean_us=%.1f max_us=%d " ..
         "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d\n",
         name, depth, summary.requests, seconds, summary.requests / seconds,
         percentile(latency, 50), percentile(latency, 99),
         percentile(latency, 99.9), latency.mean, latency.max,
         e.connect, e.read, e.write, e.timeout, e.status))
   end
end

-- Defines wrk's hooks for `kind` ("send" or "pull") at pipelining `depth`
-- (1 = one request at a time; BENCH_PIPELINE_DEPTH overrides it).
function M.install(kind, depth)
   depth = tonumber(os.getenv("BENCH_PIPELINE_DEPTH") or "") or depth or 1
   local make = ({ send = M.send_request, pull = M.pull_request })[kind]
   assert(make, "unknown kind " .. tostring(kind))
   local name = kind .. (depth > 1 and ("-pipeline" .. depth) or "")

   -- Main state: number the threads, so each seeds its RNG differently.
   local next_id = 0
   local targets = gateways()
   function setup(thread)
      next_id = next_id + 1
      thread:set("thread_id", next_id)
      if #targets > 1 then
         local t = targets[(next_id - 1) % #targets + 1]
         thread.addr = wrk.lookup(t.host, t.port)[1]
      end
   end

   local batches, n = {}, 0
   function init(_)
      math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
      if depth > 1 then
         for i = 1, (kind == "send" or M.rooms > 1) and SEND_BATCHES or 1 do
            batches[i] = batch(make, depth)
         end
      end
   end

   if depth > 1 then
      function request()
         n = n % #batches + 1
         return batches[n]
      end
   elseif kind == "send" or M.rooms > 1 then
      request = make -- a fresh random text (or room) per request
   else
      -- One room: a constant request. Leave request() undefined, so wrk sends the one
      -- it builds from these fields without calling Lua per request.
      wrk.method = "GET"
      wrk.path = "/api/pull"
      wrk.headers = json_headers()
      wrk.body = M.pull_body()
   end

   install_done(name, depth)
end

return M
