package firmware_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
)

// volatileSink models a disk with a page cache: Write lands in memory that a
// crash loses, Sync copies what was written before it started to the
// durable copy, which is all a crash leaves. Each Sync waits for the test
// to release it, so the test decides how far behind the storage is.
type volatileSink struct {
	mu       sync.Mutex
	cache    []byte // what reads would see (written, maybe not durable)
	durable  []byte // what survives a crash
	written  int64
	inSync   bool
	syncs    int
	release  chan struct{} // one receive per Sync
	free     chan struct{} // closed: Syncs no longer wait
	maxAhead int64         // largest written - durable seen by a Write
}

func (s *volatileSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cache = append(s.cache, p...)
	s.written += int64(len(p))
	s.maxAhead = max(s.maxAhead, s.written-int64(len(s.durable)))
	return len(p), nil
}

func (s *volatileSink) Sync() error {
	s.mu.Lock()
	if s.inSync {
		s.mu.Unlock()
		panic("overlapping Sync calls")
	}
	s.inSync = true
	// Only what was written before Sync started is certain to be covered.
	cover := append([]byte(nil), s.cache...)
	s.mu.Unlock()
	select {
	case <-s.release:
	case <-s.free:
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.durable = cover
	s.inSync = false
	s.syncs++
	return nil
}

func (s *volatileSink) Close() error { return nil }

// crashState is what a kill -9 at this instant leaves: the durable bytes and
// what is written to the state dir, plus the bytes written (lost or not).
func (s *volatileSink) crashState() (durable []byte, written int64, inSync bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.durable...), s.written, s.inSync
}

// memInstaller "fetches" an image from memory in small pieces (Fetcher), so
// the whole update runs inside a synctest bubble, and writes it to a
// volatileSink.
type memInstaller struct {
	img  []byte
	sink *volatileSink
	// readBackVerified is what Apply was told; without a ReadBacker it
	// must be false.
	readBackVerified atomic.Bool
}

func (m *memInstaller) Open(ctx context.Context, u firmware.Update, off int64) (firmware.Sink, error) {
	return m.sink, nil
}
func (m *memInstaller) Apply(ctx context.Context, u firmware.Update) error {
	m.readBackVerified.Store(u.ReadBackVerified)
	return nil
}
func (m *memInstaller) Fetches(uri string) bool { return strings.HasPrefix(uri, "mem:") }
func (m *memInstaller) Fetch(ctx context.Context, u firmware.Update, dst firmware.FetchWriter) error {
	dst.SetTotal(int64(len(m.img)))
	for off := 0; off < len(m.img); off += 64 << 10 {
		if _, err := dst.Write(m.img[off:min(off+64<<10, len(m.img))]); err != nil {
			return err
		}
	}
	return nil
}

