package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

const deviceID = "gw-bench"

type options struct {
	gwagent   string
	mender    string
	strace    string
	idle      time.Duration
	window    time.Duration
	calls     int
	rate      int64
	agentEnv  string
	keep      bool
	noLatency bool
	updates   int
	imageSize int64
	settle    time.Duration
	// transportAgents > 0 measures only the idle memory per transport
	// (transport.go) and exits.
	transportAgents int
}

func main() {
	var o options
	flag.StringVar(&o.gwagent, "gwagent", "", "gwagent binary to measure (required)")
	flag.StringVar(&o.mender, "mender", "", "mender binary for the baseline daemon (empty: no baseline)")
	flag.StringVar(&o.strace, "strace", "", "strace binary for the syscall trace of the idle minute (empty: none)")
	flag.DurationVar(&o.idle, "idle", 60*time.Second, "time connected before the memory is read")
	flag.DurationVar(&o.window, "window", 60*time.Second, "idle window for CPU time and wakeups")
	flag.IntVar(&o.calls, "calls", 200, "method calls per latency series")
	flag.Int64Var(&o.rate, "rate", 2<<20, "bytes/s the image server sends during the update")
	flag.StringVar(&o.agentEnv, "agent-env", "", "extra environment for gwagent, comma-separated KEY=VALUE (experiments: GOGC, GOMEMLIMIT, GODEBUG)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary folder (logs, traces)")
	flag.BoolVar(&o.noLatency, "no-latency", false, "skip the method latency measurement")
	flag.IntVar(&o.updates, "updates", 30, "updates run one after another for the memory soak (0: none)")
	flag.Int64Var(&o.imageSize, "image-size", 32<<20, "bytes of the soak's image")
	flag.DurationVar(&o.settle, "settle", 5*time.Second, "wait after an update before its memory is read")
	flag.IntVar(&o.transportAgents, "transport-agents", 0, "measure only the idle RSS over mqtt and over websocket, with this many agents each (transport.go)")
	flag.Parse()
	if o.gwagent == "" {
		fmt.Fprintln(os.Stderr, "agentbench: -gwagent is required")
		os.Exit(2)
	}
	// The whole run is bounded: idle + window (or the wait for a steady
	// idle) + the soak (at most 20 s an update, two settles) + the latency
	// series, with room for start-up and a slow machine.
	limit := max(o.idle+o.window, steadyAfter) + 3*time.Minute + time.Duration(o.updates)*20*time.Second + 2*o.settle
	run := run
	if o.transportAgents > 0 {
		run = runTransports
		limit = o.idle + 2*time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "agentbench:", err)
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "agentbench: "+format+"\n", args...)
}

