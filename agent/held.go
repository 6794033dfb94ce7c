package agent

import (
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/twin/report"
)

// heldSink shows on the twin why the state machine holds an update
// (firmware.Progress.Problem: its state cannot be saved, e.g. the disk is
// full) as firmware.error, while firmwareStatus keeps the phase the update
// waits in. It is the progress reporter's sink: the reporter writes
// "error": null for every phase that has not failed, so while a problem
// lasts this sink puts the problem into each such patch of the held
// update, and progress reported meanwhile (a download goes on while its
// checkpoints cannot be saved) does not hide it. The patches that set and
// clear it are progress, kept in memory: they need no disk write.
type heldSink struct {
	next report.Sink
	log  *zap.Logger

	mu      sync.Mutex            // guards the fields below
	id      string                // the update problem belongs to
	problem *firmware.UpdateError // nil when nothing holds the update
}

func (s *heldSink) Report(patch map[string]any, milestone bool) error {
	s.mu.Lock()
	id, pr := s.id, s.problem
	s.mu.Unlock()
	if pr != nil {
		if fw, ok := patch["firmware"].(map[string]any); ok && fw["error"] == nil && fw["updateId"] == id {
			fw["error"] = errorValue(pr)
		}
	}
	return s.next.Report(patch, milestone)
}

// observe notes p's problem and returns what changed: set is true when a
// problem began or its message changed, cleared when it ended.
func (s *heldSink) observe(p firmware.Progress) (set, cleared bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	had := s.problem
	switch {
	case p.Problem != nil:
		set = had == nil || s.id != p.UpdateID || *had != *p.Problem
		s.id, s.problem = p.UpdateID, p.Problem
	case had != nil:
		cleared = true
		s.problem = nil
	}
	return set, cleared
}

// report sends firmware.error alone: the problem, or null once it cleared.
func (s *heldSink) report(p firmware.Progress, problem *firmware.UpdateError) {
	var v any
	if problem != nil {
		v = errorValue(problem)
	}
	at := p.Time
	if at.IsZero() {
		at = time.Now()
	}
	patch := map[string]any{"firmware": map[string]any{"error": v, "updatedAt": at.UTC().Format(report.TimeFormat)}}
	if err := s.next.Report(patch, false); err != nil {
		s.log.Warn("cannot report why the update is held", zap.String("update_id", p.UpdateID), zap.Error(err))
	}
}

func errorValue(e *firmware.UpdateError) map[string]any {
	return map[string]any{"code": e.Code, "message": e.Message}
}

// observeFirmware is the state machine's Observer: the reporter's, plus
// the held update's problem. A new problem is reported after the progress
// that brings it, so that no patch of the reporter's hides it; a cleared
// one before, so that it cannot clear anything the progress reports. On a
// phase that ended the update neither is: the reporter's patch of that
// phase sets firmware.error itself (its own error, or null).
func (a *Agent) observeFirmware(p firmware.Progress) {
	set, cleared := a.held.observe(p)
	if cleared && !p.Phase.Terminal() {
		a.held.report(p, nil)
	}
	a.reporter.Observe(p)
	if set && !p.Phase.Terminal() {
		a.held.report(p, p.Problem)
	}
}

// updateLine is the status line's part about the update: its stage and,
// while it is held, why ("downloading 100% of 2.0.0; held: cannot save
// …/download.json: no space left on device; …").
func updateLine(st firmware.Status) string {
	s := updateStage(st)
	if st.Busy && st.Problem != nil {
		s += "; held: " + st.Problem.Message
	}
	if st.Busy && st.Retry != nil {
		s += fmt.Sprintf("; retrying (attempt %d failed: %s)", st.Retry.Attempt, st.Retry.LastError)
	}
	return s
}
