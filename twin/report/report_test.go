package report

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/twin"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type sent struct {
	patch     map[string]any
	milestone bool
	at        time.Time
}

type memSink struct {
	mu   sync.Mutex
	list []sent
}

func (s *memSink) Report(p map[string]any, milestone bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Round-trip through JSON like the queue does, so tests see the wire.
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	doc, err := twin.Decode(b)
	if err != nil {
		return err
	}
	if err := twin.ValidatePatch(doc); err != nil {
		return err
	}
	s.list = append(s.list, sent{doc, milestone, time.Now()})
	return nil
}

func (s *memSink) all() []sent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sent(nil), s.list...)
}

func fw(t *testing.T, p map[string]any) map[string]any {
	t.Helper()
	m, ok := p["firmware"].(map[string]any)
	if !ok {
		t.Fatalf("no firmware object in %v", p)
	}
	return m
}

var t0 = time.Date(2026, 11, 26, 1, 2, 3, 456_000_000, time.UTC)

func TestPatch(t *testing.T) {
	base := firmware.Progress{UpdateID: "u1", TargetVersion: "1.2.0", CurrentVersion: "1.1.0", Percent: -1, Time: t0}
	with := func(f func(*firmware.Progress)) firmware.Progress {
		p := base
		f(&p)
		return p
	}
	stamp := "2026-11-26T01:02:03.456Z"
	tests := []struct {
		name string
		p    firmware.Progress
		top  map[string]any // expected top-level values ("<absent>" = must be absent)
		fw   map[string]any // expected firmware fields
	}{
		{"idle", with(func(p *firmware.Progress) { p.Phase = firmware.PhaseIdle; p.UpdateID = "" }),
			map[string]any{"firmwareStatus": "standBy", "logTime": stamp, "lastFirmwareUpdate": "<absent>"},
			map[string]any{"status": "standBy", "updateId": nil, "targetVersion": nil, "currentVersion": "1.1.0", "bytes": nil, "error": nil, "updatedAt": stamp}},
		{"accepted", with(func(p *firmware.Progress) { p.Phase = firmware.PhaseAccepted }),
			map[string]any{"firmwareStatus": "standBy", "logTime": stamp, "downloadComplete": nil, "startedApplyingImage": nil},
			map[string]any{"status": "standBy", "updateId": "u1", "targetVersion": "1.2.0", "percent": nil}},
		{"downloading", with(func(p *firmware.Progress) {
			p.Phase, p.Bytes, p.Total, p.Percent = firmware.PhaseDownloading, 420, 1000, 42
		}),
			map[string]any{"firmwareStatus": "downloading", "downloadComplete": nil, "startedApplyingImage": nil},
			map[string]any{"status": "downloading", "bytes": json.Number("420"), "totalBytes": json.Number("1000"), "percent": json.Number("42")}},
		{"downloading unknown size", with(func(p *firmware.Progress) { p.Phase, p.Bytes = firmware.PhaseDownloading, 7 }),
			map[string]any{"firmwareStatus": "downloading"},
			map[string]any{"bytes": json.Number("7"), "totalBytes": nil, "percent": nil}},
		{"applying", with(func(p *firmware.Progress) { p.Phase, p.Slot, p.Percent = firmware.PhaseApplying, "B", 100 }),
			map[string]any{"firmwareStatus": "applying", "startedApplyingImage": stamp},
			map[string]any{"slot": "B", "bytes": nil, "percent": nil}},
		{"rebooting", with(func(p *firmware.Progress) { p.Phase = firmware.PhaseRebooting }),
			map[string]any{"firmwareStatus": "rebooting"}, map[string]any{"status": "rebooting"}},
		{"completed", with(func(p *firmware.Progress) { p.Phase = firmware.PhaseCompleted; p.CurrentVersion = "1.2.0" }),
			map[string]any{"firmwareStatus": "completed", "lastFirmwareUpdate": stamp},
			map[string]any{"currentVersion": "1.2.0", "error": nil}},
		{"failed", with(func(p *firmware.Progress) {
			p.Phase, p.Err = firmware.PhaseFailed, &firmware.UpdateError{Code: firmware.CodeDownload, Message: "404"}
		}),
			map[string]any{"firmwareStatus": "failed", "lastFirmwareUpdate": "<absent>"},
			map[string]any{"error": map[string]any{"code": "downloadFailed", "message": "404"}}},
		{"rolled back without detail", with(func(p *firmware.Progress) { p.Phase = firmware.PhaseRolledBack }),
			map[string]any{"firmwareStatus": "rolledBack"},
			map[string]any{"error": map[string]any{"code": "internal", "message": "update rolledBack"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := &memSink{}
			if err := s.Report(Patch(tc.p), false); err != nil {
				t.Fatal(err)
			}
			got := s.all()[0].patch
			for k, want := range tc.top {
				v, ok := got[k]
				if want == "<absent>" {
					if ok {
						t.Errorf("%s present: %v", k, v)
					}
					continue
				}
				if !ok || fmt.Sprint(v) != fmt.Sprint(want) {
					t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
				}
			}
			f := fw(t, got)
			for k, want := range tc.fw {
				if v, ok := f[k]; !ok || fmt.Sprint(v) != fmt.Sprint(want) {
					t.Errorf("firmware.%s = %v (present %v), want %v", k, v, ok, want)
				}
			}
			// Every detail field is always present (set or null), so a
			// merge patch never leaves a stale value behind.
			for _, k := range []string{"status", "updateId", "targetVersion", "currentVersion", "bytes", "totalBytes", "percent", "slot", "error", "updatedAt"} {
				if _, ok := f[k]; !ok {
					t.Errorf("firmware.%s missing", k)
				}
			}
		})
	}
}

// A whole update: phase changes go out at once as milestones; download
// progress at most every MinInterval and only after MinPercentStep; the
// last held-back progress is flushed by the timer; downloadComplete is
// stamped once.
func TestReporterRateLimits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &memSink{}
		r := New(s, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
		start := time.Now()
		p := firmware.Progress{UpdateID: "u1", TargetVersion: "1.2.0", Percent: -1, Total: 1000}
		emit := func(phase firmware.Phase, pct int) {
			p.Phase, p.Percent, p.Bytes, p.Time = phase, pct, int64(pct*10), time.Now()
			r.Observe(p)
		}
		emit(firmware.PhaseAccepted, -1)
		emit(firmware.PhaseDownloading, 0)
		// 1% every 100 ms: 10%/s.
		for pct := 1; pct <= 100; pct++ {
			time.Sleep(100 * time.Millisecond)
			emit(firmware.PhaseDownloading, pct)
		}
		emit(firmware.PhaseVerifying, 100)
		emit(firmware.PhaseApplying, 100)
		emit(firmware.PhaseCompleted, 100)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		r.Close()

		got := s.all()
		var phases []string
		var lastProgress time.Time
		lastPct := -100
		stamps := 0
		for i, e := range got {
			f := fw(t, e.patch)
			if _, ok := e.patch["downloadComplete"]; ok && e.patch["downloadComplete"] != nil {
				stamps++
				if f["status"] != "verifying" {
					t.Errorf("downloadComplete stamped with %v", f["status"])
				}
			}
			if e.milestone {
				phases = append(phases, f["status"].(string))
				continue
			}
			if f["status"] != "downloading" {
				t.Errorf("non-milestone patch %d for %v", i, f["status"])
			}
			pct, _ := f["percent"].(json.Number).Int64()
			if int(pct)-lastPct < 5 {
				t.Errorf("progress %d%% after %d%%: step below 5", pct, lastPct)
			}
			if !lastProgress.IsZero() && e.at.Sub(lastProgress) < 2*time.Second {
				t.Errorf("progress patches %v apart", e.at.Sub(lastProgress))
			}
			lastProgress, lastPct = e.at, int(pct)
		}
		want := []string{"standBy", "downloading", "verifying", "applying", "completed"}
		if fmt.Sprint(phases) != fmt.Sprint(want) {
			t.Fatalf("milestones %v, want %v", phases, want)
		}
		if stamps != 1 {
			t.Fatalf("downloadComplete stamped %d times", stamps)
		}
		// 10 s of download at one patch per 2 s: about 4-5 progress patches.
		if n := len(got) - len(want); n < 3 || n > 6 {
			t.Fatalf("%d progress patches over %v", n, time.Since(start))
		}
		if last := got[len(got)-1]; !last.milestone || fw(t, last.patch)["status"] != "completed" {
			t.Fatalf("last patch %v", last.patch)
		}
	})
}

