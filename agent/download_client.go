package agent

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"sync"

	"github.com/gwagent/gwagent/firmware"
)

// downloadClient trusts the system roots plus hub.caFile, so images served
// next to a local hub (same CA) download as well as those on the Internet.
// Its transport lives for one update only (see updateTransport).
func downloadClient(caFile string) (*http.Client, error) {
	var extra []byte
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("agent: hub.caFile: %w", err)
		}
		extra = pem
	}
	return &http.Client{Transport: &updateTransport{extra: extra}}, nil
}

// updateTransport builds the download transports on the first request of an
// update and forgets them in CloseIdleConnections, which the state machine
// calls when a download ends: no transport, connection or root pool of an
// update stays reachable between updates. An http:// image never builds
// the https root pool: with hub.caFile that pool starts from the system
// bundle, whose first parse allocates about 3.8 MB (Go then keeps the
// parsed system roots, some 250 KB, for the life of the process) — more
// than an idle agent's whole heap.
type updateTransport struct {
	extra []byte // hub.caFile's PEM; nil: the system roots only

	mu     sync.Mutex      // guards plain and secure
	plain  *http.Transport // http:// requests: no root pool of its own
	secure *http.Transport // https:// requests: system roots plus extra
}

func (u *updateTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return u.transport(r.URL.Scheme == "https").RoundTrip(r)
}

func (u *updateTransport) transport(secure bool) *http.Transport {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !secure {
		if u.plain == nil {
			// TLS only to an https proxy, verified against the system roots.
			u.plain = firmware.NewTransport(newTLSConfig(nil))
		}
		return u.plain
	}
	if u.secure == nil {
		var roots *x509.CertPool // nil: the system roots
		if u.extra != nil {
			var err error
			if roots, err = x509.SystemCertPool(); err != nil || roots == nil {
				roots = x509.NewCertPool()
			}
			roots.AppendCertsFromPEM(u.extra)
		}
		u.secure = firmware.NewTransport(newTLSConfig(roots))
	}
	return u.secure
}

// CloseIdleConnections closes the transports' idle connections and drops
// them; the next request builds new ones. A request still in flight keeps
// its transport until it is done.
func (u *updateTransport) CloseIdleConnections() {
	u.mu.Lock()
	plain, secure := u.plain, u.secure
	u.plain, u.secure = nil, nil
	u.mu.Unlock()
	for _, t := range []*http.Transport{plain, secure} {
		if t != nil {
			t.CloseIdleConnections()
		}
	}
}

func newTLSConfig(roots *x509.CertPool) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
}
