package firmware_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/firmware"
)

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		os.Exit(crashChild())
	}
	goleak.VerifyTestMain(m)
}

func TestHappyPathPlainFile(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 3<<20+123)
	url := srv.add("/fw.img", img)
	ab := &fileAB{dir: t.TempDir()}
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), plainFile{ab}, rec)
	core, logs := observer.New(zap.InfoLevel)
	cfg.Log = zap.New(core)
	m := startManager(t, cfg)

	id, err := m.Start(firmware.Request{URI: url, Version: "2.0.0", SHA256: sha(img), Size: int64(len(img))})
	if err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseCompleted {
		t.Fatalf("phase %s, err %+v", last.Phase, last.Err)
	}
	if last.UpdateID != id || last.CurrentVersion != "2.0.0" || last.TargetVersion != "2.0.0" {
		t.Errorf("final progress %+v", last)
	}
	want := []firmware.Phase{"accepted", "downloading", "verifying", "applying", "completed"}
	if got := rec.phases(); !slices.Equal(got, want) {
		t.Errorf("phases %v, want %v", got, want)
	}
	got, err := os.ReadFile(ab.slot("B"))
	if err != nil || !bytes.Equal(got, img) {
		t.Fatalf("slot content differs (err %v, %d bytes)", err, len(got))
	}
	// Byte progress was reported and reached the total.
	var sawBytes bool
	for _, p := range rec.list() {
		if p.Phase == firmware.PhaseDownloading && p.Bytes > 0 && p.Bytes < int64(len(img)) {
			sawBytes = p.Percent >= 0 && p.Total == int64(len(img))
		}
	}
	if !sawBytes {
		t.Error("no intermediate byte progress with a total")
	}
	st := m.Status()
	if st.Busy || st.Phase != firmware.PhaseCompleted || st.CurrentVersion != "2.0.0" {
		t.Errorf("status %+v", st)
	}
	if ab.applies.Load() != 1 || ab.appliesReadBack.Load() != 1 {
		t.Errorf("Apply called %d times, %d of them told the image was just read back; want 1 and 1",
			ab.applies.Load(), ab.appliesReadBack.Load())
	}
	// The completion is logged with the version now running.
	done := logs.FilterMessage("update completed").All()
	if len(done) != 1 || done[0].ContextMap()["version"] != "2.0.0" || done[0].ContextMap()["update_id"] != id {
		t.Errorf("completion log %+v, want one with version 2.0.0 and update_id %s", done, id)
	}
}

func TestBusyAndInvalid(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 1<<20)
	url := srv.add("/fw.img", img)
	release := make(chan struct{})
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		<-release // hold the download so the update stays busy
		return false
	})
	ab := &fileAB{dir: t.TempDir()}
	rec := newRecorder()
	m := startManager(t, testConfig(t, t.TempDir(), plainFile{ab}, rec))

	id, err := m.Start(firmware.Request{URI: url})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Start(firmware.Request{URI: url})
	var busy *firmware.BusyError
	if !errors.As(err, &busy) || busy.UpdateID != id || !errors.Is(err, firmware.ErrBusy) {
		t.Fatalf("second Start: %v, want BusyError naming %s", err, id)
	}
	if !m.Status().Busy {
		t.Error("Status not busy")
	}
	for _, req := range []firmware.Request{
		{URI: ""},
		{URI: "test.com"}, // no Fetcher: only http(s) works
		{URI: "ftp://example.com/x"},
		{URI: url, SHA256: "abc"},
		{URI: url, Size: -1},
		{URI: "http:///nohost"},
	} {
		if _, err := m.Start(req); !errors.Is(err, firmware.ErrInvalidRequest) {
			t.Errorf("Start(%+v) = %v, want ErrInvalidRequest", req, err)
		}
	}
	close(release)
	if p := rec.waitTerminal(t, 30*time.Second); p.Phase != firmware.PhaseCompleted {
		t.Fatalf("phase %s err %+v", p.Phase, p.Err)
	}
	// Idle again: a new update is accepted.
	if _, err := m.Start(firmware.Request{URI: url}); err != nil {
		t.Fatalf("Start after completion: %v", err)
	}
}

