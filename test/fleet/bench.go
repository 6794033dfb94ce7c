package fleet

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// SetDesiredVersion writes desired `firmware` = the fleet's image under
// updateID, announced as version (the image's signature carries no
// version, so any differing version makes the gateway run an update).
func (f *Fleet) SetDesiredVersion(ctx context.Context, id, updateID, version string) error {
	d := f.Desired(updateID)
	d["version"] = version
	patch := map[string]any{"properties": map[string]any{"desired": map[string]any{"firmware": d}}}
	_, err := f.Service.UpdateTwin(ctx, id, patch, "")
	return err
}

// Reconnect are the figures of one offline-reconnect measurement: each
// sample is the time from the agent's exec to what the hub stored.
type Reconnect struct {
	Connected []time.Duration // the device shows connected (both kinds of run)
	// Plain reconnect: a desired firmware naming the version that already
	// runs was written while it was offline; its ac 200 is stored. That is
	// connect, twin GET, the desired state read and acknowledged: the same
	// path without the update.
	Plain []time.Duration
	// A desired update to a new version was written while it was offline:
	// its ac 202 (update started) is stored.
	Started []time.Duration
}

// BenchReconnect measures, reps times each and interleaved, how long an
// offline gateway takes from its start to acknowledging (a) a desired
// firmware it already runs (the plain reconnect, the baseline) and (b) a
// desired update it starts. The hub is polled every 5 ms through the
// service API, the same way for both.
func BenchReconnect(ctx context.Context, f *Fleet, id string, reps int) (Reconnect, error) {
	var r Reconnect
	running := "1.0.0"
	for i := range reps {
		for _, withUpdate := range []bool{false, true} {
			if err := f.StopAgent(ctx, id); err != nil {
				return r, err
			}
			desiredID, version, want := fmt.Sprintf("noop-%d", i), running, 200
			if withUpdate {
				desiredID, version, want = fmt.Sprintf("update-%d", i), fmt.Sprintf("3.0.%d", i), 202
			}
			if err := f.SetDesiredVersion(ctx, id, desiredID, version); err != nil {
				return r, err
			}
			p, err := f.StartAgent(id)
			if err != nil {
				return r, err
			}
			var conn, acked time.Duration
			deadline := time.Now().Add(30 * time.Second)
			for conn == 0 || acked == 0 {
				if time.Now().After(deadline) {
					t, _ := f.Service.GetTwin(ctx, id)
					return r, fmt.Errorf("reconnect %d of %s: no acknowledgement of %s in 30s: %+v (log: %s)", i, id, desiredID, stateOf(t), p.LogTail())
				}
				t, err := f.Service.GetTwin(ctx, id)
				now := time.Since(p.Started)
				if err == nil {
					if conn == 0 && t.ConnectionState == "Connected" {
						conn = now
					}
					if s := stateOf(t); acked == 0 && s.AckID == desiredID && s.AC != 0 {
						if s.AC != want {
							return r, fmt.Errorf("reconnect %d: %s acknowledged %d, want %d", i, desiredID, s.AC, want)
						}
						acked = now
					}
				}
				if err := sleep(ctx, 5*time.Millisecond); err != nil {
					return r, err
				}
			}
			r.Connected = append(r.Connected, conn)
			if !withUpdate {
				r.Plain = append(r.Plain, acked)
				continue
			}
			r.Started = append(r.Started, acked)
			// Let the update end before the next stop.
			if _, err := f.WaitStates(ctx, "the update to end", func(m map[string]State) bool { return m[id].Ended(desiredID) }); err != nil {
				return r, err
			}
			running = version
		}
	}
	return r, nil
}

// Median of ds.
func Median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// Via says how a rollout is driven.
type Via string

const (
	// ViaGwctl drives it with gwctl rollout start --watch.
	ViaGwctl Via = "gwctl"
	// ViaDesired writes desired firmware wave by wave itself, paced at
	// the rate, advancing when 90% of a wave has ended.
	ViaDesired Via = "desired"
)

// RolloutRun describes one rollout to drive.
type RolloutRun struct {
	Name  string
	IDs   []string
	Waves []string // e.g. 1, 10%, 50%, 100%: cumulative
	Rate  float64  // twin writes per second at most; 0: gwctl's default (ViaDesired: 20)
	Via   Via
	// Version announced to the devices (default the image's): a second
	// rollout of the same image names another version.
	Version string
	// Logf, when set, is told the progress.
	Logf func(format string, args ...any)
}

