package fleet

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// Device is one gateway of the fleet and how it is set up.
type Device struct {
	ID      string
	Site    string // tags.site
	Ring    string // tags.ring
	Bad     bool   // tags.bad: trusts another signing key, so the image fails verification
	Offline bool   // not started by Start; StartAgent brings it online
}

// Plan lays out n devices gw-001…: sites berlin and paris alternate, the
// first tenth (at least one) is ring canary and the rest ring main; bad
// and offline list the indexes (0-based) set up to fail or held offline.
func Plan(n int, bad, offline []int) []Device {
	devs := make([]Device, n)
	canary := max(1, n/10)
	for i := range devs {
		d := Device{ID: fmt.Sprintf("gw-%03d", i+1), Site: "berlin", Ring: "main"}
		if i%2 == 1 {
			d.Site = "paris"
		}
		if i < canary {
			d.Ring = "canary"
		}
		devs[i] = d
	}
	for _, i := range bad {
		devs[i].Bad = true
	}
	for _, i := range offline {
		devs[i].Offline = true
	}
	return devs
}

// Stages are the simulated installer's stage durations.
type Stages struct {
	WaitBeforeDownload, Download, Apply time.Duration
}

// Options configure Start.
type Options struct {
	Bin     string   // folder with gwhub, gwagent and gwctl (Build)
	Dir     string   // work folder: hub state, agents' state, images, logs
	Devices []Device // Plan
	Stages  Stages   // zero: 0s, 1s, 1s
	// Version is the firmware version of the served image (default 2.0.0);
	// the agents start at 1.0.0.
	Version   string
	ImageSize int      // bytes (default 256 KiB)
	HubArgs   []string // more gwhub run flags
	// Logf, when set, is told what the fleet does.
	Logf func(format string, args ...any)
	// StartConcurrency bounds how many agents start at once (default 16).
	StartConcurrency int
}

// Fleet is a running hub with its gateways.
type Fleet struct {
	opts    Options
	devices map[string]Device
	order   []string

	Hub     *Proc
	MQTT    string // 127.0.0.1:port
	HTTPS   string // 127.0.0.1:port
	CAFile  string
	Service *service.Client
	// Env is the environment gwctl needs to reach the hub
	// (IOTHUB_CONNECTION_STRING, GWCTL_CA_FILE, GWCTL_ENDPOINT).
	Env   []string
	Image *Image

	mu     sync.Mutex
	agents map[string]*Proc // guarded by mu
}

// Start starts gwhub, registers and tags every device, writes the agents'
// configurations, serves the image and starts the agents that are not
// offline. Close stops everything.
func Start(ctx context.Context, o Options) (_ *Fleet, err error) {
	if o.Version == "" {
		o.Version = "2.0.0"
	}
	if o.ImageSize == 0 {
		o.ImageSize = 256 << 10
	}
	if o.Stages == (Stages{}) {
		o.Stages = Stages{Download: time.Second, Apply: time.Second}
	}
	if o.StartConcurrency == 0 {
		o.StartConcurrency = 16
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	f := &Fleet{opts: o, devices: map[string]Device{}, agents: map[string]*Proc{}}
	for _, d := range o.Devices {
		f.devices[d.ID] = d
		f.order = append(f.order, d.ID)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
		}
	}()
	if err := f.startHub(ctx); err != nil {
		return nil, err
	}
	if f.Image, err = newImage(ctx, filepath.Join(o.Dir, "images"), f.gwctl, o.Version, o.ImageSize); err != nil {
		return nil, err
	}
	o.Logf("image %s (%d bytes) served at %s", o.Version, o.ImageSize, f.Image.URI)
	if err := f.register(ctx); err != nil {
		return nil, err
	}
	var online []string
	for _, id := range f.order {
		if !f.devices[id].Offline {
			online = append(online, id)
		}
	}
	if err := f.StartAgents(ctx, online...); err != nil {
		return nil, err
	}
	return f, nil
}

var listening = regexp.MustCompile(`(MQTT over TLS|service REST API): .*\(listening on ([^)]+)\)`)

