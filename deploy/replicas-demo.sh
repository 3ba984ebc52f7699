#!/usr/bin/env bash
# Token requests made by three replicas, without and with [token_cache], against the mock
# eGain (6 s tokens, so a refresh every ~5 s) under steady traffic.
#
#   cargo build --release && deploy/replicas-demo.sh      # needs redis-server and curl
#
# Everything listens on free loopback ports and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything here is on loopback: no egress proxy from the environment (README, "Egress proxy").
unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy NO_PROXY no_proxy
BIN=${BIN:-target/release/egain-proxy}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
command -v redis-server >/dev/null || { echo "install redis-server (apt-get install redis-server)"; exit 1; }
[ -x "$BIN" ] || { echo "build first: cargo build --release"; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1"; exit 1; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
pids+=($!)
mock_port=$(free_port)
"$BIN" mock-egain --listen "127.0.0.1:$mock_port" --token-ttl 6 >"$work/mock.out" 2>/dev/null &
pids+=($!)
sleep 0.5
token_url=$(grep -o 'client app token URL: *[^ ]*' "$work/mock.out" | awk '{print $NF}')
client_id=$(grep -o 'client app token URL.*' "$work/mock.out" | sed 's/.*client_id \([^,]*\),.*/\1/')
client_secret=$(grep -o 'client app token URL.*' "$work/mock.out" | sed 's/.*client_secret \([^)]*\)).*/\1/')
head -c 32 /dev/urandom | base64 >"$work/cache-key"

run() { # $1: label, $2: extra config (the [token_cache] table or nothing)
  local proxies=() admins=() rpids=()
  for i in 1 2 3; do
    local p a
    p=$(free_port); a=$(free_port)
    cat >"$work/proxy$i.toml" <<EOF
[server]
listen = "127.0.0.1:$p"
[admin]
listen = "127.0.0.1:$a"
[log]
level = "warn"
[profiles.portal]
kind = "client_app"
token_url = "$token_url"
client_id = "$client_id"
client_secret = "$client_secret"
scopes = ["knowledge.portalmgr.manage"]
[[routes]]
path_prefix = "/"
upstream = "http://127.0.0.1:$mock_port"
profile = "portal"
$2
EOF
    "$BIN" run --config "$work/proxy$i.toml" 2>>"$work/proxies.log" &
    rpids+=($!)
    proxies+=("$p"); admins+=("$a")
  done
  for a in "${admins[@]}"; do wait_for "http://127.0.0.1:$a/readyz"; done
  local end=$((SECONDS + SECONDS_PER_RUN)) sent=0 failed=0
  while [ $SECONDS -lt $end ]; do
    for p in "${proxies[@]}"; do
      code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/knowledge/portalmgr/v4/portals")
      sent=$((sent + 1)); [ "$code" = 200 ] || failed=$((failed + 1))
    done
  done
  local fetched=0 hits=0
  for a in "${admins[@]}"; do
    m=$(curl -s "http://127.0.0.1:$a/metrics")
    f=$(echo "$m" | awk '/^egain_proxy_token_fetches_total\{.*outcome="success"/ {s += $NF} END {print s + 0}')
    h=$(echo "$m" | awk '/^egain_proxy_token_cache_hits_total/ {s += $NF} END {print s + 0}')
    fetched=$((fetched + f)); hits=$((hits + h))
  done
  kill "${rpids[@]}"; wait "${rpids[@]}" 2>/dev/null || true
  printf '%-28s %5d requests (%d not 200), %3d token requests, %3d tokens taken from Redis\n' \
    "$1" "$sent" "$failed" "$fetched" "$hits"
}

echo "3 replicas, 6 s tokens, ${SECONDS_PER_RUN} s of traffic each:"
run "each replica on its own:" ""
run "sharing through Redis:" "[token_cache]
redis = \"redis://127.0.0.1:$redis_port/0\"
encryption_key_file = \"$work/cache-key\""
