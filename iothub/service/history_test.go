package service

import (
	"slices"
	"testing"
	"time"
)

func TestMissedPhases(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	p := func(s string, sec int) FirmwarePhase {
		return FirmwarePhase{Status: s, At: t0.Add(time.Duration(sec) * time.Second)}
	}
	all := []FirmwarePhase{p("standBy", 0), p("downloading", 1), p("verifying", 2), p("applying", 2), p("completed", 3)}
	for _, c := range []struct {
		name   string
		status string
		phases []FirmwarePhase
		last   FirmwarePhase
		want   []FirmwarePhase
	}{
		{"first poll sees the end", "completed", all, FirmwarePhase{}, all[:4]},
		{"gap after downloading", "completed", all, all[1], all[2:4]},
		{"no gap", "verifying", all[:3], all[1], nil},
		{"oldest phases dropped from the history", "completed", all[2:], all[1], all[2:4]},
		{"status not the history's last phase", "downloading", all, all[1], nil},
		{"no history", "completed", nil, FirmwarePhase{}, nil},
	} {
		got := missedPhases(FirmwareState{Status: c.status, Phases: c.phases}, c.last)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

func TestParseHistoryPhases(t *testing.T) {
	rep := map[string]any{
		"firmwareStatus": "downloading",
		"firmware":       map[string]any{"updateId": "u-2"},
		"firmwareHistory": map[string]any{
			"h1": map[string]any{"updateId": "u-1", "startedAt": "2026-01-01T00:00:00.000Z", "phases": []any{map[string]any{"phase": "accepted", "ms": 0.0}}},
			"h2": map[string]any{"updateId": "u-2", "startedAt": "2026-01-01T01:00:00.000Z", "phases": []any{
				map[string]any{"phase": "accepted", "ms": 0.0}, map[string]any{"phase": "downloading", "ms": 1500.0}}},
		},
	}
	got := ParseFirmwareState(rep).Phases
	t1 := time.Date(2026, 1, 1, 1, 0, 0, 0, time.UTC)
	want := []FirmwarePhase{{"standBy", t1}, {"downloading", t1.Add(1500 * time.Millisecond)}}
	if !slices.EqualFunc(got, want, func(a, b FirmwarePhase) bool { return a.Status == b.Status && a.At.Equal(b.At) }) {
		t.Errorf("phases %v, want %v", got, want)
	}
}
