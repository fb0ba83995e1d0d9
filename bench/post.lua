-- wrk script: POST one small chat completion, non-stream, with a bearer key.
--
--   wrk -t1 -c16 -d10s --latency -s bench/post.lua http://127.0.0.1:4000/v1/chat/completions [-- KEY [MODEL]]
--
-- The key comes from the first script argument, else $BENCH_KEY, else "sk-bench";
-- the model from the second argument, else $BENCH_MODEL, else "bench-model".
-- Set BENCH_COUNT_STATUS=1 to count responses per status code (costs wrk some CPU:
-- it then parses every response in Lua). At the end one line is printed:
--   BENCH_JSON {"requests":..,"duration_us":..,"p50_us":..,...}
-- which bench/run.py reads instead of wrk's rounded text.

local key = os.getenv("BENCH_KEY") or "sk-bench"
local model = os.getenv("BENCH_MODEL") or "bench-model"
local count_status = os.getenv("BENCH_COUNT_STATUS") == "1"
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   if args[1] ~= nil and args[1] ~= "" then key = args[1] end
   if args[2] ~= nil and args[2] ~= "" then model = args[2] end
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer " .. key
   wrk.body = '{"model":"' .. model .. '","messages":['
      .. '{"role":"system","content":"You are a helpful assistant."},'
      .. '{"role":"user","content":"Say hello to alice@example.com, then tell me a short fact."}'
      .. '],"max_tokens":64,"temperature":0}'
   statuses = {}
end

if count_status then
   function response(status, headers, body)
      statuses[status] = (statuses[status] or 0) + 1
   end
end

function done(summary, latency, requests)
   local by_status = {}
   if count_status then
      for _, thread in ipairs(threads) do
         local counts = thread:get("statuses")
         if counts then
            for status, n in pairs(counts) do
               by_status[status] = (by_status[status] or 0) + n
            end
         end
      end
   end
   local parts = {}
   for status, n in pairs(by_status) do
      table.insert(parts, string.format('"%d":%d', status, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,'
      .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,'
      .. '"errors_timeout":%d,"status":{%s}}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      latency.mean,
      e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ",")))
end
