package main

import (
	"context"
	"encoding/json"
	"time"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// twinWriteStats is the JSON of --twin-write-stats: hub.TwinWriteStats
// with stable names, so a benchmark can read the rate the hub saw while
// it runs.
type twinWriteStats struct {
	Writes         int64   `json:"writes"`
	Throttled      int64   `json:"throttled"`
	PeakPerSecond  int64   `json:"peakPerSecond"`
	Limit          float64 `json:"limit"`
	ElapsedSeconds float64 `json:"elapsedSeconds"`
}

func writeTwinWriteStats(path string, s hub.TwinWriteStats) error {
	b, err := json.Marshal(twinWriteStats{Writes: s.Writes, Throttled: s.Throttled, PeakPerSecond: s.Peak,
		Limit: s.Limit, ElapsedSeconds: s.Elapsed.Seconds()})
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o644)
}

// keepTwinWriteStats rewrites path with the hub's twin-write counters
// every interval until ctx ends. Errors end it: the file is a figure for
// a benchmark, not something the hub needs.
func keepTwinWriteStats(ctx context.Context, h *hub.Hub, path string, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := writeTwinWriteStats(path, h.TwinWriteStats()); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
