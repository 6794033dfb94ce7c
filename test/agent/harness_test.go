package agente2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

const (
	deviceID = "gw-e2e"
	// wait bounds every wait for a condition; generous, because the
	// machine is shared and the agent may be built with the race detector.
	wait = 60 * time.Second
)

var (
	// gwagentBin is the agent binary TestMain builds.
	gwagentBin string
	// raceEnabled is set by race_test.go in race builds.
	raceEnabled bool
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "gwagent-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "agente2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	gwagentBin = filepath.Join(dir, "gwagent")
	if err := buildAgent(gwagentBin); err != nil {
		fmt.Fprintln(os.Stderr, "agente2e:", err)
		return 1
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "agente2e: leaked goroutines:", err)
			code = 1
		}
	}
	return code
}

// buildAgent builds cmd/gwagent once for every test, with the race detector
// when the tests have it.
func buildAgent(out string) error {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("the go tool is needed to build gwagent: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/gwagent/gwagent/cmd/gwagent")
	cmd := exec.CommandContext(ctx, goTool, args...)
	var outBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outBuf, &outBuf
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, outBuf.String())
	}
	return nil
}

// accepted is a reported patch the hub accepted, as the device sent it.
type accepted struct {
	Patch   map[string]any
	Version int64
	At      time.Time
}

// recorder keeps every accepted reported patch in order, across hub
// restarts.
type recorder struct {
	mu   sync.Mutex
	list []accepted
}

func (r *recorder) add(p hub.ReportedPatch) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, accepted{Patch: p.Patch, Version: p.Version, At: time.Now()})
}

func (r *recorder) all() []accepted {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.list)
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.list)
}

// hubEnv is an in-process hub with one device. It can be closed and started
// again on the same state directory and the same ports.
type hubEnv struct {
	dir       string
	logs      *observer.ObservedLogs // the hub's Info logs, across restarts
	log       *zap.Logger
	rec       *recorder
	mqttAddr  string
	httpsAddr string
	conn      string // the device connection string

	mu sync.Mutex
	h  *hub.Hub
}

func newHubEnv(t *testing.T) *hubEnv {
	t.Helper()
	core, logs := observer.New(zap.InfoLevel)
	e := &hubEnv{dir: t.TempDir(), logs: logs, rec: &recorder{}}
	e.log = zap.New(zapcore.NewTee(core, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).Core())).Named("hub")
	e.start(t, "127.0.0.1:0", "127.0.0.1:0")
	cs, err := e.hub().CreateDevice(deviceID)
	if err != nil {
		t.Fatal(err)
	}
	e.conn = cs
	return e
}

