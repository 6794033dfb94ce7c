package bootenv

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"go.uber.org/zap"
)

// Env is a bootloader environment.
//
// Variables with an empty value do not exist: U-Boot deletes a variable set
// to "", and GRUB scripts cannot tell an empty variable from a missing one.
// So Get never returns an empty value, and Set with an empty value removes
// the variable (GRUB stores it empty, which the scripts read as unset).
type Env interface {
	// Get returns the named variables that are set; a name that is not set is
	// absent from the map. With no names it returns every variable.
	Get(ctx context.Context, names ...string) (map[string]string, error)
	// Set writes all vars in one write of the environment: after a crash the
	// environment holds either all of them or none.
	Set(ctx context.Context, vars map[string]string) error
}

// Errors. Tool failures are *ToolError values that wrap ErrTool (and
// ErrToolNotFound or a context error where that is the cause).
var (
	ErrUnknownBackend = errors.New("bootenv: unknown backend")
	ErrConfig         = errors.New("bootenv: bad config")
	ErrInvalid        = errors.New("bootenv: invalid variable")
	ErrTool           = errors.New("bootenv: tool failed")
	ErrToolNotFound   = errors.New("bootenv: tool not found")
	ErrNotWritten     = errors.New("bootenv: write not visible on read-back")
	ErrParse          = errors.New("bootenv: cannot parse environment")
	ErrContract       = errors.New("bootenv: environment breaks the A/B contract")
)

// Config selects and configures a backend. The mapstructure tags are the
// config keys under "bootenv".
type Config struct {
	Backend string      `yaml:"backend" mapstructure:"backend"` // "uboot", "grub" or "file"
	UBoot   UBootConfig `yaml:"uboot" mapstructure:"uboot"`
	GRUB    GRUBConfig  `yaml:"grub" mapstructure:"grub"`
	File    FileConfig  `yaml:"file" mapstructure:"file"`
}

type backendFunc func(cfg Config, run Runner, log *zap.Logger) (Env, error)

// backends is the registry of backend constructors by name. It is fixed at
// compile time: a backend is added by adding a row here.
var backends = map[string]backendFunc{
	"uboot": newUBoot,
	"grub":  newGRUB,
	"file":  newFile,
}

// Backends returns the known backend names, sorted.
func Backends() []string { return slices.Sorted(maps.Keys(backends)) }

// Open returns the backend named by cfg.Backend. run may be nil (ExecRunner
// with DefaultTimeout); log may be nil.
func Open(cfg Config, run Runner, log *zap.Logger) (Env, error) {
	mk, ok := backends[cfg.Backend]
	if !ok {
		return nil, fmt.Errorf("%w %q in key bootenv.backend (known: %s)",
			ErrUnknownBackend, cfg.Backend, strings.Join(Backends(), ", "))
	}
	if run == nil {
		run = ExecRunner{}
	}
	if log == nil {
		log = zap.NewNop()
	}
	return mk(cfg, run, log.Named("bootenv").With(zap.String("backend", cfg.Backend)))
}

// validate checks vars before any write. Names are restricted to what both
// GRUB script variables and U-Boot accept; values may not hold the line
// breaks and NULs that every backend uses as separators.
func validate(vars map[string]string) error {
	if len(vars) == 0 {
		return fmt.Errorf("%w: nothing to set", ErrInvalid)
	}
	for name, value := range vars {
		if !validName(name) {
			return fmt.Errorf("%w: name %q (want letters, digits and '_')", ErrInvalid, name)
		}
		if strings.ContainsAny(value, "\x00\r\n") {
			return fmt.Errorf("%w: value of %s holds a line break or NUL", ErrInvalid, name)
		}
	}
	return nil
}

func validName(name string) bool {
	if name == "" || len(name) > 128 {
		return false
	}
	for _, c := range []byte(name) {
		if !(c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
			return false
		}
	}
	return true
}

// pick applies Get's rules to a full environment: only the requested names,
// only non-empty values.
func pick(all map[string]string, names []string) map[string]string {
	out := make(map[string]string, len(names))
	if len(names) == 0 {
		for k, v := range all {
			if v != "" {
				out[k] = v
			}
		}
		return out
	}
	for _, n := range names {
		if v := all[n]; v != "" {
			out[n] = v
		}
	}
	return out
}

// checkWritten compares a read-back environment with what was written, so a
// tool that silently skipped a line is caught before anyone relies on it.
func checkWritten(tool string, got, want map[string]string) error {
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if got[name] != want[name] {
			return fmt.Errorf("%w: %s wrote %s=%q, read back %q", ErrNotWritten, tool, name, want[name], got[name])
		}
	}
	return nil
}

// sortedLines renders vars as "name=value\n" lines in name order.
func sortedLines(vars map[string]string) []byte {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(vars[k])
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

// parseLines parses "name=value" lines as printed by fw_printenv and
// grub-editenv list. Both print a value that holds a newline raw, so a line
// without '=' continues the previous value. Blank lines are skipped.
func parseLines(out []byte) (map[string]string, error) {
	vars := make(map[string]string)
	last := ""
	for i, line := range strings.Split(string(out), "\n") {
		if line == "" {
			continue
		}
		name, value, ok := strings.Cut(line, "=")
		if !ok || name == "" || strings.ContainsAny(name, " \t\x00") {
			if last == "" {
				return nil, fmt.Errorf("%w: line %d %q is not name=value", ErrParse, i+1, truncate(line, 64))
			}
			vars[last] += "\n" + line
			continue
		}
		vars[name] = value
		last = name
	}
	return vars, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
