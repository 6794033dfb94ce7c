#!/bin/bash
# The end-to-end checks, run inside the booted test container by
# gwagent-e2e.service. Inputs come from /mnt/in (env, gwctl, hub CA), the two
# packages from /mnt/pkg. Results go to /mnt/out:
#   results  one line per check: "ok NAME" or "FAIL NAME: why"; "done" at the end
#   figures  NAME=VALUE measurements
#   log      a trace of everything run; journal.txt and gwagent.txt at the end
#   stage    where to go on after the container rebooted (the A/B update
#            reboots it through the agent; the test boots it again)
# Every wait is bounded; a failed check is recorded and the run goes on where it
# can, so one run shows every problem.
set -u
exec >>/mnt/out/log 2>&1
# shellcheck source=/dev/null
. /mnt/in/env

RESULTS=/mnt/out/results
FIGURES=/mnt/out/figures
STAGE=/mnt/out/stage
stage=$(cat "$STAGE" 2>/dev/null || true)
if [ -z "$stage" ]; then
	: >"$RESULTS"
	: >"$FIGURES"
fi
echo "=== boot $(cat /run/e2e/boot_id 2>/dev/null), stage '${stage:-start}'"

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
# devices: what the unit's device cgroup allows beyond the pseudo devices,
# on one line (char-rtc r comes with ProtectClock=).
devices() { prop DeviceAllow | grep -vx 'char-rtc r' | paste -sd ' '; }
is_prop() { [ "$(prop "$1")" = "$2" ]; }
status_matches() { prop StatusText | grep -Eiq "$1"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
gwctl() { IOTHUB_CONNECTION_STRING=$SERVICE_CONNECTION_STRING IOTHUB_DPS_CONNECTION_STRING=$DPS_CONNECTION_STRING GWCTL_CA_FILE=/mnt/in/ca.pem /mnt/in/gwctl --endpoint "$HTTPS_ENDPOINT" "$@"; }
run() { echo "+ $*"; "$@"; }

# The rootfs is minbase: no netbase, so no /etc/hosts for "localhost".
echo '127.0.0.1 localhost' >/etc/hosts

phase_install() {
echo "=== install $VERSION1"
# What an earlier version that ran as root leaves in its state directory:
# systemd must hand it to the agent's user.
install -d -m 0700 /var/lib/gwagent /var/lib/gwagent/firmware
# What the A/B phase needs on /boot: a kernel the agent must not touch and
# the GRUB environment block it switches (slot A committed).
mkdir -p /boot/grub
head -c 4096 /dev/urandom >/boot/vmlinuz-6.1.0-e2e
grub-editenv /boot/grub/grubenv create
grub-editenv /boot/grub/grubenv set gw_slot=A upgrade_available=0 bootcount=0 bootlimit=3
check install dpkg -i "/mnt/pkg/$PKG1"
check user-created sh -c 'getent passwd gwagent | awk -F: '"'"'{ exit !($3 > 0 && $3 < 1000 && $7 == "/usr/sbin/nologin") }'"'"' && getent group gwagent'
check polkit-rule-installed test -f /usr/share/polkit-1/rules.d/10-gwagent.rules
check installed-version [ "$(dpkg-query -W -f='${Version}' gwagent)" = "$VERSION1" ]
check enabled [ "$(systemctl is-enabled gwagent.service)" = enabled ]
check conffile sh -c "dpkg-query -W -f='\${Conffiles}' gwagent | grep -q ' /etc/gwagent/config.yaml '"
check binary-version sh -c "/usr/bin/gwagent version | grep -qF '$VERSION1'"
# systemd-analyze verify prints problems on stderr, sometimes with status 0.
# (--man=no: man-db is not in a minimal system; the page is checked by lintian.)
check unit-verify sh -c 'err=$(systemd-analyze verify --man=no gwagent.service 2>&1 >/dev/null); echo "$err"; [ -z "$err" ]'
exposure=$(systemd-analyze security gwagent.service | awk '/Overall exposure level/ {print $(NF-2)}')
figure exposure_online "$exposure"
check exposure-at-most-1.5 awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 1.5) }'
# The shipped configuration names a connection-string file that does not exist
# yet: the agent started on install must stop with EX_CONFIG (78), say which key
# is wrong, and not be restarted in a loop (RestartPreventExitStatus=78).
check unconfigured-exit-78 wait_for 20 is_prop ExecMainStatus 78
check unconfigured-not-restarted sh -c '[ "$(systemctl show -P NRestarts gwagent.service)" = 0 ] && [ "$(systemctl show -P ActiveState gwagent.service)" = failed ]'
check unconfigured-names-key sh -c 'journalctl -u gwagent.service --no-pager -o cat | grep -q "hub.connectionString"'
run systemctl show -p ActiveState,SubState,Result,ExecMainStatus,StatusText gwagent.service
run journalctl -u gwagent.service --no-pager -n 20 -o short-monotonic
check unconfigured-grant-said sh -c 'journalctl -u gwagent.service --no-pager -o cat | grep -q "grant-access: nothing granted"'
systemctl stop gwagent.service
systemctl reset-failed gwagent.service 2>/dev/null
}

