package agente2e

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent/session"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/twin"
)

// reportAsDevice connects as the device (the agent must not run: the hub
// keeps one connection per device) and writes reported patches, as another
// program on the gateway, or an older agent, would have.
func reportAsDevice(t *testing.T, e *hubEnv, patches ...map[string]any) {
	t.Helper()
	cs, err := iothub.ParseConnectionString(e.conn)
	if err != nil {
		t.Fatal(err)
	}
	connected := make(chan struct{}, 1)
	e.mu.Lock()
	addr := e.mqttAddr
	e.mu.Unlock()
	s, err := session.New(session.Config{
		Conn: cs, Address: addr, RootCAs: e.hub().RootCAs(),
		ConnectTimeout: 5 * time.Second, RequestTimeout: 10 * time.Second,
		MinRetryDelay: 100 * time.Millisecond, MaxRetryDelay: time.Second,
		OnConnect: func() {
			select {
			case connected <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("device session: %v", err)
		}
		testutil.Eventually(t, wait, "the device session gone", func() bool { return !e.hub().Connected(deviceID) })
	}()
	select {
	case <-connected:
	case <-time.After(wait):
		t.Fatal("the device session did not connect")
	}
	for _, p := range patches {
		body, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithTimeout(ctx, wait)
		_, err = s.PatchReported(rctx, body)
		rcancel()
		if err != nil {
			t.Fatalf("write %d bytes of reported properties as the device: %v", len(body), err)
		}
	}
}

// filler is reported data of another writer, n bytes as twin.Size counts
// them (n ≥ 20).
func filler(n int) map[string]any {
	const top = "inventory"
	blobs := map[string]any{}
	left := n - len(top)
	for i := 0; left > 0; i++ {
		k := fmt.Sprintf("blob%02d", i)
		v := left - len(k)
		if v > 4000 {
			v = min(4000, v-100) // leave enough for the next key
		}
		blobs[k] = strings.Repeat("x", v)
		left -= len(k) + v
	}
	return map[string]any{top: blobs}
}

// unknownKeys is a desired document with n keys the agent does not know,
// of 40 characters each.
func unknownKeys(n int) map[string]any {
	doc := map[string]any{}
	for i := range n {
		doc[fmt.Sprintf("settingOfAnotherServiceNumber%011d", i)] = "on"
	}
	return doc
}

func sizeOf(t *testing.T, rep map[string]any) int {
	t.Helper()
	doc := map[string]any{}
	for k, v := range rep {
		if !strings.HasPrefix(k, "$") {
			doc[k] = v
		}
	}
	return twin.Size(doc)
}

// The reported properties are at IoT Hub's 32 KB and an update fails: the
// hub refuses the agent's next state change, and the agent, instead of
// dropping it, withdraws its acknowledgements that can go and sends it
// again, so the twin ends "failed", with every state change in order. The
// desired properties hold 600 keys the agent does not know: they cost one
// bounded acknowledgement, not one each.
func TestReportedPropertiesFull(t *testing.T) {
	t.Parallel()
	t.Run("unknown keys and another writer's data", func(t *testing.T) {
		t.Parallel()
		e := newHubEnv(t)
		v, err := e.hub().UpdateDesired(deviceID, unknownKeys(600))
		if err != nil {
			t.Fatal(err)
		}
		setup := e.agentSetup(t)
		a1 := startAgent(t, setup, "gwagent (first)")
		rep := e.waitReported(t, "one acknowledgement of the unknown keys", func(rep map[string]any) bool {
			return text(field(rep, "unknownDesired", "av")) == text(v) && rep["firmwareStatus"] == "standBy"
		})
		if n := text(field(rep, "unknownDesired", "count")); n != "600" {
			t.Fatalf("unknownDesired.count = %s, want 600", n)
		}
		if n := sizeOf(t, rep); n > 2500 {
			t.Fatalf("600 unknown desired keys cost the reported properties %d bytes", n)
		}
		if err := a1.stop(t); err != nil {
			t.Fatalf("gwagent after SIGTERM: %v", err)
		}
		testutil.Eventually(t, wait, "the hub to see the device gone", func() bool { return !e.hub().Connected(deviceID) })

		// Another writer fills the reported properties to 30 bytes under
		// the limit: the start-up report (the same sizes again) fits, the
		// update's first state change does not.
		const slack = 30
		reportAsDevice(t, e, filler(twin.MaxReportedSize-slack-sizeOf(t, e.reported(t))))
		if n := sizeOf(t, e.reported(t)); n != twin.MaxReportedSize-slack {
			t.Fatalf("reported properties of %d bytes, want %d", n, twin.MaxReportedSize-slack)
		}
		checkFailedAtTheLimit(t, e, setup)
	})
	t.Run("an older agent's acknowledgements", func(t *testing.T) {
		t.Parallel()
		e := newHubEnv(t)
		desired := unknownKeys(600)
		if _, err := e.hub().UpdateDesired(deviceID, desired); err != nil {
			t.Fatal(err)
		}
		// An older agent acknowledged each unknown key on its own, until
		// the reported properties were 100 bytes under the limit.
		keys := slices.Sorted(func(yield func(string) bool) {
			for k := range desired {
				if !yield(k) {
					return
				}
			}
		})
		var patches []map[string]any
		p, size := map[string]any{}, 0
		for _, k := range keys {
			ack := map[string]any{"ac": 400, "av": 2, "ad": "unknown property"}
			n := twin.Size(map[string]any{k: ack})
			if size+n > twin.MaxReportedSize-100 {
				break
			}
			p[k] = ack
			size += n
			if len(p) == 200 {
				patches = append(patches, p)
				p = map[string]any{}
			}
		}
		patches = append(patches, p)
		reportAsDevice(t, e, patches...)
		if n := sizeOf(t, e.reported(t)); n < twin.MaxReportedSize-178 {
			t.Fatalf("reported properties of %d bytes, want near the limit", n)
		}
		checkFailedAtTheLimit(t, e, e.agentSetup(t))
		rep := e.reported(t)
		for _, k := range keys {
			if _, ok := rep[k]; ok {
				t.Fatalf("the older agent's acknowledgement of %s is still there", k)
			}
		}
	})
}

// checkFailedAtTheLimit starts the agent on a twin whose reported
// properties are at the limit, runs an update that fails, and checks that
// the twin ends failed, nothing was dropped, and room was made.
func checkFailedAtTheLimit(t *testing.T, e *hubEnv, setup *agentSetup) {
	t.Helper()
	img := newImageServer(t, 1<<10, 1<<10, time.Millisecond)
	seen := e.rec.len()
	a := startAgent(t, setup, "gwagent")
	testutil.Eventually(t, wait, "the start-up report accepted", func() bool {
		return slices.ContainsFunc(e.rec.all()[seen:], func(p accepted) bool { return field(p.Patch, "agent", "startedAt") != nil })
	})
	id := e.startUpdate(t, fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0"}`, img.URL+"/missing.bin"))
	// The accepted patches, not the twin: the hub stores a patch before
	// its observer sees it.
	testutil.Eventually(t, wait, "failed accepted by the hub", func() bool {
		return slices.ContainsFunc(e.rec.all()[seen:], func(p accepted) bool {
			return p.Patch["firmwareStatus"] == "failed" && field(p.Patch, "firmware", "updateId") == id
		})
	})
	rep := e.reported(t)
	if rep["firmwareStatus"] != "failed" || field(rep, "firmware", "updateId") != id {
		t.Errorf("the twin says %v of %v, want failed of %s", rep["firmwareStatus"], field(rep, "firmware", "updateId"), id)
	}
	if code := field(rep, "firmware", "error", "code"); code != "downloadFailed" {
		t.Errorf("firmware.error %v, want downloadFailed", field(rep, "firmware", "error"))
	}
	if n := sizeOf(t, rep); n > twin.MaxReportedSize {
		t.Errorf("reported properties of %d bytes", n)
	}
	// Every state change the update went through reached the hub.
	var phases []string
	for _, l := range a.log.lines() {
		if msgIs("update phase", "update_id", id)(l) {
			phases = append(phases, l.str("phase"))
		}
	}
	var got []string
	for _, p := range e.rec.all()[seen:] {
		if field(p.Patch, "firmware", "updateId") == id {
			got = append(got, text(p.Patch["firmwareStatus"]))
		}
	}
	want := append([]string{"standBy"}, phases...)
	if !isSubsequence(want, got) || got[len(got)-1] != "failed" {
		t.Errorf("the hub accepted %v for the update, want every state of %v", got, want)
	}
	if n := a.log.count(func(l logLine) bool { return strings.Contains(l.msg(), "dropped") }); n != 0 {
		t.Errorf("%d reported patches dropped", n)
	}
	if n := a.log.count(msgIs("the hub refused a state change, perhaps for the size of the reported properties; " +
		"withdrew data the agent can do without and sending it again")); n == 0 {
		t.Error("no room was made: the test did not reach the limit")
	}
	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent after SIGTERM: %v", err)
	}
}
