#!/usr/bin/env bash
# test/bench/adaptive.sh: the adaptive-update figures of `make bench`
# (docs/adaptive-updates.md): ext4 update pairs (a few files changed, a
# package upgrade, everything rewritten) and random block changes (1 %, 10 %,
# 50 %, 100 %), each version 2 installed over version 1 adaptively and as a full
# download in the same run, over loopback and over a rate-limited link.
# test/bench/cmd/benchadaptive builds the images and drives benchserve,
# benchinstall and gwctl image index; its comment has the details.
#
# Knobs (environment): BENCH_REPS (3), BENCH_EXT4_MIB (256, the image size),
# BENCH_RATE (20000000 bytes/s for the rate-limited run; 0 leaves it out),
# BENCH_SEED (1), BENCH_TMPDIR (/var/tmp; must be on disk, not tmpfs), GO,
# BUILD.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GO=${GO:-go}
out=${BUILD:-$root/build}/bench
[[ $out = /* ]] || out=$root/$out
mib=${BENCH_EXT4_MIB:-256}
tmpbase=${BENCH_TMPDIR:-/var/tmp}

die() { echo "bench: $*" >&2; exit 1; }
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is needed (make deps installs e2fsprogs)"
if [[ $(df -P --output=fstype "$tmpbase" 2>/dev/null | tail -1) == tmpfs ]]; then
	die "$tmpbase is tmpfs; set BENCH_TMPDIR to a folder on disk"
fi
need_mib=$((12 * mib))
avail_mib=$(df -Pm "$tmpbase" | awk 'NR==2 {print $4}')
((avail_mib >= need_mib)) || die "$tmpbase has ${avail_mib} MiB free, need ${need_mib} MiB"

echo "bench: building into $out" >&2
(cd "$root" && CGO_ENABLED=0 "$GO" build -trimpath -o "$out/" \
	./test/bench/cmd/benchserve ./test/bench/cmd/benchinstall ./test/bench/cmd/benchadaptive ./cmd/gwctl)

exec "$out/benchadaptive" -bin "$out" -tmp "$tmpbase" -mib "$mib" -reps "${BENCH_REPS:-3}" \
	-rate "${BENCH_RATE:-20000000}" -seed "${BENCH_SEED:-1}"
