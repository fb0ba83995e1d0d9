-- wrk script: POST one small Anthropic message, non-stream, with the key as x-api-key.
--
--   wrk -t1 -c16 -d10s --latency -s bench/post_messages.lua http://127.0.0.1:4000/v1/messages [-- KEY [MODEL]]
--
-- post.lua's request in Anthropic's shape: the same system prompt (top-level `system`),
-- user message, max_tokens and temperature, so both bodies carry the same prompt. The key
-- and model come as in post.lua (arguments, else $BENCH_KEY / $BENCH_MODEL); the model's
-- default is "bench-claude". Everything else (BENCH_COUNT_STATUS, the BENCH_JSON line
-- bench/run.py reads) is post.lua's own, loaded from beside this file.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post.lua")

function init(args)
   local key = os.getenv("BENCH_KEY") or "sk-bench"
   local model = os.getenv("BENCH_MODEL") or "bench-claude"
   if args[1] ~= nil and args[1] ~= "" then key = args[1] end
   if args[2] ~= nil and args[2] ~= "" then model = args[2] end
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["x-api-key"] = key
   wrk.headers["anthropic-version"] = "2023-06-01"
   wrk.body = '{"model":"' .. model .. '","max_tokens":64,"temperature":0,'
      .. '"system":"You are a helpful assistant.","messages":['
      .. '{"role":"user","content":"Say hello to alice@example.com, then tell me a short fact."}'
      .. ']}'
   statuses = {}
end
