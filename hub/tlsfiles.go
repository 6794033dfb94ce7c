package hub

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// File names inside the state directory.
const (
	caCertFile     = "ca.pem"
	caKeyFile      = "ca-key.pem"
	serverCertFile = "server.pem"
	serverKeyFile  = "server-key.pem"
)

const (
	caLifetime     = 10 * 365 * 24 * time.Hour
	serverLifetime = 397 * 24 * time.Hour
	// A server certificate is re-issued this long before it expires, so a hub
	// that is restarted now and then never serves an expired certificate.
	serverRenewBefore = 30 * 24 * time.Hour
)

// tlsMaterial is the hub's server certificate and, when the hub made it
// itself, the CA that clients must trust.
type tlsMaterial struct {
	cert   tls.Certificate
	caFile string         // "" when the operator supplied the certificate
	pool   *x509.CertPool // roots that verify cert; nil when unknown
}

// loadTLS returns the certificate the hub serves. With certFile/keyFile it
// uses the operator's pair; otherwise it keeps (or creates on first start) a
// private CA in dir and a server certificate for host, 127.0.0.1 and ::1,
// re-issuing the server certificate when its names no longer match or it is
// about to expire. The CA is never replaced, so clients keep trusting it.
func loadTLS(dir, host, certFile, keyFile string, now time.Time) (*tlsMaterial, error) {
	if certFile != "" || keyFile != "" {
		if certFile == "" || keyFile == "" {
			return nil, errors.New("hub: TLS certificate and key must be given together")
		}
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("hub: load TLS key pair: %w", err)
		}
		return &tlsMaterial{cert: cert}, nil
	}

	caCert, caKey, err := loadOrCreateCA(dir, now)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(caCert)

	cert, err := loadServerCert(dir, host, caCert, now)
	if err != nil {
		cert, err = issueServerCert(dir, host, caCert, caKey, now)
		if err != nil {
			return nil, err
		}
	}
	return &tlsMaterial{cert: cert, caFile: filepath.Join(dir, caCertFile), pool: pool}, nil
}

func loadOrCreateCA(dir string, now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, errCert := os.ReadFile(filepath.Join(dir, caCertFile))
	keyPEM, errKey := os.ReadFile(filepath.Join(dir, caKeyFile))
	if errCert == nil && errKey == nil {
		cert, key, err := parsePair(certPEM, keyPEM)
		if err != nil {
			return nil, nil, fmt.Errorf("hub: CA in %s: %w", dir, err)
		}
		return cert, key, nil
	}
	if !errors.Is(errCert, fs.ErrNotExist) && errCert != nil {
		return nil, nil, fmt.Errorf("hub: read CA: %w", errCert)
	}
	if !errors.Is(errKey, fs.ErrNotExist) && errKey != nil {
		return nil, nil, fmt.Errorf("hub: read CA key: %w", errKey)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("hub: CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "gwhub local CA", Organization: []string{"gwagent"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("hub: create CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("hub: parse CA: %w", err)
	}
	// Key first: a CA certificate without its key would be unusable.
	if err := writePEMKey(filepath.Join(dir, caKeyFile), key); err != nil {
		return nil, nil, err
	}
	if err := writePEM(filepath.Join(dir, caCertFile), "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// loadServerCert returns the stored server certificate if it is signed by ca,
// names host, 127.0.0.1 and ::1, and is not about to expire.
func loadServerCert(dir, host string, ca *x509.Certificate, now time.Time) (tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile))
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf := cert.Leaf
	if leaf == nil {
		return tls.Certificate{}, errors.New("hub: server certificate without leaf")
	}
	if err := leaf.CheckSignatureFrom(ca); err != nil {
		return tls.Certificate{}, err
	}
	if now.Add(serverRenewBefore).After(leaf.NotAfter) {
		return tls.Certificate{}, errors.New("hub: server certificate expires soon")
	}
	for _, want := range []string{host, "127.0.0.1", "::1"} {
		if leaf.VerifyHostname(want) != nil {
			return tls.Certificate{}, fmt.Errorf("hub: server certificate does not name %s", want)
		}
	}
	return cert, nil
}

func issueServerCert(dir, host string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, now time.Time) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("hub: server key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: host, Organization: []string{"gwagent"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(serverLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	if ip := net.ParseIP(host); ip != nil {
		if !slices.ContainsFunc(tmpl.IPAddresses, ip.Equal) {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		}
	} else {
		tmpl.DNSNames = []string{strings.ToLower(host)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("hub: create server certificate: %w", err)
	}
	if err := writePEMKey(filepath.Join(dir, serverKeyFile), key); err != nil {
		return tls.Certificate{}, err
	}
	if err := writePEM(filepath.Join(dir, serverCertFile), "CERTIFICATE", der, 0o644); err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("hub: parse server certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

func parsePair(certPEM, keyPEM []byte) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, nil, errors.New("no certificate PEM block")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse certificate: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, nil, errors.New("no key PEM block")
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse key: %w", err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("CA key is not ECDSA")
	}
	return cert, key, nil
}

func writePEMKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("hub: marshal key: %w", err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, perm os.FileMode) error {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := atomicfile.WriteFile(path, data, perm); err != nil {
		return fmt.Errorf("hub: write %s: %w", path, err)
	}
	return nil
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		// crypto/rand does not fail on Linux; a fixed serial is still valid.
		return big.NewInt(1)
	}
	return n.Add(n, big.NewInt(1))
}
