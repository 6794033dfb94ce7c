#!/usr/bin/env bash
# Check a built gwagent package the way Debian and systemd would, and print its
# figures.
#
#   packaging/check-deb.sh build/gwagent_VERSION_ARCH.deb
#
# - lintian finds no error or warning (the only override is Debian's expected
#   one for a static Go binary);
# - systemd-analyze verify, run on the package unpacked over a Debian root (the
#   cached test rootfs, see test/systemd/rootfs.sh), prints nothing;
# - systemd-analyze security --offline rates the unit's exposure at 1.5 or less.
# Needs root (the overlay mount) and lintian.
set -euo pipefail

if [ $# -ne 1 ] || [ ! -f "$1" ]; then
	echo "usage: $0 PACKAGE.deb" >&2
	exit 2
fi
deb=$(realpath "$1")
root=$(cd "$(dirname "$0")/.." && pwd)
max_exposure=1.5

echo "== lintian"
lintian --allow-root --fail-on error,warning --display-info "$deb"

echo "== systemd-analyze verify"
rootfs=$(cd "$root" && test/systemd/rootfs.sh)
tmp=$(mktemp -d)
cleanup() {
	mountpoint -q "$tmp/root" && umount "$tmp/root"
	rm -rf "$tmp"
}
trap cleanup EXIT
mkdir "$tmp/upper" "$tmp/work" "$tmp/root"
# The unit must be checked where its ExecStart, ExecReload and the targets it
# names exist: the package unpacked over a Debian system, without touching it.
mount -t overlay overlay -o "lowerdir=$root/$rootfs,upperdir=$tmp/upper,workdir=$tmp/work" "$tmp/root"
dpkg-deb -x "$deb" "$tmp/root"
# verify reports some problems only on stderr and still exits 0.
if ! err=$(systemd-analyze verify --man=no --root="$tmp/root" gwagent.service 2>&1) || [ -n "$err" ]; then
	echo "$err" >&2
	echo "check-deb: systemd-analyze verify found problems" >&2
	exit 1
fi
echo "clean"

echo "== systemd-analyze security"
security=$(systemd-analyze security --offline=true --root="$tmp/root" gwagent.service 2>&1) || true
exposure=$(printf '%s\n' "$security" | awk '/Overall exposure level/ {print $(NF-2)}')
printf '%s\n' "$security" | grep -E '✗|Overall' || true
if [ -z "$exposure" ] || ! awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }'; then
	echo "check-deb: exposure ${exposure:-unknown} is above $max_exposure" >&2
	exit 1
fi

size=$(stat -c %s "$deb")
installed=$(dpkg-deb -f "$deb" Installed-Size)
echo "== figures"
echo "deb_file=$(basename "$deb")"
echo "deb_size_bytes=$size"
echo "deb_size_kib=$(((size + 1023) / 1024))"
echo "installed_size_kib=$installed"
echo "exposure=$exposure"
