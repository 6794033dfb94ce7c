package abpart

import "github.com/gwagent/gwagent/firmware/bootenv"

// RunningSlot tells which slot the system runs, A or B, exactly as the
// installer does (abpart.runningSlot, else gwagent.slot= or root= on the
// kernel command line), without opening a slot, the state directory or the
// bootloader environment. It is for the privileged start-up step that gives
// the agent's user the inactive slot and takes the running one away before
// the agent itself starts.
func RunningSlot(cfg Config) (string, error) {
	cfg, err := FindSlots(cfg)
	if err != nil {
		return "", err
	}
	cfg.setDefaults()
	i := &Installer{cfg: cfg, paths: cfg.slotPaths(), roots: map[string]string{bootenv.SlotA: cfg.RootA, bootenv.SlotB: cfg.RootB}}
	return i.runningSlot()
}

// setDefaults fills in what an empty key means.
func (c *Config) setDefaults() {
	if c.SlotType == "" {
		c.SlotType = SlotTypeBlock
	}
	if c.CmdlinePath == "" {
		c.CmdlinePath = "/proc/cmdline"
	}
	if c.BootIDPath == "" {
		c.BootIDPath = "/proc/sys/kernel/random/boot_id"
	}
	if c.RootA == "" {
		c.RootA = c.SlotA
	}
	if c.RootB == "" {
		c.RootB = c.SlotB
	}
}

func (c Config) slotPaths() map[string]string {
	return map[string]string{bootenv.SlotA: c.SlotA, bootenv.SlotB: c.SlotB}
}
