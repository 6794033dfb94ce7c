package report

import (
	"strconv"

	"github.com/gwagent/gwagent/firmware"
)

// HistoryProperty is the top-level reported property holding the update
// history (docs/twin.md "firmwareHistory").
const HistoryProperty = "firmwareHistory"

// HistoryKey is the member of firmwareHistory that holds the update with
// sequence number seq: "h0" … "h4", the update's seq modulo
// firmware.HistoryLen. A new update takes the place of the oldest one, so
// a patch only ever writes one member and the property never holds more
// than HistoryLen.
func HistoryKey(seq int) string {
	return "h" + strconv.Itoa(seq%firmware.HistoryLen)
}

// HistoryPatch is the firmwareHistory value that writes entries. Each
// entry is written whole, with null for what it lacks: the member it
// replaces belonged to an older update, and a merge patch would otherwise
// keep that update's members.
func HistoryPatch(entries []firmware.HistoryEntry) map[string]any {
	out := make(map[string]any, len(entries))
	for _, e := range entries {
		out[HistoryKey(e.Seq)] = historyEntry(e)
	}
	return out
}

func historyEntry(e firmware.HistoryEntry) map[string]any {
	result := "running"
	if e.Result != "" {
		result = string(e.Result)
	}
	m := map[string]any{
		"seq":          e.Seq,
		"updateId":     e.UpdateID,
		"desiredId":    orNull(e.DesiredID),
		"version":      orNull(e.Version),
		"result":       result,
		"errorCode":    nil,
		"errorMessage": nil,
		"startedAt":    nil,
		"endedAt":      nil,
	}
	if e.Err != nil {
		m["errorCode"], m["errorMessage"] = e.Err.Code, e.Err.Message
	}
	if !e.StartedAt.IsZero() {
		m["startedAt"] = ts(e.StartedAt)
	}
	if !e.EndedAt.IsZero() {
		m["endedAt"] = ts(e.EndedAt)
	}
	// An array, not a map: it keeps the order (phases can be entered in
	// the same millisecond) and a phase entered twice; it is written whole
	// with the entry anyway. Times are milliseconds after startedAt: a
	// number counts 8 bytes against the twin's limits, a timestamp 24.
	phases := make([]any, 0, len(e.Phases))
	for _, p := range e.Phases {
		ms := int64(0)
		if !e.StartedAt.IsZero() {
			ms = max(p.At.Sub(e.StartedAt).Milliseconds(), 0)
		}
		phases = append(phases, map[string]any{"phase": string(p.Phase), "ms": ms})
	}
	m["phases"] = phases
	return m
}
