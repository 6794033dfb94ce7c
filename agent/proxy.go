package agent

import (
	"net/url"

	"golang.org/x/net/http/httpproxy"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/session"
)

// hubProxy is the session's proxy for a "host:port" target: hub.proxy when
// set, else the https_proxy / HTTPS_PROXY and NO_PROXY variables read at
// start, with the semantics of Go's http.ProxyFromEnvironment (so a
// loopback target never goes through them). nil: never a proxy.
func hubProxy(p config.Proxy) func(target string) (*url.URL, error) {
	if u := p.Resolved(); u != nil {
		return func(string) (*url.URL, error) { return u, nil }
	}
	env := httpproxy.FromEnvironment()
	if env.HTTPSProxy == "" {
		return nil
	}
	fn := env.ProxyFunc()
	return func(target string) (*url.URL, error) {
		return fn(&url.URL{Scheme: "https", Host: target})
	}
}

// proxyName is a proxy's URL without credentials, for logs and errors.
func proxyName(p *url.URL) string { return session.ProxyName(p) }
