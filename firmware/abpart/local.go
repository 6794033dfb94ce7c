package abpart

import (
	"context"
	"fmt"
	"os"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
)

var _ firmware.LocalBlocks = (*Installer)(nil)

// LocalBlocks implements firmware.LocalBlocks for an adaptive install: the
// running slot and the slot the update is written to, both opened
// read-only (O_RDONLY: these descriptors can never write either slot).
// The running slot may be unreadable (an unprivileged agent whose start-up
// step took it away): the install then reuses only what the target holds.
func (i *Installer) LocalBlocks(ctx context.Context, u firmware.Update) (running, target firmware.LocalImage, err error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	rec, ok, err := i.record(u.ID)
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		return nil, nil, fmt.Errorf("%w %s (no slot is being written)", ErrNoSwitch, u.ID)
	}
	run, err := i.runningSlot()
	if err != nil {
		return nil, nil, err
	}
	if run == rec.Target {
		return nil, nil, fmt.Errorf("%w: slot %s is both the running slot and the target of update %s", ErrInconsistent, run, u.ID)
	}
	t, err := i.openLocal(rec.Target)
	if err != nil {
		return nil, nil, err
	}
	r, err := i.openLocal(run)
	if err != nil {
		i.log.Warn("cannot read the running slot; an adaptive install reuses only the target slot's blocks",
			zap.String("slot", run), zap.Error(err))
		return nil, t, nil
	}
	return r, t, nil
}

// openLocal opens slot read-only as a firmware.LocalImage of its capacity.
func (i *Installer) openLocal(slot string) (*localSlot, error) {
	f, err := i.openReadOnly(slot)
	if err != nil {
		return nil, err
	}
	n, err := i.capacity(slot)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &localSlot{File: f, size: n}, nil
}

type localSlot struct {
	*os.File
	size int64
}

func (l *localSlot) Size() int64 { return l.size }
