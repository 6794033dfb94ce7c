package twin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/iothub"
)

// fullDisk makes q's file writes fail with ENOSPC, as on a full file
// system, while it is set; otherwise the real writes run. (A real full or
// read-only directory cannot be made here: the tests run as root, which
// writes through permissions, and mounting a small tmpfs is not for a unit
// test. test/agent runs the agent binary under a real file size limit.)
type fullDisk struct {
	full   atomic.Bool
	writes atomic.Int64 // attempts while full
}

func (d *fullDisk) install(q *Queue) {
	real := q.writeFile
	q.writeFile = func(path string, b []byte) error {
		if d.full.Load() {
			d.writes.Add(1)
			return &os.PathError{Op: "write", Path: path, Err: syscall.ENOSPC}
		}
		return real(path, b)
	}
}

// entryFiles lists the entry files in dir, in name (queue) order.
func entryFiles(t *testing.T, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	for i, f := range files {
		files[i] = filepath.Base(f)
	}
	return files
}

// notifications counts OnSaveProblem calls.
type notifications struct {
	mu sync.Mutex
	n  int
}

func (c *notifications) inc() { c.mu.Lock(); c.n++; c.mu.Unlock() }
func (c *notifications) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// Milestones that cannot be written while the hub is away are held in
// memory, the problem is visible with its cause, the write is retried with
// backoff, and once the disk takes writes again they are written, in
// order, and then delivered.
func TestUnwritableDirectoryThenFreed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hub := &hubSim{}
		var offline atomic.Bool
		offline.Store(true)
		hub.setScript(func(context.Context, int, []byte) error {
			if offline.Load() {
				return iothub.ErrNotConnected
			}
			return nil
		})
		var calls notifications
		opts := QueueOptions{MinBackoff: time.Second, MaxBackoff: 8 * time.Second, RequestTimeout: 5 * time.Second, OnSaveProblem: calls.inc}
		core, logs := observer.New(zap.DebugLevel)
		dir := t.TempDir()
		q := openTestQueue(t, dir, hub, opts, zap.New(core))
		var disk fullDisk
		disk.install(q)
		startRun(t, q)

		disk.full.Store(true)
		report(t, q, `{"firmwareStatus":"standBy","agent":{"version":"1"}}`, true)
		report(t, q, `{"firmware":{"percent":10}}`, false)
		report(t, q, `{"logLevel":{"ac":200,"av":2,"value":"debug"}}`, true)
		p := q.SaveProblem()
		if p == nil || !errors.Is(p.Err, syscall.ENOSPC) || p.Unsaved != 2 || p.Since.IsZero() {
			t.Fatalf("SaveProblem = %+v, want ENOSPC with 2 unsaved milestones", p)
		}
		if calls.get() == 0 {
			t.Fatal("OnSaveProblem not called")
		}
		if f := entryFiles(t, dir); len(f) != 0 {
			t.Fatalf("entry files %v on a full disk", f)
		}
		// The progress merged into the second milestone: two entries.
		if got := pending(q); !reflect.DeepEqual(got, []string{
			`M{"agent":{"version":"1"},"firmwareStatus":"standBy"}`,
			`M{"firmware":{"percent":10},"logLevel":{"ac":200,"av":2,"value":"debug"}}`,
		}) {
			t.Fatalf("pending %q: nothing may be refused", got)
		}
		e := logs.FilterMessage("cannot save reported state changes to disk; holding them in memory, sending them as usual and retrying the write").All()
		if len(e) != 1 || e[0].Level != zap.ErrorLevel || !strings.Contains(fmt.Sprint(e[0].ContextMap()["error"]), "no space left on device") {
			t.Fatalf("logs of the failed write %v, want one error naming the cause", e)
		}

		// The saver retries with backoff: about 1+2+4+8+8 s in 20 s.
		before := disk.writes.Load()
		time.Sleep(20 * time.Second)
		synctest.Wait()
		retries := disk.writes.Load() - before
		if retries < 3 || retries > 8 {
			t.Fatalf("%d write retries in 20 s with backoff 1 s … 8 s", retries)
		}

		disk.full.Store(false)
		time.Sleep(opts.MaxBackoff * 3 / 2)
		synctest.Wait()
		if p := q.SaveProblem(); p != nil {
			t.Fatalf("SaveProblem = %+v after the disk was freed", p)
		}
		if f := entryFiles(t, dir); !reflect.DeepEqual(f, []string{entryName(0), entryName(1)}) {
			t.Fatalf("entry files %v, want the two milestones in order", f)
		}
		if n := q.Durable(); n != 2 {
			t.Fatalf("Durable() = %d, want 2", n)
		}
		if len(logs.FilterMessage("reported state changes are saved to disk again").All()) != 1 {
			t.Fatal("the recovery is not logged")
		}

		offline.Store(false)
		q.Wake()
		flush(t, q)
		doc, accepted, _ := hub.snapshot()
		want := `{"agent":{"version":"1"},"firmware":{"percent":10},"firmwareStatus":"standBy","logLevel":{"ac":200,"av":2,"value":"debug"}}`
		if mustJSON(t, doc) != want {
			t.Fatalf("hub document %s\nwant %s", mustJSON(t, doc), want)
		}
		if len(accepted) != 2 {
			t.Fatalf("accepted %q, want 2 patches", accepted)
		}
		if f := entryFiles(t, dir); len(f) != 0 {
			t.Fatalf("files %v left after delivery", f)
		}
	})
}

