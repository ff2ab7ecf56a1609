#!/usr/bin/env bash
# bench/serve.sh — serving benchmark for cacheproxy, reported as ratios
# against nginx (and sha256sum / zstd) measured in the same run.
#
# No timed assertions: it prints a table (metric, cacheproxy, reference,
# ratio = cacheproxy / reference; every metric is higher-is-better) and
# exits 0 unless the setup itself fails. Run as root on a machine with Nix
# (nix-store, nix) and Go; installs nginx, wrk, zstd, curl and openssl from Debian
# when missing. Loopback only. See bench/README.md.
#
# Environment: DURATION (seconds per wrk run, default 10), CONNS (narinfo
# connections, default 32), NAR_CONNS (big-NAR connections, default 4),
# BIG_MIB (size of the big NAR, default 256), SMALL (number of small paths,
# default 200), COLD_RUNS (cold fetches per variant, best kept, default 3),
# REV=<git rev> builds that commit instead of the work tree, KEEP=1 keeps
# the temp dir.
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
NAR_CONNS=${NAR_CONNS:-4}
BIG_MIB=${BIG_MIB:-256}
SMALL=${SMALL:-200}
COLD_RUNS=${COLD_RUNS:-3}
NIX_OPTS=(--option substituters '')
X_NIX=(--extra-experimental-features nix-command)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- tools
require nginx:nginx wrk:wrk zstd:zstd curl:curl openssl:openssl nix-store nix go sha256sum awk

# ---------------------------------------------------------------- cleanup
T=$(mktemp -d /tmp/cacheproxy-bench.XXXXXX)
chmod 755 "$T"
PIDS=()
STORE_PATHS=()
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


# ---------------------------------------------------------------- build
# REV=<git rev> builds that commit (git archive, the work tree untouched);
# by default the work tree as it is.
build_cacheproxy

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
nix "${X_NIX[@]}" copy "${NIX_OPTS[@]}" --to "file://$UP?compression=none&secret-key=$T/up.sec" "${ALL[@]}" 2>>nix.log ||
	die "nix copy: $(tail -3 nix.log)"
nix "${X_NIX[@]}" copy "${NIX_OPTS[@]}" --to "file://$UPZ?compression=zstd&secret-key=$T/up.sec" "$BIG" 2>>nix.log ||
	die "nix copy: $(tail -3 nix.log)"

