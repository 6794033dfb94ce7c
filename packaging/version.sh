#!/usr/bin/env bash
# Print the version of a build of this tree: what `gwagent version` says and
# the Debian package's version, ordered by dpkg the way the builds were made.
#
#   0.2.0                                   a release: HEAD is tagged v0.2.0, the tree clean
#   0.2.0~git20261203085830.40ff878abcde    a build between releases: the commit's time
#                                           (UTC) and hash, on the way to 0.2.0
#   0.2.0~git20261203085830.40ff878abcde.dirty   the same with changes not committed
#
# VERSION (at the repository root) holds the next release, X.Y.Z. A "~"
# sorts before the release, so every build on the way to 0.2.0 is older than
# 0.2.0, and the commit time grows along the history, so a build of a later
# commit is newer. Once v0.2.0 is tagged, VERSION must be raised: a build
# past the tag of its own VERSION would sort below the release, so it is
# refused. Untracked files mark the tree dirty, as for `go version -m`.
#
# The commit time is the committer date, which git sets anew on every commit,
# rebase and cherry-pick; it needs no history, so a shallow clone works.
# Outside a git checkout there is no commit: give the version by hand
# (make VERSION=…).
set -euo pipefail

die() { echo "version.sh: $*" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

[ -f VERSION ] || die "VERSION is missing at $root"
base=$(tr -d ' \t\r\n' <VERSION)
[[ $base =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "VERSION holds \"$base\", not X.Y.Z"

git rev-parse --git-dir >/dev/null 2>&1 || die "$root is not a git checkout: give the version by hand (make VERSION=$base)"

dirty=
[ -z "$(git status --porcelain)" ] || dirty=.dirty
tag=v$base
if git rev-parse -q --verify "refs/tags/$tag" >/dev/null; then
	if [ "$(git rev-parse "$tag^{commit}")" = "$(git rev-parse HEAD)" ]; then
		# The release, unless changed: a changed one sorts below it.
		[ -n "$dirty" ] || { echo "$base"; exit 0; }
	elif git merge-base --is-ancestor "$tag" HEAD; then
		die "$base was released ($tag is in this history): raise VERSION, or builds from here sort below the release"
	fi
fi
when=$(TZ=UTC0 git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S HEAD)
echo "$base~git$when.$(git rev-parse --short=12 HEAD)$dirty"
