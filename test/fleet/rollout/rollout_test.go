// Package rollout_test runs `gwctl rollout` against a fleet of real
// gwagent processes (test/fleet): the waves advance, the failure threshold
// stops a rollout with its reason, offline gateways show as offline and
// converge once started, and the status table and JSON are right.
package rollout_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/test/fleet"
)

var bin string

func TestMain(m *testing.M) {
	tmp, err := os.MkdirTemp("", "gwagent-rollout-bin.")
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	bin, err = fleet.Binaries(ctx, "../../..", tmp)
	cancel()
	if err != nil {
		_ = os.RemoveAll(tmp)
		panic(err)
	}
	code := m.Run()
	_ = os.RemoveAll(tmp)
	os.Exit(code)
}

// counts, wave and status are `gwctl rollout status -o json`.
type counts struct {
	Pending   int `json:"pending"`
	Running   int `json:"running"`
	Waiting   int `json:"waiting"`
	Completed int `json:"completed"`
	Failed    int `json:"failed"`
	Offline   int `json:"offline"`
}

func (c counts) total() int {
	return c.Pending + c.Running + c.Waiting + c.Completed + c.Failed + c.Offline
}

type wave struct {
	Index    int    `json:"index"`
	Size     int    `json:"size"`
	Assigned int    `json:"assigned"`
	Counts   counts `json:"counts"`
}

type status struct {
	Name   string `json:"name"`
	State  string `json:"state"`
	Reason string `json:"reason"`
	Waves  []wave `json:"waves"`
	Counts counts `json:"counts"`
	Failed []struct {
		DeviceID string `json:"deviceId"`
		Code     string `json:"code"`
		Message  string `json:"message"`
	} `json:"failed"`
}

func (s status) assigned() (n int) {
	for _, w := range s.Waves {
		n += w.Assigned
	}
	return n
}

// 30 gateways: berlin has the even indexes, 6 of them bad; paris the odd
// ones, 4 of them offline.
var (
	badIdx     = []int{2, 6, 10, 14, 18, 22}
	offlineIdx = []int{5, 13, 21, 29}
)

func TestRollout(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	devs := fleet.Plan(30, badIdx, offlineIdx)
	f, err := fleet.Start(ctx, fleet.Options{Bin: bin, Dir: t.TempDir(), Devices: devs, Logf: t.Logf})
	if err != nil {
		t.Fatalf("start fleet: %v", err)
	}
	t.Cleanup(func() {
		_ = f.Close()
		if t.Failed() {
			t.Logf("--- gwhub\n%s", f.Hub.LogTail())
		}
	})
	if _, errOut, code, err := f.Gwctl(ctx, "rollout", "list"); err != nil || code != 0 {
		t.Fatalf("gwctl rollout list: exit %d, %v: %s (gwctl rollout is needed: it lands with issue 12 item 5)", code, err, errOut)
	}

	t.Run("ThresholdStops", func(t *testing.T) { thresholdStops(t, ctx, f) })
	t.Run("OfflineConverge", func(t *testing.T) { offlineConverge(t, ctx, f) })
}

func startArgs(f *fleet.Fleet, name, query string, extra ...string) []string {
	img := f.Image
	return append([]string{"rollout", "start", name, "--uri", img.URI, "--version", img.Version,
		"--sha256", img.SHA256, "--size", strconv.FormatInt(img.Size, 10), "--signature-uri", img.SignatureURI,
		"--query", query, "--waves", "1,25%,100%", "--rate", "20"}, extra...)
}

func gwctlOK(t *testing.T, ctx context.Context, f *fleet.Fleet, args ...string) string {
	t.Helper()
	out, errOut, code, err := f.Gwctl(ctx, args...)
	if err != nil || code != 0 {
		t.Fatalf("gwctl %s: exit %d, %v\n%s%s", strings.Join(args, " "), code, err, out, errOut)
	}
	return out
}

