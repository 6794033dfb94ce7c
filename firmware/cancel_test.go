package firmware_test

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

// cancelWithin is how long a test lets Cancel take: far less than any wait
// the tests leave running (hour-long backoff, stalled reads), far more than
// a loaded machine needs to stop a step.
const cancelWithin = 10 * time.Second

func cancelNow(t *testing.T, m *firmware.Manager, id string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cancelWithin)
	defer cancel()
	return m.Cancel(ctx, id)
}

// watchedAB is plainFile whose sinks say when they are written after being
// closed, or after the test has declared the update over.
type watchedAB struct {
	plainFile
	over       atomic.Bool // set by the test once Cancel has returned
	late       atomic.Int64
	openSinks  atomic.Int64
	prepare    func(ctx context.Context) error // nil: nothing to prepare
	applyBlock chan struct{}                   // non-nil: Apply waits for it to be closed
	applying   chan struct{}                   // closed when Apply starts
}

type watchedSink struct {
	firmware.Sink
	ab     *watchedAB
	closed atomic.Bool
}

func (s *watchedSink) Write(p []byte) (int, error) {
	if s.closed.Load() || s.ab.over.Load() {
		s.ab.late.Add(1)
	}
	return s.Sink.Write(p)
}

func (s *watchedSink) Close() error {
	s.closed.Store(true)
	s.ab.openSinks.Add(-1)
	return s.Sink.Close()
}

func (w *watchedAB) Open(ctx context.Context, u firmware.Update, off int64) (firmware.Sink, error) {
	s, err := w.plainFile.Open(ctx, u, off)
	if err != nil {
		return nil, err
	}
	w.openSinks.Add(1)
	return &watchedSink{Sink: s, ab: w}, nil
}

func (w *watchedAB) Prepare(ctx context.Context, u firmware.Update) error {
	if w.prepare == nil {
		return nil
	}
	return w.prepare(ctx)
}

func (w *watchedAB) Apply(ctx context.Context, u firmware.Update) error {
	if w.applyBlock != nil {
		close(w.applying)
		select {
		case <-w.applyBlock:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return w.plainFile.Apply(ctx, u)
}

// slowServe serves the first k bytes of body, then stalls until the client
// goes away: a download stuck in the middle of a read.
func slowServe(k int) func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
	return func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		w.Write(body[:k])
		http.NewResponseController(w).Flush()
		<-r.Context().Done()
		return true
	}
}

// waitFor waits (bounded) until a Progress matches.
func (r *recorder) waitFor(t *testing.T, what string, match func(firmware.Progress) bool) firmware.Progress {
	t.Helper()
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	for {
		for _, p := range r.list() {
			if match(p) {
				return p
			}
		}
		select {
		case <-r.wake:
		case <-deadline.C:
			t.Fatalf("no progress with %s within 30s; phases so far: %v", what, r.phases())
		}
	}
}

