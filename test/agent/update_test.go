package agente2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
	"github.com/gwagent/gwagent/twin"
)

// The tutorial's update as an operator runs it: the gwagent binary against
// the hub, a real image over HTTP, the method and the watch through the
// service REST API. Every stage reaches the twin, in order, with its stamps.
func TestUpdateHappyPath(t *testing.T) {
	t.Parallel()
	img := newImageServer(t, 3<<20, 32<<10, 20*time.Millisecond) // 96 reads: about 2 s
	e := newHubEnv(t)
	a := startAgent(t, e.agentSetup(t), "gwagent")
	e.waitReported(t, "standBy with the initial version", func(rep map[string]any) bool {
		return rep["firmwareStatus"] == "standBy" && field(rep, "firmware", "currentVersion") == "1.0.0" && rep["logTime"] != nil
	})

	svc := e.service(t)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	payload := fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0","sha256":%q,"size":%d}`, img.url(), img.sum, len(img.image))
	res, err := svc.InvokeMethod(ctx, deviceID, iothub.MethodRequest{
		MethodName: "firmwareUpdate", Payload: json.RawMessage(payload), ResponseTimeoutInSeconds: 20, ConnectTimeoutInSeconds: 20,
	})
	if err != nil {
		t.Fatalf("invoke firmwareUpdate: %v", err)
	}
	var body struct{ UpdateID, Status string }
	if err := json.Unmarshal(res.Payload, &body); err != nil || res.Status != 200 || body.Status != "accepted" || body.UpdateID == "" {
		t.Fatalf("firmwareUpdate answered %d %s", res.Status, res.Payload)
	}

	var seen []string
	final, err := svc.WatchFirmware(ctx, deviceID, service.WatchOptions{UpdateID: body.UpdateID, Interval: 50 * time.Millisecond},
		func(ev service.WatchEvent) {
			if ev.Kind == service.EventTransition {
				seen = append(seen, ev.State.Status)
			}
		})
	if err != nil {
		t.Fatalf("watch: %v (seen %v)", err, seen)
	}
	if final.Status != "completed" || final.CurrentVersion != "2.0.0" || final.Error != nil {
		t.Fatalf("watch ended in %+v", final)
	}
	// The watch polls, so it may miss short stages; what it saw is in order.
	if !isSubsequence(seen, allStates) || seen[len(seen)-1] != "completed" {
		t.Errorf("the watch saw %v, not an ordered part of %v", seen, allStates)
	}

	// The twin shows what the hub stored; the observer sees it a moment later.
	rep := e.waitCompleted(t, body.UpdateID)
	patches := e.rec.all()
	if got := statuses(patches); !slices.Equal(got, allStates) {
		t.Errorf("accepted firmwareStatus sequence %v, want %v", got, allStates)
	}
	checkCompleted(t, patches, rep, body.UpdateID, "2.0.0")

	// Byte progress of the real download: some patch in the middle, and the
	// whole image by the end of the download.
	var mid, whole bool
	for _, p := range patches {
		if field(p.Patch, "firmware", "updateId") != body.UpdateID {
			continue
		}
		b, _ := strconv.ParseInt(text(field(p.Patch, "firmware", "bytes")), 10, 64)
		total := text(field(p.Patch, "firmware", "totalBytes"))
		if p.Patch["firmwareStatus"] == "downloading" && b > 0 && b < int64(len(img.image)) && total == strconv.Itoa(len(img.image)) {
			mid = true
		}
		if b == int64(len(img.image)) {
			whole = true
		}
	}
	if !mid || !whole {
		t.Errorf("download progress: a patch between 0 and %d bytes: %v; one with all bytes: %v", len(img.image), mid, whole)
	}
	if n := img.served.Load(); n < int64(len(img.image)) {
		t.Errorf("the image server sent %d bytes of %d", n, len(img.image))
	}

	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent after SIGTERM: %v", err)
	}
	if a.log.count(msgIs("stopped")) != 1 {
		t.Error("no graceful stop in the log")
	}
	for _, l := range a.log.lines() {
		if l.level() == "error" {
			t.Errorf("error logged on the happy path: %s", l.raw)
		}
	}
}

