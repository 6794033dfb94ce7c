#!/usr/bin/env bash
# Build, or reuse from the cache, the reference A/B disk and the update images
# that the full-system VM test (test/vm, `make e2e-vm`) boots, the way an
# integrator would (docs/reference-disk.md):
#
#   rootfs   debootstrap of Debian bookworm: systemd, udev, the kernel, a small
#            initramfs, grub-common (grub-editenv), qemu-guest-agent and
#            what the package depends on or recommends (acl, polkitd with
#            logind's PAM module, so the agent's user may reboot); the
#            kernel modules pruned to what a QEMU virtio machine needs.
#   system   the rootfs with the gwagent .deb installed (dpkg -i) and the
#            files of test/vm/guest: agent configuration, unit drop-in, fstab,
#            network, the application's health probe, the trusted minisign key.
#   images   one ext4 file system per root image, made from the system tree
#            with mkfs.ext4 -d (only as large as its files: the root grows to
#            its slot at boot), each with its own /etc/gw-image and
#            currentVersion: rootA-1.0.0 (the factory image) and the update
#            images, each also compressed with zstd; every file signed with
#            minisign (key pair made once, kept in the cache).
#   disk     a GPT disk: boot (ext4: GRUB's grub.cfg with the shipped A/B
#            snippet, grubenv, modules), rootA (the factory image), rootB
#            (empty), data (empty; the test writes the device's own), and a
#            BIOS boot partition holding GRUB's core image, with GRUB's boot
#            sector in the MBR: the disk boots by itself, as grub-install
#            would leave it.
#
# Each stage lives in $BUILD/vm under a name keyed by a hash of its inputs
# (the stage's own code included), so a new .deb rebuilds system, images and
# disk but not the rootfs. Stale stages are deleted.
#
#   test/vm/build.sh DEB      (as root)
#
# Prints KEY=VALUE lines on stdout (disk, images, layout); progress on stderr.
# Environment: BUILD (default <repo>/build), MIRROR (default: the first
# Debian mirror in /etc/apt).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${BUILD:-$root/build}
case $build in /*) ;; *) build=$root/$build ;; esac
cache=$build/vm
snippet=$root/packaging/bootloader/grub.cfg.snippet

log() { printf '%s [e2e-vm build] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ $# = 1 ] || die "usage: $0 DEB"
deb=$(realpath "$1")
[ -f "$deb" ] || die "no package $deb"
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, dpkg)"
for t in debootstrap mkfs.ext4 sfdisk grub-mkimage grub-editenv grub-script-check minisign zstd; do
	command -v "$t" >/dev/null || die "$t not found (make e2e-vm installs it)"
done
mkdir -p "$cache"

# key NAME INPUT... : a short hash of a stage's code and its inputs.
key() {
	local f=$1
	shift
	{ declare -f "$f"; printf '%s\n' "$@"; } | sha256sum | cut -c1-16
}
# tree_hash DIR: hash of the names, modes and contents of the files in DIR.
tree_hash() {
	(cd "$1" && find . -type f -printf '%p %m\n' -exec sha256sum {} \; | LC_ALL=C sort) | sha256sum | cut -c1-16
}
# sweep PREFIX KEEP: delete the stale PREFIX* entries of the cache.
sweep() {
	local p
	for p in "$cache/$1"*; do
		[ -e "$p" ] || continue
		[ "$p" = "$2" ] || { log "removing stale $(basename "$p")"; rm -rf "$p"; }
	done
}

# --- rootfs ---------------------------------------------------------------------
rootfs_include=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,zstd,ca-certificates,grub-common,qemu-guest-agent,libpam-systemd,acl,polkitd
# Modules a QEMU virtio machine needs (their dependencies come along): the
# disk, the file system, the network, virtio-serial (qemu-guest-agent) and rng.
rootfs_modules="virtio_pci virtio_blk virtio_net virtio_console virtio_rng ext4 crc32c_generic crc32c_intel autofs4"

mirror=${MIRROR:-}
if [ -z "$mirror" ]; then
	mirror=$(
		{
			cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}'
			cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
				awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }'
		} | awk '!/security|updates/ && !found { print; found = 1 }'
	) || true
fi
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt; set MIRROR"

stage_debootstrap() { # DIR
	local dir=$1
	debootstrap --variant=minbase --include="$rootfs_include" bookworm "$dir" "$mirror" >"$dir.log" 2>&1 || {
		tail -n 30 "$dir.log" >&2
		die "debootstrap failed (log: $dir.log)"
	}
	rm -f "$dir.log"
}
debootstrap_key=$(key stage_debootstrap "$rootfs_include" "$mirror")
debootstrap=$cache/debootstrap-$debootstrap_key
if [ ! -f "$debootstrap/.gw-complete" ]; then
	sweep debootstrap- /nonexistent
	log "debootstrap: bookworm from $mirror (about a minute and a half, once)"
	t0=$SECONDS
	stage_debootstrap "$debootstrap.tmp"
	touch "$debootstrap.tmp/.gw-complete"
	mv "$debootstrap.tmp" "$debootstrap"
	log "debootstrap: done in $((SECONDS - t0))s"
fi
sweep debootstrap- "$debootstrap"

stage_rootfs() { # DIR
	local dir=$1 kv m keep
	cp -a "$debootstrap" "$dir"
	rm -f "$dir/.gw-complete"
	kv=$(basename "$(echo "$dir"/lib/modules/*)")
	# Keep only the modules the VM needs, then a small initramfs with them.
	keep=$(for m in $rootfs_modules; do chroot "$dir" modprobe -S "$kv" --show-depends "$m" || exit 1; done) ||
		die "cannot resolve the kernel modules $rootfs_modules in the image"
	keep=$(awk '$1 == "insmod" {print $2}' <<<"$keep" | sort -u)
	[ -n "$keep" ] || die "no kernel modules resolved in $dir"
	mkdir "$dir/keep"
	for m in $keep; do
		mkdir -p "$dir/keep$(dirname "$m")"
		cp -a "$dir$m" "$dir/keep$m"
	done
	rm -rf "$dir/lib/modules/$kv/kernel"
	cp -a "$dir/keep/lib/modules/$kv/kernel" "$dir/lib/modules/$kv/"
	rm -rf "$dir/keep"
	chroot "$dir" depmod "$kv"
	echo "MODULES=list" >"$dir/etc/initramfs-tools/conf.d/gw-vm.conf"
	printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >>"$dir/etc/initramfs-tools/modules"
	chroot "$dir" update-initramfs -u -k "$kv" >/dev/null
	# GRUB boots the slot's /boot/vmlinuz and /boot/initrd.img (the snippet's gw_kernel, gw_initrd).
	ln -sf "vmlinuz-$kv" "$dir/boot/vmlinuz"
	ln -sf "initrd.img-$kv" "$dir/boot/initrd.img"
	rm -f "$dir/boot/System.map-$kv" "$dir/boot/config-$kv"
	# What an image does not need.
	rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* \
		"$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log
	find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
	# udev's hardware database (22 MB) names hardware a virtio machine does not have.
	rm -rf "$dir/usr/lib/udev/hwdb.bin" "$dir/usr/lib/udev/hwdb.d" "$dir/etc/udev/hwdb.bin"
	# No background jobs on a test gateway (timers would fetch from the network).
	for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer e2scrub_reap.service getty@tty1.service; do
		ln -sf /dev/null "$dir/etc/systemd/system/$u"
	done
	echo "$kv" >"$dir/.gw-kernel"
}
rootfs_key=$(key stage_rootfs "$debootstrap_key" "$rootfs_modules")
rootfs=$cache/rootfs-$rootfs_key
if [ ! -f "$rootfs/.gw-complete" ]; then
	log "rootfs: kernel modules pruned, small initramfs, no caches"
	rm -rf "$rootfs.tmp"
	t0=$SECONDS
	stage_rootfs "$rootfs.tmp"
	touch "$rootfs.tmp/.gw-complete"
	mv "$rootfs.tmp" "$rootfs"
	log "rootfs: done in $((SECONDS - t0))s, $(du -sm "$rootfs" | cut -f1) MiB"
fi
sweep rootfs- "$rootfs"

# --- signing key (made once) -------------------------------------------------------
keys=$cache/keys
if [ ! -s "$keys/gw-vm.pub" ] || [ ! -s "$keys/gw-vm.sec" ]; then
	log "making the minisign key pair"
	rm -rf "$keys"
	mkdir -p "$keys.tmp"
	minisign -G -W -p "$keys.tmp/gw-vm.pub" -s "$keys.tmp/gw-vm.sec" >/dev/null
	mv "$keys.tmp" "$keys"
fi

# --- system --------------------------------------------------------------------------
stage_system() { # DIR
	local dir=$1
	cp -a "$rootfs" "$dir"
	rm -f "$dir/.gw-complete"
	cp "$deb" "$dir/tmp/gwagent.deb"
	chroot "$dir" dpkg -i /tmp/gwagent.deb >"$dir.dpkg.log" 2>&1 || {
		cat "$dir.dpkg.log" >&2
		die "dpkg -i $(basename "$deb") failed in the image"
	}
	rm -f "$dir/tmp/gwagent.deb" "$dir.dpkg.log"
	cp -r "$here/guest/." "$dir/"
	chown -R root:root "$dir/etc"
	mkdir -p "$dir/boot/grub" "$dir/data" "$dir/var/lib/gwagent"
	install -m 0644 "$keys/gw-vm.pub" "$dir/etc/gwagent/keys/gw-vm.pub"
	chroot "$dir" systemctl enable systemd-networkd.service gw-app.service gw-journal-serial.service >/dev/null 2>&1
	chroot "$dir" systemctl is-enabled gwagent.service >/dev/null || die "the package did not enable gwagent.service"
	: >"$dir/etc/machine-id" # each slot's systemd makes its own at first boot
}
deb_sum=$(sha256sum "$deb" | cut -c1-16)
system_key=$(key stage_system "$rootfs_key" "$deb_sum" "$(tree_hash "$here/guest")" "$(cat "$keys/gw-vm.pub")")
system=$cache/system-$system_key
if [ ! -f "$system/.gw-complete" ]; then
	log "system: installing $(basename "$deb") and test/vm/guest into a copy of the rootfs"
	rm -rf "$system.tmp"
	stage_system "$system.tmp"
	touch "$system.tmp/.gw-complete"
	mv "$system.tmp" "$system"
fi
sweep system- "$system"

# --- images ----------------------------------------------------------------------------
# NAME-VERSION:KIND. good: the system as it is; unhealthy: the application's
# health probe fails; badkernel: /boot/vmlinuz is not a kernel GRUB can load.
# The device type every image is signed for (test/vm/guest's
# device.compatible).
compatible=gwagent-reference-x86
# sign FILE VERSION COMPATIBLE [SIGFILE]: a minisign signature whose trusted
# comment is gwagent's metadata (docs/signing.md), made with the stock tool.
sign() {
	minisign -S -s "$keys/gw-vm.sec" -m "$1" -x "${4:-$1.minisig}" \
		-t "gwagent-manifest:{\"version\":\"$2\",\"compatible\":[\"$3\"]}" >/dev/null </dev/null
}
image_list="rootA-1.0.0:good good-2.0.0:good unhealthy-3.0.0:unhealthy badkernel-4.0.0:badkernel good-5.0.0:good good-6.0.0:good good-7.0.0:good"
stage_images() { # DIR
	local dir=$1 spec name kind version tree mib inodes
	mkdir -p "$dir"
	for spec in $image_list; do
		name=${spec%%:*} kind=${spec#*:} version=${name##*-}
		tree=$dir/tree
		rm -rf "$tree"
		cp -a "$system" "$tree"
		rm -f "$tree/.gw-complete"
		echo "$name $version" >"$tree/etc/gw-image"
		sed "s/@VERSION@/$version/" "$tree/etc/gwagent/config.yaml.in" >"$tree/etc/gwagent/config.yaml"
		rm "$tree/etc/gwagent/config.yaml.in"
		case $kind in
		good) ;;
		unhealthy) cp -r "$here/variants/unhealthy/." "$tree/" ;;
		badkernel)
			rm -f "$tree/boot/vmlinuz"
			head -c 4194304 /dev/urandom >"$tree/boot/vmlinuz"
			;;
		*) die "unknown image kind $kind" ;;
		esac
		# The file system: just what the tree holds (every byte of an image
		# is downloaded, hashed, written and read back); the root grows to
		# its slot at first boot (x-systemd.growfs in fstab).
		mib=$(( $(du -sm "$tree" | cut -f1) * 21 / 20 + 24 ))
		inodes=$(( $(find "$tree" | wc -l) + 4096 ))
		mkfs.ext4 -q -F -T default -N "$inodes" -L "gw-$version" -d "$tree" "$dir/$name.img" "${mib}M" >/dev/null
		rm -rf "$tree"
		# Signed with gwagent's metadata in the trusted comment: the version
		# and the device type it fits (the guest's device.compatible).
		sign "$dir/$name.img" "$version" "$compatible"
		# The same image compressed, as a server would rather send it (the
		# agent decompresses while downloading; the signature covers the
		# file as served).
		if [ "$name" != rootA-1.0.0 ]; then
			zstd -q -T0 "$dir/$name.img" -o "$dir/$name.img.zst"
			sign "$dir/$name.img.zst" "$version" "$compatible"
		fi
		# One image also signed for another device type, which the device
		# must refuse before downloading it.
		if [ "$name" = unhealthy-3.0.0 ]; then
			sign "$dir/$name.img.zst" "$version" other-board "$dir/$name.img.zst.other-board.minisig"
		fi
	done
}
images_key=$(key stage_images "$system_key" "$image_list" "$compatible" "$(declare -f sign)" "$(tree_hash "$here/variants")")
images=$cache/images-$images_key
if [ ! -f "$images/.gw-complete" ]; then
	log "images: $(wc -w <<<"$image_list") root file systems (mkfs.ext4 -d), signed"
	rm -rf "$images.tmp"
	t0=$SECONDS
	stage_images "$images.tmp"
	touch "$images.tmp/.gw-complete"
	mv "$images.tmp" "$images"
	log "images: done in $((SECONDS - t0))s"
fi
sweep images- "$images"

# --- disk --------------------------------------------------------------------------------
# Layout in 512-byte sectors (GPT partition numbers as the GRUB snippet's
# defaults expect: boot gpt1, rootA gpt2, rootB gpt3).
boot_start=2048 boot_size=131072   #  64 MiB
a_start=133120 a_size=1048576      # 512 MiB
b_start=1181696 b_size=1048576     # 512 MiB
data_start=2230272 data_size=262144 # 128 MiB
bios_start=2492416 bios_size=2048  #   1 MiB, GRUB's core image
disk_sectors=$((bios_start + bios_size + 2048))
# The kernel command line of the slots: serial console; a panic reboots, so a
# kernel that cannot mount its root still gets counted by GRUB.
cmdline='ro console=ttyS0,115200 panic=10'

stage_disk() { # FILE
	local disk=$1 bootdir cfg changed core sectors setting
	truncate -s $((disk_sectors * 512)) "$disk"
	sfdisk -q --no-reread --no-tell-kernel "$disk" <<-EOF
		label: gpt
		start=$boot_start, size=$boot_size, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=boot
		start=$a_start, size=$a_size, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=rootA
		start=$b_start, size=$b_size, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=rootB
		start=$data_start, size=$data_size, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=data
		start=$bios_start, size=$bios_size, type=21686148-6449-6E6F-744E-656564454649, name=bios
	EOF

	# The boot partition: what `grub-install --boot-directory=/boot` puts in
	# /boot/grub (the partition is mounted there), the grub.cfg and grubenv.
	bootdir=$disk.boot
	rm -rf "$bootdir"
	mkdir -p "$bootdir/i386-pc"
	cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$bootdir/i386-pc/"
	# The shipped snippet with only gw_cmdline adapted: every other setting
	# (devices gpt2/gpt3, root=PARTLABEL=rootA|rootB, /boot/vmlinuz,
	# /boot/initrd.img) is this disk's layout.
	cfg=$bootdir/gwagent-ab.cfg
	sed '/^# --- integrator settings/,/^# -----/ s|^set gw_cmdline=.*|set gw_cmdline="'"$cmdline"'"|' "$snippet" >"$cfg"
	changed=$(diff "$snippet" "$cfg" | grep -c '^[<>]' || true)
	[ "$changed" = 2 ] || die "expected to adapt exactly the gw_cmdline line of the snippet, changed $changed lines"
	for setting in 'gw_dev_A=(hd0,gpt2)' 'gw_dev_B=(hd0,gpt3)' 'gw_root_A=PARTLABEL=rootA' 'gw_root_B=PARTLABEL=rootB' \
		'gw_kernel=/boot/vmlinuz' 'gw_initrd=/boot/initrd.img'; do
		grep -qx "set $setting" "$cfg" || die "snippet setting 'set $setting' changed: adapt the disk layout to it"
	done
	{
		echo '# /boot/grub/grub.cfg of the gwagent reference A/B disk (test/vm/build.sh):'
		echo '# a serial console for a headless gateway, then the A/B snippet.'
		echo 'serial --unit=0 --speed=115200'
		echo 'terminal_input serial console'
		echo 'terminal_output serial console'
		# shellcheck disable=SC2016 # GRUB's variables
		echo 'echo "gw-vm: grub.cfg from $prefix, gw_slot to be read from $prefix/grubenv"'
		cat "$cfg"
	} >"$bootdir/grub.cfg"
	rm "$cfg"
	grub-script-check "$bootdir/grub.cfg" || die "grub-script-check rejects grub.cfg"
	grub-editenv "$bootdir/grubenv" create
	grub-editenv "$bootdir/grubenv" set gw_slot=A upgrade_available=0 bootcount=0
	mkfs.ext4 -q -F -L boot -d "$bootdir" "$disk.bootfs" $((boot_size / 2))k >/dev/null
	dd if="$disk.bootfs" of="$disk" bs=512 seek=$boot_start conv=notrunc,sparse status=none
	rm -rf "$bootdir" "$disk.bootfs"

	# Slot A: the factory image. Slot B stays empty until the first update.
	dd if="$images/rootA-1.0.0.img" of="$disk" bs=1M seek=$((a_start * 512)) oflag=seek_bytes conv=notrunc,sparse status=none

	# GRUB's boot sector and core image, as grub-bios-setup embeds them
	# (grub-install needs the disk as a block device): the core image goes to
	# the BIOS boot partition; the boot sector (first 440 bytes: the protective
	# MBR's partition table stays) learns the core's first sector at 0x5c,
	# and the core's first sector (diskboot) the sectors of the rest at 0x1f4.
	core=$disk.core
	grub-mkimage -O i386-pc -o "$core" -p '(hd0,gpt1)/' biosdisk part_gpt ext2
	sectors=$(( ($(stat -c %s "$core") + 511) / 512 ))
	[ "$sectors" -le "$bios_size" ] || die "GRUB core image ($sectors sectors) larger than the BIOS boot partition"
	dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
	le64 "$bios_start" | dd of="$disk" bs=1 seek=$((0x5c)) conv=notrunc status=none
	dd if="$core" of="$disk" bs=512 seek=$bios_start conv=notrunc status=none
	le64 $((bios_start + 1)) | dd of="$disk" bs=1 seek=$((bios_start * 512 + 0x1f4)) conv=notrunc status=none
	le16 $((sectors - 1)) | dd of="$disk" bs=1 seek=$((bios_start * 512 + 0x1fc)) conv=notrunc status=none
	rm -f "$core"
}
# le64/le16 VALUE: the little-endian bytes of VALUE.
le64() { lebytes "$1" 8; }
le16() { lebytes "$1" 2; }
lebytes() {
	local i
	for ((i = 0; i < $2; i++)); do
		# shellcheck disable=SC2059 # the format is the byte
		printf "\\x$(printf %02x $((($1 >> (8 * i)) & 255)))"
	done
}
disk_key=$(key stage_disk "$images_key" "$(sha256sum "$snippet")" "$(dpkg-query -W -f='${Version}' grub-pc-bin)" \
	"$cmdline" "$boot_start $a_start $b_start $data_start $bios_start $disk_sectors" "$(declare -f lebytes)")
disk=$cache/disk-$disk_key.img
if [ ! -f "$disk" ]; then
	log "disk: GPT, GRUB in the MBR and BIOS boot partition, boot partition, slot A"
	rm -f "$disk.tmp"
	stage_disk "$disk.tmp"
	mv "$disk.tmp" "$disk"
fi
sweep disk- "$disk"

kv=$(cat "$rootfs/.gw-kernel")
gwuid=$(awk -F: '$1 == "gwagent" {print $3 ":" $4}' "$system/etc/passwd")
cat <<EOF
disk=$disk
images=$images
kernel=$kv
agent_owner=${gwuid:-0:0}
data_offset=$((data_start * 512))
data_size=$((data_size * 512))
image_bytes_rootA=$(stat -c %s "$images/rootA-1.0.0.img")
EOF
