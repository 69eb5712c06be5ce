-- wrk script: GET /api/pull with body {"chat":"bench-room","cursor":0,"limit":10}, one request at a time.
-- Usage: wrk -s bench/wrk-pull.lua http://127.0.0.1:PORT   (shared code: common.lua)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua").install("pull", 1)
