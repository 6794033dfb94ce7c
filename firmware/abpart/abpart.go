package abpart

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"syscall"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Slot types.
const (
	SlotTypeBlock = "block" // the default: a slot is a block device
	SlotTypeFile  = "file"  // a slot is an existing regular file (tests, images)
)

// Config configures the installer. Keys are under "abpart".
type Config struct {
	// SlotA and SlotB are the two slots, e.g. /dev/mmcblk0p2 and /dev/mmcblk0p3.
	SlotA string `yaml:"slotA" mapstructure:"slotA"`
	SlotB string `yaml:"slotB" mapstructure:"slotB"`
	// SlotType is "block" (default: a path that is not a block device is
	// refused) or "file".
	SlotType string `yaml:"slotType" mapstructure:"slotType"`
	// RootA and RootB are the root= values on the kernel command line that
	// mean slot A and B (e.g. PARTUUID=…). Default: SlotA and SlotB.
	RootA string `yaml:"rootA" mapstructure:"rootA"`
	RootB string `yaml:"rootB" mapstructure:"rootB"`
	// RunningSlot, when set, is the running slot ("A" or "B") and the kernel
	// command line is not read.
	RunningSlot string `yaml:"runningSlot" mapstructure:"runningSlot"`
	// CmdlinePath is read to find the running slot (default /proc/cmdline).
	CmdlinePath string `yaml:"cmdlinePath" mapstructure:"cmdlinePath"`
	// BootIDPath tells one boot from the next (default
	// /proc/sys/kernel/random/boot_id).
	BootIDPath string `yaml:"bootIdPath" mapstructure:"bootIdPath"`
	// StateDir holds abpart.json, the record of the switch (required).
	StateDir string `yaml:"stateDir" mapstructure:"stateDir"`
	// LabelA and LabelB are the GPT partition names (PARTLABEL) of the
	// slots, looked up in PartlabelDir for a slot whose SlotA or SlotB is
	// empty. Default: rootA and rootB, as on the reference disk.
	LabelA string `yaml:"labelA" mapstructure:"labelA"`
	LabelB string `yaml:"labelB" mapstructure:"labelB"`
	// PartlabelDir is where partitions are linked by GPT name (udev's
	// /dev/disk/by-partlabel, the default).
	PartlabelDir string `yaml:"partlabelDir" mapstructure:"partlabelDir"`
	// BootLimit, when > 0, is written as bootlimit with each switch; 0 leaves
	// the bootloader's value (the shipped scripts default to 3).
	BootLimit int `yaml:"bootLimit" mapstructure:"bootLimit"`

	// found are the slots FindSlots found by label: slot name → label.
	found map[string]string
}

// Deps are the installer's collaborators.
type Deps struct {
	// Env is the bootloader environment (required).
	Env bootenv.Env
	// Rebooter restarts the device; nil means CommandRebooter (systemctl reboot).
	Rebooter firmware.Rebooter
	// Log is the component logger; nil discards.
	Log *zap.Logger
}

// Errors.
var (
	ErrConfig         = errors.New("abpart: bad config")
	ErrNotBlockDevice = errors.New("abpart: slot is not a block device")
	ErrTooLarge       = errors.New("abpart: image larger than the slot")
	ErrRunningSlot    = errors.New("abpart: cannot tell the running slot")
	ErrActiveSlot     = errors.New("abpart: refusing to write the active slot")
	ErrInconsistent   = errors.New("abpart: bootloader environment and running slot disagree")
	ErrVerify         = errors.New("abpart: slot does not hold the verified image")
	ErrNoSwitch       = errors.New("abpart: no switch recorded for this update")
	// ErrRolledBackByBootloader: the trial slot did not come up and the
	// bootloader returned to the previous slot by itself.
	// It is firmware.ErrBootloaderFellBack, so the update ends failed.
	ErrRolledBackByBootloader = firmware.ErrBootloaderFellBack
	// ErrBootloaderIgnored: the device restarted but the bootloader neither
	// booted nor counted the trial slot (the A/B script is not installed).
	ErrBootloaderIgnored = errors.New("abpart: bootloader ignored the trial boot")
)

