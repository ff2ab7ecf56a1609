#!/usr/bin/env bash
# bench/fleet.sh — fleet benchmark for cacheproxy: a real Nix closure
# (bench/corpus.nix: 131 store paths with references, ~550 MB of NAR, many
# small paths and five of 50-120 MB) published by Nix as signed xz and zstd
# caches, served by nginx on loopback as the upstream. Measures, side by side
# in one run, cacheproxy against a reference and prints the ratios:
#
#   - cold fetch of every NAR (PAR at a time) vs `xz -dc | sha256sum` /
#     `zstd -dc | sha256sum` over the same files at the same parallelism;
#   - warm fetch of every NAR vs nginx serving the same files;
#   - narinfo hits/s vs nginx (wrk, CONNS connections);
#   - `nix copy` of the whole closure (warm, fresh destination store and
#     HOME each time) vs the same from nginx;
#   - peak RSS of the server over the run (VmHWM).
#
# No timed assertions: it exits 0 whenever the setup worked. Needs root, Nix
# (nix-build, nix-store, nix), Go; installs nginx wrk zstd xz-utils curl
# from Debian when missing. Loopback only. See bench/README.md.
#
# Usage: bench/fleet.sh [--small] [--zstd-serve|--no-zstd-serve] [--serve]
#   --small          a tiny corpus (14 paths, ~20 MB) and short runs: a quick
#                    check of the harness (also FLEET_SMALL=1)
#   --zstd-serve     also run the variant with serve_compression = "zstd" over
#                    the xz upstream (default: when `cacheproxy check-config`
#                    accepts the key; --no-zstd-serve skips it)
#   --serve          afterwards run bench/serve.sh (single 256 MiB NAR, none,
#                    openssl reference) with the same binary
#   --corpus-only    build (or find) the corpus, print its figures, stop
# Environment: PAR (NAR fetches in flight, default 4), CONNS (wrk narinfo
# connections, 32), DURATION (seconds per wrk run, 10), RUNS (nix copy runs
# per side, best kept, 3), COLD_RUNS (cold runs, fresh state each, best
# kept, default RUNS), WARM_RUNS (warm fetches per side, best kept, default
# RUNS but at least 5), NARINFO_RUNS (wrk runs per side, best kept,
# alternating, default RUNS up to 3), COPY_DIR (where nix copy's destination stores go;
# default a tmpfs dir under /dev/shm when it has 4 GiB free), VARIANTS ("xz zstd"; also xz-memlimit: xz
# with the server under GOMEMLIMIT=$MEMLIMIT, default 40MiB; xz-go: xz with
# a second build without liblzma), REV=<git rev> builds that commit,
# LIBLZMA (auto: -tags liblzma when liblzma-dev is installed; 0: pure Go),
# CORPUS_DIR (where corpora are cached, /var/tmp), KEEP=1 keeps the temp
# dir, PROFILE_DIR=DIR saves CPU profiles of the server (admin API
# /debug/pprof/profile, PROFILE_SECS long, default 10) taken at the start of
# each variant's first cold, warm, narinfo and nix copy run, and a heap profile at
# the end of each variant (`go tool pprof -top DIR/xz-cold.pprof`),
# SERVER_ENV="VAR=VALUE ..." runs the server with that environment (e.g.
# GODEBUG=gctrace=1: the collector's trace lands in the kept server log).
# The peak RSS is also logged per phase (cold, warm, narinfo, copy: the
# kernel's VmHWM, reset between phases through /proc/PID/clear_refs).
set -euo pipefail

SMALL_RUN=${FLEET_SMALL:-0}
CORPUS_ONLY=0
ZSTD_SERVE=${ZSTD_SERVE:-auto}
WITH_SERVE=0
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
for a in "$@"; do
	case $a in
	--small) SMALL_RUN=1 ;;
	--zstd-serve) ZSTD_SERVE=1 ;;
	--no-zstd-serve) ZSTD_SERVE=0 ;;
	--serve) WITH_SERVE=1 ;;
	--corpus-only) CORPUS_ONLY=1 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "fleet.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
	esac
done

if [[ $SMALL_RUN == 1 ]]; then
	N_SMALL=12 SMALL_KIB=4 BIG_MIB="6 10" RAND_PCT=30
	DURATION=${DURATION:-3}
	RUNS=${RUNS:-1}
