package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
)

const (
	deviceID = "gw-01"
	wait     = 20 * time.Second
)

// env is a local hub with one device, recording every reported patch it
// accepts, and a state directory for the agent.
type env struct {
	*hub.Hub
	hubDir   string
	addr     string
	conn     string
	stateDir string
	ws       bool   // the hub serves MQTT over WebSocket on its HTTPS address
	hostName string // the hub's name; empty: hub.DefaultHostName

	mu       sync.Mutex
	reported []map[string]any
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvWith(t, false)
}

// newEnvWith is newEnv with the hub's WebSocket on or off.
func newEnvWith(t *testing.T, ws bool) *env {
	t.Helper()
	e := &env{hubDir: t.TempDir(), addr: "127.0.0.1:0", stateDir: t.TempDir(), ws: ws}
	e.startHub(t)
	cs, err := e.CreateDevice(deviceID)
	if err != nil {
		t.Fatal(err)
	}
	e.conn = cs
	return e
}

func (e *env) startHub(t *testing.T) {
	t.Helper()
	h, err := hub.New(hub.Config{
		StateDir: e.hubDir, MQTTAddr: e.addr, HTTPSAddr: "127.0.0.1:0", WebSocket: e.ws, HostName: e.hostName,
		Log: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).Named("hub"),
		OnReported: func(p hub.ReportedPatch) {
			e.mu.Lock()
			defer e.mu.Unlock()
			e.reported = append(e.reported, p.Patch)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.Hub = h
	e.addr = h.MQTTAddr()
	t.Cleanup(func() { _ = h.Close() })
}

func (e *env) patches() []map[string]any {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]map[string]any(nil), e.reported...)
}

// statuses lists the firmware.status values reported, in order, with
// consecutive repeats (progress patches) collapsed.
func (e *env) statuses() []string {
	var out []string
	for _, p := range e.patches() {
		fw, ok := p["firmware"].(map[string]any)
		if !ok {
			continue
		}
		s := fmt.Sprint(fw["status"])
		if len(out) == 0 || out[len(out)-1] != s {
			out = append(out, s)
		}
	}
	return out
}

func (e *env) reportedNow(t *testing.T) map[string]any {
	t.Helper()
	tw, err := e.Twin(deviceID)
	if err != nil {
		t.Fatal(err)
	}
	return tw.Properties.Reported
}

// yaml is the agent configuration for this environment; extra lines are
// appended (they may override keys by repeating sections… so tests pass
// whole sections they change instead).
func (e *env) yaml(sections map[string]string) string {
	def := map[string]string{
		"hub": fmt.Sprintf("hub:\n  connectionString: %q\n  address: %q\n  caFile: %q\n  keepAlive: 30s\n  connectTimeout: 5s\n  requestTimeout: 5s\n  minRetryDelay: 50ms\n  maxRetryDelay: 500ms\n",
			e.conn, e.addr, e.CAFile()),
		"installer": "installer:\n  type: simulated\n  simulated:\n    waitBeforeDownload: 100ms\n    download: 600ms\n    apply: 200ms\n    initialVersion: 1.0.0\n",
		"report":    "report:\n  minInterval: 100ms\n  minPercentStep: 10\n",
		"log":       "log:\n  level: info\n  format: console\n",
		"signature": "signature:\n  allowUnsigned: true\n",
		"rest":      fmt.Sprintf("stateDir: %q\nshutdownTimeout: 3s\n", e.stateDir),
	}
	for k, v := range sections {
		def[k] = v
	}
	var b strings.Builder
	for _, k := range []string{"hub", "installer", "report", "log", "signature", "rest"} {
		b.WriteString(def[k])
	}
	return b.String()
}

func loadConfig(t *testing.T, yaml string) *config.Config {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(config.Options{File: p, Backends: installer.Specs()})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// running is an agent started by a test.
type running struct {
	*Agent
	notifier *recNotifier
	cancel   context.CancelFunc
	done     chan error
	level    zap.AtomicLevel
}

func start(t *testing.T, cfg *config.Config, mods ...func(*Options)) *running {
	t.Helper()
	n := &recNotifier{}
	level := zap.NewAtomicLevelAt(zap.InfoLevel)
	opts := Options{Config: cfg, Log: zaptest.NewLogger(t, zaptest.Level(level)).Named("agent"), Level: level, Notifier: n}
	for _, m := range mods {
		m(&opts)
	}
	if rn, ok := opts.Notifier.(*recNotifier); ok {
		n = rn
	}
	a, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Agent: a, notifier: n, cancel: cancel, done: make(chan error, 1), level: level}
	go func() { r.done <- a.Run(ctx) }()
	t.Cleanup(func() { _ = r.stop(t) })
	return r
}

// stop cancels the agent and returns Run's error, failing if it takes
// longer than the shutdown bound plus a margin.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if !ok {
			return nil
		}
		close(r.done)
		return err
	case <-time.After(wait):
		t.Fatal("Run did not return after cancel")
		return nil
	}
}

func (e *env) invoke(t *testing.T, method string, payload string) iothub.MethodResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	req := iothub.MethodRequest{MethodName: method, ResponseTimeoutInSeconds: 10, ConnectTimeoutInSeconds: 15}
	if payload != "" {
		req.Payload = json.RawMessage(payload)
	}
	res, err := e.InvokeMethod(ctx, deviceID, req)
	if err != nil {
		t.Fatalf("invoke %s: %v", method, err)
	}
	return res
}

// recNotifier records notifications; STATUS lines can be made to block to
// wedge the status loop.
type recNotifier struct {
	mu       sync.Mutex
	states   []string
	interval time.Duration
	wedge    chan struct{} // when not nil, STATUS= waits on it
}

func (n *recNotifier) Notify(state string) error {
	n.mu.Lock()
	wedge := n.wedge
	n.states = append(n.states, state)
	n.mu.Unlock()
	if wedge != nil && strings.HasPrefix(state, "STATUS=") {
		<-wedge
	}
	return nil
}

func (n *recNotifier) WatchdogInterval() time.Duration {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.interval
}

func (n *recNotifier) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.states...)
}

func (n *recNotifier) count(state string) int {
	c := 0
	for _, s := range n.all() {
		if s == state {
			c++
		}
	}
	return c
}

func (n *recNotifier) has(prefix string) bool {
	for _, s := range n.all() {
		if strings.HasPrefix(s, prefix) {
			return true
		}
	}
	return false
}
