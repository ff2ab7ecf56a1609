#!/usr/bin/env bash
# bench/cluster.sh — sizing figures for a cacheproxy cluster: N = 1, 2, 3
# nodes sharing one trust state through etcd, behind an nginx round-robin
# load balancer, all on loopback. Measures, for each N, narinfo requests/s
# (wrk) and NAR MB/s (every NAR of the corpus, PAR at a time over curl)
# through the load balancer, each right next to the same figure for nginx
# serving the upstream cache directly, and prints the ratios; also node 1
# directly (no load balancer), alone and with the other nodes up.
#
# Setup, all real: a closure built by Nix (bench/corpus.nix, ~100 paths,
# ~150 MB of NAR), published by `nix copy` as a signed zstd cache that nginx
# serves as the upstream; an etcd cluster of 3 members (Debian's etcd-server);
# the corpus attested by a rebuilder key (`nix store sign`, `nix path-info
# --json --sigs`) and imported through node 1's admin API (`cacheproxy attest
# import`); nodes 2 and 3 join later and must approve every path from what
# they mirror from etcd. Every node is warmed (each NAR fetched once through
# it) before it takes traffic; the nodes' narinfos must be byte-identical
# (same gatekeeper key).
#
# No timed assertions: it exits 0 whenever the setup worked. Needs root, Nix
# (nix-build, nix-store, nix), Go; installs nginx wrk etcd-server zstd curl
# jq nix-bin from Debian when missing. See bench/README.md.
#
# Usage: bench/cluster.sh [--etcd1] [--small]
#   --etcd1   one etcd member instead of three
#   --small   a tiny corpus (15 paths, ~20 MB) and 3 s runs: a check of the
#             harness
# Environment: NODES (the N to measure, "1 2 3"), PAR (NAR fetches in
# flight, 6), CONNS (wrk connections, 32), DURATION (seconds per wrk run,
# 10), RUNS (wrk and NAR runs per side, best kept, 2), PASSES (each NAR
# run fetches the corpus this many times over, so a run lasts long enough
# to measure, 4), CORPUS_DIR (/var/tmp),
# REV=<git rev> builds that commit, KEEP=1 keeps the temp dir.
set -euo pipefail

SMALL_RUN=0
ETCD_MEMBERS=3
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
for a in "$@"; do
	case $a in
	--etcd1) ETCD_MEMBERS=1 ;;
	--small) SMALL_RUN=1 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "cluster.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
	esac
done
if [[ $SMALL_RUN == 1 ]]; then
	N_SMALL=12 SMALL_KIB=4 BIG_MIB="6 10" RAND_PCT=30
	DURATION=${DURATION:-3}
else
	N_SMALL=100 SMALL_KIB=8 BIG_MIB="40 60" RAND_PCT=30
	DURATION=${DURATION:-10}
fi
NODES=${NODES:-1 2 3}
PAR=${PAR:-6}
CONNS=${CONNS:-32}
RUNS=${RUNS:-2}
PASSES=${PASSES:-4}
CORPUS_DIR=${CORPUS_DIR:-/var/tmp}
X_NIX=(--extra-experimental-features nix-command)
NO_SUBST=(--option substituters '')
PREFIX=/cacheproxy-bench/

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- tools
require nginx:nginx wrk:wrk etcd:etcd-server zstd:zstd curl:curl jq:jq nix-build:nix-bin nix-store nix go sha256sum awk shuf
ETCD=/usr/bin/etcd
[[ -x $ETCD ]] || die "$ETCD is missing (apt-get install -y etcd-server)"
[[ $(id -u) == 0 ]] || die "run as root (Nix builds into /nix/store without a daemon, nginx runs as root)"
export NIX_REMOTE=${NIX_REMOTE:-local}

# ---------------------------------------------------------------- cleanup
scratch_dir cluster
# port: a free port not handed out before in this run.
USED_PORTS=" "
port() {
	local p
	p=$(free_port)
	while [[ $USED_PORTS == *" $p "* ]]; do p=$(free_port); done
	USED_PORTS+="$p "
	echo "$p"
}
LOAD_START=$(load)

build_cacheproxy

