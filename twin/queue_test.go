package twin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/iothub"
)

const crashDirEnv = "TWIN_QUEUE_CRASH_DIR"

func TestMain(m *testing.M) {
	// The crash test re-executes this binary as the process to kill.
	if dir := os.Getenv(crashDirEnv); dir != "" {
		os.Exit(crashChild(dir))
	}
	goleak.VerifyTestMain(m)
}

// hubSim is a Publisher that behaves like IoT Hub's reported-properties
// PATCH: it validates and merges each accepted body into its document.
// The test programs failures through script.
type hubSim struct {
	mu       sync.Mutex
	doc      map[string]any
	accepted [][]byte
	calls    []time.Time // time of every call, accepted or not
	script   func(ctx context.Context, call int, body []byte) error
	version  int64
}

func (h *hubSim) setScript(f func(ctx context.Context, call int, body []byte) error) {
	h.mu.Lock()
	h.script = f
	h.mu.Unlock()
}

func (h *hubSim) PatchReported(ctx context.Context, body []byte) (int64, error) {
	h.mu.Lock()
	h.calls = append(h.calls, time.Now())
	call, script := len(h.calls), h.script
	h.mu.Unlock()
	if script != nil {
		if err := script(ctx, call, body); err != nil {
			return 0, err
		}
	}
	patch, err := Decode(body)
	if err == nil {
		err = ValidatePatch(patch)
	}
	if err != nil {
		return 0, &iothub.StatusError{Status: 400, Body: []byte(`{"errorCode":400004,"message":"` + err.Error() + `"}`)}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.doc = Merge(h.doc, patch)
	h.accepted = append(h.accepted, body)
	h.version++
	return h.version, nil
}

func (h *hubSim) snapshot() (doc map[string]any, accepted []string, calls []time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, b := range h.accepted {
		accepted = append(accepted, string(b))
	}
	doc = map[string]any{}
	if h.doc != nil {
		doc = copyValue(h.doc).(map[string]any)
	}
	return doc, accepted, slices.Clone(h.calls)
}

func openTestQueue(t testing.TB, dir string, pub Publisher, opts QueueOptions, log *zap.Logger) *Queue {
	t.Helper()
	opts.Dir = dir
	q, err := OpenQueue(opts, pub, log)
	if err != nil {
		t.Fatalf("OpenQueue: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// startRun runs q.Run until the returned stop is called (or the test ends)
// and checks that it returned nil.
func startRun(t testing.TB, q *Queue) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- q.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v, want nil", err)
				}
			case <-time.After(30 * time.Second):
				t.Errorf("Run did not stop within 30s of cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func flush(t testing.TB, q *Queue) { t.Helper(); flushWithin(t, q, time.Minute) }

// flushWithin bounds Flush by d (fake time inside a synctest bubble).
func flushWithin(t testing.TB, q *Queue, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := q.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

func report(t testing.TB, q *Queue, patch string, milestone bool) {
	t.Helper()
	if err := q.Report(mustDecode(t, patch), milestone); err != nil {
		t.Fatalf("Report(%s): %v", patch, err)
	}
}

// pending describes the queue's entries as "M{…}" (milestone) or "P{…}".
func pending(q *Queue) []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []string
	for _, e := range q.entries {
		b, _ := json.Marshal(e.patch)
		kind := "P"
		if e.milestone {
			kind = "M"
		}
		out = append(out, kind+string(b))
	}
	return out
}

func fastOpts() QueueOptions {
	return QueueOptions{MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, RequestTimeout: 5 * time.Second}
}

func TestCoalescing(t *testing.T) {
	type step struct {
		patch     string
		milestone bool
	}
	tests := []struct {
		name    string
		steps   []step
		want    []string // pending entries after all steps
		durable []string // what of them is on disk (and comes back after a restart)
	}{
		{
			name:  "progress collapses, in memory",
			steps: []step{{`{"pct":10}`, false}, {`{"pct":20}`, false}, {`{"pct":30,"bytes":5}`, false}},
			want:  []string{`P{"bytes":5,"pct":30}`},
		},
		{
			name:    "milestone absorbs progress before it",
			steps:   []step{{`{"pct":10}`, false}, {`{"status":"verifying"}`, true}},
			want:    []string{`M{"pct":10,"status":"verifying"}`},
			durable: []string{`M{"pct":10,"status":"verifying"}`},
		},
		{
			name: "progress after a milestone starts a new entry",
			steps: []step{{`{"status":"downloading"}`, true}, {`{"pct":10}`, false}, {`{"pct":90}`, false},
				{`{"status":"verifying"}`, true}, {`{"status":"applying"}`, true}, {`{"status":"completed","pct":null}`, true}},
			want: []string{`M{"status":"downloading"}`, `M{"pct":90,"status":"verifying"}`, `M{"status":"applying"}`,
				`M{"pct":null,"status":"completed"}`},
			durable: []string{`M{"status":"downloading"}`, `M{"pct":90,"status":"verifying"}`, `M{"status":"applying"}`,
				`M{"pct":null,"status":"completed"}`},
		},
		{
			name:    "progress after the last milestone stays in memory",
			steps:   []step{{`{"status":"downloading"}`, true}, {`{"pct":10}`, false}, {`{"pct":20}`, false}},
			want:    []string{`M{"status":"downloading"}`, `P{"pct":20}`},
			durable: []string{`M{"status":"downloading"}`},
		},
		{
			name:  "nested members merge, nulls kept",
			steps: []step{{`{"fw":{"a":1,"e":{"c":"x"}}}`, false}, {`{"fw":{"b":2,"e":null}}`, false}},
			want:  []string{`P{"fw":{"a":1,"b":2,"e":null}}`},
		},
		{
			name: "not expressible as one patch: appended",
			// {"e":null} then {"e":{"c":"x"}} must replace e on the hub, a
			// single {"e":{"c":"x"}} would merge into an old e.
			steps: []step{{`{"e":null}`, false}, {`{"e":{"c":"x"}}`, false}},
			want:  []string{`P{"e":null}`, `P{"e":{"c":"x"}}`},
		},
		{
			name:    "milestone not expressible with the progress before it: both kept, in order",
			steps:   []step{{`{"e":null}`, false}, {`{"e":{"c":"x"}}`, true}},
			want:    []string{`P{"e":null}`, `M{"e":{"c":"x"}}`},
			durable: []string{`M{"e":{"c":"x"}}`},
		},
		{
			name:  "empty patch is a no-op",
			steps: []step{{`{}`, true}, {`{"a":1}`, false}, {`{}`, true}},
			want:  []string{`P{"a":1}`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hub := &hubSim{}
			var sequential map[string]any
			apply := func(q *Queue) {
				t.Helper()
				sequential = nil
				for _, s := range tt.steps {
					report(t, q, s.patch, s.milestone)
					sequential = Merge(sequential, mustDecode(t, s.patch))
				}
				if got := pending(q); !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("entries = %q, want %q", got, tt.want)
				}
			}

			// What is on disk comes back after a restart; progress does not.
			dir := t.TempDir()
			q := openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
			apply(q)
			files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
			if len(files) != len(tt.durable) {
				t.Fatalf("%d entry files, want %d (one per milestone entry)", len(files), len(tt.durable))
			}
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			q = openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
			if got := pending(q); !slices.Equal(got, tt.durable) {
				t.Fatalf("entries after reopen = %q, want %q", got, tt.durable)
			}

			// Delivered in order, they leave the hub as the patches applied
			// one by one would.
			q = openTestQueue(t, t.TempDir(), hub, fastOpts(), zaptest.NewLogger(t))
			apply(q)
			startRun(t, q)
			flush(t, q)
			doc, accepted, _ := hub.snapshot()
			if len(accepted) != len(tt.want) {
				t.Fatalf("hub accepted %q, want %d bodies", accepted, len(tt.want))
			}
			for i, body := range accepted {
				if body != tt.want[i][1:] {
					t.Errorf("body %d = %s, want %s", i, body, tt.want[i][1:])
				}
			}
			if sequential == nil {
				sequential = map[string]any{}
			}
			if !reflect.DeepEqual(doc, sequential) {
				t.Errorf("hub document %v, want %v", doc, sequential)
			}
		})
	}
}

func TestComposePatches(t *testing.T) {
	tests := []struct {
		a, b, want string // want "" means not composable
	}{
		{`{"a":1}`, `{"b":2}`, `{"a":1,"b":2}`},
		{`{"a":1}`, `{"a":null}`, `{"a":null}`},
		{`{"a":null}`, `{"a":1}`, `{"a":1}`},
		{`{"a":{"x":1}}`, `{"a":{"y":null}}`, `{"a":{"x":1,"y":null}}`},
		{`{"a":{"x":1}}`, `{"a":5}`, `{"a":5}`},
		{`{"a":[1]}`, `{"a":[2]}`, `{"a":[2]}`},
		{`{}`, `{"a":{"x":null}}`, `{"a":{"x":null}}`},
		{`{"a":5}`, `{"a":{"x":1}}`, ""},
		{`{"a":null}`, `{"a":{"x":1}}`, ""},
		{`{"a":[1]}`, `{"a":{}}`, ""},
		{`{"a":{"b":"s"}}`, `{"a":{"b":{"c":1}}}`, ""},
	}
	for _, tt := range tests {
		a, b := mustDecode(t, tt.a), mustDecode(t, tt.b)
		got, ok := composePatches(a, b)
		if tt.want == "" {
			if ok {
				t.Errorf("compose(%s, %s) = %v, want not composable", tt.a, tt.b, got)
			}
			continue
		}
		if !ok || !reflect.DeepEqual(got, mustDecode(t, tt.want)) {
			t.Errorf("compose(%s, %s) = %v, %v; want %s", tt.a, tt.b, got, ok, tt.want)
		}
		if !reflect.DeepEqual(a, mustDecode(t, tt.a)) {
			t.Errorf("compose modified its first argument: %v", a)
		}
	}
}

// FuzzComposePatches checks the law the queue's coalescing relies on:
// applying the composed patch equals applying both, for any document.
func FuzzComposePatches(f *testing.F) {
	f.Add([]byte(`{"a":{"b":1}}`), []byte(`{"a":{"c":null}}`), []byte(`{"a":{"b":{"x":1}}}`))
	f.Add([]byte(`{"a":1}`), []byte(`{"a":{"c":2}}`), []byte(`{"a":{"d":4}}`))
	f.Add([]byte(`{"a":null}`), []byte(`{"b":[1]}`), []byte(`{}`))
	f.Fuzz(func(t *testing.T, aText, bText, docText []byte) {
		a, err1 := Decode(aText)
		b, err2 := Decode(bText)
		d1, err3 := Decode(docText)
		if err1 != nil || err2 != nil || err3 != nil {
			return
		}
		d2 := copyValue(d1).(map[string]any)
		c, ok := composePatches(a, b)
		if !ok {
			return
		}
		want := Merge(Merge(d1, a), b)
		got := Merge(d2, c)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("Merge(d, compose(a,b)) = %v, Merge(Merge(d,a),b) = %v", got, want)
		}
	})
}

func TestReportRejectsInvalid(t *testing.T) {
	q := openTestQueue(t, t.TempDir(), &hubSim{}, fastOpts(), zaptest.NewLogger(t))
	tests := []struct {
		name  string
		patch map[string]any
		want  string
	}{
		{"bad key", map[string]any{"fw": map[string]any{"a.b": 1}}, `fw."a.b"`},
		{"read-only key", map[string]any{"$version": 2}, "$version"},
		{"too large", func() map[string]any {
			m := map[string]any{}
			for i := range 9 {
				m["k"+strconv.Itoa(i)] = strings.Repeat("x", 4000)
			}
			return m
		}(), "exceeds 32768"},
		{"not encodable", map[string]any{"c": make(chan int)}, "not JSON-encodable"},
		{"int out of range", map[string]any{"n": int64(1) << 60}, "outside ±2^52"},
	}
	for _, tt := range tests {
		err := q.Report(tt.patch, true)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Report error = %v, want ErrInvalid naming %q", tt.name, err, tt.want)
		}
	}
	if n := q.Len(); n != 0 {
		t.Fatalf("Len = %d after rejected reports, want 0", n)
	}
	// Native Go values are accepted and stored as JSON.
	type detail struct {
		Code string `json:"code"`
	}
	if err := q.Report(map[string]any{"n": 7, "t": time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), "err": detail{"E1"}}, false); err != nil {
		t.Fatal(err)
	}
	if got, want := pending(q), []string{`P{"err":{"code":"E1"},"n":7,"t":"2026-01-02T03:04:05Z"}`}; !reflect.DeepEqual(got, want) {
		t.Fatalf("entries = %q, want %q", got, want)
	}
}

