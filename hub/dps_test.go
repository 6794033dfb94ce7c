package hub

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// newDPSService is a service client with the DPS policy's token.
func newDPSService(t testing.TB, h *Hub) *service {
	s := newService(t, h)
	cs, err := iothub.ParseConnectionString(h.DPSConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	key, _ := cs.Key()
	s.token = iothub.NewSAS(cs.HostName, key, cs.SharedAccessKeyName, time.Now().Add(time.Hour))
	return s
}

// dialDPS connects as a DPS device with a registration token signed by key.
func dialDPS(t testing.TB, h *Hub, scope, regID, key string) (*testDevice, byte, error) {
	k, _ := base64.StdEncoding.DecodeString(key)
	pw := iothub.NewSAS(dps.Resource(scope, regID), k, dps.RegistrationKeyName, time.Now().Add(time.Hour))
	return dial(t, h, regID, devOpts{username: dps.Username(scope, regID, "hub-test"), password: pw})
}

// register runs the DPS exchange and returns the final operation result.
func register(t testing.TB, d *testDevice, body string) dps.OperationResult {
	t.Helper()
	if codes := d.sub(dps.ResponseFilter); codes[0] > 1 {
		t.Fatalf("subscribe %s refused: %d", dps.ResponseFilter, codes[0])
	}
	d.pub(dps.RegisterTopic("1"), 1, []byte(body))
	m := d.next("$dps/registrations/res/")
	r, err := dps.ParseResponseTopic(m.Topic())
	if err != nil || r.RID != "1" {
		t.Fatalf("response topic %q: %v", m.Topic(), err)
	}
	var res dps.OperationResult
	if r.Status != 202 {
		t.Fatalf("register: %d %s", r.Status, m.Payload())
	}
	if r.RetryAfter <= 0 {
		t.Fatalf("202 without retry-after: %q", m.Topic())
	}
	if err := json.Unmarshal(m.Payload(), &res); err != nil || res.OperationID == "" || res.Status != dps.StatusAssigning {
		t.Fatalf("202 body %s: %v", m.Payload(), err)
	}
	d.pub(dps.StatusTopic("2", res.OperationID), 1, []byte(" "))
	m = d.next("$dps/registrations/res/")
	if r, _ := dps.ParseResponseTopic(m.Topic()); r.Status != 200 || r.RID != "2" {
		t.Fatalf("status poll: %s %s", m.Topic(), m.Payload())
	}
	res = dps.OperationResult{}
	if err := json.Unmarshal(m.Payload(), &res); err != nil || res.RegistrationState == nil {
		t.Fatalf("200 body %s: %v", m.Payload(), err)
	}
	return res
}

func TestDPSGroupEnrollmentAssignsToTheHub(t *testing.T) {
	h := startHub(t)
	svc := newDPSService(t, h)
	groupKey := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))

	// The files an operator and a factory script read.
	if got := strings.TrimSpace(mustRead(t, filepath.Join(h.cfg.StateDir, DPSIDScopeFile))); got != h.IDScope() || !strings.HasPrefix(got, "0ne") {
		t.Fatalf("dps-id-scope %q, IDScope %q", got, h.IDScope())
	}
	if got := strings.TrimSpace(mustRead(t, h.DPSConnectionStringFile())); got != h.DPSConnectionString() ||
		!strings.Contains(got, "SharedAccessKeyName="+dps.ServicePolicy) {
		t.Fatalf("dps-connection-string %q", got)
	}
	if st, _ := os.Stat(h.DPSConnectionStringFile()); st.Mode().Perm() != 0o600 {
		t.Fatalf("dps-connection-string mode %v", st.Mode())
	}

	// The hub's own policy does not open the DPS API, nor the DPS one the hub's.
	hubSvc := newService(t, h)
	if st, b, _ := hubSvc.do("GET", "/enrollmentGroups/factory", nil); st != 401 {
		t.Fatalf("iothubowner on DPS API: %d %s", st, b)
	}
	if st, b, _ := svc.do("GET", "/devices", nil); st != 401 {
		t.Fatalf("provisioningserviceowner on hub API: %d %s", st, b)
	}

	grp := dps.EnrollmentGroup{EnrollmentGroupID: "factory",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKey{PrimaryKey: groupKey}}}
	st, b, _ := svc.do("PUT", "/enrollmentGroups/factory", grp)
	if st != 200 {
		t.Fatalf("PUT group: %d %s", st, b)
	}
	var got dps.EnrollmentGroup
	_ = json.Unmarshal(b, &got)
	if got.ETag == "" || got.ProvisioningStatus != "enabled" || got.Attestation.SymmetricKey.SecondaryKey == "" {
		t.Fatalf("group stored as %s", b)
	}

	derived, _ := dps.DeriveKeyBase64(groupKey, "gw-07")
	// A key of another group, or the group key itself, is refused at CONNECT.
	if _, code, err := dialDPS(t, h, h.IDScope(), "gw-07", groupKey); err == nil || code != 5 {
		t.Fatalf("group key itself: CONNACK %d, %v", code, err)
	}
	if _, code, err := dialDPS(t, h, "0neFFFFFFFF", "gw-07", derived); err == nil || code != 5 {
		t.Fatalf("unknown scope: CONNACK %d, %v", code, err)
	}

	d, code, err := dialDPS(t, h, h.IDScope(), "gw-07", derived)
	if err != nil {
		t.Fatalf("DPS connect: CONNACK %d: %v", code, err)
	}
	// Hub topics are not open to a DPS connection.
	if codes := d.sub(iothub.MethodsFilter); codes[0] != 0x80 {
		t.Fatalf("DPS device subscribed to methods: %v", codes)
	}
	res := register(t, d, `{"registrationId":"gw-07","payload":{"modelId":"dtmi:gwagent:Gateway;1"}}`)
	rs := res.RegistrationState
	if res.Status != dps.StatusAssigned || rs.AssignedHub != h.HostName() || rs.DeviceID != "gw-07" || rs.Substatus != "initialAssignment" {
		t.Fatalf("registration %+v", rs)
	}

	// The device identity exists with the derived key: it can connect to the hub.
	key, _ := base64.StdEncoding.DecodeString(derived)
	connect(t, h, "gw-07", key)

	// The registration state is visible in the service API.
	st, b, _ = svc.do("GET", "/registrations/gw-07", nil)
	var state dps.RegistrationState
	if st != 200 || json.Unmarshal(b, &state) != nil || state.AssignedHub != h.HostName() || state.Status != "assigned" {
		t.Fatalf("GET registration: %d %s", st, b)
	}
	st, b, _ = svc.do("POST", "/registrations/factory/query", dps.QuerySpecification{Query: "*"})
	if st != 200 || !strings.Contains(string(b), `"gw-07"`) {
		t.Fatalf("group registrations: %d %s", st, b)
	}

	// Disabling the group makes the next registration end "disabled".
	grp.ProvisioningStatus = "disabled"
	if st, b, _ := svc.do("PUT", "/enrollmentGroups/factory", grp); st != 200 {
		t.Fatalf("disable group: %d %s", st, b)
	}
	d2, code, err := dialDPS(t, h, h.IDScope(), "gw-08", mustDerive(t, groupKey, "gw-08"))
	if err != nil {
		t.Fatalf("DPS connect gw-08: %d %v", code, err)
	}
	if res := register(t, d2, `{"registrationId":"gw-08"}`); res.Status != dps.StatusDisabled {
		t.Fatalf("disabled group: %+v", res)
	}
	if _, err := h.Twin("gw-08"); err == nil {
		t.Fatal("a disabled enrollment created a device")
	}

	// Deleted: CONNECT is refused.
	if st, b, _ := svc.do("DELETE", "/enrollmentGroups/factory", nil); st != 204 {
		t.Fatalf("DELETE group: %d %s", st, b)
	}
	if _, code, err := dialDPS(t, h, h.IDScope(), "gw-09", mustDerive(t, groupKey, "gw-09")); err == nil || code != 5 {
		t.Fatalf("deleted group: CONNACK %d, %v", code, err)
	}
	if st, _, _ := svc.do("GET", "/enrollmentGroups/factory", nil); st != 404 {
		t.Fatalf("GET deleted group: %d", st)
	}
}