// The hub goes away during the download and comes back (same state, same
// ports) while the update goes on: the agent reconnects with backoff and
// every stage reaches the twin, in order.
func TestHubRestartMidUpdate(t *testing.T) {
	t.Parallel()
	e := newHubEnv(t)
	a := startAgent(t, e.agentSetup(t, "GWAGENT_INSTALLER_SIMULATED_DOWNLOAD=3s", "GWAGENT_INSTALLER_SIMULATED_APPLY=1500ms"), "gwagent")
	e.waitStandBy(t)

	id := e.startUpdate(t, `{"fwPackageUri":"test.com/fw.bin","version":"3.0.0"}`)
	testutil.Eventually(t, wait, "downloading accepted by the hub", func() bool { return slices.Contains(statuses(e.rec.all()), "downloading") })
	e.stop(t)
	a.waitLog(t, "the lost connection", msgIs("connection lost"))
	// The update goes on while the hub is down; its stages wait in the queue.
	a.waitLog(t, "the applying stage", msgIs("update phase", "update_id", id, "phase", "applying"))
	testutil.Eventually(t, wait, "three failed reconnects", func() bool { return a.log.count(msgIs("hub connect failed")) >= 3 })
	offline := e.rec.len()
	e.restart(t)

	rep := e.waitCompleted(t, id)
	patches := e.rec.all()
	if got := statuses(patches); !slices.Equal(got, allStates) {
		t.Errorf("accepted firmwareStatus sequence %v, want %v", got, allStates)
	}
	if got := statuses(patches[offline:]); !slices.Contains(got, "verifying") || !slices.Contains(got, "applying") {
		t.Errorf("after the hub came back it accepted %v: the stages reached during the outage are missing", got)
	}
	checkCompleted(t, patches, rep, id, "3.0.0")
	if n := a.log.count(msgIs("connected")); n < 2 {
		t.Errorf("the agent connected %d times, want a reconnect", n)
	}
	// Backoff: the retry delays the agent announced grow from the first.
	var delays []time.Duration
	for _, l := range a.log.lines() {
		if msgIs("hub connect failed")(l) {
			d, err := time.ParseDuration(l.str("retry_in"))
			if err != nil {
				t.Fatalf("retry_in in %s: %v", l.raw, err)
			}
			delays = append(delays, d)
		}
	}
	// The third delay is at least 200 ms, the first at most 150 ms (100 ms
	// doubling, jitter ±50 %).
	if len(delays) < 3 || delays[2] <= delays[0] {
		t.Errorf("reconnect delays %v do not back off", delays)
	}
	for _, d := range delays {
		if d > time.Second {
			t.Errorf("reconnect delay %v over hub.maxRetryDelay (1s)", d)
		}
	}
	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent after SIGTERM: %v", err)
	}
}

// queueDir is where the agent keeps its reported-patch queue inside the
// state directory.
const queueDir = "twin-queue"

// capture is a twin.Publisher that accepts everything and keeps it.
type capture struct {
	mu      sync.Mutex
	patches []map[string]any
}

func (c *capture) PatchReported(_ context.Context, body []byte) (int64, error) {
	p, err := twin.Decode(body)
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.patches = append(c.patches, p)
	return int64(len(c.patches)), nil
}

