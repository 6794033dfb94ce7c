package agent

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/internal/testutil"
)

// scriptedSystemd answers the health check's systemd questions.
type scriptedSystemd struct {
	mu     sync.Mutex
	system string
	units  map[string]string
	asked  int
}

func (s *scriptedSystemd) SystemState(context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.asked++
	return s.system, nil
}

func (s *scriptedSystemd) UnitState(_ context.Context, u string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.units[u], nil
}

func (s *scriptedSystemd) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.asked
}

// trialDevice is an A/B gateway on files with a real grub-editenv
// environment, on its first boot of slot B after an update switched to it.
type trialDevice struct {
	dir, grubenv, cmdline, bootID, rebooted string
	section                                 string // the installer: section of the agent configuration
	updateID                                string
}

func newTrialDevice(t *testing.T) *trialDevice {
	t.Helper()
	if _, err := exec.LookPath("grub-editenv"); err != nil {
		t.Fatalf("grub-editenv is needed (apt-get install grub-common): %v", err)
	}
	dir := t.TempDir()
	d := &trialDevice{dir: dir, grubenv: filepath.Join(dir, "grubenv"), cmdline: filepath.Join(dir, "cmdline"),
		bootID: filepath.Join(dir, "boot_id"), rebooted: filepath.Join(dir, "rebooted")}
	for _, s := range []string{"slotA", "slotB"} {
		b := make([]byte, 1<<20)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, s), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	d.grub(t, "create")
	d.grub(t, "set", "gw_slot=A", "upgrade_available=0", "bootcount=0")
	d.boot(t, "A")
	d.section = fmt.Sprintf("installer:\n  type: abpart\n  abpart:\n    slotA: %s\n    slotB: %s\n    slotType: file\n    cmdlinePath: %s\n    bootIdPath: %s\n    rebootCommand: touch %s\n    bootenv:\n      backend: grub\n      grub:\n        envFile: %s\n",
		filepath.Join(dir, "slotA"), filepath.Join(dir, "slotB"), d.cmdline, d.bootID, d.rebooted, d.grubenv)
	return d
}

func (d *trialDevice) grub(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("grub-editenv", append([]string{d.grubenv}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("grub-editenv %v: %v: %s", args, err, out)
	}
	return string(out)
}

func (d *trialDevice) boot(t *testing.T, slot string) {
	t.Helper()
	if err := os.WriteFile(d.cmdline, []byte("ro gwagent.slot="+slot+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.bootID, []byte(uuid.NewString()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// update runs an update with the configured installer and the firmware
// state machine, as the agent does, up to the reboot; then the bootloader
// boots slot B on trial.
func (d *trialDevice) update(t *testing.T, e *env) {
	t.Helper()
	img := make([]byte, 200<<10)
	if _, err := rand.Read(img); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "fw.img", time.Time{}, strings.NewReader(string(img)))
	}))
	defer srv.Close()
	cfg := loadConfig(t, e.yaml(map[string]string{"installer": d.section}))
	built, err := installer.Build(cfg.Installer, installer.Deps{StateDir: cfg.StateDir, Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	m, err := firmware.NewManager(firmware.Config{StateDir: FirmwareStateDir(cfg.StateDir), Installer: built.Installer, CurrentVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(img)
	if d.updateID, err = m.Start(firmware.Request{URI: srv.URL + "/fw.img", Version: "2.0.0", SHA256: hex.EncodeToString(sum[:])}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	testutil.Eventually(t, wait, "the reboot request", func() bool { _, err := os.Stat(d.rebooted); return err == nil })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(d.rebooted); err != nil {
		t.Fatal(err)
	}
	d.grub(t, "set", "bootcount=1")
	d.boot(t, "B")
}

// The health verdict of a trial boot: the hub session back, the reported
// properties acknowledged, systemd running and the configured units active
// commit it; a unit that stays failed for update.healthTimeout rolls it
// back. Both outcomes come from the real agent, abpart and grub-editenv.
func TestTrialBootHealth(t *testing.T) {
	for _, tc := range []struct {
		name   string
		system string
		unit   string
	}{
		{"healthy", "running", "active"},
		{"unit failed", "degraded", "failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			d := newTrialDevice(t)
			d.update(t, e)
			rest := fmt.Sprintf("stateDir: %q\nshutdownTimeout: 3s\nupdate:\n  healthTimeout: 3s\n  healthSystemState: degraded\n  healthUnits: [app.service]\n", e.stateDir)
			cfg := loadConfig(t, e.yaml(map[string]string{"installer": d.section, "rest": rest}))
			sd := &scriptedSystemd{system: tc.system, units: map[string]string{"app.service": tc.unit}}
			r := start(t, cfg, func(o *Options) { o.Systemd = sd })

			if tc.unit == "active" {
				testutil.Eventually(t, wait, "completed on the twin", func() bool {
					fw, _ := e.reportedNow(t)["firmware"].(map[string]any)
					return fw["status"] == "completed"
				})
				if env := d.grub(t, "list"); !strings.Contains(env, "gw_slot=B") || !strings.Contains(env, "upgrade_available=0") {
					t.Fatalf("environment after the commit:\n%s", env)
				}
				if sd.count() == 0 {
					t.Fatal("systemd was never asked")
				}
				return
			}
			testutil.Eventually(t, wait, "the rollback's reboot", func() bool { _, err := os.Stat(d.rebooted); return err == nil })
			if env := d.grub(t, "list"); !strings.Contains(env, "gw_slot=A") || !strings.Contains(env, "upgrade_available=0") {
				t.Fatalf("environment after the rollback:\n%s", env)
			}
			if err := r.stop(t); err != nil {
				t.Fatal(err)
			}
			built, err := installer.Build(cfg.Installer, installer.Deps{StateDir: cfg.StateDir, Log: zap.NewNop()})
			if err != nil {
				t.Fatal(err)
			}
			m, err := firmware.NewManager(firmware.Config{StateDir: FirmwareStateDir(cfg.StateDir), Installer: built.Installer})
			if err != nil {
				t.Fatal(err)
			}
			// The rollback waits for its reboot: recorded as rollingBack,
			// finished by the next start.
			p := m.Status().Progress
			if p.UpdateID != d.updateID || p.Phase != firmware.PhaseRollingBack || p.Err == nil || p.Err.Code != firmware.CodeHealth ||
				!strings.Contains(p.Err.Message, "app.service is failed") {
				t.Fatalf("persisted update after the failed health check: %+v (error %+v)", p, p.Err)
			}
		})
	}
}