func statusJSON(t *testing.T, ctx context.Context, f *fleet.Fleet, name string) status {
	t.Helper()
	out := gwctlOK(t, ctx, f, "rollout", "status", name, "-o", "json")
	var s status
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("rollout status -o json: %v\n%s", err, out)
	}
	return s
}

// member reports whether the twin state belongs to rollout name: its
// desired firmware carries updateId NAME or NAME-<n>.
func member(s fleet.State, name string) bool {
	return s.DesiredID == name || strings.HasPrefix(s.DesiredID, name+"-")
}

// expected counts the rollout's members by what their twins say.
func expected(states map[string]fleet.State, name string) (c counts, failed []string) {
	for id, s := range states {
		if !member(s, name) {
			continue
		}
		switch {
		case !s.Connected && !s.Ended(s.DesiredID):
			c.Offline++
		case s.AckID == s.DesiredID && s.AC == 200:
			c.Completed++
		case s.AckID == s.DesiredID && (s.AC == 500 || s.AC == 400):
			c.Failed++
			failed = append(failed, id)
		case s.AckID == s.DesiredID && s.AC == 202:
			c.Running++
		default:
			c.Pending++
		}
	}
	slices.Sort(failed)
	return c, failed
}

// thresholdStops rolls out to berlin, where 6 of 15 gateways fail
// verification: with --max-failures 10%, whichever wave first holds a bad
// gateway crosses the threshold, so the rollout stops there with a reason.
func thresholdStops(t *testing.T, ctx context.Context, f *fleet.Fleet) {
	const name = "berlin-2-0"
	gwctlOK(t, ctx, f, startArgs(f, name, "tags.site = 'berlin'", "--max-failures", "10%")...)
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, errOut, code, err := f.Gwctl(rctx, "rollout", "run", name)
	t.Logf("gwctl rollout run %s (exit %d):\n%s%s", name, code, out, errOut)
	if err != nil || code != 1 {
		t.Fatalf("rollout run: exit %d, %v; want 1 (stopped)", code, err)
	}
	// The gateways of the stopped wave that were still running finish.
	states, err := f.WaitStates(ctx, "the assigned gateways to end", func(m map[string]fleet.State) bool {
		for _, st := range m {
			if member(st, name) && !st.Ended(st.DesiredID) {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	s := statusJSON(t, ctx, f, name)
	if s.Name != name || s.State != "stopped" || s.Reason == "" {
		t.Errorf("status: name %q state %q reason %q; want %s stopped with a reason", s.Name, s.State, s.Reason, name)
	}
	stoppedWave := -1
	for i, w := range s.Waves {
		if w.Counts.Failed > 0 && stoppedWave < 0 {
			stoppedWave = i
		}
		if stoppedWave >= 0 && i > stoppedWave && w.Assigned > 0 {
			t.Errorf("wave %d was assigned %d devices after wave %d crossed the failure threshold", w.Index, w.Assigned, stoppedWave)
		}
	}
	if stoppedWave < 0 {
		t.Errorf("no wave has a failed device: %+v", s.Waves)
	}
	want, wantFailed := expected(states, name)
	if s.Counts != want || s.assigned() != want.total() {
		t.Errorf("status counts %+v (assigned %d), twins say %+v (%d)", s.Counts, s.assigned(), want, want.total())
	}
	var got []string
	for _, fd := range s.Failed {
		got = append(got, fd.DeviceID)
		if d, _ := f.Device(fd.DeviceID); !d.Bad || fd.Code != "verifyFailed" {
			t.Errorf("failed device %+v: want only bad devices, with code verifyFailed", fd)
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, wantFailed) || len(got) == 0 {
		t.Errorf("failed devices %v, twins say %v", got, wantFailed)
	}
	for id, st := range states {
		if d, _ := f.Device(id); member(st, name) && !d.Bad && !(st.AC == 200 && st.Version == f.Image.Version) {
			t.Errorf("good gateway %s: %+v, want completed on %s", id, st, f.Image.Version)
		}
	}
	table := gwctlOK(t, ctx, f, "rollout", "status", name)
	t.Logf("gwctl rollout status %s:\n%s", name, table)
	for _, want := range append([]string{"stopped", "verifyFailed"}, got...) {
		if !strings.Contains(table, want) {
			t.Errorf("status table lacks %q", want)
		}
	}
}

// offlineConverge rolls out to paris, where 4 of 15 gateways are offline:
// they show as offline while the online ones complete, and once started
// they converge and the rollout completes.
func offlineConverge(t *testing.T, ctx context.Context, f *fleet.Fleet) {
	const name = "paris-2-0"
	gwctlOK(t, ctx, f, startArgs(f, name, "tags.site = 'paris'", "--success", "60%", "--max-failures", "10%")...)
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var runOut bytes.Buffer
	run := f.GwctlCmd(rctx, "rollout", "run", name)
	run.Stdout, run.Stderr = &runOut, &runOut
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- run.Wait() }()

	var offline []string
	for _, d := range f.Devices() {
		if d.Site == "paris" && d.Offline {
			offline = append(offline, d.ID)
		}
	}
	// Until the online members have all completed and the offline ones
	// assigned so far show as offline, for two readings in a row.
	maxWaves, stable := 0, 0
	var s status
	for stable < 2 {
		select {
		case err := <-runDone:
			t.Fatalf("rollout run ended (%v) while gateways were offline:\n%s", err, runOut.String())
		case <-time.After(time.Second):
		}
		s = statusJSON(t, ctx, f, name)
		n := 0
		for _, w := range s.Waves {
			if w.Assigned > 0 {
				n++
			}
		}
		maxWaves = max(maxWaves, n)
		states, err := f.States(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := expected(states, name)
		if want.Pending == 0 && want.Running == 0 && want.Offline > 0 && s.Counts == want {
			stable++
		} else {
			stable = 0
		}
	}
	if s.State != "running" || s.Counts.Failed != 0 {
		t.Errorf("before the offline gateways start: state %s, counts %+v; want running, none failed", s.State, s.Counts)
	}
	t.Logf("gwctl rollout status %s with gateways offline:\n%s", name, gwctlOK(t, ctx, f, "rollout", "status", name))

	if err := f.StartAgents(ctx, offline...); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-runDone:
		if err != nil {
			t.Fatalf("rollout run: %v; want exit 0 (completed)\n%s", err, runOut.String())
		}
	case <-rctx.Done():
		t.Fatalf("rollout run did not end after the offline gateways started:\n%s", runOut.String())
	}
	t.Logf("gwctl rollout run %s:\n%s", name, runOut.String())
	s = statusJSON(t, ctx, f, name)
	if s.State != "completed" || s.Counts.Completed != 15 || s.Counts.total() != 15 || len(s.Failed) != 0 {
		t.Errorf("final status: state %s counts %+v failed %v; want completed, 15 completed", s.State, s.Counts, s.Failed)
	}
	if len(s.Waves) != 3 {
		t.Errorf("waves %+v; want 3 (1,25%%,100%%)", s.Waves)
	}
	for _, w := range s.Waves {
		if w.Assigned != w.Size || w.Counts.Completed != w.Size {
			t.Errorf("wave %d: size %d assigned %d counts %+v; want all assigned and completed", w.Index, w.Size, w.Assigned, w.Counts)
		}
	}
	if s.assigned() != 15 {
		t.Errorf("waves assigned %d devices in all, want 15", s.assigned())
	}
	states, err := f.States(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range f.Devices() {
		st := states[d.ID]
		if d.Site == "paris" && !(member(st, name) && st.AC == 200 && st.Version == f.Image.Version && st.Connected) {
			t.Errorf("%s: %+v, want connected and completed on %s", d.ID, st, f.Image.Version)
		}
	}
	t.Logf("waves seen assigned while watching: %d of %d; final table:\n%s", maxWaves, len(s.Waves),
		gwctlOK(t, ctx, f, "rollout", "status", name))
}