// Installer writes the inactive slot and switches the bootloader. It
// implements firmware.Installer and the abilities Checker, Preparer,
// ReadBacker, Rebooter, Committer, RollBacker and Slotted.
type Installer struct {
	cfg    Config
	env    bootenv.Env
	reboot firmware.Rebooter
	log    *zap.Logger
	paths  map[string]string // slot name → path
	roots  map[string]string // slot name → root= value

	mu sync.Mutex // serialises the methods: each reads then writes the env and the record
}

var (
	_ firmware.Installer  = (*Installer)(nil)
	_ firmware.Checker    = (*Installer)(nil)
	_ firmware.Preparer   = (*Installer)(nil)
	_ firmware.ReadBacker = (*Installer)(nil)
	_ firmware.Rebooter   = (*Installer)(nil)
	_ firmware.Committer  = (*Installer)(nil)
	_ firmware.RollBacker = (*Installer)(nil)
	_ firmware.Slotted    = (*Installer)(nil)
)

// New checks cfg (a bad value is an error naming its key) and returns the
// installer. Both slots must exist and be of SlotType.
func New(cfg Config, deps Deps) (*Installer, error) {
	i, err := check(cfg, deps)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(i.cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: abpart.stateDir: %w", ErrConfig, err)
	}
	return i, nil
}

// check is New without creating the state folder.
func check(cfg Config, deps Deps) (*Installer, error) {
	if deps.Env == nil {
		return nil, fmt.Errorf("%w: no bootloader environment", ErrConfig)
	}
	if deps.Log == nil {
		deps.Log = zap.NewNop()
	}
	deps.Log = deps.Log.Named("abpart")
	if deps.Rebooter == nil {
		deps.Rebooter = CommandRebooter{}
	}
	cfg, err := FindSlots(cfg)
	if err != nil {
		return nil, err
	}
	cfg.setDefaults()
	switch {
	case cfg.SlotType != SlotTypeBlock && cfg.SlotType != SlotTypeFile:
		return nil, fmt.Errorf("%w: abpart.slotType %q (known: %s, %s)", ErrConfig, cfg.SlotType, SlotTypeBlock, SlotTypeFile)
	case cfg.RunningSlot != "" && !bootenv.ValidSlot(cfg.RunningSlot):
		return nil, fmt.Errorf("%w: abpart.runningSlot %q (want %s or %s)", ErrConfig, cfg.RunningSlot, bootenv.SlotA, bootenv.SlotB)
	case cfg.StateDir == "":
		return nil, fmt.Errorf("%w: abpart.stateDir is required", ErrConfig)
	case cfg.BootLimit < 0 || cfg.BootLimit > 8:
		// The U-Boot script counts with setexpr, which prints hexadecimal,
		// and compares with test, which reads decimal: they agree up to 9,
		// the highest count a limit of 8 reaches.
		return nil, fmt.Errorf("%w: abpart.bootLimit %d (want 0 to 8; 0 leaves the bootloader's)", ErrConfig, cfg.BootLimit)
	}
	i := &Installer{
		cfg:    cfg,
		env:    deps.Env,
		reboot: deps.Rebooter,
		log:    deps.Log,
		paths:  cfg.slotPaths(),
		roots:  map[string]string{bootenv.SlotA: cfg.RootA, bootenv.SlotB: cfg.RootB},
	}
	a, err := i.statSlot(bootenv.SlotA)
	if err != nil {
		return nil, fmt.Errorf("abpart.slotA: %w", err)
	}
	b, err := i.statSlot(bootenv.SlotB)
	if err != nil {
		return nil, fmt.Errorf("abpart.slotB: %w", err)
	}
	if sameDevice(a, b) {
		return nil, fmt.Errorf("%w: abpart.slotA and abpart.slotB are the same %s", ErrConfig, cfg.SlotType)
	}
	return i, nil
}

// statSlot checks that the slot exists and is of the configured type. A
// /dev path that is a regular file is the classic trap (writing to a
// partition node that does not exist creates a file), hence the check on
// every open, not only at start.
func (i *Installer) statSlot(slot string) (fs.FileInfo, error) {
	p := i.paths[slot]
	fi, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("slot %s: %w", slot, err)
	}
	return fi, i.checkType(slot, fi)
}

