#!/usr/bin/env bash
# End-to-end test of the A/B bootloader contract with a real GRUB under QEMU.
#
# Builds a GPT disk image:
#   gpt1 "boot"  FAT: /grub/grub.cfg (a serial console header + the shipped
#                packaging/bootloader/grub.cfg.snippet, only its
#                integrator-settings block adapted), /grub/grubenv and GRUB's
#                i386-pc modules (what grub-install would leave there);
#   gpt2 "rootA" FAT: /boot/vmlinuz + /boot/initrd.img (busybox /init, "slot A");
#   gpt3 "rootB" FAT: the same, "slot B".
# BIOS boots a grub-mkrescue ISO that stands in for the boot sector + core
# image: its config only points $prefix at (hd0,gpt1)/grub and loads the
# disk's grub.cfg. Each slot's /init prints the slot baked into its initramfs
# and the gwagent.slot= GRUB put on the kernel command line to the serial
# console, then powers off.
#
# Between boots the grubenv is copied out with mtools, written by abenv (the
# firmware/bootenv GRUB backend: the installer's own writes) and copied back.
# Scenario, with the boot limit the snippet uses (3 unless GWQEMU_BOOTLIMIT):
#   1. slot A committed            -> boots A, grubenv untouched by GRUB
#   2. switch to B (trial)         -> boots B, GRUB counted bootcount=1
#   3. commit B                    -> boots B, grubenv untouched by GRUB
#   4. switch to A, never commit   -> boots A LIMIT times (bootcount 1..LIMIT),
#                                     then GRUB falls back: boots B with
#                                     gw_slot=B upgrade_available=0
#   5. nothing written             -> boots B again, grubenv untouched (settled)
#   6. slot A's kernel deleted, switch to A with bootlimit=1
#                                  -> GRUB counts the boot, cannot load the
#                                     kernel, restarts; the next boot falls
#                                     back to B (gw_slot=B, bootcount=2)
# The run stops at the first boot with a failed check: later steps build on it.
#
# Needs root (installs qemu-system-x86 qemu-utils grub-pc-bin grub2-common
# grub-common xorriso mtools busybox-static fdisk with apt-get when missing;
# fetches the current Debian kernel package with `apt-get download`, unpacked
# into the cache, never installed). Software emulation: 20-45 s a boot.
#
# Environment:
#   BUILD              build folder (default: <repo>/build); cache in $BUILD/qemu
#   GWQEMU_TIMEOUT     seconds allowed for one boot (default 300)
#   GWQEMU_BOOTLIMIT   write bootlimit with the step-4 switch (default: unset,
#                      the snippet's default applies)
#   GWQEMU_KERNEL      use this bzImage instead of Debian's kernel package
#   GWQEMU_SNIPPET     test another GRUB snippet (default: the shipped one)
#   GWQEMU_KEEP=1      keep the run folder (disk image, serial logs)
# Exits 0 only if every check passed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${BUILD:-$root/build}
case $build in /*) ;; *) build=$root/$build ;; esac
cache=$build/qemu
snippet=${GWQEMU_SNIPPET:-$root/packaging/bootloader/grub.cfg.snippet}
boot_timeout=${GWQEMU_TIMEOUT:-300}
bootlimit_arg=${GWQEMU_BOOTLIMIT:-}

log() { printf '%s [e2e-qemu] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, mknod)"
[ -f "$snippet" ] || die "the shipped GRUB snippet $snippet does not exist"

# --- packages ------------------------------------------------------------------
packages="qemu-system-x86 qemu-utils grub-pc-bin grub2-common grub-common xorriso mtools busybox-static fdisk"
missing=()
for p in $packages; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing: ${missing[*]}"
	apt-get -o DPkg::Lock::Timeout=600 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
		--no-install-recommends "${missing[@]}" >/dev/null
fi
for t in qemu-system-x86_64 grub-mkrescue grub-editenv grub-script-check xorriso mcopy mformat sfdisk; do
	command -v "$t" >/dev/null || die "$t not found after installing packages"
done
busybox=/bin/busybox
[ -x "$busybox" ] || die "no $busybox"

mkdir -p "$cache"
gocmd=${GO:-go}
command -v "$gocmd" >/dev/null || gocmd=/usr/local/go/bin/go

# --- kernel (cached) ------------------------------------------------------------
kernel=${GWQEMU_KERNEL:-}
if [ -z "$kernel" ]; then
	kernel=$cache/kernel/vmlinuz
	if [ ! -s "$kernel" ]; then
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
		if [ -z "$pkg" ]; then
			apt-get -o DPkg::Lock::Timeout=600 update -qq
			pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
		fi
		[ -n "$pkg" ] || die "cannot find the kernel package behind linux-image-amd64"
		log "fetching kernel package $pkg (apt-get download; not installed)"
		dl=$(mktemp -d "$cache/kdl.XXXXXX")
		(cd "$dl" && apt-get -o APT::Sandbox::User=root download -qq "$pkg")
		dpkg-deb -x "$dl"/*.deb "$dl/x"
		mkdir -p "$cache/kernel"
		images=("$dl"/x/boot/vmlinuz-*)
		[ -f "${images[0]}" ] || die "no /boot/vmlinuz-* in $pkg"
		cp "${images[0]}" "$kernel.tmp"
		echo "$pkg" >"$cache/kernel/package"
		mv "$kernel.tmp" "$kernel"
		rm -rf "$dl"
	fi
	log "kernel: $(cat "$cache/kernel/package" 2>/dev/null || echo "$kernel")"
fi
[ -s "$kernel" ] || die "kernel $kernel missing"

# --- the boot ISO (cached by the content of its config) --------------------------
# It replaces what grub-install writes to the disk (boot sector + core image):
# grub-install onto a loop device does not work on every machine, an ISO does.
# shellcheck disable=SC2016 # $prefix is GRUB's, expanded by GRUB
iso_cfg='# Stage 1 only: hand over to the GRUB installed on the disk.
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
insmod part_gpt
insmod fat
set root=(hd0,gpt1)
set prefix=(hd0,gpt1)/grub
echo "gwqemu: loading $prefix/grub.cfg"
configfile $prefix/grub.cfg
echo "gwqemu: configfile returned"
'
iso_key=$({ echo "$iso_cfg"; dpkg-query -W -f='${Version}' grub-pc-bin; } | sha256sum | cut -c1-16)
iso=$cache/boot-$iso_key.iso
if [ ! -s "$iso" ]; then
	log "building the boot ISO (grub-mkrescue)"
	isodir=$(mktemp -d "$cache/iso.XXXXXX")
	mkdir -p "$isodir/boot/grub"
	printf '%s' "$iso_cfg" >"$isodir/boot/grub/grub.cfg"
	grub-mkrescue -o "$iso.tmp" --locales= --fonts= --themes= "$isodir" >"$cache/grub-mkrescue.log" 2>&1 ||
		{ cat "$cache/grub-mkrescue.log"; die "grub-mkrescue failed"; }
	mv "$iso.tmp" "$iso"
	rm -rf "$isodir"
fi

# --- abenv: the installer's writes ------------------------------------------------
log "building abenv (firmware/bootenv GRUB backend)"
(cd "$root" && CGO_ENABLED=0 "$gocmd" build -o "$cache/abenv" ./test/qemu/abenv)
abenv=$cache/abenv

# --- run folder -----------------------------------------------------------------
run=$(mktemp -d "$cache/run.XXXXXX")
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	if [ "${GWQEMU_KEEP:-}" = 1 ]; then log "kept $run"; else rm -rf "$run"; fi
}
trap cleanup EXIT

# --- slot initramfs ----------------------------------------------------------------
make_initrd() { # SLOT OUT
	local slot=$1 out=$2 d
	d=$run/initrd-$slot
	mkdir -p "$d"/bin "$d"/dev "$d"/proc
	cp "$busybox" "$d/bin/busybox"
	for a in sh mount cat echo poweroff; do ln -s busybox "$d/bin/$a"; done
	mknod "$d/dev/console" c 5 1
	echo "$slot" >"$d/slot"
	cat >"$d/init" <<'EOF'
#!/bin/sh
# Says which slot this is (baked into the initramfs) and which slot GRUB
# meant to boot (gwagent.slot= on the kernel command line), then powers off.
export PATH=/bin
mount -t proc proc /proc
image=$(cat /slot)
want=none
for w in $(cat /proc/cmdline); do
	case $w in gwagent.slot=*) want=${w#gwagent.slot=} ;; esac
done
echo "GWQEMU-BOOTED image=$image cmdline=$want"
echo "GWQEMU-CMDLINE $(cat /proc/cmdline)"
poweroff -f
EOF
	chmod 755 "$d/init"
	(cd "$d" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -9) >"$out"
}

# --- disk image -------------------------------------------------------------------
# Fixed layout in 512-byte sectors, so that mtools can address each file
# system by its byte offset ("-i disk.img@@OFFSET").
boot_start=2048 boot_size=32768   # 16 MiB
a_start=34816 a_size=40960        # 20 MiB
b_start=75776 b_size=40960        # 20 MiB
disk_sectors=$((b_start + b_size + 2048))
disk=$run/disk.img
boot_fs="$disk@@$((boot_start * 512))"

truncate -s $((disk_sectors * 512)) "$disk"
sfdisk -q --no-reread --no-tell-kernel "$disk" <<EOF
label: gpt
start=$boot_start, size=$boot_size, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=boot
start=$a_start, size=$a_size, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=rootA
start=$b_start, size=$b_size, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=rootB
EOF
mformat -i "$boot_fs" -T $boot_size -H $boot_start -v BOOT ::
for s in A B; do
	case $s in
	A) start=$a_start size=$a_size ;;
	B) start=$b_start size=$b_size ;;
	esac
	fs="$disk@@$((start * 512))"
	mformat -i "$fs" -T "$size" -H "$start" -v "ROOT$s" ::
	make_initrd "$s" "$run/initrd-$s.img"
	mmd -i "$fs" ::/boot
	mcopy -i "$fs" "$kernel" ::/boot/vmlinuz
	mcopy -i "$fs" "$run/initrd-$s.img" ::/boot/initrd.img
	[ "$s" = B ] || a_fs=$fs
done

# grub.cfg: a header for a headless gateway (serial console), then the shipped
# snippet with only its integrator-settings block adapted to this disk: the
# kernel must print to the serial port, and a kernel panic must end the run.
# Anything else in the snippet is used byte for byte; the check below proves it.
adapted=$run/gwagent-ab.cfg
cmdline='ro quiet console=ttyS0,115200 panic=-1'
sed '/^# --- integrator settings/,/^# -----/ s|^set gw_cmdline=.*|set gw_cmdline="'"$cmdline"'"|' "$snippet" >"$adapted"
changed=$(diff "$snippet" "$adapted" | grep -c '^[<>]' || true)
[ "$changed" = 2 ] || die "expected to adapt exactly the gw_cmdline line of the snippet's settings block, changed $changed lines"
for setting in 'gw_dev_A=(hd0,gpt2)' 'gw_dev_B=(hd0,gpt3)' 'gw_root_A=PARTLABEL=rootA' 'gw_root_B=PARTLABEL=rootB' \
	'gw_kernel=/boot/vmlinuz' 'gw_initrd=/boot/initrd.img'; do
	grep -qx "set $setting" "$adapted" || die "snippet setting 'set $setting' changed: adapt this disk layout to it"
done
{
	echo '# Generated by test/qemu/run.sh: serial console, then the gwagent A/B snippet.'
	echo 'serial --unit=0 --speed=115200'
	echo 'terminal_input serial'
	echo 'terminal_output serial'
	# shellcheck disable=SC2016 # $prefix is GRUB's
	echo 'echo "gwqemu: grub.cfg from $prefix"'
	cat "$adapted"
} >"$run/grub.cfg"
grub-script-check "$run/grub.cfg" || die "grub-script-check rejects grub.cfg"

env_file=$run/grubenv
grub-editenv "$env_file" create
mmd -i "$boot_fs" ::/grub ::/grub/i386-pc
mcopy -i "$boot_fs" /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst ::/grub/i386-pc/
mcopy -i "$boot_fs" "$run/grub.cfg" ::/grub/grub.cfg

env_put() { mcopy -o -i "$boot_fs" "$env_file" ::/grub/grubenv; }
env_get() { rm -f "$env_file"; mcopy -i "$boot_fs" ::/grub/grubenv "$env_file"; }
env_put # the empty environment block an integrator creates with grub-editenv
# state: one line "slot/upgrade_available/bootcount/bootlimit" from abenv.
env_state() {
	local s
	s=$("$abenv" "$env_file" state) || return 1
	awk -F= '{v[$1]=$2} END {printf "%s/%s/%s/%s\n", v["gw_slot"], v["upgrade_available"], v["bootcount"], v["bootlimit"]}' <<<"$s"
}
write() { # abenv ARGS...: one write of the installer, copied onto the disk
	env_get
	"$abenv" "$env_file" "$@" 2>>"$run/abenv.log" || die "abenv $* failed: $(tail -3 "$run/abenv.log")"
	env_put
	log "installer wrote ($*): $(env_state)"
}

# --- checks and boots --------------------------------------------------------------------
pass=0 fail=0
results=()
boot_no=0
check() { # NAME CONDITION-RESULT(0/1) DETAIL
	if [ "$2" = 0 ]; then
		pass=$((pass + 1)); results+=("PASS  $1")
	else
		fail=$((fail + 1)); results+=("FAIL  $1  ($3)")
		log "FAIL: $1 ($3)"
	fi
}

# boot NAME EXPECT_SLOT EXPECT_STATE [EXPECT_SERIAL_TEXT]
# EXPECT_SLOT "-" means no kernel may run (GRUB restarts the machine, which
# ends QEMU because of -no-reboot).
# EXPECT_STATE is slot/upgrade_available/bootcount/bootlimit after the boot,
# "unchanged" meaning the grubenv must be byte-for-byte what was written.
boot() {
	local name=$1 want=$2 want_state=$3 want_text=${4:-}
	boot_no=$((boot_no + 1))
	local serial=$run/serial-$boot_no.log before=$run/grubenv-before-$boot_no
	env_get
	cp "$env_file" "$before"
	local t0 t1 rc=0
	t0=$(date +%s.%N)
	timeout --kill-after=10 "$boot_timeout" qemu-system-x86_64 \
		-machine pc -accel tcg -m 512 -smp 1 -net none \
		-nographic -monitor none -serial "file:$serial" -no-reboot \
		-drive "file=$disk,format=raw,if=virtio" \
		-drive "file=$iso,format=raw,if=ide,index=2,media=cdrom,readonly=on" \
		-boot order=d </dev/null >"$run/qemu-$boot_no.out" 2>&1 || rc=$?
	t1=$(date +%s.%N)
	local secs
	secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
	local got
	got=$(tr -d '\r' <"$serial" | sed -n 's/^GWQEMU-BOOTED image=\([^ ]*\) cmdline=\([^ ]*\)$/\1 \2/p' | tail -1)
	log "boot $boot_no ($name): qemu rc=$rc, ${secs}s, booted: ${got:-nothing}"
	timings+=("boot $boot_no  ${secs}s  $name")

	check "boot $boot_no ($name): QEMU powered off within ${boot_timeout}s" "$([ "$rc" = 0 ] && echo 0 || echo 1)" \
		"exit $rc$([ "$rc" = 124 ] && echo ', timed out'); serial tail: $(tr -d '\r' <"$serial" | tail -3 | tr '\n' '|')"
	if [ "$want" = - ]; then
		check "boot $boot_no ($name): no kernel ran" "$([ -z "$got" ] && echo 0 || echo 1)" "got '$got'"
	else
		check "boot $boot_no ($name): slot $want booted (initramfs and gwagent.slot=)" \
			"$([ "$got" = "$want $want" ] && echo 0 || echo 1)" "got '${got:-no GWQEMU-BOOTED line}'"
	fi
	if [ -n "$want_text" ]; then
		check "boot $boot_no ($name): GRUB said '$want_text'" \
			"$(grep -qF "$want_text" "$serial" && echo 0 || echo 1)" "not on the serial console"
	fi
	env_get
	local state
	state=$(env_state) || state="unreadable"
	if [ "$want_state" = unchanged ]; then
		check "boot $boot_no ($name): GRUB left grubenv untouched ($state)" \
			"$(cmp -s "$before" "$env_file" && echo 0 || echo 1)" "grubenv changed, now $state"
	else
		check "boot $boot_no ($name): grubenv after boot is $want_state (slot/upgrade_available/bootcount/bootlimit)" \
			"$([ "$state" = "$want_state" ] && echo 0 || echo 1)" "got $state"
	fi
	[ "$fail" = 0 ] || summary
}
# summary prints every check and the timings, then exits: 0 only if all passed.
summary() {
	echo
	echo "=== e2e-qemu: GRUB A/B under QEMU (software emulation) ==="
	printf '%s\n' "${results[@]}"
	echo "--- timings ---"
	printf '%s\n' "${timings[@]}"
	echo "total $(( $(date +%s) - t_start ))s for $boot_no boots"
	if [ "$fail" -ne 0 ]; then
		GWQEMU_KEEP=1
		echo "FAIL: $fail of $((pass + fail)) checks failed (serial logs in $run)"
		exit 1
	fi
	echo "PASS: all $pass checks"
	exit 0
}
timings=()
t_start=$(date +%s)

# 1. a committed slot A
write commit A
boot "A committed" A unchanged

# 2. trial of B
write switch B
limit=$(env_state | cut -d/ -f4)
boot "B on trial" B "B/1/1/$limit"

# 3. commit B
write commit B
boot "B committed" B unchanged

# 4. trial of A that never commits: LIMIT counted boots of A, then GRUB falls back to B.
switch_a=(switch A)
[ -z "$bootlimit_arg" ] || switch_a+=("$bootlimit_arg")
write "${switch_a[@]}"
limit=$(env_state | cut -d/ -f4)
if [ "$limit" -lt 1 ] || [ "$limit" -gt 8 ]; then die "bootlimit $limit out of the contract's 1..8"; fi
for k in $(seq 1 "$limit"); do
	boot "A trial boot $k/$limit, never committed" A "A/1/$k/$limit"
done
boot "A trial exhausted: fallback" B "B/0/$((limit + 1))/$limit" "gwagent: slot A failed $limit trial boots; falling back"

# 5. the fallback is settled: B boots again and GRUB counts nothing.
boot "after fallback" B unchanged

# 6. a trial of a slot GRUB cannot even load (its kernel is gone), with
#    bootlimit=1 written by the switch: GRUB counts the boot, the snippet's
#    second entry restarts the machine, and the next boot falls back to B.
mdel -i "$a_fs" ::/boot/vmlinuz
write switch A 1
boot "A without a kernel, trial 1/1" - "A/1/1/1" "gwagent: cannot load slot A; restarting"
boot "A without a kernel: fallback" B "B/0/2/1" "gwagent: slot A failed 1 trial boots; falling back"

summary