// RolloutResult are the figures of a driven rollout.
type RolloutResult struct {
	FirstEnded, LastEnded time.Duration // from the start
	Completed, Failed     int
	// WriteRate is the highest rate of desired firmware writes in one wave,
	// from the hub's own $metadata timestamps (writes per second).
	WriteRate float64
	WaveSize  int // of that wave
	// Hub are the hub's own twin-write counters over the rollout.
	Hub HubWrites
}

// HubWrites are the service-side twin writes the hub counted over a span,
// from its counters sampled about every second.
type HubWrites struct {
	Writes, Throttled int64
	Mean, Peak        float64 // writes per second: over the span, and the highest between two samples
	Limit             float64 // the hub's --twin-write-rate
	Samples           int
}

// sampleWrites reads the hub's counters every second until stop is
// closed, then once more, and sums up the span.
func (f *Fleet) sampleWrites(stop <-chan struct{}, out chan<- HubWrites) {
	var all []TwinWrites
	read := func() {
		if w, err := f.TwinWrites(); err == nil && (len(all) == 0 || w.ElapsedSeconds > all[len(all)-1].ElapsedSeconds) {
			all = append(all, w)
		}
	}
	read()
	for running := true; running; {
		select {
		case <-stop:
			// The file is rewritten every second: wait for the last writes.
			time.Sleep(1100 * time.Millisecond)
			running = false
		case <-time.After(time.Second):
		}
		read()
	}
	var h HubWrites
	h.Samples = len(all)
	if len(all) < 2 {
		out <- h
		return
	}
	first, last := all[0], all[len(all)-1]
	h.Writes, h.Throttled, h.Limit = last.Writes-first.Writes, last.Throttled-first.Throttled, last.Limit
	h.Mean = float64(h.Writes) / (last.ElapsedSeconds - first.ElapsedSeconds)
	for i := 1; i < len(all); i++ {
		h.Peak = max(h.Peak, float64(all[i].Writes-all[i-1].Writes)/(all[i].ElapsedSeconds-all[i-1].ElapsedSeconds))
	}
	out <- h
}

// Drive runs the rollout and waits until every device has ended it.
func (f *Fleet) Drive(ctx context.Context, r RolloutRun) (RolloutResult, error) {
	logf := r.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	stopSampling, sampled := make(chan struct{}), make(chan HubWrites, 1)
	go f.sampleWrites(stopSampling, sampled)
	defer func() {
		if stopSampling != nil {
			close(stopSampling)
		}
	}()
	start := time.Now()
	var res RolloutResult
	done := make(chan error, 1)
	switch r.Via {
	case ViaGwctl:
		img := f.Image
		version := cmp.Or(r.Version, img.Version)
		args := []string{"rollout", "start", r.Name, "--uri", img.URI, "--version", version, "--sha256", img.SHA256,
			"--size", strconv.FormatInt(img.Size, 10), "--signature-uri", img.SignatureURI,
			"--devices", strings.Join(r.IDs, ","), "--waves", strings.Join(r.Waves, ","), "--watch"}
		if r.Rate > 0 {
			args = append(args, "--rate", strconv.FormatFloat(r.Rate, 'f', -1, 64))
		}
		go func() {
			out, errOut, code, err := f.Gwctl(ctx, args...)
			if err == nil && code != 0 {
				err = fmt.Errorf("gwctl rollout start: exit %d: %s%s", code, lastLines(out, 20), errOut)
			}
			done <- err
		}()
	case ViaDesired:
		go func() { done <- f.driveDesired(ctx, r, logf) }()
	default:
		return res, fmt.Errorf("fleet: unknown rollout driver %q", r.Via)
	}
	member := map[string]bool{}
	for _, id := range r.IDs {
		member[id] = true
	}
	var driveErr error
	driving := true
	for {
		states, err := f.States(ctx)
		if err == nil {
			ended := 0
			for id := range member {
				if s := states[id]; s.DesiredID != "" && strings.HasPrefix(s.DesiredID, r.Name) && s.Ended(s.DesiredID) {
					ended++
				}
			}
			if ended > 0 && res.FirstEnded == 0 {
				res.FirstEnded = time.Since(start)
			}
			if ended == len(member) {
				res.LastEnded = time.Since(start)
				for id := range member {
					if states[id].AC == 200 {
						res.Completed++
					} else {
						res.Failed++
					}
				}
				break
			}
		}
		if !driving && driveErr != nil {
			return res, driveErr
		}
		select {
		case driveErr = <-done:
			driving = false
			if driveErr == nil {
				logf("driver ended after %s", time.Since(start).Round(time.Millisecond))
			}
		case <-time.After(250 * time.Millisecond):
		case <-ctx.Done():
			return res, ctx.Err()
		}
	}
	if driving {
		// Every device has ended; gwctl --watch sees it at its next step.
		select {
		case driveErr = <-done:
		case <-ctx.Done():
			return res, ctx.Err()
		}
		if driveErr != nil {
			return res, driveErr
		}
	}
	close(stopSampling)
	stopSampling = nil
	res.Hub = <-sampled
	res.WriteRate, res.WaveSize = f.writeRate(ctx, r)
	return res, nil
}

