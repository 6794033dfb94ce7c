package config

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
)

func TestProvisioningX509(t *testing.T) {
	ca := testutil.NewCA(t, "factory CA")
	dir := t.TempDir()
	certFile, keyFile := ca.Device(t, "gw-cn-1").WriteFiles(t, dir, "dev")
	now := time.Now()
	expCert, expKey := ca.Issue(t, "gw-cn-1", now.Add(-48*time.Hour), now.Add(-time.Hour)).WriteFiles(t, dir, "expired")
	badCN, badCNKey := ca.Device(t, "Not A Registration Id").WriteFiles(t, dir, "badcn")
	section := func(extra string) string {
		return "provisioning:\n  idScope: 0ne00000001\n" + extra
	}
	x509 := func(c, k string) string { return fmt.Sprintf("  x509:\n    certFile: %q\n    keyFile: %q\n", c, k) }

	c, err := load(t, section(x509(certFile, keyFile)))
	if err != nil {
		t.Fatal(err)
	}
	p := c.Provisioning
	if p.RegistrationID != "gw-cn-1" || p.Certificate == nil || len(p.Key) != 0 || !p.Attested() || c.Hub.Certificate != p.Certificate {
		t.Fatalf("provisioning %v, hub certificate %v", p, c.Hub.Certificate)
	}

	// Refused by DPS, not at start: warnings that say why.
	c, err = load(t, section(x509(expCert, expKey)))
	if err != nil || !strings.Contains(strings.Join(c.Warnings, "\n"), "DPS will refuse it") {
		t.Fatalf("expired: %v %q", err, c.Warnings)
	}
	c, err = load(t, section("  registrationId: gw-other\n"+x509(certFile, keyFile)))
	if err != nil || c.Provisioning.RegistrationID != "gw-other" || !strings.Contains(strings.Join(c.Warnings, "\n"), `not the certificate's CN "gw-cn-1"`) {
		t.Fatalf("CN mismatch: %v %q", err, c.Warnings)
	}

	for name, tc := range map[string]struct{ yaml, key string }{
		"cert without key": {section(fmt.Sprintf("  x509:\n    certFile: %q\n", certFile)), "provisioning.x509.certFile"},
		"key and cert":     {section("  groupKey: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n" + x509(certFile, keyFile)), "provisioning.groupKey"},
		"key of another":   {section(x509(certFile, expKey)), "provisioning.x509.certFile"},
		"CN not an id":     {section(x509(badCN, badCNKey)), "provisioning.x509.certFile"},
	} {
		_, err := load(t, tc.yaml)
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%s: %v, want a config error naming %s", name, err, tc.key)
		}
	}
}