phase_configure() {
echo "=== configure"
configure config-edit
}

# configure CHECK: configure the installed package as an operator would,
# following the documentation of the version before this one (the
# connection string root:root 0600).
configure() {
install -m 0600 /dev/null /etc/gwagent/connection-string
printf '%s\n' "$DEVICE_CONNECTION_STRING" >/etc/gwagent/connection-string
install -m 0644 /mnt/in/ca.pem /etc/gwagent/hub-ca.pem
# A local edit of the conffile, made in place as an administrator would (the
# shipped file already has the top-level sections): it must survive the
# upgrade and the removal. The installer is chosen explicitly: the shipped
# file selects abpart (and the root-run version's left it commented out),
# and these first updates are the simulated installer's.
sed -i \
	-e 's|^  # caFile: ""$|  caFile: /etc/gwagent/hub-ca.pem|' \
	-e "s|^  # address: \"\"\$|  address: \"$MQTT_ADDR\"|" \
	-e 's|^  # type: simulated$|  type: simulated\n  simulated:\n    waitBeforeDownload: 1s\n    download: 1s\n    apply: 2s|' \
	-e 's|^  type: abpart$|  type: simulated\n  simulated:\n    waitBeforeDownload: 1s\n    download: 1s\n    apply: 2s|' \
	-e 's|^  # allowUnsigned: auto$|  allowUnsigned: true|' \
	/etc/gwagent/config.yaml
check "$1" sh -c "grep -qx '  caFile: /etc/gwagent/hub-ca.pem' /etc/gwagent/config.yaml &&
	grep -qx '  address: \"$MQTT_ADDR\"' /etc/gwagent/config.yaml &&
	grep -qx '    waitBeforeDownload: 1s' /etc/gwagent/config.yaml &&
	grep -qx '  allowUnsigned: true' /etc/gwagent/config.yaml &&
	grep -qx '  connectionStringFile: /etc/gwagent/connection-string' /etc/gwagent/config.yaml"
run grep -v -e "^ *#" -e "^$" /etc/gwagent/config.yaml
}

phase_offline() {
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
}