// pendingPatches reads what a killed agent left in its queue: a copy of the
// directory is delivered to a capturing publisher, so the agent's own queue
// stays as the kill left it.
func pendingPatches(t *testing.T, stateDir string) []map[string]any {
	t.Helper()
	src := filepath.Join(stateDir, queueDir)
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatalf("the agent's queue directory: %v", err)
	}
	dst := t.TempDir()
	for _, de := range entries {
		if !de.Type().IsRegular() || de.Name() == "lock" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, de.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c := &capture{}
	q, err := twin.OpenQueue(twin.QueueOptions{Dir: dst, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}, c, zap.NewNop())
	if err != nil {
		t.Fatalf("open a copy of the killed agent's queue: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- q.Run(ctx) }()
	fctx, fcancel := context.WithTimeout(context.Background(), wait)
	err = q.Flush(fctx)
	fcancel()
	cancel()
	if rerr := <-done; rerr != nil {
		t.Fatal(rerr)
	}
	if cerr := q.Close(); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.patches
}

func canonical(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("<%v>", err)
	}
	return string(b)
}

// The agent is killed with SIGKILL in the middle of an update while the hub
// refuses every reported patch, so patches are pending on disk. Restarted on
// the same state, it delivers exactly what was pending, in order, before
// anything new, resumes the update where it was and ends completed, and no
// stamp is reported before its stage.
func TestAgentKilledWithPatchesPending(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		phase string // the persisted phase at the kill
		// slow makes the first agent stay in the phase far longer than the
		// test waits for the kill; the restarted one is quick.
		slow string
		// pending are the states certainly reported, and still pending,
		// at the kill.
		pending []string
	}{
		{"before the download", "accepted", "GWAGENT_INSTALLER_SIMULATED_WAITBEFOREDOWNLOAD=30s", []string{"standBy"}},
		{"during the download", "downloading", "", []string{"standBy", "downloading"}},
		{"while applying", "applying", "GWAGENT_INSTALLER_SIMULATED_APPLY=30s", []string{"standBy", "downloading", "verifying"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// 6 MiB in reads of 32 KiB every 10 ms.
			img := newImageServer(t, 6<<20, 32<<10, 10*time.Millisecond)
			e := newHubEnv(t)
			setup := e.agentSetup(t)
			if tc.slow != "" {
				setup.env = append(setup.env, tc.slow)
			}
			a1 := startAgent(t, setup, "gwagent (first)")
			e.waitStandBy(t)

			// From here on the hub stores nothing the agent reports.
			e.hub().InjectTwinFault(deviceID, hub.TwinFault{Op: hub.TwinReported, Status: 503})
			before := e.rec.len()
			if tc.phase == "downloading" {
				// The transfer stalls after 5 MiB until the restart: the
				// kill certainly comes during the download, past its first
				// durable checkpoint (every 4 MiB).
				img.holdAfter(5 << 20)
			}
			id := e.startUpdate(t, fmt.Sprintf(`{"fwPackageUri":%q,"version":"4.0.0","sha256":%q,"size":%d}`, img.url(), img.sum, len(img.image)))
			switch tc.phase {
			case "accepted":
				a1.waitLog(t, "the stand-by before the download", msgIs("standing by before download", "update_id", id))
			case "downloading":
				a1.waitLog(t, "the download", msgIs("update phase", "update_id", id, "phase", "downloading"))
				testutil.Eventually(t, wait, "5 MiB of the image served", func() bool { return img.served.Load() >= 5<<20 })
			case "applying":
				a1.waitLog(t, "the applying stage", msgIs("update phase", "update_id", id, "phase", "applying"))
			}
			a1.waitLog(t, "a refused reported patch", msgIs("reported patch not delivered; retrying"))
			a1.kill(t)
			servedBeforeKill := img.served.Load()
			requestsBeforeKill := len(img.requests())
			if n := e.rec.len(); n != before {
				t.Fatalf("the hub accepted %d reported patches while refusing them", n-before)
			}

			pending := pendingPatches(t, setup.stateDir)
			var pendingStates []string
			for _, p := range pending {
				pendingStates = append(pendingStates, text(p["firmwareStatus"]))
			}
			t.Logf("pending at the kill: %d patches, firmwareStatus %v", len(pending), pendingStates)
			if !isSubsequence(tc.pending, pendingStates) || field(pending[0], "firmware", "updateId") != id {
				t.Fatalf("pending at the kill %v, want the update's %v", pendingStates, tc.pending)
			}

			e.hub().ClearTwinFaults(deviceID)
			img.release()
			setup.env = append(setup.env, "GWAGENT_INSTALLER_SIMULATED_WAITBEFOREDOWNLOAD=100ms", "GWAGENT_INSTALLER_SIMULATED_APPLY=500ms")
			a2 := startAgent(t, setup, "gwagent (restarted)")
			a2.waitLog(t, "the resumed update", msgIs("resuming update", "update_id", id, "phase", tc.phase))
			rep := e.waitCompleted(t, id)

			// Nothing lost: what was pending arrives first, unchanged and in
			// order. Only the last pending patch may have taken in the
			// restarted agent's start-up report (the queue merges a report
			// into a progress patch at its tail); then every key it had is
			// still there, superseded only by newer values.
			after := e.rec.all()[before:]
			if len(after) < len(pending) {
				t.Fatalf("after the restart the hub accepted %d patches, fewer than the %d pending", len(after), len(pending))
			}
			for i, p := range pending {
				got, want := canonical(after[i].Patch), canonical(p)
				if got == want {
					continue
				}
				if i == len(pending)-1 {
					if _, merged := after[i].Patch["agent"]; merged {
						for k := range p {
							if _, ok := after[i].Patch[k]; !ok {
								t.Errorf("pending key %q lost in the merged patch %s (pending %s)", k, got, want)
							}
						}
						continue
					}
				}
				t.Errorf("accepted patch %d after the restart:\n got %s\nwant %s (pending at the kill)", i, got, want)
			}
			if got := statuses(after); !isSubsequence(statuses(asAccepted(pending)), got) || got[len(got)-1] != "completed" {
				t.Errorf("states accepted after the restart %v; pending at the kill %v", got, pendingStates)
			}
			all := e.rec.all()
			if got := statuses(all); !slices.Equal(got, allStates) {
				t.Errorf("accepted firmwareStatus sequence %v, want %v", got, allStates)
			}
			checkCompleted(t, all, rep, id, "4.0.0")
			// The stamp of a stage finished before the kill is kept; the stamp
			// of the stage the update resumed in (logTime for the stand-by,
			// startedApplyingImage) is that of the resumption: never earlier.
			for _, k := range []string{"logTime", "downloadComplete", "startedApplyingImage"} {
				var last any
				for _, p := range pending {
					if v, ok := p[k]; ok && v != nil {
						last = v
					}
				}
				if last == nil {
					continue
				}
				before, now := stamp(t, k+" before the kill", last), stamp(t, k, rep[k])
				finished := k == "downloadComplete" || k == "logTime" && tc.phase != "accepted"
				if (finished && !now.Equal(before)) || now.Before(before) {
					t.Errorf("%s = %v, but %v was reported before the kill", k, rep[k], last)
				}
			}
			// A resumed download may skip only bytes that were downloaded
			// before the kill.
			for _, r := range img.requests()[requestsBeforeKill:] {
				if r == "" {
					continue
				}
				var from int64
				if _, err := fmt.Sscanf(r, "bytes=%d-", &from); err != nil || from > servedBeforeKill {
					t.Errorf("download resumed with Range %q after %d bytes were served", r, servedBeforeKill)
				}
			}
			t.Logf("image requests (Range headers): %q; %d bytes served before the kill", img.requests(), servedBeforeKill)
			if err := a2.stop(t); err != nil {
				t.Fatalf("gwagent after SIGTERM: %v", err)
			}
		})
	}
}

