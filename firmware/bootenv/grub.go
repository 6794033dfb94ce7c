package bootenv

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"sync"

	"go.uber.org/zap"
)

// GRUBConfig configures the "grub" backend (grub-editenv on a grubenv file).
type GRUBConfig struct {
	// EnvFile is the environment block GRUB's load_env/save_env use.
	// Default /boot/grub/grubenv.
	EnvFile string `yaml:"envFile" mapstructure:"envFile"`
	// EditenvPath overrides the tool (default: grub-editenv in PATH).
	EditenvPath string `yaml:"editenvPath" mapstructure:"editenvPath"`
}

type grub struct {
	cfg GRUBConfig
	run Runner
	log *zap.Logger
	mu  sync.Mutex // grub-editenv takes no lock: serialise writers in the process
}

func newGRUB(c Config, run Runner, log *zap.Logger) (Env, error) {
	cfg := c.GRUB
	if cfg.EnvFile == "" {
		cfg.EnvFile = "/boot/grub/grubenv"
	}
	if cfg.EditenvPath == "" {
		cfg.EditenvPath = "grub-editenv"
	}
	return &grub{cfg: cfg, run: run, log: log}, nil
}

func (g *grub) Get(ctx context.Context, names ...string) (map[string]string, error) {
	all, err := g.readAll(ctx)
	if err != nil {
		return nil, err
	}
	return pick(all, names), nil
}

func (g *grub) readAll(ctx context.Context) (map[string]string, error) {
	// grub-editenv creates a missing file even for "list": a missing grubenv
	// is a misconfiguration to report, not something to paper over.
	if _, err := os.Stat(g.cfg.EnvFile); err != nil {
		return nil, fmt.Errorf("%w: grub environment: %w", ErrConfig, err)
	}
	out, err := g.run.Run(ctx, g.cfg.EditenvPath, g.cfg.EnvFile, "list")
	if err != nil {
		return nil, err
	}
	all, err := parseLines(out)
	if err != nil {
		return nil, fmt.Errorf("%s %s list: %w", g.cfg.EditenvPath, g.cfg.EnvFile, err)
	}
	return all, nil
}

// Set writes all vars with one "grub-editenv FILE set", which rewrites the
// 1 KiB block in place (grub-common 2.06: open with O_TRUNC, write, fsync;
// no rename, so the unit can make that one file writable rather than its
// folder). An empty value is stored as empty rather than unset, which would
// take a second write; GRUB scripts read both the same.
func (g *grub) Set(ctx context.Context, vars map[string]string) error {
	if err := validate(vars); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, err := os.Stat(g.cfg.EnvFile); err != nil {
		return fmt.Errorf("%w: grub environment: %w", ErrConfig, err)
	}
	args := []string{g.cfg.EnvFile, "set"}
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		args = append(args, k+"="+vars[k])
	}
	if _, err := g.run.Run(ctx, g.cfg.EditenvPath, args...); err != nil {
		return err
	}
	got, err := g.readAll(ctx)
	if err != nil {
		return fmt.Errorf("bootenv: reading back after grub-editenv set: %w", err)
	}
	if err := checkWritten(g.cfg.EditenvPath, got, vars); err != nil {
		return err
	}
	g.log.Info("boot environment written", zap.Any("vars", vars))
	return nil
}