func (e *hubEnv) start(t *testing.T, mqttAddr, httpsAddr string) {
	t.Helper()
	h, err := hub.New(hub.Config{
		StateDir: e.dir, MQTTAddr: mqttAddr, HTTPSAddr: httpsAddr,
		Log: e.log, OnReported: e.rec.add,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatalf("start the hub on %s and %s: %v", mqttAddr, httpsAddr, err)
	}
	t.Cleanup(func() { _ = h.Close() })
	e.mu.Lock()
	e.h = h
	e.mqttAddr, e.httpsAddr = h.MQTTAddr(), h.HTTPSAddr()
	e.mu.Unlock()
}

func (e *hubEnv) hub() *hub.Hub {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.h
}

// stop closes the hub: every device connection drops and the ports close.
func (e *hubEnv) stop(t *testing.T) {
	t.Helper()
	if err := e.hub().Close(); err != nil {
		t.Fatalf("close the hub: %v", err)
	}
}

// restart starts a new hub on the state directory and ports of the last.
func (e *hubEnv) restart(t *testing.T) {
	t.Helper()
	e.start(t, e.mqttAddr, e.httpsAddr)
}

func (e *hubEnv) reported(t *testing.T) map[string]any {
	t.Helper()
	tw, err := e.hub().Twin(deviceID)
	if err != nil {
		t.Fatal(err)
	}
	return tw.Properties.Reported
}

// waitReported waits until the twin's reported properties satisfy cond.
func (e *hubEnv) waitReported(t *testing.T, what string, cond func(map[string]any) bool) map[string]any {
	t.Helper()
	var rep map[string]any
	testutil.Eventually(t, wait, what, func() bool {
		rep = e.reported(t)
		return cond(rep)
	})
	return rep
}

// waitStandBy waits until the hub has accepted the agent's start-up report
// of an idle device, seen by the observer too.
func (e *hubEnv) waitStandBy(t *testing.T) {
	t.Helper()
	testutil.Eventually(t, wait, "standBy accepted by the hub", func() bool {
		for _, p := range e.rec.all() {
			if p.Patch["firmwareStatus"] == "standBy" {
				return true
			}
		}
		return false
	})
}

// waitCompleted waits until the hub has accepted the completed state of the
// update and returns the reported properties. It watches the accepted
// patches, not the twin: the hub stores a patch before its observer sees
// it, and the tests read both.
func (e *hubEnv) waitCompleted(t *testing.T, updateID string) map[string]any {
	t.Helper()
	testutil.Eventually(t, wait, "completed accepted by the hub", func() bool {
		for _, p := range e.rec.all() {
			if p.Patch["firmwareStatus"] == "completed" && field(p.Patch, "firmware", "updateId") == updateID {
				return true
			}
		}
		return false
	})
	return e.reported(t)
}

// hubLogs counts the hub's log entries with message msg.
func (e *hubEnv) hubLogs(msg string) []observer.LoggedEntry {
	return e.logs.FilterMessage(msg).All()
}

// service is a client of the hub's service REST API, as gwctl uses it.
func (e *hubEnv) service(t *testing.T) *service.Client {
	t.Helper()
	cs, err := iothub.ParseConnectionString(e.hub().ServiceConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	base := "https://" + e.httpsAddr
	e.mu.Unlock()
	c, err := service.New(cs, service.Options{CAFile: e.hub().CAFile(), BaseURL: base, RequestTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// invoke calls a direct method through the hub and fails the test if the
// hub cannot deliver it.
func (e *hubEnv) invoke(t *testing.T, method, payload string) iothub.MethodResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	req := iothub.MethodRequest{MethodName: method, ResponseTimeoutInSeconds: 20, ConnectTimeoutInSeconds: 20}
	if payload != "" {
		req.Payload = json.RawMessage(payload)
	}
	res, err := e.hub().InvokeMethod(ctx, deviceID, req)
	if err != nil {
		t.Fatalf("invoke %s: %v", method, err)
	}
	return res
}

// startUpdate invokes firmwareUpdate and returns the update id.
func (e *hubEnv) startUpdate(t *testing.T, payload string) string {
	t.Helper()
	res := e.invoke(t, "firmwareUpdate", payload)
	var body struct {
		UpdateID string `json:"updateId"`
		Status   string `json:"status"`
	}
	if err := json.Unmarshal(res.Payload, &body); err != nil || res.Status != 200 || body.Status != "accepted" || body.UpdateID == "" {
		t.Fatalf("firmwareUpdate answered %d %s (%v)", res.Status, res.Payload, err)
	}
	return body.UpdateID
}

// agentSetup is how the agent runs: a YAML file with the settings an
// operator writes, and GWAGENT_ environment variables with the device's
// identity, its state directory and the test's overrides, as a systemd
// unit's Environment= lines would give them.
type agentSetup struct {
	file     string
	stateDir string
	env      []string
	// wrap, when set, runs the agent through this command line (the
	// agent's own command line appended), e.g. a shell that sets a limit
	// and execs it: the process, and its PID, are still the agent's.
	wrap []string
}

func (e *hubEnv) agentSetup(t *testing.T, env ...string) *agentSetup {
	t.Helper()
	dir := t.TempDir()
	e.mu.Lock()
	addr := e.mqttAddr
	e.mu.Unlock()
	yaml := fmt.Sprintf(`hub:
  address: %q
  caFile: %q
  keepAlive: 30s
  connectTimeout: 5s
  requestTimeout: 5s
  minRetryDelay: 100ms
  maxRetryDelay: 1s
installer:
  type: simulated
  simulated:
    waitBeforeDownload: 100ms
    download: 1500ms
    apply: 1s
    initialVersion: 1.0.0
report:
  minInterval: 100ms
  minPercentStep: 10
log:
  level: info
  format: json
signature:
  allowUnsigned: true
shutdownTimeout: 5s
`, addr, e.hub().CAFile())
	file := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &agentSetup{file: file, stateDir: filepath.Join(dir, "state")}
	s.env = append([]string{
		"GWAGENT_HUB_CONNECTIONSTRING=" + e.conn,
		"GWAGENT_STATEDIR=" + s.stateDir,
	}, env...)
	return s
}

// environ is the agent's environment: the test's, without anything that
// would configure the agent or talk to a service manager, plus the setup's.
func (s *agentSetup) environ() []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "GWAGENT_") || k == "NOTIFY_SOCKET" || strings.HasPrefix(k, "WATCHDOG_") || strings.HasPrefix(k, "LISTEN_") {
			continue
		}
		out = append(out, kv)
	}
	return append(out, s.env...)
}

// agentProc is a running gwagent process.
type agentProc struct {
	name string
	cmd  *exec.Cmd
	log  *logSink
	done chan struct{} // closed when the process has exited and its output is read
	err  error         // cmd.Wait's result, valid after done
}

func startAgent(t *testing.T, s *agentSetup, name string) *agentProc {
	t.Helper()
	args := append(slices.Clone(s.wrap), gwagentBin, "run", "--config", s.file)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = s.environ()
	sink := &logSink{}
	cmd.Stdout, cmd.Stderr = sink, sink
	if err := cmd.Start(); err != nil {
		t.Fatalf("start gwagent: %v", err)
	}
	p := &agentProc{name: name, cmd: cmd, log: sink, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if p.running() {
			_ = p.cmd.Process.Kill()
		}
		<-p.done
		if sink.contains("WARNING: DATA RACE") {
			t.Errorf("%s: the race detector reported a data race:\n%s", name, sink.text())
		} else if t.Failed() {
			t.Logf("%s log (last lines):\n%s", name, sink.tail(80))
		}
	})
	return p
}

