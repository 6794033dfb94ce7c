package agent

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent/provision"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
	"github.com/gwagent/gwagent/iothub/service"
)

// An agent with only a device certificate (no registration id: the CN is
// it) is refused while DPS knows no CA for it, keeps running and retrying,
// and provisions and connects with the same certificate once the operator
// adds the enrollment group.
func TestProvisionsWithX509CertificateOnceTheGroupExists(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCA(t, "factory CA")
	certFile, keyFile := ca.Device(t, "gw-cert-1").WriteFiles(t, t.TempDir(), "device")
	cfg := loadConfig(t, e.yaml(map[string]string{
		"hub": fmt.Sprintf("hub:\n  address: %q\n  caFile: %q\n  keepAlive: 30s\n  connectTimeout: 5s\n  requestTimeout: 5s\n  minRetryDelay: 50ms\n  maxRetryDelay: 500ms\n"+
			"provisioning:\n  idScope: %q\n  globalEndpoint: localhost\n  address: %q\n  x509:\n    certFile: %q\n    keyFile: %q\n",
			e.addr, e.CAFile(), e.IDScope(), e.addr, certFile, keyFile),
	}))
	if cfg.Provisioning.RegistrationID != "gw-cert-1" {
		t.Fatalf("registration id %q, want the certificate's CN", cfg.Provisioning.RegistrationID)
	}
	r := start(t, cfg)
	testutil.Eventually(t, 20*time.Second, "READY and a status naming the refusal", func() bool {
		return r.notifier.has("READY=1") && strings.Contains(r.session.Health().LastError, "DPS refused")
	})

	cs, _ := iothub.ParseConnectionString(e.DPSConnectionString())
	svc, err := service.NewDPS(cs, service.Options{BaseURL: "https://" + e.HTTPSAddr(), CAFile: e.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.CloseIdleConnections()
	if _, err := svc.PutEnrollmentGroup(context.Background(), dps.EnrollmentGroup{EnrollmentGroupID: "x509",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: ca.PEM}}}}}, ""); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "provisioned agent connected with its certificate", func() bool { return e.Connected("gw-cert-1") })
	a, ok, err := provision.Load(e.stateDir)
	if !ok || err != nil || !a.X509 || a.Key != "" || a.DeviceID != "gw-cert-1" {
		t.Fatalf("kept assignment %+v %v %v", a, ok, err)
	}
}

// With hub.transport websocket the agent reaches DPS over MQTT on a
// WebSocket too (8883 is never dialled: provisioning.address is closed),
// then its hub the same way.
func TestProvisionsOverWebSocket(t *testing.T) {
	e := newEnvWith(t, true)
	e.addGroup(t)
	cfg := loadConfig(t, e.yaml(map[string]string{
		"hub": fmt.Sprintf("hub:\n  transport: websocket\n  webSocketAddress: %q\n  caFile: %q\n  keepAlive: 30s\n  connectTimeout: 5s\n  requestTimeout: 5s\n  minRetryDelay: 50ms\n  maxRetryDelay: 500ms\n"+
			"provisioning:\n  idScope: %q\n  globalEndpoint: localhost\n  address: 127.0.0.1:1\n  webSocketAddress: %q\n  registrationId: gw-ws-79\n  groupKey: %q\n",
			e.HTTPSAddr(), e.CAFile(), e.IDScope(), e.HTTPSAddr(), testGroupKey),
	}))
	start(t, cfg)
	testutil.Eventually(t, 20*time.Second, "provisioned over WebSocket and connected", func() bool { return e.Connected("gw-ws-79") })
	if a, ok, err := provision.Load(e.stateDir); !ok || err != nil || a.DeviceID != "gw-ws-79" {
		t.Fatalf("kept assignment %+v %v %v", a, ok, err)
	}
}
