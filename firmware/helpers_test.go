package firmware_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/renameio/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/firmware"
)

// ---- images and servers -------------------------------------------------

func randomImage(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// imageServer serves images from memory with Range support (http.ServeContent)
// and lets a test inject faults per request. It counts requests and body
// bytes written.
type imageServer struct {
	*httptest.Server
	mu     sync.Mutex
	files  map[string][]byte
	ranges []string        // Range header of every request, "" for none
	paths  []string        // path of every request
	sent   []*atomic.Int64 // body bytes written, per request
	// fault, when set, may handle the request itself (returns true).
	fault func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool

	requests atomic.Int64
	served   atomic.Int64
}

func newImageServer(t testing.TB) *imageServer {
	s := &imageServer{files: map[string][]byte{}}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.handle))
	// A panicking handler must fail the test, not pass as a "cut connection".
	s.Config.ErrorLog = log.New(panicWatch{t}, "", 0)
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func (s *imageServer) add(path string, b []byte) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[path] = b
	return s.URL + path
}

func (s *imageServer) setFault(f func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault = f
}

func (s *imageServer) rangeHeaders() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ranges...)
}

type panicWatch struct{ t testing.TB }

func (p panicWatch) Write(b []byte) (int, error) {
	if bytes.Contains(b, []byte("panic")) {
		p.t.Errorf("test server: %s", b)
	}
	return len(b), nil
}

type countingWriter struct {
	http.ResponseWriter
	n, req *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	c.req.Add(int64(n))
	return n, err
}

// imageRanges returns the Range headers of image (not signature) requests
// from request index i on.
func (s *imageServer) imageRanges(i int) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for j := i; j < len(s.ranges); j++ {
		if !strings.HasSuffix(s.paths[j], ".minisig") {
			out = append(out, s.ranges[j])
		}
	}
	return out
}

// sentBy returns the body bytes written for each request from index i on.
func (s *imageServer) sentBy(i int) []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int64
	for j := i; j < len(s.sent); j++ {
		if !strings.HasSuffix(s.paths[j], ".minisig") {
			out = append(out, s.sent[j].Load())
		}
	}
	return out
}

func (c countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

func (s *imageServer) handle(w http.ResponseWriter, r *http.Request) {
	n := int(s.requests.Add(1))
	s.mu.Lock()
	body, ok := s.files[r.URL.Path]
	fault := s.fault
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	s.paths = append(s.paths, r.URL.Path)
	reqSent := new(atomic.Int64)
	s.sent = append(s.sent, reqSent)
	s.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	cw := countingWriter{w, &s.served, reqSent}
	if fault != nil && fault(n, cw, r, body) {
		return
	}
	w.Header().Set("ETag", `"`+sha(body)[:16]+`"`)
	http.ServeContent(cw, r, filepath.Base(r.URL.Path), time.Unix(1700000000, 0), strings.NewReader(string(body)))
}

// cutAfter writes the headers of a full answer (or a 206 for a Range
// request), sends only k body bytes and then drops the connection.
func cutAfter(w http.ResponseWriter, r *http.Request, body []byte, k int) {
	start := 0
	if rg := r.Header.Get("Range"); rg != "" {
		start, _ = strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(rg, "bytes="), "-"))
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(body)-1, len(body)))
		w.Header().Set("Content-Length", strconv.Itoa(len(body)-start))
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
	}
	end := min(start+k, len(body))
	w.Write(body[start:end])
	http.NewResponseController(w).Flush()
	conn, _, err := http.NewResponseController(w).Hijack()
	if err == nil {
		conn.Close()
	}
}

// ---- a file-backed A/B test backend --------------------------------------

// abEnv is the test bootloader environment, kept in a file.
type abEnv struct {
	Committed string `json:"committed"` // slot that boots when no trial is armed
	Trial     string `json:"trial"`     // slot armed for one trial boot
	Running   string `json:"running"`   // slot the "device" runs now
	Rebooted  int    `json:"rebooted"`
}

// fileAB writes images to real files: slot B is the inactive slot. Reboot
// "boots" the armed slot and then calls onReboot (which stops the Manager,
// as a real reboot would). Abilities can be switched off to test the
// optional-interface paths.
type fileAB struct {
	dir      string
	onReboot func()
	// verifyErr, when set, makes VerifyBoot fail (the new image "did not
	// come up").
	verifyErr error
	applyErr  error
	// rebootNoop makes Reboot leave the device on the slot it runs (a
	// reboot that never takes effect).
	rebootNoop bool
	applies    atomic.Int32
	// appliesReadBack counts the Apply calls told that the image was just
	// read back and matched (Update.ReadBackVerified).
	appliesReadBack atomic.Int32
	commits         atomic.Int32
	rollbacks       atomic.Int32
	// readBack counts the bytes read back (ReadBack) in this process.
	readBack atomic.Int64
}

func (f *fileAB) slot(name string) string { return filepath.Join(f.dir, "slot"+name) }

func (f *fileAB) env() abEnv {
	e := abEnv{Committed: "A", Running: "A"}
	if b, err := os.ReadFile(filepath.Join(f.dir, "env.json")); err == nil {
		json.Unmarshal(b, &e)
	}
	return e
}

func (f *fileAB) setEnv(e abEnv) error {
	b, _ := json.Marshal(e)
	return renameio.WriteFile(filepath.Join(f.dir, "env.json"), b, 0o600)
}

type fileSink struct{ *os.File }

