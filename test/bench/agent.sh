#!/usr/bin/env bash
# test/bench/agent.sh: the daemon figures of `make bench`, measured in one
# run (about 4 minutes), each next to a baseline from the same run:
#
#   1. gwagent's idle VmRSS/VmHWM after BENCH_IDLE seconds connected to a
#      local hub on loopback, next to the Debian mender-client 3.4 daemon
#      idling on the same machine (a temporary configuration pointed at a
#      closed port on 127.0.0.1; never the system service). Then, after the
#      idle window of 3. and at least 2m5s after the connection (the
#      runtime's periodic collection), a soak of BENCH_UPDATES updates of a
#      BENCH_IMAGE_MIB image one after another: VmRSS after the first and
#      after the last (each read BENCH_SETTLE seconds after it completed),
#      as a ratio to the idle VmRSS and to the VmRSS just before the soak.
#   2. The stripped binary size (-trimpath -ldflags '-s -w'), next to
#      /usr/bin/mender.
#   3. CPU time (utime+stime) and context switches over BENCH_WINDOW seconds
#      idle, and an strace of the idle minute: syscalls, bursts of activity
#      (wakeups) and the periods between them.
#   4. Direct method latency p50/p99 through the service REST API: an
#      unknown method (404 from the agent's router) idle and while an update
#      downloads slowly from a loopback server, and a second firmwareUpdate
#      (409) during that update.
#   5. The twin patch queue's throughput (twin's BenchmarkReport, with its
#      interleaved baseline).
#   6. Idle VmRSS per transport: BENCH_TRANSPORT_AGENTS agents over MQTT
#      (the baseline) and as many over MQTT over WebSocket (gwhub's HTTPS
#      port), connected to one local hub at once, read after
#      BENCH_TRANSPORT_IDLE seconds; medians, WebSocket as a ratio to MQTT.
#
# Knobs (environment): BENCH_IDLE (60), BENCH_WINDOW (60), BENCH_CALLS (200),
# BENCH_UPDATES (30; 0 skips the soak), BENCH_IMAGE_MIB (32), BENCH_SETTLE (5),
# BENCH_TRANSPORT_AGENTS (3; 0 skips 6.), BENCH_TRANSPORT_IDLE (30),
# BENCH_AGENT_ENV (extra KEY=VALUE,… for gwagent, for experiments),
# BENCH_NO_MENDER=1 (skip the baseline daemon), GO, BUILD.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GO=${GO:-go}
out=${BUILD:-$root/build}/bench
[[ $out = /* ]] || out=$root/$out
idle=${BENCH_IDLE:-60}
window=${BENCH_WINDOW:-60}
calls=${BENCH_CALLS:-200}
updates=${BENCH_UPDATES:-30}
image_mib=${BENCH_IMAGE_MIB:-32}
settle=${BENCH_SETTLE:-5}
soak_at=$((idle + window > 125 ? idle + window : 125)) # seconds after the connection
run_timeout=$((soak_at + 20 * updates + 2 * settle + 240)) # seconds; the program bounds itself too
transport_agents=${BENCH_TRANSPORT_AGENTS:-3}
transport_idle=${BENCH_TRANSPORT_IDLE:-30}

die() { echo "bench-agent: $*" >&2; exit 1; }
log() { echo "bench-agent: $*" >&2; }
[[ -r /proc/self/status ]] || die "/proc is needed"

# The baseline daemon and the tracer come from Debian. Installing
# mender-client creates the unit's enablement link; nothing here starts it
# as a service: it runs below as a child with its own temporary files.
sudo=
[[ $(id -u) = 0 ]] || sudo=sudo
missing=()
if [[ ${BENCH_NO_MENDER:-} != 1 ]] && ! command -v mender >/dev/null; then missing+=(mender-client); fi
command -v strace >/dev/null || missing+=(strace)
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi
mender_bin=
if [[ ${BENCH_NO_MENDER:-} != 1 ]]; then
	mender_bin=$(command -v mender) || die "mender not found after installing mender-client"
	mender --version 2>/dev/null | grep -q '^3\.4\.' || log "warning: mender is not 3.4: $(mender --version 2>&1 | head -1)"
fi

log "building into $out"
mkdir -p "$out"
(cd "$root" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags '-s -w' -o "$out/gwagent" ./cmd/gwagent)
(cd "$root" && "$GO" build -trimpath -o "$out/agentbench" ./test/bench/agent)

log "measuring (about $((soak_at + 3 * updates + 2 * settle + 30)) s)"
timeout --kill-after=10 "$run_timeout" "$out/agentbench" -gwagent "$out/gwagent" -mender "$mender_bin" \
	-strace "$(command -v strace)" -idle "${idle}s" -window "${window}s" -calls "$calls" \
	-updates "$updates" -image-size "$((image_mib << 20))" -settle "${settle}s" \
	-agent-env "${BENCH_AGENT_ENV:-}"

log "twin patch queue"
twin=$(cd "$root" && timeout 300 "$GO" test -run '^$' -bench Report -benchmem ./twin/) || die "twin benchmark failed: $twin"
cat <<EOF

  5. twin patch queue (go test -bench Report ./twin/): each patch validated and coalesced;
     a milestone is persisted (renameio + directory fsync) before Report returns, progress
     is kept in memory (the interleaved series times milestones against a bare durable write)
$(grep -E '^Benchmark' <<<"$twin" | awk '{
	name = $1; sub(/-[0-9]+$/, "", name); ps = ""; x = ""
	for (i = 2; i < NF; i++) { if ($(i+1) == "patches/s") ps = $i; if ($(i+1) == "x-baseline") x = $i }
	printf "     %-36s %10s patches/s%s\n", name, ps, (x != "" ? "   time/patch " x " x a bare durable write (interleaved, same run)" : "")
}')
EOF

if ((transport_agents > 0)); then
	log "idle memory per transport: $transport_agents agents each, ${transport_idle}s idle"
	timeout --kill-after=10 $((transport_idle + 150)) "$out/agentbench" -gwagent "$out/gwagent" \
		-transport-agents "$transport_agents" -idle "${transport_idle}s" -agent-env "${BENCH_AGENT_ENV:-}"
fi
