-- wrk script: `tools/call list_environments` over already initialized MCP sessions (one per
-- connection's worth: the sessions in $BENCH_SESSIONS, used in turn), with $BENCH_TOKEN as bearer
-- token when set. Counts answers that are not a 200 carrying the tool's structured result.
local body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_environments","arguments":{}}}'
local sessions = {}
local next_session = 1
local threads = {}
bad = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(os.getenv("BENCH_SESSIONS")) do
    if line ~= "" then table.insert(sessions, line) end
  end
  next_session = math.random(#sessions)
end

function request()
  local headers = {
    ["Content-Type"] = "application/json",
    ["Accept"] = "application/json, text/event-stream",
    ["MCP-Protocol-Version"] = "2025-06-18",
    ["Mcp-Session-Id"] = sessions[next_session],
  }
  local token = os.getenv("BENCH_TOKEN")
  if token and token ~= "" then headers["Authorization"] = "Bearer " .. token end
  next_session = next_session % #sessions + 1
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, answer)
  if status ~= 200 or not string.find(answer, '"structuredContent"', 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + thread:get("bad") end
  io.write(string.format("RESULT %.1f %d %d %.3f %.3f\n",
    summary.requests / (summary.duration / 1e6), summary.requests,
    failed + summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
