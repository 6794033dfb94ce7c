package simulated_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/simulated"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type recorder struct {
	mu  sync.Mutex
	all []firmware.Progress
	ch  chan firmware.Progress
}

func newRecorder() *recorder { return &recorder{ch: make(chan firmware.Progress, 1024)} }

func (r *recorder) observe(p firmware.Progress) {
	r.mu.Lock()
	r.all = append(r.all, p)
	r.mu.Unlock()
	if p.Phase.Terminal() {
		r.ch <- p
	}
}

func (r *recorder) phases() []firmware.Phase {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []firmware.Phase
	for _, p := range r.all {
		if len(out) == 0 || out[len(out)-1] != p.Phase {
			out = append(out, p.Phase)
		}
	}
	return out
}

func (r *recorder) progress() []firmware.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]firmware.Progress(nil), r.all...)
}

// run starts one update through a Manager with the simulated backend and
// returns the terminal progress.
func run(t *testing.T, cfg simulated.Config, req firmware.Request, log *zap.Logger) (firmware.Progress, *recorder, *firmware.Manager) {
	t.Helper()
	inst, err := simulated.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	m, err := firmware.NewManager(firmware.Config{
		StateDir: t.TempDir(), Installer: inst, Observer: rec.observe, Log: log,
		CurrentVersion: "0.0.1",
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	defer func() { cancel(); <-done }()
	if _, err := m.Start(req); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-rec.ch:
		return p, rec, m
	case <-time.After(2 * time.Minute):
		t.Fatalf("no terminal phase; phases %v", rec.phases())
	}
	return firmware.Progress{}, nil, nil
}

func fast(dir string) simulated.Config {
	return simulated.Config{
		WaitBeforeDownload: 20 * time.Millisecond, Download: 100 * time.Millisecond, Apply: 20 * time.Millisecond,
		SimulatedSize: 64 << 10, StateDir: dir, InitialVersion: "1.0.0",
	}
}

// TestTutorialTimings runs the tutorial's payload with the default 15 s
// stages in fake time and checks the stage order and durations.
func TestTutorialTimings(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := simulated.DefaultConfig()
		cfg.StateDir = t.TempDir()
		start := time.Now()
		var seen []time.Duration
		var phases []firmware.Phase
		inst, err := simulated.New(cfg, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		m, err := firmware.NewManager(firmware.Config{
			StateDir: t.TempDir(), Installer: inst,
			Observer: func(p firmware.Progress) {
				if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
					phases = append(phases, p.Phase)
					seen = append(seen, time.Since(start))
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); m.Run(ctx) }()
		if _, err := m.Start(firmware.Request{URI: "test.com", Version: "2.0.0"}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Second)
		synctest.Wait()
		cancel()
		<-done
		want := []firmware.Phase{"accepted", "downloading", "verifying", "applying", "completed"}
		if !slices.Equal(phases, want) {
			t.Fatalf("phases %v, want %v", phases, want)
		}
		// accepted at 0, downloading after the 15 s stand-by, applying after
		// the 15 s download, completed after the 15 s apply.
		wantAt := []time.Duration{0, 15 * time.Second, 30 * time.Second, 30 * time.Second, 45 * time.Second}
		if !slices.Equal(seen, wantAt) {
			t.Fatalf("phase times %v, want %v", seen, wantAt)
		}
		if st := m.Status(); st.CurrentVersion != "2.0.0" || st.Busy {
			t.Fatalf("status %+v", st)
		}
	})
}

func TestTimeOnlyDownloadAndVersion(t *testing.T) {
	dir := t.TempDir()
	log := zaptest.NewLogger(t)
	last, rec, m := run(t, fast(dir), firmware.Request{URI: "test.com", Version: "2.0.0"}, log)
	if last.Phase != firmware.PhaseCompleted || last.CurrentVersion != "2.0.0" {
		t.Fatalf("got %+v", last)
	}
	var mid bool
	for _, p := range rec.progress() {
		if p.Phase == firmware.PhaseDownloading && p.Bytes > 0 && p.Bytes < 64<<10 && p.Total == 64<<10 && p.Percent > 0 && p.Percent < 100 {
			mid = true
		}
	}
	if !mid {
		t.Error("no intermediate byte/percent progress in the time-only download")
	}
	if m.Status().CurrentVersion != "2.0.0" {
		t.Errorf("manager version %q", m.Status().CurrentVersion)
	}
	// The simulated version survives a restart.
	inst, err := simulated.New(fast(dir), log)
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := inst.CurrentVersion(context.Background()); v != "2.0.0" {
		t.Fatalf("version after restart %q", v)
	}
	// ReadVersion reads the same without creating anything.
	if v, err := simulated.ReadVersion(fast(dir)); v != "2.0.0" || err != nil {
		t.Fatalf("ReadVersion = %q, %v", v, err)
	}
	fresh := fast(filepath.Join(t.TempDir(), "never-ran"))
	if v, err := simulated.ReadVersion(fresh); v != fresh.InitialVersion || err != nil {
		t.Fatalf("ReadVersion before any run = %q, %v", v, err)
	}
	if _, err := os.Stat(fresh.StateDir); !os.IsNotExist(err) {
		t.Fatalf("ReadVersion created %s: %v", fresh.StateDir, err)
	}
}

func TestHTTPDownloadIsReal(t *testing.T) {
	img := []byte(strings.Repeat("firmware-image ", 100000))
	sum := sha256.Sum256(img)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "fw.img", time.Time{}, strings.NewReader(string(img)))
	}))
	defer srv.Close()
	log := zaptest.NewLogger(t)

	last, rec, _ := run(t, fast(t.TempDir()), firmware.Request{URI: srv.URL + "/fw.img", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(img))}, log)
	if last.Phase != firmware.PhaseCompleted {
		t.Fatalf("got %+v", last)
	}
	var total int64
	for _, p := range rec.progress() {
		if p.Phase == firmware.PhaseDownloading {
			total = max(total, p.Bytes)
		}
	}
	if total != int64(len(img)) {
		t.Errorf("reported %d bytes downloaded, image has %d", total, len(img))
	}

	// The bytes are hashed even though they are discarded.
	last, _, _ = run(t, fast(t.TempDir()), firmware.Request{URI: srv.URL + "/fw.img", SHA256: strings.Repeat("0", 64)}, log)
	if last.Phase != firmware.PhaseFailed || last.Err.Code != firmware.CodeVerify || !strings.Contains(last.Err.Message, "sha256 mismatch") {
		t.Fatalf("got %s %+v", last.Phase, last.Err)
	}
}