func (f *Fleet) startHub(ctx context.Context) error {
	dir := filepath.Join(f.opts.Dir, "hub")
	args := append([]string{"run", "--state-dir", dir, "--hostname", "localhost",
		"--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--ws=false",
		"--log-format", "json", "--log-level", "warn", "--twin-write-stats", filepath.Join(f.opts.Dir, "hub.twin-writes.json")},
		f.opts.HubArgs...)
	cmd := exec.Command(filepath.Join(f.opts.Bin, "gwhub"), args...)
	banner := filepath.Join(f.opts.Dir, "hub.banner")
	p, err := startProc("gwhub", cmd, filepath.Join(f.opts.Dir, "hub.log"), banner)
	if err != nil {
		return err
	}
	f.Hub = p
	deadline := time.Now().Add(30 * time.Second)
	for f.MQTT == "" || f.HTTPS == "" {
		if err := p.Alive(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gwhub printed no listening addresses in 30s (log: %s)", p.LogTail())
		}
		b, _ := os.ReadFile(banner)
		for _, m := range listening.FindAllStringSubmatch(string(b), -1) {
			if strings.HasPrefix(m[1], "MQTT") {
				f.MQTT = m[2]
			} else {
				f.HTTPS = m[2]
			}
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	f.CAFile = filepath.Join(dir, "ca.pem")
	raw, err := os.ReadFile(filepath.Join(dir, "service-connection-string"))
	if err != nil {
		return err
	}
	scs := strings.TrimSpace(string(raw))
	cs, err := iothub.ParseConnectionString(scs)
	if err != nil {
		return err
	}
	f.Service, err = service.New(cs, service.Options{CAFile: f.CAFile, BaseURL: "https://" + f.HTTPS, UserAgent: "gwagent-fleet"})
	if err != nil {
		return err
	}
	f.Env = []string{"IOTHUB_CONNECTION_STRING=" + scs, "GWCTL_CA_FILE=" + f.CAFile, "GWCTL_ENDPOINT=https://" + f.HTTPS}
	f.opts.Logf("gwhub: MQTT %s, REST https://%s (state %s)", f.MQTT, f.HTTPS, dir)
	return nil
}

// register creates each device, tags it and writes its agent's files.
func (f *Fleet) register(ctx context.Context) error {
	for _, id := range f.order {
		d := f.devices[id]
		dev, err := f.Service.CreateDevice(ctx, id)
		if err != nil {
			return err
		}
		cs, err := service.DeviceConnectionString("localhost", dev)
		if err != nil {
			return err
		}
		tags := map[string]any{"site": d.Site, "ring": d.Ring, "bad": d.Bad}
		if _, err := f.Service.UpdateTwin(ctx, id, map[string]any{"tags": tags}, ""); err != nil {
			return err
		}
		if err := f.writeAgentFiles(d, cs); err != nil {
			return err
		}
	}
	f.opts.Logf("registered %d devices with tags site, ring and bad", len(f.order))
	return nil
}

func (f *Fleet) agentDir(id string) string { return filepath.Join(f.opts.Dir, "agents", id) }

func (f *Fleet) writeAgentFiles(d Device, connString string) error {
	dir := f.agentDir(d.ID)
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "connection-string"), []byte(connString+"\n"), 0o600); err != nil {
		return err
	}
	keyDir := f.Image.TrustedKeyDir
	if d.Bad {
		keyDir = f.Image.OtherKeyDir
	}
	s := f.opts.Stages
	cfg := fmt.Sprintf(`hub:
  minRetryDelay: 500ms
  maxRetryDelay: 5s
installer:
  type: simulated
  simulated:
    waitBeforeDownload: %s
    download: %s
    apply: %s
    initialVersion: 1.0.0
signature:
  keyDir: %s
  allowUnsigned: false
report:
  minInterval: 1s
  minPercentStep: 50
log:
  format: json
  level: info
shutdownTimeout: 5s
`, s.WaitBeforeDownload, s.Download, s.Apply, keyDir)
	return os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(cfg), 0o600)
}

// Devices lists the fleet's devices in order.
func (f *Fleet) Devices() []Device {
	out := make([]Device, 0, len(f.order))
	for _, id := range f.order {
		out = append(out, f.devices[id])
	}
	return out
}

// Device returns the device with that id.
func (f *Fleet) Device(id string) (Device, bool) {
	d, ok := f.devices[id]
	return d, ok
}

