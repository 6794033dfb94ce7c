package agente2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
)

// A state disk that fills up during an update (issue 9: the agent used to
// exit at each start and systemd gave up on it). The real gwagent runs with
// its state directory on a 1 MiB tmpfs, which the test fills in the middle
// of a download, as a log file elsewhere on the same partition would:
// the agent stays up and connected, the twin says why the update waits,
// an agent restarted on the full disk starts and says so too, and the
// update completes once space is freed.
func TestUpdateHeldByFullStateDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs for the state directory needs root (CI runs as root); firmware's tests inject ENOSPC instead")
	}
	t.Parallel()
	e := newHubEnv(t)
	s := e.agentSetup(t)
	if err := os.MkdirAll(s.stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", s.stateDir, "tmpfs", 0, "size=1m,mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs on %s as root: %v", s.stateDir, err)
	}
	// Registered before the agents start: their cleanups (kill) run first.
	t.Cleanup(func() {
		if err := syscall.Unmount(s.stateDir, 0); err != nil {
			t.Errorf("unmount %s: %v", s.stateDir, err)
		}
	})

	img := newImageServer(t, 2<<20, 32<<10, 5*time.Millisecond) // 64 reads
	img.holdAfter(1 << 20)
	a := startAgent(t, s, "gwagent")
	e.waitStandBy(t)
	id := e.startUpdate(t, fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0","sha256":%q,"size":%d}`, img.url(), img.sum, len(img.image)))
	testutil.Eventually(t, wait, "half the image served", func() bool { return img.served.Load() >= 1<<20 })

	filler := filepath.Join(s.stateDir, "filler")
	fillDisk(t, filler)
	img.release()

	checkpoint := filepath.Join(s.stateDir, "firmware", "download.json")
	e.waitReported(t, "firmware.error saying the finished download waits for "+checkpoint, func(rep map[string]any) bool {
		msg := text(field(rep, "firmware", "error", "message"))
		return rep["firmwareStatus"] == "downloading" && field(rep, "firmware", "updateId") == id &&
			field(rep, "firmware", "error", "code") == "stateNotSaved" &&
			strings.Contains(msg, checkpoint+": no space left on device") && strings.Contains(msg, "the finished download waits")
	})
	a.waitLog(t, "the problem with the file and the cause", func(l logLine) bool {
		return l.msg() == "cannot save the update state; the update is held and the write retried" &&
			l.str("file") == checkpoint && l.str("cause") == "no space left on device" && l.str("update_id") == id
	})
	// Up, connected, answering methods: a second update is refused as busy.
	busy(t, e, id)
	if !a.running() {
		t.Fatalf("gwagent exited: %v", a.err)
	}

	// A restart on the full disk (systemd would restart a stopped agent):
	// the restart cannot be counted in the record, and the agent does not
	// exit over it.
	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent stopped with %v", err)
	}
	a2 := startAgent(t, s, "gwagent (restarted)")
	record := filepath.Join(s.stateDir, "firmware", "update.json")
	e.waitReported(t, "firmware.error saying the record cannot be saved", func(rep map[string]any) bool {
		msg := text(field(rep, "firmware", "error", "message"))
		return field(rep, "firmware", "error", "code") == "stateNotSaved" && strings.Contains(msg, record+": no space left on device")
	})
	busy(t, e, id)
	if !a2.running() {
		t.Fatalf("the restarted gwagent exited: %v", a2.err)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	rep := e.waitCompleted(t, id)
	checkCompleted(t, e.rec.all(), rep, id, "2.0.0")
	// The final checkpoint never reached the disk: the restarted agent
	// downloaded again, from the last checkpoint that did (here the start:
	// the first one is due after 16 MiB or 5s).
	if r := img.requests(); len(r) != 2 || r[0] != "" {
		t.Errorf("image requests with Range %q, want two: the first run's and the restarted agent's", r)
	}
	if err := a2.stop(t); err != nil {
		t.Errorf("gwagent stopped with %v", err)
	}
}

// busy asks for another update and expects 409 naming the running one.
func busy(t *testing.T, e *hubEnv, id string) {
	t.Helper()
	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"https://example.invalid/fw.bin"}`)
	var body struct{ Error, UpdateID string }
	if err := json.Unmarshal(res.Payload, &body); err != nil || res.Status != 409 || body.UpdateID != id {
		t.Fatalf("firmwareUpdate while held answered %d %s, want 409 naming %s", res.Status, res.Payload, id)
	}
}

// fillDisk writes path until its file system has no space left.
func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill %s: %v", path, err)
			}
			return
		}
	}
}
