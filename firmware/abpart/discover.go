package abpart

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Defaults of the slot discovery keys: the partition names of the reference
// A/B disk (docs/reference-disk.md) and where udev links partitions by
// their GPT name.
const (
	DefaultLabelA       = "rootA"
	DefaultLabelB       = "rootB"
	DefaultPartlabelDir = "/dev/disk/by-partlabel"
)

// ErrNoSlots: a slot is neither configured nor found by its partition label.
// It wraps ErrConfig.
var ErrNoSlots = fmt.Errorf("%w: no slots", ErrConfig)

// FindSlots returns cfg with its defaults filled in and every empty slot
// (SlotA, SlotB) set to the partition named LabelA (LabelB) in
// PartlabelDir, so a disk laid out with GPT partitions named rootA and
// rootB needs no slot settings. A slot that is configured is kept as it
// is. When a slot is neither configured nor found, the error (ErrNoSlots)
// names the keys to set and the labels that were looked for.
func FindSlots(cfg Config) (Config, error) {
	cfg.setDiscoveryDefaults()
	var missing []string
	for _, s := range []struct {
		name         string
		path, label  *string
		key, labelAs string
	}{
		{bootenv.SlotA, &cfg.SlotA, &cfg.LabelA, "abpart.slotA", "abpart.labelA"},
		{bootenv.SlotB, &cfg.SlotB, &cfg.LabelB, "abpart.slotB", "abpart.labelB"},
	} {
		if *s.path != "" {
			continue
		}
		p, why := findLabel(cfg.PartlabelDir, *s.label)
		if why != "" {
			missing = append(missing, fmt.Sprintf("%s is not set and %s", s.key, why))
			continue
		}
		*s.path = p
		if cfg.found == nil {
			cfg.found = map[string]string{}
		}
		cfg.found[s.name] = *s.label
	}
	if len(missing) > 0 {
		return cfg, fmt.Errorf("%w: %s; set abpart.slotA and abpart.slotB to the slot devices, or abpart.labelA and abpart.labelB to their partition names (installer.type simulated writes nothing: it is for demos)",
			ErrNoSlots, strings.Join(missing, "; "))
	}
	return cfg, nil
}

// findLabel is the path of the partition named label in dir, or why there
// is none.
func findLabel(dir, label string) (path, why string) {
	if strings.ContainsRune(label, '/') || label == "." || label == ".." {
		return "", fmt.Sprintf("the label %q is not a partition name", label)
	}
	// Lstat: a link to a missing node is found here and then refused by
	// name when the slot is opened.
	p := filepath.Join(dir, label)
	_, err := os.Lstat(p)
	switch {
	case err == nil:
		return p, ""
	case errors.Is(err, fs.ErrNotExist):
		return "", fmt.Sprintf("no partition is labelled %q (no %s)", label, p)
	}
	return "", fmt.Sprintf("the partition labelled %q cannot be looked up: %v", label, err)
}

// setDiscoveryDefaults fills in the discovery keys left empty.
func (c *Config) setDiscoveryDefaults() {
	if c.LabelA == "" {
		c.LabelA = DefaultLabelA
	}
	if c.LabelB == "" {
		c.LabelB = DefaultLabelB
	}
	if c.PartlabelDir == "" {
		c.PartlabelDir = DefaultPartlabelDir
	}
}
