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
// every second of it (without sizeKnown, no total and no percentage).
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

// hourCost is what one simulated hour-long update cost.
type hourCost struct{ fsyncs, milestones, progress int }

// hourDownload runs one update with an hour-long download through the
// Reporter (its default limits: 2 s, 5 %) into the real queue on real
// files in dir, with a hub that accepts at once. The hour is simulated
// (fake clock); the queue, its files and its sender are real.
func hourDownload(tb testing.TB, dir string, sizeKnown bool) hourCost {
	hub := &onlineHub{}
	q, err := twin.OpenQueue(twin.QueueOptions{Dir: dir}, hub, nil)
	if err != nil {
		tb.Fatal(err)
	}
	defer q.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- q.Run(ctx) }()

	sink := &countingSink{q: q}
	clk := &fakeClock{now: time.Date(2026, 11, 26, 1, 0, 0, 0, time.UTC)}
	r := New(sink, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
	r.now, r.afterFunc = clk.Now, clk.AfterFunc
	if err := simulateHourDownload(r, clk, sizeKnown); err != nil {
		tb.Fatal(err)
	}
	fctx, fcancel := context.WithTimeout(ctx, time.Minute)
	err = q.Flush(fctx)
	fcancel()
	cancel()
	if rerr := <-done; err != nil || rerr != nil {
		tb.Fatalf("flush: %v; run: %v", err, rerr)
	}
	hub.mu.Lock()
	st := hub.doc["firmwareStatus"]
	hub.mu.Unlock()
	if st != "completed" {
		tb.Fatalf("hub shows firmwareStatus %v after the update, want completed", st)
	}
	return hourCost{fsyncs: int(q.Syncs()), milestones: sink.milestones, progress: sink.progress}
}

// TestHourDownloadFsyncs: what reporting an update costs the disk depends
// on its phase changes, not on how long its download takes: three fsyncs
// per milestone (write, rename, removal), none for progress.
func TestHourDownloadFsyncs(t *testing.T) {
	for _, sizeKnown := range []bool{true, false} {
		c := hourDownload(t, t.TempDir(), sizeKnown)
		if c.milestones != 6 || c.progress < 20 {
			t.Fatalf("size known %v: %d milestones, %d progress patches; want 6 and at least 20", sizeKnown, c.milestones, c.progress)
		}
		if c.fsyncs != 3*c.milestones {
			t.Errorf("size known %v: %d fsyncs for %d milestones and %d progress patches, want %d",
				sizeKnown, c.fsyncs, c.milestones, c.progress, 3*c.milestones)
		}
	}
}

// BenchmarkHourDownload is hourDownload as a benchmark: the fsyncs one
// update with an hour-long download costs, next to its phase changes
// (milestones, with the start-up report) and its progress patches. With
// the size known, progress moves in 5 % steps (20 patches); without, the
// interval alone limits it (one patch per 2 s).
func BenchmarkHourDownload(b *testing.B) {
	for _, tc := range []struct {
		name      string
		sizeKnown bool
	}{{"size-known", true}, {"size-unknown", false}} {
		b.Run(tc.name, func(b *testing.B) {
			base := b.TempDir()
			var sum hourCost
			ops := 0
			for b.Loop() {
				dir, err := os.MkdirTemp(base, "queue")
				if err != nil {
					b.Fatal(err)
				}
				c := hourDownload(b, dir, tc.sizeKnown)
				sum.fsyncs += c.fsyncs
				sum.milestones += c.milestones
				sum.progress += c.progress
				ops++
			}
			b.ReportMetric(float64(sum.fsyncs)/float64(ops), "fsyncs/op")
			b.ReportMetric(float64(sum.milestones)/float64(ops), "phases/op")
			b.ReportMetric(float64(sum.progress)/float64(ops), "progress/op")
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