func (p *agentProc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM, as systemd does, and returns the exit error.
func (p *agentProc) stop(t *testing.T) error {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("%s: SIGTERM: %v", p.name, err)
	}
	select {
	case <-p.done:
		return p.err
	case <-time.After(wait):
		t.Fatalf("%s did not exit within %v of SIGTERM", p.name, wait)
		return nil
	}
}

// kill sends SIGKILL: the process gets no chance to flush or persist.
func (p *agentProc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("%s: SIGKILL: %v", p.name, err)
	}
	select {
	case <-p.done:
	case <-time.After(wait):
		t.Fatalf("%s did not die within %v of SIGKILL", p.name, wait)
	}
	var ee *exec.ExitError
	if !errors.As(p.err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("%s: exit %v, want death by SIGKILL", p.name, p.err)
	}
}

// waitLog waits for a log line of the agent that satisfies match.
func (p *agentProc) waitLog(t *testing.T, what string, match func(logLine) bool) logLine {
	t.Helper()
	var found logLine
	testutil.Eventually(t, wait, p.name+" to log "+what, func() bool {
		for _, l := range p.log.lines() {
			if match(l) {
				found = l
				return true
			}
		}
		if !p.running() {
			t.Fatalf("%s exited (%v) while waiting for it to log %s", p.name, p.err, what)
		}
		return false
	})
	return found
}

// logLine is one line of the agent's output; fields is set for JSON lines.
type logLine struct {
	raw    string
	fields map[string]any
}

func (l logLine) msg() string   { s, _ := l.fields["msg"].(string); return s }
func (l logLine) level() string { s, _ := l.fields["level"].(string); return s }
func (l logLine) str(k string) string {
	if v, ok := l.fields[k]; ok && v != nil {
		return fmt.Sprint(v)
	}
	return ""
}

