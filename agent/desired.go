package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unicode"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// The desired firmware property (docs/twin.md, "Desired firmware"): the
// operator writes desired.firmware = {updateId, fwPackageUri, version,
// sha256, size, signatureUri, indexUri, window}; the agent converges to it
// through the same state machine as the firmwareUpdate method and
// acknowledges it the Plug and Play way, with ac/av/ad (and desiredId) on
// the reported firmware object, whose other members stay the update's
// status.

const (
	desiredKey  = "firmware"
	desiredFile = "desired-firmware.json"
	// desiredFormat is the format of desiredFile.
	desiredFormat = 1
	maxDesiredID  = 128
	// cancelTimeout bounds the wait for a superseded update's step to stop.
	cancelTimeout = 30 * time.Second
)

// Acknowledgement codes of the desired firmware (ac).
const (
	acDone    = 200 // converged: completed, or the version already runs
	acPending = 202 // accepted, running or waiting for another update
	acBad     = 400 // malformed: nothing started
	acFailed  = 500 // started and failed (not retried for this id)
)

// desiredUpdate is a well-formed desired firmware value.
type desiredUpdate struct {
	ID  string
	Req firmware.Request
}

// parseDesiredFirmware validates a desired firmware value: an object with
// updateId (or id) and the firmwareUpdate payload's members, of which
// version is required (the agent compares it with the running one).
func parseDesiredFirmware(v any) (desiredUpdate, error) {
	m, ok := v.(map[string]any)
	if !ok {
		return desiredUpdate{}, errors.New("firmware must be an object with updateId, fwPackageUri and version")
	}
	rawID, ok := m["updateId"]
	if !ok {
		rawID = m["id"]
	}
	id, ok := rawID.(string)
	id = strings.TrimSpace(id)
	switch {
	case !ok || id == "":
		return desiredUpdate{}, errors.New("updateId is required (a string the operator chooses)")
	case len(id) > maxDesiredID:
		return desiredUpdate{}, fmt.Errorf("updateId is longer than %d bytes", maxDesiredID)
	case strings.IndexFunc(id, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0:
		return desiredUpdate{}, errors.New("updateId has control or format characters")
	}
	body, err := json.Marshal(m)
	if err != nil {
		return desiredUpdate{}, fmt.Errorf("firmware: %v", err)
	}
	req, err := firmware.ParseRequest(body)
	if err != nil {
		return desiredUpdate{}, errors.New(reason(err))
	}
	if req.Version == "" {
		return desiredUpdate{}, errors.New("version is required")
	}
	return desiredUpdate{ID: id, Req: req}, nil
}

// handledDesired is desiredFile: the last desired update this device took
// up, so a restart or a reconnect does not run an ended one again.
type handledDesired struct {
	Format int    `json:"format"`
	ID     string `json:"id"`
	// UpdateID is the state machine's id of the update started for ID;
	// empty between the save and the start (resolved on the next start
	// from the state machine's record).
	UpdateID string `json:"updateId,omitempty"`
	Version  string `json:"version"`
	// Ended is set once the update for ID has ended (or was refused, or
	// the version already ran); Result says how.
	Ended  bool   `json:"ended"`
	Result string `json:"result,omitempty"`
	AC     int    `json:"ac,omitempty"`
}

// desiredState is the converger's state; mu guards it. The worker
// (desiredLoop) is the only goroutine that starts or cancels updates.
type desiredState struct {
	kick chan struct{} // cap 1: evaluate again

	mu      sync.Mutex
	set     bool // the twin has said something about firmware
	want    *desiredUpdate
	bad     string // why the desired value is refused (want is nil)
	av      int64
	handled handledDesired
	ack     map[string]any // the acknowledgement last queued
}

func (a *Agent) desiredPath() string { return filepath.Join(a.config().StateDir, desiredFile) }

// loadDesired reads desiredFile; an empty, torn or unknown file is treated
// as missing (the worst case is one more attempt of the last update).
func (a *Agent) loadDesired() {
	a.desired.kick = make(chan struct{}, 1)
	b, err := os.ReadFile(a.desiredPath())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("cannot read the desired firmware record", zap.Error(err))
		}
		return
	}
	var h handledDesired
	if err := json.Unmarshal(b, &h); err != nil || h.Format != desiredFormat {
		a.log.Warn("desired firmware record unreadable; ignored", zap.String("file", a.desiredPath()))
		return
	}
	a.desired.handled = h
}

