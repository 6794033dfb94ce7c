package report

import (
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
)

// Sink takes reported-property patches; *twin.Queue is one. A milestone is
// never merged into a later patch.
type Sink interface {
	Report(patch map[string]any, milestone bool) error
}

// Tutorial firmwareStatus values. The firmware phases map onto them; idle
// and accepted are the tutorial's standBy (waiting for, or about to start,
// the download).
const (
	StatusStandBy = "standBy"
)

// TimeFormat is how timestamps are reported: RFC 3339, UTC, milliseconds.
const TimeFormat = "2006-01-02T15:04:05.000Z07:00"

// FirmwareStatus is the firmwareStatus value of a phase.
func FirmwareStatus(p firmware.Phase) string {
	switch p {
	case firmware.PhaseIdle, firmware.PhaseAccepted, "":
		return StatusStandBy
	}
	return string(p)
}

// Options shape the reporter. Zero values take the defaults.
type Options struct {
	// MinInterval is the least time between two progress patches of one
	// phase (0: no limit; the configuration's default is 2s); phase
	// changes are never held back.
	MinInterval time.Duration
	// MinPercentStep is how far the percentage must move before progress
	// is reported again (default 5).
	MinPercentStep int
	// Log is the component logger.
	Log *zap.Logger
	// OnProgress, when set, sees every Progress (not rate-limited), e.g.
	// for a status line. It must return quickly.
	OnProgress func(firmware.Progress)
}

// Reporter is the firmware Observer that writes reported patches.
type Reporter struct {
	sink Sink
	opts Options
	log  *zap.Logger

	mu      sync.Mutex        // guards everything below
	last    firmware.Progress // the latest progress seen
	sent    firmware.Progress // the latest progress reported
	sentAt  time.Time         // when sent was reported
	any     bool              // something was reported
	dlDone  bool              // downloadComplete reported for sent.UpdateID
	pending firmware.Progress // progress held back by MinInterval, if held
	held    bool              // pending holds progress
	timer   stopper           // reports pending when MinInterval has passed
	gen     uint64            // counts timers: one replaced or stopped after it fired does nothing
	closed  bool

	// now and afterFunc are time.Now and time.AfterFunc; the package's
	// benchmark replaces them to simulate an hour-long download.
	now       func() time.Time
	afterFunc func(time.Duration, func()) stopper
}

// stopper is the part of *time.Timer the Reporter uses.
type stopper interface{ Stop() bool }

func afterFunc(d time.Duration, f func()) stopper { return time.AfterFunc(d, f) }

// New returns a Reporter writing to sink.
func New(sink Sink, opts Options) *Reporter {
	opts.MinInterval = max(opts.MinInterval, 0)
	if opts.MinPercentStep <= 0 {
		opts.MinPercentStep = 5
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	return &Reporter{sink: sink, opts: opts, log: opts.Log, now: time.Now, afterFunc: afterFunc}
}

// SetLimits changes the progress rate limits (configuration reload).
func (r *Reporter) SetLimits(minInterval time.Duration, minPercentStep int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if minInterval >= 0 {
		r.opts.MinInterval = minInterval
	}
	if minPercentStep > 0 {
		r.opts.MinPercentStep = minPercentStep
	}
}

// Startup reports the state the agent starts in: the running update's
// phase if one is in progress; the result of the last update, as it was,
// if one has ended (see lastResultPatch); otherwise, on a device that has
// not run an update, the tutorial's standBy with logTime and the running
// version. extra (e.g. the agent's version) is merged into the same patch.
func (r *Reporter) Startup(st firmware.Status, now time.Time, extra map[string]any) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var patch map[string]any
	switch {
	case st.Busy:
		// Resuming after a restart: downloadComplete was reported before
		// it (the queue kept it); stamping it now would be wrong.
		r.any, r.sent.UpdateID = true, st.UpdateID
		r.dlDone = afterDownload(st.Phase)
		patch = r.patchLocked(st.Progress)
		r.markSentLocked(st.Progress, now)
	case st.UpdateID != "" && st.Phase.Terminal():
		// firmwareStatus is the state of the current or last update: a
		// restart must not turn the last result into standBy.
		patch = lastResultPatch(st.Progress)
		r.dlDone = true
		r.markSentLocked(st.Progress, now)
	default:
		p := firmware.Progress{Phase: firmware.PhaseIdle, CurrentVersion: st.CurrentVersion, Percent: -1, Time: now}
		patch = r.patchLocked(p)
		r.markSentLocked(p, now)
	}
	if len(st.History) > 0 {
		// The whole history, in case the twin lost some of it.
		patch[HistoryProperty] = HistoryPatch(st.History)
	}
	for k, v := range extra {
		patch[k] = v
	}
	return r.sink.Report(patch, true)
}