// Progress held back by the interval is reported by the timer even when
// nothing else happens.
func TestReporterTrailingProgress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &memSink{}
		r := New(s, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
		p := firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseDownloading, Total: 100, Time: time.Now()}
		r.Observe(p)
		time.Sleep(100 * time.Millisecond)
		p.Percent, p.Bytes = 30, 30
		r.Observe(p)
		if n := len(s.all()); n != 1 {
			t.Fatalf("%d patches before the interval", n)
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		got := s.all()
		if len(got) != 2 || got[1].milestone || fmt.Sprint(fw(t, got[1].patch)["percent"]) != "30" {
			t.Fatalf("patches %v", got)
		}
		// Small steps are not worth a patch.
		p.Percent, p.Bytes = 32, 32
		r.Observe(p)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if n := len(s.all()); n != 2 {
			t.Fatalf("a 2%% step was reported")
		}
		// Close flushes held-back progress.
		p.Percent, p.Bytes = 40, 40
		r.Observe(p)
		p.Percent, p.Bytes = 50, 50
		r.Observe(p)
		r.Close()
		got = s.all()
		if n := len(got); n != 4 || fmt.Sprint(fw(t, got[3].patch)["percent"]) != "50" {
			t.Fatalf("after close: %v", got)
		}
		r.Observe(firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseFailed})
		if n := len(s.all()); n != 4 {
			t.Fatal("Observe after Close reported")
		}
	})
}

