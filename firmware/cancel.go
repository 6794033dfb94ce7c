package firmware

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Cancelling an update. Until the image is applied nothing the device boots
// has changed: the download went to the inactive slot (or the simulated
// backend's nowhere), and the bootloader still points at the running slot.
// An update in accepted (the twin's standBy), downloading, verifying or
// waitingForWindow can
// therefore be stopped: the record says failed with CodeCancelled before
// Cancel returns (persist, then act), the running step is stopped and
// waited for, and the download checkpoint is removed. A restart after that
// finds a failed update and resumes nothing; the next Start is accepted at
// once. From applying on, the bootloader may already point at the new slot:
// that is the point of no return, and Cancel answers NotCancellableError.

// CodeCancelled is UpdateError.Code of an update stopped by Cancel.
const CodeCancelled = "cancelled"

// ErrNoUpdate is wrapped by Cancel's error when there is no update by that
// id (or, without an id, no update at all).
var ErrNoUpdate = errors.New("firmware: no such update")

// ErrNotCancellable is matched (errors.Is) by *NotCancellableError.
var ErrNotCancellable = errors.New("firmware: update cannot be cancelled")

// NotCancellableError is Cancel's error for an update that has ended or
// has passed the point of no return.
type NotCancellableError struct {
	UpdateID string
	Phase    Phase // the phase it is in (a terminal one when it has ended)
}

func (e *NotCancellableError) Error() string {
	if e.Phase.Terminal() {
		return fmt.Sprintf("firmware: update %s has already ended (%s)", e.UpdateID, e.Phase)
	}
	return fmt.Sprintf("firmware: update %s is %s, past the point of no return", e.UpdateID, e.Phase)
}

// Is makes errors.Is(err, ErrNotCancellable) true.
func (e *NotCancellableError) Is(target error) bool { return target == ErrNotCancellable }

// Cancellable reports whether an update in phase p can still be cancelled:
// nothing the device boots has been changed yet.
func (p Phase) Cancellable() bool {
	return p == PhaseAccepted || p == PhaseDownloading || p == PhaseVerifying || p == PhaseWaitingForWindow
}

// errCancelled is the cause given to the context of a step whose update was
// cancelled, and persist's answer once the record says cancelled.
var errCancelled = errors.New("firmware: update cancelled")

// ParseCancel decodes a cancelFirmwareUpdate payload: empty, {} or null
// (cancel whatever runs) or {"updateId":"…"}. Unknown fields are ignored;
// errors wrap ErrInvalidRequest.
func ParseCancel(payload []byte) (string, error) {
	if len(payload) > maxPayloadLen {
		return "", invalid("payload is %d bytes, more than %d", len(payload), maxPayloadLen)
	}
	trimmed := bytes.TrimSpace(payload)
	if len(trimmed) == 0 || string(trimmed) == "null" {
		return "", nil
	}
	if trimmed[0] != '{' {
		return "", invalid(`payload must be empty, null or a JSON object like {"updateId":"…"}`)
	}
	var raw struct {
		UpdateID *string `json:"updateId"`
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	if err := dec.Decode(&raw); err != nil {
		return "", invalid("payload is not valid JSON: %v", err)
	}
	if dec.More() {
		return "", invalid("payload has trailing data after the JSON object")
	}
	if raw.UpdateID == nil {
		return "", nil
	}
	id := strings.TrimSpace(*raw.UpdateID)
	if len(id) > maxVersionLen {
		return "", invalid("updateId is longer than %d bytes", maxVersionLen)
	}
	if err := checkText("updateId", id, false); err != nil {
		return "", err
	}
	return id, nil
}

// Cancel stops the running update, or the update named id when id is not
// empty, if it has not reached the point of no return (Phase.Cancellable).
// It returns the cancelled update's id once the record says failed with
// CodeCancelled and the step that was running has stopped: no byte is
// written to the installer's sink after Cancel returns. It returns an error
// wrapping ErrNoUpdate when there is no such update (not the latest one, or
// none at all), a *NotCancellableError when it has ended or is applying or
// later, and ctx's error when the step did not stop before ctx was done
// (the update is cancelled all the same: the record says so).
func (m *Manager) Cancel(ctx context.Context, id string) (string, error) {
	m.mu.Lock()
	rec := m.rec
	switch {
	case rec.UpdateID == "" && id == "":
		m.mu.Unlock()
		return "", fmt.Errorf("%w: no update has been started", ErrNoUpdate)
	case id != "" && id != rec.UpdateID:
		m.mu.Unlock()
		return "", fmt.Errorf("%w: %s is not the current update", ErrNoUpdate, id)
	case !rec.busy() || !rec.Phase.Cancellable():
		m.mu.Unlock()
		return "", &NotCancellableError{UpdateID: rec.UpdateID, Phase: rec.Phase}
	}
	next := rec
	next.Phase = PhaseFailed
	next.Err = &UpdateError{Code: CodeCancelled, Message: fmt.Sprintf("cancelled on request while %s", rec.Phase)}
	next.Transitions++
	next.UpdatedAt = time.Now().UTC()
	next.noteHistory(next.UpdatedAt)
	if err := m.store.writeJSON(recordFile, next); err != nil {
		m.mu.Unlock()
		return "", err
	}
	m.rec = next
	m.cancelled = rec.UpdateID
	m.readBack = ""
	m.backRead = readBackResult{}
	m.problem = nil
	stop, done := m.stepStop, m.stepDone
	m.mu.Unlock()

	log := m.log.With(zap.String("update_id", rec.UpdateID), zap.String("phase", string(rec.Phase)))
	if stop != nil {
		stop(errCancelled)
		select {
		case <-done:
		case <-ctx.Done():
			log.Warn("update cancelled, but its step has not stopped yet")
			return rec.UpdateID, fmt.Errorf("firmware: update %s is cancelled but still stopping: %w", rec.UpdateID, ctx.Err())
		}
	}
	if err := m.store.remove(checkpointFile); err != nil {
		log.Warn("cannot remove the download checkpoint", zap.Error(err))
	}
	log.Info("update cancelled")
	m.emitRecord()
	return rec.UpdateID, nil
}

// beginStep registers the step about to run for the update in rec, so that
// Cancel can stop it, and returns its context and the function that ends
// it. ok is false when the record no longer holds a running update (it was
// cancelled, or has ended).
func (m *Manager) beginStep(ctx context.Context) (rec record, sctx context.Context, end func(), ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec = m.rec
	if !rec.busy() {
		return rec, nil, nil, false
	}
	sctx, stop := context.WithCancelCause(ctx)
	done := make(chan struct{})
	m.stepStop, m.stepDone = stop, done
	return rec, sctx, func() {
		m.mu.Lock()
		m.stepStop, m.stepDone = nil, nil
		m.mu.Unlock()
		stop(nil)
		close(done)
	}, true
}

// wasCancelled reports whether update id was cancelled in this process.
func (m *Manager) wasCancelled(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return id != "" && m.cancelled == id
}
