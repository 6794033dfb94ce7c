package report

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/firmware/simulated"
	"github.com/gwagent/gwagent/twin"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

const goldenSequence = "testdata/update-sequence.golden.json"

// reported is one Report call as the golden file shows it.
type reported struct {
	At        string         `json:"at"` // since the agent started
	Milestone bool           `json:"milestone"`
	Patch     map[string]any `json:"patch"`
}

// recordingSink records every Report and hands it on to the real queue.
type recordingSink struct {
	t     *testing.T
	start time.Time

	mu   sync.Mutex
	q    *twin.Queue // the running agent's
	list []reported
	doc  map[string]any // the patches merged one by one
}

func (s *recordingSink) Report(p map[string]any, milestone bool) error {
	b, err := json.Marshal(p)
	if err != nil {
		s.t.Errorf("patch not JSON: %v", err)
		return err
	}
	doc, err := twin.Decode(b)
	if err != nil {
		s.t.Errorf("patch not a document: %v", err)
		return err
	}
	s.mu.Lock()
	s.list = append(s.list, reported{At: since(time.Now(), s.start), Milestone: milestone, Patch: doc})
	s.doc = twin.Merge(s.doc, doc)
	q := s.q
	s.mu.Unlock()
	if err := q.Report(p, milestone); err != nil {
		s.t.Errorf("queue: %v", err)
		return err
	}
	return nil
}

func since(t, start time.Time) string { return "T+" + t.Sub(start).String() }

// placeholders replaces what changes from run to run or machine to
// machine: timestamps become their offset from the agent's start (fake
// time makes those exact), update ids a placeholder.
func placeholders(v any, start time.Time) any {
	switch v := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, x := range v {
			if k == "updateId" && x != nil {
				out[k] = "<updateId>"
				continue
			}
			out[k] = placeholders(x, start)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = placeholders(x, start)
		}
		return out
	case string:
		if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
			return "<" + since(t, start) + ">"
		}
	}
	return v
}

