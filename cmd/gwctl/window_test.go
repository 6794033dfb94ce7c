package main

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// gwctl update --window-* sends the window in the request, and --watch
// prints the waiting state with the window and its next opening in local
// time and UTC.
func TestUpdateWindowWatch(t *testing.T) {
	e := newEnv(t)
	waiting := fw(service.StatusWaitingForWindow, "u-2", 0, 0, "2026-11-26T12:00:03Z")
	waiting["firmware"].(map[string]any)["window"] = map[string]any{"start": "02:00", "duration": "2h0m0s", "timeZone": "Europe/Berlin", "opensAt": "2026-11-27T01:00:00.000Z"}
	applying := fw(service.StatusApplying, "u-2", 0, 0, "2026-11-27T01:00:00Z")
	done := fw(service.StatusCompleted, "u-2", 0, 0, "2026-11-27T01:00:05Z")
	scriptUpdate(e.srv, waiting, applying, done)
	var mu sync.Mutex
	var payload json.RawMessage
	e.srv.HandleMethods(func(id string, req iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError) {
		mu.Lock()
		payload = req.Payload
		mu.Unlock()
		e.srv.ScriptReported(id, waiting, applying, done)
		return iothub.MethodResult{Status: 200, Payload: json.RawMessage(`{"updateId":"u-2","status":"accepted"}`)}, nil
	})
	r := e.gwctl(t, "update", "gw-01", "--uri", "https://example.com/fw.img", "--window-start", "02:00", "--window-duration", "2h",
		"--window-tz", "Europe/Berlin", "--watch", "--interval", "100ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	mu.Lock()
	var req struct {
		Window map[string]string `json:"window"`
	}
	err := json.Unmarshal(payload, &req)
	mu.Unlock()
	if err != nil || req.Window["start"] != "02:00" || req.Window["duration"] != "2h" || req.Window["timeZone"] != "Europe/Berlin" {
		t.Fatalf("request payload %s: want the window", payload)
	}
	want := "waitingForWindow: window 02:00 for 2h0m0s (Europe/Berlin), opens 2026-11-27 01:00 UTC (2026-11-27 01:00 UTC)"
	if !strings.Contains(r.stdout, want) {
		t.Fatalf("stdout\n%s\nlacks %q", r.stdout, want)
	}

	bad := e.gwctl(t, "update", "gw-01", "--uri", "https://example.com/fw.img", "--window-start", "02:00")
	if bad.code != 64 || !strings.Contains(bad.stderr, "--window-start and --window-duration go together") {
		t.Fatalf("--window-start alone: exit %d, stderr %s", bad.code, bad.stderr)
	}
}

func TestWindowTextLocalAndUTC(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	p := newWatchPrinter(&out, berlin, false, false)
	st := service.FirmwareState{Status: service.StatusWaitingForWindow, Window: &service.FirmwareWindow{Start: "02:00", Duration: "2h0m0s",
		TimeZone: "Europe/Berlin", OpensAt: time.Date(2026, 11, 27, 1, 0, 0, 0, time.UTC)}}
	p.event(service.WatchEvent{Kind: service.EventTransition, Time: time.Date(2026, 11, 26, 12, 0, 3, 0, time.UTC), State: st})
	want := "13:00:03 waitingForWindow: window 02:00 for 2h0m0s (Europe/Berlin), opens 2026-11-27 02:00 CET (2026-11-27 01:00 UTC)\n"
	if out.String() != want {
		t.Fatalf("printed %q, want %q", out.String(), want)
	}
}