phase_start() {
echo "=== start against the hub"
check start systemctl restart gwagent.service
check active is_prop ActiveState active
check type-notify is_prop Type notify
check status-connected wait_for 30 status_matches '^connected'
# The installer in use is on the status line: this one writes nothing.
check status-names-installer status_matches '; installer simulated \(writes nothing'
run systemctl status --no-pager gwagent.service
run systemctl show -p ActiveState,Type,StatusText,NRestarts,MainPID gwagent.service
# The process itself, seen from outside: the agent's user, no capability.
pid=$(prop MainPID)
ids() { awk -v k="$1:" '$1 == k { print $2, $3, $4, $5 }' "/proc/$pid/status"; }
uid=$(id -u gwagent) gid=$(getent group gwagent | cut -d: -f3)
check runs-as-gwagent sh -c "[ '$(ids Uid)' = '$uid $uid $uid $uid' ] && [ '$(ids Gid)' = '$gid $gid $gid $gid' ] && awk '/^Groups:/ { for (i = 2; i <= NF; i++) if (\$i != $gid) exit 1 }' /proc/$pid/status"
check no-capabilities sh -c "grep -Eq '^CapEff:[[:space:]]+0+\$' /proc/$pid/status && grep -Eq '^CapBnd:[[:space:]]+0+\$' /proc/$pid/status"
check state-handed-over sh -c '[ -z "$(find /var/lib/gwagent ! -user gwagent -print -quit)" ] && [ -z "$(find /var/lib/gwagent ! -group gwagent -print -quit)" ]'
# The connection string stays root:root 0600; an ACL entry lets the agent's
# group read it, which the agent does not take for a leak.
check secret-acl sh -c 'getfacl -cp /etc/gwagent/connection-string | grep -qx "group:gwagent:r--" && [ "$(stat -c %U:%G /etc/gwagent/connection-string)" = root:root ]'
check secret-no-warning sh -c '! journalctl -u gwagent.service --no-pager -o cat | grep -q "is readable by"'
check device-cgroup-empty [ -z "$(devices)" ]
}

phase_update() {
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
}

phase_reload() {
echo "=== reload"
pid=$(prop MainPID)
# ExecReload sends SIGHUP through the shell's kill, inside the same sandbox.
check reload systemctl reload gwagent.service
check reload-same-process sh -c "[ \"\$(systemctl show -P MainPID gwagent.service)\" = '$pid' ] && [ \"\$(systemctl show -P ActiveState gwagent.service)\" = active ]"
run journalctl -u gwagent.service --no-pager -n 5 -o cat
}

phase_watchdog() {
echo "=== watchdog"
pid=$(prop MainPID)
if [ "$pid" = 0 ]; then
	# kill -STOP 0 would stop this script.
	fail watchdog-restart "the agent is not running"
	return
fi
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
}

# probe TAG RUNNING INACTIVE: restart the agent with testdata/probe.sh as one
# more ExecStartPre= (a drop-in that adds only that and its environment), so
# it runs as the unit's user in the unit's sandbox after the unit's own
# grant-access step, and turn its journal lines into checks priv-TAG-NAME.
probe() {
	local tag=$1 running=$2 inactive=$3 out
	check "priv-$tag-start" probe_run "$tag" "$running" "$inactive"
	out=$(probe_output "$tag")
	printf '%s\n' "$out"
	while read -r _ _ verdict name rest; do
		case $verdict in
		ok) pass "priv-$tag-$name" ;;
		FAIL) fail "priv-$tag-${name%:}" "$rest" ;;
		esac
	done <<<"$out"
	# What systemd-run would have run as root, had polkit let it.
	check "priv-$tag-no-escape" sh -c "[ ! -e /var/lib/probe-escaped ] && [ -z \"\$(systemctl list-units --all --no-legend 'probe-escape-*')\" ]"
	# The device cgroup allows the inactive slot only.
	check "priv-$tag-devices" [ "$(devices)" = "$inactive rw" ]
	check "priv-$tag-connected" wait_for 30 status_matches '^connected'
}

# probe_run TAG RUNNING INACTIVE: restart the agent with the probe.
probe_run() {
	mkdir -p /run/systemd/system/gwagent.service.d
	cat >/run/systemd/system/gwagent.service.d/probe.conf <<EOT
[Service]
Environment=PROBE_TAG=$1 PROBE_RUNNING=$2 PROBE_INACTIVE=$3 PROBE_OTHER=$OTHER_DISK
ExecStartPre=/bin/bash /mnt/test/probe.sh
EOT
	systemctl daemon-reload
	systemctl restart gwagent.service
	local rc=$?
	rm /run/systemd/system/gwagent.service.d/probe.conf
	systemctl daemon-reload
	return $rc
}

probe_output() { journalctl -b -u gwagent.service --no-pager -o cat | grep "^probe $1 "; }