// checkCancelled checks what a cancel leaves: the update failed with code
// cancelled as the last progress, not busy, no checkpoint, no sink open
// and no write to one after Cancel returned.
func checkCancelled(t *testing.T, m *firmware.Manager, rec *recorder, ab *watchedAB, dir, id string) {
	t.Helper()
	ab.over.Store(true)
	all := rec.list()
	last := all[len(all)-1]
	if last.UpdateID != id || last.Phase != firmware.PhaseFailed || last.Err == nil || last.Err.Code != firmware.CodeCancelled {
		t.Errorf("last progress %+v (err %+v), want failed with code cancelled", last, last.Err)
	}
	if st := m.Status(); st.Busy || st.Phase != firmware.PhaseFailed {
		t.Errorf("status after cancel: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(dir, "download.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("download checkpoint still there after cancel (stat: %v)", err)
	}
	if n := ab.openSinks.Load(); n != 0 {
		t.Errorf("%d sinks still open when Cancel returned", n)
	}
	if n := ab.late.Load(); n != 0 {
		t.Errorf("%d writes to the slot after its sink was closed or Cancel returned", n)
	}
}

func TestCancelDuringDownload(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(cfg *firmware.Config, srv *imageServer)
	}{
		// The connection delivers some bytes, then nothing: the read is
		// stuck long before the idle timeout would notice.
		{"mid-read", func(cfg *firmware.Config, srv *imageServer) {
			cfg.IdleTimeout, cfg.StallTimeout = time.Hour, time.Hour
			srv.setFault(slowServe(1 << 20))
		}},
		// Every attempt fails and the backoff before the next one is an hour.
		{"mid-backoff", func(cfg *firmware.Config, srv *imageServer) {
			cfg.RetryInitialInterval, cfg.RetryMaxInterval, cfg.RetryMaxElapsed = time.Hour, time.Hour, 2*time.Hour
			// Else the stall timeout ends the update before the backoff.
			cfg.StallTimeout = 3 * time.Hour
			srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n == 1 {
					cutAfter(w, r, body, 1<<20)
				} else {
					http.Error(w, "try later", http.StatusServiceUnavailable)
				}
				return true
			})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newImageServer(t)
			img := randomImage(t, 4<<20)
			url := srv.add("/fw.img", img)
			ab := &watchedAB{plainFile: plainFile{&fileAB{dir: t.TempDir()}}}
			rec := newRecorder()
			dir := t.TempDir()
			cfg := testConfig(t, dir, ab, rec)
			tc.setup(&cfg, srv)
			m := startManager(t, cfg)

			id, err := m.Start(firmware.Request{URI: url, Version: "2.0.0", SHA256: sha(img)})
			if err != nil {
				t.Fatal(err)
			}
			rec.waitFor(t, "bytes downloaded", func(p firmware.Progress) bool {
				return p.Phase == firmware.PhaseDownloading && p.Bytes > 0
			})
			if tc.name == "mid-backoff" {
				// The first connection was cut: wait for the retry's 503.
				for deadline := time.Now().Add(30 * time.Second); srv.requests.Load() < 2; time.Sleep(5 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatal("no second request within 30s")
					}
				}
			}
			got, err := cancelNow(t, m.Manager, "")
			if err != nil || got != id {
				t.Fatalf("Cancel = %q, %v; want %q", got, err, id)
			}
			checkCancelled(t, m.Manager, rec, ab, dir, id)

			// Cancelling again: it has ended.
			if _, err := cancelNow(t, m.Manager, id); !errors.Is(err, firmware.ErrNotCancellable) {
				t.Errorf("second Cancel: %v, want ErrNotCancellable", err)
			}

			// The next update is accepted at once and runs.
			srv.setFault(nil)
			id2, err := m.Start(firmware.Request{URI: url, Version: "2.0.1", SHA256: sha(img)})
			if err != nil {
				t.Fatalf("Start after cancel: %v", err)
			}
			last := rec.waitFor(t, "the second update's end", func(p firmware.Progress) bool {
				return p.UpdateID == id2 && p.Phase.Terminal()
			})
			if last.Phase != firmware.PhaseCompleted {
				t.Fatalf("second update ended %s: %+v", last.Phase, last.Err)
			}
			b, err := os.ReadFile(ab.slot("B"))
			if err != nil || sha(b) != sha(img) {
				t.Errorf("slot after the second update differs from the image (err %v)", err)
			}
		})
	}
}

func TestCancelInStandBy(t *testing.T) {
	preparing := make(chan struct{})
	ab := &watchedAB{plainFile: plainFile{&fileAB{dir: t.TempDir()}}}
	ab.prepare = func(ctx context.Context) error {
		close(preparing)
		<-ctx.Done() // a stand-by wait that would never end by itself
		return ctx.Err()
	}
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 1<<20))
	rec := newRecorder()
	dir := t.TempDir()
	m := startManager(t, testConfig(t, dir, ab, rec))
	id, err := m.Start(firmware.Request{URI: url})
	if err != nil {
		t.Fatal(err)
	}
	<-preparing
	if got, err := cancelNow(t, m.Manager, id); err != nil || got != id {
		t.Fatalf("Cancel(%s) = %q, %v", id, got, err)
	}
	checkCancelled(t, m.Manager, rec, ab, dir, id)
	if n := srv.requests.Load(); n != 0 {
		t.Errorf("%d requests to the image server after a cancel in stand-by", n)
	}
	want := []firmware.Phase{firmware.PhaseAccepted, firmware.PhaseFailed}
	if got := rec.phases(); len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("phases %v, want %v", got, want)
	}
}

