package firmware_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
)

// windowInstaller fetches an image from memory (so an update runs inside a
// synctest bubble), keeps it, and counts fetches and applies with the time
// of each Apply.
type windowInstaller struct {
	img []byte

	mu      sync.Mutex
	fetches int
	applied []time.Time
	stored  []byte
}

type memSink struct{ w *windowInstaller }

func (s memSink) Write(p []byte) (int, error) {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	s.w.stored = append(s.w.stored, p...)
	return len(p), nil
}
func (s memSink) Sync() error  { return nil }
func (s memSink) Close() error { return nil }

func (w *windowInstaller) Open(ctx context.Context, u firmware.Update, off int64) (firmware.Sink, error) {
	w.mu.Lock()
	w.stored = w.stored[:min(int64(len(w.stored)), off)]
	w.mu.Unlock()
	return memSink{w}, nil
}
func (w *windowInstaller) Apply(ctx context.Context, u firmware.Update) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.applied = append(w.applied, time.Now())
	return nil
}
func (w *windowInstaller) Fetches(uri string) bool { return strings.HasPrefix(uri, "mem:") }
func (w *windowInstaller) Fetch(ctx context.Context, u firmware.Update, dst firmware.FetchWriter) error {
	w.mu.Lock()
	w.fetches++
	w.mu.Unlock()
	dst.SetTotal(int64(len(w.img)))
	_, err := dst.Write(w.img)
	return err
}

func (w *windowInstaller) counts() (fetches, applies int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.fetches, len(w.applied)
}

// windowManager runs a Manager in the bubble until the test ends (or stop).
type windowManager struct {
	*firmware.Manager
	rec  *recorder
	stop func()
}

func runWindowManager(t *testing.T, dir string, inst firmware.Installer, def *firmware.Window) *windowManager {
	t.Helper()
	rec := newRecorder()
	m, err := firmware.NewManager(firmware.Config{StateDir: dir, Installer: inst, Observer: rec.observe, Log: zap.NewNop(), Window: def})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return &windowManager{Manager: m, rec: rec, stop: stop}
}

func (w *windowManager) last(t *testing.T) firmware.Progress {
	t.Helper()
	l := w.rec.list()
	if len(l) == 0 {
		t.Fatal("no progress reported")
	}
	return l[len(l)-1]
}

// synctest starts the clock at 2000-01-01 00:00 UTC.
var bubbleStart = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func TestWindowClosedWaitsThenAppliesWhenItOpens(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inst := &windowInstaller{img: randomImage(t, 100<<10)}
		m := runWindowManager(t, t.TempDir(), inst, nil)
		win := &firmware.Window{Start: "02:00", Duration: "1h", TimeZone: "Europe/Berlin"}
		if _, err := m.Start(firmware.Request{URI: "mem:fw", SHA256: sha(inst.img), Window: win}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		p := m.last(t)
		if p.Phase != firmware.PhaseWaitingForWindow {
			t.Fatalf("phase %s (%+v), want waitingForWindow", p.Phase, p.Err)
		}
		// 02:00 in Berlin in winter is 01:00 UTC.
		opens := bubbleStart.Add(time.Hour)
		if p.Window == nil || !p.Window.OpensAt.Equal(opens) || p.Window.Start != "02:00" || p.Window.TimeZone != "Europe/Berlin" {
			t.Fatalf("window %+v, want opening at %s", p.Window, opens)
		}
		if f, a := inst.counts(); f != 1 || a != 0 {
			t.Fatalf("%d fetches and %d applies before the window, want 1 and 0", f, a)
		}
		time.Sleep(time.Until(opens) - time.Second)
		synctest.Wait()
		if _, a := inst.counts(); a != 0 {
			t.Fatalf("applied a second before the window opened")
		}
		if got := m.Status().Phase; got != firmware.PhaseWaitingForWindow {
			t.Fatalf("phase %s a second before the window, want waitingForWindow", got)
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if got := m.Status().Phase; got != firmware.PhaseCompleted {
			t.Fatalf("phase %s after the window opened, want completed", got)
		}
		inst.mu.Lock()
		at := inst.applied
		inst.mu.Unlock()
		if len(at) != 1 || at[0].Before(opens) || !at[0].Before(opens.Add(time.Hour)) {
			t.Fatalf("applied at %v, want once inside [%s, +1h)", at, opens)
		}
		want := []firmware.Phase{firmware.PhaseAccepted, firmware.PhaseDownloading, firmware.PhaseVerifying,
			firmware.PhaseWaitingForWindow, firmware.PhaseApplying, firmware.PhaseCompleted}
		if got := m.rec.phases(); !slices.Equal(got, want) {
			t.Fatalf("phases %v, want %v", got, want)
		}
	})
}

func TestWindowOpenAppliesAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inst := &windowInstaller{img: randomImage(t, 10<<10)}
		m := runWindowManager(t, t.TempDir(), inst, nil)
		// 23:00 for 2h crosses midnight: open at 00:00.
		win := &firmware.Window{Start: "23:00", Duration: "2h"}
		if _, err := m.Start(firmware.Request{URI: "mem:fw", Window: win}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if got := m.Status().Phase; got != firmware.PhaseCompleted {
			t.Fatalf("phase %s, want completed at once", got)
		}
		if slices.Contains(m.rec.phases(), firmware.PhaseWaitingForWindow) {
			t.Fatalf("phases %v: waited inside an open window", m.rec.phases())
		}
		if p := m.last(t); p.Window == nil || p.Window.TimeZone != "UTC" || !p.Window.OpensAt.IsZero() {
			t.Fatalf("window %+v, want the request's (UTC, no opening once applied)", p.Window)
		}
	})
}

func TestWindowRestartWhileWaitingResumesWithoutDownloading(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		inst := &windowInstaller{img: randomImage(t, 50<<10)}
		m := runWindowManager(t, dir, inst, nil)
		win := &firmware.Window{Start: "03:30", Duration: "30m", TimeZone: "UTC"}
		id, err := m.Start(firmware.Request{URI: "mem:fw", SHA256: sha(inst.img), Window: win})
		if err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if got := m.Status().Phase; got != firmware.PhaseWaitingForWindow {
			t.Fatalf("phase %s, want waitingForWindow", got)
		}
		m.stop()
		time.Sleep(time.Hour) // the agent is down for an hour

		m2 := runWindowManager(t, dir, inst, nil)
		synctest.Wait()
		st := m2.Status()
		if st.UpdateID != id || st.Phase != firmware.PhaseWaitingForWindow || !st.Busy {
			t.Fatalf("after restart: %s %s busy=%v, want %s waitingForWindow", st.UpdateID, st.Phase, st.Busy, id)
		}
		time.Sleep(3 * time.Hour)
		synctest.Wait()
		if got := m2.Status().Phase; got != firmware.PhaseCompleted {
			t.Fatalf("phase %s after the window opened, want completed", got)
		}
		if f, a := inst.counts(); f != 1 || a != 1 {
			t.Fatalf("%d fetches and %d applies, want 1 and 1 (no new download after the restart)", f, a)
		}
	})
}

// TestWindowManyRestartsWhileWaiting: restarts while an update waits for
// its window do not count toward MaxTransitions, so a gateway restarted
// more often than that during a long wait still applies the update.
func TestWindowManyRestartsWhileWaiting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		inst := &windowInstaller{img: randomImage(t, 10<<10)}
		m := runWindowManager(t, dir, inst, nil)
		win := &firmware.Window{Start: "03:30", Duration: "30m", TimeZone: "UTC"}
		id, err := m.Start(firmware.Request{URI: "mem:fw", SHA256: sha(inst.img), Window: win})
		if err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		restarts := 40 // more than MaxTransitions (32)
		for range restarts {
			m.stop()
			m = runWindowManager(t, dir, inst, nil)
			synctest.Wait()
			if st := m.Status(); st.UpdateID != id || st.Phase != firmware.PhaseWaitingForWindow {
				t.Fatalf("after a restart: %s %s %+v, want %s still waiting", st.UpdateID, st.Phase, st.Err, id)
			}
		}
		time.Sleep(4 * time.Hour)
		synctest.Wait()
		if st := m.Status(); st.Phase != firmware.PhaseCompleted {
			t.Fatalf("phase %s %+v after the window opened, want completed", st.Phase, st.Err)
		}
	})
}

