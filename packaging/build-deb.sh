#!/usr/bin/env bash
# Build the gwagent Debian package.
#
#   packaging/build-deb.sh [VERSION [OUTDIR]]
#
# VERSION is both the package's version and what `gwagent version` prints; by
# default (or given as "") it is packaging/version.sh's: X.Y.Z for a release,
# X.Y.Z~git<commit time>.<hash>[.dirty] between releases, so that dpkg
# upgrades from a build to any later one. A version given by hand must be a
# Debian native version too (digits first; letters, digits, . + ~; no -).
# OUTDIR defaults to build/. Prints the path of the .deb on stdout.
# Environment: GO (go), GOARCH (the host's), NFPM (the pinned nfpm),
# SOURCE_DATE_EPOCH (the last commit's time: reproducible archives),
# DEB_CONFIG (configs/gwagent.yaml), GWAGENT_BIN (a prebuilt binary instead of
# building ./cmd/gwagent).
set -euo pipefail

usage() { echo "usage: $0 [VERSION [OUTDIR]]" >&2; exit 2; }
if [ $# -gt 2 ]; then usage; fi

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

version=${1:-}
outdir=${2:-build}
GO=${GO:-go}
NFPM=${NFPM:-$GO run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2}
pkg=github.com/gwagent/gwagent
export DEB_MAINTAINER=${DEB_MAINTAINER:-gwagent maintainers <maintainers@gwagent.dev>}

[ -n "$version" ] || version=$(packaging/version.sh)
# A '-' would start a Debian revision, which a native package has none of.
[[ $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || { echo "build-deb: version \"$version\" is not a Debian native version (digits first; letters, digits, . + ~)" >&2; exit 2; }
export DEB_VERSION=$version

# DEB_ARCH is nfpm's (Go's) name of the architecture, debarch Debian's.
goarch=${GOARCH:-$($GO env GOARCH)}
case $goarch in
amd64 | arm64 | s390x | riscv64) DEB_ARCH=$goarch debarch=$goarch ;;
386) DEB_ARCH=386 debarch=i386 ;;
ppc64le) DEB_ARCH=ppc64le debarch=ppc64el ;;
arm) DEB_ARCH=arm7 debarch=armhf GOARM=${GOARM:-7} && export GOARM ;;
*) echo "build-deb: unsupported GOARCH $goarch" >&2; exit 1 ;;
esac
export DEB_ARCH

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

export DEB_CONFIG=${DEB_CONFIG:-configs/gwagent.yaml}
[ -f "$DEB_CONFIG" ] || { echo "build-deb: $DEB_CONFIG is missing" >&2; exit 1; }

# The stage is per version so that two builds (an upgrade test) do not race.
export DEB_STAGE="$outdir/deb-stage/$DEB_VERSION"
rm -rf "$DEB_STAGE"
mkdir -p "$DEB_STAGE"

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || true)
if [ -n "${GWAGENT_BIN:-}" ]; then
	# A binary built elsewhere (must be static and for $goarch).
	install -m 0755 "$GWAGENT_BIN" "$DEB_STAGE/gwagent"
else
	CGO_ENABLED=0 GOARCH=$goarch $GO build -trimpath -buildvcs=false \
		-ldflags "-s -w -X $pkg/internal/buildinfo.Version=$version -X $pkg/internal/buildinfo.Commit=$commit" \
		-o "$DEB_STAGE/gwagent" ./cmd/gwagent
fi

# gzip -n: no name or time stamp in the header, so the archive is reproducible.
gzip -9n <packaging/gwagent.8 >"$DEB_STAGE/gwagent.8.gz"

# The changelog's first entry must name this version; a build between releases
# gets an entry saying which commit it is.
date_r=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
{
	if ! head -n1 packaging/changelog | grep -qF "gwagent ($DEB_VERSION)"; then
		printf 'gwagent (%s) unstable; urgency=medium\n\n' "$DEB_VERSION"
		printf '  * Development build of commit %s.\n\n' "${commit:-unknown}"
		printf ' -- %s  %s\n\n' "$DEB_MAINTAINER" "$date_r"
	fi
	cat packaging/changelog
} | gzip -9n >"$DEB_STAGE/changelog.gz"

mkdir -p "$outdir"
deb="$outdir/gwagent_${DEB_VERSION}_${debarch}.deb"
rm -f "$deb"
# nfpm's config is read from the repository root (its paths are relative).
$NFPM pkg --packager deb --config packaging/nfpm.yaml --target "$deb" >&2
echo "$deb"