// TestCheckpointWaitsForSync: Sync runs beside the stream, so the test holds
// every Sync until the rest of the update is blocked (synctest.Wait), and
// then looks at what a kill -9 would leave. The persisted checkpoint must
// never name a byte that is not durable, its hash state must be the hash of
// exactly the durable prefix, and the stream must be held back (not run to
// the end) while a Sync hangs: at most two checkpoint intervals (plus one
// write) ahead of the durable bytes.
func TestCheckpointWaitsForSync(t *testing.T) {
	const interval = 256 << 10
	img := randomImage(t, 4<<20+777)
	synctest.Test(t, func(t *testing.T) {
		sink := &volatileSink{release: make(chan struct{}), free: make(chan struct{})}
		state := t.TempDir()
		rec := newRecorder()
		inst := &memInstaller{img: img, sink: sink}
		m, err := firmware.NewManager(firmware.Config{
			StateDir:        state,
			Installer:       inst,
			Observer:        rec.observe,
			Log:             zap.NewNop(),
			CheckpointBytes: interval,
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- m.Run(ctx) }()
		ended := false
		defer func() {
			// Also after a failed check: nothing may stay blocked in the bubble.
			if !ended {
				close(sink.free)
				cancel()
				<-done
			}
		}()
		if _, err := m.Start(firmware.Request{URI: "mem://fw.img", SHA256: sha(img), Size: int64(len(img))}); err != nil {
			t.Fatal(err)
		}
		held := 0
		for {
			// Everything that can run has run: the syncer waits in Sync, the
			// stream waits for the syncer (or the update ended).
			synctest.Wait()
			durable, written, inSync := sink.crashState()
			if !inSync {
				break
			}
			held++
			cp := readCheckpoint(t, state)
			if cp.Offset > int64(len(durable)) {
				t.Fatalf("checkpoint at %d but only %d bytes are durable (%d written)", cp.Offset, len(durable), written)
			}
			if !bytes.Equal(durable[:cp.Offset], img[:cp.Offset]) {
				t.Fatalf("durable bytes before the checkpoint at %d differ from the image", cp.Offset)
			}
			if cp.Offset > 0 {
				if got, want := hashState(t, cp.ImgHash), sha(img[:cp.Offset]); got != want {
					t.Fatalf("checkpoint at %d: hash state is over other bytes", cp.Offset)
				}
			}
			if written < int64(len(img)) && written-int64(len(durable)) > 2*interval+64<<10 {
				t.Fatalf("stream ran %d bytes ahead of the durable %d while Sync hung (bound %d)",
					written-int64(len(durable)), len(durable), 2*interval+64<<10)
			}
			if held == 1 && written >= int64(len(img)) {
				t.Fatalf("the stream wrote the whole image while the first Sync hung: no back-pressure")
			}
			sink.release <- struct{}{}
		}
		p := rec.waitTerminal(t, time.Minute)
		cancel()
		ended = true
		if err := <-done; err != nil {
			t.Fatalf("Run: %v", err)
		}
		if p.Phase != firmware.PhaseCompleted {
			t.Fatalf("update ended %s: %+v", p.Phase, p.Err)
		}
		if inst.readBackVerified.Load() {
			t.Error("Apply was told the image was read back by a backend that cannot read back")
		}
		durable, _, _ := sink.crashState()
		if !bytes.Equal(durable, img) {
			t.Fatalf("durable copy (%d bytes) is not the image", len(durable))
		}
		if want := len(img)/interval - 2; held < want {
			t.Errorf("%d Syncs, want at least %d (one per checkpoint interval)", held, want)
		}
		if sink.maxAhead > 2*interval+64<<10 {
			t.Errorf("a Write ran %d bytes ahead of the durable bytes (bound %d)", sink.maxAhead, 2*interval+64<<10)
		}
		t.Logf("%d Syncs held; at most %d bytes written ahead of the durable ones", held, sink.maxAhead)
	})
}

type persistedCheckpoint struct {
	Offset  int64  `json:"offset"`
	Written int64  `json:"written"`
	ImgHash []byte `json:"imgHash"`
}

func readCheckpoint(t *testing.T, dir string) persistedCheckpoint {
	t.Helper()
	var cp persistedCheckpoint
	b, err := os.ReadFile(filepath.Join(dir, "download.json"))
	if os.IsNotExist(err) {
		return cp
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &cp); err != nil {
		t.Fatalf("torn checkpoint: %v", err)
	}
	return cp
}

func hashState(t *testing.T, state []byte) string {
	t.Helper()
	h := sha256.New()
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(state); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

var _ io.Writer = (*volatileSink)(nil)

// badReadBack is plainFile whose read-back returns what a failing slot
// would: mangle gets each section read back (its offset and the bytes
// stored there) and returns what the "storage" gives instead.
type badReadBack struct {
	plainFile
	mangle func(off int64, stored []byte) io.Reader
}

func (b badReadBack) ReadBack(ctx context.Context, u firmware.Update) (firmware.StoredImage, error) {
	f, err := os.Open(b.slot("B"))
	if err != nil {
		return nil, err
	}
	return mangledStored{f, b.mangle}, nil
}

type mangledStored struct {
	f      *os.File
	mangle func(off int64, stored []byte) io.Reader
}

func (m mangledStored) Section(off, n int64) (io.Reader, error) {
	buf := make([]byte, n)
	k, err := m.f.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return nil, err
	}
	return m.mangle(off, buf[:k]), nil
}

func (m mangledStored) Close() error { return m.f.Close() }

type failingReader struct {
	r     io.Reader
	after int
	err   error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, f.err
	}
	p = p[:min(len(p), f.after)]
	n, err := f.r.Read(p)
	f.after -= n
	return n, err
}

