#!/usr/bin/env bash
# Compare egain-proxy with what users run today: nginx (and HAProxy, when installed) as a
# reverse proxy that sets a static bearer header, in front of the same upstream.
#
# Each proxy is pinned to CPU 0; the upstream (an nginx `return 200`), the token server and
# wrk share CPU 1, so every proxy sees the same conditions. Runs alternate between proxies
# (ROUNDS rounds) so drift in the machine hits all of them alike; the script prints each
# run, then the median requests/s and p99 of each and the median throughput ratio.
#
#   benches/compare.sh                      # defaults below
#   CONNS=64 DURATION=10 ROUNDS=5 benches/compare.sh
#   UPSTREAM=https benches/compare.sh       # the upstream over TLS (private CA), HTTP/1.1
#   UPSTREAM=https-h2 benches/compare.sh    # the same, offering h2 by ALPN as well
#   CLIENT=h2 benches/compare.sh            # h2 clients (h2c by prior knowledge): h2load,
#                                           # H2_CONNS connections x H2_STREAMS streams
#   EGAIN_BIN=/path/to/egain-proxy benches/compare.sh   # measure that build instead
#
# With a TLS upstream every proxy verifies its certificate against the private CA and keeps
# its upstream connections (and TLS sessions) alive, as a careful operator would configure
# them; nginx speaks HTTP/1.1 upstream (it cannot speak h2 to upstreams), HAProxy and
# egain-proxy take h2 when the upstream offers it.
#
# Needs: nginx and wrk (Debian/Ubuntu: apt-get install nginx-light wrk; HAProxy optional:
# apt-get install haproxy), taskset (util-linux), and a release build (done here).
set -euo pipefail

CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
WRK_THREADS=${WRK_THREADS:-1}
UPSTREAM=${UPSTREAM:-http}
case "$UPSTREAM" in http|https|https-h2) ;; *) echo "UPSTREAM is http, https or https-h2" >&2; exit 2 ;; esac
CLIENT=${CLIENT:-h1}
case "$CLIENT" in h1|h2) ;; *) echo "CLIENT is h1 or h2" >&2; exit 2 ;; esac
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-16}
PROXY_CPU=${PROXY_CPU:-0}
OTHER_CPU=${OTHER_CPU:-1}

missing=()
tools=(nginx wrk taskset curl)
[ "$UPSTREAM" = http ] || tools+=(openssl)
[ "$CLIENT" = h1 ] || tools+=(h2load)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "compare.sh needs: ${missing[*]}" >&2
  echo "  Debian/Ubuntu: sudo apt-get install nginx-light wrk util-linux curl   (optional: haproxy; CLIENT=h2: nghttp2-client)" >&2
  echo "  macOS (no taskset; pinning is skipped there): brew install nginx wrk" >&2
  exit 2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; } || true)

cd "$(dirname "$0")/.."
# EGAIN_BIN: another egain-proxy binary to measure (an A/B of two builds in one session).
if [ -n "${EGAIN_BIN:-}" ]; then
  BIN=$EGAIN_BIN
else
  cargo build --release --quiet
  BIN=$PWD/target/release/egain-proxy
fi
# Everything below is on loopback: no egress proxy from the environment (README, "Egress proxy").
unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy NO_PROXY no_proxy

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); TOK=$(free_port); NGX=$(free_port); EGP=$(free_port); HAP=$(free_port)

