package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/firmware/simulated"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/twin"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func field(m map[string]any, path ...string) any {
	var v any = m
	for _, p := range path {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[p]
	}
	return v
}

func decodeBody(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("body %s: %v", b, err)
	}
	return m
}

// The tutorial's flow through the local hub: methods answered at once with
// the contract's statuses, the update reported phase by phase to completed.
func TestFirmwareUpdateThroughHub(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, wait, "connected and standBy reported", func() bool {
		rep := e.reportedNow(t)
		return r.Session().Health().Connected && rep["firmwareStatus"] == "standBy" && field(rep, "firmware", "currentVersion") == "1.0.0"
	})
	if rep := e.reportedNow(t); rep["logTime"] == nil || field(rep, "agent", "installer") != "simulated" {
		t.Fatalf("start-up report %v", rep)
	}

	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"test.com/fw.bin","version":"1.2.0"}`)
	body := decodeBody(t, res.Payload)
	id, _ := body["updateId"].(string)
	if res.Status != 200 || body["status"] != "accepted" || id == "" {
		t.Fatalf("firmwareUpdate = %d %s", res.Status, res.Payload)
	}
	tests := []struct {
		name, method, payload string
		status                int
		want                  map[string]any
	}{
		{"busy", "firmwareUpdate", `{"fwPackageUri":"test.com/other.bin"}`, 409, map[string]any{"error": "busy", "updateId": id}},
		{"reboot while busy", "reboot", ``, 409, map[string]any{"error": "busy", "updateId": id}},
		{"unknown method", "selfDestruct", `{}`, 404, map[string]any{"error": "unknown method selfDestruct"}},
	}
	for _, tc := range tests {
		res := e.invoke(t, tc.method, tc.payload)
		got := decodeBody(t, res.Payload)
		if res.Status != tc.status || fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: %d %s, want %d %v", tc.name, res.Status, res.Payload, tc.status, tc.want)
		}
	}
	for _, bad := range []string{`{}`, `"test.com"`, `{"fwPackageUri":"https://x/y","sha256":"zz"}`, `{"fwPackageUri":"https://x/y","size":"big"}`} {
		res := e.invoke(t, "firmwareUpdate", bad)
		got := decodeBody(t, res.Payload)
		msg, _ := got["error"].(string)
		if res.Status != 400 || msg == "" || strings.HasPrefix(msg, "firmware:") {
			t.Errorf("payload %s: %d %s, want 400 with a reason", bad, res.Status, res.Payload)
		}
	}

	testutil.Eventually(t, wait, "completed", func() bool {
		st := e.statuses()
		return e.reportedNow(t)["firmwareStatus"] == "completed" && st[len(st)-1] == "completed"
	})
	rep := e.reportedNow(t)
	for _, k := range []string{"downloadComplete", "startedApplyingImage", "lastFirmwareUpdate", "logTime"} {
		if _, err := time.Parse(time.RFC3339, fmt.Sprint(rep[k])); err != nil {
			t.Errorf("%s = %v: %v", k, rep[k], err)
		}
	}
	fw := rep["firmware"].(map[string]any)
	if fw["updateId"] != id || fw["currentVersion"] != "1.2.0" || fw["targetVersion"] != "1.2.0" || fw["error"] != nil {
		t.Errorf("firmware = %v", fw)
	}
	if _, ok := fw["bytes"]; ok {
		t.Errorf("bytes still reported after completion: %v", fw)
	}
	want := []string{"standBy", "downloading", "verifying", "applying", "completed"}
	if got := e.statuses(); !slices.Equal(got, want) {
		t.Errorf("reported statuses %v, want %v", got, want)
	}
	sawProgress := false
	for _, p := range e.patches() {
		if pct, ok := field(p, "firmware", "percent").(json.Number); ok && field(p, "firmware", "status") == "downloading" && pct != "0" && pct != "100" {
			sawProgress = true
		}
	}
	if !sawProgress {
		t.Error("no intermediate download progress reported")
	}
	if !r.notifier.has("STATUS=connected to localhost; idle") {
		t.Errorf("status lines %q", r.notifier.all())
	}
	if !r.notifier.has("STATUS=connected to localhost; downloading") {
		t.Errorf("no downloading status line in %q", r.notifier.all())
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if n := r.notifier.all(); n[0] != "READY=1" || !slices.Contains(n, "STOPPING=1") {
		t.Errorf("notifications %q", n)
	}
}

// A real download over HTTP: the hash is checked, a mismatch and a missing
// image end in failed with a code, and the agent takes the next update.
func TestFirmwareUpdateHTTP(t *testing.T) {
	image := bytes.Repeat([]byte("gwagent firmware image\n"), 20000)
	sum := sha256.Sum256(image)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/fw.bin" {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "fw.bin", time.Time{}, bytes.NewReader(image))
	}))
	defer srv.Close()

	e := newEnv(t)
	start(t, loadConfig(t, e.yaml(nil)))
	tests := []struct {
		name, payload, status, code string
	}{
		{"good", fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0","sha256":%q,"size":%d}`, srv.URL+"/fw.bin", hex.EncodeToString(sum[:]), len(image)), "completed", ""},
		{"bad hash", fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.1","sha256":%q}`, srv.URL+"/fw.bin", strings.Repeat("ab", 32)), "failed", "verifyFailed"},
		{"missing", fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.2"}`, srv.URL+"/nope.bin"), "failed", "downloadFailed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := e.invoke(t, "firmwareUpdate", tc.payload)
			if res.Status != 200 {
				t.Fatalf("%d %s", res.Status, res.Payload)
			}
			id := decodeBody(t, res.Payload)["updateId"]
			testutil.Eventually(t, wait, tc.status, func() bool {
				rep := e.reportedNow(t)
				return field(rep, "firmware", "updateId") == id && rep["firmwareStatus"] == tc.status
			})
			rep := e.reportedNow(t)
			if code := field(rep, "firmware", "error", "code"); tc.code != "" && code != tc.code {
				t.Fatalf("error %v, want code %s", field(rep, "firmware", "error"), tc.code)
			}
			if tc.code == "" && field(rep, "firmware", "currentVersion") != "2.0.0" {
				t.Fatalf("firmware %v", rep["firmware"])
			}
		})
	}
}

