#!/bin/sh
# cacheproxy rebuilder hook: a Nix post-build-hook that attests every path
# this machine builds. For each build, Nix runs it with $OUT_PATHS (the
# outputs just built) and $DRV_PATH; it signs the outputs with the
# rebuilder key and posts `nix path-info --json --sigs` for them to
# cacheproxy's admin API (POST /admin/v1/attestations) with the
# rebuilder's own admin token, so that the audit trail names the rebuilder.
#
# Install (nix.conf of the rebuilder, or NixOS nix.settings):
#   post-build-hook = /etc/cacheproxy/post-build-hook.sh
#
# Settings, from the environment or from the file named by
# $CACHEPROXY_HOOK_CONFIG (default /etc/cacheproxy/rebuilder-hook.env,
# read when it exists; KEY=value lines, sourced by sh):
#   CACHEPROXY_ADMIN_URL            admin API, default http://127.0.0.1:5481;
#                                   off this machine it must be https://
#   CACHEPROXY_TOKEN_FILE           the rebuilder's admin token ([[admin.tokens]] file)
#   CACHEPROXY_REBUILDER_KEY_FILE   the rebuilder's secret key (nix-store --generate-binary-cache-key)
#   CACHEPROXY_CA_FILE              optional: CA or self-signed certificate (PEM) of an https admin API
#   CACHEPROXY_REASON               optional: reason kept in the audit trail (default: the .drv built)
#
# Nix stops building when a post-build-hook fails, so a failure here is
# loud: an attestation that did not land is a path the fleet cannot get.
# The hook exits 1 when the admin API cannot be reached, refuses the
# token, or stores nothing for a path (a key missing from policy.attesters,
# a signature that does not verify).
#
# `nix store sign` and `nix path-info` are "new" nix commands: the hook
# enables nix-command itself, for Nix versions where it is experimental.
set -eu
set -f # $OUT_PATHS is split on spaces, never globbed

conf=${CACHEPROXY_HOOK_CONFIG:-/etc/cacheproxy/rebuilder-hook.env}
if [ -r "$conf" ]; then
	# shellcheck disable=SC1090
	. "$conf"
fi
# Nix may run the hook with a bare PATH (the daemon's).
PATH=$PATH:/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/bin:/bin

url=${CACHEPROXY_ADMIN_URL:-http://127.0.0.1:5481}
url=${url%/}
token_file=${CACHEPROXY_TOKEN_FILE:?set CACHEPROXY_TOKEN_FILE to the rebuilder\'s admin token file}
key_file=${CACHEPROXY_REBUILDER_KEY_FILE:?set CACHEPROXY_REBUILDER_KEY_FILE to the rebuilder\'s secret key file}
reason=${CACHEPROXY_REASON:-post-build-hook: built ${DRV_PATH:-?}}

log() { echo "cacheproxy post-build-hook: $*" >&2; }

# Some Nix versions run the hook with $OUT_PATHS empty: 2.8.0 always
# (NixOS/nix#6446), 2.30 and 2.31 for rebuilds with --check or --rebuild
# (NixOS/nix#14287), which is what a rebuilder runs. The outputs of
# $DRV_PATH that exist are the paths just built, then.
if [ -z "${OUT_PATHS:-}" ] && [ -n "${DRV_PATH:-}" ]; then
	OUT_PATHS=
	for p in $(nix-store --query --outputs "$DRV_PATH"); do
		if [ -e "$p" ]; then
			OUT_PATHS="$OUT_PATHS${OUT_PATHS:+ }$p"
		fi
	done
fi
if [ -z "${OUT_PATHS:-}" ]; then
	exit 0
fi

# The token changes what the whole fleet gets: in clear text it may only
# travel within this machine (as for cacheproxy's own admin commands).
case $url in
https://*) ;;
http://*)
	hostport=${url#http://}
	hostport=${hostport%%/*}
	case $hostport in
	\[*) host=${hostport%%]*}] ;;
	*) host=${hostport%:*} ;;
	esac
	if ! printf '%s\n' "$host" | grep -Eqx 'localhost|\[::1\]|127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}'; then
		log "refusing to send the admin token to $url in clear text; use https://"
		exit 1
	fi
	;;
*)
	log "CACHEPROXY_ADMIN_URL $url: want http:// (loopback only) or https://"
	exit 1
	;;
esac

for f in "$token_file" "$key_file"; do
	if [ ! -r "$f" ]; then
		log "cannot read $f"
		exit 1
	fi
done

nix() { command nix --extra-experimental-features nix-command "$@"; }

# shellcheck disable=SC2086 # one argument per path
nix store sign --key-file "$key_file" $OUT_PATHS

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
nix path-info --json --sigs $OUT_PATHS >"$tmp/paths.json"

# The token goes to curl on its standard input (a config line), never on
# its command line, where any user could read it.
token=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$token_file")
esc() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }
query=$(printf '%s' "$reason" | od -An -tx1 -v | tr -d ' \n' | sed 's/../%&/g')
set -- --silent --show-error --noproxy '*' --max-time 300 -X POST \
	--data-binary "@$tmp/paths.json" -o "$tmp/answer" -w '%{http_code}' -K -
if [ -n "${CACHEPROXY_CA_FILE:-}" ]; then
	set -- "$@" --cacert "$CACHEPROXY_CA_FILE"
fi
status=$(printf 'header = "Authorization: Bearer %s"\nurl = "%s"\n' "$(esc "$token")" \
	"$(esc "$url/admin/v1/attestations?reason=$query")" | curl "$@") || {
	log "POST $url/admin/v1/attestations failed (curl exit $?)"
	exit 1
}
case $status in
2??) ;;
*)
	log "admin API answered $status: $(cat "$tmp/answer")"
	exit 1
	;;
esac
if grep -q -e '"status": *"no_attester_signature"' -e '"status": *"bad_signature"' "$tmp/answer"; then
	log "some signatures were not stored (is this key in policy.attesters?):"
	cat "$tmp/answer" >&2
	exit 1
fi
log "attested $OUT_PATHS"
