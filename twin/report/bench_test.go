package report

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/twin"
)

// fakeClock is the Reporter's clock in BenchmarkHourDownload: time moves
// only in advance, which runs the timers that fall due on the way, in
// order, on the caller's goroutine.
type fakeClock struct {
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at   time.Time
	f    func()
	done bool // stopped or fired
}

func (t *fakeTimer) Stop() bool {
	was := !t.done
	t.done = true
	return was
}

func (c *fakeClock) Now() time.Time { return c.now }

func (c *fakeClock) AfterFunc(d time.Duration, f func()) stopper {
	t := &fakeTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

func (c *fakeClock) advance(d time.Duration) {
	end := c.now.Add(d)
	for {
		var next *fakeTimer
		for _, t := range c.timers {
			if !t.done && !t.at.After(end) && (next == nil || t.at.Before(next.at)) {
				next = t
			}
		}
		if next == nil {
			break
		}
		c.now, next.done = next.at, true
		next.f()
	}
	c.now = end
	live := c.timers[:0]
	for _, t := range c.timers {
		if !t.done {
			live = append(live, t)
		}
	}
	c.timers = live
}

// countingSink counts what the Reporter hands to the queue.
type countingSink struct {
	q                    *twin.Queue
	milestones, progress int
}

func (s *countingSink) Report(p map[string]any, milestone bool) error {
	if milestone {
		s.milestones++
	} else {
		s.progress++
	}
	return s.q.Report(p, milestone)
}

// onlineHub accepts every patch at once and keeps the reported document.
type onlineHub struct {
	mu  sync.Mutex
	doc map[string]any
}

func (h *onlineHub) PatchReported(_ context.Context, body []byte) (int64, error) {
	p, err := twin.Decode(body)
	if err != nil {
		return 0, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.doc = twin.Merge(h.doc, p)
	return 1, nil
}

// simulateHourDownload drives r as the state machine does through one
// update whose download takes an hour: 1 GiB, with byte progress observed
// every second of it (the size unknown: no percentage).
func simulateHourDownload(r *Reporter, clk *fakeClock, sizeKnown bool) error {
	const size = 1 << 30
	if err := r.Startup(firmware.Status{Progress: firmware.Progress{Phase: firmware.PhaseIdle, CurrentVersion: "1.0.0"}},
		clk.Now(), map[string]any{"agent": map[string]any{"version": "bench"}}); err != nil {
		return err
	}
	p := firmware.Progress{UpdateID: "u-bench", TargetVersion: "2.0.0", CurrentVersion: "1.0.0", Percent: -1}
	emit := func(phase firmware.Phase, bytes int64) {
		p.Phase, p.Bytes, p.Time = phase, bytes, clk.Now().UTC()
		if sizeKnown {
			p.Total, p.Percent = size, int(bytes*100/size)
		}
		if phase != firmware.PhaseAccepted && phase != firmware.PhaseDownloading {
			p.Percent = 100
		}
		r.Observe(p)
	}
	emit(firmware.PhaseAccepted, 0)
	clk.advance(time.Second)
	emit(firmware.PhaseDownloading, 0)
	const seconds = 3600
	for s := int64(1); s <= seconds; s++ {
		clk.advance(time.Second)
		emit(firmware.PhaseDownloading, size*s/seconds)
	}
	emit(firmware.PhaseVerifying, size)
	clk.advance(5 * time.Second)
	emit(firmware.PhaseApplying, size)
	clk.advance(30 * time.Second)
	emit(firmware.PhaseCompleted, size)
	r.Close()
	return nil
}

// BenchmarkHourDownload runs one update with an hour-long download
// through the Reporter (its default limits: 2 s, 5 %) into the real queue
// on real files, with a hub that accepts at once, and reports the fsyncs
// that cost next to the phase changes (milestones, with the start-up
// report) and the progress patches. The hour is simulated (fake clock);
// the queue, its files and its sender are real.
func BenchmarkHourDownload(b *testing.B) {
	for _, tc := range []struct {
		name      string
		sizeKnown bool
	}{{"size-known", true}, {"size-unknown", false}} {
		b.Run(tc.name, func(b *testing.B) {
			base := b.TempDir()
			var fsyncs, milestones, progress, ops int
			for b.Loop() {
				dir, err := os.MkdirTemp(base, "queue")
				if err != nil {
					b.Fatal(err)
				}
				hub := &onlineHub{}
				q, err := twin.OpenQueue(twin.QueueOptions{Dir: dir}, hub, nil)
				if err != nil {
					b.Fatal(err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- q.Run(ctx) }()

				sink := &countingSink{q: q}
				clk := &fakeClock{now: time.Date(2026, 11, 26, 1, 0, 0, 0, time.UTC)}
				r := New(sink, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
				r.now, r.afterFunc = clk.Now, clk.AfterFunc
				if err := simulateHourDownload(r, clk, tc.sizeKnown); err != nil {
					b.Fatal(err)
				}
				fctx, fcancel := context.WithTimeout(ctx, time.Minute)
				err = q.Flush(fctx)
				fcancel()
				cancel()
				if rerr := <-done; err != nil || rerr != nil {
					b.Fatalf("flush: %v; run: %v", err, rerr)
				}
				if st := hub.doc["firmwareStatus"]; st != "completed" {
					b.Fatalf("hub shows firmwareStatus %v after the update, want completed", st)
				}
				fsyncs += int(q.Syncs())
				milestones += sink.milestones
				progress += sink.progress
				ops++
				if err := q.Close(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(fsyncs)/float64(ops), "fsyncs/op")
			b.ReportMetric(float64(milestones)/float64(ops), "phases/op")
			b.ReportMetric(float64(progress)/float64(ops), "progress/op")
		})
	}
}

// discardSink takes patches and drops them.
type discardSink struct{ n int }

func (s *discardSink) Report(map[string]any, bool) error { s.n++; return nil }

// BenchmarkObserve is the cost of one Observe call during a download, as
// the state machine makes it for every written window: most calls are
// held back by the limits (the size is unknown, so the interval alone
// limits; the clock moves 10 ms per call, so one call in 200 is
// reported). x-baseline is the time per call over that of the least an
// observer does (take a lock, keep the latest progress), timed over as
// many calls in the same run.
func BenchmarkObserve(b *testing.B) {
	now := time.Date(2026, 11, 26, 1, 0, 0, 0, time.UTC)
	sink := &discardSink{}
	r := New(sink, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
	// The next call after the interval reports what the timer would have.
	r.now = func() time.Time { return now }
	r.afterFunc = func(time.Duration, func()) stopper { return &fakeTimer{} }
	p := firmware.Progress{UpdateID: "u-bench", Phase: firmware.PhaseDownloading, TargetVersion: "2.0.0",
		CurrentVersion: "1.0.0", Percent: -1}
	r.Observe(p)
	n := 0
	for b.Loop() {
		n++
		now = now.Add(10 * time.Millisecond)
		p.Bytes, p.Time = int64(n)<<20, now
		r.Observe(p)
	}
	elapsed := b.Elapsed()
	r.Close()

	var mu sync.Mutex
	var last firmware.Progress
	start := time.Now()
	for i := range n {
		p.Bytes, p.Time = int64(i)<<20, now
		mu.Lock()
		last = p
		mu.Unlock()
	}
	base := time.Since(start)
	_ = last
	b.ReportMetric(float64(elapsed)/float64(max(base, 1)), "x-baseline")
	b.ReportMetric(float64(sink.n)/float64(n), "patches/call")
}
