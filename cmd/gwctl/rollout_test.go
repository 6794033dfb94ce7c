package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// Outcomes a fleet device gives a desired firmware update.
const (
	outComplete = "complete"
	outFail     = "fail"
	outHold     = "hold"   // stays downloading until released (or the desired update is cleared)
	outWindow   = "window" // reports waitingForWindow (with the desired window) until released
)

// fleetDevice answers desired firmware the way gwagent does (docs/twin.md):
// an acknowledgement 202 with the update running, then 200 completed or
// 500 failed with an error code, all as reported patches over MQTT.
type fleetDevice struct {
	*testDevice
	id      string
	outcome string
	release chan struct{}

	mu       sync.Mutex
	got      time.Time // when the desired firmware arrived
	done     time.Time // when it reported the end
	cleared  bool
	patches  chan map[string]any
	stopOnce sync.Once
}

// rolloutHub is a hub with n devices gw-01…gw-NN tagged site=berlin, and a
// service client for the test's own checks.
type rolloutHub struct {
	h   *hub.Hub
	env *env
	svc *service.Client
	ids []string
}

func startRolloutHub(t *testing.T, n int, mods ...func(*hub.Config)) *rolloutHub {
	t.Helper()
	cfg := hub.Config{StateDir: t.TempDir(), HostName: "gwhub.test", MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}
	for _, m := range mods {
		m(&cfg)
	}
	h, err := hub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	e := &env{cs: h.ServiceConnectionString(), ca: h.CAFile(), endpoint: "https://" + h.HTTPSAddr()}
	cs, err := iothub.ParseConnectionString(e.cs)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cs, service.Options{CAFile: e.ca, BaseURL: e.endpoint})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.CloseIdleConnections)
	rh := &rolloutHub{h: h, env: e, svc: svc}
	for i := 1; i <= n; i++ {
		id := fmt.Sprintf("gw-%02d", i)
		if _, err := h.CreateDevice(id); err != nil {
			t.Fatal(err)
		}
		if _, err := svc.UpdateTwin(t.Context(), id, map[string]any{"tags": map[string]any{"site": "berlin"}}, ""); err != nil {
			t.Fatal(err)
		}
		rh.ids = append(rh.ids, id)
	}
	return rh
}

// online connects device id with the given outcome.
func (rh *rolloutHub) online(t *testing.T, id, outcome string) *fleetDevice {
	t.Helper()
	cs, err := rh.h.DeviceConnectionString(id)
	if err != nil {
		t.Fatal(err)
	}
	fd := &fleetDevice{id: id, outcome: outcome, release: make(chan struct{}), patches: make(chan map[string]any, 16)}
	fd.testDevice = connectDevice(t, rh.h, cs, func(*testDevice, json.RawMessage) {})
	// Desired patches arrive in order; one worker handles them in order,
	// off paho's router.
	if tok := fd.client.Subscribe(iothub.DesiredFilter, 0, func(_ paho.Client, m paho.Message) {
		var p map[string]any
		if json.Unmarshal(m.Payload(), &p) == nil {
			fd.patches <- p
		}
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe desired: %v", tok.Error())
	}
	stop := make(chan struct{})
	fd.wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case p := <-fd.patches:
				fd.handle(p, stop)
			}
		}
	})
	// Runs before connectDevice's cleanup (LIFO): the worker ends first.
	t.Cleanup(func() { fd.stopOnce.Do(func() { close(stop) }) })
	return fd
}

func (fd *fleetDevice) handle(p map[string]any, stop chan struct{}) {
	fwv, present := p["firmware"]
	fw, _ := fwv.(map[string]any)
	if present && fw == nil { // cleared
		fd.mu.Lock()
		fd.cleared = true
		fd.mu.Unlock()
		fd.report(map[string]any{"firmware": map[string]any{"ac": 200, "ad": "no firmware update desired", "desiredId": nil}})
		return
	}
	if fw == nil {
		return
	}
	id, _ := fw["updateId"].(string)
	fd.mu.Lock()
	fd.got = time.Now()
	fd.mu.Unlock()
	ack := func(status string, ac int, extra map[string]any) map[string]any {
		f := map[string]any{"status": status, "updateId": "u-" + fd.id, "targetVersion": fw["version"], "ac": ac, "ad": status, "desiredId": id}
		for k, v := range extra {
			f[k] = v
		}
		return map[string]any{"firmwareStatus": status, "firmware": f}
	}
	fd.report(ack("downloading", 202, nil))
	if fd.outcome == outWindow {
		fd.report(ack("waitingForWindow", 202, map[string]any{"window": fw["window"]}))
	}
	switch fd.outcome {
	case outHold, outWindow:
		select {
		case <-fd.release:
		case <-stop:
			return
		case next := <-fd.patches:
			// A change while the update runs: still cancellable, as the
			// agent does before applying.
			fd.handle(next, stop)
			return
		}
		fd.report(ack("completed", 200, nil))
	case outFail:
		fd.report(ack("failed", 500, map[string]any{"error": map[string]any{"code": "verifyFailed", "message": "sha256 mismatch"}}))
	default:
		fd.report(ack("completed", 200, nil))
	}
	fd.mu.Lock()
	fd.done = time.Now()
	fd.mu.Unlock()
}

