package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestUpdateWatchFillsPhaseGap: the device's twin goes from downloading
// straight to completed (its queued reports arrived as one patch), and
// gwctl update --watch still prints every phase in between, in order,
// each with the time the device's history gives it.
func TestUpdateWatchFillsPhaseGap(t *testing.T) {
	h, e := startHub(t)
	r := e.gwctl(t, "device", "add", "gw-01")
	if r.code != 0 {
		t.Fatalf("device add: %d %s", r.code, r.stderr)
	}
	start := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	phases := []string{"accepted", "downloading", "verifying", "waitingForWindow", "applying", "rebooting", "committing", "completed"}
	entry := func(n int) map[string]any {
		var list []any
		for i, p := range phases[:n] {
			list = append(list, map[string]any{"phase": p, "ms": i * 7000})
		}
		result := "running"
		if n == len(phases) {
			result = "completed"
		}
		return map[string]any{"firmwareHistory": map[string]any{"h1": map[string]any{
			"seq": 1, "updateId": "u-1", "version": "1.3.0", "result": result,
			"startedAt": start.Format(time.RFC3339Nano), "phases": list}}}
	}
	with := func(p, extra map[string]any) map[string]any {
		for k, v := range extra {
			p[k] = v
		}
		return p
	}
	sawDownloading := make(chan struct{})
	connectDevice(t, h, strings.TrimSpace(r.stdout), func(d *testDevice, _ json.RawMessage) {
		d.report(with(state("standBy", "u-1", "1.2.0", 0, 0), entry(1)))
		d.report(with(state("downloading", "u-1", "1.2.0", 0, 4_000_000), entry(2)))
		// Stay in downloading for many polls, then jump to completed in one
		// patch: the twin never shows the phases in between.
		select {
		case <-sawDownloading:
		case <-time.After(10 * time.Second):
		}
		time.Sleep(300 * time.Millisecond)
		d.report(with(state("completed", "u-1", "1.3.0", 4_000_000, 4_000_000), entry(len(phases))))
	})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		// The watch polls every 100ms; once the twin says downloading,
		// let the device finish.
		for range 200 {
			r := e.gwctl(t, "-o", "json", "twin", "show", "gw-01")
			if strings.Contains(r.stdout, `"firmwareStatus": "downloading"`) {
				close(sawDownloading)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	r = e.gwctl(t, "update", "gw-01", "--uri", "https://example.com/fw-1.3.0.img", "--version", "1.3.0", "--watch", "--interval", "100ms", "--timeout", "1m")
	if r.code != 0 {
		t.Fatalf("update --watch: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	<-polled
	t.Logf("gwctl update --watch:\n%s", r.stdout)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	var got []string
	for _, l := range lines[1:] {
		if strings.Contains(l, "%") || strings.Contains(l, " of ") {
			continue // download progress lines
		}
		got = append(got, l)
	}
	want := []string{"standBy", "downloading version 1.3.0", "verifying", "waitingForWindow", "applying", "rebooting", "committing", "completed (running 1.3.0)"}
	if len(got) != len(want) {
		t.Fatalf("printed %d transitions, want %d:\n%s", len(got), len(want), r.stdout)
	}
	for i, w := range want {
		if got[i][9:] != w {
			t.Errorf("line %d is %q, want %q", i, got[i][9:], w)
		}
		// The phases the polls missed carry the device's times.
		if i >= 2 && i < len(want)-1 {
			if at := start.Add(time.Duration(i*7) * time.Second).Format("15:04:05"); got[i][:8] != at {
				t.Errorf("%s printed at %s, want the device's %s", w, got[i][:8], at)
			}
		}
	}

	// A fleet query finds the device by the outcome in its history.
	for q, want := range map[string]bool{
		"SELECT * FROM devices WHERE properties.reported.firmwareHistory.h1.result = 'completed'": true,
		"SELECT * FROM devices WHERE properties.reported.firmwareHistory.h1.result = 'failed'":    false,
	} {
		r := e.gwctl(t, "query", q)
		if r.code != 0 || strings.Contains(r.stdout, `"deviceId": "gw-01"`) != want {
			t.Errorf("%s: exit %d, found %v, want %v\n%s%s", q, r.code, !want, want, r.stdout, r.stderr)
		}
	}
}
