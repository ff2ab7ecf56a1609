#!/usr/bin/env bash
# bench/serve.sh — serving benchmark for cacheproxy, reported as ratios
# against nginx (and sha256sum / zstd) measured in the same run.
#
# No timed assertions: it prints a table (metric, cacheproxy, reference,
# ratio = cacheproxy / reference; every metric is higher-is-better) and
# exits 0 unless the setup itself fails. Run as root on a machine with Nix
# (nix-store, nix) and Go; installs nginx, wrk, zstd and curl from Debian
# when missing. Loopback only. See bench/README.md.
#
# Environment: DURATION (seconds per wrk run, default 10), CONNS (narinfo
# connections, default 32), NAR_CONNS (big-NAR connections, default 4),
# BIG_MIB (size of the big NAR, default 256), SMALL (number of small paths,
# default 200), COLD_RUNS (cold fetches per variant, best kept, default 2),
# KEEP=1 keeps the temp dir.
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
NAR_CONNS=${NAR_CONNS:-4}
BIG_MIB=${BIG_MIB:-256}
SMALL=${SMALL:-200}
COLD_RUNS=${COLD_RUNS:-2}
NIX_OPTS=(--option substituters '')
X_NIX=(--extra-experimental-features nix-command)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------- tools
need_pkgs=()
command -v nginx >/dev/null || need_pkgs+=(nginx)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v zstd >/dev/null || need_pkgs+=(zstd)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
	[[ $(id -u) == 0 ]] || die "missing ${need_pkgs[*]}; run as root to install them"
	log "installing ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 ||
		{ apt-get update >/dev/null && apt-get install -y "${need_pkgs[@]}" >/dev/null; }
fi
for t in nix-store nix go nginx wrk zstd curl sha256sum awk; do
	command -v "$t" >/dev/null || die "$t is not on PATH"
done

