// Package atomicfile replaces small state files so that a crash or a power
// cut leaves either the old content or the new, never a torn file: the one
// atomic-write helper of gwagent, shared by the agent's state, the boot
// environment file backend and the local hub's store.
//
// It must not interpret what it writes; readers treat an empty or
// unreadable file as absent.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/google/renameio/v2"
)

// WriteFile replaces path with data: renameio writes a temporary file in the
// same folder, fsyncs and renames it over path, and the folder is then
// fsynced so that the rename itself survives a power cut.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := renameio.WriteFile(path, data, perm, renameio.WithTempDir(dir)); err != nil {
		return err
	}
	return SyncDir(dir)
}

// Remove removes path, if it exists, durably.
func Remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SyncDir fsyncs a folder so that renames, creations and removals in it are
// durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