func TestOpenQueueTreatsTornFilesAsMissing(t *testing.T) {
	dir := t.TempDir()
	q := openTestQueue(t, dir, &hubSim{}, fastOpts(), zaptest.NewLogger(t))
	report(t, q, `{"status":"downloading"}`, true)
	report(t, q, `{"status":"verifying"}`, true)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(entryName(5), ``)                                                         // empty
	write(entryName(6), `{"formatVersion":1,"seq":6,"milestone":true,"patch":{"a"`) // torn
	write(entryName(7), `{"formatVersion":1,"seq":99,"milestone":true,"patch":{}}`) // wrong seq
	write(entryName(8), `{"seq":8,"patch":{}}`)                                     // no version
	write("."+entryName(9)+"123456", `{"formatVersion":1`)                          // temp file of an interrupted write
	write(entryName(10), `{"formatVersion":2,"seq":10,"patch":{"x":1}}`)            // a newer format: kept, not sent
	write("README", "not an entry")

	core, logs := observer.New(zap.WarnLevel)
	hub := &hubSim{}
	q = openTestQueue(t, dir, hub, fastOpts(), zap.New(core))
	if got, want := pending(q), []string{`M{"status":"downloading"}`, `M{"status":"verifying"}`}; !reflect.DeepEqual(got, want) {
		t.Fatalf("entries = %q, want %q", got, want)
	}
	for _, name := range []string{entryName(5), entryName(6), entryName(7), entryName(8), "." + entryName(9) + "123456"} {
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there (err %v)", name, err)
		}
	}
	for _, name := range []string{entryName(10), "README"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if n := logs.FilterMessage("removing unreadable queue entry").Len(); n != 4 {
		t.Errorf("%d unreadable-entry warnings, want 4", n)
	}
	// New entries are numbered after everything seen, including the
	// skipped newer-format file.
	report(t, q, `{"status":"applying"}`, true)
	if _, err := os.Stat(filepath.Join(dir, entryName(11))); err != nil {
		t.Fatalf("new entry not written as %s: %v", entryName(11), err)
	}
	startRun(t, q)
	flush(t, q)
	_, accepted, _ := hub.snapshot()
	want := []string{`{"status":"downloading"}`, `{"status":"verifying"}`, `{"status":"applying"}`}
	if !reflect.DeepEqual(accepted, want) {
		t.Fatalf("accepted %q, want %q", accepted, want)
	}
}

