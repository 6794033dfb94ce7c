#!/usr/bin/env bash
# Interop tests: the official Azure IoT SDKs for Node.js against gwhub (and,
# when its scenario is present, gwagent through gwhub).
#
# Builds gwhub, starts it in a fresh state folder on 127.0.0.1:8883 (MQTT/TLS)
# and 127.0.0.1:443 (HTTPS, plus MQTT over WebSocket) with --hostname localhost — the SDKs take no port
# in HostName, so these are the ports they dial — trusts its CA through
# NODE_EXTRA_CA_CERTS, runs the scenarios with node's built-in test runner and
# stops gwhub by its PID. Exits non-zero on any failure.
#
# Needs: Go, Node 20+, root (ports below 1024), `npm ci` done in this folder
# (done here when node_modules is missing).
# Environment: BUILD (folder for binaries; default: a temporary one),
# INTEROP_KEEP=1 keeps the temporary folder (hub state and logs) for a look.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

mqtt_port=8883
https_port=443
ready_timeout_s=30
stop_timeout_s=10

log() { printf 'interop: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || die "go not found in PATH"
command -v node >/dev/null || die "node not found in PATH"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || die "node $(node --version) is too old: need 20 or newer"

work=$(mktemp -d -t gwinterop.XXXXXX)
BUILD=${BUILD:-$work/bin}
state=$work/hub-state
hub_log=$work/gwhub.log
hub_pid=

stop_hub() {
	[ -n "$hub_pid" ] || return 0
	if kill -0 "$hub_pid" 2>/dev/null; then
		kill -TERM "$hub_pid" 2>/dev/null || true
		for _ in $(seq $((stop_timeout_s * 10))); do
			kill -0 "$hub_pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$hub_pid" 2>/dev/null; then
			log "gwhub (pid $hub_pid) did not stop within ${stop_timeout_s}s after SIGTERM; killing it"
			kill -KILL "$hub_pid" 2>/dev/null || true
		fi
	fi
	wait "$hub_pid" 2>/dev/null || true
	hub_pid=
}

cleanup() {
	local rc=$?
	stop_hub
	if [ "$rc" -ne 0 ] && [ -s "$hub_log" ]; then
		log "gwhub log (last 200 lines of $hub_log):"
		tail -n 200 "$hub_log" >&2 || true
	fi
	if [ "${INTEROP_KEEP:-}" = 1 ] || { [ "$rc" -ne 0 ] && [ -e "$hub_log" ]; }; then
		log "kept $work"
	else
		rm -rf "$work"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# port_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
	timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

if [ ! -d "$here/node_modules" ]; then
	log "node_modules missing: npm ci"
	(cd "$here" && npm ci --no-audit --no-fund)
fi

for p in "$mqtt_port" "$https_port"; do
	if port_open "$p"; then
		die "127.0.0.1:$p is already in use; the SDKs can only reach the hub on that port"
	fi
done

mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
log "building gwhub and gwctl into $BUILD"
(cd "$root" && go build -o "$BUILD/gwhub" ./cmd/gwhub)
# The DPS scenario checks gwctl dps derive-key against the SDK's derivation.
(cd "$root" && go build -o "$BUILD/gwctl" ./cmd/gwctl)
export GWCTL_BIN=$BUILD/gwctl

# The gwagent scenario runs when it exists (it needs the agent binary too).
scenarios=("$here/gwhub.test.mjs" "$here/jobs.test.mjs" "$here/dps.test.mjs" "$here/dps-x509.test.mjs")
if [ -f "$here/gwagent.test.mjs" ]; then
	log "building gwagent into $BUILD"
	(cd "$root" && go build -o "$BUILD/gwagent" ./cmd/gwagent)
	export GWAGENT_BIN=$BUILD/gwagent
	scenarios+=("$here/gwagent.test.mjs")
fi

mkdir -p "$state"
log "starting gwhub (state in $state)"
started=$(date +%s%N)
"$BUILD/gwhub" run --state-dir "$state" \
	--mqtt-addr "127.0.0.1:$mqtt_port" --https-addr "127.0.0.1:$https_port" \
	--hostname localhost --ws >"$hub_log" 2>&1 &
hub_pid=$!

ready=0
for _ in $(seq $((ready_timeout_s * 10))); do
	kill -0 "$hub_pid" 2>/dev/null || die "gwhub exited during start-up"
	if [ -s "$state/ca.pem" ] && [ -s "$state/service-connection-string" ] &&
		port_open "$mqtt_port" && port_open "$https_port"; then
		ready=1
		break
	fi
	sleep 0.1
done
[ "$ready" = 1 ] || die "gwhub not ready within ${ready_timeout_s}s (ca.pem, service-connection-string, ports $mqtt_port and $https_port)"
log "gwhub ready in $((($(date +%s%N) - started) / 1000000)) ms (pid $hub_pid)"

export NODE_EXTRA_CA_CERTS=$state/ca.pem
IOTHUB_CONNECTION_STRING=$(tr -d '\r\n' <"$state/service-connection-string")
export IOTHUB_CONNECTION_STRING
export GWHUB_STATE_DIR=$state GWHUB_LOG=$hub_log
# gwhub is also a DPS instance on the same host name and ports.
DPS_CONNECTION_STRING=$(tr -d '\r\n' <"$state/dps-connection-string")
DPS_ID_SCOPE=$(tr -d '\r\n' <"$state/dps-id-scope")
export DPS_CONNECTION_STRING DPS_ID_SCOPE

cd "$here"
node --test --test-reporter=spec --test-concurrency=1 --test-timeout=300000 "${scenarios[@]}"

kill -0 "$hub_pid" 2>/dev/null || die "gwhub died during the scenarios"
