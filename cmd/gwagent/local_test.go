package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

const testConn = "HostName=hub.example.net;DeviceId=gw-01;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

// abDevice is an A/B gateway on files: two slot files, a kernel command
// line, a boot id, a real grub-editenv environment and a reboot command
// that only leaves a mark.
type abDevice struct {
	t                        *testing.T
	dir, cfgFile, stateDir   string
	cmdline, bootID, grubenv string
	rebooted                 string
	slotA                    []byte
}

func newABDevice(t *testing.T) *abDevice {
	t.Helper()
	if _, err := exec.LookPath("grub-editenv"); err != nil {
		t.Fatalf("grub-editenv is needed (apt-get install grub-common): %v", err)
	}
	dir := t.TempDir()
	d := &abDevice{t: t, dir: dir, stateDir: filepath.Join(dir, "state"), cmdline: filepath.Join(dir, "cmdline"),
		bootID: filepath.Join(dir, "boot_id"), grubenv: filepath.Join(dir, "grubenv"), rebooted: filepath.Join(dir, "rebooted")}
	// systemd creates the state directory (StateDirectory=).
	if err := os.Mkdir(d.stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	d.slotA = randomBytes(t, 1<<20)
	if err := os.WriteFile(filepath.Join(dir, "slotA"), d.slotA, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "slotB"), randomBytes(t, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	d.grub("create")
	d.grub("set", "gw_slot=A", "upgrade_available=0", "bootcount=0")
	d.boot("A")
	d.cfgFile = filepath.Join(dir, "gwagent.yaml")
	// The secrets file is missing: gwagent run takes the connection string
	// from GWAGENT_HUB_CONNECTIONSTRING, the local commands need none.
	cfg := fmt.Sprintf(`hub:
  connectionStringFile: %s
  address: 127.0.0.1:1
stateDir: %s
currentVersion: 1.0.0
installer:
  type: abpart
  abpart:
    slotA: %s
    slotB: %s
    slotType: file
    cmdlinePath: %s
    bootIdPath: %s
    rebootCommand: touch %s
    bootenv:
      backend: grub
      grub:
        envFile: %s
`, filepath.Join(dir, "missing-secret"), d.stateDir, filepath.Join(dir, "slotA"), filepath.Join(dir, "slotB"), d.cmdline, d.bootID, d.rebooted, d.grubenv)
	if err := os.WriteFile(d.cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if b, _ := os.ReadFile(filepath.Join(dir, "slotA")); string(b) != string(d.slotA) {
			t.Error("slot A (the active slot) was modified")
		}
	})
	return d
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func (d *abDevice) grub(args ...string) string {
	d.t.Helper()
	out, err := exec.Command("grub-editenv", append([]string{d.grubenv}, args...)...).CombinedOutput()
	if err != nil {
		d.t.Fatalf("grub-editenv %v: %v: %s", args, err, out)
	}
	return string(out)
}

// boot plays a power-on into slot.
func (d *abDevice) boot(slot string) {
	d.t.Helper()
	if err := os.WriteFile(d.cmdline, []byte("root=/dev/x ro gwagent.slot="+slot+"\n"), 0o600); err != nil {
		d.t.Fatal(err)
	}
	if err := os.WriteFile(d.bootID, []byte(uuid.NewString()+"\n"), 0o600); err != nil {
		d.t.Fatal(err)
	}
}

// trialBoot runs an update with the agent's own state machine and installer
// (as gwagent run builds them) until it asks for the reboot, then plays the
// bootloader: slot B boots on trial. The persisted update is then in its
// rebooting phase; the next agent resumes it into committing.
func (d *abDevice) trialBoot() string {
	t := d.t
	t.Helper()
	img := randomBytes(t, 300<<10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "fw.img", time.Time{}, strings.NewReader(string(img)))
	}))
	defer srv.Close()
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", testConn)
	cfg, err := config.Load(config.Options{File: d.cfgFile, Backends: installer.Specs()})
	if err != nil {
		t.Fatal(err)
	}
	built, err := installer.Build(cfg.Installer, installer.Deps{StateDir: cfg.StateDir, Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	m, err := firmware.NewManager(firmware.Config{StateDir: agent.FirmwareStateDir(cfg.StateDir), Installer: built.Installer, CurrentVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(img)
	id, err := m.Start(firmware.Request{URI: srv.URL + "/fw.img", Version: "2.0.0", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(img))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	testutil.Eventually(t, 30*time.Second, "the reboot request", func() bool { _, err := os.Stat(d.rebooted); return err == nil })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(d.rebooted); err != nil {
		t.Fatal(err)
	}
	d.grub("set", "bootcount=1") // the bootloader counts the trial boot
	d.boot("B")
	return id
}

func (d *abDevice) status(t *testing.T) statusReport {
	t.Helper()
	out, err := execute(context.Background(), "status", "-o", "json", "--config", d.cfgFile)
	if err != nil {
		t.Fatalf("status: %v: %s", err, out)
	}
	var r statusReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("status output: %v: %s", err, out)
	}
	return r
}

// startAgent runs `gwagent run` with the device's configuration. The hub is
// unreachable, so the health check waits for a verdict.
func (d *abDevice) startAgent(t *testing.T) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := execute(ctx, "run", "--config", d.cfgFile, "--log-format", "json", "--log-level", "error")
		done <- err
	}()
	stop := func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("run did not stop")
		}
	}
	t.Cleanup(func() {
		select {
		case <-ctx.Done():
		default:
			stop()
		}
	})
	return stop
}