else
	N_SMALL=125 SMALL_KIB=32 BIG_MIB="50 65 80 100 120" RAND_PCT=30
	DURATION=${DURATION:-10}
	RUNS=${RUNS:-3}
fi
PAR=${PAR:-4}
CONNS=${CONNS:-32}
COLD_RUNS=${COLD_RUNS:-$RUNS}
# A warm fetch takes a tenth of a second: best of at least 5.
WARM_RUNS=${WARM_RUNS:-$((RUNS > 5 ? RUNS : 5))}
NARINFO_RUNS=${NARINFO_RUNS:-$((RUNS > 3 ? 3 : RUNS))}
VARIANTS=${VARIANTS:-xz zstd}
MEMLIMIT=${MEMLIMIT:-40MiB}
CORPUS_DIR=${CORPUS_DIR:-/var/tmp}
X_NIX=(--extra-experimental-features nix-command)
NO_SUBST=(--option substituters '')

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[fleet %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- tools
require nginx:nginx wrk:wrk zstd:zstd xz:xz-utils curl:curl nix-build nix-store nix go sha256sum awk shuf
[[ $(id -u) == 0 ]] || die "run as root (Nix builds into /nix/store without a daemon, nginx runs as root)"
export NIX_REMOTE=${NIX_REMOTE:-local}

# ---------------------------------------------------------------- cleanup
scratch_dir fleet
# cpu_secs PID: user+system CPU seconds of a process so far.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"; }
LOAD_START=$(load)

# ---------------------------------------------------------------- build
build_cacheproxy
if [[ " $VARIANTS " == *" xz-go "* ]]; then
	# The xz variant again with the pure-Go xz decoder, for comparison.
	main_cp=$CP main_built=$BUILT
	LIBLZMA=0 build_cacheproxy cacheproxy-go
	CP_GO=$CP CP=$main_cp BUILT="$main_built; xz-go: the same without liblzma"
fi

# ---------------------------------------------------------------- corpus
# Built once per corpus definition (corpus.nix, its parameters) and kept in
# CORPUS_DIR/cacheproxy-fleet-corpus-<key>: the key pair, the store paths,
# and the signed xz and zstd caches. Delete that dir to rebuild (the store
# paths go with `nix-store --delete $(cat DIR/paths)` after removing DIR/result).
corpus_at fleet v1
if [[ ! -e $C/done ]]; then
	log "building the corpus in $C (once; xz compression takes a while)"
	build_corpus fleet-up-1
	log "publishing $(wc -l <"$C/paths") paths as signed xz and zstd caches"
	for codec in zstd xz; do
		extra=""
		[[ $codec == xz ]] && extra="&parallel-compression=true"
		s=$(now)
		nix "${X_NIX[@]}" copy "${NO_SUBST[@]}" \
			--to "file://$C/$codec?compression=$codec$extra&secret-key=$C/up.sec" "$(cat "$C/root")" \
			>>"$C/build.log" 2>&1 || die "nix copy --to $codec: $(tail -3 "$C/build.log")"
		log "$codec cache published in $(since "$s") s"
	done
	touch "$C/done"
fi
UP_PUB=$(cat "$C/up.pub")
ROOT=$(cat "$C/root")
mapfile -t PATHS <"$C/paths"
NPATHS=${#PATHS[@]}
awk '{ sub("/nix/store/", ""); print substr($0, 1, 32) }' "$C/paths" >"$T/hashes"
grep -q '^Sig: fleet-up-1:' "$C/xz/${ROOT:11:32}.narinfo" || die "corpus: the xz cache is not signed"

# Corpus figures: NarSize total, compressed totals, paths of 50 MB and up.
NAR_BYTES=$(cat "$C"/xz/*.narinfo | awk '$1 == "NarSize:" { s += $2 } END { printf "%.0f", s }')
BIG_PATHS=$(cat "$C"/xz/*.narinfo | awk '$1 == "NarSize:" && $2 >= 50e6 { n++ } END { print n + 0 }')
csize() { cat "$C/$1"/*.narinfo | awk '$1 == "FileSize:" { s += $2 } END { printf "%.0f", s }'; }
XZ_BYTES=$(csize xz)
ZST_BYTES=$(csize zstd)
log "corpus: $NPATHS paths, $((NAR_BYTES / 1000000)) MB of NAR ($BIG_PATHS of 50 MB or more), xz $((XZ_BYTES / 1000000)) MB, zstd $((ZST_BYTES / 1000000)) MB"
[[ $CORPUS_ONLY == 0 ]] || exit 0

# ---------------------------------------------------------------- serve_compression
if [[ $ZSTD_SERVE != 0 ]]; then
	cat >"$T/probe.toml" <<-EOF
		state_dir = "$T/probe-state"
		serve_compression = "zstd"
		[[upstreams]]
		url = "file://$C/xz"
		public_keys = ["$UP_PUB"]
	EOF
	if "$CP" check-config -c "$T/probe.toml" >/dev/null 2>"$T/probe.err"; then
		VARIANTS+=" xz-as-zstd"
	elif [[ $ZSTD_SERVE == 1 ]]; then
		die "--zstd-serve: this cacheproxy refuses serve_compression: $(head -3 "$T/probe.err")"
	else
		log "this cacheproxy has no serve_compression; skipping the xz-as-zstd variant"
	fi
fi

# ---------------------------------------------------------------- nginx
# One server per cache: sendfile, 2 workers, no access log.
NX_PORT=$(free_port)
NZ_PORT=$(free_port)
while [[ $NZ_PORT == "$NX_PORT" ]]; do NZ_PORT=$(free_port); done
start_nginx "$NX_PORT:$C/xz" "$NZ_PORT:$C/zstd"
nginx_url() { case $1 in xz) echo "http://127.0.0.1:$NX_PORT" ;; *) echo "http://127.0.0.1:$NZ_PORT" ;; esac; }

# ---------------------------------------------------------------- cacheproxy
# start_proxy NAME UPSTREAM_URL [EXTRA_TOP_LEVEL_TOML]: fresh state dir,
# allowlists the whole corpus; sets PROXY_URL, PROXY_CFG, PROXY_PID.
start_proxy() {
	local name=$1 up=$2 extra=${3:-} env
	read -ra env <<<"${SERVER_ENV:-}"
	if [[ $name == *-memlimit ]]; then
		start_cacheproxy "$name" "$up" "$extra" "$CP" GOMEMLIMIT="$MEMLIMIT" "${env[@]}"
	elif [[ $name == xz-go ]]; then
		start_cacheproxy "$name" "$up" "$extra" "$CP_GO" "${env[@]}"
	else
		start_cacheproxy "$name" "$up" "$extra" "$CP" "${env[@]}"
	fi
	"$CP" allow add -c "$PROXY_CFG" --reason bench "${PATHS[@]}" >/dev/null ||
		die "$name: allow add failed"
}

# fetch_narinfos URL DIR: every narinfo of the corpus into DIR/<hash>.narinfo.
fetch_narinfos() {
	mkdir -p "$2"
	awk -v u="$1" -v d="$2" '{ printf "url = \"%s/%s.narinfo\"\noutput = \"%s/%s.narinfo\"\n", u, $1, d, $1 }' \
		"$T/hashes" >"$2.curl"
	curl -fsS --parallel --parallel-max 16 -K "$2.curl" 2>>"$T/curl.log" || die "narinfos from $1: $(tail -3 "$T/curl.log")"
}
# nar_list URL NARINFO_DIR OUT: a curl config fetching every NAR the
# narinfos name (to /dev/null).
nar_list() {
	local h u
	while read -r h; do
		u=$(field URL "$2/$h.narinfo")
		[[ -n $u ]] || die "no URL in $2/$h.narinfo"
		printf 'url = "%s/%s"\noutput = "/dev/null"\n' "$1" "$u"
	done <"$T/hashes" >"$3"
}
# fetch_all CURLCONFIG: every NAR, PAR at a time over one curl (libcurl, as
# Nix); prints the seconds; fails unless every transfer was a 200.
fetch_all() {
	local s secs bad
	s=$(now)
	curl -sS --parallel --parallel-max "$PAR" -K "$1" -w '%{http_code}\n' >"$T/fetch.codes" 2>>"$T/curl.log" ||
		die "fetching $1: $(tail -3 "$T/curl.log")"
	secs=$(since "$s")
	bad=$(grep -vc '^200$' "$T/fetch.codes" || true)
	((bad == 0)) || die "fetching $1: $bad transfers were not 200: $(sort "$T/fetch.codes" | uniq -c | tr '\n' ' ')"
	(($(wc -l <"$T/fetch.codes") == NPATHS)) || die "fetching $1: $(wc -l <"$T/fetch.codes") transfers, want $NPATHS"
	echo "$secs"
}
# verify_floor CODEC: the decoding and hashing floor over every NAR file of
# that cache: the files dealt out by size to PAR workers (largest first, to
# the least loaded), each worker one `xz -dc FILES... | sha256sum` (or
# zstd), so that process start-up, 3 per file, does not count; prints the
# seconds, and the CPU seconds (user+system) of all its processes to
# $T/floorcpu.
verify_floor() {
	local codec=$1 dec s i pids=()
	case $codec in xz) dec="xz -dc" ;; zstd) dec="zstd -dcq" ;; esac
	rm -f "$T"/floor.*
	while read -r h; do
		f=$C/$codec/$(field URL "$C/$codec/$h.narinfo")
		echo "$(stat -c %s "$f") $f"
	done <"$T/hashes" | sort -rn | awk -v n="$PAR" -v t="$T" '
		{ w = 0; for (i = 1; i < n; i++) if (load[i] < load[w]) w = i; load[w] += $1; print $2 >> (t "/floor." w) }'
	s=$(now)
	# In a subshell, whose `times` then sums its children's CPU.
	(
		for i in "$T"/floor.*; do
			# shellcheck disable=SC2046 # file names from the cache: no spaces
			$dec $(cat "$i") | sha256sum >/dev/null &
			pids+=($!)
		done
		wait "${pids[@]}"
		times >"$T/floortimes" # not in a pipe: that would be a child's times
		awk 'NR == 2 { gsub(/[ms]/, " "); printf "%.2f\n", $1 * 60 + $2 + $3 * 60 + $4 }' "$T/floortimes" >"$T/floorcpu"
	)
	since "$s"
}

export HASHES_FILE=$T/hashes

# The destination stores of `nix copy` live in COPY_DIR: by default on
# tmpfs (/dev/shm), so that what is measured is the substitution (fetch,
# decode, unpack, register) and not this VM's disk, whose fsync latency
# (Nix syncs its database per path) moved copies by 2x between runs.
if [[ -z ${COPY_DIR:-} ]]; then
	COPY_DIR=$T
	if [[ -d /dev/shm ]] && (($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') > 4 * 1024 * 1024)); then
		COPY_DIR=$(mktemp -d /dev/shm/cacheproxy-fleet-copy.XXXXXX)
		trap 'rm -rf "$COPY_DIR"; bench_cleanup' EXIT
	fi
fi

# nix_copy LABEL URL KEYS -> seconds: `nix copy` of the whole closure from
# URL into a fresh chroot store, with a fresh HOME (no narinfo cache) and
# URL as the only substituter, trusting KEYS.
COPY_N=0
nix_copy() {
	local d s secs
	COPY_N=$((COPY_N + 1))
	d=$COPY_DIR/copy-$COPY_N
	mkdir -p "$d/home"
	s=$(now)
	HOME=$d/home XDG_CACHE_HOME=$d/home/.cache nix "${X_NIX[@]}" copy --from "$2" --to "$d/store" \
		--option substituters "$2" --option trusted-public-keys "$3" "$ROOT" >"$d/log" 2>&1 ||
		die "nix copy $1: $(tail -3 "$d/log")"
	secs=$(since "$s")
	[[ -e $d/store$ROOT/README ]] || die "nix copy $1: $ROOT did not land"
	rm -rf "$d"
	echo "$secs"
}

# profile NAME [heap]: with PROFILE_DIR set, a CPU profile of the running
# server over the next PROFILE_SECS seconds (in the background), or its heap
# profile now.
PROF_PIDS=()
profile() {
	[[ -n ${PROFILE_DIR:-} ]] || return 0
	mkdir -p "$PROFILE_DIR"
	local auth="Authorization: Bearer $(cat "$TOKEN_FILE")"
	if [[ ${2:-} == heap ]]; then
		curl -fsS -H "$auth" -o "$PROFILE_DIR/$1.pprof" "$ADMIN_URL/debug/pprof/heap" ||
			log "WARNING: no heap profile $1 (does this cacheproxy serve /debug/pprof/ on the admin API?)"
		return 0
	fi
	curl -fsS -H "$auth" -o "$PROFILE_DIR/$1.pprof" "$ADMIN_URL/debug/pprof/profile?seconds=${PROFILE_SECS:-10}" &
	PROF_PIDS+=($!)
}
profile_wait() {
	local p
	for p in "${PROF_PIDS[@]}"; do wait "$p" || log "WARNING: a CPU profile failed (does this cacheproxy serve /debug/pprof/ on the admin API?)"; done
	PROF_PIDS=()
}

# phase_peak VARIANT PHASE: the server's peak RSS (KiB) since the last
# call, kept as the phase's largest in T/VARIANT.hwm-PHASE; then resets the
# kernel's peak so that the next phase starts from the current RSS.
phase_peak() {
	local f=$T/$1.hwm-$2 kb
	kb=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PROXY_PID/status")
	[[ -s $f ]] && (($(cat "$f") >= kb)) || echo "$kb" >"$f"
	echo 5 >"/proc/$PROXY_PID/clear_refs" 2>/dev/null || true
	echo "$kb" >>"$T/$1.hwm"
}
peaks() { # VARIANT: "cold 52 warm 31 ..." in MiB
	local p out=""
	for p in cold warm narinfo copy; do
		[[ -s $T/$1.hwm-$p ]] && out+="$p $(($(cat "$T/$1.hwm-$p") / 1024)) "
	done
	echo "${out% }"
}

# ---------------------------------------------------------------- measuring
# One results line per figure: VARIANT FIGURE CACHEPROXY REFERENCE.
: >"$T/results"
result() { echo "$*" >>"$T/results"; }

for v in $VARIANTS; do
	case $v in
	xz | zstd) codec=$v extra="" ;;
	xz-as-zstd) codec=xz extra='serve_compression = "zstd"' ;;
	xz-memlimit | xz-go) codec=xz extra="" ;;
	*) die "unknown variant $v (VARIANTS takes xz, zstd, xz-memlimit, xz-go)" ;;
	esac
	NG=$(nginx_url "$codec")
	log "== $v: upstream nginx $codec cache, $NPATHS paths"
	: >"$T/$v.cold" && : >"$T/$v.floor" && : >"$T/$v.coldcpu" && : >"$T/$v.floorcpu"
	for r in $(seq "$COLD_RUNS"); do
		((r == 1)) || stop_pid "$PROXY_PID"
		start_proxy "$v" "$NG" "$extra"
		fetch_narinfos "$PROXY_URL" "$T/$v-ni"
		nar_list "$PROXY_URL" "$T/$v-ni" "$T/$v-proxy.curl"
		((r > 1)) || profile "$v-cold"
		phase_peak "$v" start
		cpu0=$(cpu_secs "$PROXY_PID")
		secs=$(fetch_all "$T/$v-proxy.curl")
		phase_peak "$v" cold
		cpu=$(awk -v a="$cpu0" -v b="$(cpu_secs "$PROXY_PID")" 'BEGIN { printf "%.2f", b - a }')
		echo "$secs" >>"$T/$v.cold"
		echo "$cpu" >>"$T/$v.coldcpu"
		floor=$(verify_floor "$codec")
		echo "$floor" >>"$T/$v.floor"
		cat "$T/floorcpu" >>"$T/$v.floorcpu"
		log "$v cold run $r: cacheproxy ${secs}s (${cpu} s of CPU), $codec -dc | sha256sum ${floor}s ($(cat "$T/floorcpu") s of CPU)"
		profile_wait
	done
	result "$v cold $(best "$T/$v.cold") $(best "$T/$v.floor")"
	result "$v coldcpu $(best "$T/$v.coldcpu") $(best "$T/$v.floorcpu")"

	# Warm: the proxy's own files (its narinfos name them) vs nginx serving
	# the upstream files; for xz-as-zstd, nginx serving the zstd cache.
	ref_codec=$codec
	[[ $v == xz-as-zstd ]] && ref_codec=zstd
	fetch_narinfos "$(nginx_url "$ref_codec")" "$T/$v-ng-ni"
	nar_list "$(nginx_url "$ref_codec")" "$T/$v-ng-ni" "$T/$v-nginx.curl"
	# The proxy's narinfos as they are now: after the cold run, those of
	# xz-as-zstd name the recoded zstd files.
	fetch_narinfos "$PROXY_URL" "$T/$v-ni-warm"
	nar_list "$PROXY_URL" "$T/$v-ni-warm" "$T/$v-proxy.curl"
	: >"$T/$v.warm" && : >"$T/$v.warmref"
	profile "$v-warm"
	for r in $(seq "$WARM_RUNS"); do
		fetch_all "$T/$v-proxy.curl" >>"$T/$v.warm"
		phase_peak "$v" warm
		fetch_all "$T/$v-nginx.curl" >>"$T/$v.warmref"
	done
	profile_wait
	log "$v warm: cacheproxy $(best "$T/$v.warm")s, nginx $(best "$T/$v.warmref")s"
	result "$v warm $(best "$T/$v.warm") $(best "$T/$v.warmref")"

	# Best of NARINFO_RUNS wrk runs per side, alternating: a single run
	# moved by 20% with what else the machine did.
	: >"$T/$v.ni" && : >"$T/$v.niref"
	for r in $(seq "$NARINFO_RUNS"); do
		((r > 1)) || profile "$v-narinfo"
		phase_peak "$v" between
		narinfo_rate "$v cacheproxy" "$PROXY_URL" >>"$T/$v.ni"
		profile_wait
		phase_peak "$v" narinfo
		narinfo_rate "$v nginx" "$NG" >>"$T/$v.niref"
	done
	p_rate=$(best_max "$T/$v.ni")
	n_rate=$(best_max "$T/$v.niref")
	log "$v narinfo: cacheproxy $p_rate/s, nginx $n_rate/s (best of $NARINFO_RUNS; all: $(tr '\n' ' ' <"$T/$v.ni")/ $(tr '\n' ' ' <"$T/$v.niref"))"
	result "$v narinfo $p_rate $n_rate"

	GK_PUB=$("$CP" pubkey -c "$PROXY_CFG")
	: >"$T/$v.copy" && : >"$T/$v.copyref"
	for r in $(seq "$RUNS"); do
		((r > 1)) || profile "$v-copy"
		phase_peak "$v" between
		nix_copy "$v cacheproxy" "$PROXY_URL" "$GK_PUB $UP_PUB" >>"$T/$v.copy"
		profile_wait
		phase_peak "$v" copy
		nix_copy "$v nginx" "$(nginx_url "$ref_codec")" "$UP_PUB" >>"$T/$v.copyref"
	done
	log "$v nix copy: cacheproxy $(best "$T/$v.copy")s, nginx $(best "$T/$v.copyref")s"
	result "$v copy $(best "$T/$v.copy") $(best "$T/$v.copyref")"
	if [[ $v == xz-as-zstd ]]; then
		# The fleet target: the xz corpus through cacheproxy serving zstd
		# vs the original xz cache from nginx (measured just now, too).
		: >"$T/$v.copyxz"
		for r in $(seq "$RUNS"); do nix_copy "$v nginx-xz" "$(nginx_url xz)" "$UP_PUB" >>"$T/$v.copyxz"; done
		result "$v copyxz $(best "$T/$v.copy") $(best "$T/$v.copyxz")"
	fi

	profile "$v-heap" heap
	phase_peak "$v" end
	rss=$(best_max "$T/$v.hwm")
	log "$v peak RSS by phase (MiB): $(peaks "$v")"
	result "$v rss $rss 0"
	stop_pid "$PROXY_PID"
done
LOAD_END=$(load)

# ---------------------------------------------------------------- table
xz_cold=$(awk '$1 == "xz" && $2 == "cold" { print $3 }' "$T/results")
awk -v built="$BUILT" -v when="$(date -u "+%Y-%m-%d %H:%M UTC")" -v nproc="$(nproc)" \
	-v cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
	-v npaths="$NPATHS" -v nar="$NAR_BYTES" -v big="$BIG_PATHS" -v xzb="$XZ_BYTES" -v zsb="$ZST_BYTES" \
	-v par="$PAR" -v conns="$CONNS" -v runs="$RUNS" -v cruns="$COLD_RUNS" -v dur="$DURATION" \
	-v wruns="$WARM_RUNS" -v nruns="$NARINFO_RUNS" \
	-v l0="$LOAD_START" -v l1="$LOAD_END" -v xzcold="$xz_cold" \
	-v nginxv="$(nginx -v 2>&1 | sed 's/.*\///')" -v nixv="$(nix --version | awk '{ print $3 }')" '
function row(fig, v, a, b, unit, tgt,   r) {
	r = b > 0 ? a / b : 0
	if (b == 0) b = "-"
	printf("| %-46s | %-11s | %10s | %10s | %6s | %-9s |\n", fig, v, fmt(a, unit), fmt(b, unit), b > 0 ? sprintf("%.2fx", r) : "", tgt)
}
function fmt(x, unit) {
	if (x == "-") return x
	if (unit == "s") return sprintf("%.2f s", x)
	if (unit == "/s") return sprintf("%.0f/s", x)
	if (unit == "MiB") return sprintf("%.0f MiB", x / 1024)
	return x
}
{ val[$1, $2] = $3; ref[$1, $2] = $4; if (!seen[$1]++) order[++nv] = $1 }
END {
	printf "\ncacheproxy %s; %s; %d cores (%s); load average %s at start, %s at end\n", built, when, nproc, cpu, l0, l1
	printf "corpus: %d paths, %.0f MB of NAR (%d of 50 MB or more); xz %.0f MB, zstd %.0f MB; nginx %s, Nix %s\n",
		npaths, nar / 1e6, big, xzb / 1e6, zsb / 1e6, nginxv, nixv
	printf "%d fetches in flight; best of %d cold, %d warm, %d narinfo (wrk, %d connections, %d s) and %d nix copy run(s) per side\n\n", par, cruns, wruns, nruns, conns, dur, runs
	printf "| %-46s | %-11s | %10s | %10s | %6s | %-9s |\n", "figure (reference)", "upstream", "cacheproxy", "reference", "ratio", "target"
	printf "|%s|%s|%s|%s|%s|%s|\n", "------------------------------------------------", "-------------", "------------", "------------", "--------", "-----------"
	for (i = 1; i <= nv; i++) {
		v = order[i]
		if (v == "xz-as-zstd") {
			row("cold fetch, all NARs (xz -dc \\| sha256sum)", v, val[v, "cold"], ref[v, "cold"], "s", "")
			row("  CPU of the cold fetch (server; xz, sha256sum)", v, val[v, "coldcpu"], ref[v, "coldcpu"], "s", "")
			if (xzcold > 0) row("  zstd encoding cost (vs xz cold, s)", v, val[v, "cold"], xzcold, "s", "")
			row("warm fetch, all NARs (nginx, zstd cache)", v, val[v, "warm"], ref[v, "warm"], "s", "")
			row("narinfo hits/s (nginx)", v, val[v, "narinfo"], ref[v, "narinfo"], "/s", "")
			row("nix copy, warm (nginx, zstd cache)", v, val[v, "copy"], ref[v, "copy"], "s", "")
			row("nix copy, warm (nginx, original xz cache)", v, val[v, "copyxz"], ref[v, "copyxz"], "s", "<= 0.6x")
			row("peak RSS of the server (VmHWM)", v, val[v, "rss"], 0, "MiB", "")
			continue
		}
		dec = v ~ /^xz/ ? "xz" : "zstd"
		row("cold fetch, all NARs (" dec " -dc \\| sha256sum)", v, val[v, "cold"], ref[v, "cold"], "s", dec == "xz" ? "<= 1.2x" : "<= 1.0x")
		row("  CPU of the cold fetch (server; " dec ", sha256sum)", v, val[v, "coldcpu"], ref[v, "coldcpu"], "s", "")
		row("warm fetch, all NARs (nginx)", v, val[v, "warm"], ref[v, "warm"], "s", "<= 1.05x")
		row("narinfo hits/s (nginx)", v, val[v, "narinfo"], ref[v, "narinfo"], "/s", ">= 0.65x")
		row("nix copy of the closure, warm (nginx)", v, val[v, "copy"], ref[v, "copy"], "s", "<= 1.05x")
		row("peak RSS of the server (VmHWM)", v, val[v, "rss"], 0, "MiB", "<= 48 MiB")
	}
	printf "\nratio = cacheproxy / reference; times are lower-is-better, hits/s higher-is-better.\n"
}' "$T/results"

if [[ $WITH_SERVE == 1 ]]; then
	log "running bench/serve.sh"
	REV=${REV:-} "$REPO/bench/serve.sh"
fi
