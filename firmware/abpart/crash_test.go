package abpart

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// The crash tests re-execute this test binary running TestABCrashChild with
// abCrashEnv set: the child is one run of the agent (Manager + abpart on the
// parent's slot files and real grub-editenv environment). Its Observer
// prints each Progress and, at the kill point, prints abCrashKill and blocks
// the state machine there (the phase is persisted, its side effect not yet
// done) until the parent SIGKILLs it. A reboot request prints abCrashReboot
// and ends the child, as a real reboot ends the agent; the parent then plays
// the bootloader (device.boot) and starts the next boot's child.
const (
	abCrashEnv    = "GWAGENT_ABPART_CRASH_CHILD"
	abCrashKill   = "KILL-ME-NOW"
	abCrashReboot = "REBOOTING"
)

// abCrashSpec is what the child needs to rebuild the device.
type abCrashSpec struct {
	Config     Config           `json:"config"`
	GrubEnv    string           `json:"grubEnv"`
	StateDir   string           `json:"stateDir"` // the firmware state machine's
	Request    firmware.Request `json:"request"`
	KillPhase  string           `json:"killPhase"`
	KillBytes  int64            `json:"killBytes"`
	Checkpoint int64            `json:"checkpoint"`
	MaxRange   int64            `json:"maxRange,omitempty"`
}

// TestABCrashChild is the child process of TestABCrashResume; run directly
// it has nothing to do.
func TestABCrashChild(t *testing.T) {
	raw := os.Getenv(abCrashEnv)
	if raw == "" {
		t.Skip("the child process of TestABCrashResume (runs only when re-executed by it)")
	}
	os.Exit(abCrashChild(raw))
}

func abCrashChild(raw string) int {
	var spec abCrashSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "child: spec:", err)
		return 2
	}
	out := bufio.NewWriter(os.Stdout)
	var outMu sync.Mutex
	say := func(line string) {
		outMu.Lock()
		defer outMu.Unlock()
		out.WriteString(line + "\n")
		out.Flush()
	}
	env, err := bootenv.Open(bootenv.Config{Backend: "grub", GRUB: bootenv.GRUBConfig{EnvFile: spec.GrubEnv}}, nil, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	reb := rebootFunc(func(context.Context) error {
		say(abCrashReboot)
		os.Exit(0)
		return nil
	})
	inst, err := New(spec.Config, Deps{Env: env, Rebooter: reb})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	m, err := firmware.NewManager(firmware.Config{
		StateDir:       spec.StateDir,
		Installer:      inst,
		CurrentVersion: "1.0.0",
		Observer: func(p firmware.Progress) {
			b, _ := json.Marshal(p)
			say(string(b))
			if string(p.Phase) == spec.KillPhase && p.Bytes >= spec.KillBytes {
				say(abCrashKill)
				time.Sleep(time.Hour) // until SIGKILL
			}
		},
		CheckpointBytes: spec.Checkpoint,
		MaxRangeBytes:   spec.MaxRange,
		RebootTimeout:   time.Hour,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	if !m.Status().Busy {
		if _, err := m.Start(spec.Request); err != nil {
			fmt.Fprintln(os.Stderr, "child: start:", err)
			return 2
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "child: run:", err)
	}
	fmt.Fprintf(os.Stderr, "child: reached the end without being killed (status %+v)\n", m.Status())
	return 3
}

// countingServer serves one image with Range support and remembers, per
// request, its Range header and how many body bytes it sent.
type countingServer struct {
	*httptest.Server
	mu     sync.Mutex
	ranges []string
	sent   []int64
}

func newCountingServer(t *testing.T, data []byte) *countingServer {
	s := &countingServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		i := len(s.ranges)
		s.ranges = append(s.ranges, r.Header.Get("Range"))
		s.sent = append(s.sent, 0)
		s.mu.Unlock()
		http.ServeContent(&countingWriter{ResponseWriter: w, s: s, i: i}, r, "fw.img", time.Time{}, bytes.NewReader(data))
	}))
	t.Cleanup(s.Close)
	return s
}

type countingWriter struct {
	http.ResponseWriter
	s *countingServer
	i int
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.s.mu.Lock()
	c.s.sent[c.i] += int64(n)
	c.s.mu.Unlock()
	return n, err
}

// since returns the Range headers of the requests from index i on and the
// bytes they sent.
func (s *countingServer) since(i int) ([]string, int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, b := range s.sent[i:] {
		n += b
	}
	return append([]string(nil), s.ranges[i:]...), n
}

func (s *countingServer) requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.ranges)
}

