package firmware_test

import (
	"context"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

// TestStallTimeoutEndsDownload: a download that gets no new byte for
// StallTimeout, however often it reconnects, ends failed within it (not
// after RetryMaxElapsed), with the last failure, the URL and the bytes
// received and expected; while it retries, Progress.Retry says so.
func TestStallTimeoutEndsDownload(t *testing.T) {
	const size, part = 1 << 20, 256 << 10
	img := randomImage(t, size)
	srv := newImageServer(t)
	srv.add("/stall.img", img)
	srv.add("/cut.img", img)
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		start := 0
		if rg := r.Header.Get("Range"); rg != "" {
			start, _ = strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(rg, "bytes="), "-"))
		}
		switch r.URL.Path {
		case "/stall.img":
			// The first 256 KiB, then nothing, on every connection.
			if start == 0 {
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.WriteHeader(http.StatusOK)
				w.Write(body[:part])
			} else {
				w.Header().Set("Content-Range", "bytes "+strconv.Itoa(start)+"-"+strconv.Itoa(len(body)-1)+"/"+strconv.Itoa(len(body)))
				w.Header().Set("Content-Length", strconv.Itoa(len(body)-start))
				w.WriteHeader(http.StatusPartialContent)
			}
			http.NewResponseController(w).Flush()
			<-r.Context().Done()
		case "/cut.img":
			// Every answer announces the whole image and closes at 256 KiB.
			cutAfter(w, r, body, max(part-start, 0))
		default:
			return false
		}
		return true
	})
	dns := nxdomainServer(t)
	stallMsg := `no data received within the idle timeout \([0-9.]+m?s\) after 262144 of 1048576 bytes`
	truncMsg := `the connection closed before the whole image arrived: received 262144 of 1048576 bytes`
	tests := []struct {
		name     string
		url      string
		resolver bool
		received string // "received …" in the message
		last     string // the last failure, a regular expression
	}{
		{name: "server stalls after 256 KiB", url: srv.URL + "/stall.img", received: "262144 of 1048576 bytes",
			last: `(` + stallMsg + `|no response within [0-9.]+m?s)`},
		{name: "server always truncates", url: srv.URL + "/cut.img", received: "262144 of 1048576 bytes", last: truncMsg},
		{name: "unresolvable host", url: "http://fw.gwagent.invalid:8080/fw.img", resolver: true, received: "0 bytes, size unknown",
			last: `resolve fw\.gwagent\.invalid: no such host`},
	}
	const stall = 1500 * time.Millisecond
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
			cfg.IdleTimeout = 300 * time.Millisecond
			cfg.StallTimeout = stall
			cfg.RetryInitialInterval = 50 * time.Millisecond
			cfg.RetryMaxInterval = 300 * time.Millisecond
			cfg.RetryMaxElapsed = time.Minute // the stall clock must end it, long before this
			if tc.resolver {
				d := &net.Dialer{Timeout: time.Second, Resolver: &net.Resolver{PreferGo: true,
					Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
						return (&net.Dialer{}).DialContext(ctx, "udp", dns)
					}}}
				cfg.HTTPClient = &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
			}
			m := startManager(t, cfg)
			began := time.Now()
			if _, err := m.Start(firmware.Request{URI: tc.url + "?sig=secret-token"}); err != nil {
				t.Fatal(err)
			}
			last := rec.waitTerminal(t, 30*time.Second)
			took := time.Since(began)
			if last.Phase != firmware.PhaseFailed || last.Err == nil || last.Err.Code != firmware.CodeDownload {
				t.Fatalf("ended %s %+v, want failed with %s", last.Phase, last.Err, firmware.CodeDownload)
			}
			// Within the stall clock, give or take scheduling on a busy
			// machine; far below RetryMaxElapsed.
			if took > stall+2*time.Second {
				t.Errorf("failed after %s, want about %s (StallTimeout)", took, stall)
			}
			want := `^download from ` + regexp.QuoteMeta(tc.url) + `: no new byte for [0-9.]+m?s \(update\.stallTimeout 1\.5s; received ` + regexp.QuoteMeta(tc.received) +
				`\); last failure: ` + tc.last + attempts + `$`
			if !regexp.MustCompile(want).MatchString(last.Err.Message) {
				t.Errorf("message %q\nwant it to match %s", last.Err.Message, want)
			}

			// The retries were reported, named the URL without its query,
			// and were gone from the failed phase.
			var retries []firmware.Retry
			for _, p := range rec.list() {
				if p.Retry == nil {
					continue
				}
				if p.Phase != firmware.PhaseDownloading {
					t.Errorf("retry reported in phase %s", p.Phase)
				}
				retries = append(retries, *p.Retry)
			}
			if len(retries) < 2 {
				t.Fatalf("%d retries reported, want several", len(retries))
			}
			for i, r := range retries {
				if !strings.HasPrefix(r.LastError, "download from "+tc.url+": ") || strings.Contains(r.LastError, "secret-token") {
					t.Errorf("retry %d: lastError %q", i, r.LastError)
				}
				if r.NextAttemptAt.IsZero() || r.Attempt < 1 {
					t.Errorf("retry %d: %+v", i, r)
				}
			}
			if last.Retry != nil || m.Status().Retry != nil {
				t.Errorf("failed progress still carries retry %+v", last.Retry)
			}
		})
	}
}

// TestRetryClearedByProgress: a server that answers 503 three times, then
// the image: each failed attempt is reported as a retry with its number,
// and the first bytes after it clear it; the update completes.
func TestRetryClearedByProgress(t *testing.T) {
	img := randomImage(t, 1<<20)
	srv := newImageServer(t)
	url := srv.add("/fw.img", img)
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		if n > 3 {
			return false
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
	m := startManager(t, cfg)
	if _, err := m.Start(firmware.Request{URI: url, SHA256: sha(img)}); err != nil {
		t.Fatal(err)
	}
	if last := rec.waitTerminal(t, 30*time.Second); last.Phase != firmware.PhaseCompleted {
		t.Fatalf("ended %s %+v", last.Phase, last.Err)
	}
	var attempts []int
	cleared := false
	for _, p := range rec.list() {
		switch {
		case p.Retry != nil:
			attempts = append(attempts, p.Retry.Attempt)
			if want := "download from " + url + ": HTTP 503 Service Unavailable"; p.Retry.LastError != want {
				t.Errorf("lastError %q, want %q", p.Retry.LastError, want)
			}
			if !p.Retry.NextAttemptAt.After(p.Time.Add(-time.Millisecond)) {
				t.Errorf("next attempt at %s, before the report at %s", p.Retry.NextAttemptAt, p.Time)
			}
		case len(attempts) > 0 && !cleared:
			if p.Phase != firmware.PhaseDownloading {
				t.Errorf("the retry was not cleared in the downloading phase (next progress: %s)", p.Phase)
			}
			cleared = true
		}
	}
	if len(attempts) != 3 || attempts[0] != 1 || attempts[2] != 3 {
		t.Errorf("retries reported with attempts %v, want [1 2 3]", attempts)
	}
	if !cleared {
		t.Error("the retry was never cleared")
	}
}
