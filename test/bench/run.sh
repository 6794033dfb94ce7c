#!/usr/bin/env bash
# test/bench/run.sh: the firmware install figures of `make bench`, measured in
# one run, each against a baseline measured in the same run (the machine may
# be shared and noisy, so timings are medians of BENCH_REPS repetitions).
#
#   1. Install throughput of a 1 GiB image over loopback HTTP into a slot file,
#      through the real firmware.Manager + abpart installer ("file" boot
#      environment; the reboot request ends the run), as a ratio to
#      `curl -s URL | dd of=slot bs=1M conv=fsync` from the same server. The
#      install includes reading the slot back from the disk (past the page
#      cache) and hashing it, which runs behind the download, window by
#      synced window; the headline is the whole install up to the reboot
#      request.
#   2. Peak RSS (/usr/bin/time -v) of the install process for a 64 MiB and a
#      1 GiB image.
#   3. Bytes downloaded again after a kill -9 at 50 % of the download.
#
# Knobs (environment): BENCH_REPS (3), BENCH_BIG_MIB (1024), BENCH_SMALL_MIB
# (64), BENCH_TMPDIR (/var/tmp; must be on disk, not tmpfs), BENCH_CHECKPOINT
# (firmware.Config.CheckpointBytes; default 16 MiB, the agent's), GO, BUILD.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GO=${GO:-go}
out=${BUILD:-$root/build}/bench
[[ $out = /* ]] || out=$root/$out
reps=${BENCH_REPS:-3}
big_mib=${BENCH_BIG_MIB:-1024}
small_mib=${BENCH_SMALL_MIB:-64}
tmpbase=${BENCH_TMPDIR:-/var/tmp}
checkpoint=${BENCH_CHECKPOINT:-$((16 << 20))}
step_timeout=300 # seconds; every step that could hang is bounded by it

die() { echo "bench: $*" >&2; exit 1; }
for tool in curl dd timeout sha256sum awk truncate; do
	command -v "$tool" >/dev/null || die "$tool is needed"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time is needed (apt-get install time)"
[[ $EPOCHREALTIME ]] || die "bash 5 is needed (EPOCHREALTIME)"

echo "bench: building into $out" >&2
(cd "$root" && CGO_ENABLED=0 "$GO" build -trimpath -o "$out/" ./test/bench/cmd/benchserve ./test/bench/cmd/benchinstall)

need_mib=$((3 * big_mib + 2 * small_mib + 256))
avail_mib=$(df -Pm "$tmpbase" | awk 'NR==2 {print $4}')
((avail_mib >= need_mib)) || die "$tmpbase has ${avail_mib} MiB free, need ${need_mib} MiB"
if [[ $(df -P --output=fstype "$tmpbase" 2>/dev/null | tail -1) == tmpfs ]]; then
	die "$tmpbase is tmpfs; set BENCH_TMPDIR to a folder on disk"
fi

tmp=$(mktemp -d "$tmpbase/gwagent-bench.XXXXXX")
server_pid=
install_pid=
cleanup() {
	if [[ -n $install_pid ]]; then kill -9 "$install_pid" 2>/dev/null || true; fi
	if [[ -n $server_pid ]]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	rm -rf "${tmp:?}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- images and server ---
mkdir -p "$tmp/srv"
echo "bench: generating ${small_mib} MiB and ${big_mib} MiB images in $tmp" >&2
dd if=/dev/urandom of="$tmp/srv/small.img" bs=1M count="$small_mib" status=none
dd if=/dev/urandom of="$tmp/srv/big.img" bs=1M count="$big_mib" status=none
small_size=$((small_mib << 20))
big_size=$((big_mib << 20))
small_sum=$(sha256sum "$tmp/srv/small.img" | cut -d' ' -f1)
big_sum=$(sha256sum "$tmp/srv/big.img" | cut -d' ' -f1)

"$out/benchserve" -dir "$tmp/srv" -port-file "$tmp/port" 2>"$tmp/server.log" &
server_pid=$!
for _ in $(seq 100); do [[ -s $tmp/port ]] && break; sleep 0.1; done
[[ -s $tmp/port ]] || die "image server did not start: $(cat "$tmp/server.log")"
base=http://127.0.0.1:$(cat "$tmp/port")
api() { curl -sf --max-time 10 -X "$1" "$base$2"; }

# --- helpers ---
# jnum KEY FILE: a number or bool from a flat JSON object.
jnum() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" "$2" | head -1; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

# device DIR MIB: a device running slot A with MIB MiB slots. Slot files
# that exist are kept (a partition is written in place; deleting and
# re-allocating 1 GiB between runs would add the file system's block
# allocation and, on a disk mounted with discard, TRIM to the figures); the
# update state and the boot environment start fresh. New slot files are
# sparse.
device() {
	mkdir -p "$1"
	rm -rf "$1/firmware" "$1/abpart"
	[[ -e $1/slot-a ]] || truncate -s "${2}M" "$1/slot-a"
	[[ -e $1/slot-b ]] || truncate -s "${2}M" "$1/slot-b"
	printf 'gw_slot=A\nupgrade_available=0\nbootcount=0\n' >"$1/bootenv"
}

# install DIR NAME SUM SIZE: one install under /usr/bin/time -v; leaves
# DIR/result.json and DIR/time.txt. The Manager itself checks the image
# against SUM and reads the slot back.
install() {
	timeout "$step_timeout" /usr/bin/time -v -o "$1/time.txt" \
		"$out/benchinstall" -checkpoint-bytes "$checkpoint" -dir "$1" -url "$base/img/$2" -sha256 "$3" -size "$4" >"$1/result.json" ||
		die "install of $2 failed: $(cat "$1/result.json" 2>/dev/null)"
	grep -q '^gw_slot=B$' "$1/bootenv" || die "boot environment not switched to B: $(cat "$1/bootenv")"
}
rss_kb() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1/time.txt"; }

# baseline DST: seconds for curl | dd conv=fsync of the big image. notrunc
# writes the existing file in place, as dd does on a partition (where
# O_TRUNC has no effect) and as the installer writes its slot.
baseline() {
	local t0=$EPOCHREALTIME
	# shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
	timeout "$step_timeout" bash -o pipefail -c 'curl -sf "$1" | dd of="$2" bs=1M conv=fsync,notrunc status=none' _ "$base/img/big.img" "$1"
	local t1=$EPOCHREALTIME
	[[ $(stat -c %s "$1") == "$big_size" ]] || die "baseline wrote $(stat -c %s "$1") bytes, want $big_size"
	awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}'
}

# disk_floor DST SRC: seconds for the disk alone to do the disk work of an
# install, which is more than curl | dd's: write the big image to DST while
# reading SRC (as big, already on disk) back, both at once, with dd, O_DIRECT
# and large blocks. A reference for how much of the gap to the baseline the
# disk alone accounts for, not an exact bound (the kernel's writeback may
# schedule the same work a little better).
disk_floor() {
	local t0=$EPOCHREALTIME
	# shellcheck disable=SC2016 # $1..$3 are the inner shell's arguments
	timeout "$step_timeout" bash -c 'dd if="$3" of="$1" bs=4M oflag=direct conv=notrunc,fsync status=none & w=$!
		dd if="$2" of=/dev/null bs=4M iflag=direct status=none && wait "$w"' _ "$1" "$2" "$tmp/srv/big.img"
	local t1=$EPOCHREALTIME
	awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}'
}

# big_install: one big install into $tmp/dev, its figures appended to the lists.
big_install() {
	device "$tmp/dev" "$big_mib"
	install "$tmp/dev" big.img "$big_sum" "$big_size"
	local r=$tmp/dev/result.json
	jnum total_s "$r" >>"$tmp/total.txt"
	jnum download_s "$r" >>"$tmp/dl.txt"
	jnum verify_s "$r" >>"$tmp/verify.txt"
	jnum apply_s "$r" >>"$tmp/apply.txt"
	rss_kb "$tmp/dev" >>"$tmp/rss_big.txt"
}

# --- 1 and 2: throughput (big) and RSS (big and small) ---
# A warm-up pair (not counted) writes both targets once, so every counted
# run overwrites allocated blocks, and checks the slot byte for byte.
echo "bench: warm-up: baseline and ${big_mib} MiB install" >&2
: >"$tmp/total.txt"; : >"$tmp/dl.txt"; : >"$tmp/verify.txt"; : >"$tmp/apply.txt"; : >"$tmp/rss_big.txt"
baseline "$tmp/base.out" >/dev/null
big_install
cmp -n "$big_size" "$tmp/dev/slot-b" "$tmp/srv/big.img" >/dev/null || die "slot B does not hold the image"
: >"$tmp/base.txt"; : >"$tmp/total.txt"; : >"$tmp/dl.txt"; : >"$tmp/verify.txt"; : >"$tmp/apply.txt"
: >"$tmp/rss_big.txt"; : >"$tmp/rss_small.txt"; : >"$tmp/ratio_dl.txt"; : >"$tmp/ratio_total.txt"
: >"$tmp/floor.txt"; : >"$tmp/ratio_floor.txt"
for i in $(seq "$reps"); do
	# Baseline and install run back to back, in alternating order, so each
	# pair sees the same machine; the ratio is taken per pair.
	echo "bench: repetition $i/$reps: baseline + ${big_mib} MiB install (pair), ${small_mib} MiB install" >&2
	if ((i % 2)); then
		baseline "$tmp/base.out" >>"$tmp/base.txt"
		big_install
	else
		big_install
		baseline "$tmp/base.out" >>"$tmp/base.txt"
	fi
	b=$(tail -1 "$tmp/base.txt")
	awk -v b="$b" -v t="$(tail -1 "$tmp/dl.txt")" 'BEGIN {printf "%.3f\n", b/t}' >>"$tmp/ratio_dl.txt"
	awk -v b="$b" -v t="$(tail -1 "$tmp/total.txt")" 'BEGIN {printf "%.3f\n", b/t}' >>"$tmp/ratio_total.txt"
	disk_floor "$tmp/base.out" "$tmp/dev/slot-b" >>"$tmp/floor.txt"
	awk -v b="$b" -v t="$(tail -1 "$tmp/floor.txt")" 'BEGIN {printf "%.3f\n", b/t}' >>"$tmp/ratio_floor.txt"
	device "$tmp/small" "$small_mib"
	install "$tmp/small" small.img "$small_sum" "$small_size"
	rss_kb "$tmp/small" >>"$tmp/rss_small.txt"
done
rm -rf "${tmp:?}/dev" "${tmp:?}/small" "${tmp:?}/base.out"

# --- 3: kill -9 at 50 % ---
echo "bench: kill -9 at 50 % of the ${big_mib} MiB download, then resume" >&2
device "$tmp/kill" "$big_mib" # new, sparse slots: the comparison below means something
half=$((big_size / 2))
api POST /reset
"$out/benchinstall" -checkpoint-bytes "$checkpoint" -timeout "${step_timeout}s" -dir "$tmp/kill" -url "$base/img/big.img" -sha256 "$big_sum" -size "$big_size" >"$tmp/killed.json" 2>&1 &
install_pid=$!
# The server SIGKILLs the process itself once it has sent half the image:
# no polling delay between the 50 % mark and the kill.
api POST "/arm?pid=$install_pid&at=$half"
# benchinstall bounds itself (-timeout); wait here, where bash reports the
# SIGKILL quietly.
set +e
wait "$install_pid" 2>/dev/null
rc=$?
set -e
install_pid=
((rc == 137)) || die "the install was not killed at 50 % (exit $rc): $(cat "$tmp/killed.json")"
api GET /stats >"$tmp/stats1.json"
sent_before=$(jnum bytes "$tmp/stats1.json")
send_q=$(jnum send_queue "$tmp/stats1.json")
recv_q=$(jnum recv_queue "$tmp/stats1.json")
read_before=$((sent_before - send_q - recv_q))
api POST /reset
install "$tmp/kill" big.img "$big_sum" "$big_size"
api GET /stats >"$tmp/stats2.json"
[[ $(jnum resumed "$tmp/kill/result.json") == true ]] || die "the second run did not resume the update"
sent_after=$(jnum bytes "$tmp/stats2.json")
resume_from=$(grep -o '"range":"bytes=[0-9]*-' "$tmp/stats2.json" | head -1 | grep -o '[0-9]*' || echo 0)
cmp -n "$big_size" "$tmp/kill/slot-b" "$tmp/srv/big.img" >/dev/null || die "slot B does not hold the image after the resume"
again=$((sent_before + sent_after - big_size))
transferred_again=$((again - send_q))
behind=$((read_before - resume_from))

# --- report ---
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b/1048576}'; }
b_med=$(median <"$tmp/base.txt")
t_med=$(median <"$tmp/total.txt")
d_med=$(median <"$tmp/dl.txt")
v_med=$(median <"$tmp/verify.txt")
a_med=$(median <"$tmp/apply.txt")
rs_med=$(median <"$tmp/rss_small.txt")
rb_med=$(median <"$tmp/rss_big.txt")
rs_max=$(sort -g "$tmp/rss_small.txt" | tail -1)
rb_max=$(sort -g "$tmp/rss_big.txt" | tail -1)
list() { awk -v f="${2:-%.3f}" '{printf "%s" f, (NR>1 ? " " : ""), $1} END {print ""}' "$1"; }
rate() { awk -v s="$1" -v n="$big_size" 'BEGIN {printf "%.0f MB/s", n/s/1e6}'; }
verdict() { awk -v v="$1" -v g="$2" -v dir="$3" 'BEGIN {ok = (dir == "ge") ? v >= g : v <= g; print ok ? "met" : "NOT met"}'; }
r_total=$(median <"$tmp/ratio_total.txt")
r_dl=$(median <"$tmp/ratio_dl.txt")
f_med=$(median <"$tmp/floor.txt")
r_floor=$(median <"$tmp/ratio_floor.txt")
rss_diff_kb=$((rb_med - rs_med))
rss_diff_max_kb=$((rb_max - rs_max))

cat <<EOF

firmware install benchmark (${big_mib} MiB / ${small_mib} MiB images from dd if=/dev/urandom, loopback HTTP, slot files in $tmpbase)
repetitions: $reps; figures are medians; all times in seconds; checkpoint interval $(mib "$checkpoint") MiB

  1. install throughput, ${big_mib} MiB                  median     runs
     baseline curl -s | dd conv=fsync,notrunc  $(printf '%8.3f' "$b_med")     $(list "$tmp/base.txt")   ($(rate "$b_med"))
     install: start -> reboot request         $(printf '%8.3f' "$t_med")     $(list "$tmp/total.txt")   ($(rate "$t_med"))
       downloading (HTTP, write, fsync per checkpoint; slot read back from disk and hashed behind it)
                                              $(printf '%8.3f' "$d_med")     $(list "$tmp/dl.txt")   ($(rate "$d_med"))
       verifying (compare; reads back only after a restart) $(printf '%8.3f' "$v_med")     $(list "$tmp/verify.txt")
       applying (switch; re-hash only after a restart) $(printf '%8.3f' "$a_med")     $(list "$tmp/apply.txt")
     ratio baseline/install, per pair                 median     pairs
       downloading phase (incl. read-back)    $(printf '%8.3f' "$r_dl")     $(list "$tmp/ratio_dl.txt")
     whole install to reboot request vs curl|dd (goal >= 0.95)
                                              $(printf '%8.3f' "$r_total")     $(list "$tmp/ratio_total.txt")   $(verdict "$r_total" 0.95 ge)
     for reference: the disk alone writing ${big_mib} MiB while reading ${big_mib} MiB back (dd, O_DIRECT)
                                              $(printf '%8.3f' "$f_med")     $(list "$tmp/floor.txt")
       ratio baseline/that (about the best an install with a read-back can do here)
                                              $(printf '%8.3f' "$r_floor")     $(list "$tmp/ratio_floor.txt")

  2. peak RSS of the install process (/usr/bin/time -v), KiB
     ${small_mib} MiB image                            median $rs_med   max $rs_max   runs $(list "$tmp/rss_small.txt" %d)
     ${big_mib} MiB image                          median $rb_med   max $rb_max   runs $(list "$tmp/rss_big.txt" %d)
     difference (goal <= 2048 KiB)            median $rss_diff_kb   max-vs-max $rss_diff_max_kb   $(verdict "$rss_diff_kb" 2048 le)

  3. kill -9 at 50 % of the ${big_mib} MiB download, restart on the same state
     bytes sent before the kill               $sent_before ($(mib "$sent_before") MiB)
       still in the server's send queue       $send_q ($(mib "$send_q") MiB: handed to the kernel, never received)
       in the installer's receive queue       $recv_q ($(mib "$recv_q") MiB: received, not yet read)
       read by the installer                  $read_before ($(mib "$read_before") MiB)
     resumed from byte (Range)                $resume_from ($(mib "$resume_from") MiB)
     bytes sent after the restart             $sent_after ($(mib "$sent_after") MiB)
     re-downloaded                            $again bytes ($(mib "$again") MiB, $(awk -v a="$again" -v n="$big_size" 'BEGIN {printf "%.2f", 100*a/n}') % of the image)  $(verdict "$again" "$((2 * checkpoint + 8 * 1024 * 1024))" le) (bound: 2 checkpoint intervals + socket buffers, $(mib "$((2 * checkpoint + 8 * 1024 * 1024))") MiB)
       of which received by the installer     $transferred_again ($(mib "$transferred_again") MiB)  $(verdict "$transferred_again" "$((2 * checkpoint))" le)
       of which read past the last checkpoint $behind ($(mib "$behind") MiB)  $(verdict "$behind" "$((2 * checkpoint))" le) (<= 2 checkpoint intervals, $(mib "$((2 * checkpoint))") MiB)
     resumed update verified (SHA-256) and slot B == image: yes
EOF