// driveDesired writes the waves itself: each wave's new devices at rate,
// then waits until 90% of the devices assigned so far have ended.
func (f *Fleet) driveDesired(ctx context.Context, r RolloutRun, logf func(string, ...any)) error {
	every := time.Duration(float64(time.Second) / cmp.Or(r.Rate, 20))
	assigned := 0
	for wi, w := range r.Waves {
		n, err := waveEnd(w, len(r.IDs))
		if err != nil {
			return err
		}
		if n <= assigned {
			continue
		}
		tick := time.NewTicker(every)
		for _, id := range r.IDs[assigned:n] {
			if err := f.SetDesired(ctx, id, r.Name); err != nil {
				tick.Stop()
				return err
			}
			select {
			case <-tick.C:
			case <-ctx.Done():
				tick.Stop()
				return ctx.Err()
			}
		}
		tick.Stop()
		assigned = n
		logf("wave %d: %d devices assigned", wi+1, assigned)
		ids := r.IDs[:assigned]
		if _, err := f.WaitStates(ctx, "wave "+w, func(m map[string]State) bool {
			ended := 0
			for _, id := range ids {
				if m[id].Ended(r.Name) {
					ended++
				}
			}
			return ended*10 >= len(ids)*9
		}); err != nil {
			return err
		}
	}
	return nil
}

// waveEnd is the cumulative size of a wave: a count or a percentage of n.
func waveEnd(w string, n int) (int, error) {
	if p, ok := strings.CutSuffix(w, "%"); ok {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || v <= 0 || v > 100 {
			return 0, fmt.Errorf("fleet: bad wave %q", w)
		}
		return min(n, max(1, int(float64(n)*v/100+0.999999))), nil
	}
	v, err := strconv.Atoi(w)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("fleet: bad wave %q", w)
	}
	return min(n, v), nil
}

// writeRate is the rate of desired firmware writes within the largest
// wave, from desired.$metadata.firmware.$lastUpdated of the members.
func (f *Fleet) writeRate(ctx context.Context, r RolloutRun) (float64, int) {
	items, err := f.Service.Query(ctx, "SELECT * FROM devices")
	if err != nil {
		return 0, 0
	}
	member := map[string]bool{}
	for _, id := range r.IDs {
		member[id] = true
	}
	var ts []time.Time
	for _, raw := range items {
		var t iothub.Twin
		if json.Unmarshal(raw, &t) != nil || !member[t.DeviceID] {
			continue
		}
		md, _ := t.Properties.Desired["$metadata"].(map[string]any)
		fw, _ := md["firmware"].(map[string]any)
		if s, ok := fw["$lastUpdated"].(string); ok {
			if at, err := time.Parse(time.RFC3339Nano, s); err == nil {
				ts = append(ts, at)
			}
		}
	}
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	// The largest wave is the last one: from the end of the previous
	// wave's writes (the last gap longer than a second) to the end.
	from := 0
	for i := 1; i < len(ts); i++ {
		if ts[i].Sub(ts[i-1]) > time.Second {
			from = i
		}
	}
	wave := ts[from:]
	if len(wave) < 2 {
		return 0, len(wave)
	}
	return float64(len(wave)-1) / wave[len(wave)-1].Sub(wave[0]).Seconds(), len(wave)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n") + "\n"
}
