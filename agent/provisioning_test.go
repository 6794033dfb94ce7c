package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent/provision"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
	"github.com/gwagent/gwagent/iothub/service"
)

const testGroupKey = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

// provisioningYAML is a hub section without a connection string and a
// provisioning section pointed at the env's hub, which is also the DPS.
func (e *env) provisioningYAML(regID, dpsAddr string) map[string]string {
	return map[string]string{
		"hub": fmt.Sprintf("hub:\n  address: %q\n  caFile: %q\n  keepAlive: 30s\n  connectTimeout: 5s\n  requestTimeout: 5s\n  minRetryDelay: 50ms\n  maxRetryDelay: 500ms\n"+
			"provisioning:\n  idScope: %q\n  globalEndpoint: localhost\n  address: %q\n  registrationId: %q\n  groupKey: %q\n",
			e.addr, e.CAFile(), e.IDScope(), dpsAddr, regID, testGroupKey),
	}
}

func (e *env) addGroup(t *testing.T) {
	t.Helper()
	cs, _ := iothub.ParseConnectionString(e.DPSConnectionString())
	svc, err := service.NewDPS(cs, service.Options{BaseURL: "https://" + e.HTTPSAddr(), CAFile: e.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.CloseIdleConnections()
	if _, err := svc.PutEnrollmentGroup(context.Background(), dps.EnrollmentGroup{EnrollmentGroupID: "factory",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKey{PrimaryKey: testGroupKey}}}, ""); err != nil {
		t.Fatal(err)
	}
}

func TestProvisionsWithGroupKeyAndReprovisionsWhenRefused(t *testing.T) {
	e := newEnv(t)
	e.addGroup(t)
	cfg := loadConfig(t, e.yaml(e.provisioningYAML("gw-77", e.addr)))
	start(t, cfg)
	testutil.Eventually(t, 20*time.Second, "provisioned agent connected", func() bool { return e.Connected("gw-77") })
	a, ok, err := provision.Load(e.stateDir)
	if !ok || err != nil || a.DeviceID != "gw-77" || a.AssignedHub != "localhost" {
		t.Fatalf("kept assignment %+v %v %v", a, ok, err)
	}
	if st, _ := os.Stat(filepath.Join(e.stateDir, provision.AssignmentFile)); st.Mode().Perm() != 0o600 {
		t.Fatalf("assignment mode %v", st.Mode())
	}
	before := a.ProvisionedAt

	// The identity disappears from the hub: the agent is refused, provisions
	// again (DPS recreates the device) and reconnects.
	svc, _ := iothub.ParseConnectionString(e.ServiceConnectionString())
	c, err := service.New(svc, service.Options{BaseURL: "https://" + e.HTTPSAddr(), CAFile: e.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	if err := c.DeleteDevice(context.Background(), "gw-77"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "re-provisioned", func() bool {
		a, ok, _ := provision.Load(e.stateDir)
		return ok && a.ProvisionedAt.After(before) && e.Connected("gw-77")
	})

}

func TestProvisioningUnreachableStaysReadyAndSaysWhy(t *testing.T) {
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(e.provisioningYAML("gw-78", "127.0.0.1:1")))
	r := start(t, cfg)
	testutil.Eventually(t, 20*time.Second, "READY and a status naming DPS", func() bool {
		h := r.session.Health()
		return r.notifier.has("READY=1") && strings.Contains(h.LastError, "provisioning (DPS localhost, registration gw-78)")
	})
	if _, ok, _ := provision.Load(e.stateDir); ok {
		t.Fatal("an assignment was kept without DPS")
	}
}

// TestAssignedHubDoesNotResolve: DPS assigns a hub whose name does not
// resolve (here gwhub.invalid, the hub's own name, with no hub.address to
// say where it is). The agent keeps the assignment, stays READY, says which
// name failed, and retries with a growing delay instead of spinning.
func TestAssignedHubDoesNotResolve(t *testing.T) {
	const name = "gwhub.invalid"
	e := &env{hubDir: t.TempDir(), addr: "127.0.0.1:0", stateDir: t.TempDir(), hostName: name}
	e.startHub(t)
	e.addGroup(t)
	yaml := fmt.Sprintf("hub:\n  caFile: %q\n  transport: mqtt\n  connectTimeout: 5s\n  minRetryDelay: 50ms\n  maxRetryDelay: 400ms\n"+
		"provisioning:\n  idScope: %q\n  globalEndpoint: %s\n  address: %q\n  registrationId: gw-79\n  groupKey: %q\n",
		e.CAFile(), e.IDScope(), name, e.addr, testGroupKey)
	r := start(t, loadConfig(t, e.yaml(map[string]string{"hub": yaml})))
	testutil.Eventually(t, 20*time.Second, "an assignment kept and the hub's name named as the cause", func() bool {
		a, ok, _ := provision.Load(e.stateDir)
		h := r.session.Health()
		return ok && a.AssignedHub == name && r.notifier.has("READY=1") && strings.Contains(h.LastError, name) && !h.RetryAt.IsZero()
	})
	// The retries back off: from 50 ms, doubling, towards 400 ms.
	var last time.Time
	var gaps []time.Duration
	testutil.Eventually(t, 20*time.Second, "five retries", func() bool {
		h := r.session.Health()
		if !h.RetryAt.IsZero() && !h.RetryAt.Equal(last) {
			if !last.IsZero() {
				gaps = append(gaps, h.RetryAt.Sub(last))
			}
			last = h.RetryAt
		}
		return len(gaps) >= 5
	})
	t.Logf("last error %q; retry gaps %v", r.session.Health().LastError, gaps)
	for _, g := range gaps[3:] {
		if g < 150*time.Millisecond {
			t.Errorf("retries %v apart: no backoff (gaps %v)", g, gaps)
		}
	}
	if e.Connected("gw-79") {
		t.Error("connected to a hub whose name does not resolve")
	}
}