phase_ab_start() {
echo "=== A/B update: configure abpart"
# The two slots are loop devices attached outside (nodes made by
# e2e-boot.sh), the GRUB environment the file /boot/grub/grubenv that the
# real grub-editenv edits, and the running slot the gwagent.slot= that the
# stand-in boot loader writes to /run/e2e/cmdline (the container's
# /proc/cmdline is the host's). The image is unsigned (allowUnsigned: true
# above): signatures are not what this test is about.
sed -i -e "s|^  type: simulated\$|  type: abpart\n  abpart:\n    slotA: $SLOT_A\n    slotB: $SLOT_B\n    cmdlinePath: /run/e2e/cmdline\n    bootIdPath: /run/e2e/boot_id\n    bootenv:\n      backend: grub|" \
	/etc/gwagent/config.yaml
check ab-config sh -c "grep -qx '  type: abpart' /etc/gwagent/config.yaml && grep -qx '    slotB: $SLOT_B' /etc/gwagent/config.yaml"
run grep -v -e "^ *#" -e "^$" /etc/gwagent/config.yaml
run gwagent access --config /etc/gwagent/config.yaml
run systemctl is-system-running
run systemctl --failed --no-legend
probe a "$SLOT_A" "$SLOT_B"
run getfacl -p "$SLOT_A" "$SLOT_B" "$OTHER_DISK" /boot/grub/grubenv

echo "=== A/B update: write slot B, switch GRUB, reboot through logind"
now_ms >/mnt/out/ab-t0
update_out=$(gwctl update "$DEVICE_ID" --uri "$IMAGE_URL" --version "$IMAGE_VERSION" \
	--sha256 "$IMAGE_SHA256" --size "$IMAGE_SIZE" 2>&1)
echo "$update_out"
# Without --watch gwctl prints the update id alone.
ab_id=$(printf '%s\n' "$update_out" | grep -Ex -m1 '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}')
check ab-accepted [ -n "$ab_id" ]
echo "$ab_id" >/mnt/out/ab-update-id
# The agent writes slot B, reads it back, switches GRUB and asks logind for
# the reboot: the container reboots, this script ends with it, and the test
# boots the container again, which goes on with the next stage.
echo ab-rebooting >"$STAGE"
touch /run/e2e/expect-reboot
sleep 180
fail ab-rebooted "no reboot within 180 s of the update: $(journalctl -u gwagent.service --no-pager -o cat -n 15 | tr '\n' ' ')"
rm -f "$STAGE" /run/e2e/expect-reboot
}

phase_ab_after_reboot() {
echo "=== A/B update: after the reboot"
rm -f "$STAGE"
ab_id=$(cat /mnt/out/ab-update-id)
pass ab-rebooted
logind_reboot=$(journalctl -b -1 -u systemd-logind.service -o short-unix --no-pager | awk '/System is rebooting/ { print $1; exit }')
[ -n "$logind_reboot" ] && figure ab_update_to_reboot_s "$(awk -v a="$(cat /mnt/out/ab-t0)" -v b="$logind_reboot" 'BEGIN { printf "%.2f", b - a / 1000 }')"
run journalctl -b -1 -u gwagent.service --no-pager -o cat -n 40
# The previous boot, from its journal: the agent wrote the inactive slot,
# armed the trial and logind (asked by the agent's user, allowed by polkit)
# rebooted; the agent stopped cleanly on the way down.
check ab-slot-written sh -c "journalctl -b -1 -u gwagent.service -o cat SLOT=B UPDATE_ID='$ab_id' | grep -q 'writing slot'"
check ab-trial-armed sh -c "journalctl -b -1 -u gwagent.service -o cat SLOT=B UPDATE_ID='$ab_id' | grep -q 'trial boot armed'"
check ab-reboot-by-logind sh -c "journalctl -b -1 -u systemd-logind.service -o cat | grep -q 'System is rebooting'"
check ab-agent-stopped sh -c "journalctl -b -1 -u gwagent.service -o cat | grep -q 'Deactivated successfully'"
# The stand-in boot loader found the trial armed and booted slot B.
check ab-trial-boot sh -c "grep -q 'read gw_slot=B upgrade_available=1 bootcount=0' /mnt/out/bootloader.log && grep -q 'booting slot B' /mnt/out/bootloader.log"
# The agent, back on slot B, checks its health and commits.
twin_done() { gwctl twin show "$DEVICE_ID" | tr -d ' \n' | grep "\"updateId\":\"$ab_id\"" | grep -q '"firmwareStatus":"completed"'; }
check ab-completed wait_for 300 twin_done
boot_start=$(journalctl -b -o short-unix --no-pager | awk 'NR == 1 { print $1 }')
completed=$(journalctl -b -u gwagent.service -o short-unix --no-pager UPDATE_ID="$ab_id" | awk '/update completed/ { print $1; exit }')
[ -n "$completed" ] && figure ab_boot_to_completed_s "$(awk -v a="$boot_start" -v b="$completed" 'BEGIN { printf "%.2f", b - a }')"
check ab-committed-env sh -c 'e=$(grub-editenv /boot/grub/grubenv list); echo "$e" | grep -qx gw_slot=B && echo "$e" | grep -qx upgrade_available=0 && echo "$e" | grep -qx bootcount=0'
run grub-editenv /boot/grub/grubenv list
# Root (the operator) still reaches the daemon's control socket.
check ab-status sh -c 'st=$(gwagent status -o json | tr -d " \n"); echo "$st" | grep -q "\"runningSlot\":\"B\"" && echo "$st" | grep -q "\"committedSlot\":\"B\"" && echo "$st" | grep -q "\"running\":true"'
run gwagent status
# Slot B now runs: at the next start the agent is given slot A, and B is
# taken away.
probe b "$SLOT_B" "$SLOT_A"
run getfacl -p "$SLOT_A" "$SLOT_B"
}