// blockingStored is a stored image whose reads wait until the read-back's
// context is done: a verification that takes as long as it is let.
type blockingStored struct {
	ctx     context.Context
	reading chan struct{}
	once    *atomic.Bool
}

func (b blockingStored) Section(off, n int64) (io.Reader, error) { return b, nil }
func (b blockingStored) Close() error                            { return nil }
func (b blockingStored) Read(p []byte) (int, error) {
	if b.once.CompareAndSwap(false, true) {
		close(b.reading)
	}
	<-b.ctx.Done()
	return 0, b.ctx.Err()
}

type slowVerifyAB struct {
	*watchedAB
	reading chan struct{}
	once    atomic.Bool
}

func (s *slowVerifyAB) ReadBack(ctx context.Context, u firmware.Update) (firmware.StoredImage, error) {
	return blockingStored{ctx: ctx, reading: s.reading, once: &s.once}, nil
}

// TestCancelWhileVerifying stops the agent once the download is complete
// (the record says verifying), restarts it on a storage whose read-back
// never finishes, and cancels the verification that the restart runs.
func TestCancelWhileVerifying(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 2<<20)
	url := srv.add("/fw.img", img)
	ab := &watchedAB{plainFile: plainFile{&fileAB{dir: t.TempDir()}}}
	dir := t.TempDir()

	rec1 := newRecorder()
	cfg1 := testConfig(t, dir, ab, rec1)
	ctx1, stop1 := context.WithCancel(context.Background())
	cfg1.Observer = func(p firmware.Progress) {
		rec1.observe(p)
		if p.Phase == firmware.PhaseVerifying {
			stop1() // the agent stops as verification begins
		}
	}
	m1, err := firmware.NewManager(cfg1)
	if err != nil {
		t.Fatal(err)
	}
	id, err := m1.Start(firmware.Request{URI: url, SHA256: sha(img)})
	if err != nil {
		t.Fatal(err)
	}
	if err := m1.Run(ctx1); err != nil {
		t.Fatal(err)
	}
	if st := m1.Status(); st.Phase != firmware.PhaseVerifying {
		t.Fatalf("first run stopped in %s, want verifying", st.Phase)
	}

	slow := &slowVerifyAB{watchedAB: ab, reading: make(chan struct{})}
	rec := newRecorder()
	m := startManager(t, testConfig(t, dir, slow, rec))
	<-slow.reading
	if got, err := cancelNow(t, m.Manager, ""); err != nil || got != id {
		t.Fatalf("Cancel = %q, %v", got, err)
	}
	checkCancelled(t, m.Manager, rec, ab, dir, id)
	if n := ab.applies.Load(); n != 0 {
		t.Errorf("Apply called %d times after a cancel in verifying", n)
	}
}

func TestCancelAfterPointOfNoReturn(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 1<<20)
	url := srv.add("/fw.img", img)
	ab := &watchedAB{plainFile: plainFile{&fileAB{dir: t.TempDir()}},
		applyBlock: make(chan struct{}), applying: make(chan struct{})}
	rec := newRecorder()
	m := startManager(t, testConfig(t, t.TempDir(), ab, rec))

	if _, err := cancelNow(t, m.Manager, ""); !errors.Is(err, firmware.ErrNoUpdate) {
		t.Errorf("Cancel with no update: %v, want ErrNoUpdate", err)
	}
	id, err := m.Start(firmware.Request{URI: url, SHA256: sha(img)})
	if err != nil {
		t.Fatal(err)
	}
	<-ab.applying
	_, err = cancelNow(t, m.Manager, id)
	var nc *firmware.NotCancellableError
	if !errors.As(err, &nc) || nc.Phase != firmware.PhaseApplying || nc.UpdateID != id {
		t.Fatalf("Cancel while applying: %v, want NotCancellableError in applying", err)
	}
	if _, err := cancelNow(t, m.Manager, "another-update"); !errors.Is(err, firmware.ErrNoUpdate) {
		t.Errorf("Cancel of another id: %v, want ErrNoUpdate", err)
	}
	close(ab.applyBlock)
	if last := rec.waitTerminal(t, 30*time.Second); last.Phase != firmware.PhaseCompleted {
		t.Fatalf("update ended %s (%+v), want completed: a refused cancel must not disturb it", last.Phase, last.Err)
	}
	_, err = cancelNow(t, m.Manager, id)
	if !errors.As(err, &nc) || nc.Phase != firmware.PhaseCompleted {
		t.Errorf("Cancel after completion: %v, want NotCancellableError in completed", err)
	}
}