func (i *Installer) checkType(slot string, fi fs.FileInfo) error {
	p := i.paths[slot]
	switch i.cfg.SlotType {
	case SlotTypeBlock:
		if fi.Mode()&fs.ModeDevice == 0 || fi.Mode()&fs.ModeCharDevice != 0 {
			return fmt.Errorf("%w: slot %s %s is %s", ErrNotBlockDevice, slot, p, describeMode(fi.Mode()))
		}
	default:
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%w: slot %s %s is %s, want a regular file (abpart.slotType=file)", ErrConfig, slot, p, describeMode(fi.Mode()))
		}
	}
	return nil
}

func describeMode(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "a regular file"
	case m.IsDir():
		return "a directory"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	}
	return "of type " + m.Type().String()
}

// sameDevice reports whether two slot stats name the same storage: the same
// device number for block devices, the same inode otherwise.
func sameDevice(a, b fs.FileInfo) bool {
	sa, okA := a.Sys().(*syscall.Stat_t)
	sb, okB := b.Sys().(*syscall.Stat_t)
	if okA && okB && a.Mode()&fs.ModeDevice != 0 && b.Mode()&fs.ModeDevice != 0 {
		return sa.Rdev == sb.Rdev
	}
	return os.SameFile(a, b)
}

// runningSlot tells which slot the system runs: the configured override, else
// gwagent.slot= on the kernel command line (the shipped bootloader scripts
// add it), else root= compared with RootA/RootB (literally, then as paths).
func (i *Installer) runningSlot() (string, error) {
	if i.cfg.RunningSlot != "" {
		return i.cfg.RunningSlot, nil
	}
	b, err := os.ReadFile(i.cfg.CmdlinePath)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrRunningSlot, err)
	}
	slot, root := parseCmdline(string(b))
	if slot != "" {
		if !bootenv.ValidSlot(slot) {
			return "", fmt.Errorf("%w: %s has gwagent.slot=%q", ErrRunningSlot, i.cfg.CmdlinePath, slot)
		}
		return slot, nil
	}
	if root == "" {
		return "", fmt.Errorf("%w: no gwagent.slot= or root= in %s (set abpart.runningSlot)", ErrRunningSlot, i.cfg.CmdlinePath)
	}
	for _, s := range []string{bootenv.SlotA, bootenv.SlotB} {
		// A slot found by its label is also named by root=PARTLABEL=….
		if label, ok := i.cfg.found[s]; root == i.roots[s] || ok && root == "PARTLABEL="+label {
			return s, nil
		}
	}
	if rfi, err := os.Stat(root); err == nil {
		for _, s := range []string{bootenv.SlotA, bootenv.SlotB} {
			if sfi, err := os.Stat(i.roots[s]); err == nil && sameDevice(rfi, sfi) {
				return s, nil
			}
		}
	}
	return "", fmt.Errorf("%w: root=%s matches neither abpart.rootA (%s) nor abpart.rootB (%s)",
		ErrRunningSlot, root, i.roots[bootenv.SlotA], i.roots[bootenv.SlotB])
}

// parseCmdline returns the values of the last gwagent.slot= and root= on a
// kernel command line (the kernel lets the last one win; so do we). Quoted
// values are not used for either, so splitting on blanks is enough.
func parseCmdline(cmdline string) (slot, root string) {
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, "gwagent.slot="); ok {
			slot = v
		}
		if v, ok := strings.CutPrefix(f, "root="); ok {
			root = v
		}
	}
	return slot, root
}

func (i *Installer) bootID() string {
	b, err := os.ReadFile(i.cfg.BootIDPath)
	if err != nil {
		i.log.Warn("cannot read the boot id; a missed reboot is told by bootcount alone", zap.Error(err))
		return ""
	}
	return strings.TrimSpace(string(b))
}

// situation is what every decision starts from.
type situation struct {
	running string
	env     bootenv.State
}