// A timer that fired while Observe held the lock, and that Observe then
// stopped (progress was due and reported) before starting a new one, must
// not report: the next progress would go out sooner than MinInterval.
func TestReporterStaleTimer(t *testing.T) {
	clk := &fakeClock{now: t0}
	s := &memSink{}
	r := New(s, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
	r.now, r.afterFunc = clk.Now, clk.AfterFunc
	p := firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseDownloading, Percent: -1}
	observe := func(after time.Duration, bytes int64) {
		clk.now = t0.Add(after)
		p.Bytes, p.Time = bytes, clk.now
		r.Observe(p)
	}
	observe(0, 0)                     // the phase change: reported
	observe(500*time.Millisecond, 10) // held; timer 1 due at 2 s
	if len(clk.timers) != 1 {
		t.Fatalf("%d timers, want 1", len(clk.timers))
	}
	stale := clk.timers[0].f
	observe(2*time.Second, 20)         // due: reported by Observe, timer 1 stopped
	observe(2100*time.Millisecond, 30) // held; timer 2 due at 4 s
	stale()                            // timer 1 had fired and waited for the lock
	if n := len(s.all()); n != 2 {
		t.Fatalf("%d patches after the stale timer ran, want 2 (it must not report 100 ms after the last)", n)
	}
	clk.advance(2 * time.Second) // timer 2
	got := s.all()
	if len(got) != 3 || fmt.Sprint(fw(t, got[2].patch)["bytes"]) != "30" {
		t.Fatalf("patches %v, want the held progress reported by timer 2", got)
	}
	r.Close()
}

func TestStartup(t *testing.T) {
	now := t0
	t.Run("no update yet", func(t *testing.T) {
		s := &memSink{}
		r := New(s, Options{})
		st := firmware.Status{Progress: firmware.Progress{Phase: firmware.PhaseIdle, CurrentVersion: "1.2.0"}}
		if err := r.Startup(st, now, map[string]any{"agent": map[string]any{"version": "v1"}}); err != nil {
			t.Fatal(err)
		}
		got := s.all()[0]
		f := fw(t, got.patch)
		if !got.milestone || got.patch["firmwareStatus"] != "standBy" || got.patch["logTime"] == nil ||
			f["currentVersion"] != "1.2.0" || f["updateId"] != nil || got.patch["agent"] == nil {
			t.Fatalf("startup patch %v", got.patch)
		}
	})
	// After an update has ended, a start restates its result as it was:
	// never standBy, never new stamps.
	for _, tc := range []struct {
		phase firmware.Phase
		err   *firmware.UpdateError
	}{
		{firmware.PhaseCompleted, nil},
		{firmware.PhaseFailed, &firmware.UpdateError{Code: firmware.CodeDownload, Message: "HTTP 404"}},
		{firmware.PhaseRolledBack, &firmware.UpdateError{Code: firmware.CodeHealth, Message: "unit app.service failed"}},
	} {
		t.Run("after "+string(tc.phase), func(t *testing.T) {
			s := &memSink{}
			r := New(s, Options{})
			st := firmware.Status{Progress: firmware.Progress{Phase: tc.phase, UpdateID: "u0", TargetVersion: "2.0.0",
				CurrentVersion: "1.2.0", Slot: "B", Percent: 100, Err: tc.err, Time: now}}
			if err := r.Startup(st, now, map[string]any{"agent": map[string]any{"version": "v1"}}); err != nil {
				t.Fatal(err)
			}
			got := s.all()[0]
			f := fw(t, got.patch)
			if !got.milestone || got.patch["firmwareStatus"] != string(tc.phase) || f["status"] != string(tc.phase) ||
				f["updateId"] != "u0" || f["targetVersion"] != "2.0.0" || f["currentVersion"] != "1.2.0" || f["slot"] != "B" ||
				got.patch["agent"] == nil {
				t.Fatalf("startup patch %v", got.patch)
			}
			wantErr := any(nil)
			if tc.err != nil {
				wantErr = map[string]any{"code": tc.err.Code, "message": tc.err.Message}
			}
			if fmt.Sprint(f["error"]) != fmt.Sprint(wantErr) {
				t.Errorf("firmware.error %v, want %v", f["error"], wantErr)
			}
			for _, k := range []string{"logTime", "downloadComplete", "startedApplyingImage", "lastFirmwareUpdate"} {
				if _, ok := got.patch[k]; ok {
					t.Errorf("%s = %v in the start-up patch: the last update's stamps must stay", k, got.patch[k])
				}
			}
			if _, ok := f["updatedAt"]; ok {
				t.Errorf("firmware.updatedAt = %v in the start-up patch", f["updatedAt"])
			}
			// The next update replaces the result as usual.
			r.Observe(firmware.Progress{Phase: firmware.PhaseAccepted, UpdateID: "u1", TargetVersion: "3.0.0", Percent: -1, Time: now})
			if all := s.all(); len(all) != 2 || fw(t, all[1].patch)["updateId"] != "u1" || fw(t, all[1].patch)["error"] != nil {
				t.Fatalf("patches after a new update %v", all)
			}
		})
	}
	t.Run("resuming", func(t *testing.T) {
		s := &memSink{}
		r := New(s, Options{})
		st := firmware.Status{Busy: true, Progress: firmware.Progress{Phase: firmware.PhaseCommitting, UpdateID: "u1", TargetVersion: "2", Time: now}}
		if err := r.Startup(st, now, nil); err != nil {
			t.Fatal(err)
		}
		r.Observe(firmware.Progress{Phase: firmware.PhaseCompleted, UpdateID: "u1", TargetVersion: "2", Time: now})
		got := s.all()
		if len(got) != 2 || fw(t, got[0].patch)["status"] != "committing" || fw(t, got[1].patch)["status"] != "completed" {
			t.Fatalf("patches %v", got)
		}
		for _, e := range got {
			if v, ok := e.patch["downloadComplete"]; ok && v != nil {
				t.Fatalf("downloadComplete restamped after a restart: %v", e.patch)
			}
		}
	})
}

