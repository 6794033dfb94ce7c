package abpart

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// recordFormat versions abpart.json; a record of another format is ignored
// (treated as missing) rather than misread.
const recordFormat = 1

// Record phases: stable names, persisted.
const (
	phaseWriting    = "writing"    // the target slot is being written
	phaseSwitched   = "switched"   // the bootloader was pointed at the target (trial)
	phaseCommitted  = "committed"  // the target is the committed slot
	phaseRolledBack = "rolledBack" // the previous slot was made the boot slot again
)

// record is what abpart remembers about the update it works on. The firmware
// state machine persists the update itself; this is the backend's own part:
// which slot it wrote, from which slot, and in which boot it switched (so
// that after a restart "the reboot never happened" can be told from "the
// bootloader booted the old slot").
type record struct {
	Format      int       `json:"format"`
	UpdateID    string    `json:"updateId"`
	Phase       string    `json:"phase"`
	From        string    `json:"from"`
	Target      string    `json:"target"`
	BootID      string    `json:"bootId,omitempty"`
	ImageSize   int64     `json:"imageSize,omitempty"`
	ImageSHA256 string    `json:"imageSha256,omitempty"`
	Time        time.Time `json:"time"`
}

func (i *Installer) recordPath() string { return filepath.Join(i.cfg.StateDir, "abpart.json") }

// loadRecord returns the record, ok=false when there is none. An empty,
// torn or foreign file is treated as missing: it was never written whole.
func (i *Installer) loadRecord() (record, bool, error) {
	b, err := os.ReadFile(i.recordPath())
	if errors.Is(err, fs.ErrNotExist) {
		return record{}, false, nil
	}
	if err != nil {
		return record{}, false, fmt.Errorf("abpart: read record: %w", err)
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil || r.Format != recordFormat || r.UpdateID == "" {
		i.log.Warn("ignoring an unreadable abpart record")
		return record{}, false, nil
	}
	return r, true, nil
}

// record returns the record of update id, ok=false when the record is about
// another update or missing.
func (i *Installer) record(id string) (record, bool, error) {
	r, ok, err := i.loadRecord()
	if err != nil || !ok || r.UpdateID != id {
		return record{}, false, err
	}
	return r, true, nil
}

func (i *Installer) saveRecord(r record) error {
	r.Format = recordFormat
	r.Time = time.Now().UTC()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("abpart: encode record: %w", err)
	}
	if err := atomicfile.WriteFile(i.recordPath(), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("abpart: write record: %w", err)
	}
	return nil
}