func (a *Agent) saveDesiredLocked(h handledDesired) error {
	h.Format = desiredFormat
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(a.desiredPath(), b, 0o600); err != nil {
		return fmt.Errorf("agent: save the desired firmware record: %w", err)
	}
	a.desired.handled = h
	return nil
}

func (a *Agent) kickDesired() {
	select {
	case a.desired.kick <- struct{}{}:
	default:
	}
}

// onDesiredFirmware takes the firmware member of a desired document or
// patch. present is false when the member is absent (of a full document:
// not desired; of a patch: unchanged).
func (a *Agent) onDesiredFirmware(v any, present, full bool, version int64) {
	if !present && !full {
		return
	}
	d := &a.desired
	d.mu.Lock()
	d.av = version
	switch {
	case v == nil:
		d.set = d.set || d.want != nil || d.bad != "" || d.handled.ID != ""
		d.want, d.bad = nil, ""
	default:
		d.set = true
		u, err := parseDesiredFirmware(v)
		if err != nil {
			d.want, d.bad = nil, err.Error()
			a.log.Warn("desired firmware refused", zap.Int64("version", version), zap.Error(err))
		} else {
			d.want, d.bad = &u, ""
		}
	}
	d.mu.Unlock()
	a.kickDesired()
}

// desiredLoop converges to the desired firmware: evaluated on each desired
// change and whenever an update ends.
func (a *Agent) desiredLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.desired.kick:
		}
		a.converge(ctx)
	}
}

// converge is one evaluation (docs/twin.md has the rules).
func (a *Agent) converge(ctx context.Context) {
	d := &a.desired
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.set {
		return
	}
	st := a.manager.Status()
	h := d.handled

	// Follow the update started for the last desired id to its end.
	if h.ID != "" && !h.Ended {
		if h.UpdateID == "" && st.UpdateID != "" && st.TargetVersion == h.Version {
			h.UpdateID = st.UpdateID // saved, then started, then stopped: adopt it
		}
		if h.UpdateID != "" && st.UpdateID != h.UpdateID {
			// Another update ran since (the state machine keeps the last).
			h.Ended, h.Result, h.AC = true, "ended; its result is no longer known", acDone
		}
		if h.UpdateID != "" && st.UpdateID == h.UpdateID && !st.Busy {
			h.Ended, h.Result, h.AC = true, string(st.Phase), acDone
			if st.Phase != firmware.PhaseCompleted {
				h.AC = acFailed
				if st.Err != nil {
					h.Result = fmt.Sprintf("%s: %s: %s", st.Phase, st.Err.Code, st.Err.Message)
				}
			}
		}
		if h != d.handled {
			if err := a.saveDesiredLocked(h); err != nil {
				a.log.Error("cannot save the desired firmware record", zap.Error(err))
			}
		}
	}

	switch {
	case d.bad != "":
		a.ackDesiredLocked(acBad, d.bad, "")
		return
	case d.want == nil:
		// Not desired: an update started for it that can still stop is
		// cancelled; one past the point of no return finishes.
		if a.desiredRunningLocked(st) {
			a.cancelDesiredLocked(ctx, h.UpdateID, "no longer desired")
		}
		a.ackDesiredLocked(acDone, "no firmware update desired", "")
		return
	}
	w := *d.want
	if h.ID == w.ID && !h.Ended && h.UpdateID == "" && !st.Busy {
		h.ID = "" // saved but never started: start it
	}
	if h.ID == w.ID {
		switch {
		case h.Ended:
			a.ackDesiredLocked(h.AC, "ended: "+h.Result, w.ID)
		default:
			a.ackDesiredLocked(acPending, fmt.Sprintf("update %s %s", h.UpdateID, st.Phase), w.ID)
		}
		return
	}
	if st.Busy {
		if a.desiredRunningLocked(st) {
			// The operator changed the desired update while the last one
			// runs: stop it if it can stop, else let it finish first.
			if !a.cancelDesiredLocked(ctx, h.UpdateID, "superseded by desired update "+w.ID) {
				a.ackDesiredLocked(acPending, fmt.Sprintf("waiting for update %s (%s) to end", st.UpdateID, st.Phase), w.ID)
				return
			}
			st = a.manager.Status()
		} else {
			a.ackDesiredLocked(acPending, fmt.Sprintf("waiting for update %s (%s) to end", st.UpdateID, st.Phase), w.ID)
			return
		}
	}
	if st.CurrentVersion == w.Req.Version {
		rec := handledDesired{ID: w.ID, Version: w.Req.Version, Ended: true, Result: "version " + w.Req.Version + " already runs", AC: acDone}
		if err := a.saveDesiredLocked(rec); err != nil {
			a.log.Error("cannot save the desired firmware record", zap.Error(err))
		}
		a.ackDesiredLocked(acDone, rec.Result, w.ID)
		return
	}
	// Persist, then act: a restart between the two adopts the started
	// update (above) instead of starting another.
	rec := handledDesired{ID: w.ID, Version: w.Req.Version}
	if err := a.saveDesiredLocked(rec); err != nil {
		a.log.Error("cannot save the desired firmware record", zap.Error(err))
		return
	}
	req := w.Req
	req.DesiredID = w.ID
	id, err := a.manager.Start(req)
	var busy *firmware.BusyError
	switch {
	case errors.As(err, &busy):
		// The method path got there first: wait for it to end.
		if err := a.saveDesiredLocked(h); err != nil {
			a.log.Error("cannot save the desired firmware record", zap.Error(err))
		}
		a.ackDesiredLocked(acPending, fmt.Sprintf("waiting for update %s to end", busy.UpdateID), w.ID)
		return
	case err != nil:
		code := acFailed
		if errors.Is(err, firmware.ErrInvalidRequest) {
			code = acBad
		}
		rec.Ended, rec.Result, rec.AC = true, "not started: "+reason(err), code
		if serr := a.saveDesiredLocked(rec); serr != nil {
			a.log.Error("cannot save the desired firmware record", zap.Error(serr))
		}
		a.log.Warn("desired firmware update not started", zap.String("desired_id", w.ID), zap.Error(err))
		a.ackDesiredLocked(code, rec.Result, w.ID)
		return
	}
	rec.UpdateID = id
	if err := a.saveDesiredLocked(rec); err != nil {
		a.log.Error("cannot save the desired firmware record", zap.Error(err))
	}
	a.log.Info("desired firmware update started", zap.String("desired_id", w.ID), zap.String("update_id", id), zap.String("version", w.Req.Version))
	a.kickStatus()
	a.ackDesiredLocked(acPending, "update "+id+" started", w.ID)
}