// TestABCrashResume SIGKILLs a real agent process (Manager + abpart, slot
// files, the real grub-editenv) at every phase of an update and in the
// middle of the download, then resumes in this process, rebooting as the
// update asks. Every run must end completed on slot B with the image, the
// active slot A byte-for-byte untouched, and a download killed midway must
// continue from its checkpoint (counted in bytes served), not from zero.
func TestABCrashResume(t *testing.T) {
	requireTools(t, "grub-editenv")
	const checkpoint = 64 << 10
	data := randomBytes(t, 900<<10+123) // fits the 1 MiB slots
	for _, kill := range []struct {
		phase string
		bytes int64
	}{
		{"accepted", 0}, {"downloading", 0}, {"downloading", 450 << 10}, {"verifying", 0},
		{"applying", 0}, {"rebooting", 0}, {"committing", 0},
	} {
		name := kill.phase
		if kill.bytes > 0 {
			name += "@" + strconv.FormatInt(kill.bytes, 10)
		}
		t.Run(name, func(t *testing.T) {
			d := newDevice(t, "grub")
			d.guard("A")
			srv := newCountingServer(t, data)
			spec := abCrashSpec{
				Config:     d.config(),
				GrubEnv:    filepath.Join(d.dir, "grubenv"),
				StateDir:   filepath.Join(d.dir, "agent"), // as startAgent
				Request:    request(srv.URL+"/fw.img", data),
				KillPhase:  kill.phase,
				KillBytes:  kill.bytes,
				Checkpoint: checkpoint,
			}
			raw, err := json.Marshal(spec)
			if err != nil {
				t.Fatal(err)
			}

			childPhases, boots := runCrashChild(t, d, string(raw))

			var cp struct {
				Offset int64 `json:"offset"`
			}
			if b, err := os.ReadFile(filepath.Join(spec.StateDir, "download.json")); err == nil {
				if err := json.Unmarshal(b, &cp); err != nil {
					t.Fatalf("checkpoint left by the killed child: %v", err)
				}
			}
			before := srv.requests()

			// Resume in this process, playing each reboot the update asks for.
			a := d.startAgent(t, nil)
			for a.waitRebootOrEnd(t) {
				boots++
				if boots > 3 {
					t.Fatalf("rebooted %d times; phases %v", boots, a.phasesNow())
				}
				d.boot()
				a = d.startAgent(t, nil)
			}
			final, phases := a.result()
			if final == nil || final.Phase != firmware.PhaseCompleted || final.Slot != "B" || final.CurrentVersion != "2.0.0" {
				t.Fatalf("resumed update ended %+v; child phases %v, resumed phases %v", final, childPhases, phases)
			}
			if boots != 1 {
				t.Errorf("%d reboots in all, want exactly 1", boots)
			}
			got, err := os.ReadFile(d.slots["B"])
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:len(data)], data) {
				t.Fatal("slot B does not hold the image")
			}
			if st := d.state(); st.Slot != "B" || st.UpgradeAvailable || st.BootCount != 0 {
				t.Fatalf("environment after the update: %+v", st)
			}
			st, err := d.installer().Status(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if st.Running != "B" || !st.Slots[1].Committed || st.Phase != phaseCommitted || st.ImageSHA != spec.Request.SHA256 {
				t.Fatalf("abpart status after the update: %+v", st)
			}

			ranges, served := srv.since(before)
			t.Logf("killed at %s: child phases %v, checkpoint %d; resumed with requests %q serving %d bytes; resumed phases %v",
				name, childPhases, cp.Offset, ranges, served, phases)
			switch {
			case kill.bytes > 0:
				if cp.Offset <= 0 || cp.Offset >= int64(len(data)) {
					t.Fatalf("checkpoint offset %d after a kill at %d of %d bytes", cp.Offset, kill.bytes, len(data))
				}
				if want := fmt.Sprintf("bytes=%d-", cp.Offset); len(ranges) != 1 || ranges[0] != want {
					t.Errorf("resume requests %q, want [%q]", ranges, want)
				}
				if want := int64(len(data)) - cp.Offset; served != want {
					t.Errorf("served %d bytes after the kill, want %d (the rest after the checkpoint)", served, want)
				}
			case kill.phase == "accepted" || kill.phase == "downloading":
				if served != int64(len(data)) {
					t.Errorf("served %d bytes after the kill, want the image once (%d)", served, len(data))
				}
			default:
				if len(ranges) != 0 {
					t.Errorf("downloaded again after a kill in %s: %q", kill.phase, ranges)
				}
			}
		})
	}
}

// runCrashChild runs child agents (one per boot) until one reaches the kill
// point, SIGKILLs it and returns the phases the children reported and the
// number of reboots they asked for.
func runCrashChild(t *testing.T, d *device, spec string) ([]firmware.Phase, int) {
	t.Helper()
	var phases []firmware.Phase
	boots := 0
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	for {
		cmd := exec.Command(os.Args[0], "-test.run=^TestABCrashChild$")
		cmd.Env = append(os.Environ(), abCrashEnv+"="+spec)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		rebooted := false
	read:
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					break read
				}
				switch l {
				case abCrashKill:
					if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
						t.Fatal(err)
					}
					for range lines {
					}
					werr := cmd.Wait()
					if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
						t.Fatalf("child not ended by SIGKILL: %v", werr)
					}
					return phases, boots
				case abCrashReboot:
					rebooted = true
					continue
				}
				var p firmware.Progress
				if json.Unmarshal([]byte(l), &p) == nil && (len(phases) == 0 || phases[len(phases)-1] != p.Phase) {
					phases = append(phases, p.Phase)
				}
			case <-deadline.C:
				_ = cmd.Process.Kill()
				for range lines {
				}
				_ = cmd.Wait()
				t.Fatalf("child did not reach the kill point within 60s; phases %v; stderr: %s", phases, stderr.String())
			}
		}
		if err := cmd.Wait(); err != nil || !rebooted {
			t.Fatalf("child ended before the kill point (rebooted %t): %v; phases %v; stderr: %s", rebooted, err, phases, strings.TrimSpace(stderr.String()))
		}
		boots++
		if boots > 2 {
			t.Fatalf("child rebooted %d times without reaching the kill point", boots)
		}
		d.boot()
	}
}