hash_of() { local b=${1#/nix/store/}; echo "${b%%-*}"; }
BIG_HASH=$(hash_of "$BIG")
: >hashes
for p in "${ALL[@]}"; do hash_of "$p" >>hashes; done
BIG_URL_UP=$(field URL "$UP/$BIG_HASH.narinfo")
BIG_URL_UPZ=$(field URL "$UPZ/$BIG_HASH.narinfo")
BIG_SIZE=$(stat -c %s "$UP/$BIG_URL_UP")
BIG_ZSIZE=$(stat -c %s "$UPZ/$BIG_URL_UPZ")
grep -q '^Sig: up-1:' "$UP/$BIG_HASH.narinfo" || die "upstream narinfo is not signed"

# ---------------------------------------------------------------- cacheproxy
# start_proxy NAME UPSTREAM_DIR: config + server with a fresh state dir;
# sets PROXY_URL, PROXY_CFG, PROXY_PID.
start_proxy() { start_cacheproxy "$1" "file://$2" "" "$CP"; }
allow() { "$CP" allow add -c "$PROXY_CFG" --reason bench "$@" >/dev/null; }

log "starting cacheproxy, allowlisting ${#ALL[@]} paths, warming its cache"
start_proxy warm "$UP"
WARM_URL=$PROXY_URL
allow "${ALL[@]}"

# Warm: every narinfo once, then every NAR its URL: line names (curl
# --parallel from generated config files to avoid 400 forks).
mkdir -p warm
awk -v u="$WARM_URL" '{ printf "url = \"%s/%s.narinfo\"\noutput = \"warm/%s.narinfo\"\n", u, $1, $1 }' hashes >warm/ni.curl
curl -fsS --parallel --parallel-max 16 -K warm/ni.curl 2>>warm/curl.log || die "warming narinfos: $(tail -3 warm/curl.log)"
for h in $(cat hashes); do
	[[ -s warm/$h.narinfo ]] || die "no narinfo for $h from cacheproxy"
	echo "url = \"$WARM_URL/$(field URL "warm/$h.narinfo")\""
	echo "output = \"/dev/null\""
done >warm/nar.curl
curl -fsS --parallel --parallel-max 8 -K warm/nar.curl 2>>warm/curl.log || die "warming NARs: $(tail -3 warm/curl.log)"
BIG_URL_PROXY=$(field URL "warm/$BIG_HASH.narinfo")
cached=$(curl -fs "$WARM_URL/metrics" | awk '/^cacheproxy_cache_size_bytes/ { printf "%.0f", $2 }')
log "cacheproxy blob cache holds $cached bytes"

# ---------------------------------------------------------------- nginx reference
NPORT=$(free_port)
start_nginx "$NPORT:$UP"
NGINX_URL=http://127.0.0.1:$NPORT

# ---------------------------------------------------------------- measuring
# Server CPU time (user+system, in clock ticks) of a process and its
# children (nginx: master and workers), read from /proc around each run.
TCK=$(getconf CLK_TCK)
cpu_ticks() {
	local p t=0
	for p in "$1" $(ps -o pid= --ppid "$1"); do
		[[ -r /proc/$p/stat ]] || continue
		t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
	done
	echo "$t"
}


# narinfo_run LABEL URL SERVER_PID -> "requests seconds cpu_seconds"
narinfo_run() {
	local label=$1 url=$2 pid=$3 out r c0 c1
	c0=$(cpu_ticks "$pid")
	out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --timeout 10s -s "$WRK_NARINFO" "$url" 2>&1) || die "wrk $label: $out"
	c1=$(cpu_ticks "$pid")
	r=$(grep '^RESULT' <<<"$out") || die "wrk $label: no result: $out"
	read -r _ req bytes dur ec er ew es et <<<"$r"
	((ec + er + ew + es + et == 0)) ||
		log "WARNING $label: errors connect=$ec read=$er write=$ew status=$es timeout=$et"
	log "$label: $req requests, $bytes bytes in $((dur / 1000)) ms, server CPU $(((c1 - c0) * 1000 / TCK)) ms"
	awk -v r="$req" -v d="$dur" -v c=$((c1 - c0)) -v t="$TCK" 'BEGIN { print r, d / 1e6, c / t }'
}

# nar_run LABEL URL SERVER_PID -> "bytes seconds cpu_seconds": NAR_CONNS
# curl loops (libcurl is what Nix uses; wrk reads 8 KiB at a time and
# mostly measures itself) fetching the whole NAR again and again for
# DURATION seconds; every transfer runs to its end and is checked for size.
nar_run() {
	local label=$1 url=$2 pid=$3 c0 c1 s e i pids=() bytes bad
	rm -f nar-run.*
	c0=$(cpu_ticks "$pid")
	s=$(date +%s.%N)
	for i in $(seq "$NAR_CONNS"); do
		(
			end=$((SECONDS + DURATION))
			while ((SECONDS < end)); do
				curl -s -o /dev/null -w '%{http_code} %{size_download}\n' "$url" || echo "curl-error 0"
			done >"nar-run.$i"
		) &
		pids+=($!)
	done
	wait "${pids[@]}"
	e=$(date +%s.%N)
	c1=$(cpu_ticks "$pid")
	bad=$(cat nar-run.* | awk -v n="$BIG_SIZE" '$1 != 200 || $2 != n' | wc -l)
	((bad == 0)) || log "WARNING $label: $bad transfers failed or were short"
	bytes=$(cat nar-run.* | awk '{ b += $2 } END { printf "%.0f", b }')
	log "$label: $(cat nar-run.* | wc -l) transfers, $bytes bytes, server CPU $(((c1 - c0) * 1000 / TCK)) ms"
	awk -v b="$bytes" -v s="$s" -v e="$e" -v c=$((c1 - c0)) -v t="$TCK" 'BEGIN { print b, e - s, c / t }'
}

# Sanity: nginx serves every narinfo (cacheproxy did while warming), both
# serve the big NAR with 200 and its full size.
while read -r h; do
	curl -fs -o /dev/null "$NGINX_URL/$h.narinfo" || die "nginx: $h.narinfo"
done <hashes
[[ $(curl -fs -o /dev/null -w '%{size_download}' "$WARM_URL/$BIG_URL_PROXY") == "$BIG_SIZE" ]] || die "cacheproxy big NAR size"
[[ $(curl -fs -o /dev/null -w '%{size_download}' "$NGINX_URL/$BIG_URL_UP") == "$BIG_SIZE" ]] || die "nginx big NAR size"

export HASHES_FILE=$T/hashes
log "narinfo: wrk, ${DURATION}s x $CONNS connections each"
read -r p_req p_dur p_cpu < <(narinfo_run "cacheproxy narinfo" "$WARM_URL" "$PROXY_PID")
read -r n_req n_dur n_cpu < <(narinfo_run "nginx narinfo" "$NGINX_URL" "$NGINX_PID")

log "cached ${BIG_MIB} MiB NAR: curl, ${DURATION}s x $NAR_CONNS connections each"
read -r p_bytes p_bdur p_bcpu < <(nar_run "cacheproxy NAR" "$WARM_URL/$BIG_URL_PROXY" "$PROXY_PID")
read -r n_bytes n_bdur n_bcpu < <(nar_run "nginx NAR" "$NGINX_URL/$BIG_URL_UP" "$NGINX_PID")

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
timed() { local s e; s=$(now); "$@" >/dev/null; e=$(now); awk -v s="$s" -v e="$e" 'BEGIN { printf "%.6f\n", e - s }'; }
zref() { zstd -dc "$UPZ/$BIG_URL_UPZ" | sha256sum; }
zref_ssl() { zstd -dc "$UPZ/$BIG_URL_UPZ" | openssl dgst -sha256; }

log "cold path: $COLD_RUNS fetch(es) per variant, fresh state dir each"
for i in $(seq "$COLD_RUNS"); do
	cold cold-none "$UP" "$BIG_SIZE"
	timed sha256sum "$UP/$BIG_URL_UP" >>ref-none.times
	timed openssl dgst -sha256 "$UP/$BIG_URL_UP" >>ref-none-ssl.times
	cold cold-zst "$UPZ" "$BIG_ZSIZE"
	timed zref >>ref-zst.times
	timed zref_ssl >>ref-zst-ssl.times
done
pc_none=$(best cold-none.times)
rc_none=$(best ref-none.times)
pc_zst=$(best cold-zst.times)
rc_zst=$(best ref-zst.times)
rs_none=$(best ref-none-ssl.times)
rs_zst=$(best ref-zst-ssl.times)

# ---------------------------------------------------------------- table
awk -v conns="$CONNS" -v nconns="$NAR_CONNS" -v mib="$BIG_MIB" -v small="$SMALL" \
	-v p_req="$p_req" -v p_dur="$p_dur" -v p_cpu="$p_cpu" -v n_req="$n_req" -v n_dur="$n_dur" -v n_cpu="$n_cpu" \
	-v p_bytes="$p_bytes" -v p_bdur="$p_bdur" -v p_bcpu="$p_bcpu" \
	-v n_bytes="$n_bytes" -v n_bdur="$n_bdur" -v n_bcpu="$n_bcpu" \
	-v nar="$BIG_SIZE" -v pcn="$pc_none" -v rcn="$rc_none" -v pcz="$pc_zst" -v rcz="$rc_zst" -v rsn="$rs_none" -v rsz="$rs_zst" \
	-v built="$BUILT" -v when="$(date "+%Y-%m-%d %H:%M %Z")" -v nginxv="$(nginx -v 2>&1 | sed 's/.*\///')" \
	'function row(m, a, b) { printf("| %-48s | %10.0f | %10.0f | %5.2f |\n", m, a, b, (b > 0 ? a / b : 0)) }
	function per(x, c) { return c > 0 ? x / c : 0 }
BEGIN {
	printf "\ncacheproxy built from %s; %s\n", built, when
	printf "\n| %-48s | %10s | %10s | %5s |\n", "metric (higher is better)", "cacheproxy", "reference", "ratio"
	printf "|%s|%s|%s|%s|\n", "--------------------------------------------------", "------------", "------------", "-------"
	row(sprintf("narinfo hit, req/s (wrk, %d paths, %d conns)", small + 1, conns), p_req / p_dur, n_req / n_dur)
	row("narinfo hit, req per server CPU-second", per(p_req, p_cpu), per(n_req, n_cpu))
	row(sprintf("cached %d MiB NAR, MB/s (curl, %d conns)", mib, nconns), p_bytes / p_bdur / 1e6, n_bytes / n_bdur / 1e6)
	row("cached NAR, MB per server CPU-second", per(p_bytes / 1e6, p_bcpu), per(n_bytes / 1e6, n_bcpu))
	row("cold NAR none, MB/s (ref: sha256sum)", nar / pcn / 1e6, nar / rcn / 1e6)
	row("cold NAR zstd, MB/s (ref: zstd -dc | sha256sum)", nar / pcz / 1e6, nar / rcz / 1e6)
	row("cold NAR none, MB/s (ref: openssl dgst -sha256)", nar / pcn / 1e6, nar / rsn / 1e6)
	row("cold NAR zstd, MB/s (ref: zstd -dc | openssl)", nar / pcz / 1e6, nar / rsz / 1e6)
	printf "\nratio = cacheproxy / reference. Reference of rows 1-4: nginx %s (sendfile, 2 workers)\n", nginxv
	printf "serving the same upstream files. Server CPU s (cacheproxy / nginx incl. workers):\n"
	printf "narinfo %.2f / %.2f, NAR %.2f / %.2f. Cold rows: best of runs, seconds for %d\n", p_cpu, n_cpu, p_bcpu, n_bcpu, nar
	printf "NAR bytes (cacheproxy / sha256sum / openssl): none %.2f / %.2f / %.2f, zstd %.2f / %.2f / %.2f.\n", pcn, rcn, rsn, pcz, rcz, rsz
}'
