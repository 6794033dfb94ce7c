package service

import "time"

// FirmwarePhase is one phase of an update as its history entry on the twin
// (reported firmwareHistory, docs/twin.md) records it: the status it shows
// as (the phase's name; accepted shows as standBy) and when it began.
type FirmwarePhase struct {
	Status string    `json:"status"`
	At     time.Time `json:"at"`
}

// historyPhases reads the phases of update id from the reported
// firmwareHistory, in order; nil when the twin has no entry for it.
func historyPhases(reported map[string]any, id string) []FirmwarePhase {
	h, _ := reported["firmwareHistory"].(map[string]any)
	if h == nil || id == "" {
		return nil
	}
	for _, v := range h {
		e, _ := v.(map[string]any)
		if e == nil || str(e["updateId"]) != id {
			continue
		}
		start := timestamp(e["startedAt"])
		list, _ := e["phases"].([]any)
		out := make([]FirmwarePhase, 0, len(list))
		for _, p := range list {
			pm, _ := p.(map[string]any)
			name := str(pm["phase"])
			ms, ok := integer(pm["ms"])
			if name == "" || !ok || start.IsZero() {
				return nil // not a shape this client knows: no gaps filled
			}
			if name == "accepted" || name == "idle" {
				name = StatusStandBy
			}
			out = append(out, FirmwarePhase{Status: name, At: start.Add(time.Duration(ms) * time.Millisecond)})
		}
		return out
	}
	return nil
}

// missedPhases returns the phases of st that come after the phase last
// shown (last, zero before any) and before st's own status, which the
// caller shows itself. A poll that came after several phases at once gets
// them all, in order, with their times.
func missedPhases(st FirmwareState, last FirmwarePhase) []FirmwarePhase {
	ph := st.Phases
	if len(ph) == 0 || ph[len(ph)-1].Status != st.Status {
		return nil
	}
	start := 0
	if last.Status != "" {
		start = -1
		for j := len(ph) - 1; j >= 0; j-- {
			if ph[j] == last {
				start = j + 1
				break
			}
		}
		if start < 0 {
			// The last one shown is no longer listed (the history keeps the
			// latest phases only): go by time.
			start = len(ph) - 1
			for j, p := range ph {
				if p.At.After(last.At) {
					start = j
					break
				}
			}
		}
	}
	var out []FirmwarePhase
	for _, p := range ph[start : len(ph)-1] {
		if p.Status != last.Status {
			out = append(out, p)
			last = p
		}
	}
	return out
}

// inPhase is st as it was while in the earlier phase ph: the status and
// versions, without the progress, retry or error of the current state.
func (s FirmwareState) inPhase(ph FirmwarePhase) FirmwareState {
	return FirmwareState{Status: ph.Status, UpdateID: s.UpdateID, TargetVersion: s.TargetVersion,
		Percent: -1, UpdatedAt: ph.At, Phases: s.Phases}
}
