package firmware

import (
	"os"
	"time"
)

// SetStateWriter replaces how the Manager of c writes its state files, so
// a test can make the disk look full.
func SetStateWriter(c *Config, write func(path string, data []byte, perm os.FileMode) error) {
	c.writeFile = write
}

// NoteHistory runs the history bookkeeping of a record holding update id
// in phase (with err) on h, and returns the new history.
func NoteHistory(h []HistoryEntry, id string, phase Phase, err *UpdateError, at time.Time) []HistoryEntry {
	r := record{UpdateID: id, Phase: phase, Err: err, History: h}
	r.noteHistory(at)
	return r.History
}