# ---------------------------------------------------------------- corpus
# Built once per definition and kept in CORPUS_DIR/cacheproxy-cluster-corpus-<key>
# (as fleet.sh does, smaller and zstd only): the store paths, the upstream
# key pair and zstd cache, and the rebuilder's key pair and attestations.
corpus_at cluster "cluster v1"
if [[ ! -e $C/done ]]; then
	log "building the corpus in $C (once)"
	build_corpus cluster-up-1
	log "publishing $(wc -l <"$C/paths") paths as a signed zstd cache"
	nix "${X_NIX[@]}" copy "${NO_SUBST[@]}" \
		--to "file://$C/zstd?compression=zstd&secret-key=$C/up.sec" "$(cat "$C/root")" \
		>>"$C/build.log" 2>&1 || die "nix copy --to zstd: $(tail -3 "$C/build.log")"
	# The rebuilder: signs the paths it built (here, the same local build)
	# and hands over `nix path-info --json --sigs`, keeping only its own
	# signatures, as e2e/harness_test.go's attestFile does.
	nix-store --generate-binary-cache-key cluster-rebuilder-1 "$C/reb.sec" "$C/reb.pub"
	mapfile -t paths <"$C/paths"
	nix "${X_NIX[@]}" store sign --key-file "$C/reb.sec" "${paths[@]}" >>"$C/build.log" 2>&1 ||
		die "nix store sign: $(tail -3 "$C/build.log")"
	nix "${X_NIX[@]}" path-info --json --sigs "${paths[@]}" 2>>"$C/build.log" |
		jq '[.[] | .signatures = [(.signatures // [])[] | select(startswith("cluster-rebuilder-1:"))]]' >"$C/attest.json" ||
		die "nix path-info: $(tail -3 "$C/build.log")"
	touch "$C/done"
