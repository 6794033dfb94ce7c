package bootenv

import (
	"context"
	"fmt"
	"strconv"
)

// The A/B bootloader contract. The installer and the bootloader script an
// integrator installs (packaging/bootloader/) agree on these variables; the
// names follow U-Boot's own bootcount feature so that a board using
// CONFIG_BOOTCOUNT_LIMIT with CONFIG_BOOTCOUNT_ENV needs no extra logic for
// counting.
//
//	gw_slot            "A" or "B": the slot the bootloader boots.
//	upgrade_available  "1" while a new slot is on trial, "0" (or unset) once
//	                   committed. The bootloader counts boots only while it is 1.
//	bootcount          boots attempted during the trial; the bootloader
//	                   increments it before booting a trial slot.
//	bootlimit          trial boots allowed, 1 to 8 (default 3 in the shipped
//	                   scripts; the U-Boot one counts with setexpr, whose
//	                   hexadecimal output reads as decimal only below 10).
//	                   When bootcount exceeds it, the bootloader boots the other
//	                   slot, sets gw_slot to that slot and upgrade_available=0
//	                   (keeping bootcount for the report). U-Boot's built-in
//	                   altbootcmd instead boots the other slot and leaves the
//	                   variables alone; the installer recognises both.
//
// On the kernel command line the scripts add gwagent.slot=A|B: the slot that
// actually runs.
//
// The installer writes:
//
//	switch:   gw_slot=<new> upgrade_available=1 bootcount=0   (one write)
//	commit:   gw_slot=<running> upgrade_available=0 bootcount=0 (one write)
//	rollback: gw_slot=<old> upgrade_available=0 bootcount=0   (one write)
const (
	VarSlot             = "gw_slot"
	VarUpgradeAvailable = "upgrade_available"
	VarBootCount        = "bootcount"
	VarBootLimit        = "bootlimit"
)

// Slot names as stored in VarSlot.
const (
	SlotA = "A"
	SlotB = "B"
)

// DefaultBootLimit is the trial boot count the shipped bootloader scripts use
// when bootlimit is not set.
const DefaultBootLimit = 3

// OtherSlot returns the slot that is not s ("" for an invalid name).
func OtherSlot(s string) string {
	switch s {
	case SlotA:
		return SlotB
	case SlotB:
		return SlotA
	}
	return ""
}

// ValidSlot reports whether s names a slot.
func ValidSlot(s string) bool { return s == SlotA || s == SlotB }

// SwitchVars are the variables that put slot on trial. bootLimit > 0 also
// sets bootlimit; 0 leaves the bootloader's value alone.
func SwitchVars(slot string, bootLimit int) map[string]string {
	v := map[string]string{
		VarSlot:             slot,
		VarUpgradeAvailable: "1",
		VarBootCount:        "0",
	}
	if bootLimit > 0 {
		v[VarBootLimit] = strconv.Itoa(bootLimit)
	}
	return v
}

// CommitVars make slot the permanent boot slot and end any trial. The same
// write is used to roll back (with the old slot).
func CommitVars(slot string) map[string]string {
	return map[string]string{
		VarSlot:             slot,
		VarUpgradeAvailable: "0",
		VarBootCount:        "0",
	}
}

// State is the contract's view of a bootloader environment.
type State struct {
	Slot             string // "" when gw_slot is not set (a board never switched)
	UpgradeAvailable bool
	BootCount        int
	BootLimit        int // DefaultBootLimit when bootlimit is not set
}

// Exhausted reports whether the bootloader has used up the trial boots and
// therefore boots (or booted) the other slot.
func (s State) Exhausted() bool { return s.UpgradeAvailable && s.BootCount > s.BootLimit }

// ReadState reads the contract variables in one Get.
func ReadState(ctx context.Context, env Env) (State, error) {
	vars, err := env.Get(ctx, VarSlot, VarUpgradeAvailable, VarBootCount, VarBootLimit)
	if err != nil {
		return State{}, err
	}
	st := State{Slot: vars[VarSlot], BootLimit: DefaultBootLimit}
	if st.Slot != "" && !ValidSlot(st.Slot) {
		return State{}, fmt.Errorf("%w: %s=%q (want %q or %q)", ErrContract, VarSlot, st.Slot, SlotA, SlotB)
	}
	switch ua := vars[VarUpgradeAvailable]; ua {
	case "", "0":
	case "1":
		st.UpgradeAvailable = true
	default:
		return State{}, fmt.Errorf("%w: %s=%q (want 0 or 1)", ErrContract, VarUpgradeAvailable, ua)
	}
	if st.BootCount, err = contractInt(vars, VarBootCount, 0); err != nil {
		return State{}, err
	}
	if st.BootLimit, err = contractInt(vars, VarBootLimit, DefaultBootLimit); err != nil {
		return State{}, err
	}
	return st, nil
}

// contractInt parses a counter. U-Boot's setexpr writes hexadecimal and its
// bootcount code decimal; they agree below 10, which is all a boot limit
// needs, so only decimal is accepted.
func contractInt(vars map[string]string, name string, def int) (int, error) {
	s, ok := vars[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: %s=%q is not a decimal count", ErrContract, name, s)
	}
	return n, nil
}
