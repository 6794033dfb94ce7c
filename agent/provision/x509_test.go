package provision

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub/dps"
)

func TestRegisterWithX509CertificateOfAGroupCA(t *testing.T) {
	h, svc := startHub(t, "enabled")
	ca := testutil.NewCA(t, "factory CA")
	_, err := svc.PutEnrollmentGroup(context.Background(), dps.EnrollmentGroup{EnrollmentGroupID: "x509",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: ca.PEM}}}}}, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := func(regID string, dev *testutil.DeviceCert) Config {
		c := cfgFor(h, regID, groupKey)
		c.Key, c.Certificate = nil, &dev.TLS
		return c
	}
	a, err := Register(context.Background(), cfg("gw-x509", ca.Device(t, "gw-x509")))
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	cs := a.ConnectionString()
	if !a.X509 || a.Key != "" || !cs.X509 || cs.DeviceID != "gw-x509" || cs.HostName != "localhost" {
		t.Fatalf("assignment %+v, connection string %s", a, cs)
	}
	dir := t.TempDir()
	if err := Save(dir, a); err != nil {
		t.Fatal(err)
	}
	if b, ok, err := Load(dir); !ok || err != nil || !b.X509 || b.ConnectionString().String() != cs.String() {
		t.Fatalf("Load = %+v %v %v", b, ok, err)
	}

	// Certificates DPS refuses: each is ErrRefused, which the agent
	// retries with backoff, not a crash.
	other := testutil.NewCA(t, "other CA")
	now := time.Now()
	for name, c := range map[string]Config{
		"another CA":  cfg("gw-x509b", other.Device(t, "gw-x509b")),
		"CN mismatch": cfg("gw-x509b", ca.Device(t, "gw-someone-else")),
		"expired":     cfg("gw-x509b", ca.Issue(t, "gw-x509b", now.Add(-48*time.Hour), now.Add(-time.Hour))),
	} {
		if _, err := Register(context.Background(), c); !errors.Is(err, ErrRefused) {
			t.Errorf("%s: %v, want ErrRefused", name, err)
		}
	}
}
