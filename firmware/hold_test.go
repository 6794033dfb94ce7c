package firmware_test

import (
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/testutil"
)

// stateDisk writes the Manager's state files as atomicfile does, except
// while it is full: then every write fails with ENOSPC, as on a file system
// with no space left (renameio fails writing its temporary file). fillAt,
// when set, fills it at the first write it matches.
type stateDisk struct {
	mu      sync.Mutex
	full    bool
	fillAt  func(name string, data []byte) bool
	refused int
	changed chan struct{} // cap 1: a write was refused
}

func newStateDisk(fillAt func(name string, data []byte) bool) *stateDisk {
	return &stateDisk{fillAt: fillAt, changed: make(chan struct{}, 1)}
}

func (d *stateDisk) write(path string, data []byte, perm os.FileMode) error {
	name := filepath.Base(path)
	d.mu.Lock()
	if !d.full && d.fillAt != nil && d.fillAt(name, data) {
		d.full, d.fillAt = true, nil
	}
	full := d.full
	if full {
		d.refused++
	}
	d.mu.Unlock()
	if full {
		select {
		case d.changed <- struct{}{}:
		default:
		}
		return &fs.PathError{Op: "write", Path: filepath.Join(filepath.Dir(path), "."+name+"4711"), Err: syscall.ENOSPC}
	}
	return atomicfile.WriteFile(path, data, perm)
}

func (d *stateDisk) setFull(full bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.full = full
}

func (d *stateDisk) refusals() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.refused
}

// onDisk is what the tests read of a persisted update record.
type onDisk struct {
	UpdateID string         `json:"updateId"`
	Phase    firmware.Phase `json:"phase"`
	Slot     string         `json:"slot"`
}

func decodeRecord(data []byte) onDisk {
	var r onDisk
	_ = json.Unmarshal(data, &r)
	return r
}

func readRecord(t *testing.T, dir string) onDisk {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "update.json"))
	if err != nil {
		t.Fatal(err)
	}
	return decodeRecord(b)
}

// recordIn matches the first write of the update record in phase.
func recordIn(phase firmware.Phase) func(string, []byte) bool {
	return func(name string, data []byte) bool {
		return name == "update.json" && decodeRecord(data).Phase == phase
	}
}

// holdEnv is one update on a state disk that fills up.
type holdEnv struct {
	srv   *imageServer
	img   []byte
	ab    *fileAB
	state string
	m     *running
}