func TestWindowCancelWhileWaiting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inst := &windowInstaller{img: randomImage(t, 10<<10)}
		m := runWindowManager(t, t.TempDir(), inst, nil)
		win := &firmware.Window{Start: "02:00", Duration: "1h"}
		id, err := m.Start(firmware.Request{URI: "mem:fw", Window: win})
		if err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if !firmware.PhaseWaitingForWindow.Cancellable() {
			t.Fatal("waitingForWindow is not cancellable")
		}
		got, err := m.Cancel(t.Context(), "")
		if err != nil || got != id {
			t.Fatalf("Cancel = %q, %v; want %q", got, err, id)
		}
		time.Sleep(3 * time.Hour)
		synctest.Wait()
		st := m.Status()
		if st.Busy || st.Phase != firmware.PhaseFailed || st.Err == nil || st.Err.Code != firmware.CodeCancelled {
			t.Fatalf("after cancel: %s busy=%v err=%+v, want failed/cancelled", st.Phase, st.Busy, st.Err)
		}
		if _, a := inst.counts(); a != 0 {
			t.Fatalf("a cancelled update was applied")
		}
	})
}

func TestWindowConfigDefaultAndRequestOverride(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inst := &windowInstaller{img: randomImage(t, 10<<10)}
		def := &firmware.Window{Start: "4:00", Duration: "60m"}
		m := runWindowManager(t, t.TempDir(), inst, def)
		if _, err := m.Start(firmware.Request{URI: "mem:fw"}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		p := m.last(t)
		if p.Phase != firmware.PhaseWaitingForWindow || p.Window == nil ||
			p.Window.Start != "04:00" || p.Window.Duration != "1h0m0s" || !p.Window.OpensAt.Equal(bubbleStart.Add(4*time.Hour)) {
			t.Fatalf("with the device window: %s %+v, want waiting for 04:00 UTC", p.Phase, p.Window)
		}
		if _, err := m.Cancel(t.Context(), ""); err != nil {
			t.Fatal(err)
		}
		// The request's window wins: open now.
		if _, err := m.Start(firmware.Request{URI: "mem:fw", Window: &firmware.Window{Start: "00:00", Duration: "24h"}}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if p := m.last(t); p.Phase != firmware.PhaseCompleted || p.Window == nil || p.Window.Duration != "24h0m0s" {
			t.Fatalf("with the request's window: %s %+v, want completed under the request's window", p.Phase, p.Window)
		}
	})
}