// A person at the device commits or rolls back a trial boot through the
// running agent; status shows the device before and after, with the agent
// running and stopped.
func TestLocalControlTrialBoot(t *testing.T) {
	for _, op := range []string{"commit", "rollback"} {
		t.Run(op, func(t *testing.T) {
			d := newABDevice(t)
			t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", testConn)

			// Stopped agent, no update yet.
			if r := d.status(t); r.Agent.Running || r.Update.Phase != "idle" || r.RunningSlot != "A" || r.CommittedSlot != "A" ||
				r.RunningVersion != "1.0.0" || len(r.Slots) != 2 || r.Bootloader == nil || r.Bootloader.Slot != "A" {
				t.Fatalf("status before the update: %+v", r)
			}
			_, err := execute(context.Background(), op, "--config", d.cfgFile)
			if err == nil || !strings.Contains(err.Error(), "the agent is not running") || !strings.Contains(err.Error(), "systemctl start gwagent") {
				t.Fatalf("%s with the agent stopped: %v", op, err)
			}

			id := d.trialBoot()
			stop := d.startAgent(t)
			var r statusReport
			testutil.Eventually(t, 30*time.Second, "the agent in the committing phase", func() bool {
				r = d.status(t)
				return r.Agent.Running && r.Update.Phase == "committing"
			})
			if r.Update.ID != id || r.RunningSlot != "B" || r.TrialSlot != "B" || r.CommittedSlot != "A" ||
				r.RunningVersion != "2.0.0" || r.CommittedVersion != "1.0.0" || !strings.Contains(r.LastResult, "trial boot") {
				t.Fatalf("status on the trial boot: %+v", r)
			}
			text, err := execute(context.Background(), "status", "--config", d.cfgFile)
			if err != nil || !strings.Contains(text, "running (pid") || !strings.Contains(text, "trial") || !strings.Contains(text, id) {
				t.Fatalf("text status: %v\n%s", err, text)
			}

			// The record says committing a moment before the health check
			// waits for a verdict; the agent then says to try again.
			var out string
			testutil.Eventually(t, 30*time.Second, "the agent waiting for a verdict", func() bool {
				out, err = execute(context.Background(), op, "--config", d.cfgFile, "--wait", "30s")
				return err == nil || !strings.Contains(err.Error(), "not waiting for a verdict right now")
			})
			if err != nil {
				t.Fatalf("%s: %v\n%s", op, err, out)
			}
			t.Logf("gwagent %s:\n%s", op, out)
			if op == "rollback" {
				// The record says rollingBack before the bootloader is
				// switched back; the reboot comes after the switch.
				testutil.Eventually(t, 30*time.Second, "the reboot that finishes the rollback", func() bool { _, err := os.Stat(d.rebooted); return err == nil })
			}
			env := d.grub("list")
			switch op {
			case "commit":
				if !strings.Contains(out, "update "+id+": completed") {
					t.Fatalf("commit output: %s", out)
				}
				if !strings.Contains(env, "gw_slot=B") || !strings.Contains(env, "upgrade_available=0") {
					t.Fatalf("environment after commit:\n%s", env)
				}
			case "rollback":
				// The rollback ends after the reboot it needs: until then
				// the update is rollingBack.
				if !strings.Contains(out, "update "+id+": rollingBack") {
					t.Fatalf("rollback output: %s", out)
				}
				if !strings.Contains(env, "gw_slot=A") || !strings.Contains(env, "upgrade_available=0") {
					t.Fatalf("environment after rollback:\n%s", env)
				}
			}
			// A second verdict has nothing left to decide.
			if _, err := execute(context.Background(), op, "--config", d.cfgFile); err == nil ||
				!strings.Contains(err.Error(), "no trial boot") && !strings.Contains(err.Error(), "not waiting for a verdict") {
				t.Fatalf("second %s: %v", op, err)
			}
			stop()

			r = d.status(t)
			if r.Agent.Running {
				t.Fatalf("status after the stop: %+v", r)
			}
			switch op {
			case "commit":
				if r.Update.Phase != "completed" || r.LastResult != "completed" || r.CommittedSlot != "B" || r.RunningVersion != "2.0.0" {
					t.Fatalf("status after commit: %+v", r)
				}
			case "rollback":
				// The reboot that finishes the rollback has not happened
				// (the test's reboot command only leaves a file behind).
				if r.Update.Phase != "rollingBack" || r.Error == nil || r.Error.Code != firmware.CodeHealth ||
					!strings.Contains(r.Error.Message, "rollback requested by the operator") || r.CommittedSlot != "A" {
					t.Fatalf("status after rollback: %+v (error %+v)", r, r.Error)
				}
			}
		})
	}
}