// TestFullStateDiskHoldsEachPhase fills the state disk at each write the
// update makes, in every phase: the Manager keeps running, reports the
// problem (file and cause) once, does not act on a phase it could not
// record, and finishes the update once the disk takes writes again.
func TestFullStateDiskHoldsEachPhase(t *testing.T) {
	all := []firmware.Phase{"accepted", "downloading", "verifying", "applying", "rebooting", "committing", "completed"}
	tests := []struct {
		name   string
		fillAt func(string, []byte) bool
		file   string         // the file the problem names
		onDisk firmware.Phase // the record's phase while held
		// held says the update is held where the case wants it (by default
		// once three writes were refused: two retries after the first).
		held func(p *firmware.UpdateError) bool
		// check looks, while held, that what follows the write did not
		// happen (and what comes before it did).
		check func(t *testing.T, e *holdEnv)
		// logs is how often the problem is logged (once per message; 1
		// when 0).
		logs int
	}{
		{
			name: "accepted, recording the target slot",
			fillAt: func(name string, data []byte) bool {
				r := decodeRecord(data)
				return name == "update.json" && r.Phase == firmware.PhaseAccepted && r.Slot != ""
			},
			file: "update.json", onDisk: firmware.PhaseAccepted,
			check: func(t *testing.T, e *holdEnv) {
				if r := readRecord(t, e.state); r.Slot != "" {
					t.Errorf("record on disk names slot %q", r.Slot)
				}
				if n := e.srv.requests.Load(); n != 0 {
					t.Errorf("%d download requests before the slot was recorded", n)
				}
			},
		},
		{
			name: "downloading", fillAt: recordIn(firmware.PhaseDownloading),
			file: "update.json", onDisk: firmware.PhaseAccepted,
			check: func(t *testing.T, e *holdEnv) {
				if n := e.srv.requests.Load(); n != 0 {
					t.Errorf("%d download requests before downloading was recorded", n)
				}
			},
		},
		{
			name: "downloading, checkpoints",
			fillAt: func(name string, _ []byte) bool {
				return name == "download.json"
			},
			file: "download.json", onDisk: firmware.PhaseDownloading,
			held: func(p *firmware.UpdateError) bool {
				return strings.Contains(p.Message, "the finished download waits for its checkpoint")
			},
			// While the image streams, and again when it has arrived.
			logs: 2,
			check: func(t *testing.T, e *holdEnv) {
				// The download went on without its checkpoints.
				if n := e.srv.served.Load(); n != int64(len(e.img)) {
					t.Errorf("served %d bytes while checkpoints failed, want the whole image (%d)", n, len(e.img))
				}
				if _, err := os.Stat(filepath.Join(e.state, "download.json")); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("a checkpoint is on the full disk: %v", err)
				}
				if e.ab.applies.Load() != 0 {
					t.Error("applied before the download was recorded")
				}
			},
		},
		{
			name: "verifying", fillAt: recordIn(firmware.PhaseVerifying),
			file: "update.json", onDisk: firmware.PhaseDownloading,
			check: func(t *testing.T, e *holdEnv) {
				if _, err := os.Stat(filepath.Join(e.state, "download.json")); err != nil {
					t.Errorf("the final checkpoint is not on disk: %v", err)
				}
				if e.ab.applies.Load() != 0 {
					t.Error("applied before verifying was recorded")
				}
			},
		},
		{
			name: "applying", fillAt: recordIn(firmware.PhaseApplying),
			file: "update.json", onDisk: firmware.PhaseVerifying,
			check: func(t *testing.T, e *holdEnv) {
				if e.ab.applies.Load() != 0 {
					t.Error("applied before applying was recorded")
				}
			},
		},
		{
			name: "rebooting", fillAt: recordIn(firmware.PhaseRebooting),
			file: "update.json", onDisk: firmware.PhaseApplying,
			check: func(t *testing.T, e *holdEnv) {
				if e.ab.applies.Load() != 1 || e.ab.env().Rebooted != 0 {
					t.Errorf("applies %d, reboots %d; want 1 and 0", e.ab.applies.Load(), e.ab.env().Rebooted)
				}
			},
		},
		{
			name: "committing", fillAt: recordIn(firmware.PhaseCommitting),
			file: "update.json", onDisk: firmware.PhaseRebooting,
			check: func(t *testing.T, e *holdEnv) {
				if e.ab.env().Running != "B" || e.ab.commits.Load() != 0 {
					t.Errorf("env %+v, commits %d; want running B and no commit", e.ab.env(), e.ab.commits.Load())
				}
			},
		},
		{
			name: "completed", fillAt: recordIn(firmware.PhaseCompleted),
			file: "update.json", onDisk: firmware.PhaseCommitting,
			check: func(t *testing.T, e *holdEnv) {
				if e.ab.commits.Load() != 1 {
					t.Errorf("%d commits before completed was recorded, want 1", e.ab.commits.Load())
				}
				if !e.m.Status().Busy {
					t.Error("not busy while completed is not recorded")
				}
				if _, err := os.Stat(filepath.Join(e.state, "download.json")); err != nil {
					t.Errorf("the checkpoint was removed before completed was recorded: %v", err)
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := &holdEnv{srv: newImageServer(t), img: randomImage(t, 1<<20), ab: &fileAB{dir: t.TempDir()}, state: t.TempDir()}
			url := e.srv.add("/fw.img", e.img)
			rec := newRecorder()
			cfg := testConfig(t, e.state, abInstaller{e.ab}, rec)
			core, logs := observer.New(zap.InfoLevel)
			cfg.Log = zap.New(zapcore.NewTee(core, cfg.Log.Core()))
			disk := newStateDisk(tc.fillAt)
			firmware.SetStateWriter(&cfg, disk.write)
			reboots := make(chan struct{}, 4)
			e.ab.onReboot = func() { reboots <- struct{}{} }
			e.m = startManager(t, cfg)
			id, err := e.m.Start(firmware.Request{URI: url, Version: "2.0.0", SHA256: sha(e.img), Size: int64(len(e.img))})
			if err != nil {
				t.Fatal(err)
			}

			deadline := time.NewTimer(60 * time.Second)
			defer deadline.Stop()
			held := false
			for {
				select {
				case <-reboots:
					// The reboot "stops" the agent; it starts again.
					e.m.stop(t)
					e.m = startManager(t, cfg)
				case <-disk.changed:
				case <-rec.wake:
				case err := <-e.m.done:
					t.Fatalf("Run returned (%v); phases %v, status %+v", err, rec.phases(), e.m.Status())
				case <-deadline.C:
					t.Fatalf("no end within 60s; held %v, phases %v, status %+v", held, rec.phases(), e.m.Status())
				}
				if !held && disk.refusals() >= 3 {
					p := e.m.Status().Problem
					if p == nil {
						t.Fatalf("%d writes refused and no problem reported", disk.refusals())
					}
					if tc.held != nil && !tc.held(p) {
						continue
					}
					held = true
					checkHeld(t, e, logs, max(tc.logs, 1), p, filepath.Join(e.state, tc.file), tc.onDisk, id)
					tc.check(t, e)
					disk.setFull(false)
				}
				if st := e.m.Status(); held && st.Phase.Terminal() {
					break
				}
			}

			last := e.m.Status()
			if last.Phase != firmware.PhaseCompleted || last.Problem != nil || last.CurrentVersion != "2.0.0" {
				t.Fatalf("ended %s, err %+v, problem %+v, version %q", last.Phase, last.Err, last.Problem, last.CurrentVersion)
			}
			if got := rec.phases(); !slices.Equal(got, all) {
				t.Errorf("phases %v, want %v", got, all)
			}
			if e.ab.applies.Load() != 1 || e.ab.commits.Load() != 1 {
				t.Errorf("applied %d and committed %d times, want once each", e.ab.applies.Load(), e.ab.commits.Load())
			}
			if n := e.srv.requests.Load(); n != 1 {
				t.Errorf("%d download requests, want 1", n)
			}
			if n := logs.FilterMessage("the update state is saved again; the update goes on").Len(); n != 1 {
				t.Errorf("recovery logged %d times, want once", n)
			}
			// The problem was reported once and cleared; the Observer saw
			// no problem after the one that held the update.
			var with, cleared int
			list := rec.list()
			for i, p := range list {
				if p.Problem != nil && (i == 0 || list[i-1].Problem == nil) {
					with++
				}
				if p.Problem == nil && i > 0 && list[i-1].Problem != nil {
					cleared++
				}
			}
			if with != cleared || with == 0 {
				t.Errorf("the problem began %d and cleared %d times in the progress", with, cleared)
			}
		})
	}
}

