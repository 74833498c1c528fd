#!/usr/bin/env bash
# Load benchmark: `tools/call list_environments` through Custodian (`custodian serve`, SQLite,
# release build, token checked on every request) against a bare rmcp server and the TypeScript MCP
# SDK's reference server answering the same JSON, at 1 and 16 sessions, measured in the same run
# with an independent HTTP load client (wrk, one connection per session).
#
#   benches/load/run.sh [SECONDS_PER_POINT]        # default 10
#
# Needs cargo, node/npm, curl, and wrk (installed with apt-get when missing). Prints requests/s,
# p50/p99 latency and the ratios; exits non-zero if any answer was not a successful tool result.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
seconds="${1:-10}"
levels=(1 16)

if ! command -v wrk >/dev/null; then
  echo "installing wrk" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >&2; else sudo apt-get install -y wrk >&2; fi
fi
for tool in node npm curl; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
[ -d "$here/node_modules/@modelcontextprotocol/sdk" ] || npm ci --prefix "$here" --no-audit --no-fund >&2
(cd "$repo" && cargo build --release --bin custodian --example bare_rmcp >&2)
custodian="$repo/target/release/custodian"
bare="$repo/target/release/examples/bare_rmcp"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
wait_port() {
  for _ in $(seq 1 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; exit 1
}

# Custodian on SQLite, with three environments (two secret names each) and one agent token.
port_c="$(free_port)"
"$custodian" admin master-key generate --out "$work/master.key" >/dev/null
cat >"$work/custodian.toml" <<TOML
[server]
listen = "127.0.0.1:$port_c"
public_url = "http://127.0.0.1:$port_c"
[database]
url = "sqlite://$work/custodian.db"
[secrets]
master_key_file = "$work/master.key"
TOML
export CUSTODIAN_CONFIG="$work/custodian.toml"
"$custodian" migrate >/dev/null
"$custodian" admin tenant create bench --display-name Bench >/dev/null
for env in staging production analytics; do
  "$custodian" admin env create bench "$env" --description "bench $env" --secret API_KEY --secret DB_URL >/dev/null
done
token="$("$custodian" admin agent-token create bench load | tail -n 1)"
RUST_LOG=warn "$custodian" serve >"$work/custodian.log" 2>&1 &
pids+=($!)
wait_port "$port_c"

# One MCP session: initialize + initialized; prints the session id.
session() { # URL TOKEN
  local auth=()
  [ -n "$2" ] && auth=(-H "Authorization: Bearer $2")
  local id
  id="$(curl -sS -D - -o /dev/null "$1" "${auth[@]}" -H 'Content-Type: application/json' \
    -H 'Accept: application/json, text/event-stream' \
    --data '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"load","version":"1"}}}' |
    tr -d '\r' | awk 'tolower($1)=="mcp-session-id:"{print $2}')"
  [ -n "$id" ] || { echo "no session from $1" >&2; exit 1; }
  curl -sS -o /dev/null "$1" "${auth[@]}" -H 'Content-Type: application/json' \
    -H 'Accept: application/json, text/event-stream' -H "Mcp-Session-Id: $id" \
    -H 'MCP-Protocol-Version: 2025-06-18' \
    --data '{"jsonrpc":"2.0","method":"notifications/initialized"}'
  echo "$id"
}

# Custodian's answer, which the other two servers return verbatim.
url_c="http://127.0.0.1:$port_c/t/bench/mcp"
sid="$(session "$url_c" "$token")"
curl -sS "$url_c" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -H 'Accept: application/json, text/event-stream' -H "Mcp-Session-Id: $sid" \
  -H 'MCP-Protocol-Version: 2025-06-18' \
  --data '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_environments","arguments":{}}}' |
  node -e '
    let text = ""; process.stdin.on("data", (d) => (text += d)).on("end", () => {
      const line = text.split("\n").find((l) => l.startsWith("data: {"));
      const answer = JSON.parse(line ? line.slice(6) : text).result.structuredContent;
      if (!answer || answer.environments.length !== 3) throw new Error("unexpected answer: " + text);
      console.log(JSON.stringify(answer));
    });' >"$work/answer.json"

port_b="$(free_port)"
"$bare" "127.0.0.1:$port_b" "$work/answer.json" &
pids+=($!)
port_t="$(free_port)"
node "$here/reference.mjs" "$port_t" "$work/answer.json" &
pids+=($!)
wait_port "$port_b"
wait_port "$port_t"

declare -A url=([custodian]="$url_c" [bare]="http://127.0.0.1:$port_b/mcp" [reference]="http://127.0.0.1:$port_t/mcp")
declare -A auth=([custodian]="$token" [bare]="" [reference]="")
declare -A rps p50 p99
failed=0
for n in "${levels[@]}"; do
  for target in custodian bare reference; do
    : >"$work/sessions"
    for _ in $(seq 1 "$n"); do session "${url[$target]}" "${auth[$target]}" >>"$work/sessions"; done
    threads=$((n < 2 ? n : 2))
    export BENCH_SESSIONS="$work/sessions" BENCH_TOKEN="${auth[$target]}"
    # A short warm-up, then the measured run.
    wrk -t "$threads" -c "$n" -d 2s -s "$here/call.lua" "${url[$target]}" >/dev/null
    read -r _ r total bad q50 q99 < <(wrk -t "$threads" -c "$n" -d "${seconds}s" -s "$here/call.lua" "${url[$target]}" | grep '^RESULT')
    if [ "$bad" != 0 ]; then
      echo "$target at $n sessions: $bad of $total answers were not a successful tool result" >&2
      failed=1
    fi
    rps[$target,$n]="$r"; p50[$target,$n]="$q50"; p99[$target,$n]="$q99"
  done
done

echo "tools/call list_environments, wrk over loopback, ${seconds} s per point, $(nproc) cores shared by server and client"
printf '%-34s %8s %12s %10s %10s\n' "" sessions "calls/s" "p50 ms" "p99 ms"
for n in "${levels[@]}"; do
  for target in custodian bare reference; do
    case $target in
      custodian) name="Custodian (SQLite, token checked)";;
      bare) name="bare rmcp, same answer";;
      reference) name="TypeScript SDK reference, same";;
    esac
    printf '%-34s %8s %12.0f %10s %10s\n' "$name" "$n" "${rps[$target,$n]}" "${p50[$target,$n]}" "${p99[$target,$n]}"
  done
done
for n in "${levels[@]}"; do
  node -e '
    const [n, c, b, t] = process.argv.slice(1).map(Number);
    const vsBare = c / b, vsRef = c / t;
    console.log(`${n} session(s): Custodian ${vsBare.toFixed(2)}x bare rmcp (goal >= 0.8), ${vsRef.toFixed(2)}x the TypeScript reference (goal >= 3)`);
  ' "$n" "${rps[custodian,$n]}" "${rps[bare,$n]}" "${rps[reference,$n]}"
done
exit "$failed"
