package bootenv

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// FileConfig configures the "file" backend: a plain name=value file that
// stands in for a bootloader in the simulated mode and in tests.
type FileConfig struct {
	Path string `yaml:"path" mapstructure:"path"`
}

type file struct {
	path string
	log  *zap.Logger
	mu   sync.Mutex // read-modify-write of the file
}

func newFile(c Config, _ Runner, log *zap.Logger) (Env, error) {
	if c.File.Path == "" {
		return nil, fmt.Errorf("%w: bootenv.file.path is empty (the file backend needs a path)", ErrConfig)
	}
	return &file{path: c.File.Path, log: log}, nil
}

func (f *file) Get(_ context.Context, names ...string) (map[string]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	all, err := f.readAll()
	if err != nil {
		return nil, err
	}
	return pick(all, names), nil
}

// readAll treats a missing or empty file as an empty environment: the file
// is only ever replaced atomically, so an empty one was never written.
func (f *file) readAll() (map[string]string, error) {
	b, err := os.ReadFile(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bootenv: %w", err)
	}
	all, err := parseLines(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.path, err)
	}
	return all, nil
}

// Set merges vars into the file and replaces it atomically (temp file,
// fsync, rename, fsync of the folder).
func (f *file) Set(_ context.Context, vars map[string]string) error {
	if err := validate(vars); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	all, err := f.readAll()
	if err != nil {
		return err
	}
	for k, v := range vars {
		if v == "" {
			delete(all, k)
		} else {
			all[k] = v
		}
	}
	if err := atomicfile.WriteFile(f.path, sortedLines(all), 0o644); err != nil {
		return fmt.Errorf("bootenv: %w", err)
	}
	f.log.Info("boot environment written", zap.Any("vars", vars))
	return nil
}
