package agent

import (
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
