package abpart

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// sysBlock is where the kernel publishes block devices by number.
const sysBlock = "/sys/dev/block"

// sizeFromSysfs is the size of a slot that is a block device, read from
// sysfs (SYSBLOCK/MAJ:MIN/size, in 512-byte sectors whatever the device's
// block size). It is how the size of a slot the agent may not open is
// known: run unprivileged, the agent is given the inactive slot only, yet
// Check compares an image with both slots.
func (i *Installer) sizeFromSysfs(slot string, fi fs.FileInfo) (int64, error) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || fi.Mode()&fs.ModeDevice == 0 || fi.Mode()&fs.ModeCharDevice != 0 {
		return 0, fmt.Errorf("abpart: slot %s is not a block device", slot)
	}
	p := fmt.Sprintf("%s/%d:%d/size", sysBlock, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("abpart: size of slot %s: %w", slot, err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || sectors < 0 {
		return 0, fmt.Errorf("abpart: size of slot %s: %s holds %q", slot, p, b)
	}
	return sectors * 512, nil
}

// capacityUnopened answers capacity for a block device slot that cannot be
// opened for lack of permission (openErr), from sysfs; any other failure is
// openErr.
func (i *Installer) capacityUnopened(slot string, openErr error) (int64, error) {
	if !errors.Is(openErr, fs.ErrPermission) || i.cfg.SlotType != SlotTypeBlock {
		return 0, openErr
	}
	fi, err := i.statSlot(slot)
	if err != nil {
		return 0, openErr
	}
	n, err := i.sizeFromSysfs(slot, fi)
	if err != nil {
		return 0, errors.Join(openErr, err)
	}
	return n, nil
}