// reboot answers first, reports lastReboot, then calls the installer's
// reboot seam.
func TestRebootMethod(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	inst, err := simulated.New(simulated.Config{InitialVersion: "1.0.0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	reb := simulated.NewRebooter(nil)
	start(t, cfg, func(o *Options) { o.Installer = &installer.Built{Installer: inst, Rebooter: reb} })
	res := e.invoke(t, "reboot", ``)
	if res.Status != 200 || string(res.Payload) != `{"status":"rebooting"}` {
		t.Fatalf("reboot = %d %s", res.Status, res.Payload)
	}
	testutil.Eventually(t, wait, "lastReboot on the twin and the reboot", func() bool {
		return field(e.reportedNow(t), "iothubDM", "reboot", "lastReboot") != nil && !reb.LastReboot().IsZero()
	})
	last, err := time.Parse(time.RFC3339, fmt.Sprint(field(e.reportedNow(t), "iothubDM", "reboot", "lastReboot")))
	if err != nil || reb.LastReboot().Before(last) {
		t.Fatalf("lastReboot %v (%v), rebooted at %v: the report must come first", last, err, reb.LastReboot())
	}
	// A second reboot is taken once the first is done.
	testutil.Eventually(t, wait, "a second reboot accepted", func() bool { return e.invoke(t, "reboot", ``).Status == 200 })
}

// Desired logLevel changes the running level and is acknowledged; unknown
// keys get 400 in the one unknownDesired acknowledgement; a change made
// while the agent is stopped is applied by the twin GET of the next start.
func TestDesiredProperties(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	r := start(t, cfg)
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	v, err := e.UpdateDesired(deviceID, map[string]any{"logLevel": "debug", "colour": "blue"})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "logLevel acknowledged", func() bool {
		rep := e.reportedNow(t)
		return fmt.Sprint(field(rep, "logLevel", "av")) == fmt.Sprint(v) && fmt.Sprint(field(rep, "unknownDesired", "av")) == fmt.Sprint(v)
	})
	rep := e.reportedNow(t)
	if field(rep, "logLevel", "value") != "debug" || fmt.Sprint(field(rep, "logLevel", "ac")) != "200" || r.level.Level() != zap.DebugLevel {
		t.Fatalf("logLevel %v, level %v", rep["logLevel"], r.level.Level())
	}
	if fmt.Sprint(field(rep, "unknownDesired", "ac")) != "400" || fmt.Sprint(field(rep, "unknownDesired", "keys")) != "[colour]" ||
		fmt.Sprint(field(rep, "unknownDesired", "count")) != "1" || rep["colour"] != nil {
		t.Fatalf("unknownDesired %v, colour %v", rep["unknownDesired"], rep["colour"])
	}
	if _, err := e.UpdateDesired(deviceID, map[string]any{"logLevel": "shout"}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "refusal", func() bool { return fmt.Sprint(field(e.reportedNow(t), "logLevel", "ac")) == "400" })
	if r.level.Level() != zap.DebugLevel || field(e.reportedNow(t), "logLevel", "value") != "debug" {
		t.Fatal("a refused value changed the level")
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	v2, err := e.UpdateDesired(deviceID, map[string]any{"logLevel": "error", "colour": nil})
	if err != nil {
		t.Fatal(err)
	}
	r2 := start(t, cfg)
	testutil.Eventually(t, wait, "the change made while stopped", func() bool {
		return fmt.Sprint(field(e.reportedNow(t), "logLevel", "av")) == fmt.Sprint(v2)
	})
	if r2.level.Level() != zap.ErrorLevel {
		t.Fatalf("level %v", r2.level.Level())
	}
	testutil.Eventually(t, wait, "unknownDesired withdrawn", func() bool { _, ok := e.reportedNow(t)["unknownDesired"]; return !ok })
}

// Under systemd: READY=1 comes with the hub unreachable, STATUS says so,
// the watchdog is fed, STOPPING=1 at the end. Uses a real notify socket.
func TestSystemdNotifySocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sockPath := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sockPath)
	t.Setenv("WATCHDOG_USEC", "300000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))

	got := make(chan string, 256)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(got)
				return
			}
			got <- string(buf[:n])
		}
	}()

	e := newEnv(t)
	hubSection := fmt.Sprintf("hub:\n  connectionString: %q\n  address: 127.0.0.1:1\n  caFile: %q\n  minRetryDelay: 2s\n  maxRetryDelay: 4s\n", e.conn, e.CAFile())
	cfg := loadConfig(t, e.yaml(map[string]string{"hub": hubSection}))
	begin := time.Now()
	r := start(t, cfg, func(o *Options) { o.Notifier = Systemd{} })

	var states []string
	next := func(what string, match func(string) bool) {
		t.Helper()
		deadline := time.After(wait)
		for {
			select {
			case s := <-got:
				states = append(states, s)
				if match(s) {
					return
				}
			case <-deadline:
				t.Fatalf("no %s in %q", what, states)
			}
		}
	}
	next("READY=1", func(s string) bool { return s == "READY=1" })
	t.Logf("start to READY=1: %v (hub unreachable)", time.Since(begin))
	next("offline status", func(s string) bool {
		// The cause of the failed attempt is on the line, not only in the journal.
		ok := strings.HasPrefix(s, "STATUS=offline, retrying in ") && strings.Contains(s, " (connect to ") &&
			strings.HasSuffix(s, "; idle; installer simulated (writes nothing to the device)")
		if ok {
			t.Log(s)
		}
		return ok
	})
	next("watchdog ping", func(s string) bool { return s == "WATCHDOG=1" })
	next("second watchdog ping", func(s string) bool { return s == "WATCHDOG=1" })
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	next("STOPPING=1", func(s string) bool { return s == "STOPPING=1" })
}