// lastResultPatch restates an update that has ended (completed, failed,
// rolledBack) as the agent reports it at start: its status, id, versions,
// slot and error as they were, so that a restart does not erase the result
// from the twin. It stamps nothing: logTime, downloadComplete,
// startedApplyingImage, lastFirmwareUpdate and firmware.updatedAt stay as
// the update left them, so a watcher that goes by those times does not take
// the old result for a new one.
func lastResultPatch(p firmware.Progress) map[string]any {
	patch := Patch(p)
	delete(patch, "lastFirmwareUpdate")
	delete(patch["firmware"].(map[string]any), "updatedAt")
	return patch
}

// Observe is the firmware.Config.Observer.
func (r *Reporter) Observe(p firmware.Progress) {
	if r.opts.OnProgress != nil {
		r.opts.OnProgress(p)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.last = p
	now := r.now()
	if !r.any || p.UpdateID != r.sent.UpdateID || p.Phase != r.sent.Phase || p.Phase.Terminal() {
		// A phase change: at once, as a milestone, superseding any held
		// progress of the phase before.
		r.dropPendingLocked()
		r.emitLocked(p, true, now)
		return
	}
	if !r.progressWorthLocked(p) {
		if r.held && !sameRetry(p.Retry, r.pending.Retry) {
			r.pending = p // a retry that cleared while held: not shown stale
		}
		return
	}
	if wait := r.opts.MinInterval - now.Sub(r.sentAt); wait > 0 {
		// A value, not a pointer: Observe runs for every written window
		// and must not allocate.
		r.pending, r.held = p, true
		if r.timer == nil {
			r.gen++
			gen := r.gen
			r.timer = r.afterFunc(wait, func() { r.flushPending(gen) })
		}
		return
	}
	r.dropPendingLocked()
	r.emitLocked(p, false, now)
}

// progressWorthLocked says whether p moved far enough from what was last
// reported to be worth a patch.
func (r *Reporter) progressWorthLocked(p firmware.Progress) bool {
	if !sameRetry(p.Retry, r.sent.Retry) {
		return true // a retry, or its end: the interval alone limits
	}
	if p.Bytes == r.sent.Bytes && p.Total == r.sent.Total && p.Percent == r.sent.Percent && p.Slot == r.sent.Slot {
		return false
	}
	if p.Percent < 0 || r.sent.Percent < 0 {
		return true // no percentage: the interval alone limits
	}
	return p.Percent-r.sent.Percent >= r.opts.MinPercentStep || p.Percent == 100 && r.sent.Percent != 100
}

// flushPending reports the held progress when timer gen fires. A timer
// that fired while Observe held the lock, and was stopped or replaced by
// it, finds another generation (or none) and does nothing: progress is
// never reported sooner than MinInterval after the last.
func (r *Reporter) flushPending(gen uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.timer == nil || gen != r.gen {
		return
	}
	r.timer = nil
	if !r.held || r.closed {
		return
	}
	p := r.pending
	r.pending, r.held = firmware.Progress{}, false
	r.emitLocked(p, false, r.now())
}

func (r *Reporter) dropPendingLocked() {
	r.pending, r.held = firmware.Progress{}, false
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
}

func (r *Reporter) emitLocked(p firmware.Progress, milestone bool, now time.Time) {
	patch := r.patchLocked(p)
	if n := len(p.History); milestone && n > 0 && p.History[n-1].UpdateID == p.UpdateID {
		// The history changes with the phase (persisted together): its
		// entry goes with the milestone, never with byte progress.
		patch[HistoryProperty] = HistoryPatch(p.History[n-1:])
	}
	r.markSentLocked(p, now)
	if err := r.sink.Report(patch, milestone); err != nil {
		// The queue is closed (the agent stops) or the patch is invalid;
		// a disk that refuses writes is not an error (the queue holds the
		// patch in memory). The next start reports the whole state again.
		r.log.Error("cannot queue reported progress", zap.String("update_id", p.UpdateID),
			zap.String("phase", string(p.Phase)), zap.Error(err))
	}
}

func (r *Reporter) markSentLocked(p firmware.Progress, now time.Time) {
	r.sent, r.sentAt, r.any = p, now, true
}

// Close reports progress still held back and stops the timer. Later
// Observe calls are ignored.
func (r *Reporter) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	if r.held {
		p := r.pending
		r.dropPendingLocked()
		r.emitLocked(p, false, r.now())
	}
	r.dropPendingLocked()
	r.closed = true
}

// Last returns the latest progress observed (zero before any).
func (r *Reporter) Last() firmware.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