phase_stop() {
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
}

phase_upgrade() {
echo "=== upgrade to $VERSION2"
# No edit of the conffile follows: the upgrade and the removal must keep this.
config_sum=$(sha256sum /etc/gwagent/config.yaml)
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
# Slot B runs since the A/B update: the restarted agent is given slot A.
check upgrade-devices-slot-a [ "$(devices)" = "$SLOT_A rw" ]
last_pid=$(prop MainPID)
}

phase_remove() {
echo "=== remove"
check remove dpkg -r gwagent
check removed-stopped sh -c "[ ! -e /proc/$last_pid ] && [ \"\$(systemctl show -P ActiveState gwagent.service)\" = inactive ]"
check removed-status [ "$(dpkg-query -W -f='${Status}' gwagent)" = "deinstall ok config-files" ]
check removed-binary-gone [ ! -e /usr/bin/gwagent ]
check removed-conffile-kept [ "$(sha256sum /etc/gwagent/config.yaml)" = "$config_sum" ]
check removed-state-kept [ -d /var/lib/gwagent ]
}

phase_purge() {
echo "=== purge"
check purge dpkg -P gwagent
check purged-status sh -c '! dpkg-query -W -f="\${Status}" gwagent 2>/dev/null | grep -q installed'
check purged-config-gone [ ! -e /etc/gwagent ]
check purged-state-gone [ ! -e /var/lib/gwagent ]
check purged-unit-links-gone sh -c '! ls /etc/systemd/system/*/gwagent.service /etc/systemd/system/gwagent.service /var/lib/systemd/deb-systemd-helper-*/gwagent.service* 2>/dev/null | grep -q .'

check purged-user-kept getent passwd gwagent
}

