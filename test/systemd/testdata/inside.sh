#!/bin/bash
# The end-to-end checks, run inside the booted test container by
# gwagent-e2e.service. Inputs come from /mnt/in (env, gwctl, hub CA), the two
# packages from /mnt/pkg. Results go to /mnt/out:
#   results  one line per check: "ok NAME" or "FAIL NAME: why"; "done" at the end
#   figures  NAME=VALUE measurements
#   log      a trace of everything run; journal.txt and gwagent.txt at the end
# Every wait is bounded; a failed check is recorded and the run goes on where it
# can, so one run shows every problem.
set -u
exec >/mnt/out/log 2>&1
# shellcheck source=/dev/null
. /mnt/in/env

RESULTS=/mnt/out/results
FIGURES=/mnt/out/figures
: >"$RESULTS"
: >"$FIGURES"

pass() { echo "ok $1" >>"$RESULTS"; echo "--- ok $1"; }
fail() { echo "FAIL $1: $2" >>"$RESULTS"; echo "--- FAIL $1: $2"; }
figure() { echo "$1=$2" >>"$FIGURES"; echo "--- figure $1=$2"; }
# check NAME CMD...: the check passes when CMD succeeds.
check() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		pass "$name"
	else
		fail "$name" "$(printf '%q ' "$@")→ $(printf '%s' "$out" | tail -n 5 | tr '\n' ' ')"
	fi
}
# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds or time is up.
wait_for() {
	local deadline=$(($(date +%s) + $1))
	shift
	until "$@" >/dev/null 2>&1; do
		[ "$(date +%s)" -lt "$deadline" ] || return 1
		sleep 0.2
	done
}
prop() { systemctl show -P "$1" gwagent.service; }
is_prop() { [ "$(prop "$1")" = "$2" ]; }
status_matches() { prop StatusText | grep -Eiq "$1"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
gwctl() { IOTHUB_CONNECTION_STRING=$SERVICE_CONNECTION_STRING GWCTL_CA_FILE=/mnt/in/ca.pem /mnt/in/gwctl --endpoint "$HTTPS_ENDPOINT" "$@"; }
run() { echo "+ $*"; "$@"; }

# The rootfs is minbase: no netbase, so no /etc/hosts for "localhost".
echo '127.0.0.1 localhost' >/etc/hosts

echo "=== install $VERSION1"
check install dpkg -i "/mnt/pkg/$PKG1"
check installed-version [ "$(dpkg-query -W -f='${Version}' gwagent)" = "$VERSION1" ]
check enabled [ "$(systemctl is-enabled gwagent.service)" = enabled ]
check conffile sh -c "dpkg-query -W -f='\${Conffiles}' gwagent | grep -q ' /etc/gwagent/config.yaml '"
check binary-version sh -c "/usr/bin/gwagent version | grep -qF '$VERSION1'"
# systemd-analyze verify prints problems on stderr, sometimes with status 0.
# (--man=no: man-db is not in a minimal system; the page is checked by lintian.)
check unit-verify sh -c 'err=$(systemd-analyze verify --man=no gwagent.service 2>&1 >/dev/null); echo "$err"; [ -z "$err" ]'
exposure=$(systemd-analyze security gwagent.service | awk '/Overall exposure level/ {print $(NF-2)}')
figure exposure_online "$exposure"
check exposure-at-most-2.5 awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.5) }'
# The shipped configuration names a connection-string file that does not exist
# yet: the agent started on install must stop with EX_CONFIG (78), say which key
# is wrong, and not be restarted in a loop (RestartPreventExitStatus=78).
check unconfigured-exit-78 wait_for 20 is_prop ExecMainStatus 78
check unconfigured-not-restarted sh -c '[ "$(systemctl show -P NRestarts gwagent.service)" = 0 ] && [ "$(systemctl show -P ActiveState gwagent.service)" = failed ]'
check unconfigured-names-key sh -c 'journalctl -u gwagent.service --no-pager -o cat | grep -q "hub.connectionString"'
run systemctl show -p ActiveState,SubState,Result,ExecMainStatus,StatusText gwagent.service
run journalctl -u gwagent.service --no-pager -n 20 -o short-monotonic
systemctl stop gwagent.service
systemctl reset-failed gwagent.service 2>/dev/null