func TestOpenQueueLocksDirectory(t *testing.T) {
	dir := t.TempDir()
	q := openTestQueue(t, dir, &hubSim{}, fastOpts(), nil)
	if _, err := OpenQueue(QueueOptions{Dir: dir}, &hubSim{}, nil); !errors.Is(err, ErrLocked) {
		t.Fatalf("second OpenQueue error = %v, want ErrLocked", err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Report(map[string]any{"a": 1}, false); !errors.Is(err, ErrClosed) {
		t.Fatalf("Report after Close = %v, want ErrClosed", err)
	}
	q2 := openTestQueue(t, dir, &hubSim{}, fastOpts(), nil)
	if err := q2.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRunTwice(t *testing.T) {
	q := openTestQueue(t, t.TempDir(), &hubSim{}, fastOpts(), nil)
	ctx, cancel := context.WithCancel(t.Context())
	results := make(chan error, 2)
	for range 2 {
		go func() { results <- q.Run(ctx) }()
	}
	// Whichever came second returns at once; the other runs until cancel.
	first := <-results
	cancel()
	second := <-results
	if !errors.Is(first, ErrRunning) || second != nil {
		t.Fatalf("Run results %v, %v; want ErrRunning then nil", first, second)
	}
}

// TestNoMergeIntoEntryBeingSent: a patch reported while the tail is on the
// wire must not be acknowledged by the answer to the older body.
func TestNoMergeIntoEntryBeingSent(t *testing.T) {
	hub := &hubSim{}
	started := make(chan struct{})
	release := make(chan struct{})
	hub.setScript(func(ctx context.Context, call int, body []byte) error {
		if call == 1 {
			close(started)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	q := openTestQueue(t, t.TempDir(), hub, fastOpts(), zaptest.NewLogger(t))
	startRun(t, q)
	report(t, q, `{"pct":10}`, false)
	<-started
	report(t, q, `{"pct":20}`, false)
	report(t, q, `{"pct":30}`, false)
	if n := q.Len(); n != 2 {
		t.Fatalf("Len = %d while the first entry is being sent, want 2", n)
	}
	close(release)
	flush(t, q)
	_, accepted, _ := hub.snapshot()
	if want := []string{`{"pct":10}`, `{"pct":30}`}; !reflect.DeepEqual(accepted, want) {
		t.Fatalf("accepted %q, want %q", accepted, want)
	}
}

// TestProgressIsNotWritten: progress costs no disk write or fsync, on
// Report or on delivery; a milestone costs three fsyncs (the file, the
// directory after the rename, the directory after the removal).
func TestProgressIsNotWritten(t *testing.T) {
	dir := t.TempDir()
	hub := &hubSim{}
	q := openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
	files := func() int {
		t.Helper()
		m, err := filepath.Glob(filepath.Join(dir, "*.json"))
		if err != nil {
			t.Fatal(err)
		}
		return len(m)
	}
	for i := range 100 {
		report(t, q, fmt.Sprintf(`{"pct":%d}`, i), false)
	}
	if n, syncs := files(), q.Syncs(); n != 0 || syncs != 0 {
		t.Fatalf("after 100 progress reports: %d files, %d fsyncs; want none", n, syncs)
	}
	report(t, q, `{"status":"verifying"}`, true)
	if n, syncs := files(), q.Syncs(); n != 1 || syncs != 2 {
		t.Fatalf("after a milestone: %d files, %d fsyncs; want 1 and 2", n, syncs)
	}
	startRun(t, q)
	flush(t, q)
	if n, syncs := files(), q.Syncs(); n != 0 || syncs != 3 {
		t.Fatalf("after delivery: %d files, %d fsyncs; want 0 and 3", n, syncs)
	}
	for i := range 100 {
		report(t, q, fmt.Sprintf(`{"pct":%d}`, i), false)
	}
	flush(t, q)
	if syncs := q.Syncs(); syncs != 3 {
		t.Fatalf("%d fsyncs after progress was delivered, want still 3", syncs)
	}
	_, accepted, _ := hub.snapshot()
	if first := accepted[0]; first != `{"pct":99,"status":"verifying"}` {
		t.Fatalf("first body %s, want the milestone with the progress before it", first)
	}
	if last := accepted[len(accepted)-1]; last != `{"pct":99}` {
		t.Fatalf("last body %s, want the last progress", last)
	}
}

// TestMilestoneNotOvertaken: progress queued before a milestone reaches the
// hub before it or inside it, never after it, whatever is on the wire when
// the milestone comes; progress queued after it follows it.
func TestMilestoneNotOvertaken(t *testing.T) {
	hub := &hubSim{}
	started := make(chan struct{})
	release := make(chan struct{})
	hub.setScript(func(ctx context.Context, call int, body []byte) error {
		if call == 1 {
			close(started)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	dir := t.TempDir()
	q := openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
	startRun(t, q)
	report(t, q, `{"fw":{"pct":10}}`, false)
	<-started // pct 10 is on the wire
	report(t, q, `{"fw":{"pct":20}}`, false)
	report(t, q, `{"fw":{"pct":null},"status":"verifying"}`, true)
	report(t, q, `{"fw":{"pct":30}}`, false)
	report(t, q, `{"fw":null}`, false)
	report(t, q, `{"fw":{"slot":"B"}}`, true) // not expressible with the entry before it: follows it
	want := []string{`P{"fw":{"pct":10}}`, `M{"fw":{"pct":null},"status":"verifying"}`,
		`P{"fw":null}`, `M{"fw":{"slot":"B"}}`}
	if got := pending(q); !reflect.DeepEqual(got, want) {
		t.Fatalf("entries = %q, want %q", got, want)
	}
	close(release)
	flush(t, q)
	doc, accepted, _ := hub.snapshot()
	var bodies []string
	for _, w := range want {
		bodies = append(bodies, w[1:])
	}
	if !reflect.DeepEqual(accepted, bodies) {
		t.Fatalf("accepted %q, want %q", accepted, bodies)
	}
	if got := mustJSON(t, doc); got != `{"fw":{"slot":"B"},"status":"verifying"}` {
		t.Fatalf("hub document %s", got)
	}
}

// TestOlderProgressEntriesLoad: progress entries an older version wrote to
// disk load, take progress merged into them durably, and are sent in order
// and removed.
func TestOlderProgressEntriesLoad(t *testing.T) {
	dir := t.TempDir()
	for seq, content := range map[uint64]string{
		3: `{"formatVersion":1,"seq":3,"milestone":true,"patch":{"status":"downloading"}}`,
		4: `{"formatVersion":1,"seq":4,"milestone":false,"patch":{"fw":{"pct":40}}}`,
	} {
		if err := os.WriteFile(filepath.Join(dir, entryName(seq)), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	hub := &hubSim{}
	q := openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
	if got, want := pending(q), []string{`M{"status":"downloading"}`, `P{"fw":{"pct":40}}`}; !reflect.DeepEqual(got, want) {
		t.Fatalf("entries = %q, want %q", got, want)
	}
	report(t, q, `{"fw":{"pct":45}}`, false)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	// The file holds what memory held: nothing older comes back.
	q = openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
	if got, want := pending(q), []string{`M{"status":"downloading"}`, `P{"fw":{"pct":45}}`}; !reflect.DeepEqual(got, want) {
		t.Fatalf("entries after reopen = %q, want %q", got, want)
	}
	report(t, q, `{"status":"verifying"}`, true)
	startRun(t, q)
	flush(t, q)
	_, accepted, _ := hub.snapshot()
	if want := []string{`{"status":"downloading"}`, `{"fw":{"pct":45},"status":"verifying"}`}; !reflect.DeepEqual(accepted, want) {
		t.Fatalf("accepted %q, want %q", accepted, want)
	}
	if files, _ := filepath.Glob(filepath.Join(dir, "*.json")); len(files) != 0 {
		t.Fatalf("files left after delivery: %v", files)
	}
}

// TestTransientErrorsRetried: each transient failure keeps the entry and
// retries it; nothing is lost or sent twice after success.
func TestTransientErrorsRetried(t *testing.T) {
	tests := []struct {
		name string
		fail func(ctx context.Context) error
	}{
		{"not connected", func(context.Context) error { return iothub.ErrNotConnected }},
		{"wrapped not connected", func(context.Context) error { return fmt.Errorf("session: publish: %w", iothub.ErrNotConnected) }},
		{"408", func(context.Context) error { return &iothub.StatusError{Status: 408} }},
		{"429", func(context.Context) error {
			return &iothub.StatusError{Status: 429, Body: []byte(`{"errorCode":429001}`)}
		}},
		{"500", func(context.Context) error { return &iothub.StatusError{Status: 500} }},
		{"503", func(context.Context) error { return &iothub.StatusError{Status: 503} }},
		{"no answer (request timeout)", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }},
		{"unknown error", func(context.Context) error { return errors.New("mqtt: connection lost") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				hub := &hubSim{}
				hub.setScript(func(ctx context.Context, call int, body []byte) error {
					if call <= 3 {
						return tt.fail(ctx)
					}
					return nil
				})
				opts := QueueOptions{MinBackoff: time.Second, MaxBackoff: 10 * time.Second, RequestTimeout: 20 * time.Second}
				q := openTestQueue(t, t.TempDir(), hub, opts, zaptest.NewLogger(t))
				stop := startRun(t, q)
				report(t, q, `{"status":"completed"}`, true)
				flushWithin(t, q, time.Hour)
				_, accepted, calls := hub.snapshot()
				if len(calls) != 4 || !reflect.DeepEqual(accepted, []string{`{"status":"completed"}`}) {
					t.Fatalf("calls %d, accepted %q; want 4 calls and the body once", len(calls), accepted)
				}
				stop()
			})
		})
	}
}

func TestPermanentRejectionDropsEntry(t *testing.T) {
	for _, status := range []int{400, 403, 404, 413} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			hub := &hubSim{}
			hub.setScript(func(ctx context.Context, call int, body []byte) error {
				if strings.Contains(string(body), "rejected") {
					return &iothub.StatusError{Status: status, Body: []byte(`{"errorCode":` + strconv.Itoa(status) + `001}`)}
				}
				return nil
			})
			core, logs := observer.New(zap.InfoLevel)
			dir := t.TempDir()
			q := openTestQueue(t, dir, hub, fastOpts(), zap.New(core))
			report(t, q, `{"status":"downloading"}`, true)
			report(t, q, `{"fw":{"rejected":{"why":1},"b":2}}`, true)
			report(t, q, `{"status":"completed"}`, true)
			startRun(t, q)
			flush(t, q)
			_, accepted, calls := hub.snapshot()
			if want := []string{`{"status":"downloading"}`, `{"status":"completed"}`}; !reflect.DeepEqual(accepted, want) {
				t.Fatalf("accepted %q, want %q", accepted, want)
			}
			if len(calls) != 3 {
				t.Fatalf("%d calls, want 3 (a rejected patch is not retried)", len(calls))
			}
			entries := logs.FilterMessage("reported patch rejected by the hub; dropped").All()
			if len(entries) != 1 {
				t.Fatalf("%d rejection logs, want 1", len(entries))
			}
			ctx := entries[0].ContextMap()
			if ctx["status"] != int64(status) || !reflect.DeepEqual(ctx["keys"], []any{"fw.b", "fw.rejected.why"}) {
				t.Fatalf("rejection log fields %v", ctx)
			}
			if files, _ := filepath.Glob(filepath.Join(dir, "*.json")); len(files) != 0 {
				t.Fatalf("files left after delivery: %v", files)
			}
		})
	}
}

// TestBackoffThenSuccess checks the retry waits: they grow from MinBackoff,
// stay within the jitter band and the cap, and start again after a success.
func TestBackoffThenSuccess(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const minB, maxB = time.Second, 8 * time.Second
		hub := &hubSim{}
		hub.setScript(func(ctx context.Context, call int, body []byte) error {
			switch {
			case call <= 6:
				return &iothub.StatusError{Status: 429}
			case call == 7:
				return nil
			case call == 8:
				return &iothub.StatusError{Status: 503}
			}
			return nil
		})
		opts := QueueOptions{MinBackoff: minB, MaxBackoff: maxB, RequestTimeout: 5 * time.Second}
		q := openTestQueue(t, t.TempDir(), hub, opts, zaptest.NewLogger(t))
		startRun(t, q)
		report(t, q, `{"status":"downloading"}`, true)
		flushWithin(t, q, time.Hour)
		report(t, q, `{"status":"verifying"}`, true)
		flushWithin(t, q, time.Hour)

		_, accepted, calls := hub.snapshot()
		if want := []string{`{"status":"downloading"}`, `{"status":"verifying"}`}; !reflect.DeepEqual(accepted, want) {
			t.Fatalf("accepted %q, want %q", accepted, want)
		}
		if len(calls) != 9 {
			t.Fatalf("%d calls, want 9", len(calls))
		}
		// Expected nominal waits before calls 2..7: 1,2,4,8,8,8 s (cap),
		// each jittered by ±50% but never above the cap.
		nominal := []time.Duration{1, 2, 4, 8, 8, 8}
		for i, n := range nominal {
			gap := calls[i+1].Sub(calls[i])
			lo, hi := n*time.Second/2, min(n*time.Second*3/2, maxB)
			if gap < lo || gap > hi {
				t.Errorf("wait before call %d = %v, want within [%v, %v]", i+2, gap, lo, hi)
			}
		}
		// After the success the backoff starts again at MinBackoff.
		if gap := calls[8].Sub(calls[7]); gap < minB/2 || gap > minB*3/2 {
			t.Errorf("wait after reset = %v, want within [%v, %v]", gap, minB/2, minB*3/2)
		}
	})
}

// TestWakeCutsBackoffShort: when the connection comes back the queue
// retries at once instead of finishing a long wait; a Wake that came
// before an attempt does not shorten the wait after it.
func TestWakeCutsBackoffShort(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hub := &hubSim{}
		var mu sync.Mutex
		online := false
		hub.setScript(func(ctx context.Context, call int, body []byte) error {
			mu.Lock()
			defer mu.Unlock()
			if !online {
				return iothub.ErrNotConnected
			}
			return nil
		})
		opts := QueueOptions{MinBackoff: time.Hour, MaxBackoff: time.Hour, RequestTimeout: time.Minute}
		q := openTestQueue(t, t.TempDir(), hub, opts, zaptest.NewLogger(t))
		q.Wake() // stale: nothing to retry yet
		startRun(t, q)
		report(t, q, `{"status":"completed"}`, true)
		synctest.Wait()
		_, _, calls := hub.snapshot()
		if len(calls) != 1 {
			t.Fatalf("%d calls, want 1 (the stale Wake must not cause a retry)", len(calls))
		}
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if _, _, calls = hub.snapshot(); len(calls) != 1 {
			t.Fatalf("%d calls after 10 minutes of a ≥30 minute backoff, want 1", len(calls))
		}

		mu.Lock()
		online = true
		mu.Unlock()
		woke := time.Now()
		q.Wake()
		synctest.Wait()
		_, accepted, calls := hub.snapshot()
		if len(accepted) != 1 || q.Len() != 0 {
			t.Fatalf("accepted %q, Len %d after Wake; want delivery", accepted, q.Len())
		}
		if d := calls[1].Sub(woke); d != 0 {
			t.Fatalf("retry came %v after Wake, want at once", d)
		}
	})
}

// TestIdleQueueSleeps: with nothing to send, Run makes no calls however
// long it waits, and delivers as soon as something is reported.
func TestIdleQueueSleeps(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hub := &hubSim{}
		q := openTestQueue(t, t.TempDir(), hub, QueueOptions{}, zaptest.NewLogger(t))
		startRun(t, q)
		time.Sleep(24 * time.Hour)
		synctest.Wait()
		if _, _, calls := hub.snapshot(); len(calls) != 0 {
			t.Fatalf("%d calls on an idle queue", len(calls))
		}
		start := time.Now()
		report(t, q, `{"a":1}`, false)
		synctest.Wait()
		_, accepted, calls := hub.snapshot()
		if len(accepted) != 1 || !calls[0].Equal(start) {
			t.Fatalf("accepted %q at %v, want at once", accepted, calls)
		}
	})
}

