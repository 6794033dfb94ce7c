package abpart

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Apply implements firmware.Installer: it hashes the written slot once more
// (the bytes the bootloader will boot must be the verified ones), records
// the switch, then points the bootloader at the slot for a trial boot in one
// environment write. Called again after a restart, it sees the switch
// already made and returns nil.
//
// The hash is skipped when u.ReadBackVerified says the state machine read
// this slot back (ReadBack, past the page cache, each part once it was
// durable) and matched the hash in the same run: hashing it again would
// read the whole slot a second time to learn nothing. After a restart
// between the two the flag is false and the slot is hashed here.
func (i *Installer) Apply(ctx context.Context, u firmware.Update) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	if u.ImageSize <= 0 || u.ImageSHA256 == "" {
		return errNoImage
	}
	rec, ok, err := i.record(u.ID)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w %s (no slot was written)", ErrNoSwitch, u.ID)
	}
	s, err := i.situation(ctx)
	if err != nil {
		return err
	}
	if s.running != rec.From {
		return fmt.Errorf("%w: update %s wrote slot %s from slot %s, but slot %s runs", ErrInconsistent, u.ID, rec.Target, rec.From, s.running)
	}
	if rec.Phase == phaseSwitched && s.env.Slot == rec.Target && s.env.UpgradeAvailable {
		i.log.Info("trial boot already armed", zap.String("update_id", u.ID), zap.String("slot", rec.Target))
		return nil
	}
	// The same checks as before writing: the target is neither running nor
	// the committed slot, and a stale trial is disarmed.
	target, err := i.writeTarget(ctx)
	if err != nil {
		return err
	}
	if target != rec.Target {
		return fmt.Errorf("%w: update %s wrote slot %s, but slot %s is now the inactive one", ErrInconsistent, u.ID, rec.Target, target)
	}
	capacity, err := i.capacity(target)
	if err != nil {
		return err
	}
	if u.ImageSize > capacity {
		return fmt.Errorf("%w: image %d bytes, slot %s holds %d", ErrTooLarge, u.ImageSize, target, capacity)
	}
	if u.ReadBackVerified {
		i.log.Info("slot read back and verified just before; not hashing it again",
			zap.String("update_id", u.ID), zap.String("slot", target))
	} else {
		sum, err := i.hashSlot(ctx, target, u.ImageSize)
		if err != nil {
			return err
		}
		if sum != u.ImageSHA256 {
			return fmt.Errorf("%w: slot %s has sha256 %s over %d bytes, the verified image %s", ErrVerify, target, sum, u.ImageSize, u.ImageSHA256)
		}
	}
	// Persist, then act: the record says which boot switched before the
	// bootloader can boot the target.
	rec.Phase, rec.BootID = phaseSwitched, i.bootID()
	rec.ImageSize, rec.ImageSHA256 = u.ImageSize, u.ImageSHA256
	if err := i.saveRecord(rec); err != nil {
		return err
	}
	if err := i.env.Set(ctx, bootenv.SwitchVars(target, i.cfg.BootLimit)); err != nil {
		return fmt.Errorf("abpart: switch the bootloader to slot %s: %w", target, err)
	}
	i.log.Info("trial boot armed", zap.String("update_id", u.ID), zap.String("slot", target),
		zap.String("from", rec.From), zap.Int64("bytes", u.ImageSize))
	return nil
}

// VerifyBoot implements firmware.Committer. After the restart that followed
// Apply it tells, from the running slot, the environment and the boot id:
//   - the trial slot runs (upgrade_available=1): nil, health check next;
//   - the trial slot runs and is already committed: nil (Commit ran before a
//     restart of the agent);
//   - the old slot runs in the same boot that switched, trial still armed:
//     firmware.ErrRebootPending (the reboot never happened);
//   - the old slot runs in a later boot: the bootloader fell back
//     (ErrRolledBackByBootloader) or ignored the trial (ErrBootloaderIgnored).
func (i *Installer) VerifyBoot(ctx context.Context, u firmware.Update) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	rec, ok, err := i.record(u.ID)
	if err != nil {
		return err
	}
	if !ok || rec.Phase == phaseWriting {
		return fmt.Errorf("%w %s", ErrNoSwitch, u.ID)
	}
	s, err := i.situation(ctx)
	if err != nil {
		return err
	}
	log := i.log.With(zap.String("update_id", u.ID), zap.Stringer("situation", s))
	sameBoot := rec.BootID != "" && rec.BootID == i.bootID()
	switch {
	case s.running == rec.Target && s.env.Slot == rec.Target:
		log.Info("running the new slot", zap.String("slot", rec.Target))
		return nil
	case s.running == rec.From && s.env.Slot == rec.Target && s.env.UpgradeAvailable:
		switch {
		case sameBoot || rec.BootID == "" && s.env.BootCount == 0:
			return fmt.Errorf("%w: slot %s still runs in the boot that armed the trial of slot %s", firmware.ErrRebootPending, s.running, rec.Target)
		case s.env.Exhausted():
			return fmt.Errorf("%w: slot %s failed %d trial boots (bootlimit %d); slot %s runs", ErrRolledBackByBootloader,
				rec.Target, s.env.BootCount, s.env.BootLimit, s.running)
		case s.env.BootCount == 0:
			return fmt.Errorf("%w: the device restarted on slot %s and bootcount is still 0; is the gwagent A/B script installed in the bootloader?",
				ErrBootloaderIgnored, s.running)
		default:
			return fmt.Errorf("%w: slot %s runs after %d trial boot(s) of slot %s", ErrRolledBackByBootloader, s.running, s.env.BootCount, rec.Target)
		}
	case s.running == rec.From && s.env.Slot == rec.From && !s.env.UpgradeAvailable:
		if sameBoot {
			return fmt.Errorf("%w: the trial of slot %s was disarmed before the reboot (%s)", ErrInconsistent, rec.Target, s)
		}
		return fmt.Errorf("%w: the bootloader returned to slot %s (%s)", ErrRolledBackByBootloader, s.running, s)
	}
	return fmt.Errorf("%w: update %s switched from slot %s to slot %s; now %s", ErrInconsistent, u.ID, rec.From, rec.Target, s)
}

