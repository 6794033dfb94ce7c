package abpart

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// These tests drive the installer with the real firmware state machine: an
// image served over loopback HTTP, slot files, a real grub-editenv or
// fw_setenv environment. A reboot stops the "agent" (its context is
// cancelled, as SIGTERM would), device.boot() plays the bootloader, and a new
// Manager with a new Installer resumes from the persisted state.

const agentWait = 30 * time.Second

// agent is one run of the state machine on the device, until it reboots the
// device or the update ends.
type agent struct {
	d      *device
	m      *firmware.Manager
	cancel context.CancelFunc
	done   chan error

	mu       sync.Mutex
	phases   []firmware.Phase
	final    *firmware.Progress
	adaptive *firmware.AdaptiveStatus // the latest Progress.Adaptive
	rebooted bool
}

func (d *device) startAgent(t *testing.T, health func(context.Context) error) *agent {
	t.Helper()
	a := &agent{d: d, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	reb := rebootFunc(func(context.Context) error {
		a.mu.Lock()
		a.rebooted = true
		a.mu.Unlock()
		cancel() // the shutdown stops the agent
		return nil
	})
	inst, err := New(d.config(), Deps{Env: d.env, Rebooter: reb})
	if err != nil {
		t.Fatal(err)
	}
	var fi firmware.Installer = inst
	if d.wrap != nil {
		fi = d.wrap(inst)
	}
	cfg := firmware.Config{
		StateDir:       filepath.Join(d.dir, "agent"),
		Installer:      fi,
		CurrentVersion: "1.0.0",
		HealthCheck:    health,
		Observer: func(p firmware.Progress) {
			a.mu.Lock()
			defer a.mu.Unlock()
			if n := len(a.phases); n == 0 || a.phases[n-1] != p.Phase {
				a.phases = append(a.phases, p.Phase)
			}
			if p.Adaptive != nil {
				a.adaptive = p.Adaptive
			}
			switch p.Phase {
			case firmware.PhaseCompleted, firmware.PhaseFailed, firmware.PhaseRolledBack:
				if p.Phase != firmware.PhaseRolledBack || p.Err != nil {
					pp := p
					a.final = &pp
				}
			}
		},
		RetryInitialInterval: 10 * time.Millisecond,
		RetryMaxInterval:     50 * time.Millisecond,
		RetryMaxElapsed:      time.Second,
		CheckpointBytes:      64 << 10,
		RebootTimeout:        agentWait,
	}
	if d.tune != nil {
		d.tune(&cfg)
	}
	a.m, err = firmware.NewManager(cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	go func() { a.done <- a.m.Run(ctx) }()
	t.Cleanup(func() { a.stop(t) })
	return a
}

type rebootFunc func(context.Context) error

func (f rebootFunc) Reboot(ctx context.Context) error { return f(ctx) }

// stop cancels the agent and waits for Run to return.
func (a *agent) stop(t *testing.T) {
	t.Helper()
	a.cancel()
	select {
	case err, ok := <-a.done:
		if ok && err != nil {
			t.Errorf("Run: %v", err)
		}
		if ok {
			close(a.done)
		}
	case <-time.After(agentWait):
		t.Fatal("the state machine did not stop")
	}
}

// waitRebootOrEnd waits until the agent rebooted the device (true) or the
// update ended without a reboot (false).
func (a *agent) waitRebootOrEnd(t *testing.T) bool {
	t.Helper()
	deadline := time.Now().Add(agentWait)
	for time.Now().Before(deadline) {
		a.mu.Lock()
		rebooted, ended := a.rebooted, a.final != nil
		a.mu.Unlock()
		// A rollback waiting for its reboot is not the end.
		ended = ended && !a.m.Status().Busy
		if rebooted {
			a.stop(t)
			return true
		}
		if ended {
			return false
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, not a retry
	}
	_, phases := a.result()
	t.Fatalf("no reboot and no end of the update within %s; phases %v", agentWait, phases)
	return false
}

func (a *agent) phasesNow() []firmware.Phase {
	_, p := a.result()
	return p
}

// result returns the final progress (nil if the update has not ended) and
// the phases seen.
func (a *agent) result() (*firmware.Progress, []firmware.Phase) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.final, append([]firmware.Phase(nil), a.phases...)
}

func serveImage(t *testing.T, data []byte) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "fw.img", time.Time{}, strings.NewReader(string(data)))
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/fw.img"
}

func request(url string, data []byte) firmware.Request {
	sum := sha256.Sum256(data)
	return firmware.Request{URI: url, Version: "2.0.0", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(data))}
}

