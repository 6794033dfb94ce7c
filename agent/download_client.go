package agent

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"sync"

	"github.com/gwagent/gwagent/firmware"
)

// downloadClient trusts the system roots plus hub.caFile, so images served
// next to a local hub (same CA) download as well as those on the Internet.
// Its transport lives for one update only (see updateTransport).
func downloadClient(caFile string) (*http.Client, error) {
	return downloadClientVia(caFile, nil)
}

// downloadClientVia is downloadClient through the HTTP proxy p (with its
// credentials); nil means the proxy variables of the environment.
func downloadClientVia(caFile string, p *url.URL) (*http.Client, error) {
	var extra []byte
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("agent: hub.caFile: %w", err)
		}
		extra = pem
	}
	return &http.Client{Transport: &updateTransport{extra: extra, proxy: p}}, nil
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
	extra []byte   // hub.caFile's PEM; nil: the system roots only
	proxy *url.URL // update.proxy with its credentials; nil: the environment's

	mu     sync.Mutex      // guards plain and secure
	plain  *http.Transport // http:// requests: no root pool of its own
	secure *http.Transport // https:// requests: system roots plus extra
}

func (u *updateTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	t := u.transport(r.URL.Scheme == "https")
	resp, err := t.RoundTrip(r)
	if err != nil && t.Proxy != nil {
		// Name the proxy, without its credentials, when one was used.
		if p, perr := t.Proxy(r); perr == nil && p != nil {
			return nil, fmt.Errorf("via proxy %s: %w", proxyName(p), err)
		}
	}
	return resp, err
}

func (u *updateTransport) transport(secure bool) *http.Transport {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !secure {
		if u.plain == nil {
			// TLS only to an https proxy, verified against the system roots.
			u.plain = u.withProxy(firmware.NewTransport(newTLSConfig(nil)))
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
		u.secure = u.withProxy(firmware.NewTransport(newTLSConfig(roots)))
	}
	return u.secure
}

// withProxy sets update.proxy on t, which otherwise takes the proxy from
// the environment.
func (u *updateTransport) withProxy(t *http.Transport) *http.Transport {
	if u.proxy != nil {
		t.Proxy = http.ProxyURL(u.proxy)
	}
	return t
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
