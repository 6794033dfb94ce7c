package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// adaptiveState is state() with firmware.adaptive as gwagent reports it.
func adaptiveState(status string, bytes, fetched, reused int64, fallback any) map[string]any {
	p := state(status, "u-1", "1.2.0", bytes, 8_000_000)
	if status == "completed" {
		p = state(status, "u-1", "1.3.0", bytes, 8_000_000)
	}
	p["firmware"].(map[string]any)["adaptive"] = map[string]any{"bytesFetched": fetched, "bytesReused": reused, "fallback": fallback}
	return p
}

// TestAdaptiveUpdateAgainstLocalHub: gwctl update --index-uri sends
// indexUri, and --watch prints what the adaptive install fetched and
// reused and, once, its fallback with the reason; against the real local
// hub with a real MQTT device.
func TestAdaptiveUpdateAgainstLocalHub(t *testing.T) {
	h, e := startHub(t)
	r := e.gwctl(t, "device", "add", "gw-01")
	if r.code != 0 {
		t.Fatalf("device add: %d %s", r.code, r.stderr)
	}
	const reason = "the server answered a Range request with 200 and the whole image"
	var updatePayload json.RawMessage
	d := connectDevice(t, h, strings.TrimSpace(r.stdout), func(d *testDevice, req json.RawMessage) {
		updatePayload = req
		for _, p := range []map[string]any{
			adaptiveState("downloading", 0, 0, 0, nil),
			adaptiveState("downloading", 6_000_000, 1_500_000, 4_500_000, nil),
			adaptiveState("downloading", 7_000_000, 2_500_000, 4_500_000, reason),
			adaptiveState("verifying", 8_000_000, 3_500_000, 4_500_000, reason),
			adaptiveState("completed", 8_000_000, 3_500_000, 4_500_000, reason),
		} {
			time.Sleep(300 * time.Millisecond) // each poll (100ms) sees each state
			d.report(p)
		}
	})
	d.report(state("completed", "u-0", "1.2.0", 0, 0))

	r = e.gwctl(t, "update", "gw-01", "--uri", "https://fw.example.com/gw-1.3.0.img", "--version", "1.3.0",
		"--index-uri", "https://fw.example.com/gw-1.3.0.img.bidx", "--watch", "--interval", "100ms", "--timeout", "1m")
	if r.code != 0 {
		t.Fatalf("update --watch: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	t.Logf("gwctl update --index-uri --watch:\n%s", r.stdout)
	d.wg.Wait()
	want := `{"fwPackageUri":"https://fw.example.com/gw-1.3.0.img","version":"1.3.0","indexUri":"https://fw.example.com/gw-1.3.0.img.bidx"}`
	if string(updatePayload) != want {
		t.Errorf("device got payload %s, want %s", updatePayload, want)
	}
	for _, w := range []string{
		"downloading 75% (6 MB of 8 MB); fetched 1.5 MB, reused 4.5 MB\n",
		" adaptive install falls back to a full download: " + reason + "\n",
		" verifying, adaptive: fetched 3.5 MB, reused 4.5 MB\n",
		" completed (running 1.3.0), adaptive: fetched 3.5 MB, reused 4.5 MB\n",
	} {
		if !strings.Contains(r.stdout, w) {
			t.Errorf("stdout lacks %q", w)
		}
	}
	if n := strings.Count(r.stdout, "falls back"); n != 1 {
		t.Errorf("the fallback is printed %d times, want once", n)
	}

	r = e.gwctl(t, "update", "gw-01", "--uri", "https://fw.example.com/gw.img", "--index-uri", "file:///tmp/gw.img.bidx")
	if r.code != exitUsage || !strings.Contains(r.stderr, "--index-uri must be an absolute http(s) URL") {
		t.Errorf("--index-uri file://: exit %d, stderr %s", r.code, r.stderr)
	}
}

// gwctl rollout start --index-uri puts indexUri into the desired firmware
// of the wave's devices.
func TestRolloutIndexURIAgainstLocalHub(t *testing.T) {
	_, e := startHub(t)
	if r := e.gwctl(t, "device", "add", "gw-01"); r.code != 0 {
		t.Fatalf("device add: %d %s", r.code, r.stderr)
	}
	r := e.gwctl(t, "rollout", "start", "r1", "--devices", "gw-01", "--waves", "100%", "--uri", "https://fw.example.com/gw-1.3.0.img",
		"--version", "1.3.0", "--index-uri", "https://fw.example.com/gw-1.3.0.img.bidx")
	if r.code != exitOK {
		t.Fatalf("rollout start: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "-o", "json", "twin", "show", "gw-01")
	var tw iothub.Twin
	if err := json.Unmarshal([]byte(r.stdout), &tw); err != nil {
		t.Fatalf("twin show: %v\n%s", err, r.stdout)
	}
	fw, _ := tw.Properties.Desired["firmware"].(map[string]any)
	if fw["indexUri"] != "https://fw.example.com/gw-1.3.0.img.bidx" || fw["fwPackageUri"] != "https://fw.example.com/gw-1.3.0.img" {
		t.Errorf("desired firmware %v: want the index URI", fw)
	}
	r = e.gwctl(t, "rollout", "start", "r2", "--devices", "gw-01", "--uri", "https://fw.example.com/gw.img", "--version", "1.4.0",
		"--index-uri", "gw.img.bidx")
	if r.code != exitUsage || !strings.Contains(r.stderr, "--index-uri must be an absolute http(s) URL") {
		t.Errorf("relative --index-uri: exit %d, stderr %s", r.code, r.stderr)
	}
}