// StartAgents starts the agents of ids (a few at a time) and waits until
// each one's device shows as connected on the hub.
func (f *Fleet) StartAgents(ctx context.Context, ids ...string) error {
	sem := make(chan struct{}, f.opts.StartConcurrency)
	errs := make(chan error, len(ids))
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			p, err := f.StartAgent(id)
			if err == nil {
				err = f.waitConnected(ctx, id, p)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	if err := errors.Join(all...); err != nil {
		return err
	}
	f.opts.Logf("%d agents started and connected", len(ids))
	return nil
}

// StartAgent starts the agent of id without waiting for it to connect.
func (f *Fleet) StartAgent(id string) (*Proc, error) {
	if _, ok := f.devices[id]; !ok {
		return nil, fmt.Errorf("fleet: no device %s", id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if p := f.agents[id]; p != nil && p.Alive() == nil {
		return nil, fmt.Errorf("fleet: agent %s already runs", id)
	}
	dir := f.agentDir(id)
	cmd := exec.Command(filepath.Join(f.opts.Bin, "gwagent"), "run", "--config", filepath.Join(dir, "config.yaml"),
		"--connection-string-file", filepath.Join(dir, "connection-string"), "--ca-file", f.CAFile,
		"--hub-address", f.MQTT, "--hub-transport", "mqtt", "--state-dir", filepath.Join(dir, "state"))
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"}
	p, err := startProc("gwagent "+id, cmd, filepath.Join(dir, "log"), "")
	if err != nil {
		return nil, err
	}
	f.agents[id] = p
	return p, nil
}

// Agent returns the running agent of id, or nil.
func (f *Fleet) Agent(id string) *Proc {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.agents[id]
}

// Agents returns the agents started so far.
func (f *Fleet) Agents() map[string]*Proc {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]*Proc, len(f.agents))
	for id, p := range f.agents {
		out[id] = p
	}
	return out
}

// StopAgent stops the agent of id (SIGTERM, bounded) and waits until the
// hub shows the device disconnected.
func (f *Fleet) StopAgent(ctx context.Context, id string) error {
	p := f.Agent(id)
	if p == nil {
		return fmt.Errorf("fleet: agent %s was not started", id)
	}
	p.Stop()
	for {
		d, err := f.Service.GetDevice(ctx, id)
		if err == nil && d.ConnectionState != "Connected" {
			return nil
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return fmt.Errorf("%s still connected after its agent stopped: %w", id, err)
		}
	}
}

func (f *Fleet) waitConnected(ctx context.Context, id string, p *Proc) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		if err := p.Alive(); err != nil {
			return err
		}
		d, err := f.Service.GetDevice(ctx, id)
		if err == nil && d.ConnectionState == "Connected" {
			return nil
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("%s did not connect: %w (log: %s)", id, err, p.LogTail())
		}
	}
}

// Gwctl runs gwctl against the hub and returns its output and exit code;
// err is set only when it could not run.
func (f *Fleet) Gwctl(ctx context.Context, args ...string) (stdout, stderr string, code int, err error) {
	var o, e bytes.Buffer
	cmd := f.GwctlCmd(ctx, args...)
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return o.String(), e.String(), ee.ExitCode(), nil
	}
	return o.String(), e.String(), 0, err
}

// GwctlCmd is a gwctl command with the hub's environment, to run as the
// caller likes (e.g. streaming a --watch to a terminal).
func (f *Fleet) GwctlCmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(f.opts.Bin, "gwctl"), args...)
	cmd.Env = append(os.Environ(), f.Env...)
	cmd.WaitDelay = 10 * time.Second
	return cmd
}

func (f *Fleet) gwctl(ctx context.Context, args ...string) error {
	out, errOut, code, err := f.Gwctl(ctx, args...)
	if err == nil && code != 0 {
		err = fmt.Errorf("gwctl %s: exit %d: %s%s", strings.Join(args, " "), code, out, errOut)
	}
	return err
}

// Close stops the agents and the hub; the work folder stays.
func (f *Fleet) Close() error {
	var wg sync.WaitGroup
	for _, p := range f.Agents() {
		wg.Go(p.Stop)
	}
	wg.Wait()
	if f.Image != nil {
		f.Image.close()
	}
	if f.Hub != nil {
		f.Hub.Stop()
	}
	return nil
}

// Desired is the desired `firmware` of the fleet's image under updateID.
func (f *Fleet) Desired(updateID string) map[string]any {
	return map[string]any{"updateId": updateID, "fwPackageUri": f.Image.URI, "version": f.Image.Version,
		"sha256": f.Image.SHA256, "size": f.Image.Size, "signatureUri": f.Image.SignatureURI}
}