func TestManagerUpdateCommit(t *testing.T) {
	for _, backend := range []string{"grub", "uboot-redundant"} {
		t.Run(backend, func(t *testing.T) {
			d := newDevice(t, backend)
			d.guard("A")
			data := randomBytes(t, 700<<10)
			a := d.startAgent(t, func(context.Context) error { return nil })
			if _, err := a.m.Start(request(serveImage(t, data), data)); err != nil {
				t.Fatal(err)
			}
			if !a.waitRebootOrEnd(t) {
				t.Fatalf("no reboot; %v", a.phasesNow())
			}
			if st := d.state(); st.Slot != "B" || !st.UpgradeAvailable || st.BootCount != 0 {
				t.Fatalf("environment at the reboot: %+v", st)
			}
			if d.boot() != "B" {
				t.Fatal("did not boot the trial slot")
			}
			a2 := d.startAgent(t, func(context.Context) error { return nil })
			if a2.waitRebootOrEnd(t) {
				t.Fatal("rebooted again after a good trial boot")
			}
			if final, phases := a2.result(); final == nil || final.Phase != firmware.PhaseCompleted || final.Slot != "B" {
				t.Fatalf("final %+v, phases %v", final, phases)
			}
			if st := d.state(); st.Slot != "B" || st.UpgradeAvailable {
				t.Fatalf("environment after commit: %+v", st)
			}
		})
	}
}

func TestManagerHealthFailure(t *testing.T) {
	d := newDevice(t, "grub")
	d.guard("A")
	data := randomBytes(t, 300<<10)
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(request(serveImage(t, data), data)); err != nil {
		t.Fatal(err)
	}
	if !a.waitRebootOrEnd(t) {
		t.Fatalf("no reboot; %v", a.phasesNow())
	}
	d.boot()
	unhealthy := errors.New("gateway service not active")
	a2 := d.startAgent(t, func(context.Context) error { return unhealthy })
	if !a2.waitRebootOrEnd(t) {
		t.Fatalf("no reboot for the rollback; %v", a2.phasesNow())
	}
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("environment before the rollback reboot: %+v", st)
	}
	if d.boot() != "A" {
		t.Fatal("did not boot the old slot")
	}
	a3 := d.startAgent(t, nil)
	if a3.waitRebootOrEnd(t) {
		t.Fatal("rebooted again after the rollback")
	}
	if final, phases := a3.result(); final == nil || final.Phase != firmware.PhaseRolledBack || final.Err == nil ||
		!strings.Contains(final.Err.Message, unhealthy.Error()) {
		t.Fatalf("final %+v, phases %v", final, phases)
	}
}

func TestManagerBootloaderFallback(t *testing.T) {
	d := newDevice(t, "uboot")
	d.guard("A")
	data := randomBytes(t, 200<<10)
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(request(serveImage(t, data), data)); err != nil {
		t.Fatal(err)
	}
	if !a.waitRebootOrEnd(t) {
		t.Fatalf("no reboot; %v", a.phasesNow())
	}
	for range bootenv.DefaultBootLimit {
		d.boot() // slot B never reaches the agent
	}
	if d.boot() != "A" {
		t.Fatal("the bootloader did not fall back")
	}
	a2 := d.startAgent(t, nil)
	if a2.waitRebootOrEnd(t) {
		t.Fatal("rebooted after the bootloader's fallback")
	}
	if final, phases := a2.result(); final == nil || final.Phase != firmware.PhaseFailed || final.Err == nil ||
		final.Err.Code != firmware.CodeBootloaderRollback || !strings.Contains(final.Err.Message, "rolled back by bootloader") {
		t.Fatalf("final %+v, phases %v", final, phases)
	}
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("environment: %+v", st)
	}
}

func TestManagerFailuresLeaveActiveSlot(t *testing.T) {
	cases := []struct {
		name string
		req  func(url string, data []byte) firmware.Request
		size int
		want string // in the failure message
	}{
		{"sha256 mismatch", func(url string, data []byte) firmware.Request {
			r := request(url, data)
			r.SHA256 = strings.Repeat("0", 64)
			return r
		}, 100 << 10, "sha256"},
		{"undeclared image larger than the slot", func(url string, data []byte) firmware.Request {
			r := request(url, data)
			r.Size, r.SHA256 = 0, ""
			return r
		}, slotSize + 4096, "larger than the slot"},
		{"404", func(url string, data []byte) firmware.Request {
			r := request(url+".missing", data)
			return r
		}, 1000, "404"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, "grub")
			d.guard("A")
			data := randomBytes(t, tc.size)
			url := serveImage(t, data)
			if tc.name == "404" {
				srv := httptest.NewServer(http.NotFoundHandler())
				t.Cleanup(srv.Close)
				url = srv.URL + "/fw.img"
			}
			a := d.startAgent(t, nil)
			if _, err := a.m.Start(tc.req(url, data)); err != nil {
				t.Fatal(err)
			}
			if a.waitRebootOrEnd(t) {
				t.Fatal("rebooted for a failed update")
			}
			if final, phases := a.result(); final == nil || final.Phase != firmware.PhaseFailed || !strings.Contains(final.Err.Message, tc.want) {
				t.Fatalf("final %+v, phases %v", final, phases)
			}
			if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
				t.Fatalf("environment changed: %+v", st)
			}
		})
	}

	// Declared too large: refused by Start (the method's 400).
	d := newDevice(t, "file")
	a := d.startAgent(t, nil)
	big := randomBytes(t, slotSize+1)
	if _, err := a.m.Start(request("http://127.0.0.1:1/fw.img", big)); !errors.Is(err, firmware.ErrInvalidRequest) || !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Start of an image larger than the slot = %v", err)
	}
}
