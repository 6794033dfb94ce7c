package dps

import (
	"crypto/sha1" //nolint:gosec // DPS and IoT Hub name certificates by SHA-1 thumbprint
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strings"
	"time"
)

// X509Attestation is an X.509 attestation: an individual enrollment holds
// the device's own certificate (ClientCertificates), an enrollment group
// the CA or intermediate that signs its devices' certificates
// (SigningCertificates) or a reference to a CA verified in the DPS
// instance (CAReferences).
type X509Attestation struct {
	ClientCertificates  *X509Certificates `json:"clientCertificates,omitempty"`
	SigningCertificates *X509Certificates `json:"signingCertificates,omitempty"`
	CAReferences        *X509CAReferences `json:"caReferences,omitempty"`
}

// X509Certificates is a primary and an optional secondary certificate.
type X509Certificates struct {
	Primary   *X509CertificateWithInfo `json:"primary,omitempty"`
	Secondary *X509CertificateWithInfo `json:"secondary,omitempty"`
}

// X509CAReferences names CA certificates kept by the DPS instance.
type X509CAReferences struct {
	Primary   string `json:"primary,omitempty"`
	Secondary string `json:"secondary,omitempty"`
}

// X509CertificateWithInfo is a certificate as the service API carries it:
// the certificate in a request (PEM, or base64 of PEM or DER), its info in
// an answer.
type X509CertificateWithInfo struct {
	Certificate string               `json:"certificate,omitempty"`
	Info        *X509CertificateInfo `json:"info,omitempty"`
}

// X509CertificateInfo describes a certificate.
type X509CertificateInfo struct {
	SubjectName      string `json:"subjectName"`
	SHA1Thumbprint   string `json:"sha1Thumbprint"`
	SHA256Thumbprint string `json:"sha256Thumbprint"`
	IssuerName       string `json:"issuerName"`
	NotBeforeUTC     string `json:"notBeforeUtc"`
	NotAfterUTC      string `json:"notAfterUtc"`
	SerialNumber     string `json:"serialNumber"`
	Version          int    `json:"version"`
}

// ParseCertificate reads a certificate as the service API accepts it: PEM,
// or base64 of PEM or of DER.
func ParseCertificate(s string) (*x509.Certificate, error) {
	s = strings.TrimSpace(s)
	raw := []byte(s)
	if !strings.HasPrefix(s, "-----BEGIN") {
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("%w: certificate is neither PEM nor base64", ErrProtocol)
		}
		raw = b
	}
	if blk, _ := pem.Decode(raw); blk != nil {
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w: PEM block is %q, not CERTIFICATE", ErrProtocol, blk.Type)
		}
		raw = blk.Bytes
	}
	c, err := x509.ParseCertificate(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate: %v", ErrProtocol, err)
	}
	return c, nil
}

// Thumbprints are a certificate's SHA-1 and SHA-256 thumbprints in
// upper-case hex, as DPS and IoT Hub show them.
func Thumbprints(c *x509.Certificate) (sha1Hex, sha256Hex string) {
	s1 := sha1.Sum(c.Raw) //nolint:gosec // a thumbprint, not a signature
	s2 := sha256.Sum256(c.Raw)
	return strings.ToUpper(hex.EncodeToString(s1[:])), strings.ToUpper(hex.EncodeToString(s2[:]))
}

// CertificateInfo is the info DPS shows for a certificate.
func CertificateInfo(c *x509.Certificate) *X509CertificateInfo {
	s1, s2 := Thumbprints(c)
	return &X509CertificateInfo{
		SubjectName: c.Subject.String(), SHA1Thumbprint: s1, SHA256Thumbprint: s2, IssuerName: c.Issuer.String(),
		NotBeforeUTC: c.NotBefore.UTC().Format(time.RFC3339), NotAfterUTC: c.NotAfter.UTC().Format(time.RFC3339),
		SerialNumber: strings.ToUpper(c.SerialNumber.Text(16)), Version: c.Version,
	}
}

// Each calls f with the primary and then the secondary certificate, the
// ones that are set.
func (cs *X509Certificates) Each(f func(*X509CertificateWithInfo)) {
	if cs == nil {
		return
	}
	for _, c := range []*X509CertificateWithInfo{cs.Primary, cs.Secondary} {
		if c != nil {
			f(c)
		}
	}
}