func mustDerive(t testing.TB, groupKey, regID string) string {
	k, err := dps.DeriveKeyBase64(groupKey, regID)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestDPSIndividualEnrollmentSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	h := startHub(t, func(c *Config) { c.StateDir = dir })
	svc := newDPSService(t, h)
	e := dps.IndividualEnrollment{RegistrationID: "line-3", DeviceID: "press-3",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}}
	st, b, _ := svc.do("PUT", "/enrollments/line-3", e)
	if st != 200 {
		t.Fatalf("PUT enrollment: %d %s", st, b)
	}
	var stored dps.IndividualEnrollment
	_ = json.Unmarshal(b, &stored)
	key := stored.Attestation.SymmetricKey.PrimaryKey
	if key == "" {
		t.Fatalf("no generated key: %s", b)
	}
	if st, b, _ := svc.do("PUT", "/enrollments/line-3", e, "If-Match", `"stale"`); st != 412 {
		t.Fatalf("stale etag: %d %s", st, b)
	}
	if st, b, _ := svc.do("PUT", "/enrollments/x", dps.IndividualEnrollment{Attestation: dps.AttestationMechanism{Type: "tpm"}}); st != 400 {
		t.Fatalf("tpm: %d %s", st, b)
	}
	scope := h.IDScope()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}

	h2 := startHub(t, func(c *Config) { c.StateDir = dir })
	if h2.IDScope() != scope {
		t.Fatalf("id scope changed over a restart: %s → %s", scope, h2.IDScope())
	}
	d, code, err := dialDPS(t, h2, scope, "line-3", key)
	if err != nil {
		t.Fatalf("DPS connect: %d %v", code, err)
	}
	res := register(t, d, "")
	if res.Status != dps.StatusAssigned || res.RegistrationState.DeviceID != "press-3" {
		t.Fatalf("registration %+v", res.RegistrationState)
	}
	st, b, _ = newDPSService(t, h2).do("POST", "/enrollments/query", dps.QuerySpecification{Query: "*"})
	if st != 200 || !strings.Contains(string(b), `"registrationState"`) || !strings.Contains(string(b), `"press-3"`) {
		t.Fatalf("query: %d %s", st, b)
	}
}