func (i *Installer) situation(ctx context.Context) (situation, error) {
	r, err := i.runningSlot()
	if err != nil {
		return situation{}, err
	}
	st, err := bootenv.ReadState(ctx, i.env)
	if err != nil {
		return situation{}, fmt.Errorf("abpart: read the bootloader environment: %w", err)
	}
	return situation{running: r, env: st}, nil
}

func (s situation) String() string {
	return fmt.Sprintf("running slot %s, %s=%q %s=%t %s=%d %s=%d", s.running,
		bootenv.VarSlot, s.env.Slot, bootenv.VarUpgradeAvailable, s.env.UpgradeAvailable,
		bootenv.VarBootCount, s.env.BootCount, bootenv.VarBootLimit, s.env.BootLimit)
}

// writeTarget returns the slot that may be written, after checking both
// sources of truth: the running slot (never written) and the bootloader's
// committed slot (never written either). A trial of the target that is
// still armed from an earlier attempt is disarmed first, so a reboot during
// the write cannot boot a half-written slot.
func (i *Installer) writeTarget(ctx context.Context) (string, error) {
	s, err := i.situation(ctx)
	if err != nil {
		return "", err
	}
	target := bootenv.OtherSlot(s.running)
	switch {
	case s.env.Slot == "" && !s.env.UpgradeAvailable, s.env.Slot == s.running && !s.env.UpgradeAvailable:
		// Committed on the running slot (or never switched): the normal case.
	case s.env.Slot == s.running:
		return "", fmt.Errorf("%w: slot %s runs on trial and is not committed; slot %s is its fallback (%s): commit or roll back first",
			ErrActiveSlot, s.running, target, s)
	case s.env.Slot == target && s.env.UpgradeAvailable:
		i.log.Warn("disarming a trial boot of the slot about to be written", zap.String("slot", target), zap.Stringer("situation", s))
		if err := i.env.Set(ctx, bootenv.CommitVars(s.running)); err != nil {
			return "", fmt.Errorf("abpart: disarm the trial of slot %s: %w", target, err)
		}
	default:
		return "", fmt.Errorf("%w: the bootloader will boot slot %s but slot %s runs (%s); refusing to write either until a reboot settles it",
			ErrInconsistent, s.env.Slot, s.running, s)
	}
	return target, nil
}

// TargetSlot implements firmware.Slotted without writing anything.
func (i *Installer) TargetSlot(ctx context.Context, u firmware.Update) (string, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if rec, ok, err := i.record(u.ID); err != nil || ok {
		return rec.Target, err
	}
	r, err := i.runningSlot()
	if err != nil {
		return "", err
	}
	return bootenv.OtherSlot(r), nil
}

// Prepare implements firmware.Preparer: the checks Open makes, early, so a
// device that cannot take an update says so before the download.
func (i *Installer) Prepare(ctx context.Context, u firmware.Update) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	target, err := i.writeTarget(ctx)
	if err != nil {
		return err
	}
	if _, err := i.checkWritable(target); err != nil {
		return err
	}
	if i.cfg.SlotType == SlotTypeBlock {
		// Open fails the same way; saying so before the download saves it.
		f, err := os.OpenFile(i.paths[target], os.O_RDONLY|syscall.O_EXCL, 0)
		if err != nil {
			return fmt.Errorf("abpart: slot %s is in use (mounted?): %w", target, err)
		}
		f.Close()
	}
	return nil
}

// Check implements firmware.Checker: an image whose declared size exceeds
// the smaller slot is refused before it is accepted. The declared size is
// the transfer size; for a compressed image the written size is checked
// while streaming.
func (i *Installer) Check(req firmware.Request) error {
	if req.Size <= 0 {
		return nil
	}
	for _, s := range []string{bootenv.SlotA, bootenv.SlotB} {
		c, err := i.capacity(s)
		if err != nil {
			return err
		}
		if req.Size > c {
			return fmt.Errorf("%w: size %d bytes, slot %s holds %d", ErrTooLarge, req.Size, s, c)
		}
	}
	return nil
}

// Reboot implements firmware.Rebooter through the configured seam.
func (i *Installer) Reboot(ctx context.Context) error {
	i.log.Info("rebooting")
	return i.reboot.Reboot(ctx)
}
