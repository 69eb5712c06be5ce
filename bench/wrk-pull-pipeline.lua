-- wrk script: like wrk-pull.lua, but HTTP/1.1-pipelined 16 deep (each write is 16
-- requests; BENCH_PIPELINE_DEPTH overrides the depth).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua").install("pull", 16)