// msgIs matches JSON log lines by message and, optionally, field values
// given as key, value pairs.
func msgIs(msg string, kv ...string) func(logLine) bool {
	return func(l logLine) bool {
		if l.msg() != msg {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if l.str(kv[i]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

// logSink collects a process's output line by line.
type logSink struct {
	mu      sync.Mutex
	partial []byte
	all     []logLine
}

func (s *logSink) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.partial = append(s.partial, b...)
	for {
		i := bytes.IndexByte(s.partial, '\n')
		if i < 0 {
			break
		}
		raw := string(s.partial[:i])
		s.partial = s.partial[i+1:]
		l := logLine{raw: raw}
		if strings.HasPrefix(raw, "{") {
			_ = json.Unmarshal([]byte(raw), &l.fields)
		}
		s.all = append(s.all, l)
	}
	return len(b), nil
}

func (s *logSink) lines() []logLine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.all)
}

func (s *logSink) count(match func(logLine) bool) int {
	n := 0
	for _, l := range s.lines() {
		if match(l) {
			n++
		}
	}
	return n
}

func (s *logSink) text() string {
	var b strings.Builder
	for _, l := range s.lines() {
		b.WriteString(l.raw)
		b.WriteByte('\n')
	}
	s.mu.Lock()
	b.Write(s.partial)
	s.mu.Unlock()
	return b.String()
}

func (s *logSink) contains(sub string) bool { return strings.Contains(s.text(), sub) }

func (s *logSink) tail(n int) string {
	ls := s.lines()
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	var b strings.Builder
	for _, l := range ls {
		b.WriteString(l.raw)
		b.WriteByte('\n')
	}
	return b.String()
}

// imageServer serves a firmware image over plain HTTP, throttled so that a
// download takes a while and shows progress. Range requests work.
type imageServer struct {
	*httptest.Server
	image  []byte
	sum    string
	served atomic.Int64 // image bytes written, all requests together

	mu     sync.Mutex
	ranges []string      // the Range header of each request ("" for none)
	holdAt int64         // with hold set, reads stall once this many bytes were served
	hold   chan struct{} // closed by release
}

// holdAfter makes the server stall every transfer once n bytes were
// served in all, until release: the download is then certainly in progress.
func (s *imageServer) holdAfter(n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.holdAt, s.hold = n, make(chan struct{})
}

// release lets stalled and later transfers go on.
func (s *imageServer) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold != nil {
		close(s.hold)
		s.hold = nil
	}
}

// held returns the channel a read must wait on, or nil.
func (s *imageServer) held() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold != nil && s.served.Load() >= s.holdAt {
		return s.hold
	}
	return nil
}

func newImageServer(t *testing.T, size, chunk int, pause time.Duration) *imageServer {
	t.Helper()
	line := []byte("gwagent end-to-end firmware image\n")
	img := bytes.Repeat(line, size/len(line)+1)[:size]
	sum := sha256.Sum256(img)
	s := &imageServer{image: img, sum: hex.EncodeToString(sum[:])}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/fw.bin" {
			http.NotFound(w, r)
			return
		}
		s.mu.Lock()
		s.ranges = append(s.ranges, r.Header.Get("Range"))
		s.mu.Unlock()
		http.ServeContent(w, r, "fw.bin", time.Time{}, &throttled{r: bytes.NewReader(img), ctx: r.Context(), chunk: chunk, pause: pause, srv: s})
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *imageServer) url() string { return s.URL + "/fw.bin" }

func (s *imageServer) requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.ranges)
}

// throttled reads at most chunk bytes at a time, pausing before each read
// (the slow link of a gateway in the field).
type throttled struct {
	r     *bytes.Reader
	ctx   context.Context
	chunk int
	pause time.Duration
	srv   *imageServer
}

func (t *throttled) Read(p []byte) (int, error) {
	if hold := t.srv.held(); hold != nil {
		select {
		case <-t.ctx.Done():
			return 0, t.ctx.Err()
		case <-hold:
		}
	}
	timer := time.NewTimer(t.pause)
	defer timer.Stop()
	select {
	case <-t.ctx.Done():
		return 0, t.ctx.Err()
	case <-timer.C:
	}
	if len(p) > t.chunk {
		p = p[:t.chunk]
	}
	n, err := t.r.Read(p)
	t.srv.served.Add(int64(n))
	return n, err
}