echo "=== configure"
install -m 0600 /dev/null /etc/gwagent/connection-string
printf '%s\n' "$DEVICE_CONNECTION_STRING" >/etc/gwagent/connection-string
install -m 0644 /mnt/in/ca.pem /etc/gwagent/hub-ca.pem
# A local edit of the conffile, made in place as an administrator would (the
# shipped file already has the top-level sections): it must survive the
# upgrade and the removal.
sed -i \
	-e 's|^  # caFile: ""$|  caFile: /etc/gwagent/hub-ca.pem|' \
	-e "s|^  # address: \"\"\$|  address: \"$MQTT_ADDR\"|" \
	-e 's|^  # type: simulated$|  type: simulated\n  simulated:\n    waitBeforeDownload: 1s\n    download: 1s\n    apply: 2s|' \
	-e 's|^  # allowUnsigned: auto$|  allowUnsigned: true|' \
	/etc/gwagent/config.yaml
check config-edit sh -c "grep -qx '  caFile: /etc/gwagent/hub-ca.pem' /etc/gwagent/config.yaml &&
	grep -qx '  address: \"$MQTT_ADDR\"' /etc/gwagent/config.yaml &&
	grep -qx '    waitBeforeDownload: 1s' /etc/gwagent/config.yaml &&
	grep -qx '  allowUnsigned: true' /etc/gwagent/config.yaml &&
	grep -qx '  connectionStringFile: /etc/gwagent/connection-string' /etc/gwagent/config.yaml"
config_sum=$(sha256sum /etc/gwagent/config.yaml)
run grep -v -e "^ *#" -e "^$" /etc/gwagent/config.yaml

echo "=== start with the hub unreachable: time to READY"
mkdir -p /run/systemd/system/gwagent.service.d
# Port 1 on loopback refuses connections: the hub is down.
printf '[Service]\nEnvironment=GWAGENT_HUB_ADDRESS=127.0.0.1:1\n' >/run/systemd/system/gwagent.service.d/unreachable.conf
systemctl daemon-reload
# Baseline: a Go program that only sends READY=1, in the same sandbox (the
# installed unit with another ExecStart). Started alternately with the agent so
# that both see the same machine load; the difference is the agent's own time.
sed -e 's|^ExecStart=.*|ExecStart=/mnt/in/notifyready|' -e '/^ExecReload=/d' \
	/lib/systemd/system/gwagent.service >/run/systemd/system/notifyready.service
