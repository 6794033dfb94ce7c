package firmware_test

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/internal/testutil"
)

// redirector answers every request with a redirect to target + the path.
func redirector(t *testing.T, tls bool, target func() string) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var n atomic.Int32
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		http.Redirect(w, r, target()+r.URL.Path, http.StatusFound)
	})
	var s *httptest.Server
	if tls {
		s = httptest.NewTLSServer(h)
	} else {
		s = httptest.NewServer(h)
	}
	t.Cleanup(s.Close)
	return s, &n
}

// TestRedirects: a download follows redirects within a scheme and from
// http to https, and refuses one from https to plain http, naming both
// URLs, without retrying it and without a request to the http server.
func TestRedirects(t *testing.T) {
	img := randomImage(t, 300<<10)
	plain := newImageServer(t)
	plain.add("/fw.img", img)
	secure := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "fw.img", time.Unix(1700000000, 0), strings.NewReader(string(img)))
	}))
	t.Cleanup(secure.Close)

	toPlain, toPlainHits := redirector(t, true, func() string { return plain.URL })
	toSecure, _ := redirector(t, false, func() string { return secure.URL })
	secureToSecure, _ := redirector(t, true, func() string { return secure.URL })

	tests := []struct {
		name    string
		url     string
		wantErr string
	}{
		{"http to https", toSecure.URL + "/fw.img", ""},
		{"https to https", secureToSecure.URL + "/fw.img", ""},
		{"https to http", toPlain.URL + "/fw.img?sig=secret",
			"refusing the redirect from " + toPlain.URL + "/fw.img to " + plain.URL + "/fw.img: it would downgrade https to plain http"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
			cfg.HTTPClient = secure.Client() // trusts the test servers' certificate
			before := plain.requests.Load()
			toPlainBefore := toPlainHits.Load()
			m := startManager(t, cfg)
			if _, err := m.Start(firmware.Request{URI: tc.url, SHA256: sha(img)}); err != nil {
				t.Fatal(err)
			}
			last := rec.waitTerminal(t, 30*time.Second)
			if tc.wantErr == "" {
				if last.Phase != firmware.PhaseCompleted {
					t.Fatalf("ended %s: %+v", last.Phase, last.Err)
				}
				return
			}
			if last.Phase != firmware.PhaseFailed || last.Err.Code != firmware.CodeDownload || !strings.Contains(last.Err.Message, tc.wantErr) {
				t.Fatalf("ended %s %+v, want downloadFailed with %q", last.Phase, last.Err, tc.wantErr)
			}
			if strings.Contains(last.Err.Message, "secret") {
				t.Errorf("the message shows the query: %s", last.Err.Message)
			}
			if n := plain.requests.Load() - before; n != 0 {
				t.Errorf("%d requests reached the http server", n)
			}
			if n := toPlainHits.Load() - toPlainBefore; n != 1 {
				t.Errorf("the refused redirect was asked for %d times, want once (not retried)", n)
			}
		})
	}
	// The caller's client is left as it was.
	if secure.Client().CheckRedirect != nil {
		t.Error("the caller's client got a redirect policy")
	}
}

