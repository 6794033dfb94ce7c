package installer

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/firmware/abpart"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Access is what the agent's own user must be able to open for the
// configured installer, and what it must not. The agent runs unprivileged;
// the unit's start-up step, run as root before each start, grants exactly
// this (see packaging/grant-access). Which slot is inactive changes when an
// update is committed, hence a grant at each start rather than a fixed one.
type Access struct {
	// Write are the devices and files the agent reads and writes: the
	// inactive slot and the bootloader environment.
	Write []string
	// Deny are the devices the agent must not open at all: the running slot
	// (or both slots when the running one cannot be told).
	Deny []string
	// Lock is a lock file the bootloader tool opens for writing, if any.
	Lock string
	// Notes say what is not granted and why, for the journal.
	Notes []string
}

// fwLock is where libubootenv's fw_printenv and fw_setenv take their lock.
const fwLock = "/var/lock/fw_printenv.lock"

// NeededAccess is the access the installer configured in c needs. It reads
// the kernel command line (or abpart.runningSlot) to tell the running slot,
// and fw_env.config for U-Boot, and opens no slot.
func NeededAccess(c config.Installer) (Access, error) {
	return neededAccess(c, "/sys/dev/block")
}

// neededAccess is NeededAccess with sysfs's block-device folder as a
// parameter, for tests.
func neededAccess(c config.Installer, sysBlock string) (Access, error) {
	if _, ok := backends[c.Type]; !ok {
		return Access{}, fmt.Errorf("%w: installer.type: unknown installer %q (known: %s)", config.ErrConfig, c.Type, strings.Join(Names(), ", "))
	}
	if c.Type != "abpart" {
		// The simulated installer touches no device.
		return Access{}, nil
	}
	var s abpartSettings
	if err := decode("abpart", c.Settings, &s); err != nil {
		return Access{}, err
	}
	var a Access
	found, ferr := abpart.FindSlots(s.Config)
	slots := []string{found.SlotA, found.SlotB}
	running, err := abpart.RunningSlot(s.Config)
	switch {
	case ferr != nil:
		slots = nil
		a.Notes = append(a.Notes, fmt.Sprintf("no slot granted: %v", ferr))
	case err != nil:
		a.Deny = append(a.Deny, slots...)
		a.Notes = append(a.Notes, fmt.Sprintf("no slot granted: %v", err))
	case running == bootenv.SlotA:
		a.Write, a.Deny = append(a.Write, found.SlotB), append(a.Deny, found.SlotA)
	default:
		a.Write, a.Deny = append(a.Write, found.SlotA), append(a.Deny, found.SlotB)
	}

	switch s.Bootenv.Backend {
	case "grub":
		f := s.Bootenv.GRUB.EnvFile
		if f == "" {
			f = "/boot/grub/grubenv"
		}
		a.Write = append(a.Write, f)
	case "file":
		// A test backend: it replaces the file, so its folder must be
		// writable too, which a grant on the file does not give.
		if s.Bootenv.File.Path != "" {
			a.Write = append(a.Write, s.Bootenv.File.Path)
		}
	case "uboot":
		cfgFile := s.Bootenv.UBoot.ConfigFile
		if cfgFile == "" {
			cfgFile = "/etc/fw_env.config"
		}
		devs, err := fwEnvDevices(cfgFile)
		if err != nil {
			a.Notes = append(a.Notes, fmt.Sprintf("bootloader environment not granted: %v", err))
			break
		}
		for _, d := range devs {
			if why := holdsSlot(d, slots, sysBlock); why != "" {
				a.Notes = append(a.Notes, fmt.Sprintf("bootloader environment %s not granted: %s; keep the environment in a partition or file of its own", d, why))
				continue
			}
			a.Write = append(a.Write, d)
		}
		a.Lock = fwLock
	}
	return a, nil
}

// fwEnvDevices lists the devices (or files) of a fw_env.config: the first
// field of each line that is not blank or a comment.
func fwEnvDevices(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		if fields := strings.Fields(line); len(fields) > 0 {
			out = append(out, fields[0])
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s names no device", path)
	}
	return out, nil
}

// holdsSlot says why granting dev would also grant a slot: dev is one of
// them, or the whole disk a slot partition is on (U-Boot's environment is
// often at an offset of the raw eMMC). Empty: it holds none.
func holdsSlot(dev string, slots []string, sysBlock string) string {
	fi, err := os.Stat(dev)
	if err != nil || fi.Mode()&fs.ModeDevice == 0 || fi.Mode()&fs.ModeCharDevice != 0 {
		return "" // a file or a character device (MTD flash)
	}
	devSys, err := sysPath(fi, sysBlock)
	if err != nil {
		return ""
	}
	for _, s := range slots {
		sfi, err := os.Stat(s)
		if err != nil {
			continue
		}
		if dst, sst := fi.Sys().(*syscall.Stat_t), sfi.Sys().(*syscall.Stat_t); sfi.Mode()&fs.ModeDevice != 0 && dst.Rdev == sst.Rdev {
			return "it is slot " + s
		}
		if slotSys, err := sysPath(sfi, sysBlock); err == nil && filepath.Dir(slotSys) == devSys {
			return "it is the whole disk that holds slot " + s
		}
	}
	return ""
}

// sysPath is the resolved sysfs folder of a block device: a partition's
// folder is inside its disk's.
func sysPath(fi fs.FileInfo, sysBlock string) (string, error) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || fi.Mode()&fs.ModeDevice == 0 || fi.Mode()&fs.ModeCharDevice != 0 {
		return "", fmt.Errorf("not a block device")
	}
	return filepath.EvalSymlinks(filepath.Join(sysBlock, fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))))
}