// patchLocked builds the reported patch for p. downloadComplete is stamped
// once per update, with the first phase after the download.
func (r *Reporter) patchLocked(p firmware.Progress) map[string]any {
	patch := Patch(p)
	if !r.any || p.UpdateID != r.sent.UpdateID {
		r.dlDone = false
	}
	if afterDownload(p.Phase) && p.Phase != firmware.PhaseCompleted && !r.dlDone {
		patch["downloadComplete"] = ts(p.Time)
		r.dlDone = true
	}
	return patch
}

func sameRetry(a, b *firmware.Retry) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func afterDownload(p firmware.Phase) bool {
	switch p {
	case firmware.PhaseVerifying, firmware.PhaseWaitingForWindow, firmware.PhaseApplying,
		firmware.PhaseRebooting, firmware.PhaseCommitting, firmware.PhaseCompleted:
		return true
	}
	return false
}

// Patch is the reported patch describing p on its own: the tutorial's
// top-level fields and the "firmware" object, with null for what does not
// apply to p's phase. (The Reporter adds downloadComplete when the download
// ends.)
func Patch(p firmware.Progress) map[string]any {
	status := FirmwareStatus(p.Phase)
	at := p.Time
	if at.IsZero() {
		at = time.Now()
	}
	now := ts(at)
	top := map[string]any{"firmwareStatus": status}
	fw := map[string]any{
		"status":         status,
		"updateId":       orNull(p.UpdateID),
		"targetVersion":  orNull(p.TargetVersion),
		"currentVersion": orNull(p.CurrentVersion),
		"bytes":          nil,
		"totalBytes":     nil,
		"percent":        nil,
		"slot":           orNull(p.Slot),
		"error":          nil,
		"retry":          nil,
		"updatedAt":      now,
	}
	switch p.Phase {
	case firmware.PhaseIdle, "":
		top["logTime"] = now
		fw["updateId"], fw["targetVersion"], fw["slot"] = nil, nil, nil
	case firmware.PhaseAccepted:
		// A new update: the stamps of the last one no longer apply.
		top["logTime"] = now
		top["downloadComplete"] = nil
		top["startedApplyingImage"] = nil
	case firmware.PhaseDownloading, firmware.PhaseVerifying:
		top["startedApplyingImage"] = nil
		if p.Phase == firmware.PhaseDownloading {
			top["downloadComplete"] = nil
		}
		fw["bytes"] = p.Bytes
		if p.Total > 0 {
			fw["totalBytes"] = p.Total
		}
		if p.Percent >= 0 {
			fw["percent"] = p.Percent
		}
		if p.Retry != nil {
			fw["retry"] = map[string]any{"attempt": p.Retry.Attempt, "lastError": p.Retry.LastError, "nextAttemptAt": ts(p.Retry.NextAttemptAt)}
		}
	case firmware.PhaseWaitingForWindow:
		top["startedApplyingImage"] = nil
	case firmware.PhaseApplying:
		top["startedApplyingImage"] = now
	case firmware.PhaseCompleted:
		top["lastFirmwareUpdate"] = now
	case firmware.PhaseFailed, firmware.PhaseRolledBack, firmware.PhaseRollingBack:
		if p.Err != nil {
			fw["error"] = map[string]any{"code": p.Err.Code, "message": p.Err.Message}
		} else {
			fw["error"] = map[string]any{"code": firmware.CodeInternal, "message": "update " + string(p.Phase)}
		}
	}
	// window: the update's maintenance window, with its next opening while
	// the update waits for it; null for an update without one (set to null when
	// an update is accepted, so the window of an earlier one does not
	// linger).
	switch w := p.Window; {
	case w != nil:
		win := map[string]any{"start": w.Start, "duration": w.Duration, "timeZone": w.TimeZone, "opensAt": nil}
		if !w.OpensAt.IsZero() {
			win["opensAt"] = ts(w.OpensAt)
		}
		fw["window"] = win
	case p.Phase == firmware.PhaseAccepted:
		fw["window"] = nil
	}
	// adaptive: what an adaptive install (indexUri) fetched and reused,
	// and why it fell back to a full download; null from the next
	// update's acceptance on.
	switch a := p.Adaptive; {
	case a != nil:
		fw["adaptive"] = map[string]any{"bytesFetched": a.BytesFetched, "bytesReused": a.BytesReused, "fallback": orNull(a.Fallback)}
	case p.Phase == firmware.PhaseAccepted:
		fw["adaptive"] = nil
	}
	top["firmware"] = fw
	return top
}

func ts(t time.Time) string { return t.UTC().Format(TimeFormat) }

func orNull(s string) any {
	if s == "" {
		return nil
	}
	return s
}
