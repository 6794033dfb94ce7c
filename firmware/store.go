package firmware

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

// stateFormat is the version of the persisted files. A newer agent reads
// older formats; a file with an unknown format is set aside, not guessed at.
const stateFormat = 1

const (
	recordFile     = "update.json"
	checkpointFile = "download.json"
)

// record is the persisted state of the update machine. It is written
// (atomically, fsynced) before the side effect of each phase.
type record struct {
	Format      int          `json:"format"`
	UpdateID    string       `json:"updateId,omitempty"`
	Phase       Phase        `json:"phase"`
	Request     Request      `json:"request"`
	Transitions int          `json:"transitions"`
	ImageSize   int64        `json:"imageSize,omitempty"`
	ImageSHA256 string       `json:"imageSha256,omitempty"`
	Bytes       int64        `json:"bytes,omitempty"`
	Total       int64        `json:"total,omitempty"`
	Slot        string       `json:"slot,omitempty"`
	Err         *UpdateError `json:"error,omitempty"`
	// RebootRequested is set (persisted) just before Reboot is called, so a
	// restart in the rebooting phase knows the reboot was at least asked for.
	RebootRequested bool `json:"rebootRequested,omitempty"`
	// RollbackPending marks a rollingBack record (rolledBack in records of
	// older agents) persisted before Rollback finished (persist, then act);
	// a restart finishes the rollback.
	RollbackPending bool `json:"rollbackPending,omitempty"`
	// RollbackTries counts rollback attempts (persisted before each).
	RollbackTries int `json:"rollbackTries,omitempty"`
	// CurrentVersion is the version the device runs, as last learned.
	CurrentVersion string    `json:"currentVersion,omitempty"`
	StartedAt      time.Time `json:"startedAt,omitzero"`
	UpdatedAt      time.Time `json:"updatedAt,omitzero"`
	// History is the last HistoryLen updates, the newest (this record's
	// update) last; see noteHistory.
	History []HistoryEntry `json:"history,omitempty"`
}

// busy reports whether the record holds an update that has not ended.
func (r record) busy() bool {
	return r.UpdateID != "" && (!r.Phase.Terminal() || r.RollbackPending)
}

func (r record) update() Update {
	return Update{ID: r.UpdateID, Request: r.Request, ImageSize: r.ImageSize, ImageSHA256: r.ImageSHA256}
}

// store reads and writes the state files in one directory.
type store struct {
	dir string
	// write replaces a file atomically and durably; nil means
	// atomicfile.WriteFile. Tests inject write errors (ENOSPC) here.
	write func(path string, data []byte, perm os.FileMode) error
}

func (s store) path(name string) string { return filepath.Join(s.dir, name) }

// writeJSON replaces name atomically and durably (atomicfile).
func (s store) writeJSON(name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("firmware: encode %s: %w", name, err)
	}
	write := s.write
	if write == nil {
		write = atomicfile.WriteFile
	}
	if err := write(s.path(name), b, 0o600); err != nil {
		return fmt.Errorf("firmware: write %s: %w", s.path(name), err)
	}
	return nil
}

// readJSON loads name into v. A missing, empty or torn file reports
// ok=false: it is treated as absent, never as a reason to fail.
func (s store) readJSON(name string, v any) (ok bool, err error) {
	b, err := os.ReadFile(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("firmware: read %s: %w", s.path(name), err)
	}
	if len(b) == 0 || json.Unmarshal(b, v) != nil {
		return false, nil
	}
	return true, nil
}

func (s store) remove(name string) error {
	if err := atomicfile.Remove(s.path(name)); err != nil {
		return fmt.Errorf("firmware: remove %s: %w", s.path(name), err)
	}
	return nil
}

// setAside renames an unreadable-format file so a person can inspect it.
func (s store) setAside(name string) error {
	return os.Rename(s.path(name), s.path(name+".unknown"))
}
