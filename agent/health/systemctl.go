package health

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// probeTimeout bounds one systemctl call.
const probeTimeout = 10 * time.Second

// Systemctl implements Systemd with the systemctl command. It asks without
// --wait: the agent is itself part of the boot, and waiting for the boot to
// finish from inside it can deadlock; the Checker polls instead.
type Systemctl struct {
	// Path is the systemctl binary (default "systemctl" from PATH).
	Path string
}

// BootedSystemd returns a Systemctl when the system was booted with systemd
// (/run/systemd/system exists, as sd_booted(3) checks) and nil otherwise.
func BootedSystemd() Systemd {
	if fi, err := os.Stat("/run/systemd/system"); err != nil || !fi.IsDir() {
		return nil
	}
	return Systemctl{}
}

// SystemState implements Systemd.
func (s Systemctl) SystemState(ctx context.Context) (string, error) {
	return s.state(ctx, "is-system-running")
}

// UnitState implements Systemd.
func (s Systemctl) UnitState(ctx context.Context, unit string) (string, error) {
	if strings.HasPrefix(unit, "-") {
		return "", fmt.Errorf("health: unit name %q", unit)
	}
	return s.state(ctx, "is-active", "--", unit)
}

// state runs systemctl and returns the first line it printed. Both commands
// exit non-zero for every state but the good one and still print the
// state, so the exit status alone is not an error.
func (s Systemctl) state(ctx context.Context, args ...string) (string, error) {
	path := s.Path
	if path == "" {
		path = "systemctl"
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	line, _, _ := strings.Cut(strings.TrimSpace(out.String()), "\n")
	if line != "" {
		return strings.TrimSpace(line), nil
	}
	var ee *exec.ExitError
	if err == nil || errors.As(err, &ee) {
		return "", fmt.Errorf("health: %s %s printed no state: %s", path, strings.Join(args, " "), strings.TrimSpace(stderr.String()))
	}
	return "", fmt.Errorf("health: %s %s: %w", path, strings.Join(args, " "), err)
}