// TestDownloadFaults drives the downloader against real HTTP faults.
func TestDownloadFaults(t *testing.T) {
	img := randomImage(t, 2<<20+77)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(img)
	zw.Close()
	zenc, _ := zstd.NewWriter(nil)
	zst := zenc.EncodeAll(img, nil)
	zenc.Close()

	type fault = func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool
	tests := []struct {
		name     string
		path     string
		body     []byte
		req      func(url string) firmware.Request
		fault    fault
		wantErr  string // substring of the failure message; "" = must complete
		wantCode string
		check    func(t *testing.T, s *imageServer)
	}{
		{name: "404", path: "/missing.img", wantErr: "/missing.img: HTTP 404 Not Found", wantCode: firmware.CodeDownload,
			check: func(t *testing.T, s *imageServer) {
				if n := s.requests.Load(); n != 1 {
					t.Errorf("404 retried: %d requests", n)
				}
			}},
		{name: "403 permanent", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				http.Error(w, "no", http.StatusForbidden)
				return true
			}, wantErr: "HTTP 403 Forbidden", wantCode: firmware.CodeDownload,
			check: func(t *testing.T, s *imageServer) {
				if n := s.requests.Load(); n != 1 {
					t.Errorf("403 retried: %d requests", n)
				}
			}},
		{name: "500 then ok", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n <= 2 {
					http.Error(w, "boom", http.StatusInternalServerError)
					return true
				}
				return false
			},
			check: func(t *testing.T, s *imageServer) {
				if n := s.requests.Load(); n != 3 {
					t.Errorf("%d requests, want 3", n)
				}
			}},
		{name: "429 retry-after", path: "/fw.img", body: img,
			fault: func() fault {
				var first time.Time
				return func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
					if n == 1 {
						first = time.Now()
						w.Header().Set("Retry-After", "1")
						http.Error(w, "slow down", http.StatusTooManyRequests)
						return true
					}
					// Retry-After is a lower bound the client must honour;
					// the backoff alone would retry after ~20ms.
					if d := time.Since(first); d < 900*time.Millisecond {
						http.Error(w, fmt.Sprintf("retried after %s, before Retry-After", d), http.StatusBadRequest)
						return true
					}
					return false
				}
			}()},
		{name: "stalled server", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n == 1 {
					w.Header().Set("Content-Length", fmt.Sprint(len(body)))
					w.Write(body[:len(body)/3])
					http.NewResponseController(w).Flush()
					<-r.Context().Done() // stall until the client gives up
					return true
				}
				return false
			},
			check: func(t *testing.T, s *imageServer) {
				rs := s.rangeHeaders()
				if len(rs) != 2 || !strings.HasPrefix(rs[1], "bytes=") || rs[1] == "bytes=0-" {
					t.Errorf("ranges %q: want a resumed Range request", rs)
				}
			}},
		{name: "connection cut mid-body", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n <= 3 {
					cutAfter(w, r, body, 600<<10)
					return true
				}
				return false
			},
			check: func(t *testing.T, s *imageServer) {
				rs := s.rangeHeaders()
				want := []string{"", "bytes=614400-", "bytes=1228800-", "bytes=1843200-"}
				if !slices.Equal(rs, want) {
					t.Errorf("ranges %q, want %q", rs, want)
				}
				// Each byte was sent once: resume, not restart.
				if got := s.served.Load(); got != int64(len(img)) {
					t.Errorf("served %d bytes for a %d-byte image", got, len(img))
				}
			}},
		{name: "server ignores Range", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n == 1 {
					cutAfter(w, r, body, 500<<10)
					return true
				}
				w.Header().Set("Content-Length", fmt.Sprint(len(body)))
				w.Write(body) // 200 with the whole body despite Range
				return true
			}},
		{name: "image replaced mid-download", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n == 1 {
					w.Header().Set("ETag", `"v1"`)
					cutAfter(w, r, body, 300<<10)
					return true
				}
				other := bytes.Repeat([]byte{7}, len(body))
				w.Header().Set("ETag", `"v2"`)
				http.ServeContent(w, r, "fw.img", time.Unix(1700000001, 0), bytes.NewReader(other))
				return true
			},
			wantErr: `the image changed on the server during the download (ETag "v2", was "v1")`, wantCode: firmware.CodeDownload,
			check: func(t *testing.T, s *imageServer) {
				if rs := s.rangeHeaders(); len(rs) != 2 || rs[1] != "bytes=307200-" {
					t.Errorf("ranges %q", rs)
				}
			}},
		{name: "sha256 mismatch", path: "/fw.img", body: img,
			req: func(url string) firmware.Request {
				return firmware.Request{URI: url, SHA256: strings.Repeat("ab", 32)}
			},
			wantErr: "sha256 mismatch: want " + strings.Repeat("ab", 32) + ", got " + sha(img), wantCode: firmware.CodeVerify},
		{name: "larger than declared", path: "/fw.img", body: img,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				w.Write(body) // chunked: no Content-Length to compare up front
				return true
			},
			req: func(url string) firmware.Request {
				return firmware.Request{URI: url, Size: int64(len(img)) - 1000}
			},
			wantErr: fmt.Sprintf("image is larger than the declared size of %d bytes", len(img)-1000), wantCode: firmware.CodeVerify},
		{name: "size mismatch by Content-Length", path: "/fw.img", body: img,
			req: func(url string) firmware.Request {
				return firmware.Request{URI: url, Size: int64(len(img)) + 1}
			},
			wantErr: "size mismatch", wantCode: firmware.CodeVerify},
		{name: "gzip by suffix", path: "/fw.img.gz", body: gz.Bytes(),
			req: func(url string) firmware.Request {
				return firmware.Request{URI: url, SHA256: sha(gz.Bytes()), Size: int64(gz.Len())}
			}},
		{name: "zstd by suffix, cut mid-body", path: "/fw.img.zst", body: zst,
			fault: func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
				if n == 1 {
					cutAfter(w, r, body, len(body)/2)
					return true
				}
				return false
			},
			req: func(url string) firmware.Request {
				return firmware.Request{URI: url, SHA256: sha(zst)}
			}},
		{name: "gzip by magic", path: "/fw.bin", body: gz.Bytes()},
		{name: "corrupt gzip", path: "/fw.img.gz", body: append([]byte{0x1f, 0x8b}, img[:4096]...),
			wantErr: "gzip", wantCode: firmware.CodeVerify},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := newImageServer(t)
			url := srv.URL + tc.path
			if tc.body != nil {
				srv.add(tc.path, tc.body)
			}
			srv.setFault(tc.fault)
			req := firmware.Request{URI: url}
			if tc.req != nil {
				req = tc.req(url)
			}
			ab := &fileAB{dir: t.TempDir()}
			rec := newRecorder()
			m := startManager(t, testConfig(t, t.TempDir(), plainFile{ab}, rec))
			if _, err := m.Start(req); err != nil {
				t.Fatal(err)
			}
			last := rec.waitTerminal(t, 60*time.Second)
			if tc.wantErr == "" {
				if last.Phase != firmware.PhaseCompleted {
					t.Fatalf("phase %s, err %+v", last.Phase, last.Err)
				}
				got, _ := os.ReadFile(ab.slot("B"))
				if !bytes.Equal(got, img) {
					t.Fatalf("slot holds %d bytes, not the image", len(got))
				}
			} else {
				if last.Phase != firmware.PhaseFailed || last.Err == nil {
					t.Fatalf("phase %s, err %+v; want failed", last.Phase, last.Err)
				}
				if !strings.Contains(last.Err.Message, tc.wantErr) || last.Err.Code != tc.wantCode {
					t.Fatalf("error %+v, want code %s and message containing %q", last.Err, tc.wantCode, tc.wantErr)
				}
				if ab.applies.Load() != 0 {
					t.Error("a failed download was applied")
				}
			}
			if tc.check != nil {
				tc.check(t, srv)
			}
		})
	}
}