# For a TLS upstream: a private CA and a certificate for localhost / 127.0.0.1.
mkdir -p "$work/up" "$work/ngx" "$work/tls"
up_listen="127.0.0.1:$UP"
up_scheme=http
ngx_tls=""
hap_tls=""
egp_tls=""
if [ "$UPSTREAM" != http ]; then
  tls=$work/tls
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=compare.sh test CA" -keyout "$tls/ca-key.pem" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
    -keyout "$tls/up-key.pem" -out "$tls/up.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$tls/ext.cnf"
  openssl x509 -req -in "$tls/up.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca-key.pem" -CAcreateserial \
    -days 2 -extfile "$tls/ext.cnf" -out "$tls/up.pem" 2>/dev/null
  up_scheme=https
  if [ "$UPSTREAM" = https-h2 ]; then
    up_listen="127.0.0.1:$UP ssl http2"
    hap_alpn="alpn h2,http/1.1"
  else
    up_listen="127.0.0.1:$UP ssl"
    hap_alpn="alpn http/1.1"
  fi
  up_tls="ssl_certificate $tls/up.pem; ssl_certificate_key $tls/up-key.pem; ssl_session_cache shared:UP:10m;"
  ngx_tls="proxy_ssl_verify on; proxy_ssl_trusted_certificate $tls/ca.pem; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on;"
  hap_tls="ssl verify required ca-file $tls/ca.pem verifyhost localhost sni str(localhost) $hap_alpn"
  egp_tls="ca_file = \"$tls/ca.pem\""
fi

# The upstream: nginx answering a small JSON body, one worker on the other CPU.
cat > "$work/up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
error_log $work/up/error.log warn;
pid $work/up/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/up; proxy_temp_path $work/up; fastcgi_temp_path $work/up;
  uwsgi_temp_path $work/up; scgi_temp_path $work/up;
  keepalive_requests 1000000;
  server {
    listen $up_listen;
    ${up_tls:-}
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
EOF
taskset -c "$OTHER_CPU" "$NGINX" -c "$work/up/nginx.conf" -p "$work/up" & pids+=($!)

# The token server for egain-proxy: its own embedded mock eGain.
taskset -c "$OTHER_CPU" "$BIN" mock-egain --listen "127.0.0.1:$TOK" > "$work/mock.log" 2>&1 & pids+=($!)

# h2 clients: nginx and HAProxy take h2c by prior knowledge on their listener (egain-proxy
# always does).
ngx_h2=""; hap_h2=""; curl_h2=""
if [ "$CLIENT" = h2 ]; then ngx_h2=" http2"; hap_h2=" proto h2"; curl_h2="--http2-prior-knowledge"; fi

# nginx as the reverse proxy users run today: static Authorization header, pooled upstream.
cat > "$work/ngx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
error_log $work/ngx/error.log warn;
pid $work/ngx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/ngx; proxy_temp_path $work/ngx; fastcgi_temp_path $work/ngx;
  uwsgi_temp_path $work/ngx; scgi_temp_path $work/ngx;
  keepalive_requests 1000000;
  upstream api { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX$ngx_h2;
    location / {
      proxy_pass $up_scheme://api;
      $ngx_tls
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token-from-a-cron-job";
    }
  }
}
EOF
taskset -c "$PROXY_CPU" "$NGINX" -c "$work/ngx/nginx.conf" -p "$work/ngx" & pids+=($!)

# egain-proxy: same upstream, a real token from the mock, access log off like nginx's.
cat > "$work/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$EGP"
[log]
level = "warn"
[profiles.portal]
kind = "client_app"
token_url = "http://127.0.0.1:$TOK/system/auth/TDEMO0000001-U/oauth2/token"
client_id = "demo-client-app"
client_secret = "demo-client-app-secret"
scopes = ["knowledge.portalmgr.manage"]
[[routes]]
path_prefix = "/"
upstream = "$up_scheme://127.0.0.1:$UP"
profile = "portal"
$egp_tls
EOF
taskset -c "$PROXY_CPU" "$BIN" run --config "$work/proxy.toml" 2> "$work/egain.log" & pids+=($!)

names=(nginx egain-proxy)
ports=($NGX $EGP)
procs=("${pids[2]}" "${pids[3]}")
if [ -n "$HAPROXY" ]; then
  cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$HAP$hap_h2
  http-request set-header Authorization "Bearer static-token-from-a-cron-job"
  default_backend b
backend b
  http-reuse always
  server up 127.0.0.1:$UP $hap_tls
EOF
  taskset -c "$PROXY_CPU" "$HAPROXY" -f "$work/haproxy.cfg" -db & pids+=($!)
  names+=(haproxy); ports+=($HAP); procs+=("${pids[4]}")