// runUpdate drives one update as the agent does — the start-up report,
// the state machine with the simulated backend and its default stage
// times, the firmwareUpdate method's payload, a stop once the update has
// ended, and a restart on the same state — with the reporter at the
// configuration's default limits (2 s, 5 %) writing into the real queue on
// real files, and returns the reports. It runs in fake time. The restart
// must leave the twin as the update left it: only the agent's own fields
// change.
func runUpdate(t *testing.T, sim simulated.Config, payload string) []reported {
	start := time.Now()
	hub := &onlineHub{}
	sink := &recordingSink{t: t, start: start}
	sim.StateDir = t.TempDir()
	dirs := agentDirs{queue: filepath.Join(t.TempDir(), "twin-queue"), firmware: t.TempDir()}

	a := startAgent(t, dirs, sim, hub, sink)
	req, err := firmware.ParseRequest([]byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.m.Start(req); err != nil {
		t.Fatal(err)
	}
	for a.m.Status().Busy {
		if time.Since(start) > time.Hour {
			t.Fatalf("update still running after an hour: %+v", a.m.Status())
		}
		time.Sleep(time.Second)
	}
	time.Sleep(10 * time.Second) // anything late would be recorded too
	synctest.Wait()
	a.stop(t)
	if !reflect.DeepEqual(hub.doc, sink.doc) {
		t.Errorf("hub document\n%v\nwant the reports merged\n%v", hub.doc, sink.doc)
	}
	before := withoutAgent(hub.doc)

	time.Sleep(time.Minute)
	a = startAgent(t, dirs, sim, hub, sink)
	time.Sleep(10 * time.Second)
	synctest.Wait()
	a.stop(t)
	if after := withoutAgent(hub.doc); !reflect.DeepEqual(after, before) {
		t.Errorf("the restart changed the twin:\nbefore %v\nafter  %v", before, after)
	}

	out := sink.list
	for i := range out {
		out[i].Patch = placeholders(out[i].Patch, start).(map[string]any)
	}
	return out
}

type agentDirs struct{ queue, firmware string }

// agentParts are the parts of the agent a run needs.
type agentParts struct {
	q                      *twin.Queue
	r                      *Reporter
	m                      *firmware.Manager
	stopQueue, stopManager context.CancelFunc
	qdone, mdone           chan error
}

// startAgent starts the agent's reporting parts on dirs as the agent
// does: queue, reporter, state machine, start-up report.
func startAgent(t *testing.T, dirs agentDirs, sim simulated.Config, hub *onlineHub, sink *recordingSink) *agentParts {
	q, err := twin.OpenQueue(twin.QueueOptions{Dir: dirs.queue}, hub, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := &agentParts{q: q, qdone: make(chan error, 1), mdone: make(chan error, 1)}
	var qctx context.Context
	qctx, a.stopQueue = context.WithCancel(context.Background())
	go func() { a.qdone <- q.Run(qctx) }()

	sink.mu.Lock()
	sink.q = q
	sink.mu.Unlock()
	a.r = New(sink, Options{MinInterval: 2 * time.Second, MinPercentStep: 5})
	inst, err := simulated.New(sim, nil)
	if err != nil {
		t.Fatal(err)
	}
	a.m, err = firmware.NewManager(firmware.Config{
		StateDir:       dirs.firmware,
		Installer:      inst,
		Observer:       a.r.Observe,
		CurrentVersion: "1.0.0",
		Signatures:     &signature.Policy{AllowUnsigned: true}, // the simulated installer's default
	})
	if err != nil {
		t.Fatal(err)
	}

	st := a.m.Status()
	if cur, err := inst.CurrentVersion(context.Background()); err == nil && !st.Busy {
		st.CurrentVersion = cur
	}
	if err := a.r.Startup(st, time.Now(), map[string]any{
		"agent": map[string]any{"version": "test", "installer": "simulated", "startedAt": time.Now().UTC().Format(TimeFormat)},
	}); err != nil {
		t.Fatal(err)
	}
	var mctx context.Context
	mctx, a.stopManager = context.WithCancel(context.Background())
	go func() { a.mdone <- a.m.Run(mctx) }()
	return a
}

// stop stops the parts as the agent does: the state machine, the
// reporter, the queue once it has delivered everything.
func (a *agentParts) stop(t *testing.T) {
	a.stopManager()
	if err := <-a.mdone; err != nil {
		t.Fatal(err)
	}
	a.r.Close()
	fctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.q.Flush(fctx); err != nil {
		t.Fatal(err)
	}
	a.stopQueue()
	if err := <-a.qdone; err != nil {
		t.Fatal(err)
	}
	if err := a.q.Close(); err != nil {
		t.Fatal(err)
	}
}

// withoutAgent is a copy of a reported document without the agent's own
// fields, which every start rewrites.
func withoutAgent(doc map[string]any) map[string]any {
	out := twin.Merge(nil, doc)
	delete(out, "agent")
	return out
}

// TestUpdateSequenceGolden is the twin contract as operators see it: every
// patch the reporter makes through whole simulated updates, milestones and
// progress, compared with testdata/update-sequence.golden.json. A change
// to what is reported, or when, shows in that file's diff; rewrite it with
// go test ./twin/report -run UpdateSequenceGolden -update.
func TestUpdateSequenceGolden(t *testing.T) {
	type scenario struct {
		Name    string     `json:"scenario"`
		Payload string     `json:"payload"`
		Reports []reported `json:"reports"`
	}
	// The simulated download lasts 15.1 s instead of its default 15 s: with
	// 15 s, byte progress lands every 0.75 s, and every 6 s of fake time a
	// progress and the reporter's 2 s timer fall on the same instant, where
	// the scheduler, not the code, would decide which is reported first.
	completed := simulated.DefaultConfig()
	completed.Download = 15*time.Second + 100*time.Millisecond
	failing := completed
	failing.FailAt, failing.FailMessage = simulated.StageDownloading, "connection reset by peer"
	scenarios := []struct {
		name    string
		sim     simulated.Config
		payload string
	}{
		{"completed", completed, `{"fwPackageUri":"test.com","version":"2.0.0"}`},
		{"failed while downloading", failing, `{"fwPackageUri":"test.com","version":"2.0.0"}`},
	}
	var got []scenario
	for _, sc := range scenarios {
		var reports []reported
		synctest.Test(t, func(t *testing.T) { reports = runUpdate(t, sc.sim, sc.payload) })
		got = append(got, scenario{Name: sc.name, Payload: sc.payload, Reports: reports})
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // keep <T+15s> readable
	enc.SetIndent("", "  ")
	if err := enc.Encode(got); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	if *update {
		if err := os.MkdirAll(filepath.Dir(goldenSequence), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(goldenSequence, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(goldenSequence)
	if err != nil {
		t.Fatalf("%v (create it with -update)", err)
	}
	if !bytes.Equal(b, want) {
		t.Errorf("reported sequence differs from %s; if the change is meant, rewrite it with -update and review the diff.\n%s",
			goldenSequence, firstDifference(string(want), string(b)))
	}
}

// firstDifference shows the first differing line of two texts, with its
// number.
func firstDifference(want, got string) string {
	wl, gl := bytes.Split([]byte(want), []byte("\n")), bytes.Split([]byte(got), []byte("\n"))
	for i := 0; i < max(len(wl), len(gl)); i++ {
		var w, g []byte
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if !bytes.Equal(w, g) {
			return fmt.Sprintf("line %d:\n  want %s\n  got  %s", i+1, w, g)
		}
	}
	return ""
}