// A retry is reported as firmware.retry, throttled like progress (a burst
// of failed attempts is one patch per MinInterval, the latest), and set to
// null once a byte arrives, also when that happens while a retry is held
// back; the failed phase carries no retry.
func TestReporterRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &memSink{}
		r := New(s, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
		p := firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseDownloading, Total: 100, Bytes: 10, Percent: 10, Time: time.Now()}
		r.Observe(p)
		for i := 1; i <= 3; i++ {
			time.Sleep(100 * time.Millisecond)
			p.Time = time.Now()
			p.Retry = &firmware.Retry{Attempt: i, LastError: fmt.Sprintf("download from https://fw.example.com/a.img: HTTP 503 (%d)", i),
				NextAttemptAt: time.Now().Add(time.Second)}
			r.Observe(p)
		}
		if n := len(s.all()); n != 1 {
			t.Fatalf("%d patches before the interval, want 1", n)
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		got := s.all()
		if len(got) != 2 || got[1].milestone {
			t.Fatalf("patches %v", got)
		}
		rt, ok := fw(t, got[1].patch)["retry"].(map[string]any)
		if !ok || fmt.Sprint(rt["attempt"]) != "3" || rt["lastError"] != p.Retry.LastError ||
			rt["nextAttemptAt"] != p.Retry.NextAttemptAt.UTC().Format(TimeFormat) {
			t.Fatalf("retry %v, want the third attempt", fw(t, got[1].patch)["retry"])
		}

		// Another retry, held back, then a byte: null goes out, not the
		// stale retry.
		time.Sleep(500 * time.Millisecond)
		p.Retry = &firmware.Retry{Attempt: 4, LastError: "x", NextAttemptAt: time.Now()}
		r.Observe(p)
		p.Retry, p.Bytes = nil, 11
		r.Observe(p)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		got = s.all()
		if len(got) != 3 {
			t.Fatalf("%d patches, want 3: %v", len(got), got)
		}
		if v, ok := fw(t, got[2].patch)["retry"]; !ok || v != nil {
			t.Fatalf("retry %v after a byte arrived, want null", v)
		}
		r.Observe(firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseFailed, Err: &firmware.UpdateError{Code: firmware.CodeDownload, Message: "m"}})
		got = s.all()
		if v, ok := fw(t, got[len(got)-1].patch)["retry"]; !ok || v != nil {
			t.Fatalf("failed patch has retry %v, want null", v)
		}
		r.Close()
	})
}