fi
UP_PUB=$(cat "$C/up.pub")
REB_PUB=$(cat "$C/reb.pub")
ROOT=$(cat "$C/root")
NPATHS=$(wc -l <"$C/paths")
awk '{ sub("/nix/store/", ""); print substr($0, 1, 32) }' "$C/paths" >"$T/hashes"
grep -q '^Sig: cluster-up-1:' "$C/zstd/${ROOT:11:32}.narinfo" || die "corpus: the zstd cache is not signed"
NAR_BYTES=$(cat "$C"/zstd/*.narinfo | awk '$1 == "NarSize:" { s += $2 } END { printf "%.0f", s }')
ZST_BYTES=$(cat "$C"/zstd/*.narinfo | awk '$1 == "FileSize:" { s += $2 } END { printf "%.0f", s }')
log "corpus: $NPATHS paths, $((NAR_BYTES / 1000000)) MB of NAR, zstd $((ZST_BYTES / 1000000)) MB"

# ---------------------------------------------------------------- upstream
NG_PORT=$(port)
start_nginx "$NG_PORT:$C/zstd"
NG=http://127.0.0.1:$NG_PORT

# ---------------------------------------------------------------- etcd
# Static bootstrap of ETCD_MEMBERS members on loopback, data in $T.
ETCD_URLS=()
initial=""
declare -a E_CPORT E_PPORT
for i in $(seq "$ETCD_MEMBERS"); do
	E_CPORT[i]=$(port)
	E_PPORT[i]=$(port)
	initial+="${initial:+,}e$i=http://127.0.0.1:${E_PPORT[i]}"
	ETCD_URLS+=("http://127.0.0.1:${E_CPORT[i]}")
done
for i in $(seq "$ETCD_MEMBERS"); do
	"$ETCD" --name "e$i" --data-dir "$T/etcd/e$i" \
		--listen-client-urls "http://127.0.0.1:${E_CPORT[i]}" --advertise-client-urls "http://127.0.0.1:${E_CPORT[i]}" \
		--listen-peer-urls "http://127.0.0.1:${E_PPORT[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${E_PPORT[i]}" \
		--initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token cacheproxy-bench \
		--logger zap --log-outputs stderr >"$T/etcd-e$i.log" 2>&1 &
	PIDS+=($!)
	E_PID[i]=$!
done
for i in $(seq "$ETCD_MEMBERS"); do
	ok=0
	for _ in $(seq 300); do
		if curl -fs "http://127.0.0.1:${E_CPORT[i]}/health" 2>/dev/null | grep -q '"health":"true"'; then ok=1; break; fi
		kill -0 "${E_PID[i]}" 2>/dev/null || die "etcd e$i exited: $(tail -3 "$T/etcd-e$i.log")"
		sleep 0.1
	done
	((ok)) || die "etcd e$i never became healthy: $(tail -3 "$T/etcd-e$i.log")"
done
log "etcd: $ETCD_MEMBERS member(s) healthy (${ETCD_URLS[*]})"
etcd_list=$(printf '"%s", ' "${ETCD_URLS[@]}")
etcd_list="[${etcd_list%, }]"

# ---------------------------------------------------------------- nodes
# One gatekeeper key for every node, kept outside their state dirs.
"$CP" keygen cluster-gk-1 --dir "$T" >/dev/null
declare -a NODE_URL NODE_PID NODE_CFG
start_node() { # I
	local i=$1 p a
	p=$(port)
	a=$(port)
	NODE_CFG[i]=$T/node$i.toml
	cat >"${NODE_CFG[i]}" <<-EOF
		listen = "127.0.0.1:$p"
		state_dir = "$T/node$i-state"
		signing_key_file = "$T/cluster-gk-1.sec"
		[[upstreams]]
		url = "$NG"
		public_keys = ["$UP_PUB"]
		[policy]
		attesters = ["$REB_PUB"]
		quorum = 1
		[admin]
		listen = "127.0.0.1:$a"
		[cluster]
		etcd = $etcd_list
		prefix = "$PREFIX"
	EOF
	"$CP" serve -c "${NODE_CFG[i]}" >>"$T/node$i.log" 2>&1 &
	NODE_PID[i]=$!
	PIDS+=("${NODE_PID[i]}")
	NODE_URL[i]=http://127.0.0.1:$p
	wait_http "${NODE_URL[i]}/healthz" "${NODE_PID[i]}" "$T/node$i.log"
	wait_port "$a"
}

# narinfo_codes URL DIR: every narinfo of the corpus into DIR; prints how
# many were 200.
narinfo_codes() {
	mkdir -p "$2"
	awk -v u="$1" -v d="$2" '{ printf "url = \"%s/%s.narinfo\"\noutput = \"%s/%s.narinfo\"\n", u, $1, d, $1 }' \
		"$T/hashes" >"$2.curl"
	curl -sS --parallel --parallel-max 16 -K "$2.curl" -w '%{http_code}\n' 2>>"$T/curl.log" | grep -c '^200$' || true
}
# wait_approved I: until node I answers 200 for every narinfo (it decides
# from what it mirrored from etcd); prints the seconds it took.
wait_approved() {
	local i=$1 s n=0
	s=$(now)
	for _ in $(seq 150); do
		n=$(narinfo_codes "${NODE_URL[i]}" "$T/ni-node$i")
		((n == NPATHS)) && { since "$s"; return 0; }
		sleep 0.2
	done
	die "node $i approves $n of $NPATHS paths after 30 s: $(tail -3 "$T/node$i.log")"
}
field_of() { awk -v k="$1:" '$1 == k { print $2 }' "$2"; }
# nar_list URL OUT [PASSES]: a curl config fetching every NAR node 1's
# narinfos name, PASSES times over (1).
nar_list() {
	local h u
	while read -r h; do
		u=$(field_of URL "$T/ni-node1/$h.narinfo")
		[[ -n $u ]] || die "no URL in $T/ni-node1/$h.narinfo"
		printf 'url = "%s/%s"\noutput = "/dev/null"\n' "$1" "$u"
	done <"$T/hashes" >"$2.1"
	for _ in $(seq "${3:-1}"); do cat "$2.1"; done >"$2"
}
# nar_mbs CURLCONFIG: every transfer it lists, PAR at a time over one curl
# (libcurl, as Nix); checks each was a 200; prints MB/s (bytes received / s).
nar_mbs() {
	local s secs bad
	s=$(now)
	curl -sS --parallel --parallel-max "$PAR" -K "$1" -w '%{http_code} %{size_download}\n' >"$T/fetch.out" 2>>"$T/curl.log" ||
		die "fetching $1: $(tail -3 "$T/curl.log")"
	secs=$(since "$s")
	bad=$(awk '$1 != 200' "$T/fetch.out" | wc -l)
	((bad == 0)) || die "fetching $1: $bad transfers were not 200: $(awk '{ print $1 }' "$T/fetch.out" | sort | uniq -c | tr '\n' ' ')"
	(($(wc -l <"$T/fetch.out") == $(grep -c '^url' "$1"))) || die "fetching $1: $(wc -l <"$T/fetch.out") transfers, want $(grep -c '^url' "$1")"
	awk -v t="$secs" '{ b += $2 } END { printf "%.0f\n", b / t / 1e6 }' "$T/fetch.out"
}

export HASHES_FILE=$T/hashes
# narinfo_served I: narinfo 200s node I has answered so far (its metrics).
narinfo_served() {
	curl -fsS "${NODE_URL[$1]}/metrics" |
		awk '/^cacheproxy_http_requests_total\{/ && /handler="narinfo"/ && /code="200"/ { s += $NF } END { printf "%.0f\n", s }'
}

# ---------------------------------------------------------------- load balancer
# start_lb N: nginx (2 workers, own prefix) round-robin over nodes 1..N
# with keepalive connections to them. Responses are streamed through
# (proxy_buffering off, 128 KiB reads): NARs are never spooled to disk, and
# nginx's default 4-8 KiB proxy buffers halved the NAR throughput of the
# hop here. Sets LB_URL, LB_PID.
start_lb() {
	local n=$1 d=$T/lb$1 p servers="" i
	p=$(port)
	for i in $(seq "$n"); do servers+="server ${NODE_URL[i]#http://};"; done
	mkdir -p "$d/tmp"
	cat >"$d/nginx.conf" <<-CONF
		daemon off;
		user root;
		worker_processes 2;
		pid $d/nginx.pid;
		error_log $d/error.log warn;
		events { worker_connections 4096; }
		http {
			access_log off;
			keepalive_requests 1000000;
			client_body_temp_path $d/tmp/body;
			proxy_temp_path $d/tmp/proxy;
			fastcgi_temp_path $d/tmp/fastcgi;
			uwsgi_temp_path $d/tmp/uwsgi;
			scgi_temp_path $d/tmp/scgi;
			upstream nodes { $servers keepalive 64; keepalive_requests 1000000; }
			server {
				listen 127.0.0.1:$p;
				location / {
					proxy_pass http://nodes;
					proxy_http_version 1.1;
					proxy_set_header Connection "";
					proxy_max_temp_file_size 0;
					proxy_buffering off;
					proxy_buffer_size 128k;
					proxy_buffers 8 128k;
					proxy_next_upstream error timeout;
				}
			}
		}
	CONF
	nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
	LB_PID=$!
	PIDS+=("$LB_PID")
	LB_URL=http://127.0.0.1:$p
	wait_http "$LB_URL/nix-cache-info" "$LB_PID" "$d/error.log"
}

# ---------------------------------------------------------------- measuring
: >"$T/results"
: >"$T/oddities"
ODDITIES=$T/oddities # narinfo_rate (lib.sh) records wrk errors there
narinfo_codes "$NG" "$T/ni-up" >/dev/null
# measure LABEL URL: narinfo req/s and NAR MB/s through URL, each run
# followed by the same run against nginx serving the upstream cache, best of
# RUNS each (other jobs on a shared machine take bites out of single runs);
# one results line.
measure() {
	local label=$1 url=$2 pr nr r
	nar_list "$url" "$T/nars.curl" "$PASSES"
	: >"$T/r.p" && : >"$T/r.n" && : >"$T/m.p" && : >"$T/m.n"
	for r in $(seq "$RUNS"); do
		narinfo_rate "$label" "$url" >>"$T/r.p"
		narinfo_rate "$label nginx" "$NG" >>"$T/r.n"
		nar_mbs "$T/nars.curl" >>"$T/m.p"
		nar_mbs "$T/nars-ng.curl" >>"$T/m.n"
	done
	pr=$(best_max "$T/r.p")
	nr=$(best_max "$T/r.n")
	log "$label: narinfo ${pr}/s (nginx ${nr}/s), NAR $(best_max "$T/m.p") MB/s (nginx $(best_max "$T/m.n") MB/s)"
	echo "$label|$pr|$nr|$(best_max "$T/m.p")|$(best_max "$T/m.n")" >>"$T/results"
}
# The reference NAR list: the upstream's own file names.
while read -r h; do
	printf 'url = "%s/%s"\noutput = "/dev/null"\n' "$NG" "$(field_of URL "$T/ni-up/$h.narinfo")"
done <"$T/hashes" >"$T/nars-ng.curl.1"
for _ in $(seq "$PASSES"); do cat "$T/nars-ng.curl.1"; done >"$T/nars-ng.curl"

started=0
for n in $NODES; do
	while ((started < n)); do
		started=$((started + 1))
		start_node "$started"
		if ((started == 1)); then
			log "node 1: importing the rebuilder's attestations through its admin API"
			"$CP" attest import -c "${NODE_CFG[1]}" --reason "cluster bench" "$C/attest.json" >"$T/import.out" 2>&1 ||
				die "attest import: $(tail -3 "$T/import.out")"
		fi
		secs=$(wait_approved "$started")
		log "node $started approves all $NPATHS paths (${secs}s after it answered)"
		dec=$(curl -fsS -o /dev/null -D - "${NODE_URL[started]}/${ROOT:11:32}.narinfo" | tr -d '\r' |
			awk -F': ' 'tolower($1) == "x-cacheproxy-decision" { print $2 }')
		[[ $dec == "approved; reason=attested" ]] || die "node $started: the root path is \"$dec\", want attested"
		if ((started > 1)) && ! diff -rq "$T/ni-node1" "$T/ni-node$started" >/dev/null; then
			log "WARNING: node $started's narinfos differ from node 1's"
			echo "node $started's narinfos differ from node 1's: $(diff -rq "$T/ni-node1" "$T/ni-node$started" | head -3)" >>"$T/oddities"
		fi
		# Warm: every NAR once through this node, so it holds every blob.
		nar_list "${NODE_URL[started]}" "$T/warm.curl"
		s=$(now)
		nar_mbs "$T/warm.curl" >/dev/null
		log "node $started warmed in $(since "$s") s (fetched, verified and stored every NAR)"
	done
	if ((n == 1)); then measure "1 (direct, no LB)" "${NODE_URL[1]}"; fi
	start_lb "$n"
	declare -a before=()
	for i in $(seq "$n"); do before[i]=$(narinfo_served "$i"); done
	measure "$n" "$LB_URL"
	share=""
	for i in $(seq "$n"); do share+=" node$i=$(($(narinfo_served "$i") - before[i]))"; done
	log "N=$n: narinfo 200s per node during the run:$share"
	echo "N=$n narinfo 200s per node:$share" >>"$T/shares"
	stop_pid "$LB_PID"
done
# Node 1 alone again, now with the others up (idle, watching etcd): against
# the first row, what the other nodes cost it.
if ((started > 1)); then measure "1 (direct, $started up)" "${NODE_URL[1]}"; fi
LOAD_END=$(load)

# Nodes still agree and nothing was refused or resynchronised.
for i in $(seq "$started"); do
	grep -E 'level=(WARN|ERROR)' "$T/node$i.log" | head -3 | sed "s/^/node $i log: /" >>"$T/oddities" || true
done

# ---------------------------------------------------------------- table
awk -F'|' -v built="$BUILT" -v when="$(date -u "+%Y-%m-%d %H:%M UTC")" -v nproc="$(nproc)" \
	-v cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
	-v npaths="$NPATHS" -v nar="$NAR_BYTES" -v zsb="$ZST_BYTES" -v members="$ETCD_MEMBERS" \
	-v etcdv="$("$ETCD" --version | awk 'NR == 1 { print $3 }')" \
	-v par="$PAR" -v conns="$CONNS" -v runs="$RUNS" -v passes="$PASSES" -v dur="$DURATION" \
	-v l0="$LOAD_START" -v l1="$LOAD_END" \
	-v nginxv="$(nginx -v 2>&1 | sed 's/.*\///')" -v nixv="$(nix --version | awk '{ print $3 }')" '
BEGIN {
	printf "\ncacheproxy %s; %s; %d cores (%s); load average %s at start, %s at end\n", built, when, nproc, cpu, l0, l1
	printf "corpus: %d paths, %.0f MB of NAR, zstd %.0f MB; etcd %s, %d member(s); nginx %s (upstream and load balancer), Nix %s\n",
		npaths, nar / 1e6, zsb / 1e6, etcdv, members, nginxv, nixv
	printf "narinfo: wrk %d connections, %d s; NARs: all %d, %d times over, %d in flight (curl); best of %d runs each, alternating with nginx\n\n", conns, dur, npaths, passes, par, runs
	printf "| %-18s | %13s | %11s | %5s | %9s | %10s | %5s |\n", "nodes", "narinfo req/s", "nginx req/s", "ratio", "NAR MB/s", "nginx MB/s", "ratio"
	printf "|%s|%s|%s|%s|%s|%s|%s|\n", "--------------------", "---------------", "-------------", "-------", "-----------", "------------", "-------"
}
{
	printf "| %-18s | %13d | %11d | %5.2f | %9d | %10d | %5.2f |\n", $1, $2, $3, $2 / $3, $4, $5, $4 / $5
}
END {
	printf "\nnginx = nginx serving the upstream zstd cache directly, each run right after the cluster run; ratio = cluster / nginx.\n"
}' "$T/results"
echo
cat "$T/shares" 2>/dev/null || true
if [[ -s $T/oddities ]]; then
	echo "oddities:"
	sed 's/^/  /' "$T/oddities"
fi