func TestFlush(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hub := &hubSim{}
		var mu sync.Mutex
		online := false
		hub.setScript(func(ctx context.Context, call int, body []byte) error {
			mu.Lock()
			defer mu.Unlock()
			if !online {
				return iothub.ErrNotConnected
			}
			return nil
		})
		opts := QueueOptions{MinBackoff: time.Second, MaxBackoff: time.Minute, RequestTimeout: time.Minute}
		q := openTestQueue(t, t.TempDir(), hub, opts, zaptest.NewLogger(t))
		// Flush of an empty queue returns at once, even without Run.
		if err := q.Flush(t.Context()); err != nil {
			t.Fatal(err)
		}
		startRun(t, q)
		report(t, q, `{"status":"failed"}`, true)
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
		err := q.Flush(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || q.Len() != 1 {
			t.Fatalf("Flush while offline = %v with Len %d; want DeadlineExceeded and 1 pending", err, q.Len())
		}
		mu.Lock()
		online = true
		mu.Unlock()
		q.Wake()
		ctx, cancel = context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		if err := q.Flush(ctx); err != nil {
			t.Fatalf("Flush after reconnect: %v", err)
		}
	})
}

// TestOrderUnderRandomFailures reports a firmware-update-like stream while
// the hub fails at random, and checks that the hub ends with the document
// the patches make applied one by one and saw every milestone in order.
func TestOrderUnderRandomFailures(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var rngMu sync.Mutex
	hub := &hubSim{}
	hub.setScript(func(ctx context.Context, call int, body []byte) error {
		rngMu.Lock()
		r := rng.IntN(10)
		rngMu.Unlock()
		switch r {
		case 0:
			return iothub.ErrNotConnected
		case 1:
			return &iothub.StatusError{Status: 429}
		case 2:
			return &iothub.StatusError{Status: 500}
		}
		return nil
	})
	q := openTestQueue(t, t.TempDir(), hub, fastOpts(), zap.NewNop())
	startRun(t, q)
	var want map[string]any
	var milestones []string
	for i := 1; i <= 300; i++ {
		var p map[string]any
		milestone := i%10 == 0
		if milestone {
			state := "s" + strconv.Itoa(i)
			milestones = append(milestones, state)
			p = map[string]any{"state": state, "fw": map[string]any{"pct": nil, "step": json.Number(strconv.Itoa(i))}}
		} else {
			p = map[string]any{"fw": map[string]any{"pct": json.Number(strconv.Itoa(i))}}
		}
		if err := q.Report(p, milestone); err != nil {
			t.Fatal(err)
		}
		want = Merge(want, mustDecode(t, mustJSON(t, p)))
		if i%7 == 0 {
			q.Wake() // as a flapping connection would
		}
	}
	flush(t, q)
	doc, accepted, _ := hub.snapshot()
	if !reflect.DeepEqual(doc, want) {
		t.Fatalf("hub document %v, want %v", doc, want)
	}
	var seen []string
	for _, body := range accepted {
		if s, ok := mustDecode(t, body)["state"].(string); ok {
			seen = append(seen, s)
		}
	}
	if !reflect.DeepEqual(seen, milestones) {
		t.Fatalf("milestones seen by the hub %q, want %q", seen, milestones)
	}
}