func TestWindowNext(t *testing.T) {
	utc := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, c := range []struct {
		name   string
		w      firmware.Window
		now    string
		opens  string
		inside bool
	}{
		{"before today's", firmware.Window{Start: "02:00", Duration: "2h", TimeZone: "UTC"}, "2026-06-01T01:59:59Z", "2026-06-01T02:00:00Z", false},
		{"at the opening", firmware.Window{Start: "02:00", Duration: "2h", TimeZone: "UTC"}, "2026-06-01T02:00:00Z", "2026-06-01T02:00:00Z", true},
		{"at the close", firmware.Window{Start: "02:00", Duration: "2h", TimeZone: "UTC"}, "2026-06-01T04:00:00Z", "2026-06-02T02:00:00Z", false},
		{"across midnight, before it", firmware.Window{Start: "23:00", Duration: "3h", TimeZone: "UTC"}, "2026-06-01T22:00:00Z", "2026-06-01T23:00:00Z", false},
		{"across midnight, after midnight", firmware.Window{Start: "23:00", Duration: "3h", TimeZone: "UTC"}, "2026-06-02T01:30:00Z", "2026-06-01T23:00:00Z", true},
		{"across midnight, closed", firmware.Window{Start: "23:00", Duration: "3h", TimeZone: "UTC"}, "2026-06-02T02:00:00Z", "2026-06-02T23:00:00Z", false},
		{"zone, summer", firmware.Window{Start: "02:00", Duration: "2h", TimeZone: "Europe/Berlin"}, "2026-06-01T12:00:00Z", "2026-06-02T00:00:00Z", false},
		{"zone, winter", firmware.Window{Start: "02:00", Duration: "2h", TimeZone: "Europe/Berlin"}, "2026-01-10T12:00:00Z", "2026-01-11T01:00:00Z", false},
		// Berlin springs forward on 2026-03-29 at 02:00 CET: 01:00 that
		// day is still CET (00:00 UTC), the next day's is CEST.
		{"DST spring, day of", firmware.Window{Start: "01:00", Duration: "3h", TimeZone: "Europe/Berlin"}, "2026-03-28T23:30:00Z", "2026-03-29T00:00:00Z", false},
		{"DST spring, inside, 3h elapsed", firmware.Window{Start: "01:00", Duration: "3h", TimeZone: "Europe/Berlin"}, "2026-03-29T02:59:00Z", "2026-03-29T00:00:00Z", true},
		{"DST spring, next day", firmware.Window{Start: "01:00", Duration: "3h", TimeZone: "Europe/Berlin"}, "2026-03-29T03:00:00Z", "2026-03-29T23:00:00Z", false},
		// A start that does not exist on the spring day (02:30 is skipped)
		// opens that day, an hour later by the clock: 03:30 CEST.
		{"DST spring, missing start", firmware.Window{Start: "02:30", Duration: "1h", TimeZone: "Europe/Berlin"}, "2026-03-28T22:00:00Z", "2026-03-29T01:30:00Z", false},
		// Falling back on 2026-10-25 at 03:00 CEST: 04:00 is CET (03:00 UTC).
		{"DST autumn", firmware.Window{Start: "04:00", Duration: "1h", TimeZone: "Europe/Berlin"}, "2026-10-24T12:00:00Z", "2026-10-25T03:00:00Z", false},
		{"24h is always open", firmware.Window{Start: "05:00", Duration: "24h", TimeZone: "UTC"}, "2026-06-01T04:59:00Z", "2026-05-31T05:00:00Z", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			w, err := firmware.ParseWindow("window", c.w)
			if err != nil {
				t.Fatal(err)
			}
			opens, inside := w.Next(utc(c.now))
			if !opens.Equal(utc(c.opens)) || inside != c.inside {
				t.Fatalf("Next(%s) = %s, %v; want %s, %v", c.now, opens.Format(time.RFC3339), inside, c.opens, c.inside)
			}
		})
	}
}

func TestWindowInvalid(t *testing.T) {
	for _, c := range []struct {
		payload string
		member  string
	}{
		{`{"fwPackageUri":"mem:fw","window":{"start":"25:00","duration":"1h"}}`, "window.start"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"2am","duration":"1h"}}`, "window.start"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"02:00","duration":"0s"}}`, "window.duration"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"02:00","duration":"-1h"}}`, "window.duration"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"02:00","duration":"25h"}}`, "window.duration"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"02:00","duration":"soon"}}`, "window.duration"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"02:00","duration":"1h","timeZone":"Mars/Olympus"}}`, "window.timeZone"},
		{`{"fwPackageUri":"mem:fw","window":{"start":"02:00","duration":"1h","timeZone":"Local"}}`, "window.timeZone"},
		{`{"fwPackageUri":"mem:fw","window":{"duration":"1h"}}`, "window.start"},
		{`{"fwPackageUri":"mem:fw","window":"02:00"}`, "window"},
	} {
		_, err := firmware.ParseRequest([]byte(c.payload))
		if !errors.Is(err, firmware.ErrInvalidRequest) || !strings.Contains(err.Error(), c.member) {
			t.Errorf("ParseRequest(%s) = %v, want an invalid request naming %s", c.payload, err, c.member)
		}
	}
	dir := t.TempDir()
	inst := &windowInstaller{}
	_, err := firmware.NewManager(firmware.Config{StateDir: dir, Installer: inst, Window: &firmware.Window{Start: "02:00", Duration: "48h"}})
	if err == nil || !strings.Contains(err.Error(), "update.window.duration") {
		t.Fatalf("NewManager with a 48h window: %v, want an error naming update.window.duration", err)
	}
	m, err := firmware.NewManager(firmware.Config{StateDir: dir, Installer: inst})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Start(firmware.Request{URI: "mem:fw", Window: &firmware.Window{Start: "02:00", Duration: "1h", TimeZone: "Nowhere/Special"}})
	if !errors.Is(err, firmware.ErrInvalidRequest) {
		t.Fatalf("Start with an unknown zone: %v, want ErrInvalidRequest", err)
	}
	if st := m.Status(); st.Busy || st.UpdateID != "" {
		t.Fatalf("a refused request started an update: %+v", st)
	}
}
