package firmware_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

// TestRebootLoopEnds: a device that never boots the new slot asks for reboot
// after reboot; the transition cap ends the update (rolled back) instead of
// rebooting forever.
func TestRebootLoopEnds(t *testing.T) {
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 100<<10))
	ab := &fileAB{dir: t.TempDir(), rebootNoop: true}
	reboots := make(chan struct{}, 1)
	ab.onReboot = func() { reboots <- struct{}{} }
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), abInstaller{ab}, rec)
	cfg.MaxTransitions = 16
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: url}); err != nil {
		t.Fatal(err)
	}
	restarts := 0
	for {
		select {
		case <-reboots:
			restarts++
			if restarts > 50 {
				t.Fatal("still rebooting after 50 restarts")
			}
			m.stop(t)
			m = startManager(t, cfg)
			continue
		case <-rec.wake:
		case <-time.After(30 * time.Second):
			t.Fatalf("stuck; phases %v", rec.phases())
		}
		if st := m.Status(); st.Phase.Terminal() {
			if st.Phase != firmware.PhaseRolledBack || st.Err == nil || st.Err.Code != firmware.CodeUpdateLoop {
				t.Fatalf("ended %s %+v, want rolledBack/updateLoop", st.Phase, st.Err)
			}
			t.Logf("ended after %d reboots: %s", restarts, st.Err.Message)
			if restarts < 2 {
				t.Errorf("only %d reboots before giving up", restarts)
			}
			if e := ab.env(); e.Trial != "" || e.Committed != "A" {
				t.Errorf("env %+v", e)
			}
			return
		}
	}
}

// TestCrashLoopInApplyEnds: an agent that dies in the same phase over and
// over (here: Apply never returns before the restart) ends the update.
func TestCrashLoopInApplyEnds(t *testing.T) {
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 100<<10))
	ab := &fileAB{dir: t.TempDir()}
	block := &blockingApply{abInstaller{ab}, make(chan struct{}, 1)}
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), block, rec)
	cfg.MaxTransitions = 10
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: url}); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		if i > 30 {
			t.Fatal("no end after 30 restarts")
		}
		select {
		case <-block.entered:
			// "crash" inside Apply
			m.stop(t)
			m = startManager(t, cfg)
			continue
		case <-rec.wake:
		case <-time.After(30 * time.Second):
			t.Fatalf("stuck; phases %v", rec.phases())
		}
		if st := m.Status(); st.Phase.Terminal() {
			if st.Err == nil || st.Err.Code != firmware.CodeUpdateLoop {
				t.Fatalf("ended %s %+v, want updateLoop", st.Phase, st.Err)
			}
			return
		}
	}
}

type blockingApply struct {
	abInstaller
	entered chan struct{}
}

func (b *blockingApply) Apply(ctx context.Context, u firmware.Update) error {
	b.entered <- struct{}{}
	<-ctx.Done()
	return ctx.Err()
}

func TestStateFiles(t *testing.T) {
	tests := []struct {
		name    string
		content string
		aside   bool
	}{
		{"empty", "", false},
		{"torn", `{"format":1,"updateId":"x","pha`, false},
		{"future format", `{"format":99,"updateId":"x","phase":"downloading"}`, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "update.json"), []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			m, err := firmware.NewManager(testConfig(t, dir, plainFile{&fileAB{dir: t.TempDir()}}, newRecorder()))
			if err != nil {
				t.Fatal(err)
			}
			st := m.Status()
			if st.Busy || st.Phase != firmware.PhaseIdle || st.CurrentVersion != "1.0.0" || st.Percent != -1 {
				t.Fatalf("status %+v", st)
			}
			_, err = os.Stat(filepath.Join(dir, "update.json.unknown"))
			if (err == nil) != tc.aside {
				t.Fatalf("set aside: %v, want %v", err == nil, tc.aside)
			}
		})
	}
}

// TestPersistBeforeAct: when the backend acts, the record on disk already
// names the phase it acts in.
func TestPersistBeforeAct(t *testing.T) {
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 10<<10))
	state := t.TempDir()
	inst := &peeking{plainFile: plainFile{&fileAB{dir: t.TempDir()}}, record: filepath.Join(state, "update.json")}
	rec := newRecorder()
	m := startManager(t, testConfig(t, state, inst, rec))
	if _, err := m.Start(firmware.Request{URI: url}); err != nil {
		t.Fatal(err)
	}
	if p := rec.waitTerminal(t, 30*time.Second); p.Phase != firmware.PhaseCompleted {
		t.Fatalf("got %s %+v", p.Phase, p.Err)
	}
	for when, rec := range map[string]string{"Open": inst.atOpen, "Apply": inst.atApply} {
		var r struct {
			Phase string `json:"phase"`
		}
		if err := json.Unmarshal([]byte(rec), &r); err != nil {
			t.Fatalf("record at %s: %v (%q)", when, err, rec)
		}
		want := map[string]string{"Open": "downloading", "Apply": "applying"}[when]
		if r.Phase != want {
			t.Errorf("record on disk during %s says %q, want %q", when, r.Phase, want)
		}
	}
}

type peeking struct {
	plainFile
	record          string
	atOpen, atApply string
}

func (p *peeking) Open(ctx context.Context, u firmware.Update, off int64) (firmware.Sink, error) {
	b, _ := os.ReadFile(p.record)
	p.atOpen = string(b)
	return p.plainFile.Open(ctx, u, off)
}

func (p *peeking) Apply(ctx context.Context, u firmware.Update) error {
	b, _ := os.ReadFile(p.record)
	p.atApply = string(b)
	return p.plainFile.Apply(ctx, u)
}

// TestConcurrentStart: of many simultaneous Starts exactly one is accepted,
// the rest get the winner's id; an Observer that reads Status meanwhile does
// not deadlock.
func TestConcurrentStart(t *testing.T) {
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 512<<10))
	rec := newRecorder()
	var mp atomic.Pointer[firmware.Manager]
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
	cfg.Observer = func(p firmware.Progress) {
		rec.observe(p)
		if m := mp.Load(); m != nil {
			m.Status()
		}
	}
	r := startManager(t, cfg)
	mp.Store(r.Manager)
	const n = 16
	ids := make(chan string, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			id, err := r.Start(firmware.Request{URI: url})
			if err != nil {
				errs <- err
				return
			}
			ids <- id
		})
	}
	wg.Wait()
	close(ids)
	close(errs)
	var winners []string
	for id := range ids {
		winners = append(winners, id)
	}
	if len(winners) != 1 {
		t.Fatalf("%d Starts accepted, want 1", len(winners))
	}
	for err := range errs {
		var busy *firmware.BusyError
		if !errors.As(err, &busy) || busy.UpdateID != winners[0] {
			t.Errorf("loser got %v", err)
		}
	}
	if p := rec.waitTerminal(t, 30*time.Second); p.Phase != firmware.PhaseCompleted || p.UpdateID != winners[0] {
		t.Fatalf("got %+v", p)
	}
}