// With the hub up, a milestone that cannot be written is delivered from
// memory at once and leaves no file; the problem stays visible until the
// directory takes a write again (a probe, as nothing is left to save).
func TestUnwritableDirectoryDeliversFromMemory(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hub := &hubSim{}
		var calls notifications
		opts := QueueOptions{MinBackoff: time.Second, MaxBackoff: 4 * time.Second, RequestTimeout: 5 * time.Second, OnSaveProblem: calls.inc}
		dir := t.TempDir()
		q := openTestQueue(t, dir, hub, opts, nil)
		var disk fullDisk
		disk.install(q)
		disk.full.Store(true)
		startRun(t, q)

		report(t, q, `{"firmwareStatus":"failed"}`, true)
		flush(t, q)
		if doc, _, _ := hub.snapshot(); doc["firmwareStatus"] != "failed" {
			t.Fatalf("hub document %v, want the milestone delivered", doc)
		}
		p := q.SaveProblem()
		if p == nil || p.Unsaved != 0 {
			t.Fatalf("SaveProblem = %+v, want the problem with nothing unsaved", p)
		}
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if q.SaveProblem() == nil {
			t.Fatal("the problem cleared while the disk is still full")
		}
		n := calls.get()

		disk.full.Store(false)
		time.Sleep(opts.MaxBackoff * 3 / 2)
		synctest.Wait()
		if p := q.SaveProblem(); p != nil {
			t.Fatalf("SaveProblem = %+v after the disk was freed", p)
		}
		if calls.get() == n {
			t.Fatal("OnSaveProblem not called for the recovery")
		}
		if f, _ := os.ReadDir(dir); len(f) != 1 || f[0].Name() != "lock" {
			t.Fatalf("queue directory holds %v, want the lock only (no entry, no probe)", f)
		}
	})
}

// A file that a failed write left behind (the rename happened, the
// directory's fsync failed) is removed, so a delivered milestone is never
// sent again after a restart.
func TestFailedWriteLeavesNoFile(t *testing.T) {
	hub := &hubSim{}
	dir := t.TempDir()
	q := openTestQueue(t, dir, hub, fastOpts(), nil)
	real := q.writeFile
	var fail atomic.Bool
	fail.Store(true)
	q.writeFile = func(path string, b []byte) error {
		if err := real(path, b); err != nil {
			return err
		}
		if fail.Load() {
			return &os.PathError{Op: "fsync", Path: path, Err: syscall.EIO}
		}
		return nil
	}
	report(t, q, `{"firmwareStatus":"completed"}`, true)
	if f := entryFiles(t, dir); len(f) != 0 {
		t.Fatalf("entry files %v after a failed write", f)
	}
	startRun(t, q)
	flush(t, q)
	if doc, _, _ := hub.snapshot(); doc["firmwareStatus"] != "completed" {
		t.Fatalf("hub document %v", doc)
	}
	if f := entryFiles(t, dir); len(f) != 0 {
		t.Fatalf("entry files %v after delivery", f)
	}
}

// Close says what a stop loses when milestones could not be saved.
func TestCloseWithUnsaved(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	q := openTestQueue(t, t.TempDir(), &hubSim{}, fastOpts(), zap.New(core))
	var disk fullDisk
	disk.install(q)
	disk.full.Store(true)
	report(t, q, `{"firmwareStatus":"completed"}`, true)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	e := logs.FilterMessage("reported state changes that could not be saved to disk are lost with this stop; the next start reports the state again").All()
	if len(e) != 1 || e[0].ContextMap()["unsaved"] != int64(1) {
		t.Fatalf("stop logs %v", logs.All())
	}
}
