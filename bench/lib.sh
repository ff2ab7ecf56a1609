# Helpers shared by bench/fleet.sh and bench/serve.sh (sourced, not run).
# The sourcing script defines log and die first.

stop_pid() { # PID: TERM, then KILL after 5 s
	local p=$1
	kill "$p" 2>/dev/null || return 0
	for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
	kill -9 "$p" 2>/dev/null || true
}

# Ports below Linux's ephemeral range (32768-60999), so that no client
# connection of this very benchmark can hold the port we pick.
free_port() {
	local p
	while :; do
		p=$((10000 + RANDOM % 20000))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
}
wait_port() { # PORT
	for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
	die "nothing listens on 127.0.0.1:$1"
}
wait_http() { # URL [PID LOG]: waits for a 200, gives up early if PID died
	for _ in $(seq 100); do
		curl -fs -o /dev/null "$1" && return 0
		if [[ -n ${2:-} ]] && ! kill -0 "$2" 2>/dev/null; then die "server for $1 exited: $(tail -5 "$3")"; fi
		sleep 0.1
	done
	die "$1 never answered"
}
now() { date +%s.%N; }
best() { sort -g "$1" | head -1; }     # FILE of times: the lowest
best_max() { sort -g "$1" | tail -1; } # FILE of rates (or peaks): the highest
field() { awk -v k="$1:" '$1 == k { print $2 }' "$2"; }

# start_nginx PORT:ROOT...: one nginx (sendfile, 2 workers, no access log)
# under $T/nginx with a server per PORT serving ROOT as a binary cache;
# appends its PID to PIDS, sets NGINX_PID and waits until every server answers.
start_nginx() {
	local spec servers=""
	for spec in "$@"; do servers+="	server { listen 127.0.0.1:${spec%%:*}; root ${spec#*:}; }"$'\n'; done
	mkdir -p "$T/nginx/tmp"
	cat >"$T/nginx/nginx.conf" <<-CONF
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
			types { text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }
			default_type application/octet-stream;
		$servers}
	CONF
	nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" -e "$T/nginx/error.log" &
	NGINX_PID=$!
	PIDS+=("$NGINX_PID")
	for spec in "$@"; do
		wait_http "http://127.0.0.1:${spec%%:*}/nix-cache-info" "$NGINX_PID" "$T/nginx/error.log"
	done
}

# build_cacheproxy [NAME]: builds $T/NAME (default cacheproxy) from REV (git archive, the work
# tree untouched) or, by default, the work tree at $REPO as it is; sets CP
# and BUILT (what was built, for the results). With liblzma's xz decoder
# (-tags liblzma, as nix/package.nix builds it) when REV has it and
# liblzma-dev is installed; LIBLZMA=0 builds the pure-Go one, LIBLZMA=1
# insists on liblzma.
build_cacheproxy() {
	local src
	if [[ -n ${REV:-} ]]; then
		rm -rf "$T/src"
		mkdir -p "$T/src"
		git -C "$REPO" archive "$REV" | tar -x -C "$T/src"
		BUILT="$REV ($(git -C "$REPO" rev-parse --short "$REV"))"
		src=$T/src
	else
		BUILT="work tree at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
		[[ -z $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]] || BUILT+=" + uncommitted changes"
		src=$REPO
	fi
	local tags=() want=${LIBLZMA:-auto}
	if [[ $want != 0 ]] && ls "$src"/internal/verify/xz_liblzma.go >/dev/null 2>&1; then
		if pkg-config --exists liblzma 2>/dev/null; then
			tags=(-tags liblzma)
		elif [[ $want == 1 ]]; then
			die "LIBLZMA=1 but liblzma is not installed (apt-get install -y liblzma-dev pkg-config)"
		else
			log "liblzma-dev not installed: building the pure-Go xz decoder"
		fi
	elif [[ $want == 1 ]]; then
		die "LIBLZMA=1 but $BUILT has no liblzma decoder"
	fi
	BUILT+=" (xz: $([[ ${#tags[@]} -gt 0 ]] && echo liblzma || echo Go))"
	log "building cacheproxy from $BUILT"
	(cd "$src" && go build "${tags[@]}" -o "$T/${1:-cacheproxy}" ./cmd/cacheproxy)
	CP=$T/${1:-cacheproxy}
}

# WRK_NARINFO is the wrk script that asks for the narinfos of $HASHES_FILE
# in turn.
WRK_NARINFO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wrk-narinfo.lua

# narinfo_rate LABEL URL -> requests/s, with CONNS connections for DURATION
# seconds; errors (non-2xx included) are logged and, when ODDITIES names a
# file, recorded there: they make the figure suspect.
narinfo_rate() {
	local out r req dur ec er ew es et
	out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --timeout 10s -s "$WRK_NARINFO" "$2" 2>&1) || die "wrk $1: $out"
	r=$(grep '^RESULT' <<<"$out") || die "wrk $1: no result: $out"
	read -r _ req _ dur ec er ew es et <<<"$r"
	if ((ec + er + ew + es + et != 0)); then
		log "WARNING $1: errors connect=$ec read=$er write=$ew status=$es timeout=$et"
		[[ -z ${ODDITIES:-} ]] || echo "$1: wrk errors connect=$ec read=$er write=$ew status=$es timeout=$et" >>"$ODDITIES"
	fi
	awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f\n", r / (d / 1e6) }'
}