// Commit implements firmware.Committer: the running trial slot becomes the
// committed one (upgrade_available=0, one write). Idempotent.
func (i *Installer) Commit(ctx context.Context, u firmware.Update) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	rec, ok, err := i.record(u.ID)
	if err != nil {
		return err
	}
	if !ok || rec.Phase == phaseWriting {
		return fmt.Errorf("%w %s", ErrNoSwitch, u.ID)
	}
	s, err := i.situation(ctx)
	if err != nil {
		return err
	}
	if s.running != rec.Target || s.env.Slot != rec.Target {
		return fmt.Errorf("%w: refusing to commit slot %s: %s", ErrInconsistent, rec.Target, s)
	}
	if s.env.UpgradeAvailable || s.env.BootCount != 0 {
		if err := i.env.Set(ctx, bootenv.CommitVars(rec.Target)); err != nil {
			return fmt.Errorf("abpart: commit slot %s: %w", rec.Target, err)
		}
	}
	if rec.Phase != phaseCommitted {
		rec.Phase = phaseCommitted
		if err := i.saveRecord(rec); err != nil {
			return err
		}
	}
	i.log.Info("slot committed", zap.String("update_id", u.ID), zap.String("slot", rec.Target))
	return nil
}

// Rollback implements firmware.RollBacker: the slot that ran before the
// update becomes the boot slot again. Running that slot already, it only
// disarms the trial (no write when nothing is armed) and returns nil;
// running the new slot, it writes the switch back and returns
// firmware.ErrRebootPending. Slot contents are never touched.
func (i *Installer) Rollback(ctx context.Context, u firmware.Update) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	rec, ok, err := i.record(u.ID)
	if err != nil {
		return err
	}
	s, err := i.situation(ctx)
	if err != nil {
		return err
	}
	old := s.running
	if ok {
		old = rec.From
	}
	settled := (s.env.Slot == old || s.env.Slot == "") && !s.env.UpgradeAvailable && s.env.BootCount == 0
	if !settled {
		if err := i.env.Set(ctx, bootenv.CommitVars(old)); err != nil {
			return fmt.Errorf("abpart: roll back to slot %s: %w", old, err)
		}
	}
	if ok && rec.Phase != phaseRolledBack {
		rec.Phase = phaseRolledBack
		if err := i.saveRecord(rec); err != nil {
			return err
		}
	}
	if s.running != old {
		i.log.Warn("rolled back; slot runs again after a reboot", zap.String("update_id", u.ID), zap.String("slot", old))
		return fmt.Errorf("%w: slot %s boots next, slot %s runs", firmware.ErrRebootPending, old, s.running)
	}
	i.log.Info("rolled back", zap.String("update_id", u.ID), zap.String("slot", old))
	return nil
}

// Status is what the installer knows, for `gwagent status`.
type Status struct {
	Running    string        // the running slot
	Slots      [2]SlotStatus // A, B
	Env        bootenv.State // the contract variables
	UpdateID   string        // the last update abpart worked on ("" if none)
	Phase      string        // its phase in abpart: writing, switched, committed, rolledBack
	TrialSlot  string        // the slot on trial, "" when none
	ImageSHA   string        // the image written by that update
	ImageBytes int64
}

// SlotStatus describes one slot.
type SlotStatus struct {
	Name, Path string
	Capacity   int64
	Running    bool
	Committed  bool // the bootloader's permanent choice
}

// Status reads the slots, the environment and the record; it writes nothing.
func (i *Installer) Status(ctx context.Context) (Status, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	s, err := i.situation(ctx)
	if err != nil {
		return Status{}, err
	}
	st := Status{Running: s.running, Env: s.env}
	committed := s.env.Slot
	if committed == "" || s.env.UpgradeAvailable {
		committed = bootenv.OtherSlot(s.env.Slot)
		if s.env.Slot == "" {
			committed = s.running
		}
		st.TrialSlot = s.env.Slot
	}
	for n, name := range []string{bootenv.SlotA, bootenv.SlotB} {
		c, err := i.capacity(name)
		if err != nil {
			return Status{}, err
		}
		st.Slots[n] = SlotStatus{Name: name, Path: i.paths[name], Capacity: c, Running: name == s.running, Committed: name == committed}
	}
	if rec, ok, err := i.loadRecord(); err != nil {
		return Status{}, err
	} else if ok {
		st.UpdateID, st.Phase, st.ImageSHA, st.ImageBytes = rec.UpdateID, rec.Phase, rec.ImageSHA256, rec.ImageSize
	}
	return st, nil
}

// CommandRebooter reboots by running a command (default: systemctl reboot,
// which stops services in order, so the agent sees SIGTERM and stops
// cleanly).
type CommandRebooter struct {
	Runner  bootenv.Runner // nil: bootenv.ExecRunner
	Command []string       // default ["systemctl", "reboot"]
}

// Reboot implements firmware.Rebooter.
func (r CommandRebooter) Reboot(ctx context.Context) error {
	cmd := r.Command
	if len(cmd) == 0 {
		cmd = []string{"systemctl", "reboot"}
	}
	run := r.Runner
	if run == nil {
		run = bootenv.ExecRunner{}
	}
	if _, err := run.Run(ctx, cmd[0], cmd[1:]...); err != nil {
		return fmt.Errorf("abpart: reboot: %w", err)
	}
	return nil
}