func mustJSON(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// crashChild is the process the crash test kills: it reports a stream of
// patches and prints "ack N" after each Report has returned.
func crashChild(dir string) int {
	q, err := OpenQueue(QueueOptions{Dir: dir}, &hubSim{}, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	for i := 1; i <= 1_000_000; i++ {
		if err := q.Report(crashPatch(i), i%5 == 0); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		// os.Stdout is unbuffered: the line is out before the next Report.
		fmt.Fprintf(os.Stdout, "ack %d\n", i)
	}
	return 0
}

// crashPatch i: every 5th is a milestone with a state; the others are
// progress.
func crashPatch(i int) map[string]any {
	if i%5 == 0 {
		return map[string]any{"counter": i, "state": "s" + strconv.Itoa(i), "progress": nil}
	}
	return map[string]any{"counter": i, "progress": map[string]any{"pct": i}}
}

// TestCrashKill re-executes the test binary, lets it report patches, kills
// it with SIGKILL after a number of acknowledgements, and checks that the
// reopened queue delivers every acknowledged milestone, in order, and no
// progress after the last one.
func TestCrashKill(t *testing.T) {
	for _, killAfter := range []int{1, 4, 5, 37, 250} {
		t.Run("after"+strconv.Itoa(killAfter), func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashDirEnv+"="+dir)
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			acked := 0
			sc := bufio.NewScanner(out)
			for acked < killAfter && sc.Scan() {
				n, err := strconv.Atoi(strings.TrimPrefix(sc.Text(), "ack "))
				if err != nil {
					t.Fatalf("child wrote %q", sc.Text())
				}
				acked = n
			}
			// Kill while the child is in the middle of further Reports.
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			// Acknowledgements already in the pipe count too.
			for sc.Scan() {
				if n, err := strconv.Atoi(strings.TrimPrefix(sc.Text(), "ack ")); err == nil {
					acked = n
				}
			}
			err = cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child ended with %v, want killed by SIGKILL", err)
			}
			if acked < killAfter {
				t.Fatalf("child acknowledged only %d reports", acked)
			}

			hub := &hubSim{}
			q := openTestQueue(t, dir, hub, fastOpts(), zaptest.NewLogger(t))
			startRun(t, q)
			flush(t, q)
			doc, accepted, _ := hub.snapshot()

			// The last acknowledged milestone (or a later one whose Report
			// was cut short after persisting) reached the hub, with the
			// progress reported before it. Progress after it was in memory
			// only and is gone.
			lastMilestone := acked / 5 * 5
			if len(accepted) == 0 {
				if lastMilestone > 0 {
					t.Fatalf("nothing delivered after the restart, want milestones up to s%d", lastMilestone)
				}
				return
			}
			counter, err := doc["counter"].(json.Number).Int64()
			if err != nil || int(counter) < lastMilestone || counter%5 != 0 {
				t.Fatalf("hub counter %v, want a milestone's, ≥ %d (acknowledged)", doc["counter"], lastMilestone)
			}
			if doc["progress"] != nil {
				t.Fatalf("hub progress %v after the last milestone, want null (progress is not persisted)", doc["progress"])
			}
			// Every milestone up to the last acknowledged one, in order, and
			// counters only grow.
			var states []string
			last := int64(0)
			for _, body := range accepted {
				p := mustDecode(t, body)
				c, _ := p["counter"].(json.Number).Int64()
				if c <= last {
					t.Fatalf("counter went from %d to %d: out of order", last, c)
				}
				last = c
				if s, ok := p["state"].(string); ok {
					states = append(states, s)
				}
			}
			for m := 5; m <= acked; m += 5 {
				if len(states) < m/5 || states[m/5-1] != "s"+strconv.Itoa(m) {
					t.Fatalf("milestones delivered %q, want s5…s%d in order", states, acked/5*5)
				}
			}
			t.Logf("killed after %d acknowledged reports; %d entries delivered", acked, len(accepted))
		})
	}
}