func (f *fileAB) Open(ctx context.Context, u firmware.Update, offset int64) (firmware.Sink, error) {
	fh, err := os.OpenFile(f.slot("B"), os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := fh.Seek(offset, io.SeekStart); err != nil {
		fh.Close()
		return nil, err
	}
	return fileSink{fh}, nil
}

func (f *fileAB) ReadBack(ctx context.Context, u firmware.Update) (firmware.StoredImage, error) {
	fh, err := os.Open(f.slot("B"))
	if err != nil {
		return nil, err
	}
	return fileStored{fh, &f.readBack}, nil
}

var _ firmware.ReadBacker = (*fileAB)(nil)

// fileStored reads a slot file back. It does not drop the page cache (abpart
// does): these tests are about the state machine, not the storage.
type fileStored struct {
	*os.File
	read *atomic.Int64 // bytes read back
}

func (f fileStored) Section(off, n int64) (io.Reader, error) {
	return countingReader{io.NewSectionReader(f.File, off, n), f.read}, nil
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (f *fileAB) Apply(ctx context.Context, u firmware.Update) error {
	f.applies.Add(1)
	if u.ReadBackVerified {
		f.appliesReadBack.Add(1)
	}
	if f.applyErr != nil {
		return f.applyErr
	}
	e := f.env()
	e.Trial = "B"
	return f.setEnv(e)
}

func (f *fileAB) TargetSlot(ctx context.Context, u firmware.Update) (string, error) { return "B", nil }

// abInstaller is fileAB with every ability; plainFile has only the core and
// ReadBack.
type abInstaller struct{ *fileAB }

func (f abInstaller) Reboot(ctx context.Context) error {
	e := f.env()
	if f.rebootNoop {
		// nothing changes
	} else if e.Trial != "" {
		e.Running, e.Trial = e.Trial, ""
	} else {
		e.Running = e.Committed
	}
	e.Rebooted++
	if err := f.setEnv(e); err != nil {
		return err
	}
	if f.onReboot != nil {
		f.onReboot()
	}
	return nil
}

func (f abInstaller) VerifyBoot(ctx context.Context, u firmware.Update) error {
	if f.verifyErr != nil {
		return f.verifyErr
	}
	e := f.env()
	if e.Running == "B" {
		return nil
	}
	if e.Trial == "B" {
		return firmware.ErrRebootPending
	}
	return errors.New("the bootloader fell back to slot A")
}

func (f abInstaller) Commit(ctx context.Context, u firmware.Update) error {
	f.commits.Add(1)
	e := f.env()
	e.Committed = e.Running
	return f.setEnv(e)
}

func (f abInstaller) Rollback(ctx context.Context, u firmware.Update) error {
	f.rollbacks.Add(1)
	e := f.env()
	e.Trial = ""
	e.Committed = "A"
	if err := f.setEnv(e); err != nil {
		return err
	}
	if e.Running != "A" {
		return firmware.ErrRebootPending
	}
	return nil
}

type plainFile struct{ *fileAB }

// ---- running a manager ---------------------------------------------------

// recorder collects Progress and lets a test wait for a phase.
type recorder struct {
	mu   sync.Mutex
	all  []firmware.Progress
	wake chan struct{}
}

func newRecorder() *recorder { return &recorder{wake: make(chan struct{}, 1)} }

func (r *recorder) observe(p firmware.Progress) {
	r.mu.Lock()
	r.all = append(r.all, p)
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *recorder) list() []firmware.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]firmware.Progress(nil), r.all...)
}

// phases lists the distinct phases in order (consecutive repeats dropped).
func (r *recorder) phases() []firmware.Phase {
	var out []firmware.Phase
	for _, p := range r.list() {
		if len(out) == 0 || out[len(out)-1] != p.Phase {
			out = append(out, p.Phase)
		}
	}
	return out
}

// waitTerminal waits (bounded) for a terminal Progress and returns it.
func (r *recorder) waitTerminal(t testing.TB, timeout time.Duration) firmware.Progress {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		for _, p := range r.list() {
			if p.Phase.Terminal() {
				return p
			}
		}
		select {
		case <-r.wake:
		case <-deadline.C:
			t.Fatalf("no terminal phase within %s; phases so far: %v", timeout, r.phases())
		}
	}
}

func testConfig(t testing.TB, dir string, inst firmware.Installer, rec *recorder) firmware.Config {
	var log *zap.Logger
	if tt, ok := t.(*testing.T); ok {
		log = zaptest.NewLogger(tt, zaptest.Level(zap.WarnLevel))
	} else {
		log = zap.NewNop()
	}
	return firmware.Config{
		StateDir:             dir,
		Installer:            inst,
		Observer:             rec.observe,
		Log:                  log,
		CurrentVersion:       "1.0.0",
		IdleTimeout:          2 * time.Second,
		RetryInitialInterval: 20 * time.Millisecond,
		RetryMaxInterval:     200 * time.Millisecond,
		RetryMaxElapsed:      20 * time.Second,
		CheckpointBytes:      256 << 10,
		RebootTimeout:        20 * time.Second,
	}
}

// running is a Manager with its Run goroutine.
type running struct {
	*firmware.Manager
	cancel context.CancelFunc
	done   chan error
}

func startManager(t testing.TB, cfg firmware.Config) *running {
	t.Helper()
	m, err := firmware.NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Manager: m, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- m.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels Run and waits (bounded) for it to return.
func (r *running) stop(t testing.TB) {
	t.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok && err != nil {
			t.Errorf("Run: %v", err)
		}
		if ok {
			close(r.done)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of cancel")
	}
}

func freePortURL(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr + "/img"
}