# ---------------------------------------------------------------- cleanup
T=$(mktemp -d /tmp/cacheproxy-bench.XXXXXX)
chmod 755 "$T"
PIDS=()
STORE_PATHS=()
stop_pid() {
	local p=$1
	kill "$p" 2>/dev/null || return 0
	for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
	kill -9 "$p" 2>/dev/null || true
}
cleanup() {
	local p
	for p in "${PIDS[@]}"; do stop_pid "$p"; done
	if ((${#STORE_PATHS[@]})); then
		nix-store --delete "${STORE_PATHS[@]}" >/dev/null 2>&1 || true
	fi
	if [[ ${KEEP:-0} == 1 ]]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
}
wait_port() { # PORT
	for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
	die "nothing listens on 127.0.0.1:$1"
}
wait_http() { # URL
	for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
	die "$1 never answered"
}

# ---------------------------------------------------------------- build
log "building cacheproxy"
(cd "$REPO" && go build -o "$T/cacheproxy" ./cmd/cacheproxy)
CP=$T/cacheproxy

# ---------------------------------------------------------------- upstream caches
cd "$T"
nix-store --generate-binary-cache-key up-1 up.sec up.pub
UP_PUB=$(cat up.pub)

log "creating a ${BIG_MIB} MiB incompressible store path and $SMALL small ones"
mkdir -p big small
head -c "${BIG_MIB}M" /dev/urandom >big/blob
BIG=$(nix-store "${NIX_OPTS[@]}" --add big)
STORE_PATHS+=("$BIG")
rm -rf big
tag=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
for i in $(seq "$SMALL"); do echo "cacheproxy bench $tag $i" >"small/s$i"; done
mapfile -t SMALLS < <(nix-store "${NIX_OPTS[@]}" --add small/s*)
STORE_PATHS+=("${SMALLS[@]}")
((${#SMALLS[@]} == SMALL)) || die "nix-store --add gave ${#SMALLS[@]} paths, want $SMALL"
ALL=("$BIG" "${SMALLS[@]}")

log "nix copy to file:// (compression=none, and zstd for the big path)"
UP=$T/up
UPZ=$T/upz
nix "${X_NIX[@]}" copy "${NIX_OPTS[@]}" --to "file://$UP?compression=none&secret-key=$T/up.sec" "${ALL[@]}"
nix "${X_NIX[@]}" copy "${NIX_OPTS[@]}" --to "file://$UPZ?compression=zstd&secret-key=$T/up.sec" "$BIG"

hash_of() { local b=${1#/nix/store/}; echo "${b%%-*}"; }
BIG_HASH=$(hash_of "$BIG")
: >hashes
for p in "${ALL[@]}"; do hash_of "$p" >>hashes; done
field() { awk -v k="$1:" '$1 == k { print $2 }' "$2"; }
BIG_URL_UP=$(field URL "$UP/$BIG_HASH.narinfo")
BIG_URL_UPZ=$(field URL "$UPZ/$BIG_HASH.narinfo")
BIG_SIZE=$(stat -c %s "$UP/$BIG_URL_UP")
BIG_ZSIZE=$(stat -c %s "$UPZ/$BIG_URL_UPZ")
grep -q '^Sig: up-1:' "$UP/$BIG_HASH.narinfo" || die "upstream narinfo is not signed"

# ---------------------------------------------------------------- cacheproxy
# start_proxy NAME UPSTREAM_DIR: config + server with a fresh state dir;
# sets PROXY_URL, PROXY_CFG, PROXY_PID.
start_proxy() {
	local name=$1 up=$2 port aport
	port=$(free_port)
	aport=$(free_port)
	while [[ $aport == "$port" ]]; do aport=$(free_port); done
	PROXY_CFG=$T/$name.toml
	rm -rf "${T:?}/$name-state"
	cat >"$PROXY_CFG" <<-EOF
		listen = "127.0.0.1:$port"
		state_dir = "$T/$name-state"
		[[upstreams]]
		url = "file://$up"
		public_keys = ["$UP_PUB"]
		[admin]
		listen = "127.0.0.1:$aport"
	EOF
	"$CP" serve -c "$PROXY_CFG" >>"$T/$name.log" 2>&1 &
	PROXY_PID=$!
	PIDS+=("$PROXY_PID")
	PROXY_URL=http://127.0.0.1:$port
	wait_http "$PROXY_URL/healthz"
	wait_port "$aport"
}
allow() { "$CP" allow add -c "$PROXY_CFG" --reason bench "$@" >/dev/null; }

log "starting cacheproxy, allowlisting ${#ALL[@]} paths, warming its cache"
start_proxy warm "$UP"
WARM_URL=$PROXY_URL
allow "${ALL[@]}"

# Warm: every narinfo once, then every NAR its URL: line names (curl
# --parallel from generated config files to avoid 400 forks).
mkdir -p warm
awk -v u="$WARM_URL" '{ printf "url = \"%s/%s.narinfo\"\noutput = \"warm/%s.narinfo\"\n", u, $1, $1 }' hashes >warm/ni.curl
curl -fsS --parallel --parallel-max 16 -K warm/ni.curl
for h in $(cat hashes); do
	[[ -s warm/$h.narinfo ]] || die "no narinfo for $h from cacheproxy"
	echo "url = \"$WARM_URL/$(field URL "warm/$h.narinfo")\""
	echo "output = \"/dev/null\""
done >warm/nar.curl
curl -fsS --parallel --parallel-max 8 -K warm/nar.curl
BIG_URL_PROXY=$(field URL "warm/$BIG_HASH.narinfo")
hits=$(curl -fs "$WARM_URL/metrics" | awk '/^cacheproxy_cache_size_bytes/ { print $2 }')
log "cacheproxy blob cache holds $hits bytes"

# ---------------------------------------------------------------- nginx reference
NPORT=$(free_port)
mkdir -p nginx/tmp
cat >nginx/nginx.conf <<EOF
daemon off;
user root;
worker_processes 2;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log warn;
events { worker_connections 1024; }
http {
	sendfile on;
	tcp_nopush on;
	access_log off;
	keepalive_requests 1000000;
	client_body_temp_path $T/nginx/tmp/body;
	proxy_temp_path $T/nginx/tmp/proxy;
	fastcgi_temp_path $T/nginx/tmp/fastcgi;
	uwsgi_temp_path $T/nginx/tmp/uwsgi;
	scgi_temp_path $T/nginx/tmp/scgi;
	types { text/x-nix-narinfo narinfo; }
	default_type application/octet-stream;
	server {
		listen 127.0.0.1:$NPORT;
		root $UP;
	}
}
EOF
nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" -e "$T/nginx/error.log" &
PIDS+=($!)
NGINX_URL=http://127.0.0.1:$NPORT
wait_http "$NGINX_URL/nix-cache-info"

# ---------------------------------------------------------------- wrk
cat >narinfo.lua <<'EOF'
local paths = {}
for h in io.lines(os.getenv("HASHES_FILE")) do paths[#paths + 1] = "/" .. h .. ".narinfo" end
local i = 0
request = function()
	i = i + 1
	return wrk.format("GET", paths[(i % #paths) + 1])
end
EOF
cat >report.lua <<'EOF'
done = function(s, latency, requests)
	local e = s.errors
	io.write(string.format("RESULT %d %d %d %d %d %d %d %d\n", s.requests, s.bytes, s.duration,
		e.connect, e.read, e.write, e.status, e.timeout))
end
EOF
cat narinfo.lua report.lua >wrk-narinfo.lua
{ echo 'wrk.path = os.getenv("NAR_PATH")'; cat report.lua; } >wrk-nar.lua

# run_wrk LABEL LUA CONNS URL -> "requests bytes duration_us"; logs errors.
run_wrk() {
	local label=$1 lua=$2 conns=$3 url=$4 out r
	out=$(wrk -t2 -c"$conns" -d"${DURATION}s" --timeout 60s -s "$lua" "$url" 2>&1) || die "wrk $label: $out"
	r=$(grep '^RESULT' <<<"$out") || die "wrk $label: no result: $out"
	read -r _ req bytes dur ec er ew es et <<<"$r"
	((ec + er + ew + es + et == 0)) ||
		log "WARNING $label: errors connect=$ec read=$er write=$ew status=$es timeout=$et"
	log "$label: $req requests, $bytes bytes in $((dur / 1000)) ms"
	echo "$req $bytes $dur"
}

# Sanity: both serve every narinfo and the big NAR with 200.
for h in $BIG_HASH $(sed -n 2p hashes); do
	curl -fs -o /dev/null "$WARM_URL/$h.narinfo" || die "cacheproxy: $h.narinfo"
	curl -fs -o /dev/null "$NGINX_URL/$h.narinfo" || die "nginx: $h.narinfo"
done
[[ $(curl -fs -o /dev/null -w '%{size_download}' "$WARM_URL/$BIG_URL_PROXY") == "$BIG_SIZE" ]] || die "cacheproxy big NAR size"
[[ $(curl -fs -o /dev/null -w '%{size_download}' "$NGINX_URL/$BIG_URL_UP") == "$BIG_SIZE" ]] || die "nginx big NAR size"

export HASHES_FILE=$T/hashes
log "narinfo: ${DURATION}s x $CONNS connections each"
read -r p_req _ p_dur < <(run_wrk "cacheproxy narinfo" wrk-narinfo.lua "$CONNS" "$WARM_URL")
read -r n_req _ n_dur < <(run_wrk "nginx narinfo" wrk-narinfo.lua "$CONNS" "$NGINX_URL")

log "cached ${BIG_MIB} MiB NAR: ${DURATION}s x $NAR_CONNS connections each"
read -r _ p_bytes p_bdur < <(NAR_PATH=/$BIG_URL_PROXY run_wrk "cacheproxy NAR" wrk-nar.lua "$NAR_CONNS" "$WARM_URL")
read -r _ n_bytes n_bdur < <(NAR_PATH=/$BIG_URL_UP run_wrk "nginx NAR" wrk-nar.lua "$NAR_CONNS" "$NGINX_URL")

stop_pid "$PROXY_PID"

# ---------------------------------------------------------------- cold path
# cold NAME UPDIR SIZE: fresh state dir, allowlist, narinfo (untimed), then
# the NAR fetched + verified from upstream, timed with curl. Appends the
# seconds to $T/NAME.times. Runs in the main shell so the trap sees the pid.
cold() {
	local name=$1 up=$2 want=$3 url out code size secs
	start_proxy "$name" "$up"
	allow "$BIG"
	url=$(curl -fs "$PROXY_URL/$BIG_HASH.narinfo" | awk '$1 == "URL:" { print $2 }')
	[[ -n $url ]] || die "$name: no narinfo"
	out=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "$PROXY_URL/$url")
	read -r code size secs <<<"$out"
	[[ $code == 200 && $size == "$want" ]] || die "$name: cold NAR fetch gave HTTP $code, $size bytes (want $want)"
	stop_pid "$PROXY_PID"
	rm -rf "${T:?}/$name-state"
	log "$name: ${secs}s"
	echo "$secs" >>"$T/$name.times"
}
now() { date +%s.%N; }
timed() { local s e; s=$(now); "$@" >/dev/null; e=$(now); awk -v s="$s" -v e="$e" 'BEGIN { printf "%.6f\n", e - s }'; }
best() { sort -g "$1" | head -1; }
zref() { zstd -dc "$UPZ/$BIG_URL_UPZ" | sha256sum; }

log "cold path: $COLD_RUNS fetch(es) per variant, fresh state dir each"
for i in $(seq "$COLD_RUNS"); do
	cold cold-none "$UP" "$BIG_SIZE"
	timed sha256sum "$UP/$BIG_URL_UP" >>ref-none.times
	cold cold-zst "$UPZ" "$BIG_ZSIZE"
	timed zref >>ref-zst.times
done
pc_none=$(best cold-none.times)
rc_none=$(best ref-none.times)
pc_zst=$(best cold-zst.times)
rc_zst=$(best ref-zst.times)

# ---------------------------------------------------------------- table
awk -v dur="$DURATION" -v conns="$CONNS" -v nconns="$NAR_CONNS" \
	-v p_req="$p_req" -v p_dur="$p_dur" -v n_req="$n_req" -v n_dur="$n_dur" \
	-v p_bytes="$p_bytes" -v p_bdur="$p_bdur" -v n_bytes="$n_bytes" -v n_bdur="$n_bdur" \
	-v nar="$BIG_SIZE" -v pcn="$pc_none" -v rcn="$rc_none" -v pcz="$pc_zst" -v rcz="$rc_zst" \
	-v mib="$BIG_MIB" -v small="$SMALL" 'function row(m, a, b) { printf "| %-44s | %12.1f | %12.1f | %6.2f |\n", m, a, b, a / b }
BEGIN {
	printf "\n| %-44s | %12s | %12s | %6s |\n", "metric (higher is better)", "cacheproxy", "reference", "ratio"
	printf "|%s|%s|%s|%s|\n", "----------------------------------------------", "--------------", "--------------", "--------"
	row(sprintf("narinfo hit, req/s (%d paths, %d conns)", small + 1, conns), p_req / (p_dur / 1e6), n_req / (n_dur / 1e6))
	row(sprintf("cached %d MiB NAR, MB/s (%d conns)", mib, nconns), p_bytes / p_bdur, n_bytes / n_bdur)
	row("cold NAR none, MB/s (vs sha256sum)", nar / pcn / 1e6, nar / rcn / 1e6)
	row("cold NAR zstd, MB/s (vs zstd -dc|sha256sum)", nar / pcz / 1e6, nar / rcz / 1e6)
	printf "\nreference: nginx (sendfile, 2 workers) on the same files for the first two rows;\n"
	printf "cold rows: best of runs, seconds cacheproxy/reference: none %.2f/%.2f, zstd %.2f/%.2f\n", pcn, rcn, pcz, rcz
}'
