package bootenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Runner runs an external tool and returns its standard output. A failure is
// a *ToolError. It is the one seam between this package and the system:
// tests run the real tools through ExecRunner on files.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
}

// DefaultTimeout bounds one tool run when ExecRunner.Timeout is zero.
// Writing an environment to slow NOR flash takes well under a second; the
// margin is for a loaded system, and the bound is for a tool stuck on a lock.
const DefaultTimeout = 30 * time.Second

// maxOutput caps what is kept of a tool's stdout and stderr. An environment
// is at most a few hundred KiB.
const maxOutput = 4 << 20

// ExecRunner runs tools with os/exec under a bounded context, with LC_ALL=C
// so that messages are stable.
type ExecRunner struct {
	Timeout time.Duration // per run; DefaultTimeout when zero
}

// Run implements Runner.
func (r ExecRunner) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	// A killed tool may leave a child holding the pipes; do not wait for it.
	cmd.WaitDelay = time.Second
	stdout := &capped{max: maxOutput}
	stderr := &capped{max: 64 << 10}
	cmd.Stdout, cmd.Stderr = stdout, stderr

	err := cmd.Run()
	if err == nil && stdout.over {
		err = fmt.Errorf("output longer than %d bytes", maxOutput)
	}
	if err == nil {
		return stdout.Bytes(), nil
	}
	te := &ToolError{Tool: name, Args: args, ExitCode: -1, Stderr: stderr.String(), Err: err}
	var exitErr *exec.ExitError
	switch {
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, os.ErrNotExist):
		te.Err = fmt.Errorf("%w: %w", ErrToolNotFound, err)
	case ctx.Err() != nil:
		te.Err = fmt.Errorf("no answer within %s: %w", timeout, ctx.Err())
	case errors.As(err, &exitErr):
		te.ExitCode = exitErr.ExitCode()
	}
	return nil, te
}

// ToolError is a failed tool run.
type ToolError struct {
	Tool     string
	Args     []string
	ExitCode int    // -1 when the tool did not run or did not exit by itself
	Stderr   string // as printed, possibly cut
	Err      error
}

func (e *ToolError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "bootenv: %s", e.Tool)
	for _, a := range e.Args {
		b.WriteByte(' ')
		b.WriteString(a)
	}
	if e.ExitCode >= 0 {
		fmt.Fprintf(&b, ": exit code %d", e.ExitCode)
	} else if e.Err != nil {
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	if hint := toolHints[filepath.Base(e.Tool)]; hint != "" && errors.Is(e.Err, ErrToolNotFound) {
		fmt.Fprintf(&b, " (install %s)", hint)
	}
	var lines []string
	for l := range strings.Lines(e.Stderr) {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > 0 {
		fmt.Fprintf(&b, ": stderr: %s", truncate(strings.Join(lines, "; "), 512))
	}
	return b.String()
}

// Unwrap lets errors.Is find ErrTool, ErrToolNotFound and context errors.
func (e *ToolError) Unwrap() []error { return []error{ErrTool, e.Err} }

// toolHints name the Debian package that ships a tool.
var toolHints = map[string]string{
	"fw_printenv":  "libubootenv-tool",
	"fw_setenv":    "libubootenv-tool",
	"grub-editenv": "grub-common",
}

// capped is a bytes.Buffer that drops what exceeds max, so a runaway tool
// cannot exhaust memory.
type capped struct {
	bytes.Buffer
	max  int
	over bool
}

func (c *capped) Write(p []byte) (int, error) {
	if room := c.max - c.Len(); room < len(p) {
		c.over = true
		if room > 0 {
			c.Buffer.Write(p[:room])
		}
		return len(p), nil
	}
	return c.Buffer.Write(p)
}