# corpus_at NAME TAG: sets CORPUS_KEY and C, the directory under CORPUS_DIR
# that keeps the corpus built from bench/corpus.nix with the parameters
# N_SMALL SMALL_KIB BIG_MIB RAND_PCT (TAG names the script's variant of it).
corpus_at() {
	CORPUS_KEY=$({
		cat "$REPO/bench/corpus.nix"
		echo "$2 $N_SMALL $SMALL_KIB $BIG_MIB $RAND_PCT"
	} | sha256sum | cut -c1-12)
	C=$CORPUS_DIR/cacheproxy-$1-corpus-$CORPUS_KEY
}

# build_corpus UPKEY: builds the corpus's store paths into C (candidate
# host files shuffled the same way every time, so that each path gets a mix
# of text, data and shared objects), lists them in C/paths, its root in
# C/root, and makes the upstream's key pair UPKEY as C/up.sec and C/up.pub.
build_corpus() {
	local bigs
	rm -rf "$C"
	mkdir -p "$C"
	find /usr/lib /usr/share -xdev -type f -size -8M -readable -printf '%s %p\n' 2>/dev/null | LC_ALL=C sort -k2 |
		shuf --random-source=<(yes) >"$C/list"
	bigs=$(printf '%s ' $BIG_MIB)
	nix-build "${NO_SUBST[@]}" --max-jobs "$(nproc)" -o "$C/result" "$REPO/bench/corpus.nix" \
		--argstr list "$C/list" --argstr tag "$CORPUS_KEY" --arg nSmall "$N_SMALL" \
		--arg smallKiB "$SMALL_KIB" --arg bigMiB "[ $bigs]" --arg randPct "$RAND_PCT" \
		>"$C/build.log" 2>&1 || die "nix-build corpus: $(tail -5 "$C/build.log")"
	readlink "$C/result" >"$C/root"
	nix-store -qR "$(cat "$C/root")" >"$C/paths"
	nix-store --generate-binary-cache-key "$1" "$C/up.sec" "$C/up.pub"
}

# scratch_dir NAME: sets T, a fresh world-readable directory under /var/tmp
# (nginx workers read it), removed at exit unless KEEP=1, after stopping
# every process in PIDS.
scratch_dir() {
	T=$(mktemp -d "/var/tmp/cacheproxy-$1.XXXXXX")
	chmod 755 "$T"
	PIDS=()
	trap bench_cleanup EXIT
	trap 'exit 130' INT TERM
}
bench_cleanup() {
	local p
	for p in "${PIDS[@]}"; do stop_pid "$p"; done
	if [[ ${KEEP:-0} == 1 ]]; then log "kept $T"; else rm -rf "$T"; fi
}

since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.3f\n", e - s }'; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

# require TOOL[:PACKAGE]...: installs, as root and from Debian, the PACKAGE
# of each TOOL that is not on PATH, then stops naming any TOOL still missing
# (a TOOL without a PACKAGE is only checked).
require() {
	local spec need=()
	for spec; do
		[[ $spec == *:* ]] || continue
		command -v "${spec%%:*}" >/dev/null || need+=("${spec#*:}")
	done
	if ((${#need[@]})); then
		mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
		[[ $(id -u) == 0 ]] || die "missing ${need[*]}; run as root to install them"
		log "installing ${need[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get install -y "${need[@]}" >/dev/null 2>&1 ||
			{ apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
	fi
	for spec; do
		command -v "${spec%%:*}" >/dev/null || die "${spec%%:*} is not on PATH"
	done
}

# start_cacheproxy NAME UPSTREAM_URL EXTRA_TOML BINARY [VAR=VALUE...]: writes
# T/NAME.toml (free ports, a fresh state dir T/NAME-state, EXTRA_TOML at
# the top level, the upstream signed by UP_PUB), starts BINARY serve on it
# with the VAR=VALUE environment, and waits until both listeners answer.
# Sets PROXY_CFG, PROXY_PID, PROXY_URL, ADMIN_URL and TOKEN_FILE.
start_cacheproxy() {
	local name=$1 up=$2 extra=$3 bin=$4 port aport
	shift 4
	port=$(free_port)
	aport=$(free_port)
	while [[ $aport == "$port" ]]; do aport=$(free_port); done
	PROXY_CFG=$T/$name.toml
	rm -rf "${T:?}/$name-state"
	cat >"$PROXY_CFG" <<-EOF
		listen = "127.0.0.1:$port"
		state_dir = "$T/$name-state"
		$extra
		[[upstreams]]
		url = "$up"
		public_keys = ["$UP_PUB"]
		[admin]
		listen = "127.0.0.1:$aport"
	EOF
	env "$@" "$bin" serve -c "$PROXY_CFG" >>"$T/$name.log" 2>&1 &
	PROXY_PID=$!
	PIDS+=("$PROXY_PID")
	PROXY_URL=http://127.0.0.1:$port
	ADMIN_URL=http://127.0.0.1:$aport
	TOKEN_FILE=$T/$name-state/admin-token
	wait_http "$PROXY_URL/healthz" "$PROXY_PID" "$T/$name.log"
	wait_port "$aport"
}