func (t *throttled) Seek(off int64, whence int) (int64, error) { return t.r.Seek(off, whence) }

var _ io.ReadSeeker = (*throttled)(nil)

// field walks nested objects; nil when a step is missing.
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

// text is a scalar as a string; "" for nil and missing.
func text(v any) string {
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

// statuses lists the firmwareStatus values of the patches, in order, with
// consecutive repeats (progress patches) collapsed.
func statuses(ps []accepted) []string {
	var out []string
	for _, p := range ps {
		s, ok := p.Patch["firmwareStatus"].(string)
		if !ok {
			continue
		}
		if len(out) == 0 || out[len(out)-1] != s {
			out = append(out, s)
		}
	}
	return out
}

// the tutorial's stages as gwagent reports them, for an update that
// completes with the simulated installer.
var allStates = []string{"standBy", "downloading", "verifying", "applying", "completed"}

// stamp parses a reported timestamp.
func stamp(t *testing.T, name string, v any) time.Time {
	t.Helper()
	s, ok := v.(string)
	if !ok {
		t.Fatalf("%s = %v (%T), want an RFC 3339 timestamp", name, v, v)
	}
	ts, err := time.Parse(time.RFC3339, s)
	if err != nil {
		t.Fatalf("%s = %q: %v", name, s, err)
	}
	return ts
}

// checkCompleted asserts the twin tells the truth about a completed update:
// the final state and the tutorial's fields, and in the accepted patches of
// the update no stamp appears before the stage it records.
func checkCompleted(t *testing.T, patches []accepted, rep map[string]any, updateID, version string) {
	t.Helper()
	fw, _ := rep["firmware"].(map[string]any)
	if rep["firmwareStatus"] != "completed" || fw["status"] != "completed" || fw["updateId"] != updateID ||
		fw["currentVersion"] != version || fw["targetVersion"] != version || fw["error"] != nil {
		t.Errorf("final reported state: firmwareStatus %v, firmware %v; want completed %s at %s", rep["firmwareStatus"], fw, updateID, version)
	}
	for _, k := range []string{"bytes", "totalBytes", "percent"} {
		if _, ok := fw[k]; ok {
			t.Errorf("firmware.%s = %v still reported after completion", k, fw[k])
		}
	}
	logTime := stamp(t, "logTime", rep["logTime"])
	downloaded := stamp(t, "downloadComplete", rep["downloadComplete"])
	applying := stamp(t, "startedApplyingImage", rep["startedApplyingImage"])
	last := stamp(t, "lastFirmwareUpdate", rep["lastFirmwareUpdate"])
	if logTime.After(downloaded) || downloaded.After(applying) || applying.After(last) {
		t.Errorf("stamps out of order: logTime %v, downloadComplete %v, startedApplyingImage %v, lastFirmwareUpdate %v",
			logTime, downloaded, applying, last)
	}
	// A stamp is reported with the stage it records, never earlier.
	stampedIn := map[string][]string{
		"downloadComplete":     {"verifying", "applying", "rebooting", "committing"},
		"startedApplyingImage": {"applying", "rebooting", "committing"},
		"lastFirmwareUpdate":   {"completed"},
	}
	for _, p := range patches {
		if field(p.Patch, "firmware", "updateId") != updateID {
			continue
		}
		st := text(p.Patch["firmwareStatus"])
		for k, ok := range stampedIn {
			if v, set := p.Patch[k]; set && v != nil && !slices.Contains(ok, st) {
				t.Errorf("%s = %v reported with firmwareStatus %q (version %d)", k, v, st, p.Version)
			}
		}
	}
}

// isSubsequence reports whether sub appears in seq in order.
func isSubsequence(sub, seq []string) bool {
	i := 0
	for _, s := range seq {
		if i < len(sub) && sub[i] == s {
			i++
		}
	}
	return i == len(sub)
}