func TestBadTLSIsPermanent(t *testing.T) {
	var handshakes atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("image"))
	}))
	srv.TLS = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		handshakes.Add(1)
		return nil, nil
	}}
	srv.StartTLS()
	defer srv.Close()
	rec := newRecorder()
	// The default client does not trust httptest's certificate.
	m := startManager(t, testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec))
	if _, err := m.Start(firmware.Request{URI: srv.URL + "/fw.img"}); err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseFailed || !strings.Contains(last.Err.Message, "certificate") {
		t.Fatalf("got %s %+v, want failed with a certificate error", last.Phase, last.Err)
	}
	if n := handshakes.Load(); n != 1 {
		t.Errorf("%d TLS handshakes: a bad certificate must not be retried", n)
	}
}

func TestRetriesGiveUpWithReason(t *testing.T) {
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 1000))
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return true
	})
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
	cfg.RetryMaxElapsed = 500 * time.Millisecond
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: url}); err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	want := regexp.MustCompile(`^download from ` + regexp.QuoteMeta(url) + `: HTTP 503 Service Unavailable \(([0-9]+) attempts over [0-9.]+m?s\)$`)
	if last.Phase != firmware.PhaseFailed || !want.MatchString(last.Err.Message) {
		t.Fatalf("got %s %+v, want a message matching %s", last.Phase, last.Err, want)
	}
	if n := srv.requests.Load(); n < 2 {
		t.Errorf("503 was not retried (%d requests)", n)
	}
}

