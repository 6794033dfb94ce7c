package firmware

import (
	"slices"
	"time"
	"unicode/utf8"
)

// History bounds. The twin shows the whole history as one property, which
// IoT Hub limits to 4 KB: HistoryLen updates, each with at most
// HistoryMaxPhases phase times, an error message of at most
// HistoryMaxMessage characters and version and desired id of at most
// HistoryMaxID (see docs/twin.md for the worst-case size).
const (
	HistoryLen        = 5
	HistoryMaxPhases  = 10
	HistoryMaxMessage = 80
	HistoryMaxID      = 64
)

// PhaseTime is when an update entered a phase.
type PhaseTime struct {
	Phase Phase     `json:"phase"`
	At    time.Time `json:"at"`
}

// HistoryEntry is one update in the device's history: the running one
// (Result empty) or one that ended.
type HistoryEntry struct {
	// Seq counts the updates of this device (1, 2, …); it survives restarts
	// with the record and names the entry's place on the twin.
	Seq      int    `json:"seq"`
	UpdateID string `json:"updateId"`
	// DesiredID is the id of the desired firmware property that started
	// the update, empty for a direct method.
	DesiredID string `json:"desiredId,omitempty"`
	Version   string `json:"version,omitempty"`
	// Result is the terminal phase (completed, failed, rolledBack); empty
	// while the update runs.
	Result    Phase        `json:"result,omitempty"`
	Err       *UpdateError `json:"error,omitempty"` // message truncated
	StartedAt time.Time    `json:"startedAt,omitzero"`
	EndedAt   time.Time    `json:"endedAt,omitzero"`
	// Phases are the phases entered, in order, whatever they are (a phase
	// added to the state machine is recorded like the others). At most
	// HistoryMaxPhases: the first ones are dropped beyond that.
	Phases []PhaseTime `json:"phases,omitempty"`
}

// noteHistory brings r.History up to date with r's update and phase at
// time at. It never changes a slice it received (copy on write): Progress
// values handed to the Observer share them.
func (r *record) noteHistory(at time.Time) {
	if r.UpdateID == "" {
		return
	}
	h := r.History
	var e HistoryEntry
	if n := len(h); n > 0 && h[n-1].UpdateID == r.UpdateID {
		e = h[n-1]
		h = h[:n-1]
	} else {
		seq := 1
		if n > 0 {
			seq = h[n-1].Seq + 1
		}
		e = HistoryEntry{Seq: seq, UpdateID: r.UpdateID, Version: r.Request.Version, DesiredID: r.Request.DesiredID, StartedAt: r.StartedAt}
		if e.StartedAt.IsZero() {
			e.StartedAt = at
		}
		if len(h) >= HistoryLen {
			h = h[len(h)-HistoryLen+1:]
		}
	}
	if n := len(e.Phases); n == 0 || e.Phases[n-1].Phase != r.Phase {
		e.Phases = append(slices.Clip(e.Phases), PhaseTime{Phase: r.Phase, At: at})
	}
	if r.Phase.Terminal() && !r.RollbackPending && e.Result == "" {
		e.Result, e.EndedAt = r.Phase, at
		if r.Err != nil && r.Phase != PhaseCompleted {
			e.Err = r.Err
		}
	}
	r.History = append(slices.Clip(h), e.Bounded())
}

// Bounded returns e within the history's bounds: version and desired id cut
// to HistoryMaxID characters, the error message to HistoryMaxMessage, and
// only the last HistoryMaxPhases phases. It shares no slice it changed
// with e.
func (e HistoryEntry) Bounded() HistoryEntry {
	e.Version = truncate(e.Version, HistoryMaxID)
	e.DesiredID = truncate(e.DesiredID, HistoryMaxID)
	if e.Err != nil && utf8.RuneCountInString(e.Err.Message) > HistoryMaxMessage {
		e.Err = &UpdateError{Code: e.Err.Code, Message: truncate(e.Err.Message, HistoryMaxMessage)}
	}
	if len(e.Phases) > HistoryMaxPhases {
		e.Phases = slices.Clip(e.Phases[len(e.Phases)-HistoryMaxPhases:])
	}
	return e
}

// truncate cuts s to at most n characters, marking the cut with "…".
func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n-1]) + "…"
}