// checkHeld checks a held update: still busy and reported with a problem
// naming file and the cause, logged once, the record on disk in phase.
func checkHeld(t *testing.T, e *holdEnv, logs *observer.ObservedLogs, nlogs int, p *firmware.UpdateError, file string, phase firmware.Phase, id string) {
	t.Helper()
	select {
	case err := <-e.m.done:
		t.Fatalf("Run returned (%v) while the disk is full", err)
	default:
	}
	if st := e.m.Status(); !st.Busy || st.UpdateID != id {
		t.Errorf("status %+v, want busy with %s", st, id)
	}
	if p.Code != firmware.CodeStateNotSaved || !strings.Contains(p.Message, file) || !strings.Contains(p.Message, "no space left on device") {
		t.Errorf("problem %+v, want %s naming %s and the cause", p, firmware.CodeStateNotSaved, file)
	}
	if strings.Contains(p.Message, "4711") {
		t.Errorf("problem names the temporary file: %s", p.Message)
	}
	if r := readRecord(t, e.state); r.Phase != phase || r.UpdateID != id {
		t.Errorf("record on disk %+v, want phase %s of %s", r, phase, id)
	}
	entries := logs.FilterMessage("cannot save the update state; the update is held and the write retried").All()
	if len(entries) != nlogs {
		t.Fatalf("the problem was logged %d times, want %d", len(entries), nlogs)
	}
	for _, en := range entries {
		if f := en.ContextMap(); f["file"] != file || f["cause"] != "no space left on device" || f["update_id"] != id {
			t.Errorf("log fields %v, want file %s and the cause", f, file)
		}
	}
	if nlogs == 2 && !strings.Contains(entries[0].ContextMap()["held"].(string), "the download goes on, and would resume from byte 0") {
		t.Errorf("first log %v, want the download going on", entries[0].ContextMap())
	}
}

