#!/usr/bin/env bash
# Create (once) the Debian bookworm root file system the systemd tests boot with
# systemd-nspawn, and print its path. A finished tree is marked with
# .gwagent-rootfs-complete and reused; a half-made one is thrown away.
#
#   test/systemd/rootfs.sh [DIR]     (default build/rootfs)
#
# The mirror is the first Debian one in /etc/apt/sources.list.d/ or
# /etc/apt/sources.list (override with MIRROR=URL).
set -euo pipefail

dir=${1:-build/rootfs}
marker="$dir/.gwagent-rootfs-complete"
# What the tests need inside: systemd as PID 1, journald, dbus for systemctl,
# and the package's dependency (ca-certificates).
include=systemd,systemd-sysv,dbus,libpam-systemd,ca-certificates,polkitd,acl,grub-common

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$include" ]; then
	echo "$dir"
	exit 0
fi

mirror=${MIRROR:-}
if [ -z "$mirror" ]; then
	# deb822 .sources files: "URIs: http://deb.debian.org/debian"; one-line
	# .list files: "deb [opts] http://… bookworm main". Skip security/updates.
	mirror=$(
		{
			cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}'
			cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
				awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }'
		} | awk '!/security|updates/ && !found { print; found = 1 }'
	) || true
	# (Missing source files make cat fail, which pipefail would turn into a
	# silent exit here; an empty result is reported below instead.)
fi
[ -n "$mirror" ] || { echo "rootfs: no Debian mirror found in /etc/apt; set MIRROR" >&2; exit 1; }

command -v debootstrap >/dev/null || { echo "rootfs: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

tmp="$dir.tmp"
rm -rf "$tmp" "$dir"
mkdir -p "$(dirname "$dir")"
echo "rootfs: debootstrap bookworm from $mirror into $dir (about a minute, once)" >&2
debootstrap --variant=minbase --include="$include" bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
	tail -n 30 "$tmp.log" >&2
	echo "rootfs: debootstrap failed (full log: $tmp.log)" >&2
	exit 1
}
rm -f "$tmp.log"
printf '%s' "$include" >"$tmp/.gwagent-rootfs-complete"
mv "$tmp" "$dir"
echo "$dir"
