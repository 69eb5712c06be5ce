-- wrk script: POST /api/send {"chat":"bench-room","text":"random number <1..100000>","sender":"a2"}, one request at a time.
-- Usage: wrk -s bench/wrk-send.lua http://127.0.0.1:PORT   (shared code: common.lua)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua").install("send", 1)
