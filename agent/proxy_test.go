package agent

import (
	"testing"

	"github.com/gwagent/gwagent/agent/config"
)

// Without hub.proxy the session follows https_proxy and NO_PROXY as Go's
// http.ProxyFromEnvironment does: loopback and NO_PROXY hosts go direct.
func TestHubProxyFromEnvironment(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://proxy.example:3128")
	t.Setenv("https_proxy", "")
	t.Setenv("NO_PROXY", ".internal.example")
	t.Setenv("no_proxy", "")
	fn := hubProxy(config.Proxy{})
	if fn == nil {
		t.Fatal("no proxy function with HTTPS_PROXY set")
	}
	for target, want := range map[string]string{
		"hub.azure-devices.net:443":  "http://proxy.example:3128",
		"hub.azure-devices.net:8883": "http://proxy.example:3128",
		"gw.internal.example:443":    "",
		"127.0.0.1:443":              "",
	} {
		u, err := fn(target)
		got := ""
		if u != nil {
			got = u.String()
		}
		if err != nil || got != want {
			t.Errorf("proxy for %s = %q, %v; want %q", target, got, err, want)
		}
	}

	t.Setenv("HTTPS_PROXY", "")
	if hubProxy(config.Proxy{}) != nil {
		t.Error("a proxy function without any proxy variable")
	}
}