func run(ctx context.Context, o options) (err error) {
	tmp, err := os.MkdirTemp("", "gwagent-agentbench.")
	if err != nil {
		return err
	}
	defer func() {
		if o.keep || err != nil {
			logf("kept %s", tmp)
			return
		}
		_ = os.RemoveAll(tmp)
	}()

	h, svc, err := startHub(ctx, tmp, false)
	if err != nil {
		return err
	}
	defer func() { _ = h.Close() }()
	dev, err := svc.CreateDevice(ctx, deviceID)
	if err != nil {
		return err
	}
	devCS, err := service.DeviceConnectionString(h.HostName(), dev)
	if err != nil {
		return err
	}

	var mender *proc
	if o.mender != "" {
		if mender, err = startMender(ctx, o.mender, filepath.Join(tmp, "mender")); err != nil {
			return err
		}
		defer mender.stop()
	}
	agent, err := startAgent(ctx, o, filepath.Join(tmp, "agent"), devCS, h)
	if err != nil {
		return err
	}
	defer agent.stop()

	if err := waitConnected(ctx, svc, agent); err != nil {
		return err
	}
	connected := time.Now()
	logf("gwagent connected (pid %d); idling %s", agent.pid(), o.idle)

	// The syscall trace covers the idle minute after the connection has
	// settled; the CPU window below runs without it, so ptrace stops do not
	// count as the agent's wakeups.
	var trace *straceRun
	if o.strace != "" {
		settle := 2 * time.Second
		if err := sleep(ctx, settle); err != nil {
			return err
		}
		trace = startStrace(ctx, o.strace, agent.pid(), filepath.Join(tmp, "strace.txt"), o.idle-settle-time.Second)
	}
	if err := sleep(ctx, time.Until(connected.Add(o.idle))); err != nil {
		return err
	}
	var res results
	res.agentMem, err = readMem(agent.pid())
	if err != nil {
		return err
	}
	res.idle = o.idle
	if mender != nil {
		res.menderMem, err = readMem(mender.pid())
		if err != nil {
			return fmt.Errorf("mender: %w (log: %s)", err, tail(filepath.Join(tmp, "mender", "log")))
		}
		res.menderUp = time.Since(mender.started)
	}
	if trace != nil {
		res.trace, err = trace.wait()
		if err != nil {
			return err
		}
	}

	logf("CPU window of %s", o.window)
	a0, err := readCPU(agent.pid())
	if err != nil {
		return err
	}
	var m0, m1 cpuSample
	if mender != nil {
		if m0, err = readCPU(mender.pid()); err != nil {
			return err
		}
	}
	if err := sleep(ctx, o.window); err != nil {
		return err
	}
	a1, err := readCPU(agent.pid())
	if err != nil {
		return err
	}
	res.agentCPU = a1.sub(a0)
	if mender != nil {
		if m1, err = readCPU(mender.pid()); err != nil {
			return err
		}
		res.menderCPU = m1.sub(m0)
	}
	res.window = o.window

	// The soak comes after the idle measurements (they see an agent that
	// never updated) and before the latency series (its update would count
	// as the first).
	if o.updates > 0 {
		logf("memory soak: %d updates of a %s image", o.updates, mib(o.imageSize/1024))
		s, err := runSoak(ctx, svc, agent, connected, o)
		if err != nil {
			return err
		}
		res.soak = &s
	}

	if !o.noLatency {
		logf("method latency: %d calls per series", o.calls)
		res.latency, err = measureLatency(ctx, svc, o)
		if err != nil {
			return err
		}
	}
	if err := agent.alive(); err != nil {
		return err
	}
	st, err := os.Stat(o.gwagent)
	if err != nil {
		return err
	}
	res.agentSize = st.Size()
	if o.mender != "" {
		if st, err := os.Stat(o.mender); err == nil {
			res.menderSize = st.Size()
		}
	}
	res.print(os.Stdout, o)
	return nil
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// waitConnected polls the device's connection state through the service API.
func waitConnected(ctx context.Context, svc *service.Client, agent *proc) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if err := agent.alive(); err != nil {
			return err
		}
		d, err := svc.GetDevice(ctx, deviceID)
		if err == nil && d.ConnectionState == "Connected" {
			return nil
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("gwagent did not connect: %w (log: %s)", err, agent.logTail())
		}
	}
}

// proc is a child process with its log file.
type proc struct {
	name    string
	cmd     *exec.Cmd
	log     string
	started time.Time
	done    chan struct{}
	err     error
}

func start(name string, cmd *exec.Cmd, logFile string) (*proc, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group: an interrupted run leaves no daemon behind
	// when the group is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logFile, started: time.Now(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) alive() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited: %v (log: %s)", p.name, p.err, p.logTail())
	default:
		return nil
	}
}

func (p *proc) logTail() string { return tail(p.log) }

// stop sends SIGTERM, then SIGKILL after 10 s.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func tail(file string) string {
	b, _ := os.ReadFile(file)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// startAgent runs gwagent with the shipped defaults except what the local
// hub needs (address, CA) and a simulated installer that starts
// downloading at once and downloads as fast as the image server sends
// (the default paces a declared size over 15 s). transport are the flags
// that choose the transport; none: MQTT to the hub's MQTT port.
func startAgent(ctx context.Context, o options, dir, connString string, h *hub.Hub, transport ...string) (*proc, error) {
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return nil, err
	}
	csFile := filepath.Join(dir, "connection-string")
	if err := os.WriteFile(csFile, []byte(connString+"\n"), 0o600); err != nil {
		return nil, err
	}
	cfg := `installer:
  type: simulated
  simulated:
    waitBeforeDownload: 0s
    download: 0s
    apply: 1s
log:
  format: json
signature:
  allowUnsigned: true
`
	cfgFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	if len(transport) == 0 {
		transport = []string{"--hub-address", h.MQTTAddr()}
	}
	args := append([]string{"run", "--config", cfgFile, "--connection-string-file", csFile,
		"--ca-file", h.CAFile(), "--state-dir", filepath.Join(dir, "state")}, transport...)
	cmd := exec.CommandContext(ctx, o.gwagent, args...)
	cmd.Env = agentEnv(o.agentEnv)
	return start("gwagent", cmd, filepath.Join(dir, "log"))
}