func (fd *fleetDevice) times() (got, done time.Time) {
	fd.mu.Lock()
	defer fd.mu.Unlock()
	return fd.got, fd.done
}

// run runs one gwctl invocation (a fresh "operator") bounded by timeout.
func (e *env) run(t *testing.T, timeout time.Duration, args ...string) result {
	t.Helper()
	return e.runCut(t, timeout, nil, args...)
}

// runCut is run, interrupted (as by Ctrl-C) as soon as cut reports true.
func (e *env) runCut(t *testing.T, timeout time.Duration, cut func() bool, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	vars := map[string]string{"IOTHUB_CONNECTION_STRING": e.cs, "GWCTL_CA_FILE": e.ca}
	a := &app{stdout: &out, stderr: &errb, getenv: func(k string) string { return vars[k] }, isTerminal: func() bool { return false }, loc: time.UTC}
	// Cancelled (not a deadline) as Ctrl-C would: a cut run exits 130.
	ctx, cancel := context.WithCancel(context.Background())
	defer time.AfterFunc(timeout, cancel).Stop()
	defer cancel()
	if cut != nil {
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if cut() {
						cancel()
						return
					}
				}
			}
		}()
	}
	code := a.run(ctx, append([]string{"--endpoint", e.endpoint}, args...))
	return result{out.String(), errb.String(), code}
}

func (rh *rolloutHub) status(t *testing.T, name string) rolloutStatus {
	t.Helper()
	r := rh.env.run(t, 30*time.Second, "rollout", "status", name, "-o", "json")
	var st rolloutStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s\n%s", err, r.stdout, r.stderr)
	}
	return st
}