func TestConnectionRefusedRetriedThenFails(t *testing.T) {
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
	cfg.RetryMaxElapsed = 300 * time.Millisecond
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: freePortURL(t)}); err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseFailed || !strings.Contains(last.Err.Message, "connection refused") {
		t.Fatalf("got %s %+v", last.Phase, last.Err)
	}
}

func TestABRebootCommit(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 1<<20)
	url := srv.add("/fw.img", img)
	state := t.TempDir()
	ab := &fileAB{dir: t.TempDir()}
	rec := newRecorder()
	cfg := testConfig(t, state, abInstaller{ab}, rec)

	// The first manager "dies" in the reboot, as the agent would.
	rebooted := make(chan struct{})
	ab.onReboot = func() { close(rebooted) }
	m1 := startManager(t, cfg)
	if _, err := m1.Start(firmware.Request{URI: url, Version: "3.1", SHA256: sha(img)}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rebooted:
	case <-time.After(30 * time.Second):
		t.Fatalf("no reboot; phases %v", rec.phases())
	}
	m1.stop(t)
	ab.onReboot = nil

	m2 := startManager(t, cfg)
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseCompleted || m2.Status().CurrentVersion != "3.1" {
		t.Fatalf("got %s %+v, status %+v", last.Phase, last.Err, m2.Status())
	}
	want := []firmware.Phase{"accepted", "downloading", "verifying", "applying", "rebooting", "committing", "completed"}
	if got := rec.phases(); !slices.Equal(got, want) {
		t.Errorf("phases %v, want %v", got, want)
	}
	if e := ab.env(); e.Committed != "B" || e.Running != "B" || ab.commits.Load() != 1 {
		t.Errorf("env %+v, commits %d", e, ab.commits.Load())
	}
	if last.Slot != "B" {
		t.Errorf("slot %q", last.Slot)
	}
}

