#!/usr/bin/env bash
# make demo: a local hub, an agent and a firmware update watched to completion,
# all on this machine, with no cloud account. Everything runs from a temporary
# folder and is stopped on exit. Usage: test/demo/run.sh [BUILD_DIR]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${1:-$root/build}
device=${DEMO_DEVICE:-gw-demo-01}
version=${DEMO_VERSION:-2.0.0}
keep=${DEMO_KEEP:-0}

command -v python3 >/dev/null || { echo "demo: python3 is needed (apt-get install python3)" >&2; exit 1; }
for b in gwhub gwagent gwctl; do
	[ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run 'make build' first" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/gwagent-demo.XXXXXX")
hub_pid='' agent_pid=''
cleanup() {
	local rc=$?
	for pid in $agent_pid $hub_pid; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in $agent_pid $hub_pid; do
		# Bounded: a process that does not stop within 10 s is killed.
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	done
	if [ "$rc" -ne 0 ]; then
		echo; echo "demo: failed (exit $rc). Last lines of the logs:"
		echo "--- gwhub ($work/hub.log)"; tail -n 20 "$work/hub.log" 2>/dev/null || true
		echo "--- gwagent ($work/agent.log)"; tail -n 30 "$work/agent.log" 2>/dev/null || true
		keep=1
	fi
	if [ "$keep" = 1 ]; then echo "demo: files kept in $work"; else rm -rf "$work"; fi
	exit "$rc"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
	local secs=$1 what=$2; shift 2
	for _ in $(seq $((secs * 10))); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "demo: timed out after ${secs}s waiting for $what" >&2
	return 1
}

# reported DEVICE: the tutorial's reported fields and the firmware detail.
reported() {
	"$bin/gwctl" twin show "$1" | python3 -c '
import json, sys
t = json.load(sys.stdin)
r = t["properties"]["reported"]
print("  connectionState      ", t.get("connectionState"))
for k in ("firmwareStatus", "logTime", "downloadComplete", "startedApplyingImage", "lastFirmwareUpdate"):
    if k in r:
        print("  %-21s %s" % (k, r[k]))
fw = r.get("firmware") or {}
for k in ("currentVersion", "targetVersion", "updateId", "error"):
    if fw.get(k) is not None:
        print("  firmware.%-12s %s" % (k, fw[k]))
'
}

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
mqtt_port=$(free_port)
https_port=$(free_port)

step "Starting gwhub, a local IoT hub (MQTT on 127.0.0.1:$mqtt_port, REST on 127.0.0.1:$https_port)"
mkdir -p "$work/files"
"$bin/gwhub" run --state-dir "$work/hub" --hostname localhost \
	--mqtt-addr "127.0.0.1:$mqtt_port" --https-addr "127.0.0.1:$https_port" \
	--files "$work/files" --log-format console >"$work/hub.log" 2>&1 &
hub_pid=$!
wait_for 15 "gwhub to start" test -s "$work/hub/service-connection-string"
wait_for 15 "gwhub's REST API" bash -c "exec 3<>/dev/tcp/127.0.0.1/$https_port"

export IOTHUB_CONNECTION_STRING
IOTHUB_CONNECTION_STRING=$(cat "$work/hub/service-connection-string")
export GWCTL_CA_FILE="$work/hub/ca.pem" GWCTL_ENDPOINT="https://127.0.0.1:$https_port"

step "Registering device $device"
echo "\$ gwctl device add $device"
device_cs=$("$bin/gwctl" device add "$device")
echo "${device_cs%%SharedAccessKey=*}SharedAccessKey=…"

step "Publishing firmware $version as an image the hub serves"
image="$work/files/gw-firmware-$version.bin"
head -c $((4 * 1024 * 1024)) /dev/urandom >"$image"
sha=$(sha256sum "$image" | cut -d' ' -f1)
uri="https://127.0.0.1:$https_port/files/$(basename "$image")"
echo "$uri ($(stat -c %s "$image") bytes, sha256 $sha)"

step "Starting gwagent with the simulated installer (configs/dev.yaml)"
GWAGENT_HUB_CONNECTIONSTRING="$device_cs" "$bin/gwagent" run --config "$root/configs/dev.yaml" \
	--ca-file "$work/hub/ca.pem" --hub-address "127.0.0.1:$mqtt_port" \
	--state-dir "$work/agent" --log-format console >"$work/agent.log" 2>&1 &
agent_pid=$!
connected() { "$bin/gwctl" twin show "$device" | grep -q '"firmwareStatus": "standBy"'; }
wait_for 30 "gwagent to connect and report standBy" connected
reported "$device"

step "Updating $device to $version and watching it"
size=$(stat -c %s "$image")
echo "\$ gwctl update $device --uri $uri --version $version --size $size --sha256 ${sha:0:12}… --watch"
"$bin/gwctl" update "$device" --uri "$uri" --version "$version" --size "$size" --sha256 "$sha" --watch --timeout 2m

step "The device twin now says"
reported "$device"

step "What gwagent logged"
grep -E 'update phase|update completed|image verified' "$work/agent.log" | cut -c1-160 || true

step "Stopping gwagent and gwhub"
kill -TERM "$agent_pid"; wait "$agent_pid" || { echo "gwagent did not stop cleanly" >&2; exit 1; }
agent_pid=''
kill -TERM "$hub_pid"; wait "$hub_pid" || { echo "gwhub did not stop cleanly" >&2; exit 1; }
hub_pid=''
echo "demo: done — the update went from standBy to completed."
