package hub

import (
	"crypto/x509"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// X.509 attestation. An individual enrollment holds the device's
// certificate and matches it by thumbprint; an enrollment group holds a CA
// (or intermediate) certificate in signingCertificates and admits every
// device whose certificate chains to it. In both the certificate's common
// name is the registration id, and it must be valid now.
//
// Real DPS creates a group's devices in IoT Hub as certificateAuthority
// devices (the hub then trusts the CA itself). This hub's registry
// authenticates X.509 devices by thumbprint only, so every X.509
// registration creates (or updates) a selfSigned device holding the SHA-1
// thumbprint of the certificate the device registered with; the device
// connects to the hub with that same certificate either way.

// checkX509Attestation validates an X.509 attestation of an individual
// enrollment (clientCertificates) or of a group (signingCertificates) and
// fills in each certificate's info.
func checkX509Attestation(a *dps.AttestationMechanism, group bool) (string, bool) {
	a.SymmetricKey, a.TPM = nil, nil
	x := a.X509
	if x == nil {
		return "attestation.x509 is required for type x509", false
	}
	if x.CAReferences != nil && (x.CAReferences.Primary != "" || x.CAReferences.Secondary != "") {
		return "x509.caReferences name CA certificates verified in a DPS instance; this hub takes the CA itself in x509.signingCertificates", false
	}
	certs, field := x.ClientCertificates, "clientCertificates"
	if group {
		certs, field = x.SigningCertificates, "signingCertificates"
		if x.ClientCertificates != nil {
			return "an enrollment group takes x509.signingCertificates (its CA), not clientCertificates", false
		}
	} else if x.SigningCertificates != nil {
		return "an individual enrollment takes x509.clientCertificates (the device's certificate), not signingCertificates", false
	}
	if certs == nil || certs.Primary == nil || certs.Primary.Certificate == "" {
		return "x509." + field + ".primary.certificate is required", false
	}
	var msg string
	certs.Each(func(c *dps.X509CertificateWithInfo) {
		if msg != "" {
			return
		}
		cert, err := dps.ParseCertificate(c.Certificate)
		if err != nil {
			msg = "x509." + field + ": " + err.Error()
			return
		}
		if group && !cert.IsCA {
			msg = "x509.signingCertificates: " + cert.Subject.String() + " is not a CA certificate (basicConstraints CA:TRUE)"
			return
		}
		c.Info = dps.CertificateInfo(cert)
	})
	return msg, msg == ""
}

// x509Match finds the enrollment of a device that presented certs (leaf
// first) for regID: its individual enrollment first (by thumbprint), then
// every X.509 enrollment group whose CA the certificate chains to.
func (s *dpsServer) x509Match(regID string, certs []*x509.Certificate, now time.Time) (*dpsConn, error) {
	leaf := certs[0]
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("hub: DPS: 401002 certificate %q is not valid now (valid %s to %s)", leaf.Subject.CommonName,
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if leaf.Subject.CommonName != regID {
		return nil, fmt.Errorf("hub: DPS: 401002 certificate CN %q does not match registration id %q", leaf.Subject.CommonName, regID)
	}
	sha1Hex, _ := dps.Thumbprints(leaf)
	conn := &dpsConn{regID: regID, thumbprint: sha1Hex}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.data.Enrollments[regID]; e != nil {
		// An individual enrollment overrides the groups.
		if e.Attestation.Type != dps.AttestationX509 || e.Attestation.X509 == nil {
			return nil, fmt.Errorf("hub: DPS: 401002 the enrollment of %q uses %s attestation, not a certificate", regID, e.Attestation.Type)
		}
		ok := false
		e.Attestation.X509.ClientCertificates.Each(func(c *dps.X509CertificateWithInfo) {
			if c.Info != nil && strings.EqualFold(c.Info.SHA1Thumbprint, sha1Hex) {
				ok = true
			}
		})
		if !ok {
			return nil, fmt.Errorf("hub: DPS: 401002 certificate %s is not the one enrolled for %q", sha1Hex, regID)
		}
		return conn, nil
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	ids := make([]string, 0, len(s.data.Groups))
	for id, g := range s.data.Groups {
		if g.Attestation.Type == dps.AttestationX509 && g.Attestation.X509 != nil {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	var lastErr error
	for _, id := range ids {
		roots := x509.NewCertPool()
		s.data.Groups[id].Attestation.X509.SigningCertificates.Each(func(c *dps.X509CertificateWithInfo) {
			if ca, err := dps.ParseCertificate(c.Certificate); err == nil {
				roots.AddCert(ca)
			}
		})
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		if err == nil {
			conn.groupID = id
			return conn, nil
		}
		lastErr = err
	}
	if lastErr == nil {
		return nil, fmt.Errorf("hub: DPS: 401002 no enrollment of %q and no X.509 enrollment group", regID)
	}
	return nil, fmt.Errorf("hub: DPS: 401002 certificate %q is not signed by the CA of any enrollment group: %w", regID, lastErr)
}

// x509Auth is the registry authentication of an X.509 registration.
func (c *dpsConn) x509Auth() iothub.Authentication {
	return iothub.Authentication{Type: iothub.AuthSelfSigned,
		X509Thumbprint: &iothub.X509Thumbprint{PrimaryThumbprint: c.thumbprint, SecondaryThumbprint: c.thumbprint}}
}

var errNoClientCert = errors.New("hub: DPS: no SAS token and no TLS client certificate")