func TestRestartAfterCancelDoesNotResume(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 4<<20)
	url := srv.add("/fw.img", img)
	srv.setFault(slowServe(1 << 20))
	ab := &watchedAB{plainFile: plainFile{&fileAB{dir: t.TempDir()}}}
	dir := t.TempDir()
	rec := newRecorder()
	cfg := testConfig(t, dir, ab, rec)
	cfg.IdleTimeout = time.Hour
	m := startManager(t, cfg)
	id, err := m.Start(firmware.Request{URI: url, SHA256: sha(img)})
	if err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "bytes downloaded", func(p firmware.Progress) bool { return p.Bytes > 0 })
	if _, err := cancelNow(t, m.Manager, id); err != nil {
		t.Fatal(err)
	}
	m.stop(t)
	requests := srv.requests.Load()

	// The restarted agent sees the cancelled update as failed and does
	// nothing with it.
	srv.setFault(nil)
	rec2 := newRecorder()
	m2 := startManager(t, testConfig(t, dir, ab, rec2))
	st := m2.Status()
	if st.Busy || st.UpdateID != id || st.Phase != firmware.PhaseFailed || st.Err == nil || st.Err.Code != firmware.CodeCancelled {
		t.Fatalf("status after restart: %+v (err %+v)", st, st.Err)
	}
	id2, err := m2.Start(firmware.Request{URI: url, SHA256: sha(img)})
	if err != nil {
		t.Fatalf("Start after restart: %v", err)
	}
	last := rec2.waitTerminal(t, 30*time.Second)
	if last.UpdateID != id2 || last.Phase != firmware.PhaseCompleted {
		t.Fatalf("after restart: %+v", last)
	}
	for _, p := range rec2.list() {
		if p.UpdateID == id && p.Phase != firmware.PhaseFailed {
			t.Errorf("the cancelled update was resumed: %+v", p)
		}
	}
	if got := srv.requests.Load() - requests; got != 1 {
		t.Errorf("%d image requests after the restart, want 1 (the new update's)", got)
	}
}

func TestParseCancel(t *testing.T) {
	for _, tc := range []struct {
		in, id string
		bad    bool
	}{
		{in: "", id: ""},
		{in: "  ", id: ""},
		{in: "null", id: ""},
		{in: "{}", id: ""},
		{in: `{"updateId":"abc"}`, id: "abc"},
		{in: `{"updateId":" abc ","other":1}`, id: "abc"},
		{in: `{"updateId":null}`, id: ""},
		{in: `{"updateId":5}`, bad: true},
		{in: `"abc"`, bad: true},
		{in: `[]`, bad: true},
		{in: `{"updateId":"a"} x`, bad: true},
		{in: `{"updateId":"a\u202eb"}`, bad: true},
		{in: `{`, bad: true},
	} {
		id, err := firmware.ParseCancel([]byte(tc.in))
		if tc.bad != (err != nil) || id != tc.id {
			t.Errorf("ParseCancel(%q) = %q, %v", tc.in, id, err)
		}
		if err != nil && !errors.Is(err, firmware.ErrInvalidRequest) {
			t.Errorf("ParseCancel(%q): %v does not wrap ErrInvalidRequest", tc.in, err)
		}
	}
}

func FuzzParseCancel(f *testing.F) {
	for _, s := range []string{"", "null", "{}", `{"updateId":"x"}`, `{"updateId":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := firmware.ParseCancel(b)
		if err != nil && id != "" {
			t.Fatalf("id %q with error %v", id, err)
		}
		if err != nil && !errors.Is(err, firmware.ErrInvalidRequest) {
			t.Fatalf("error %v does not wrap ErrInvalidRequest", err)
		}
	})
}
