package hub

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// dialDPSX509 connects as a DPS device authenticated by its certificate.
func dialDPSX509(t testing.TB, h *Hub, regID string, cert *testutil.DeviceCert) (*testDevice, byte, error) {
	return dial(t, h, regID, devOpts{username: dps.Username(h.IDScope(), regID, "hub-test"), tlsCert: &cert.TLS})
}

func TestDPSX509GroupAndIndividualEnrollments(t *testing.T) {
	h := startHub(t)
	svc := newDPSService(t, h)
	ca := testutil.NewCA(t, "factory CA")
	otherCA := testutil.NewCA(t, "someone else's CA")

	grp := dps.EnrollmentGroup{EnrollmentGroupID: "x509-factory", Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: ca.PEM}}}}}
	st, b, _ := svc.do("PUT", "/enrollmentGroups/x509-factory", grp)
	if st != 200 {
		t.Fatalf("PUT group: %d %s", st, b)
	}
	var got dps.EnrollmentGroup
	_ = json.Unmarshal(b, &got)
	sha1Hex, _ := dps.Thumbprints(ca.Cert)
	if info := got.Attestation.X509.SigningCertificates.Primary.Info; info == nil || info.SHA1Thumbprint != sha1Hex || !strings.Contains(info.SubjectName, "factory CA") {
		t.Fatalf("group stored as %s", b)
	}

	// A group's CA must be a CA; an individual enrollment takes a client certificate.
	leafAsCA := ca.Device(t, "not-a-ca")
	bad := grp
	bad.EnrollmentGroupID = "bad"
	bad.Attestation.X509 = &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: leafAsCA.PEM}}}
	if st, b, _ := svc.do("PUT", "/enrollmentGroups/bad", bad); st != 400 || !strings.Contains(string(b), "not a CA") {
		t.Fatalf("leaf as a group CA: %d %s", st, b)
	}
	if st, b, _ := svc.do("PUT", "/enrollments/gw-bad", dps.IndividualEnrollment{Attestation: bad.Attestation}); st != 400 || !strings.Contains(string(b), "clientCertificates") {
		t.Fatalf("individual with signingCertificates: %d %s", st, b)
	}

	// A device certificate signed by the group's CA with CN = registration id registers.
	dev := ca.Device(t, "gw-x1")
	d, code, err := dialDPSX509(t, h, "gw-x1", dev)
	if err != nil {
		t.Fatalf("DPS connect with a CA-signed certificate: CONNACK %d: %v", code, err)
	}
	res := register(t, d, `{"registrationId":"gw-x1"}`)
	if res.Status != dps.StatusAssigned || res.RegistrationState.DeviceID != "gw-x1" || res.RegistrationState.AssignedHub != h.HostName() {
		t.Fatalf("registration: %+v", res.RegistrationState)
	}
	d.c.Disconnect(100)
	// The device identity holds the certificate's thumbprint, and the
	// device connects to the hub with the same certificate (x509=true).
	var dev1 iothub.Device
	st, b, _ = newService(t, h).do("GET", "/devices/gw-x1", nil)
	_ = json.Unmarshal(b, &dev1)
	devSHA1, _ := dps.Thumbprints(dev.Cert)
	if st != 200 || dev1.Authentication.Type != iothub.AuthSelfSigned || dev1.Authentication.X509Thumbprint == nil ||
		!strings.EqualFold(dev1.Authentication.X509Thumbprint.PrimaryThumbprint, devSHA1) {
		t.Fatalf("device identity: %d %s", st, b)
	}
	if _, code, err := dial(t, h, "gw-x1", devOpts{tlsCert: &dev.TLS}); err != nil {
		t.Fatalf("hub connect with the certificate: CONNACK %d: %v", code, err)
	}
	var rs dps.RegistrationState
	if st, b, _ := svc.do("GET", "/registrations/gw-x1", nil); st != 200 || json.Unmarshal(b, &rs) != nil || rs.Status != dps.StatusAssigned {
		t.Fatalf("registration state: %d %s", st, b)
	}

	// Refused at CONNECT (0x05), each with the cause in the hub's log.
	now := time.Now()
	for name, c := range map[string]struct {
		regID string
		cert  *testutil.DeviceCert
	}{
		"another CA":        {"gw-x2", otherCA.Device(t, "gw-x2")},
		"self-signed":       {"gw-x2", (*testutil.CA)(nil).Device(t, "gw-x2")},
		"CN mismatch":       {"gw-x2", ca.Device(t, "gw-x3")},
		"expired":           {"gw-x2", ca.Issue(t, "gw-x2", now.Add(-48*time.Hour), now.Add(-24*time.Hour))},
		"not yet valid":     {"gw-x2", ca.Issue(t, "gw-x2", now.Add(time.Hour), now.Add(48*time.Hour))},
		"no cert, no token": {"gw-x2", nil},
	} {
		o := devOpts{username: dps.Username(h.IDScope(), c.regID, "hub-test")}
		if c.cert != nil {
			o.tlsCert = &c.cert.TLS
		}
		if _, code, err := dial(t, h, c.regID, o); err == nil || code != 5 {
			t.Errorf("%s: CONNACK %d, %v; want 5", name, code, err)
		}
	}

	// An individual enrollment matches its certificate by thumbprint and
	// overrides the group: a CA-signed certificate that is not the
	// enrolled one is refused; a self-signed enrolled one registers.
	self := (*testutil.CA)(nil).Device(t, "gw-x4")
	ind := dps.IndividualEnrollment{DeviceID: "gateway-4", Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: self.PEM}}}}}
	if st, b, _ := svc.do("PUT", "/enrollments/gw-x4", ind); st != 200 {
		t.Fatalf("PUT enrollment: %d %s", st, b)
	}
	if _, code, err := dialDPSX509(t, h, "gw-x4", ca.Device(t, "gw-x4")); err == nil || code != 5 {
		t.Fatalf("group-signed certificate of an individually enrolled device: CONNACK %d, %v", code, err)
	}
	d, code, err = dialDPSX509(t, h, "gw-x4", self)
	if err != nil {
		t.Fatalf("DPS connect with the enrolled certificate: CONNACK %d: %v", code, err)
	}
	res = register(t, d, `{"registrationId":"gw-x4"}`)
	if res.Status != dps.StatusAssigned || res.RegistrationState.DeviceID != "gateway-4" {
		t.Fatalf("individual registration: %+v", res.RegistrationState)
	}
	if _, code, err := dial(t, h, "gateway-4", devOpts{tlsCert: &self.TLS}); err != nil {
		t.Fatalf("hub connect as gateway-4: CONNACK %d: %v", code, err)
	}
}