// desiredRunningLocked reports whether the running update was started for
// a desired firmware.
func (a *Agent) desiredRunningLocked(st firmware.Status) bool {
	h := a.desired.handled
	return st.Busy && h.UpdateID != "" && !h.Ended && st.UpdateID == h.UpdateID
}

// cancelDesiredLocked cancels the desired update id if it is still
// cancellable; false when it is past the point of no return (it finishes).
func (a *Agent) cancelDesiredLocked(ctx context.Context, id, why string) bool {
	cctx, cancel := context.WithTimeout(ctx, cancelTimeout)
	defer cancel()
	_, err := a.manager.Cancel(cctx, id)
	if err != nil && !errors.Is(err, firmware.ErrNoUpdate) {
		if !errors.Is(err, firmware.ErrNotCancellable) {
			a.log.Warn("cannot cancel the desired update", zap.String("update_id", id), zap.Error(err))
		}
		return false
	}
	a.log.Info("desired update cancelled", zap.String("update_id", id), zap.String("why", why))
	h := a.desired.handled
	h.Ended, h.Result, h.AC = true, "cancelled: "+why, acFailed
	if err := a.saveDesiredLocked(h); err != nil {
		a.log.Error("cannot save the desired firmware record", zap.Error(err))
	}
	a.kickStatus()
	return true
}

// ackDesiredLocked queues the acknowledgement on the reported firmware
// object unless it says what the last one said.
func (a *Agent) ackDesiredLocked(ac int, ad, id string) {
	d := &a.desired
	ack := map[string]any{"ac": ac, "av": d.av, "ad": ad, "desiredId": nil}
	if id != "" {
		ack["desiredId"] = id
	}
	if d.ack != nil && fmt.Sprint(d.ack) == fmt.Sprint(ack) {
		return
	}
	if err := a.queue.Report(map[string]any{desiredKey: ack}, true); err != nil {
		a.log.Error("cannot queue the desired firmware acknowledgement", zap.Error(err))
		return
	}
	d.ack = ack
}