func asAccepted(ps []map[string]any) []accepted {
	out := make([]accepted, len(ps))
	for i, p := range ps {
		out[i] = accepted{Patch: p}
	}
	return out
}

// The hub answers 429 three times and then 500 twice to reported patches:
// the agent backs off (each wait at least the jittered floor of an
// exponential schedule, the late waits clearly longer than the early ones),
// then gets through, and every stage arrives in order.
func TestReportedThrottledAndFailing(t *testing.T) {
	t.Parallel()
	const minDelay = 100 * time.Millisecond
	e := newHubEnv(t)
	a := startAgent(t, e.agentSetup(t, "GWAGENT_HUB_MINRETRYDELAY=100ms", "GWAGENT_HUB_MAXRETRYDELAY=2s"), "gwagent")
	e.waitStandBy(t)

	faults := []int{429, 429, 429, 500, 500}
	e.hub().InjectTwinFault(deviceID, hub.TwinFault{Op: hub.TwinReported, Status: 429, Count: 3})
	e.hub().InjectTwinFault(deviceID, hub.TwinFault{Op: hub.TwinReported, Status: 500, Count: 2})
	before := e.rec.len()
	id := e.startUpdate(t, `{"fwPackageUri":"test.com/fw.bin","version":"5.0.0"}`)
	rep := e.waitCompleted(t, id)

	refused := e.hubLogs("injected twin fault")
	var got []int
	for _, le := range refused {
		st, _ := le.ContextMap()["status"].(int64)
		got = append(got, int(st))
	}
	if !slices.Equal(got, faults) {
		t.Fatalf("the hub refused with %v, want %v", got, faults)
	}
	after := e.rec.all()[before:]
	if len(after) == 0 {
		t.Fatal("nothing accepted after the faults")
	}
	// Attempt times on the hub's clock: each refusal, then the success.
	times := make([]time.Time, 0, len(refused)+1)
	for _, le := range refused {
		times = append(times, le.Time)
	}
	times = append(times, after[0].At)
	gaps := make([]time.Duration, len(times)-1)
	for i := range gaps {
		gaps[i] = times[i+1].Sub(times[i])
		// The i-th retry waits at least half of minDelay·2^i (full jitter
		// factor 0.5); a wait is never shorter than its timer.
		if floor := minDelay / 2 << i; gaps[i] < floor-5*time.Millisecond {
			t.Errorf("retry %d came %v after the refusal, under the backoff floor %v", i+1, gaps[i], floor)
		}
	}
	t.Logf("retry gaps after 429, 429, 429, 500, 500: %v", gaps)
	if early, late := gaps[0]+gaps[1], gaps[3]+gaps[4]; late <= early {
		t.Errorf("no growing backoff: the last two waits %v, the first two %v", late, early)
	}
	// The agent counted the same attempts.
	var attempts []string
	for _, l := range a.log.lines() {
		if msgIs("reported patch not delivered; retrying")(l) {
			attempts = append(attempts, l.str("attempt"))
		}
	}
	if want := []string{"1", "2", "3", "4", "5"}; !slices.Equal(attempts, want) {
		t.Errorf("the agent logged retries with attempts %v, want %v", attempts, want)
	}
	patches := e.rec.all()
	if got := statuses(patches); !slices.Equal(got, allStates) {
		t.Errorf("accepted firmwareStatus sequence %v, want %v", got, allStates)
	}
	checkCompleted(t, patches, rep, id, "5.0.0")
	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent after SIGTERM: %v", err)
	}
}