systemctl daemon-reload
# ready_us UNIT: from the main process's start to READY (the unit turning active).
ready_us() { echo $(($(systemctl show -P ActiveEnterTimestampMonotonic "$1") - $(systemctl show -P ExecMainStartTimestampMonotonic "$1"))); }
median() { printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"; }
ms() { awk -v u="$1" 'BEGIN { printf "%.1f", u / 1000 }'; }
agent_us=()
base_us=()
own_us=()
wall_ms=()
runs=7
for i in $(seq $runs); do
	systemctl stop notifyready.service
	systemctl start notifyready.service || { fail "start-baseline-$i" "systemctl start notifyready failed"; continue; }
	b=$(ready_us notifyready.service)
	# Stopped first: a restart would also time the stop.
	t0=$(now_ms)
	systemctl stop gwagent.service
	stop_ms=$(($(now_ms) - t0))
	# These starts are a measurement, not a crash loop: keep them out of the
	# unit's start limit.
	systemctl reset-failed gwagent.service notifyready.service 2>/dev/null
	t0=$(now_ms)
	# Type=notify: start returns once the agent has sent READY=1.
	if ! systemctl start gwagent.service; then
		fail "start-offline-$i" "systemctl start failed"
		continue
	fi
	wall_ms+=($(($(now_ms) - t0)))
	a=$(ready_us gwagent.service)
	agent_us+=("$a")
	base_us+=("$b")
	own_us+=($((a - b)))
done
systemctl stop notifyready.service
if [ ${#agent_us[@]} -eq $runs ]; then
	pass start-offline
	figure ready_ms_median "$(ms "$(median "${agent_us[@]}")")"
	figure ready_ms_all "$(for u in "${agent_us[@]}"; do ms "$u"; echo; done | paste -sd,)"
	figure ready_baseline_ms_median "$(ms "$(median "${base_us[@]}")")"
	figure ready_own_ms_median "$(ms "$(median "${own_us[@]}")")"
	figure start_wall_ms_median "$(median "${wall_ms[@]}")"
	# The stop before the last start, of an agent that could not reach its hub.
	figure stop_offline_ms "$stop_ms"
fi
check offline-active is_prop ActiveState active
check offline-type-notify is_prop Type notify
check offline-status-text wait_for 10 sh -c '[ -n "$(systemctl show -P StatusText gwagent.service)" ]'
run systemctl status --no-pager gwagent.service
rm /run/systemd/system/gwagent.service.d/unreachable.conf
systemctl daemon-reload

echo "=== start against the hub"
check start systemctl restart gwagent.service
check active is_prop ActiveState active
check type-notify is_prop Type notify
check status-connected wait_for 30 status_matches '^connected'
run systemctl status --no-pager gwagent.service
run systemctl show -p ActiveState,Type,StatusText,NRestarts,MainPID gwagent.service

echo "=== firmware update"
update_out=$(gwctl update "$DEVICE_ID" --uri "$IMAGE_URL" --version "$IMAGE_VERSION" \
	--sha256 "$IMAGE_SHA256" --size "$IMAGE_SIZE" --watch --interval 250ms --timeout 120s 2>&1)
update_rc=$?
echo "$update_out"
check update-completed [ "$update_rc" = 0 ]
update_id=$(printf '%s\n' "$update_out" | awk '/^update .* accepted by / { print $2; exit }')
check update-id [ -n "$update_id" ]
echo "update id: $update_id"
journal_update() { journalctl -u gwagent.service --no-pager "UPDATE_ID=$update_id" "$@"; }
check journal-update-id sh -c "[ \$(journalctl -u gwagent.service --no-pager -o cat UPDATE_ID='$update_id' | wc -l) -ge 1 ]"
check journal-native-transport sh -c "journalctl -u gwagent.service -o export UPDATE_ID='$update_id' | grep -qx '_TRANSPORT=journal'"
check journal-phase-field sh -c "journalctl -u gwagent.service -o export UPDATE_ID='$update_id' | grep -q '^PHASE='"
check journal-identifier sh -c "journalctl -u gwagent.service -o export UPDATE_ID='$update_id' | grep -qx 'SYSLOG_IDENTIFIER=gwagent'"
run journal_update -o verbose -n 3
check status-after-update status_matches '^connected'
run systemctl show -p StatusText gwagent.service

echo "=== reload"
pid=$(prop MainPID)
# ExecReload sends SIGHUP through the shell's kill, inside the same sandbox.
check reload systemctl reload gwagent.service
check reload-same-process sh -c "[ \"\$(systemctl show -P MainPID gwagent.service)\" = '$pid' ] && [ \"\$(systemctl show -P ActiveState gwagent.service)\" = active ]"
run journalctl -u gwagent.service --no-pager -n 5 -o cat

echo "=== watchdog"
pid=$(prop MainPID)
restarts=$(prop NRestarts)
t0=$(now_ms)
# A stopped process sends no watchdog pings: systemd must kill and restart it.
kill -STOP "$pid"
restarted() { [ "$(prop NRestarts)" -gt "$restarts" ] && is_prop ActiveState active && [ "$(prop MainPID)" != "$pid" ]; }
if wait_for 120 restarted; then
	pass watchdog-restart
	figure watchdog_restart_s "$(awk -v ms=$(($(now_ms) - t0)) 'BEGIN { printf "%.1f", ms / 1000 }')"
else
	fail watchdog-restart "NRestarts=$(prop NRestarts) (was $restarts) ActiveState=$(prop ActiveState) MainPID=$(prop MainPID) (was $pid)"
	kill -CONT "$pid" 2>/dev/null
fi
check watchdog-logged sh -c "journalctl -u gwagent.service --no-pager -o cat | grep -q 'Watchdog timeout'"
check watchdog-reconnected wait_for 30 status_matches '^connected'

echo "=== stop"
t0=$(now_ms)
check stop systemctl stop gwagent.service
figure stop_ms $(($(now_ms) - t0))
check stopped-inactive is_prop ActiveState inactive
check stopped-clean is_prop Result success
check stopped-exit-0 is_prop ExecMainStatus 0
check state-kept sh -c '[ -d /var/lib/gwagent ] && [ -n "$(ls -A /var/lib/gwagent)" ]'
check state-private [ "$(stat -c %a /var/lib/gwagent)" = 700 ]
run ls -laR /var/lib/gwagent

echo "=== upgrade to $VERSION2"
check restart-before-upgrade systemctl start gwagent.service
old_pid=$(prop MainPID)
check upgrade dpkg -i "/mnt/pkg/$PKG2"
check upgraded-version [ "$(dpkg-query -W -f='${Version}' gwagent)" = "$VERSION2" ]
check upgraded-binary sh -c "/usr/bin/gwagent version | grep -qF '$VERSION2'"
check conffile-kept [ "$(sha256sum /etc/gwagent/config.yaml)" = "$config_sum" ]
check no-conffile-leftovers sh -c '! ls /etc/gwagent/config.yaml.dpkg-* 2>/dev/null | grep -q .'
check upgrade-restarted sh -c "[ \"\$(systemctl show -P MainPID gwagent.service)\" != '$old_pid' ] && [ \"\$(systemctl show -P MainPID gwagent.service)\" != 0 ]"
check upgrade-active wait_for 10 is_prop ActiveState active
check upgrade-runs-new-binary sh -c '[ "$(readlink /proc/$(systemctl show -P MainPID gwagent.service)/exe)" = /usr/bin/gwagent ]'
check upgrade-connected wait_for 30 status_matches '^connected'
last_pid=$(prop MainPID)

echo "=== remove"
check remove dpkg -r gwagent
check removed-stopped sh -c "[ ! -e /proc/$last_pid ] && [ \"\$(systemctl show -P ActiveState gwagent.service)\" = inactive ]"
check removed-status [ "$(dpkg-query -W -f='${Status}' gwagent)" = "deinstall ok config-files" ]
check removed-binary-gone [ ! -e /usr/bin/gwagent ]
check removed-conffile-kept [ "$(sha256sum /etc/gwagent/config.yaml)" = "$config_sum" ]
check removed-state-kept [ -d /var/lib/gwagent ]

echo "=== purge"
check purge dpkg -P gwagent
check purged-status sh -c '! dpkg-query -W -f="\${Status}" gwagent 2>/dev/null | grep -q installed'
check purged-config-gone [ ! -e /etc/gwagent ]
check purged-state-gone [ ! -e /var/lib/gwagent ]
check purged-unit-links-gone sh -c '! ls /etc/systemd/system/*/gwagent.service /etc/systemd/system/gwagent.service /var/lib/systemd/deb-systemd-helper-*/gwagent.service* 2>/dev/null | grep -q .'

journalctl -b --no-pager -o short-monotonic >/mnt/out/journal.txt 2>&1
journalctl -u gwagent.service --no-pager -o short-monotonic >/mnt/out/gwagent.txt 2>&1
echo "done" >>"$RESULTS"