// A wedged loop stops the watchdog pings; they resume when it recovers.
func TestWatchdogFollowsHealth(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	var refusals atomic.Int32 // the watchdog's failed health checks, from its log
	r := start(t, cfg, func(o *Options) {
		o.Notifier = &recNotifier{interval: 200 * time.Millisecond}
		o.Log = o.Log.WithOptions(zap.Hooks(func(e zapcore.Entry) error {
			if strings.HasPrefix(e.Message, "health check failed: not feeding the watchdog") {
				refusals.Add(1)
			}
			return nil
		}))
	})
	n := r.notifier
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	testutil.Eventually(t, wait, "pings", func() bool { return n.count("WATCHDOG=1") >= 3 })

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := r.Healthy(ctx, time.Second); err != nil {
		t.Fatalf("healthy agent: %v", err)
	}
	release := make(chan struct{})
	n.mu.Lock()
	n.wedge = release
	n.mu.Unlock()
	// A new status line (the hub drops the device) wedges the status loop.
	e.Kick(deviceID)
	testutil.Eventually(t, wait, "unhealthy", func() bool { return r.Healthy(context.Background(), 100*time.Millisecond) != nil })
	// No sleep: the watchdog's own failed checks are the clock. After three
	// of them, at most the one ping already under way may have landed.
	before := n.count("WATCHDOG=1")
	failedBefore := refusals.Load()
	testutil.Eventually(t, wait, "three failed health checks", func() bool { return refusals.Load() >= failedBefore+3 })
	if after := n.count("WATCHDOG=1"); after > before+1 {
		t.Fatalf("watchdog fed %d times while wedged", after-before)
	}
	n.mu.Lock()
	n.wedge = nil
	n.mu.Unlock()
	close(release)
	testutil.Eventually(t, wait, "pings again", func() bool { return n.count("WATCHDOG=1") >= before+3 })
}