// TestReadBackMismatchFails: a slot that does not give back what was
// written fails the update in verifying, and Apply is never called.
func TestReadBackMismatchFails(t *testing.T) {
	img := randomImage(t, 2<<20+99)
	end := int64(len(img))
	// at says whether the section [off, off+len(b)) holds byte i.
	at := func(off int64, b []byte, i int64) bool { return off <= i && i < off+int64(len(b)) }
	cases := []struct {
		name   string
		mangle func(int64, []byte) io.Reader
		want   string
	}{
		{"flipped byte", func(off int64, b []byte) io.Reader {
			if at(off, b, end-5) {
				b = bytes.Clone(b)
				b[end-5-off] ^= 0x40
			}
			return bytes.NewReader(b)
		}, "sha256 mismatch"},
		{"short", func(off int64, b []byte) io.Reader {
			if at(off, b, end-1) {
				b = b[:len(b)-1]
			}
			return bytes.NewReader(b)
		}, "stored image has"},
		{"read error", func(off int64, b []byte) io.Reader {
			if at(off, b, 1<<20) {
				return &failingReader{r: bytes.NewReader(b), after: int(1<<20 - off), err: errors.New("I/O error on the slot")}
			}
			return bytes.NewReader(b)
		}, "I/O error on the slot"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := newImageServer(t)
			url := srv.add("/fw.img", img)
			ab := &fileAB{dir: t.TempDir()}
			rec := newRecorder()
			m := startManager(t, testConfig(t, t.TempDir(), badReadBack{plainFile{ab}, tc.mangle}, rec))
			if _, err := m.Start(firmware.Request{URI: url, SHA256: sha(img)}); err != nil {
				t.Fatal(err)
			}
			p := rec.waitTerminal(t, 30*time.Second)
			if p.Phase != firmware.PhaseFailed || p.Err == nil || p.Err.Code != firmware.CodeVerify || !strings.Contains(p.Err.Message, tc.want) {
				t.Fatalf("ended %s %+v, want failed with %s and %q", p.Phase, p.Err, firmware.CodeVerify, tc.want)
			}
			if n := ab.applies.Load(); n != 0 {
				t.Fatalf("Apply called %d times after a failed read-back", n)
			}
		})
	}
}

// memReadBacker is memInstaller with a read-back of the volatileSink: what
// Section returns is what a crash would leave, so a section of bytes that
// are not yet durable is a test failure.
type memReadBacker struct {
	*memInstaller
	t        *testing.T
	mu       sync.Mutex
	sections [][2]int64 // off, n
}

func (m *memReadBacker) ReadBack(ctx context.Context, u firmware.Update) (firmware.StoredImage, error) {
	return m, nil
}

func (m *memReadBacker) Section(off, n int64) (io.Reader, error) {
	durable, written, _ := m.sink.crashState()
	m.mu.Lock()
	m.sections = append(m.sections, [2]int64{off, n})
	m.mu.Unlock()
	if off+n > int64(len(durable)) {
		m.t.Errorf("read back [%d, %d) with %d bytes durable (%d written)", off, off+n, len(durable), written)
		return nil, errors.New("not durable")
	}
	return bytes.NewReader(durable[off : off+n]), nil
}

func (m *memReadBacker) Close() error { return nil }

// TestReadBackBehindTheDownload: the image is read back while it is being
// downloaded, each part only once a Sync has made it durable, and all of
// it exactly once; the update then verifies from that read-back and Apply
// is told so.
func TestReadBackBehindTheDownload(t *testing.T) {
	const interval = 256 << 10
	img := randomImage(t, 4<<20+777)
	sink := &volatileSink{release: make(chan struct{}), free: make(chan struct{})}
	close(sink.free) // Syncs do not wait
	inst := &memReadBacker{memInstaller: &memInstaller{img: img, sink: sink}, t: t}
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), inst, rec)
	cfg.CheckpointBytes = interval
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: "mem://fw.img", SHA256: sha(img), Size: int64(len(img))}); err != nil {
		t.Fatal(err)
	}
	if p := rec.waitTerminal(t, time.Minute); p.Phase != firmware.PhaseCompleted {
		t.Fatalf("update ended %s: %+v", p.Phase, p.Err)
	}
	if !inst.readBackVerified.Load() {
		t.Error("Apply was not told that the image was read back")
	}
	inst.mu.Lock()
	defer inst.mu.Unlock()
	var next int64
	for i, s := range inst.sections {
		if s[0] != next {
			t.Fatalf("section %d starts at %d, want %d (sections %v)", i, s[0], next, inst.sections)
		}
		next = s[0] + s[1]
	}
	if next != int64(len(img)) {
		t.Fatalf("read back %d bytes, want %d", next, len(img))
	}
	if len(inst.sections) < 2 {
		t.Fatalf("read back in %d section(s): not behind the download", len(inst.sections))
	}
	t.Logf("read back in %d sections", len(inst.sections))
}