// SetDesired writes desired `firmware` = Desired(updateID) on device id.
func (f *Fleet) SetDesired(ctx context.Context, id, updateID string) error {
	patch := map[string]any{"properties": map[string]any{"desired": map[string]any{"firmware": f.Desired(updateID)}}}
	_, err := f.Service.UpdateTwin(ctx, id, patch, "")
	return err
}

// State is what the hub shows of one device.
type State struct {
	ID         string
	Connected  bool
	DesiredID  string // desired firmware.updateId
	AckID      string // reported firmware.desiredId
	AC         int    // reported firmware.ac
	Status     string // firmwareStatus
	Version    string // firmware.currentVersion
	ErrorCode  string
	TargetVers string
}

// Ended reports whether the desired update desiredID ended on the device
// (ac 200, 400 or 500 acknowledging it).
func (s State) Ended(desiredID string) bool {
	return s.AckID == desiredID && (s.AC == 200 || s.AC == 400 || s.AC == 500)
}

// States reads every device's twin in one paged query.
func (f *Fleet) States(ctx context.Context) (map[string]State, error) {
	items, err := f.Service.Query(ctx, "SELECT * FROM devices")
	if err != nil {
		return nil, err
	}
	out := make(map[string]State, len(items))
	for _, raw := range items {
		var t iothub.Twin
		if err := json.Unmarshal(raw, &t); err != nil {
			return nil, err
		}
		if _, ok := f.devices[t.DeviceID]; !ok {
			continue
		}
		out[t.DeviceID] = stateOf(t)
	}
	return out, nil
}

func stateOf(t iothub.Twin) State {
	s := State{ID: t.DeviceID, Connected: t.ConnectionState == "Connected"}
	if d, ok := t.Properties.Desired["firmware"].(map[string]any); ok {
		s.DesiredID, _ = d["updateId"].(string)
	}
	st := service.ParseFirmwareState(t.Properties.Reported)
	s.Status, s.Version, s.TargetVers = st.Status, st.CurrentVersion, st.TargetVersion
	if st.Error != nil {
		s.ErrorCode = st.Error.Code
	}
	if fw, ok := t.Properties.Reported["firmware"].(map[string]any); ok {
		s.AckID, _ = fw["desiredId"].(string)
		// Float64 from encoding/json, json.Number from the service client.
		switch ac := fw["ac"].(type) {
		case float64:
			s.AC = int(ac)
		case json.Number:
			n, _ := ac.Int64()
			s.AC = int(n)
		}
	}
	return s
}

// WaitStates polls States until cond holds or ctx ends.
func (f *Fleet) WaitStates(ctx context.Context, what string, cond func(map[string]State) bool) (map[string]State, error) {
	var last map[string]State
	for {
		s, err := f.States(ctx)
		if err == nil {
			last = s
			if cond(s) {
				return s, nil
			}
		}
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return last, fmt.Errorf("waiting for %s: %w", what, err)
		}
	}
}

// Proc is a started program with its log file.
type Proc struct {
	name    string
	cmd     *exec.Cmd
	log     string
	Started time.Time
	done    chan struct{}
	err     error // set before done is closed
}

func startProc(name string, cmd *exec.Cmd, logFile, stdoutFile string) (*Proc, error) {
	if err := os.MkdirAll(filepath.Dir(logFile), 0o700); err != nil {
		return nil, err
	}
	lf, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = lf, lf
	var of *os.File
	if stdoutFile != "" {
		if of, err = os.Create(stdoutFile); err != nil {
			_ = lf.Close()
			return nil, err
		}
		cmd.Stdout = of
	}
	// Killed with the harness: an interrupted run leaves no daemon behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = lf.Close()
		if of != nil {
			_ = of.Close()
		}
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{name: name, cmd: cmd, log: logFile, Started: time.Now(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		_ = lf.Close()
		if of != nil {
			_ = of.Close()
		}
		close(p.done)
	}()
	return p, nil
}

// PID is the process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Log is the path of the process's log file.
func (p *Proc) Log() string { return p.log }

// Alive is nil while the process runs.
func (p *Proc) Alive() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited: %v (log: %s)", p.name, p.err, p.LogTail())
	default:
		return nil
	}
}

// Stop sends SIGTERM and, after 10 s, SIGKILL; it returns once the
// process has exited.
func (p *Proc) Stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// LogTail is the end of the process's log.
func (p *Proc) LogTail() string {
	b, _ := os.ReadFile(p.log)
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return strings.Join(lines[max(0, len(lines)-8):], "\n")
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