// The graceful stop flushes what can be delivered; what cannot is kept on
// disk and delivered by the next start.
func TestGracefulStop(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))

	r := start(t, cfg)
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	if err := r.queue.Report(map[string]any{"flushedAtStop": 1}, false); err != nil {
		t.Fatal(err)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if e.reportedNow(t)["flushedAtStop"] == nil {
		t.Fatal("stop did not flush the queue")
	}

	r2 := start(t, cfg)
	testutil.Eventually(t, wait, "connected", func() bool { return r2.Session().Health().Connected })
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "offline", func() bool { return !r2.Session().Health().Connected })
	if err := r2.queue.Report(map[string]any{"keptAcrossStop": 2}, true); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(began); took > cfg.ShutdownTimeout+3*time.Second {
		t.Fatalf("stop took %v with shutdownTimeout %v", took, cfg.ShutdownTimeout)
	}
	q, err := twin.OpenQueue(twin.QueueOptions{Dir: filepath.Join(cfg.StateDir, queueDir)}, offline{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if q.Len() == 0 {
		t.Fatal("undelivered patch lost at stop")
	}
	_ = q.Close()

	e.startHub(t)
	r3 := start(t, cfg)
	testutil.Eventually(t, wait, "the kept patch delivered", func() bool { return e.reportedNow(t)["keptAcrossStop"] != nil })
	_ = r3
}

func TestReload(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	r := start(t, cfg)
	next := loadConfig(t, e.yaml(map[string]string{
		"log":    "log:\n  level: debug\n  format: console\n",
		"report": "report:\n  minInterval: 1s\n  minPercentStep: 20\n",
		"hub": fmt.Sprintf("hub:\n  connectionString: %q\n  address: %q\n  caFile: %q\n  keepAlive: 60s\n  connectTimeout: 5s\n  requestTimeout: 5s\n  minRetryDelay: 50ms\n  maxRetryDelay: 500ms\n",
			e.conn, e.addr, e.CAFile()),
	}))
	applied, restart := r.Reload(next)
	if !slices.Equal(applied, []string{"log.level", "report"}) || !slices.Equal(restart, []string{"hub.keepAlive"}) {
		t.Fatalf("Reload = %v, %v", applied, restart)
	}
	if r.level.Level() != zap.DebugLevel {
		t.Fatalf("level %v", r.level.Level())
	}
	applied, restart = r.Reload(next)
	if len(applied) != 0 || len(restart) != 1 {
		t.Fatalf("second Reload = %v, %v", applied, restart)
	}
}

func TestNewFailures(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	if _, err := New(Options{}); err == nil {
		t.Fatal("New without config")
	}
	a := start(t, cfg)
	// The queue directory is locked by the running agent: a second agent on
	// the same state must not start.
	if _, err := New(Options{Config: cfg, Notifier: &recNotifier{}}); err == nil || !strings.Contains(err.Error(), "queue") {
		t.Fatalf("second agent on the same state: %v", err)
	}
	_ = a
}

// offline is a publisher that is never connected.
type offline struct{}

func (offline) PatchReported(context.Context, []byte) (int64, error) {
	return 0, iothub.ErrNotConnected
}

// Any firmwareUpdate payload gets one of the contract's answers with a JSON
// body that says why.
func FuzzFirmwareUpdatePayload(f *testing.F) {
	f.Add([]byte(`{"fwPackageUri":"test.com/fw.bin","version":"1.2.0"}`))
	f.Add([]byte(`{"fwPackageUri":"https://example.com/fw.bin","sha256":"` + strings.Repeat("a", 64) + `","size":10}`))
	f.Add([]byte(`{"fwPackageUri":""}`))
	f.Add([]byte(`null`))
	f.Add([]byte(``))
	dir := f.TempDir()
	cs := "HostName=hub.example.net;DeviceId=gw-01;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	p := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(p, []byte(fmt.Sprintf("hub:\n  connectionString: %q\nstateDir: %q\ninstaller:\n  type: simulated\n", cs, filepath.Join(dir, "state"))), 0o600); err != nil {
		f.Fatal(err)
	}
	cfg, err := config.Load(config.Options{File: p, Backends: installer.Specs()})
	if err != nil {
		f.Fatal(err)
	}
	a, err := New(Options{Config: cfg, Notifier: &recNotifier{}})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = a.queue.Close() })
	f.Fuzz(func(t *testing.T, payload []byte) {
		st, body := a.router.ServeMethod(context.Background(), "firmwareUpdate", payload).Encode()
		var m map[string]any
		if err := json.Unmarshal(body, &m); err != nil {
			t.Fatalf("%d %q: %v", st, body, err)
		}
		switch st {
		case 200:
			if m["status"] != "accepted" || m["updateId"] == "" {
				t.Fatalf("200 %s", body)
			}
		case 400:
			if s, _ := m["error"].(string); s == "" {
				t.Fatalf("400 without a reason: %s", body)
			}
		case 409:
			if m["error"] != "busy" || m["updateId"] == "" {
				t.Fatalf("409 %s", body)
			}
		default:
			t.Fatalf("status %d %s", st, body)
		}
	})
}

// TestUnsignedRefused: with signature.allowUnsigned false (the effective
// default of every real installer) an update that names no signature is
// refused at once, with a reason an operator can act on, and nothing starts.
func TestUnsignedRefused(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(map[string]string{"signature": "signature:\n  allowUnsigned: false\n"})))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"test.com/fw.bin","version":"1.2.0"}`)
	msg, _ := decodeBody(t, res.Payload)["error"].(string)
	if res.Status != 400 || !strings.Contains(msg, "signatureUri is required") || !strings.Contains(msg, "signature.allowUnsigned") {
		t.Fatalf("unsigned update = %d %s, want 400 naming signatureUri and signature.allowUnsigned", res.Status, res.Payload)
	}
	if st := r.manager.Status(); st.Busy {
		t.Fatalf("an update started: %+v", st)
	}
}