// agentEnv is a small, fixed environment (as under systemd) plus extra.
func agentEnv(extra string) []string {
	env := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C"}
	for kv := range strings.SplitSeq(extra, ",") {
		if kv = strings.TrimSpace(kv); kv != "" {
			env = append(env, kv)
		}
	}
	return env
}

// startMender runs the Debian mender-client 3.4 daemon with a minimal
// configuration in dir, pointed at a closed port on 127.0.0.1, so it idles
// in its retry/poll wait: the way it sits on a device between polls.
// D-Bus is off (the package's D-Bus API needs the system bus policy).
func startMender(ctx context.Context, bin, dir string) (*proc, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	closed, err := closedPort()
	if err != nil {
		return nil, err
	}
	conf := map[string]any{
		"ServerURL":                    "https://127.0.0.1:" + closed,
		"UpdatePollIntervalSeconds":    1800,
		"InventoryPollIntervalSeconds": 28800,
		"RetryPollIntervalSeconds":     300,
		"DeviceTypeFile":               filepath.Join(dir, "device_type"),
		"DBus":                         map[string]any{"Enabled": false},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "mender.conf"), b, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "device_type"), []byte("device_type=gwagent-bench\n"), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, "--no-syslog", "--config", filepath.Join(dir, "mender.conf"),
		"--fallback-config", filepath.Join(dir, "absent.conf"), "--data", dir, "daemon")
	cmd.Dir = dir
	cmd.Env = agentEnv("")
	return start("mender", cmd, filepath.Join(dir, "log"))
}

// closedPort returns a loopback port nothing listens on (bound, then
// released).
func closedPort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port, ln.Close()
}

// slowServer serves one image at a fixed rate, so an update stays in its
// download stage for the whole busy series; release lets the rest through
// at full speed, so the update ends and the agent is idle again.
type slowServer struct {
	srv     *http.Server
	url     string
	rate    int64
	release chan struct{}
}

const slowImageSize = 256 << 20

