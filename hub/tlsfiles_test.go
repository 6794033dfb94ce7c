package hub

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestTLSFilesKeptAndReissued(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	m1, err := loadTLS(dir, "localhost", "", "", now)
	if err != nil {
		t.Fatal(err)
	}
	ca1 := mustRead(t, filepath.Join(dir, caCertFile))
	leaf := m1.cert.Leaf
	for _, name := range []string{"localhost", "127.0.0.1", "::1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: m1.pool}); err != nil {
			t.Errorf("server certificate for %s: %v", name, err)
		}
	}
	// Same host: the same certificate is served.
	m2, err := loadTLS(dir, "localhost", "", "", now)
	if err != nil || string(m2.cert.Certificate[0]) != string(m1.cert.Certificate[0]) {
		t.Fatalf("restart re-issued the certificate (%v)", err)
	}
	// A new host name: a new certificate from the same CA.
	m3, err := loadTLS(dir, "hub.example.test", "", "", now)
	if err != nil {
		t.Fatal(err)
	}
	if mustRead(t, filepath.Join(dir, caCertFile)) != ca1 {
		t.Fatal("the CA changed")
	}
	if _, err := m3.cert.Leaf.Verify(x509.VerifyOptions{DNSName: "hub.example.test", Roots: m1.pool}); err != nil {
		t.Fatalf("re-issued certificate: %v", err)
	}
	// Close to expiry: re-issued.
	m4, err := loadTLS(dir, "hub.example.test", "", "", now.Add(serverLifetime-serverRenewBefore/2))
	if err != nil || string(m4.cert.Certificate[0]) == string(m3.cert.Certificate[0]) {
		t.Fatalf("certificate near expiry not re-issued (%v)", err)
	}
	// The operator's pair.
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: m3.cert.Certificate[0]})
	cf := filepath.Join(t.TempDir(), "c.pem")
	if err := os.WriteFile(cf, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	m5, err := loadTLS(t.TempDir(), "x", cf, filepath.Join(dir, serverKeyFile), now)
	if err == nil {
		// The key on disk now belongs to m4, so the pair must not match.
		t.Fatalf("mismatched pair accepted: %v", m5.cert.Leaf.Subject)
	}
	if _, err := loadTLS(t.TempDir(), "x", cf, "", now); err == nil {
		t.Fatal("certificate without key accepted")
	}
}
