package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub/dps"
)

// TestDPSX509AgainstLocalHub adds an X.509 enrollment group from a CA file
// and an individual enrollment from a device certificate, and registers
// devices with certificates over the DPS device protocol.
func TestDPSX509AgainstLocalHub(t *testing.T) {
	h, e := startHub(t)
	dir := t.TempDir()
	ca := testutil.NewCA(t, "factory CA")
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, []byte(ca.PEM), 0o644); err != nil {
		t.Fatal(err)
	}
	sha1Hex, _ := dps.Thumbprints(ca.Cert)

	r := e.gwctl(t, "dps", "group", "add", "factory-x509", "--ca-file", caFile)
	if r.code != 0 || !strings.Contains(r.stdout, "created enrollment group factory-x509 (enabled)") || !strings.Contains(r.stdout, sha1Hex) {
		t.Fatalf("group add --ca-file: %d %q %q", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "-o", "json", "dps", "group", "show", "factory-x509")
	var g dps.EnrollmentGroup
	if err := json.Unmarshal([]byte(r.stdout), &g); err != nil || g.Attestation.Type != dps.AttestationX509 ||
		g.Attestation.X509.SigningCertificates.Primary.Info.SHA1Thumbprint != sha1Hex {
		t.Fatalf("group show: %v %s", err, r.stdout)
	}
	dev := ca.Device(t, "gw-x509-1")
	if st, err := registerDPSAs(t, h, "gw-x509-1", "", &dev.TLS); err != nil || st.Status != dps.StatusAssigned || st.DeviceID != "gw-x509-1" {
		t.Fatalf("register with a CA-signed certificate: %+v %v", st, err)
	}

	// A device certificate is not a CA; keys and a certificate do not mix;
	// an individual certificate's CN must be the registration id.
	self := (*testutil.CA)(nil).Device(t, "gw-x509-2")
	certFile, _ := self.WriteFiles(t, dir, "dev2")
	for _, args := range [][]string{
		{"dps", "group", "add", "bad", "--ca-file", certFile},
		{"dps", "group", "add", "bad", "--ca-file", caFile, "--primary-key", "MDEyMzQ1Njc4OWFiY2RlZg=="},
		{"dps", "enrollment", "add", "gw-x509-3", "--cert-file", certFile},
		{"dps", "enrollment", "add", "gw-x509-3", "--cert-file", filepath.Join(dir, "missing.pem")},
	} {
		if r := e.gwctl(t, args...); r.code != exitUsage {
			t.Errorf("%v: exit %d %q, want a usage error", args, r.code, r.stderr)
		}
	}

	r = e.gwctl(t, "dps", "enrollment", "add", "gw-x509-2", "--cert-file", certFile, "--device-id", "gateway-2")
	if r.code != 0 || !strings.Contains(r.stdout, "clientCertificate:") {
		t.Fatalf("enrollment add --cert-file: %d %q %q", r.code, r.stdout, r.stderr)
	}
	if st, err := registerDPSAs(t, h, "gw-x509-2", "", &self.TLS); err != nil || st.Status != dps.StatusAssigned || st.DeviceID != "gateway-2" {
		t.Fatalf("register with the enrolled certificate: %+v %v", st, err)
	}
	// Another certificate with the same CN is refused.
	if _, err := registerDPSAs(t, h, "gw-x509-2", "", &ca.Device(t, "gw-x509-2").TLS); err == nil {
		t.Fatal("a certificate other than the enrolled one registered")
	}
}