func TestFailureInjection(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("image"))
	}))
	defer srv.Close()
	tests := []struct {
		failAt, uri, code string
		phases            []firmware.Phase
	}{
		{simulated.StageStandBy, "test.com", firmware.CodePrepare, []firmware.Phase{"accepted", "failed"}},
		{simulated.StageDownloading, "test.com", firmware.CodeDownload, []firmware.Phase{"accepted", "downloading", "failed"}},
		{simulated.StageDownloading, srv.URL + "/fw.img", firmware.CodeDownload, []firmware.Phase{"accepted", "downloading", "failed"}},
		{simulated.StageApplying, "test.com", firmware.CodeApply, []firmware.Phase{"accepted", "downloading", "verifying", "applying", "failed"}},
	}
	for _, tc := range tests {
		t.Run(tc.failAt+" "+tc.uri, func(t *testing.T) {
			cfg := fast(t.TempDir())
			cfg.FailAt, cfg.FailMessage = tc.failAt, "flash worn out"
			last, rec, m := run(t, cfg, firmware.Request{URI: tc.uri, Version: "2.0.0"}, zaptest.NewLogger(t))
			if last.Phase != firmware.PhaseFailed || last.Err == nil || last.Err.Code != tc.code || !strings.Contains(last.Err.Message, "flash worn out") {
				t.Fatalf("got %s %+v", last.Phase, last.Err)
			}
			if got := rec.phases(); !slices.Equal(got, tc.phases) {
				t.Errorf("phases %v, want %v", got, tc.phases)
			}
			if m.Status().CurrentVersion != "1.0.0" {
				t.Errorf("version changed by a failed update: %q", m.Status().CurrentVersion)
			}
		})
	}
}

func TestConfigErrors(t *testing.T) {
	_, err := simulated.New(simulated.Config{FailAt: "exploding"}, nil)
	if err == nil || !strings.Contains(err.Error(), "failAt") {
		t.Fatalf("err %v, want one naming failAt", err)
	}
	if _, err := simulated.New(simulated.Config{Apply: -time.Second}, nil); err == nil {
		t.Fatal("negative duration accepted")
	}
}

func TestRebooter(t *testing.T) {
	r := simulated.NewRebooter(zaptest.NewLogger(t))
	if !r.LastReboot().IsZero() {
		t.Fatal("reboot before any")
	}
	before := time.Now()
	if err := r.Reboot(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r.LastReboot().Before(before.Add(-time.Second)) {
		t.Fatalf("last reboot %v", r.LastReboot())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.Reboot(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("reboot with a cancelled context: %v", err)
	}
}

// TestHTTPDownloadIsPaced checks that a real download of a declared size is
// spread over the Download stage, so an operator can watch its progress.
// The assertion is a lower bound that pacing guarantees.
func TestHTTPDownloadIsPaced(t *testing.T) {
	img := []byte(strings.Repeat("firmware-image ", 200000))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "fw.img", time.Time{}, strings.NewReader(string(img)))
	}))
	defer srv.Close()
	cfg := fast(t.TempDir())
	cfg.Download = 600 * time.Millisecond
	last, rec, _ := run(t, cfg, firmware.Request{URI: srv.URL + "/fw.img", Size: int64(len(img))}, zaptest.NewLogger(t))
	if last.Phase != firmware.PhaseCompleted {
		t.Fatalf("got %+v", last)
	}
	var first, done time.Time
	partial := 0
	for _, p := range rec.progress() {
		if p.Phase != firmware.PhaseDownloading {
			continue
		}
		if first.IsZero() {
			first = p.Time
		}
		if p.Bytes > 0 && p.Bytes < int64(len(img)) {
			partial++
		}
		if p.Bytes == int64(len(img)) && done.IsZero() {
			done = p.Time
		}
	}
	if got := done.Sub(first); done.IsZero() || got < cfg.Download*9/10 {
		t.Errorf("download took %v, want at least about %v", got, cfg.Download)
	}
	if partial < 3 {
		t.Errorf("only %d progress reports between 0 and the full size", partial)
	}
}
