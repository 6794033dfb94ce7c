package main

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
)

// TestUpdateCancelAgainstLocalHub: gwctl update cancel sends
// cancelFirmwareUpdate through the local hub ({} or {"updateId":…}),
// prints the cancelled update, and turns the device's 404 and 409 into
// exit code 1 with the device's reason and phase.
func TestUpdateCancelAgainstLocalHub(t *testing.T) {
	h, e := startHub(t)
	r := e.gwctl(t, "device", "add", "gw-01")
	if r.code != 0 {
		t.Fatalf("device add: %d %s", r.code, r.stderr)
	}
	d := connectDevice(t, h, strings.TrimSpace(r.stdout), func(*testDevice, json.RawMessage) {})

	// The device answers as gwagent does: u-1 runs until it is cancelled.
	var mu sync.Mutex
	var payloads []string
	running := true
	d.answer("cancelFirmwareUpdate", func(p []byte) (int, string) {
		mu.Lock()
		defer mu.Unlock()
		payloads = append(payloads, string(p))
		var req struct {
			UpdateID string `json:"updateId"`
		}
		_ = json.Unmarshal(p, &req)
		switch {
		case req.UpdateID != "" && req.UpdateID != "u-1":
			return 404, `{"error":"` + req.UpdateID + ` is not the current update"}`
		case !running:
			return 409, `{"error":"the update has already ended","updateId":"u-1","phase":"failed"}`
		}
		running = false
		return 200, `{"updateId":"u-1","status":"cancelled"}`
	})

	for _, c := range []struct {
		args     []string
		code     int
		out, err string
	}{
		{[]string{"update", "cancel", "gw-01", "--update-id", "u-9"}, exitFailure, "", "device gw-01 has no such update to cancel (404): u-9 is not the current update"},
		{[]string{"update", "cancel", "gw-01"}, exitOK, "update u-1 on gw-01 cancelled\n", ""},
		{[]string{"update", "cancel", "gw-01", "--update-id", "u-1"}, exitFailure, "", "update u-1 on gw-01 cannot be cancelled (409, phase failed): the update has already ended"},
		{[]string{"update", "cancel", "gw-01", "-o", "json"}, exitFailure, "", "(409, phase failed)"},
		{[]string{"update", "cancel", "gw-02"}, exitFailure, "", "gw-02"},
		{[]string{"update", "cancel"}, exitUsage, "", "want 1 argument(s): ID"},
	} {
		r := e.gwctl(t, c.args...)
		if r.code != c.code || r.stdout != c.out && c.out != "" || !strings.Contains(r.stderr, c.err) {
			t.Errorf("gwctl %s: exit %d, stdout %q, stderr %q; want exit %d, stdout %q, stderr with %q",
				strings.Join(c.args, " "), r.code, r.stdout, r.stderr, c.code, c.out, c.err)
		}
	}
	mu.Lock()
	want := []string{`{"updateId":"u-9"}`, `{}`, `{"updateId":"u-1"}`, `{}`}
	if strings.Join(payloads, " ") != strings.Join(want, " ") {
		t.Errorf("device got payloads %q, want %q", payloads, want)
	}
	running = true // a second update runs
	mu.Unlock()
	r = e.gwctl(t, "update", "cancel", "gw-01", "-o", "json")
	var out struct {
		DeviceID, UpdateID string
		Status             int
		Payload            cancelAnswer
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || r.code != exitOK ||
		out.DeviceID != "gw-01" || out.UpdateID != "u-1" || out.Status != 200 || out.Payload.Status != "cancelled" {
		t.Errorf("-o json: exit %d, stdout %q (%v), stderr %q", r.code, r.stdout, err, r.stderr)
	}

	// A device without the method (an older agent) is named as such.
	d.answer("cancelFirmwareUpdate", func([]byte) (int, string) {
		return 404, `{"error":"unknown method cancelFirmwareUpdate"}`
	})
	if r := e.gwctl(t, "update", "cancel", "gw-01"); r.code != exitFailure || !strings.Contains(r.stderr, "does not implement cancelFirmwareUpdate") {
		t.Errorf("older device: exit %d, stderr %q", r.code, r.stderr)
	}
}
