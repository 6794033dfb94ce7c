#!/bin/bash
# What the firmware, the kernel and udev would do at each boot of the test
# container, before gwagent starts (gwagent-e2e-boot.service):
#  - udev: device nodes for the loop devices the test attached outside
#    (two A/B slots and one other disk), root:disk 0660 as Debian's rules
#    make them (nspawn gives the container no block devices);
#  - the kernel: a boot id of this boot (the container shares the host's
#    /proc/sys/kernel/random/boot_id, which does not change on its reboots);
#  - GRUB running packaging/bootloader/grub.cfg.snippet: count a trial boot,
#    fall back after bootlimit, and pass gwagent.slot= on the command line
#    (/run/e2e/cmdline, which the agent is configured to read).
# Each boot is logged to /mnt/out/bootloader.log.
set -u
. /mnt/in/env
mkdir -p /run/e2e
log() { echo "boot $(cat /run/e2e/boot_id): $*" >>/mnt/out/bootloader.log; }

cat /proc/sys/kernel/random/uuid >/run/e2e/boot_id

for dev in "$SLOT_A=$SLOT_A_NUM" "$SLOT_B=$SLOT_B_NUM" "$OTHER_DISK=$OTHER_DISK_NUM"; do
	path=${dev%=*} num=${dev#*=}
	[ -e "$path" ] || mknod "$path" b "${num%:*}" "${num#*:}"
	chown root:disk "$path"
	chmod 0660 "$path"
done

env=/boot/grub/grubenv
slot=A
if [ -f "$env" ]; then
	gw_slot= upgrade_available= bootcount= bootlimit=
	while IFS='=' read -r k v; do
		case $k in gw_slot | upgrade_available | bootcount | bootlimit) printf -v "$k" '%s' "$v" ;; esac
	done < <(grub-editenv "$env" list)
	log "read gw_slot=$gw_slot upgrade_available=$upgrade_available bootcount=$bootcount bootlimit=$bootlimit"
	case $gw_slot in A | B) ;; *) gw_slot=A ;; esac
	bootlimit=${bootlimit:-3} bootcount=${bootcount:-0}
	if [ "$upgrade_available" = 1 ]; then
		bootcount=$((bootcount + 1))
		if [ "$bootcount" -gt "$bootlimit" ]; then
			log "slot $gw_slot failed $bootlimit trial boots; falling back"
			if [ "$gw_slot" = A ]; then gw_slot=B; else gw_slot=A; fi
			upgrade_available=0
		fi
		grub-editenv "$env" set "gw_slot=$gw_slot" "upgrade_available=$upgrade_available" "bootcount=$bootcount"
	fi
	slot=$gw_slot
fi
root=$SLOT_A
[ "$slot" = B ] && root=$SLOT_B
echo "root=$root ro gwagent.slot=$slot" >/run/e2e/cmdline
log "booting slot $slot ($(cat /run/e2e/cmdline))"
