#!/bin/bash
# What a compromised agent could do, tried from inside the agent's own unit.
#
# inside.sh runs this as an ExecStartPre= of gwagent.service through a
# drop-in that adds nothing else (two Environment= lines and this line), so
# it runs as the unit's user, in the unit's sandbox (namespaces, seccomp
# filter, capability bounding set, device cgroup), after the unit's own
# grant-access step, exactly as the agent then starts. It always exits 0 (a
# failing ExecStartPre would stop the agent from starting) and reports on
# stdout, which goes to the unit's journal:
#   probe TAG ok NAME
#   probe TAG FAIL NAME: why
# Environment: PROBE_TAG, PROBE_RUNNING (the running slot), PROBE_INACTIVE
# (the inactive slot), PROBE_OTHER (a disk that is neither).
set -u
tag=${PROBE_TAG:-?}

ok() { echo "probe $tag ok $1"; }
fail() { echo "probe $tag FAIL $1: $2"; }
# must NAME CMD...: CMD must succeed.
must() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$* → $(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"; fi
}
# refused NAME CMD...: CMD must fail for lack of permission (not, say,
# because what it opens is missing).
refused() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		fail "$name" "$* succeeded: $(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"
	elif printf '%s' "$out" | grep -Eq 'Permission denied|Operation not permitted|Read-only file system|Access denied'; then
		ok "$name"
	else
		fail "$name" "$* failed, but not for lack of permission: $(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"
	fi
}
# Opening is the permission check: nothing is ever written to a slot here.
open_rw() { exec 3<>"$1" && exec 3>&-; }
open_r() { exec 3<"$1" && exec 3<&-; }

echo "probe $tag start: $(id)"
must user sh -c '[ "$(id -u)" != 0 ] && [ "$(id -un)" = gwagent ] && ! id -Gn | grep -qw -e disk -e root'
must no-capabilities sh -c 'grep -qx "CapEff:[[:space:]]*0000000000000000" /proc/self/status && grep -qx "CapBnd:[[:space:]]*0000000000000000" /proc/self/status'

# A transient unit runs as root unless polkit refuses it.
refused systemd-run-refused systemd-run --quiet --wait --collect --unit="probe-escape-$tag" /bin/touch /var/lib/probe-escaped
# logind asks polkit: reboot yes, anything else (power-off here) no, where
# a user without a session would otherwise get "challenge".
must poweroff-refused sh -c 'busctl call org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager CanPowerOff | grep -qx "s \"no\""'
must reboot-allowed sh -c 'busctl call org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager CanReboot | grep -qx "s \"yes\""'

# /boot: the kernel and everything else read-only; the GRUB environment
# block (written in place by grub-editenv) writable.
kernels=(/boot/vmlinuz*)
must kernel-present test -f "${kernels[0]}"
refused kernel-write-refused sh -c ': >>"$1"' - "${kernels[0]}"
refused boot-create-refused touch /boot/probe
must grubenv-writable test -w /boot/grub/grubenv

# Slots and disks.
must devices-present test -b "$PROBE_RUNNING" -a -b "$PROBE_INACTIVE" -a -b "$PROBE_OTHER"
refused running-slot-write-refused open_rw "$PROBE_RUNNING"
refused running-slot-read-refused open_r "$PROBE_RUNNING"
must inactive-slot-writable open_rw "$PROBE_INACTIVE"
refused other-disk-read-refused open_r "$PROBE_OTHER"
refused other-disk-write-refused open_rw "$PROBE_OTHER"

# Secrets: the system's are closed, the agent's own is open.
refused shadow-read-refused cat /etc/shadow
must secret-readable head -c 1 /etc/gwagent/connection-string
refused config-write-refused sh -c ': >>/etc/gwagent/config.yaml'
must state-writable sh -c 'touch /var/lib/gwagent/.probe && rm /var/lib/gwagent/.probe'
echo "probe $tag end"
exit 0