fi

# Wait until everything answers (egain-proxy: until it has its token).
for i in "${!ports[@]}"; do
  for _ in $(seq 1 100); do
    [ "$(curl -s $curl_h2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:${ports[$i]}/")" = 200 ] && break
    sleep 0.1
  done
done

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs)"
if [ "$CLIENT" = h1 ]; then load="wrk, $CONNS connections"; else load="h2load, $H2_CONNS h2c connections x $H2_STREAMS streams"; fi
echo "proxies on CPU $PROXY_CPU; upstream ($UPSTREAM), token server and the load generator on CPU $OTHER_CPU; $load, ${DURATION}s runs, $ROUNDS rounds"
# CPU time a proxy spent per request (user + system, its worker processes included): the
# efficiency figure, steadier than req/s when the load generator shares a loaded core.
cpu_ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
TICK=$(getconf CLK_TCK)
if [ "$CLIENT" = h1 ]; then lat=(p50 p99); else lat=(mean max); fi
printf '%-12s %6s %12s %10s %10s %12s\n' proxy round req/s "${lat[0]}" "${lat[1]}" "cpu us/req"
declare -A rps p99s cpus
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v } else if (v ~ /s$/) { sub(/s$/,"",v); print v*1000 } else print v }'; }
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!names[@]}"; do
    before=$(cpu_ticks "${procs[$i]}")
    if [ "$CLIENT" = h1 ]; then
      out=$(taskset -c "$OTHER_CPU" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:${ports[$i]}/")
      total=$(awk '/requests in/ {print $1}' <<<"$out")
      r=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
      p50=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
      p99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
      non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    else
      # h2load reports no percentiles: the p50 column holds the mean, p99 the max.
      out=$(taskset -c "$OTHER_CPU" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -t1 -D"$DURATION" "http://127.0.0.1:${ports[$i]}/")
      total=$(awk '/^requests:/ {print $8}' <<<"$out")
      r=$(awk '/^finished in/ {print $4}' <<<"$out")
      p50=$(to_ms "$(awk '/^time for request:/ {print $6}' <<<"$out")")
      p99=$(to_ms "$(awk '/^time for request:/ {print $5}' <<<"$out")")
      non2xx=$(awk '/^status codes:/ {n = $5 + $7 + $9} /^requests:/ {f = $10 + $12} END {if (n + f > 0) print n + f}' <<<"$out")
    fi
    after=$(cpu_ticks "${procs[$i]}")
    cpu=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$total" 'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "n/a" }')
    printf '%-12s %6s %12s %8sms %8sms %12s %s\n' "${names[$i]}" "$round" "$r" "$p50" "$p99" "$cpu" "${non2xx:+non-2xx: $non2xx}"
    rps[${names[$i]}]+="$r "
    p99s[${names[$i]}]+="$p99 "
    cpus[${names[$i]}]+="$cpu "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
echo
printf '%-12s %14s %12s %18s\n' proxy "median req/s" "median ${lat[1]}" "median cpu us/req"
for n in "${names[@]}"; do
  printf '%-12s %14s %10sms %18s\n' "$n" "$(median <<<"${rps[$n]}")" "$(median <<<"${p99s[$n]}")" "$(median <<<"${cpus[$n]}")"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a/b }'; }
egp=$(median <<<"${rps[egain-proxy]}")
echo
echo "throughput ratio egain-proxy/nginx (median): $(ratio "$egp" "$(median <<<"${rps[nginx]}")")"
echo "cpu per request ratio egain-proxy/nginx (median, lower is better): $(ratio "$(median <<<"${cpus[egain-proxy]}")" "$(median <<<"${cpus[nginx]}")")"
if [ -n "$HAPROXY" ]; then
  echo "throughput ratio egain-proxy/haproxy (median): $(ratio "$egp" "$(median <<<"${rps[haproxy]}")")"
fi
echo "egain-proxy peak RSS: $(awk '/VmHWM/ {print $2, $3}' "/proc/${pids[3]}/status" 2>/dev/null || echo n/a)"
