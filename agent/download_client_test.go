package agent

import (
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/internal/testutil"
)

// TestDownloadClientTrustsCAFile: images served under hub.caFile's CA
// download; without that file the same server is not trusted.
func TestDownloadClientTrustsCAFile(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("image"))
	}))
	defer srv.Close()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	block := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(caFile, block, 0o600); err != nil {
		t.Fatal(err)
	}

	withCA, err := downloadClient(caFile)
	if err != nil {
		t.Fatal(err)
	}
	defer withCA.CloseIdleConnections()
	resp, err := withCA.Get(srv.URL)
	if err != nil {
		t.Fatalf("with hub.caFile: %v", err)
	}
	resp.Body.Close()

	plain, err := downloadClient("")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.CloseIdleConnections()
	if _, err := plain.Get(srv.URL); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without hub.caFile: %v, want a certificate error", err)
	}
	if _, err := downloadClient(filepath.Join(t.TempDir(), "missing.pem")); err == nil || !strings.Contains(err.Error(), "hub.caFile") {
		t.Fatalf("missing hub.caFile: %v", err)
	}
}

// Downloads go through update.proxy with CONNECT (a real tinyproxy), with
// its credentials; a proxy that refuses is named in the error, without the
// password.
func TestDownloadClientThroughProxy(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("image"))
	}))
	defer srv.Close()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	target := strings.TrimPrefix(srv.URL, "https://")
	p := testutil.StartProxy(t, testutil.ProxyOptions{User: "gw", Password: "s3cret"})

	withCreds := *p.URL
	withCreds.User = url.UserPassword("gw", "s3cret")
	c, err := downloadClientVia(caFile, &withCreds)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(srv.URL + "/fw.bin")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if string(body) != "image" {
		t.Fatalf("body %q", body)
	}
	if n := p.Connects(t, target); n != 1 {
		t.Fatalf("the proxy logged %d CONNECT %s, want 1:\n%s", n, target, p.Log(t))
	}

	c, err = downloadClientVia(caFile, p.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Get(srv.URL + "/fw.bin")
	if err == nil || !strings.Contains(err.Error(), "via proxy "+p.URL.String()+": ") || !strings.Contains(err.Error(), "Proxy Authentication Required") {
		t.Fatalf("err = %v, want it to name the proxy and its 407", err)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("err = %v shows the password", err)
	}
}