phase_legacy_upgrade() {
echo "=== upgrade from $VERSION0, which ran the agent as root"
# The package of the commit before the agent got its own user, with state
# of its own: an update it completed, as root.
# A device that never had this version: no gwagent user either.
check legacy-no-user sh -c 'userdel gwagent && ! getent passwd gwagent && ! getent group gwagent'
check legacy-install dpkg -i "/mnt/pkg/$PKG0"
systemctl stop gwagent.service
systemctl reset-failed gwagent.service 2>/dev/null
configure legacy-config-edit
check legacy-start systemctl restart gwagent.service
check legacy-connected wait_for 30 status_matches '^connected'
check legacy-runs-as-root sh -c "awk '/^Uid:/ { exit !(\$2 == 0) }' /proc/$(prop MainPID)/status"
legacy_out=$(gwctl update "$DEVICE_ID" --uri "$IMAGE_URL" --version "$IMAGE_VERSION" \
	--sha256 "$IMAGE_SHA256" --size "$IMAGE_SIZE" --watch --interval 250ms --timeout 120s 2>&1)
legacy_rc=$?
echo "$legacy_out"
legacy_id=$(printf '%s\n' "$legacy_out" | awk '/^update .* accepted by / { print $2; exit }')
check legacy-update-completed [ "$legacy_rc" = 0 -a -n "$legacy_id" ]
run ls -lanR /var/lib/gwagent
check legacy-state-root-owned sh -c '[ "$(stat -c %U /var/lib/gwagent)" = root ] && [ -n "$(find /var/lib/gwagent -type f -user root -print -quit)" ]'
# The same probe against the root-run unit: it must find what the issue
# found, or it would prove nothing about the new one.
probe_run root "$SLOT_B" "$SLOT_A"
out=$(probe_output root)
printf '%s\n' "$out"
for c in user systemd-run-refused poweroff-refused kernel-write-refused running-slot-write-refused running-slot-read-refused other-disk-write-refused shadow-read-refused; do
	check "legacy-probe-finds-$c" grep -q "^probe root FAIL $c:" <<<"$out"
done
# What the probe managed to do as root.
systemctl stop probe-escape-root.service 2>/dev/null
rm -f /var/lib/probe-escaped /boot/probe
check legacy-probe-connected wait_for 30 status_matches '^connected'
old_pid=$(prop MainPID)

# The administrator edited config.yaml and the package's copy changed since
# that version: as an unattended upgrade does, keep the edited one (dpkg
# would otherwise ask, and there is no one to answer here).
check legacy-upgrade dpkg -i --force-confdef --force-confold "/mnt/pkg/$PKG2"
check legacy-user-created getent passwd gwagent
check legacy-upgrade-restarted sh -c "[ \"\$(systemctl show -P MainPID gwagent.service)\" != '$old_pid' ]"
check legacy-upgrade-connected wait_for 30 status_matches '^connected'
pid=$(prop MainPID)
check legacy-upgrade-runs-as-gwagent sh -c "awk '/^Uid:/ { exit !(\$2 == $(id -u gwagent)) }' /proc/$pid/status"
run ls -lanR /var/lib/gwagent
check legacy-state-handed-over sh -c '[ -z "$(find /var/lib/gwagent ! -user gwagent -print -quit)" ]'
# The update record of the root-run version is still the agent's.
check legacy-state-kept sh -c "gwagent status -o json | tr -d ' \n' | grep -q '\"id\":\"$legacy_id\"'"
check legacy-secret-granted sh -c 'getfacl -cp /etc/gwagent/connection-string | grep -qx "group:gwagent:r--"'
check legacy-purge dpkg -P gwagent
}

