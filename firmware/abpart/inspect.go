package abpart

import (
	"context"
	"errors"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Inspect is Status for a process that is not the agent (gwagent status,
// while the agent may run): cfg is checked as by New, then the slots, the
// bootloader environment and the record are read. Nothing is created or
// written; env is only read (a write through it fails).
func Inspect(ctx context.Context, cfg Config, env bootenv.Env) (Status, error) {
	if env != nil {
		env = readOnlyEnv{env}
	}
	i, err := check(cfg, Deps{Env: env})
	if err != nil {
		return Status{}, err
	}
	return i.Status(ctx)
}

// errReadOnly is what a write through Inspect's environment gets.
var errReadOnly = errors.New("abpart: the environment is read-only here")

type readOnlyEnv struct{ bootenv.Env }

func (readOnlyEnv) Set(context.Context, map[string]string) error { return errReadOnly }