// With the simulated installer there is no trial boot: the running agent
// says so.
func TestLocalControlSimulated(t *testing.T) {
	state := t.TempDir()
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", testConn)
	t.Setenv("GWAGENT_HUB_ADDRESS", "127.0.0.1:1")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := execute(ctx, "run", "--config", "../../configs/dev.yaml", "--state-dir", state, "--log-level", "error", "--log-format", "json")
		done <- err
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var out string
	testutil.Eventually(t, 30*time.Second, "the agent's control socket", func() bool {
		var err error
		out, err = execute(context.Background(), "status", "--config", "../../configs/dev.yaml", "--state-dir", state)
		return err == nil && strings.Contains(out, "running (pid")
	})
	if !strings.Contains(out, "installer:") || !strings.Contains(out, "simulated (writes nothing to the device: for demos and labs)\n") ||
		!strings.Contains(out, "none (no update has run)") {
		t.Fatalf("status:\n%s", out)
	}
	// The running agent says which installer it runs with: once the
	// configuration names another, status says the agent still uses the
	// simulated one.
	out, err := execute(context.Background(), "status", "-o", "json", "--config", "../../configs/dev.yaml", "--state-dir", state, "--installer", "abpart")
	if err != nil {
		t.Fatal(err)
	}
	var js struct {
		Agent struct {
			Installer string `json:"installer"`
		} `json:"agent"`
		Installer string `json:"installer"`
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil || js.Agent.Installer != "simulated" || js.Installer != "abpart" {
		t.Fatalf("status -o json (%v):\n%s", err, out)
	}
	out, _ = execute(context.Background(), "status", "--config", "../../configs/dev.yaml", "--state-dir", state, "--installer", "abpart")
	if !strings.Contains(out, "abpart; the running agent uses simulated until it is restarted\n") {
		t.Fatalf("status with the configuration changed:\n%s", out)
	}
	for _, op := range []string{"commit", "rollback"} {
		_, err := execute(context.Background(), op, "--config", "../../configs/dev.yaml", "--state-dir", state)
		if err == nil || !strings.Contains(err.Error(), "the simulated installer has no trial boot") {
			t.Errorf("%s: %v", op, err)
		}
	}
	if _, err := execute(context.Background(), "status", "-o", "yaml", "--state-dir", state); err == nil {
		t.Error("status -o yaml accepted")
	}
}

// treeState is every path under dir with its mode, size, modification time
// and, for a file, a hash of its content: two equal states mean nothing was
// created, removed, renamed or written.
func treeState(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := de.Info()
		if err != nil {
			return err
		}
		v := fmt.Sprintf("%v %d %d", fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			v += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		out[p] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameTree(t *testing.T, what string, before, after map[string]string) {
	t.Helper()
	for p, v := range before {
		if after[p] != v {
			t.Errorf("%s: %s changed: %q → %q", what, p, v, after[p])
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s: %s was created", what, p)
		}
	}
}

// status reads the device with no connection string anywhere (the secrets
// file named in the configuration does not exist) and writes nothing: not
// before the agent ever ran, not in the middle of an update, not over a
// record of a format it does not know.
func TestStatusReadOnlyWithoutConnectionString(t *testing.T) {
	d := newABDevice(t)
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", "")
	if _, err := execute(context.Background(), "run", "--config", d.cfgFile); err == nil || !strings.Contains(err.Error(), "hub.connectionStringFile") {
		t.Fatalf("the daemon without its secret: %v", err)
	}
	status := func(what string) statusReport {
		t.Helper()
		before := treeState(t, d.dir)
		r := d.status(t)
		text, err := execute(context.Background(), "status", "--config", d.cfgFile)
		if err != nil {
			t.Fatalf("%s: text status: %v", what, err)
		}
		sameTree(t, what, before, treeState(t, d.dir))
		t.Logf("%s:\n%s", what, text)
		return r
	}

	// The agent never ran: no state folder, and status makes none.
	if err := os.Remove(d.stateDir); err != nil {
		t.Fatal(err)
	}
	r := status("never ran")
	if r.Agent.Running || r.Update.Phase != "idle" || !strings.Contains(r.LastResult, "has not run") ||
		r.RunningSlot != "A" || r.CommittedSlot != "A" || len(r.Slots) != 2 || r.Bootloader == nil || r.RunningVersion != "1.0.0" {
		t.Fatalf("status before the agent ran: %+v", r)
	}

	// In the middle of an update: the record says rebooting, slot B runs
	// on trial.
	if err := os.Mkdir(d.stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", testConn) // for the update's own config load
	id := d.trialBoot()
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", "")
	r = status("trial boot")
	if r.Update.ID != id || !r.Update.Busy || r.Update.Phase != "rebooting" || r.RunningSlot != "B" || r.TrialSlot != "B" ||
		r.CommittedSlot != "A" || r.Bootloader.BootCount != 1 || r.SlotError != "" {
		t.Fatalf("status on the trial boot: %+v", r)
	}

	// A record written by a newer agent: shown as unknown, left in place
	// (the agent sets it aside when it starts, status does not).
	rec := filepath.Join(agent.FirmwareStateDir(d.stateDir), "update.json")
	if err := os.WriteFile(rec, []byte(`{"format":99,"updateId":"from-the-future","phase":"teleporting"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	r = status("unknown record format")
	if r.Update.Phase != "idle" || r.Update.ID != "" {
		t.Fatalf("status over an unknown record: %+v", r)
	}
	if _, err := os.Stat(rec); err != nil {
		t.Fatalf("the record was moved: %v", err)
	}
}

// With the agent running against a hub, status shows the hub connection
// as the agent sees it: connected, then offline with the reason.
func TestStatusShowsHubConnection(t *testing.T) {
	h, err := hub.New(hub.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	cs, err := h.CreateDevice("gw-status")
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := iothub.ParseConnectionString(cs)
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	// A retry delay long enough to see "retrying in" between attempts.
	t.Setenv("GWAGENT_HUB_MINRETRYDELAY", "3s")
	t.Setenv("GWAGENT_HUB_MAXRETRYDELAY", "5s")
	args := []string{"--config", "../../configs/dev.yaml", "--state-dir", state}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	// The connection string only for the daemon, from its secrets file.
	secret := filepath.Join(t.TempDir(), "connection-string")
	if err := os.WriteFile(secret, []byte(cs), 0o600); err != nil {
		t.Fatal(err)
	}
	go func() {
		_, err := execute(ctx, append([]string{"run", "--connection-string-file", secret, "--ca-file", h.CAFile(), "--hub-address", h.MQTTAddr(),
			"--log-format", "json", "--log-level", "error"}, args...)...)
		done <- err
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	status := func() statusReport {
		t.Helper()
		out, err := execute(context.Background(), append([]string{"status", "-o", "json"}, args...)...)
		if err != nil {
			t.Fatalf("status: %v: %s", err, out)
		}
		var r statusReport
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("status output: %v: %s", err, out)
		}
		return r
	}
	var r statusReport
	testutil.Eventually(t, 30*time.Second, "status: connected", func() bool {
		r = status()
		return r.Agent.Hub != nil && r.Agent.Hub.Connected
	})
	if hs := r.Agent.Hub; !r.Agent.Running || r.Agent.PID != os.Getpid() || hs.Host != parsed.HostName || hs.State != "connected to "+parsed.HostName || r.Agent.Error != "" {
		t.Fatalf("status while connected: %+v, hub %+v", r.Agent, hs)
	}
	text, err := execute(context.Background(), append([]string{"status"}, args...)...)
	if err != nil || !strings.Contains(text, "hub:") || !strings.Contains(text, "connected to "+parsed.HostName) {
		t.Fatalf("text status while connected: %v\n%s", err, text)
	}

	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "status: offline, retrying", func() bool {
		r = status()
		hs := r.Agent.Hub
		return hs != nil && !hs.Connected && strings.HasPrefix(hs.State, "offline, retrying in") && hs.LastError != ""
	})
	text, err = execute(context.Background(), append([]string{"status"}, args...)...)
	if err != nil || !strings.Contains(text, "hub:") || !strings.Contains(text, "last hub error:") {
		t.Fatalf("text status while offline: %v\n%s", err, text)
	}
	t.Logf("offline:\n%s", text)
}