func TestABRollback(t *testing.T) {
	for _, tc := range []struct {
		name     string
		verify   error
		health   error
		wantCode string
		wantMsg  string
	}{
		{"boot check fails", errors.New("kernel panic in slot B"), nil, firmware.CodeBoot, "kernel panic in slot B"},
		{"health check fails", nil, errors.New("no route to hub"), firmware.CodeHealth, "health check: no route to hub"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newImageServer(t)
			img := randomImage(t, 300<<10)
			url := srv.add("/fw.img", img)
			ab := &fileAB{dir: t.TempDir(), verifyErr: tc.verify}
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), abInstaller{ab}, rec)
			if tc.health != nil {
				cfg.HealthCheck = func(ctx context.Context) error { return tc.health }
			}
			reboots := make(chan struct{}, 4)
			ab.onReboot = func() { reboots <- struct{}{} }
			m := startManager(t, cfg)
			if _, err := m.Start(firmware.Request{URI: url}); err != nil {
				t.Fatal(err)
			}
			// Reboot 1 boots B; the Manager keeps running here (as if
			// restarted instantly), fails the check and rolls back, which
			// needs reboot 2 back to A. Restart it after each reboot.
			for i := range 2 {
				select {
				case <-reboots:
				case <-time.After(30 * time.Second):
					t.Fatalf("reboot %d missing; phases %v", i+1, rec.phases())
				}
				if i == 1 {
					// The rollback's reboot: rollingBack was reported,
					// with the error, before it, and is what a restart
					// finds.
					all := rec.list()
					if p := all[len(all)-1]; p.Phase != firmware.PhaseRollingBack || p.Err == nil || p.Err.Code != tc.wantCode {
						t.Errorf("reported before the rollback's reboot: %s %+v, want rollingBack with %s", p.Phase, p.Err, tc.wantCode)
					}
				}
				m.stop(t)
				m = startManager(t, cfg)
				if st := m.Status(); i == 1 && (st.Phase != firmware.PhaseRollingBack || !st.Busy) {
					t.Errorf("after the rollback's reboot the status is %s (busy %v), want rollingBack", st.Phase, st.Busy)
				}
			}
			last := rec.waitTerminal(t, 30*time.Second)
			want := []firmware.Phase{"accepted", "downloading", "verifying", "applying", "rebooting", "committing", "rollingBack", "rolledBack"}
			if got := rec.phases(); !slices.Equal(got, want) {
				t.Errorf("phases %v, want %v", got, want)
			}
			if last.Phase != firmware.PhaseRolledBack || last.Err == nil || last.Err.Code != tc.wantCode ||
				!strings.Contains(last.Err.Message, tc.wantMsg) {
				t.Fatalf("got %s %+v", last.Phase, last.Err)
			}
			if e := ab.env(); e.Running != "A" || e.Committed != "A" || e.Trial != "" {
				t.Errorf("env after rollback %+v", e)
			}
			if ab.commits.Load() != 0 {
				t.Error("committed despite the failure")
			}
			if m.Status().Busy {
				t.Error("still busy after rollback")
			}
		})
	}
}

func TestDownloadBudget(t *testing.T) {
	srv := newImageServer(t)
	url := srv.add("/fw.img", randomImage(t, 1<<20))
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		// A trickle: never idle long enough to count as stalled, never done.
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		for i := 0; i < len(body); i += 1024 {
			if _, err := w.Write(body[i : i+1024]); err != nil {
				return true
			}
			http.NewResponseController(w).Flush()
			select {
			case <-r.Context().Done():
				return true
			case <-time.After(20 * time.Millisecond):
			}
		}
		return true
	})
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
	cfg.DownloadTimeout = 500 * time.Millisecond
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: url}); err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	if last.Phase != firmware.PhaseFailed || last.Err.Code != firmware.CodeDownload || !strings.Contains(last.Err.Message, "did not finish within 500ms") {
		t.Fatalf("got %s %+v", last.Phase, last.Err)
	}
}