// TestFullStateDiskAtStart: an agent that starts on a full state disk with
// an update in progress cannot count the restart in the record. It must
// not exit: the Manager runs, reports the problem, downloads nothing, and
// resumes the update once the disk takes writes.
func TestFullStateDiskAtStart(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 1<<20)
	url := srv.add("/fw.img", img)
	release := make(chan struct{})
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		if n == 1 {
			<-release // the first run never gets the image
			return true
		}
		return false
	})
	ab := &fileAB{dir: t.TempDir()}
	state := t.TempDir()
	rec := newRecorder()
	cfg := testConfig(t, state, plainFile{ab}, rec)
	disk := newStateDisk(nil)
	firmware.SetStateWriter(&cfg, disk.write)
	m1 := startManager(t, cfg)
	id, err := m1.Start(firmware.Request{URI: url, SHA256: sha(img)})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the first download request", func() bool { return srv.requests.Load() == 1 })
	m1.stop(t)
	close(release)

	disk.setFull(true)
	m2 := startManager(t, cfg)
	testutil.Eventually(t, 30*time.Second, "three refused writes", func() bool { return disk.refusals() >= 3 })
	select {
	case err := <-m2.done:
		t.Fatalf("Run returned (%v) on a full disk", err)
	default:
	}
	st := m2.Status()
	if !st.Busy || st.Phase != firmware.PhaseDownloading || st.Problem == nil || st.Problem.Code != firmware.CodeStateNotSaved ||
		!strings.Contains(st.Problem.Message, filepath.Join(state, "update.json")+": no space left on device") {
		t.Fatalf("status %+v, problem %+v", st, st.Problem)
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d download requests before the restart was recorded, want the first run's 1", n)
	}

	disk.setFull(false)
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseCompleted || last.UpdateID != id || last.Problem != nil {
		t.Fatalf("ended %+v", last)
	}
}

// TestRealFullStateDisk fills a real file system (a small tmpfs mounted
// for the test) in the middle of a download and frees it: the checkpoints
// the kernel refuses hold the finished download, not the Manager, and the
// update completes once there is space.
func TestRealFullStateDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root; TestFullStateDiskHoldsEachPhase covers the same paths with injected ENOSPC")
	}
	state := t.TempDir()
	if err := syscall.Mount("tmpfs", state, "tmpfs", 0, "size=256k,mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs on %s as root: %v", state, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(state, 0); err != nil {
			t.Errorf("unmount %s: %v", state, err)
		}
	})

	srv := newImageServer(t)
	img := randomImage(t, 2<<20)
	url := srv.add("/fw.img", img)
	gate := make(chan struct{})
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		if n == 1 {
			cutAfter(w, r, body, len(body)/2) // half the image, then the connection breaks
			return true
		}
		<-gate // the rest once the disk is full
		return false
	})
	ab := &fileAB{dir: t.TempDir()}
	rec := newRecorder()
	cfg := testConfig(t, state, plainFile{ab}, rec)
	m := startManager(t, cfg)
	id, err := m.Start(firmware.Request{URI: url, Version: "2.0.0", SHA256: sha(img), Size: int64(len(img))})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "half the image", func() bool { return srv.served.Load() >= int64(len(img)/2) })

	filler := filepath.Join(state, "filler")
	fill(t, filler)
	close(gate) // the resumed transfer delivers the rest
	testutil.Eventually(t, 30*time.Second, "the finished download held", func() bool {
		p := m.Status().Problem
		return p != nil && strings.Contains(p.Message, "the finished download waits")
	})
	p := m.Status().Problem
	if p.Code != firmware.CodeStateNotSaved || !strings.Contains(p.Message, filepath.Join(state, "download.json")+": no space left on device") {
		t.Fatalf("problem %+v", p)
	}
	if st := m.Status(); st.Phase != firmware.PhaseDownloading || !st.Busy {
		t.Fatalf("status %+v while held", st)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseCompleted || last.UpdateID != id || last.Problem != nil || last.CurrentVersion != "2.0.0" {
		t.Fatalf("ended %+v (err %+v)", last, last.Err)
	}
	got, err := os.ReadFile(ab.slot("B"))
	if err != nil || string(got) != string(img) {
		t.Fatalf("slot holds %d bytes, not the image (%v)", len(got), err)
	}
}

// fill writes path until the file system has no space left.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill %s: %v", path, err)
			}
			return
		}
	}
}