phase_dps() {
echo "=== a gateway that provisions itself through DPS"
# As a factory image would have it: no connection string, only the id scope
# and the enrollment group's key (made outside with gwctl dps group add).
# The hub address is there because gwhub does not listen on 8883 here, and
# the DPS host name (globalEndpoint) is gwhub's --hostname.
check dps-install dpkg -i "/mnt/pkg/$PKG2"
systemctl stop gwagent.service
systemctl reset-failed gwagent.service 2>/dev/null
install -m 0600 /dev/null /etc/gwagent/dps-group-key
printf '%s\n' "$DPS_GROUP_KEY" >/etc/gwagent/dps-group-key
install -m 0644 /mnt/in/ca.pem /etc/gwagent/hub-ca.pem
cat >/etc/gwagent/config.yaml <<EOT
hub:
  address: "$MQTT_ADDR"
  caFile: /etc/gwagent/hub-ca.pem
provisioning:
  idScope: $DPS_ID_SCOPE
  globalEndpoint: localhost
  address: "$MQTT_ADDR"
  groupKeyFile: /etc/gwagent/dps-group-key
installer:
  type: simulated
  simulated:
    waitBeforeDownload: 1s
    download: 1s
    apply: 2s
signature:
  allowUnsigned: true
EOT
check dps-config sh -c '! grep -qi connectionString /etc/gwagent/config.yaml && [ ! -e /etc/gwagent/connection-string ] && [ "$(stat -c %a:%U:%G /etc/gwagent/dps-group-key)" = 600:root:root ]'
run cat /etc/gwagent/config.yaml
regid=$(gwagent provision --show-registration-id 2>&1)
echo "registration id: $regid"
check dps-registration-id sh -c "printf '%s' '$regid' | grep -Eqx 'gw-[0-9a-f]{16}'"
t0=$(now_ms)
check dps-start systemctl start gwagent.service
if wait_for 60 status_matches '^connected'; then
	pass dps-connected
	figure dps_start_to_connected_ms $(($(now_ms) - t0))
else
	fail dps-connected "not connected within 60 s: $(prop StatusText)"
fi
run systemctl status --no-pager gwagent.service
run journalctl -u gwagent.service --no-pager -o cat -n 20
# The hub knows the device DPS created: the group's registration id is its id.
# (Functions, not sh -c: gwctl is a function of this script.)
dps_twin_connected() { gwctl device show "$regid" | grep -Eq '^connectionState: +Connected' && gwctl twin show "$regid" >/dev/null; }
dps_assigned() { gwctl dps registration show "$regid" | grep -Eq '^status: +assigned'; }
check dps-twin-connected dps_twin_connected
check dps-registration-assigned dps_assigned
run gwctl dps registration show "$regid"
# The agent reads its group key through the ACL the unit's start-up step
# grants, and does not take that for a leak.
check dps-key-no-warning sh -c '! journalctl -u gwagent.service --no-pager -o cat | grep -q "is readable by"'
check dps-assignment-private [ "$(stat -c %a:%U:%G /var/lib/gwagent/provisioning.json)" = 600:gwagent:gwagent ]
run ls -la /var/lib/gwagent
check dps-group-key-granted sh -c 'getfacl -cp /etc/gwagent/dps-group-key | grep -qx "group:gwagent:r--" && [ "$(stat -c %U:%G /etc/gwagent/dps-group-key)" = root:root ]'
dps_out=$(gwctl update "$regid" --uri "$IMAGE_URL" --version "$IMAGE_VERSION" \
	--sha256 "$IMAGE_SHA256" --size "$IMAGE_SIZE" --watch --interval 250ms --timeout 120s 2>&1)
dps_rc=$?
echo "$dps_out"
check dps-update-completed [ "$dps_rc" = 0 ]
# Root runs gwagent provision as an operator would: the kept assignment,
# without asking DPS.
provision_out=$(gwagent provision 2>&1)
echo "$provision_out"
check dps-provision-kept sh -c "printf '%s\n' \"\$1\" | grep -Eqx 'device id: +$regid' && printf '%s\n' \"\$1\" | grep -Eq '^assigned hub: +localhost\$' && printf '%s\n' \"\$1\" | grep -q '(kept from an earlier registration)'" - "$provision_out"
# A restart connects with the kept assignment (no DPS): the baseline of the
# figure above.
t0=$(now_ms)
systemctl restart gwagent.service
if wait_for 60 status_matches '^connected'; then
	pass dps-restart-connected
	figure dps_restart_kept_to_connected_ms $(($(now_ms) - t0))
else
	fail dps-restart-connected "not connected within 60 s: $(prop StatusText)"
fi
check dps-purge dpkg -P gwagent
}

finish() {
	journalctl --no-pager -o short-monotonic >/mnt/out/journal.txt 2>&1
	journalctl -u gwagent.service --no-pager -o short-monotonic >/mnt/out/gwagent.txt 2>&1
	echo "done" >>"$RESULTS"
}

case $stage in
"")
	phase_install
	phase_configure
	phase_offline
	phase_start
	phase_update
	phase_reload
	phase_watchdog
	# Returns only if the reboot did not come.
	phase_ab_start
	;;
ab-rebooting)
	phase_ab_after_reboot
	;;
*)
	fail stage "unknown stage '$stage' in $STAGE"
	rm -f "$STAGE"
	;;
esac
phase_stop
phase_upgrade
phase_remove
phase_purge
phase_legacy_upgrade
phase_dps
finish
