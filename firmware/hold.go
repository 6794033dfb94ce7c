package firmware

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
)

// A state file that cannot be written (a full or read-only state disk, an
// I/O error) holds the update; it never ends it and never stops the
// Manager. Which writes hold what:
//
//   - the update record (each phase, and what a phase records before its
//     side effect): the update stays in the phase it is in, the write is
//     retried with backoff, and the step that needs the record waits for
//     it. Persist, then act, still holds: nothing is done that the record
//     on disk does not say.
//   - a download checkpoint while the image streams: the download goes on
//     (the image goes to the installer's storage, not to the state disk);
//     each later checkpoint tries again. The last checkpoint that was
//     written stays valid, so a restart meanwhile resumes from there.
//   - the final checkpoint of a download: the finished download waits until
//     it is written, then the machine goes on to verifying.
//
// While held, Progress.Problem says why (CodeStateNotSaved), once when it
// begins and once when it clears; the log says it once with the file and
// the cause, and again when the write succeeds.

// save runs write, which writes the state file name, until it succeeds or
// ctx is done (then it returns ctx.Err()). held says what waits meanwhile,
// for the problem's message.
func (m *Manager) save(ctx context.Context, name, held string, write func() error) error {
	var b *backoff.ExponentialBackOff
	for {
		err := write()
		if err == nil {
			m.clearProblem()
			return nil
		}
		m.setProblem(name, err, held)
		if b == nil {
			b = retry.NewBackoff(m.cfg.RetryInitialInterval, m.cfg.RetryMaxInterval)
		}
		t := time.NewTimer(retry.Next(b))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// setProblem records that the state file name cannot be written and, when
// that is news, logs it and reports it.
func (m *Manager) setProblem(name string, err error, held string) {
	path := m.store.path(name)
	msg := fmt.Sprintf("cannot save %s: %s; %s", path, saveCause(err), held)
	m.mu.Lock()
	if m.problem != nil && m.problem.Message == msg {
		m.mu.Unlock()
		return
	}
	if m.problem == nil {
		m.problemSince = time.Now()
	}
	m.problem = &UpdateError{Code: CodeStateNotSaved, Message: msg}
	m.problemPhase = m.rec.Phase
	id, phase := m.rec.UpdateID, m.rec.Phase
	m.mu.Unlock()
	m.log.Error("cannot save the update state; the update is held and the write retried",
		zap.String("update_id", id), zap.String("phase", string(phase)), zap.String("file", path),
		zap.String("cause", saveCause(err)), zap.String("held", held), zap.Error(err))
	m.emitRecord()
}

// clearProblem ends a problem after a write succeeded. It is reported here
// when the phase is still the one the problem was reported in; otherwise the
// caller reports the new phase, without the problem, next.
func (m *Manager) clearProblem() {
	m.mu.Lock()
	if m.problem == nil {
		m.mu.Unlock()
		return
	}
	m.problem = nil
	since := m.problemSince
	id, samePhase := m.rec.UpdateID, m.rec.Phase == m.problemPhase
	m.mu.Unlock()
	m.log.Info("the update state is saved again; the update goes on",
		zap.String("update_id", id), zap.Duration("held_for", time.Since(since).Round(time.Millisecond)))
	if samePhase {
		m.emitRecord()
	}
}

// saveCause is what the system said, without the names of temporary files:
// "no space left on device", "read-only file system".
func saveCause(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