// desired is the desired firmware of a device, nil when there is none.
func (rh *rolloutHub) desired(t *testing.T, id string) map[string]any {
	t.Helper()
	tw, err := rh.svc.GetTwin(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	fw, _ := tw.Properties.Desired["firmware"].(map[string]any)
	return fw
}

var startArgs = []string{"--uri", "https://fw.example.com/2.1.0.img", "--version", "2.1.0", "--rate", "200", "--interval", "200ms"}

func startCmd(name string, extra ...string) []string {
	return append(append([]string{"rollout", "start", name}, startArgs...), extra...)
}

// TestRolloutWavesAdvance: each wave begins only once the one before has
// completed as --success asks, the rollout completes, and a second
// operator sees the same status.
func TestRolloutWavesAdvance(t *testing.T) {
	rh := startRolloutHub(t, 10)
	devs := map[string]*fleetDevice{}
	for _, id := range rh.ids {
		out := outComplete
		if id == "gw-01" {
			out = outHold // wave 1 ends when the test says
		}
		devs[id] = rh.online(t, id, out)
	}
	done := make(chan result, 1)
	go func() {
		done <- rh.env.run(t, time.Minute, startCmd("r1", "--query", "tags.site = 'berlin'", "--waves", "1,50%,100%", "--success", "100%", "--watch")...)
	}()
	testutil.Eventually(t, 20*time.Second, "gw-01 gets its desired firmware", func() bool { got, _ := devs["gw-01"].times(); return !got.IsZero() })
	// The driver steps every 200ms; over several steps with wave 1
	// running, wave 2 must not begin. (A real wait: the hub and the
	// devices run on real sockets, outside a synctest bubble.)
	time.Sleep(time.Second)
	for _, id := range rh.ids[1:] {
		if got, _ := devs[id].times(); !got.IsZero() {
			t.Fatalf("%s got its desired firmware while wave 1 was running", id)
		}
	}
	close(devs["gw-01"].release)
	r := <-done
	if r.code != exitOK {
		t.Fatalf("start --watch exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "rollout r1: completed, wave 3 of 3") {
		t.Fatalf("no final table:\n%s", r.stdout)
	}
	// Waves: gw-01 | gw-02…gw-05 | gw-06…gw-10, each begun after the
	// previous one ended.
	waves := [][]string{rh.ids[:1], rh.ids[1:5], rh.ids[5:]}
	for w := 1; w < len(waves); w++ {
		var lastDone time.Time
		for _, id := range waves[w-1] {
			if _, done := devs[id].times(); done.After(lastDone) {
				lastDone = done
			}
		}
		for _, id := range waves[w] {
			got, _ := devs[id].times()
			if got.IsZero() || got.Before(lastDone) {
				t.Errorf("%s (wave %d) got its desired firmware at %v, before wave %d ended at %v", id, w+1, got, w, lastDone)
			}
		}
	}
	st := rh.status(t, "r1") // a second operator
	if st.State != stateCompleted || st.Counts.Completed != 10 || len(st.Waves) != 3 || st.Devices != 10 {
		t.Fatalf("status %+v", st)
	}
	for i, want := range []int{1, 4, 5} {
		if w := st.Waves[i]; w.Size != want || w.Assigned != want || w.Counts.Completed != want {
			t.Errorf("wave %d: %+v, want %d devices completed", i+1, w, want)
		}
	}
	if fw := rh.desired(t, "gw-07"); fw["updateId"] != "r1" || fw["version"] != "2.1.0" || fw["fwPackageUri"] != "https://fw.example.com/2.1.0.img" {
		t.Errorf("desired firmware of gw-07: %v", fw)
	}
	text := rh.env.run(t, 30*time.Second, "rollout", "status", "r1", "-o", "table")
	if text.code != exitOK || !strings.Contains(text.stdout, "WAVE") || !strings.Contains(text.stdout, "total  10") {
		t.Errorf("status table (exit %d):\n%s%s", text.code, text.stdout, text.stderr)
	}
	list := rh.env.run(t, 30*time.Second, "rollout", "list")
	if list.code != exitOK || !strings.Contains(list.stdout, "r1") || !strings.Contains(list.stdout, "completed") {
		t.Errorf("list (exit %d):\n%s%s", list.code, list.stdout, list.stderr)
	}
}

// TestRolloutAfterRollout: a second rollout over the devices of an ended
// one assigns every wave, not only the first: the members of later waves
// carry the first rollout's "assigned" tag until the second writes them.
func TestRolloutAfterRollout(t *testing.T) {
	rh := startRolloutHub(t, 4)
	for _, id := range rh.ids {
		rh.online(t, id, outComplete)
	}
	for _, r := range []struct{ name, version string }{{"r1", "2.1.0"}, {"r2", "2.2.0"}} {
		args := append(startCmd(r.name, "--query", "tags.site = 'berlin'", "--waves", "1,100%", "--watch"), "--version", r.version)
		if res := rh.env.run(t, 30*time.Second, args...); res.code != exitOK {
			t.Fatalf("%s: start --watch exit %d\n%s\n%s", r.name, res.code, res.stdout, res.stderr)
		}
		for _, id := range rh.ids {
			if fw := rh.desired(t, id); fw["updateId"] != r.name || fw["version"] != r.version {
				t.Errorf("after %s, desired firmware of %s: %v", r.name, id, fw)
			}
		}
		if st := rh.status(t, r.name); st.State != stateCompleted || st.Counts.Completed != 4 {
			t.Errorf("%s: status %+v", r.name, st)
		}
	}
}

// TestRolloutFailureThresholdStops: too many failures in a wave stop the
// rollout with the reason, the failed devices and their codes; the next
// wave never begins.
func TestRolloutFailureThresholdStops(t *testing.T) {
	rh := startRolloutHub(t, 8)
	for _, id := range rh.ids {
		out := outComplete
		if id == "gw-02" {
			out = outFail
		}
		rh.online(t, id, out)
	}
	r := rh.env.run(t, time.Minute, startCmd("r2", "--query", "tags.site = 'berlin'", "--waves", "4,100%", "--max-failures", "10%", "--watch")...)
	if r.code != exitFailure || !strings.Contains(r.stderr, "rollout r2 stopped: wave 1: 1 of 4 devices failed") {
		t.Fatalf("exit %d, want 1 with the reason\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "gw-02") || !strings.Contains(r.stdout, "verifyFailed") {
		t.Errorf("the table does not list gw-02 verifyFailed:\n%s", r.stdout)
	}
	st := rh.status(t, "r2")
	if st.State != stateStopped || !strings.Contains(st.Reason, "wave 1") {
		t.Fatalf("status %+v", st)
	}
	if len(st.Failed) != 1 || st.Failed[0].DeviceID != "gw-02" || st.Failed[0].Code != "verifyFailed" || st.Failed[0].Message != "sha256 mismatch" {
		t.Errorf("failed %+v", st.Failed)
	}
	if st.Waves[1].Assigned != 0 {
		t.Errorf("wave 2 began: %+v", st.Waves[1])
	}
	for _, id := range rh.ids[4:] {
		if fw := rh.desired(t, id); fw != nil {
			t.Errorf("%s (wave 2) has desired firmware %v", id, fw)
		}
	}
	if again := rh.env.run(t, 30*time.Second, "rollout", "run", "r2", "--interval", "100ms"); again.code != exitFailure {
		t.Errorf("run of a stopped rollout: exit %d, want 1", again.code)
	}
}

// TestRolloutPauseResume: a paused rollout does not advance however its
// wave goes; resume continues it to the end.
func TestRolloutPauseResume(t *testing.T) {
	rh := startRolloutHub(t, 4)
	first := rh.online(t, "gw-01", outHold)
	for _, id := range rh.ids[1:] {
		rh.online(t, id, outComplete)
	}
	if r := rh.env.run(t, 30*time.Second, startCmd("r3", "--devices", "gw-01,gw-02,gw-03,gw-04", "--waves", "1,100%")...); r.code != exitOK {
		t.Fatalf("start exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if r := rh.env.run(t, 30*time.Second, "rollout", "pause", "r3"); r.code != exitOK || !strings.Contains(r.stdout, "paused") {
		t.Fatalf("pause exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	close(first.release) // wave 1 completes while paused
	testutil.Eventually(t, 20*time.Second, "wave 1 completed", func() bool { return rh.status(t, "r3").Waves[0].Counts.Completed == 1 })
	// An operator drives it for a while: nothing advances.
	if r := rh.env.run(t, 1500*time.Millisecond, "rollout", "run", "r3", "--interval", "100ms"); r.code != exitCanceled {
		t.Fatalf("run of a paused rollout ended with %d, want 130 (cut by its deadline)\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if st := rh.status(t, "r3"); st.State != statePaused || st.Wave != 1 || st.Waves[1].Assigned != 0 {
		t.Fatalf("a paused rollout advanced: %+v", st)
	}
	if fw := rh.desired(t, "gw-02"); fw != nil {
		t.Fatalf("gw-02 got desired firmware while paused: %v", fw)
	}
	if r := rh.env.run(t, time.Minute, "rollout", "resume", "r3", "--interval", "100ms"); r.code != exitOK {
		t.Fatalf("resume exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if st := rh.status(t, "r3"); st.State != stateCompleted || st.Counts.Completed != 4 {
		t.Fatalf("status after resume %+v", st)
	}
	if r := rh.env.run(t, 30*time.Second, "rollout", "pause", "r3"); r.code != exitFailure || !strings.Contains(r.stderr, "r3 is completed") {
		t.Errorf("pause of a completed rollout: exit %d: %s", r.code, r.stderr)
	}
}

// TestRolloutWaitsForOfflineDevices: a rollout whose last wave reached
// --success is not completed while a member is offline; a plain status
// reads it (exit 0), and once the gateway comes back and ends its update
// the rollout completes.
func TestRolloutWaitsForOfflineDevices(t *testing.T) {
	rh := startRolloutHub(t, 4)
	for _, id := range rh.ids[:3] {
		rh.online(t, id, outComplete)
	}
	// gw-04 is registered but not connected.
	if r := rh.env.run(t, 30*time.Second, startCmd("r8", "--query", "tags.site = 'berlin'", "--waves", "100%", "--success", "75%")...); r.code != exitOK {
		t.Fatalf("start exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if r := rh.env.run(t, 3*time.Second, "rollout", "run", "r8", "--interval", "100ms"); r.code != exitCanceled {
		t.Fatalf("run with gw-04 offline ended with %d, want 130 (cut by its deadline)\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	st := rh.status(t, "r8")
	if st.State != stateRunning || st.Counts.Completed != 3 || st.Counts.Offline != 1 {
		t.Fatalf("status with gw-04 offline: %+v; want running, 3 completed, 1 offline", st)
	}
	if r := rh.env.run(t, 30*time.Second, "rollout", "status", "r8"); r.code != exitOK || !strings.Contains(r.stdout, "running") {
		t.Errorf("status exit %d, want 0:\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Back online, the device reads its desired firmware (the agent does
	// so with the full twin GET at every connect).
	fd := rh.online(t, "gw-04", outComplete)
	fd.patches <- map[string]any{"firmware": rh.desired(t, "gw-04")}
	if r := rh.env.run(t, time.Minute, "rollout", "run", "r8", "--interval", "100ms"); r.code != exitOK {
		t.Fatalf("run after gw-04 came back: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if st := rh.status(t, "r8"); st.State != stateCompleted || st.Counts.Completed != 4 {
		t.Fatalf("status %+v, want completed with 4", st)
	}
}

// TestRolloutMaintenanceWindow: --window-* put the window into every
// member's desired firmware, and a device waiting for it counts as
// waiting, which holds the wave (and the rollout) until it applies.
func TestRolloutMaintenanceWindow(t *testing.T) {
	rh := startRolloutHub(t, 2)
	waiting := rh.online(t, "gw-01", outWindow)
	rh.online(t, "gw-02", outComplete)
	if r := rh.env.run(t, 30*time.Second, startCmd("w1", "--devices", "gw-01,gw-02", "--waves", "100%", "--window-start", "02:00")...); r.code != exitUsage {
		t.Errorf("--window-start alone: exit %d, want %d\n%s", r.code, exitUsage, r.stderr)
	}
	if r := rh.env.run(t, 30*time.Second, startCmd("w1", "--devices", "gw-01,gw-02", "--waves", "100%",
		"--window-start", "02:00", "--window-duration", "2h", "--window-tz", "Europe/Berlin")...); r.code != exitOK {
		t.Fatalf("start exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	want := map[string]any{"start": "02:00", "duration": "2h", "timeZone": "Europe/Berlin"}
	for _, id := range rh.ids {
		if fw := rh.desired(t, id); !reflect.DeepEqual(fw["window"], want) {
			t.Errorf("%s: desired window %v, want %v", id, fw["window"], want)
		}
	}
	testutil.Eventually(t, 20*time.Second, "gw-01 waiting, gw-02 completed", func() bool {
		c := rh.status(t, "w1").Counts
		return c.Waiting == 1 && c.Completed == 1
	})
	if r := rh.env.run(t, 2*time.Second, "rollout", "run", "w1", "--interval", "100ms"); r.code != exitCanceled {
		t.Fatalf("run with gw-01 waiting ended with %d, want 130 (cut by its deadline)\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	table := rh.env.run(t, 30*time.Second, "rollout", "status", "w1")
	if !strings.Contains(table.stdout, "WAITING") || !strings.Contains(table.stdout, "running") {
		t.Errorf("status table:\n%s", table.stdout)
	}
	close(waiting.release) // the window opened and the update completed
	if r := rh.env.run(t, time.Minute, "rollout", "run", "w1", "--interval", "100ms"); r.code != exitOK {
		t.Fatalf("run after the window: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
}

// TestRolloutCancel: cancel ends the rollout, clears the desired firmware
// of members not done (a running one, an offline one), begins no wave.
func TestRolloutCancel(t *testing.T) {
	rh := startRolloutHub(t, 5)
	held := rh.online(t, "gw-01", outHold)
	rh.online(t, "gw-03", outComplete)
	// gw-02 stays offline; gw-04 and gw-05 are in wave 2.
	if r := rh.env.run(t, 30*time.Second, startCmd("r4", "--query", "tags.site = 'berlin'", "--waves", "3,100%")...); r.code != exitOK {
		t.Fatalf("start exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	testutil.Eventually(t, 20*time.Second, "wave 1: one running, one completed, one offline", func() bool {
		c := rh.status(t, "r4").Waves[0].Counts
		return c.Running == 1 && c.Completed == 1 && c.Offline == 1
	})
	r := rh.env.run(t, 30*time.Second, "rollout", "cancel", "r4")
	if r.code != exitOK || !strings.Contains(r.stdout, "cancelled") {
		t.Fatalf("cancel exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	for _, id := range []string{"gw-01", "gw-02"} {
		if fw := rh.desired(t, id); fw != nil {
			t.Errorf("%s still has desired firmware %v", id, fw)
		}
	}
	if fw := rh.desired(t, "gw-03"); fw["updateId"] != "r4" {
		t.Errorf("gw-03 completed; its desired firmware should stay: %v", fw)
	}
	testutil.Eventually(t, 20*time.Second, "gw-01 sees its desired firmware cleared", func() bool {
		held.mu.Lock()
		defer held.mu.Unlock()
		return held.cleared
	})
	close(held.release)
	st := rh.status(t, "r4")
	if st.State != stateCancelled || !strings.Contains(st.Reason, "cancelled by") || st.Waves[1].Assigned != 0 {
		t.Fatalf("status %+v", st)
	}
	if r := rh.env.run(t, 30*time.Second, "rollout", "run", "r4", "--interval", "100ms"); r.code != exitFailure {
		t.Errorf("run of a cancelled rollout: exit %d, want 1", r.code)
	}
	if r := rh.env.run(t, 30*time.Second, "rollout", "resume", "r4"); r.code != exitFailure || !strings.Contains(r.stderr, "r4 is cancelled") {
		t.Errorf("resume of a cancelled rollout: exit %d: %s", r.code, r.stderr)
	}
}

// TestRolloutBadInput: each mistake is a clear error and changes nothing.
func TestRolloutBadInput(t *testing.T) {
	rh := startRolloutHub(t, 4)
	records := func() string {
		items, err := rh.svc.Query(t.Context(), "SELECT * FROM devices WHERE tags.gwctl.kind = 'rollout'")
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, raw := range items {
			var tw iothub.Twin
			_ = json.Unmarshal(raw, &tw)
			ids = append(ids, tw.DeviceID)
		}
		return strings.Join(ids, ",")
	}

	r := rh.env.run(t, 30*time.Second, startCmd("none", "--query", "tags.site = 'paris'")...)
	if r.code != exitFailure || !strings.Contains(r.stderr, `query "tags.site = 'paris'" matches no device`) {
		t.Errorf("empty query: exit %d: %s", r.code, r.stderr)
	}
	r = rh.env.run(t, 30*time.Second, startCmd("none", "--devices", "gw-01,gw-99")...)
	if r.code != exitFailure || !strings.Contains(r.stderr, "gw-99 not registered") {
		t.Errorf("unknown device: exit %d: %s", r.code, r.stderr)
	}
	if got := records(); got != "" {
		t.Fatalf("records after refused starts: %s", got)
	}
	for _, cmd := range []string{"status", "pause", "resume", "cancel", "run"} {
		r := rh.env.run(t, 30*time.Second, "rollout", cmd, "nope")
		if r.code != exitFailure || !strings.Contains(r.stderr, "unknown rollout nope") {
			t.Errorf("%s of an unknown rollout: exit %d: %s", cmd, r.code, r.stderr)
		}
	}
	for _, args := range [][]string{
		{"--query", "tags.site = 'berlin'", "--waves", "0"},
		{"--query", "tags.site = 'berlin'", "--waves", "50%,10%"},
		{"--query", "tags.site = 'berlin'", "--waves", "1,abc"},
		{"--query", "tags.site = 'berlin'", "--waves", "150%"},
		{"--query", "tags.site = 'berlin'", "--success", "150%"},
		{"--query", "tags.site = 'berlin'", "--max-failures", "x"},
		{"--query", "tags.site = 'berlin'", "--rate", "0"},
		{"--query", "tags.site = 'berlin'", "--devices", "gw-01"},
		{},
	} {
		r := rh.env.run(t, 30*time.Second, startCmd("bad", args...)...)
		if r.code != exitUsage {
			t.Errorf("start %v: exit %d, want %d: %s", args, r.code, exitUsage, r.stderr)
		}
	}
	if r := rh.env.run(t, 30*time.Second, "rollout", "start", "bad name", "--uri", "https://x/y", "--version", "1", "--devices", "gw-01"); r.code != exitUsage {
		t.Errorf("bad name: exit %d: %s", r.code, r.stderr)
	}
	if got := records(); got != "" {
		t.Fatalf("records after usage errors: %s", got)
	}

	// A running rollout over gw-01…gw-03 (no device online: it stays running).
	if r := rh.env.run(t, 30*time.Second, startCmd("first", "--devices", "gw-01,gw-02,gw-03", "--waves", "1,100%")...); r.code != exitOK {
		t.Fatalf("start exit %d\n%s", r.code, r.stderr)
	}
	r = rh.env.run(t, 30*time.Second, startCmd("second", "--query", "tags.site = 'berlin'")...)
	if r.code != exitFailure || !strings.Contains(r.stderr, "devices gw-01, gw-02, gw-03 are members of rollout first, which is running") {
		t.Errorf("overlapping start: exit %d: %s", r.code, r.stderr)
	}
	r = rh.env.run(t, 30*time.Second, startCmd("first", "--devices", "gw-04")...)
	if r.code != exitFailure || !strings.Contains(r.stderr, "rollout first already exists") {
		t.Errorf("existing name: exit %d: %s", r.code, r.stderr)
	}
	if got := records(); got != recordPrefix+"first" {
		t.Fatalf("records: %s, want only the first rollout's", got)
	}
	tw, err := rh.svc.GetTwin(t.Context(), "gw-04")
	if err != nil {
		t.Fatal(err)
	}
	if tw.Tags["rollout"] != nil || tw.Properties.Desired["firmware"] != nil {
		t.Errorf("gw-04 changed by refused starts: tags %v desired %v", tw.Tags, tw.Properties.Desired)
	}
	// Once the first ends, its devices may join another rollout.
	if r := rh.env.run(t, 30*time.Second, "rollout", "cancel", "first"); r.code != exitOK {
		t.Fatalf("cancel exit %d: %s", r.code, r.stderr)
	}
	if r := rh.env.run(t, 30*time.Second, startCmd("second", "--query", "tags.site = 'berlin'")...); r.code != exitOK {
		t.Fatalf("start after cancel: exit %d: %s", r.code, r.stderr)
	}
	if fw := rh.desired(t, "gw-01"); fw["updateId"] != "second" {
		t.Errorf("gw-01 desired %v, want rollout second's", fw)
	}
}

// TestRolloutHonoursThrottle: against a hub that throttles twin writes
// below --rate, the 429s are waited out and every write lands.
func TestRolloutHonoursThrottle(t *testing.T) {
	rh := startRolloutHub(t, 8, func(c *hub.Config) { c.TwinWriteRate = 4 })
	before := rh.h.TwinWriteStats()
	r := rh.env.run(t, time.Minute, startCmd("r6", "--query", "tags.site = 'berlin'", "--waves", "100%")...)
	if r.code != exitOK {
		t.Fatalf("start exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	after := rh.h.TwinWriteStats()
	if after.Throttled == before.Throttled {
		t.Fatalf("the hub throttled nothing (%+v): the test did not exercise 429", after)
	}
	for _, id := range rh.ids {
		if fw := rh.desired(t, id); fw["updateId"] != "r6" {
			t.Errorf("%s desired %v", id, fw)
		}
	}
	if st := rh.status(t, "r6"); st.State != stateRunning || st.Waves[0].Assigned != 8 || st.Counts.Offline != 8 {
		t.Errorf("status %+v", st)
	}
}

// TestParseWaves: cumulative counts and percentages become wave sizes.
func TestParseWaves(t *testing.T) {
	for _, tc := range []struct {
		spec string
		n    int
		want string
	}{
		{"10%,100%", 20, "[2 18]"},
		{"1,10%,50%,100%", 200, "[1 19 80 100]"},
		{"1,10%,100%", 5, "[1 4]"}, // 10% of 5 rounds up to 1: no device added, wave dropped
		{"100%", 3, "[3]"},
		{"2,5", 3, "[2 1]"},
	} {
		got, err := parseWaves(tc.spec, tc.n)
		if err != nil || fmt.Sprint(got) != tc.want {
			t.Errorf("parseWaves(%q, %d) = %v, %v; want %s", tc.spec, tc.n, got, err, tc.want)
		}
	}
}

// TestRolloutTwoOperators: two operators drive the same rollout at once;
// the record's etag lets one advance each wave, and both see it complete.
func TestRolloutTwoOperators(t *testing.T) {
	rh := startRolloutHub(t, 6)
	for _, id := range rh.ids {
		rh.online(t, id, outComplete)
	}
	if r := rh.env.run(t, 30*time.Second, startCmd("r7", "--query", "tags.site = 'berlin'", "--waves", "1,2,4,100%", "--success", "100%")...); r.code != exitOK {
		t.Fatalf("start exit %d\n%s", r.code, r.stderr)
	}
	results := make(chan result, 2)
	for range 2 {
		go func() { results <- rh.env.run(t, time.Minute, "rollout", "run", "r7", "--interval", "100ms") }()
	}
	for range 2 {
		if r := <-results; r.code != exitOK || !strings.Contains(r.stdout, "rollout r7: completed, wave 4 of 4") {
			t.Errorf("run exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
		}
	}
	st := rh.status(t, "r7")
	if st.State != stateCompleted || st.Wave != 4 || st.Counts.Completed != 6 {
		t.Fatalf("status %+v", st)
	}
	for i, want := range []int{1, 1, 2, 2} {
		if st.Waves[i].Size != want || st.Waves[i].Counts.Completed != want {
			t.Errorf("wave %d: %+v", i+1, st.Waves[i])
		}
	}
}

// members counts the devices tagged for rollout name, and those of them
// assigned (desired firmware written); -1 when the query fails.
func (rh *rolloutHub) members(name string) (tagged, assigned int) {
	items, err := rh.svc.Query(context.Background(), "SELECT * FROM devices WHERE tags.rollout.name = '"+name+"'")
	if err != nil {
		return -1, -1
	}
	for _, raw := range items {
		if m, ok := parseMember(name, raw); ok {
			tagged++
			if m.Assigned {
				assigned++
			}
		}
	}
	return tagged, assigned
}

// cutStart runs start paced at a few writes a second and interrupts it
// once at least n members are tagged; the record is left starting, with
// some members (not all) tagged and none assigned.
func (rh *rolloutHub) cutStart(t *testing.T, name string, n, of int, args ...string) {
	t.Helper()
	cut := func() bool { tagged, _ := rh.members(name); return tagged >= n }
	r := rh.env.runCut(t, time.Minute, cut, append(startCmd(name, args...), "--rate", "4")...)
	if r.code != exitCanceled {
		t.Fatalf("cut start: exit %d, want %d\n%s\n%s", r.code, exitCanceled, r.stdout, r.stderr)
	}
	tagged, assigned := rh.members(name)
	if tagged < n || tagged >= of || assigned != 0 {
		t.Fatalf("after the cut start: %d of %d members tagged, %d assigned; want some tagged, none assigned", tagged, of, assigned)
	}
	if st := rh.status(t, name); st.State != stateStarting {
		t.Fatalf("after the cut start: state %s, want starting", st.State)
	}
}

// checkWaves: each device in waves[i] is a member of rollout name in wave
// i+1 with its desired firmware; every device in others carries neither.
func (rh *rolloutHub) checkWaves(t *testing.T, name string, waves [][]string, others ...string) {
	t.Helper()
	for i, ids := range waves {
		for _, id := range ids {
			tw, err := rh.svc.GetTwin(t.Context(), id)
			if err != nil {
				t.Fatal(err)
			}
			tag, _ := tw.Tags["rollout"].(map[string]any)
			if w, _ := jsonInt(tag["wave"]); tag["name"] != name || w != i+1 || tag["assigned"] != true {
				t.Errorf("%s: tags.rollout %v, want %s wave %d assigned", id, tag, name, i+1)
			}
			if fw, _ := tw.Properties.Desired["firmware"].(map[string]any); fw["updateId"] != name {
				t.Errorf("%s: desired firmware %v, want rollout %s's", id, fw, name)
			}
		}
	}
	for _, id := range others {
		tw, err := rh.svc.GetTwin(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		if tw.Tags["rollout"] != nil || tw.Properties.Desired["firmware"] != nil {
			t.Errorf("%s is not selected but has tags %v, desired %v", id, tw.Tags, tw.Properties.Desired)
		}
	}
}

// TestRolloutInterruptedStartFinishedByRun: a start cut off while tagging
// its members is finished by run from the query the record keeps, with
// exactly the devices selected at start in their waves.
func TestRolloutInterruptedStartFinishedByRun(t *testing.T) {
	rh := startRolloutHub(t, 10)
	if _, err := rh.h.CreateDevice("gw-paris"); err != nil {
		t.Fatal(err)
	}
	if _, err := rh.svc.UpdateTwin(t.Context(), "gw-paris", map[string]any{"tags": map[string]any{"site": "paris"}}, ""); err != nil {
		t.Fatal(err)
	}
	for _, id := range append(rh.ids, "gw-paris") {
		rh.online(t, id, outComplete)
	}
	query := []string{"--query", "tags.site = 'berlin'", "--waves", "3,100%"}
	rh.cutStart(t, "r8", 3, 10, query...)

	r := rh.env.run(t, 30*time.Second, append(startCmd("r8", query...), "--version", "2.2.0")...)
	if r.code != exitFailure || !strings.Contains(r.stderr, "did not finish starting, with another plan") {
		t.Errorf("start again with another version: exit %d: %s", r.code, r.stderr)
	}
	r = rh.env.run(t, time.Minute, "rollout", "run", "r8", "--interval", "100ms")
	if r.code != exitOK || !strings.Contains(r.stdout, "rollout r8: completed, wave 2 of 2") || !strings.Contains(r.stderr, "finished starting") {
		t.Fatalf("run exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	st := rh.status(t, "r8")
	if st.Devices != 10 || st.Counts.Completed != 10 || st.Waves[0].Size != 3 || st.Waves[1].Size != 7 {
		t.Errorf("status %+v", st)
	}
	rh.checkWaves(t, "r8", [][]string{rh.ids[:3], rh.ids[3:]}, "gw-paris")
}

// TestRolloutInterruptedStartFinishedAgain: a start of a device list cut
// off is finished by status --watch (the record keeps the list), and by
// the same start run again.
func TestRolloutInterruptedStartFinishedAgain(t *testing.T) {
	rh := startRolloutHub(t, 8)
	for _, id := range rh.ids {
		rh.online(t, id, outComplete)
	}
	list := []string{"--devices", "gw-06,gw-02,gw-04,gw-01,gw-03,gw-05", "--waves", "2,100%"}
	rh.cutStart(t, "ra", 2, 6, list...)
	r := rh.env.run(t, time.Minute, "rollout", "status", "ra", "--watch", "--interval", "100ms")
	if r.code != exitOK || !strings.Contains(r.stdout, "rollout ra: completed, wave 2 of 2") {
		t.Fatalf("status --watch exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	rh.checkWaves(t, "ra", [][]string{rh.ids[:2], rh.ids[2:6]}, rh.ids[6:]...)

	rh.cutStart(t, "rb", 2, 6, list...)
	r = rh.env.run(t, time.Minute, append(startCmd("rb", list...), "--watch")...)
	if r.code != exitOK || !strings.Contains(r.stderr, "did not finish starting; finishing it") || !strings.Contains(r.stdout, "rollout rb: completed, wave 2 of 2") {
		t.Fatalf("start again exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	rh.checkWaves(t, "rb", [][]string{rh.ids[:2], rh.ids[2:6]})
}

// TestRolloutInterruptedStartCancelled: an interrupted start whose query
// now selects another set is refused, naming the difference; once the set
// is back, a run cut while assigning wave 1 and a cancel leave no desired
// firmware on any device, and the devices are free for the next rollout.
func TestRolloutInterruptedStartCancelled(t *testing.T) {
	rh := startRolloutHub(t, 6)
	query := []string{"--query", "tags.site = 'berlin'", "--waves", "4,100%"}
	rh.cutStart(t, "r9", 2, 6, query...)

	if _, err := rh.h.CreateDevice("gw-07"); err != nil {
		t.Fatal(err)
	}
	if _, err := rh.svc.UpdateTwin(t.Context(), "gw-07", map[string]any{"tags": map[string]any{"site": "berlin"}}, ""); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range [][]string{{"run", "r9", "--interval", "100ms"}, {"resume", "r9"}} {
		r := rh.env.run(t, 30*time.Second, append([]string{"rollout"}, cmd...)...)
		if r.code != exitFailure || !strings.Contains(r.stderr, "now gives 7 devices, not the 6 it gave at start") {
			t.Errorf("%s with a device added: exit %d: %s", cmd[0], r.code, r.stderr)
		}
	}
	if tagged, assigned := rh.members("r9"); tagged >= 6 || assigned != 0 {
		t.Fatalf("refused finish changed members: %d tagged, %d assigned", tagged, assigned)
	}
	if err := rh.svc.DeleteDevice(t.Context(), "gw-07"); err != nil {
		t.Fatal(err)
	}

	// The set is back: run finishes the start; cut it while wave 1 is
	// being assigned.
	cut := func() bool { _, assigned := rh.members("r9"); return assigned >= 1 }
	r := rh.env.runCut(t, time.Minute, cut, "rollout", "run", "r9", "--interval", "100ms", "--rate", "4")
	if r.code != exitCanceled {
		t.Fatalf("cut run: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if tagged, assigned := rh.members("r9"); tagged != 6 || assigned < 1 {
		t.Fatalf("after the cut run: %d tagged, %d assigned", tagged, assigned)
	}
	r = rh.env.run(t, 30*time.Second, "rollout", "cancel", "r9")
	if r.code != exitOK {
		t.Fatalf("cancel exit %d: %s", r.code, r.stderr)
	}
	for _, id := range rh.ids {
		if fw := rh.desired(t, id); fw != nil {
			t.Errorf("%s still has desired firmware %v", id, fw)
		}
	}
	if st := rh.status(t, "r9"); st.State != stateCancelled {
		t.Errorf("status %+v", st)
	}
	r = rh.env.run(t, 30*time.Second, startCmd("r10", query...)...)
	if r.code != exitOK {
		t.Fatalf("start after cancel: exit %d: %s", r.code, r.stderr)
	}
	rh.checkWaves(t, "r10", [][]string{rh.ids[:4]})
}
