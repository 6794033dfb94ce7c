package firmware_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
)

// The crash test re-executes this test binary. With crashChildEnv set,
// TestMain runs crashChild instead of the tests: it starts an update against
// the parent's HTTP server and, when its Observer sees the kill point, says
// so on stdout and waits to be SIGKILLed by the parent.
const (
	crashChildEnv = "GWAGENT_FIRMWARE_CRASH_CHILD"
	crashURLEnv   = "GWAGENT_FIRMWARE_CRASH_URL"
	crashStateEnv = "GWAGENT_FIRMWARE_CRASH_STATE"
	crashABEnv    = "GWAGENT_FIRMWARE_CRASH_AB"
	crashAtEnv    = "GWAGENT_FIRMWARE_CRASH_AT"
	crashSHAEnv   = "GWAGENT_FIRMWARE_CRASH_SHA"
	crashKeyEnv   = "GWAGENT_FIRMWARE_CRASH_KEY"
	killMe        = "KILL-ME-NOW"
	rebootedLine  = "REBOOTED"
)

func crashChild() int {
	at := os.Getenv(crashAtEnv)
	atPhase, atBytes, _ := strings.Cut(at, ":")
	minBytes, _ := strconv.ParseInt(atBytes, 10, 64)
	out := bufio.NewWriter(os.Stdout)
	observe := func(p firmware.Progress) {
		b, _ := json.Marshal(p)
		out.Write(append(b, '\n'))
		if string(p.Phase) == atPhase && p.Bytes >= minBytes {
			out.WriteString(killMe + "\n")
			out.Flush()
			// Block the state machine right here, after the phase was
			// persisted and before its side effect, until SIGKILL.
			time.Sleep(time.Hour)
		}
		out.Flush()
	}
	ab := abInstaller{&fileAB{dir: os.Getenv(crashABEnv)}}
	// A reboot ends the process, as it would on a device; the parent starts
	// the next "boot".
	ab.onReboot = func() {
		out.WriteString(rebootedLine + "\n")
		out.Flush()
		os.Exit(0)
	}
	m, err := firmware.NewManager(firmware.Config{
		StateDir:        os.Getenv(crashStateEnv),
		Installer:       ab,
		Observer:        observe,
		Log:             zap.NewNop(),
		CheckpointBytes: 256 << 10,
		RebootTimeout:   time.Hour,
		Signatures:      &signature.Policy{KeyDir: os.Getenv(crashKeyEnv)},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if !m.Status().Busy {
		if _, err := m.Start(firmware.Request{URI: os.Getenv(crashURLEnv), Version: "9.9", SHA256: os.Getenv(crashSHAEnv),
			SignatureURI: os.Getenv(crashURLEnv) + ".minisig"}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m.Run(ctx)
	fmt.Fprintln(os.Stderr, "child: reached the end without being killed")
	return 3
}

// TestCrashResume kills a real agent process (SIGKILL) at every phase and in
// the middle of the download, then resumes in this process and checks that
// the update completes with the right image and that the download continued
// from the last checkpoint instead of starting over. The image is signed, so
// the signature digest is checkpointed and resumed too.
func TestCrashResume(t *testing.T) {
	img := randomImage(t, 6<<20+4321)
	keyDir := t.TempDir()
	_, sec := minisignKey(t, keyDir)
	imgFile := filepath.Join(t.TempDir(), "fw.img")
	if err := os.WriteFile(imgFile, img, 0o600); err != nil {
		t.Fatal(err)
	}
	sig := minisignSign(t, sec, imgFile)
	for _, at := range []string{
		"accepted", "downloading", "downloading:2500000", "verifying", "applying", "rebooting", "committing",
	} {
		t.Run(strings.ReplaceAll(at, ":", "@"), func(t *testing.T) {
			srv := newImageServer(t)
			url := srv.add("/fw.img", img)
			srv.add("/fw.img.minisig", sig)
			state, abDir := t.TempDir(), t.TempDir()

			env := append(os.Environ(), crashChildEnv+"=1", crashURLEnv+"="+url, crashStateEnv+"="+state,
				crashABEnv+"="+abDir, crashAtEnv+"="+at, crashSHAEnv+"="+sha(img), crashKeyEnv+"="+keyDir)
			var (
				cmd    *exec.Cmd
				stderr bytes.Buffer
				lines  chan string
			)
			spawn := func() {
				cmd = exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = env
				cmd.Stderr = &stderr
				stdout, err := cmd.StdoutPipe()
				if err != nil {
					t.Fatal(err)
				}
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				lines = make(chan string)
				go func(ch chan<- string) {
					defer close(ch)
					sc := bufio.NewScanner(stdout)
					for sc.Scan() {
						ch <- sc.Text()
					}
				}(lines)
			}
			spawn()
			timeout := time.After(60 * time.Second)
			var childPhases []firmware.Phase
		wait:
			for {
				select {
				case l, ok := <-lines:
					if !ok {
						cmd.Wait()
						t.Fatalf("child ended before the kill point; stderr: %s", stderr.String())
					}
					switch l {
					case killMe:
						break wait
					case rebootedLine:
						// The child "rebooted": wait for it, boot the next one.
						for range lines {
						}
						if err := cmd.Wait(); err != nil {
							t.Fatalf("rebooting child: %v; stderr: %s", err, stderr.String())
						}
						spawn()
						continue
					}
					var p firmware.Progress
					if json.Unmarshal([]byte(l), &p) == nil && (len(childPhases) == 0 || childPhases[len(childPhases)-1] != p.Phase) {
						childPhases = append(childPhases, p.Phase)
					}
				case <-timeout:
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("child did not reach %s within 60s; stderr: %s", at, stderr.String())
				}
			}
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			werr := cmd.Wait()
			for range lines { // drain
			}
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("child not killed by SIGKILL: %v", werr)
			}

			// What the dead process left behind.
			var cp struct {
				Offset int64 `json:"offset"`
			}
			if b, err := os.ReadFile(filepath.Join(state, "download.json")); err == nil {
				json.Unmarshal(b, &cp)
			}
			requestsBefore := len(srv.rangeHeaders())

			// Resume here, rebooting (restarting the manager) as often as the
			// backend asks.
			ab := &fileAB{dir: abDir}
			reboots := make(chan struct{}, 4)
			ab.onReboot = func() { reboots <- struct{}{} }
			rec := newRecorder()
			cfg := testConfig(t, state, abInstaller{ab}, rec)
			cfg.Signatures = &signature.Policy{KeyDir: keyDir}
			m := startManager(t, cfg)
			var last firmware.Progress
		resume:
			for {
				select {
				case <-reboots:
					m.stop(t)
					m = startManager(t, cfg)
				case <-rec.wake:
					for _, p := range rec.list() {
						if p.Phase.Terminal() {
							last = p
							break resume
						}
					}
				case <-time.After(60 * time.Second):
					t.Fatalf("resumed update did not end; phases %v", rec.phases())
				}
			}
			if last.Phase != firmware.PhaseCompleted {
				t.Fatalf("resumed update ended %s %+v (child phases %v, parent %v)", last.Phase, last.Err, childPhases, rec.phases())
			}
			if got, _ := os.ReadFile(ab.slot("B")); !bytes.Equal(got, img) {
				t.Fatalf("slot B does not hold the image (%d bytes)", len(got))
			}
			if e := ab.env(); e.Committed != "B" || e.Running != "B" {
				t.Fatalf("env %+v", e)
			}
			if m.Status().CurrentVersion != "9.9" {
				t.Errorf("current version %q", m.Status().CurrentVersion)
			}

			ranges := srv.imageRanges(requestsBefore)
			var servedAfter int64
			for _, n := range srv.sentBy(requestsBefore) {
				servedAfter += n
			}
			t.Logf("killed at %s: child phases %v; checkpoint %d; resumed with requests %q, %d bytes served after the kill",
				at, childPhases, cp.Offset, ranges, servedAfter)
			switch {
			case at == "downloading:2500000":
				if cp.Offset <= 0 {
					t.Fatalf("no checkpoint before the kill")
				}
				if want := []string{fmt.Sprintf("bytes=%d-", cp.Offset)}; !slices.Equal(ranges, want) {
					t.Errorf("resume requests %q, want %q", ranges, want)
				}
				if servedAfter != int64(len(img))-cp.Offset {
					t.Errorf("served %d bytes after the kill, want %d (the rest after the checkpoint)", servedAfter, int64(len(img))-cp.Offset)
				}
			case at == "accepted" || at == "downloading":
				if servedAfter != int64(len(img)) {
					t.Errorf("served %d bytes after the kill, want the whole image once", servedAfter)
				}
			default:
				// Killed after the download: nothing is downloaded again.
				if len(ranges) != 0 {
					t.Errorf("downloaded again after a kill in %s: %q", at, ranges)
				}
			}
			// Killed before applying, the resumed run reads the whole image
			// back exactly once: a download resumed in the middle reads it
			// back from byte 0, not from the resume point (the read-back
			// keeps no state across a restart).
			switch at {
			case "accepted", "downloading", "downloading:2500000", "verifying":
				if n := ab.readBack.Load(); n != int64(len(img)) {
					t.Errorf("resumed run read back %d bytes, want the whole image once (%d)", n, len(img))
				}
			}
			// Apply may skip checking the stored image only when this run
			// read it back: killed before or during verifying, the resumed
			// run verifies and says so; killed between verifying and
			// applying, it must not.
			applies, readBack := ab.applies.Load(), ab.appliesReadBack.Load()
			switch at {
			case "accepted", "downloading", "downloading:2500000", "verifying":
				if applies != 1 || readBack != 1 {
					t.Errorf("resumed before applying: %d Apply calls, %d told ReadBackVerified; want 1 and 1", applies, readBack)
				}
			case "applying":
				if applies != 1 || readBack != 0 {
					t.Errorf("resumed in applying: %d Apply calls, %d told ReadBackVerified; want 1 and 0 (no read-back in this run)", applies, readBack)
				}
			}
		})
	}
}
