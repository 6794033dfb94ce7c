package bootenv

import (
	"context"
	"fmt"
	"os"
	"sync"

	"go.uber.org/zap"
)

// UBootConfig configures the "uboot" backend (libubootenv's fw_printenv and
// fw_setenv).
type UBootConfig struct {
	// ConfigFile is the fw_env.config naming the device (or file), offset and
	// size of the environment; two lines for a redundant environment.
	// Default /etc/fw_env.config.
	ConfigFile string `yaml:"configFile" mapstructure:"configFile"`
	// PrintenvPath and SetenvPath override the tools (default: found in PATH).
	PrintenvPath string `yaml:"printenvPath" mapstructure:"printenvPath"`
	SetenvPath   string `yaml:"setenvPath" mapstructure:"setenvPath"`
	// ScriptDir is where the one-write script for fw_setenv -s is put
	// (default: os.TempDir()). It holds only variable names and values.
	ScriptDir string `yaml:"scriptDir" mapstructure:"scriptDir"`
}

type uboot struct {
	cfg UBootConfig
	run Runner
	log *zap.Logger
	mu  sync.Mutex // serialises Set within the process; fw_setenv locks across processes
}

func newUBoot(c Config, run Runner, log *zap.Logger) (Env, error) {
	cfg := c.UBoot
	if cfg.ConfigFile == "" {
		cfg.ConfigFile = "/etc/fw_env.config"
	}
	if cfg.PrintenvPath == "" {
		cfg.PrintenvPath = "fw_printenv"
	}
	if cfg.SetenvPath == "" {
		cfg.SetenvPath = "fw_setenv"
	}
	return &uboot{cfg: cfg, run: run, log: log}, nil
}

// Get prints the whole environment and filters it here: fw_printenv NAME
// prints "NAME=" and exits 0 for a missing variable in some versions and
// fails in others, and printing everything is one read either way.
func (u *uboot) Get(ctx context.Context, names ...string) (map[string]string, error) {
	all, err := u.readAll(ctx)
	if err != nil {
		return nil, err
	}
	return pick(all, names), nil
}

func (u *uboot) readAll(ctx context.Context) (map[string]string, error) {
	out, err := u.run.Run(ctx, u.cfg.PrintenvPath, "-c", u.cfg.ConfigFile)
	if err != nil {
		return nil, err
	}
	all, err := parseLines(out)
	if err != nil {
		return nil, fmt.Errorf("%s -c %s: %w", u.cfg.PrintenvPath, u.cfg.ConfigFile, err)
	}
	return all, nil
}

// Set writes vars with fw_setenv's script mode: one invocation, one write of
// the environment (of the inactive copy, for a redundant one), then reads
// the environment back to confirm every value.
func (u *uboot) Set(ctx context.Context, vars map[string]string) error {
	if err := validate(vars); err != nil {
		return err
	}
	u.mu.Lock()
	defer u.mu.Unlock()

	script, err := os.CreateTemp(u.cfg.ScriptDir, "gwagent-fw_setenv-*.txt")
	if err != nil {
		return fmt.Errorf("bootenv: script for fw_setenv: %w", err)
	}
	defer os.Remove(script.Name())
	// "name=" deletes a variable in script mode, which is what Set promises
	// for an empty value.
	if _, err := script.Write(sortedLines(vars)); err != nil {
		script.Close()
		return fmt.Errorf("bootenv: script for fw_setenv: %w", err)
	}
	if err := script.Close(); err != nil {
		return fmt.Errorf("bootenv: script for fw_setenv: %w", err)
	}
	if _, err := u.run.Run(ctx, u.cfg.SetenvPath, "-c", u.cfg.ConfigFile, "-s", script.Name()); err != nil {
		return err
	}
	got, err := u.readAll(ctx)
	if err != nil {
		return fmt.Errorf("bootenv: reading back after fw_setenv: %w", err)
	}
	if err := checkWritten(u.cfg.SetenvPath, got, vars); err != nil {
		return err
	}
	u.log.Info("boot environment written", zap.Any("vars", vars))
	return nil
}
