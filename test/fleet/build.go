package fleet

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Build builds gwhub, gwagent and gwctl of the module at root into out,
// as make build does (static, trimmed), and returns out.
func Build(ctx context.Context, root, out string) (string, error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out+string(filepath.Separator),
		"./cmd/gwhub", "./cmd/gwagent", "./cmd/gwctl")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %w: %s", err, b)
	}
	return out, nil
}

// Binaries returns the folder of gwhub, gwagent and gwctl for a test:
// $FLEET_BIN when set (e.g. make's build/), else a fresh build of the
// module at root into tmp.
func Binaries(ctx context.Context, root, tmp string) (string, error) {
	if b := os.Getenv("FLEET_BIN"); b != "" {
		return filepath.Abs(b)
	}
	return Build(ctx, root, filepath.Join(tmp, "bin"))
}