func newSlowServer(rate int64) (*slowServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &slowServer{rate: rate, url: "http://" + ln.Addr().String() + "/image.bin", release: make(chan struct{})}
	s.srv = &http.Server{Handler: http.HandlerFunc(s.serve), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *slowServer) serve(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Length", fmt.Sprint(slowImageSize))
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	const chunk = 16 << 10
	buf := make([]byte, chunk)
	tick := time.Duration(int64(time.Second) * chunk / s.rate)
	t := time.NewTicker(tick)
	defer t.Stop()
	fast := false
	for sent := 0; sent < slowImageSize; sent += chunk {
		if !fast {
			select {
			case <-r.Context().Done():
				return
			case <-s.release:
				fast = true
			case <-t.C:
			}
		}
		if _, err := w.Write(buf); err != nil {
			return
		}
	}
}

func (s *slowServer) close() { _ = s.srv.Close() }

// latency holds the three series of method round trips.
type latency struct {
	idle404, busy404, busy409 []time.Duration
	idleBefore, idleAfter     int // calls of idle404 made before and after the update
	updateID                  string
}

// measureLatency times method calls through the service API: an unknown
// method (404 from the agent's router) while idle, then, while an update
// downloads, the same unknown method and a second firmwareUpdate (409),
// interleaved, then the unknown method again once the update has completed.
// The 404 series are the fair comparison (the same call and the same work in
// the agent, idle and busy; the idle series bracket the busy one in time);
// the 409 is the call an operator makes during an update.
func measureLatency(ctx context.Context, svc *service.Client, o options) (latency, error) {
	var l latency
	call := func(name string, payload string, want int) (time.Duration, error) {
		req := iothub.MethodRequest{MethodName: name, ResponseTimeoutInSeconds: 10}
		if payload != "" {
			req.Payload = json.RawMessage(payload)
		}
		t0 := time.Now()
		res, err := svc.InvokeMethod(ctx, deviceID, req)
		d := time.Since(t0)
		if err != nil {
			return 0, err
		}
		if res.Status != want {
			return 0, fmt.Errorf("%s answered %d, want %d: %s", name, res.Status, want, res.Payload)
		}
		return d, nil
	}
	// Warm the service client's connection, as each series reuses it.
	if _, err := call("benchNoop", "", http.StatusNotFound); err != nil {
		return l, err
	}
	idle := func(n int) error {
		for range n {
			d, err := call("benchNoop", "", http.StatusNotFound)
			if err != nil {
				return err
			}
			l.idle404 = append(l.idle404, d)
		}
		return nil
	}
	l.idleBefore = o.calls / 2
	if err := idle(l.idleBefore); err != nil {
		return l, err
	}
	srv, err := newSlowServer(o.rate)
	if err != nil {
		return l, err
	}
	defer srv.close()
	payload := fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0"}`, srv.url)
	req := iothub.MethodRequest{MethodName: "firmwareUpdate", Payload: json.RawMessage(payload), ResponseTimeoutInSeconds: 10}
	res, err := svc.InvokeMethod(ctx, deviceID, req)
	if err != nil {
		return l, err
	}
	if res.Status != http.StatusOK {
		return l, fmt.Errorf("firmwareUpdate answered %d: %s", res.Status, res.Payload)
	}
	var acc struct {
		UpdateID string `json:"updateId"`
	}
	_ = json.Unmarshal(res.Payload, &acc)
	l.updateID = acc.UpdateID
	if err := waitStatus(ctx, svc, service.StatusDownloading); err != nil {
		return l, err
	}
	for range o.calls {
		d, err := call("benchNoop", "", http.StatusNotFound)
		if err != nil {
			return l, err
		}
		l.busy404 = append(l.busy404, d)
		d, err = call("firmwareUpdate", payload, http.StatusConflict)
		if err != nil {
			return l, err
		}
		l.busy409 = append(l.busy409, d)
	}
	// The update must still be downloading: otherwise the busy series
	// measured an idle agent.
	st, err := firmwareStatus(ctx, svc)
	if err != nil {
		return l, err
	}
	if st != service.StatusDownloading {
		return l, fmt.Errorf("the update is %q after the busy series, want downloading", st)
	}
	close(srv.release)
	if err := waitStatus(ctx, svc, service.StatusCompleted); err != nil {
		return l, err
	}
	l.idleAfter = o.calls - l.idleBefore
	return l, idle(l.idleAfter)
}

func firmwareStatus(ctx context.Context, svc *service.Client) (string, error) {
	raw, err := svc.GetTwinJSON(ctx, deviceID)
	if err != nil {
		return "", err
	}
	var t struct {
		Properties struct {
			Reported struct {
				FirmwareStatus string `json:"firmwareStatus"`
			} `json:"reported"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(raw, &t); err != nil {
		return "", err
	}
	return t.Properties.Reported.FirmwareStatus, nil
}

func waitStatus(ctx context.Context, svc *service.Client, want string) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		st, err := firmwareStatus(ctx, svc)
		if err == nil && st == want {
			return nil
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return fmt.Errorf("the update did not reach %s (last %q): %w", want, st, err)
		}
	}
}

// straceRun is strace attached to the agent for a bounded time.
type straceRun struct {
	cmd  *exec.Cmd
	out  string
	dur  time.Duration
	done chan error
}

func startStrace(ctx context.Context, bin string, pid int, out string, d time.Duration) *straceRun {
	ctx, cancel := context.WithTimeout(ctx, d)
	cmd := exec.CommandContext(ctx, bin, "-f", "-qq", "-ttt", "-o", out, "-p", fmt.Sprint(pid))
	// SIGINT detaches strace cleanly from the tracee when the time is up.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 5 * time.Second
	r := &straceRun{cmd: cmd, out: out, dur: d, done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		cancel()
		r.done <- err
		return r
	}
	go func() {
		err := cmd.Wait()
		cancel()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = nil // stopped on time, as planned
		}
		r.done <- err
	}()
	return r
}

func (r *straceRun) wait() (*traceSummary, error) {
	if err := <-r.done; err != nil {
		return nil, fmt.Errorf("strace: %w", err)
	}
	f, err := os.Open(r.out)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	return summarize(f, r.dur)
}

// startHub starts a gwhub on loopback ports with its state in dir/hub
// (and a WebSocket listener when ws) and a service client for it that
// does not retry.
func startHub(ctx context.Context, dir string, ws bool) (*hub.Hub, *service.Client, error) {
	h, err := hub.New(hub.Config{StateDir: filepath.Join(dir, "hub"), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0",
		WebSocket: ws, HostName: "localhost", Log: zap.NewNop()})
	if err != nil {
		return nil, nil, err
	}
	if err := h.Start(ctx); err != nil {
		return nil, nil, err
	}
	cs, err := iothub.ParseConnectionString(h.ServiceConnectionString())
	if err == nil {
		var svc *service.Client
		svc, err = service.New(cs, service.Options{CAFile: h.CAFile(), BaseURL: "https://" + h.HTTPSAddr(),
			Retry: service.RetryPolicy{MaxTries: 1}})
		if err == nil {
			return h, svc, nil
		}
	}
	_ = h.Close()
	return nil, nil, err
}
