package firmware_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"net"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/klauspost/compress/zstd"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/internal/testutil"
)

// weakSink discards the image and keeps weak pointers to the buffers the
// state machine wrote from: they must not outlive the update.
type weakSink struct {
	mu   sync.Mutex
	bufs []weak.Pointer[byte] // one per distinct buffer
}

func (s *weakSink) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	w := weak.Make(&p[0])
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range s.bufs {
		if b == w {
			return len(p), nil
		}
	}
	s.bufs = append(s.bufs, w)
	return len(p), nil
}

func (s *weakSink) Sync() error  { return nil }
func (s *weakSink) Close() error { return nil }

type weakInstaller struct{ sink *weakSink }

func (i weakInstaller) Open(context.Context, firmware.Update, int64) (firmware.Sink, error) {
	return i.sink, nil
}
func (i weakInstaller) Apply(context.Context, firmware.Update) error { return nil }

// After an update has ended, nothing it streamed through is reachable: not
// the copy buffer (the sink saw it), whether the image was plain, gzip or
// zstd, and not the connection it downloaded over (the transport keeps no
// idle connection between updates).
func TestUpdateLeavesNoBuffers(t *testing.T) {
	img := randomImage(t, 3<<20+5)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(img); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	zst := enc.EncodeAll(img, nil)
	enc.Close()

	srv := newImageServer(t)
	for _, tc := range []struct {
		name string
		path string
		body []byte
	}{
		{"plain", "/fw.img", img},
		{"gzip", "/fw.img.gz", gz.Bytes()},
		{"zstd", "/fw.img.zst", zst},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url := srv.add(tc.path, tc.body)
			var (
				mu    sync.Mutex
				conns []weak.Pointer[net.TCPConn]
			)
			tr := firmware.NewTransport(nil)
			dial := tr.DialContext
			tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dial(ctx, network, addr)
				if tcp, ok := c.(*net.TCPConn); ok {
					mu.Lock()
					conns = append(conns, weak.Make(tcp))
					mu.Unlock()
				}
				return c, err
			}
			sink := &weakSink{}
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), weakInstaller{sink}, rec)
			cfg.HTTPClient = &http.Client{Transport: tr}
			m := startManager(t, cfg)
			if _, err := m.Start(firmware.Request{URI: url, SHA256: sha(tc.body)}); err != nil {
				t.Fatal(err)
			}
			if p := rec.waitTerminal(t, 30*time.Second); p.Phase != firmware.PhaseCompleted {
				t.Fatalf("phase %s err %+v", p.Phase, p.Err)
			}

			sink.mu.Lock()
			bufs := append([]weak.Pointer[byte](nil), sink.bufs...)
			sink.mu.Unlock()
			mu.Lock()
			dialed := append([]weak.Pointer[net.TCPConn](nil), conns...)
			mu.Unlock()
			if len(bufs) == 0 || len(dialed) == 0 {
				t.Fatalf("%d buffers written from, %d connections dialed", len(bufs), len(dialed))
			}
			// A connection is released once its read loop has seen the close.
			testutil.Eventually(t, 5*time.Second, "the update's buffers and connections unreachable", func() bool {
				runtime.GC()
				for _, b := range bufs {
					if b.Value() != nil {
						return false
					}
				}
				for _, c := range dialed {
					if c.Value() != nil {
						return false
					}
				}
				return true
			})
		})
	}
}