// TestAllowedHosts: with update.allowedHosts, a request naming another
// host is refused at Start (the method's 400) and a redirect to one is
// refused during the download.
func TestAllowedHosts(t *testing.T) {
	img := randomImage(t, 200<<10)
	target := newImageServer(t)
	target.add("/fw.img", img)
	// 127.0.0.1 is allowed; the redirect goes to the same server by the
	// name localhost, which is not.
	away, _ := redirector(t, false, func() string { return strings.Replace(target.URL, "127.0.0.1", "localhost", 1) })

	rec := newRecorder()
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
	cfg.AllowedHosts = []string{"127.0.0.1", "*.example.com"}
	cfg.Signatures = &signature.Policy{KeyDir: t.TempDir(), AllowUnsigned: true}
	m := startManager(t, cfg)

	for _, tc := range []struct {
		req  firmware.Request
		want string
	}{
		{firmware.Request{URI: "https://fw.example.net/fw.img"},
			`fwPackageUri: host "fw.example.net" is not an allowed download host (update.allowedHosts: 127.0.0.1, *.example.com)`},
		{firmware.Request{URI: "https://example.com/fw.img"}, `host "example.com" is not an allowed`},
		{firmware.Request{URI: "http://[::1]:8080/fw.img"}, `host "::1" is not an allowed`},
		{firmware.Request{URI: target.URL + "/fw.img", SignatureURI: "https://sigs.example.org/fw.img.minisig"},
			`signatureUri: host "sigs.example.org" is not an allowed download host`},
	} {
		_, err := m.Start(tc.req)
		if !errors.Is(err, firmware.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Start(%s): %v, want an invalid request with %q", tc.req.URI, err, tc.want)
		}
	}
	if m.Status().Busy {
		t.Fatal("a refused request started an update")
	}

	if _, err := m.Start(firmware.Request{URI: away.URL + "/fw.img", SHA256: sha(img)}); err != nil {
		t.Fatal(err)
	}
	last := rec.waitTerminal(t, 30*time.Second)
	want := `refusing the redirect from ` + away.URL + `/fw.img to ` + strings.Replace(target.URL, "127.0.0.1", "localhost", 1) +
		`/fw.img: host "localhost" is not an allowed download host`
	if last.Phase != firmware.PhaseFailed || last.Err.Code != firmware.CodeDownload || !strings.Contains(last.Err.Message, want) {
		t.Fatalf("ended %s %+v, want %q", last.Phase, last.Err, want)
	}
	if n := target.requests.Load(); n != 0 {
		t.Errorf("%d requests reached the host that is not allowed", n)
	}

	// Allowed: the host itself.
	id, err := m.Start(firmware.Request{URI: target.URL + "/fw.img", SHA256: sha(img)})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the second update to end", func() bool {
		st := m.Status()
		return st.UpdateID == id && st.Phase.Terminal()
	})
	if st := m.Status(); st.Phase != firmware.PhaseCompleted {
		t.Fatalf("download from an allowed host ended %s %+v", st.Phase, st.Err)
	}

	// Names below a *. pattern, in any case and with a final dot (Start
	// only, on a Manager that does not run: these names do not resolve
	// here).
	cfg = testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, newRecorder())
	cfg.AllowedHosts = []string{"*.example.com"}
	idle, err := firmware.NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := idle.Start(firmware.Request{URI: "https://FW.cdn.Example.COM./fw.img"}); err != nil {
		t.Errorf("a name below *.example.com: %v", err)
	}
}

func TestValidHostPattern(t *testing.T) {
	for _, p := range []string{"fw.example.com", "*.example.com", "FW.Example.COM.", "192.0.2.7", "::1", "[::1]", "fw_1.example.com", "localhost"} {
		if err := firmware.ValidHostPattern(p); err != nil {
			t.Errorf("ValidHostPattern(%q) = %v", p, err)
		}
	}
	for _, p := range []string{"", " ", "*", "https://fw.example.com", "fw.example.com:443", "fw.*.example.com", "*fw.example.com",
		"fw.example.com/images", "user@fw.example.com", "a..b", "-a.example.com", "fw example.com", "*.", "fw.exämple.com"} {
		if err := firmware.ValidHostPattern(p); err == nil {
			t.Errorf("ValidHostPattern(%q) accepted", p)
		}
	}
	cfg := firmware.Config{StateDir: t.TempDir(), Installer: plainFile{&fileAB{dir: t.TempDir()}}, AllowedHosts: []string{"fw.example.com:443"}}
	if _, err := firmware.NewManager(cfg); err == nil || !strings.Contains(err.Error(), "Config.AllowedHosts") {
		t.Errorf("NewManager with a bad pattern: %v", err)
	}
}
