package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// TestTwinWriteStatsFile: with --twin-write-stats, gwhub keeps a file of
// its twin-write counters while it runs, and the figures are the writes
// and 429s a real client met.
func TestTwinWriteStatsFile(t *testing.T) {
	dir := t.TempDir()
	stats := filepath.Join(t.TempDir(), "twin-writes.json")
	hp := startGwhub(t, "--state-dir", dir, "--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--ws=false",
		"--twin-write-rate", "1", "--twin-write-stats", stats, "--log-level", "error")
	var addr string
	for _, l := range hp.banner {
		if m := regexp.MustCompile(`service REST API: .*\(listening on ([^)]+)\)`).FindStringSubmatch(l); m != nil {
			addr = m[1]
		}
	}
	if addr == "" {
		t.Fatalf("no REST address in the banner:\n%s", strings.Join(hp.banner, "\n"))
	}
	raw, err := os.ReadFile(filepath.Join(dir, "service-connection-string"))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := iothub.ParseConnectionString(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatal(err)
	}
	c, err := service.New(cs, service.Options{CAFile: filepath.Join(dir, "ca.pem"), BaseURL: "https://" + addr})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := c.CreateDevice(ctx, "gw-01"); err != nil {
		t.Fatal(err)
	}
	// Three writes back to back against 1/s: the client is answered 429
	// and retries after Retry-After, so all three are carried out.
	for i := range 3 {
		if _, err := c.UpdateTwin(ctx, "gw-01", map[string]any{"tags": map[string]any{"n": i}}, ""); err != nil {
			t.Fatal(err)
		}
	}
	read := func() twinWriteStats {
		t.Helper()
		b, err := os.ReadFile(stats)
		if err != nil {
			t.Fatal(err)
		}
		var s twinWriteStats
		if err := json.Unmarshal(b, &s); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		return s
	}
	deadline := time.Now().Add(10 * time.Second)
	s := read()
	for s.Writes < 3 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		s = read()
	}
	if s.Writes != 3 || s.Throttled < 1 || s.Limit != 1 || s.PeakPerSecond < 1 || s.PeakPerSecond > 2 || s.ElapsedSeconds <= 0 {
		t.Errorf("while running: %+v; want 3 writes, at least one 429, limit 1, a peak of 1 or 2 per second", s)
	}
	before := s.ElapsedSeconds
	hp.stop(t)
	if s := read(); s.Writes != 3 || s.ElapsedSeconds < before {
		t.Errorf("after the stop: %+v; want the final 3 writes", s)
	}
}
