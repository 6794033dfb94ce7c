package session

import (
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
)

func fixedProxy(u *url.URL) func(string) (*url.URL, error) {
	return func(string) (*url.URL, error) { return u, nil }
}

func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// The session reaches the hub through a real HTTP proxy (tinyproxy) with
// CONNECT, on each transport, and with basic credentials when the proxy
// wants them; the proxy's log shows the tunnel.
func TestThroughProxy(t *testing.T) {
	h := startHubWith(t, true)
	for _, tc := range []struct {
		name      string
		transport string
		auth      bool
	}{
		{"websocket", TransportWebSocket, false},
		{"mqtt", TransportMQTT, false},
		{"websocket with basic auth", TransportWebSocket, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testutil.ProxyOptions{}
			pu := new(url.URL)
			if tc.auth {
				o.User, o.Password = "gw", "s3cret"
			}
			p := testutil.StartProxy(t, o)
			*pu = *p.URL
			if tc.auth {
				pu.User = url.UserPassword("gw", "s3cret")
			}
			rec := &recorder{}
			cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
			cfg.Transport = tc.transport
			cfg.WebSocketAddress = h.HTTPSAddr()
			cfg.Proxy = fixedProxy(pu)
			s, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			stop := run(t, s)
			testutil.Eventually(t, wait, "connected through the proxy", func() bool { return s.Health().Connected })
			target := h.addr
			if tc.transport == TransportWebSocket {
				target = h.HTTPSAddr()
			}
			if n := p.Connects(t, target); n != 1 {
				t.Fatalf("the proxy logged %d CONNECT %s, want 1:\n%s", n, target, p.Log(t))
			}
			if _, err := s.PatchReported(t.Context(), []byte(`{"via":"proxy"}`)); err != nil {
				t.Fatal(err)
			}
			stop()
			testutil.Eventually(t, wait, "the hub drops the device", func() bool { return !h.Connected("gw-01") })
		})
	}
}

// A proxy that wants credentials (407), refuses the target (403) or is not
// there gives an error naming the proxy and its answer, never the
// password, and the session retries with backoff.
func TestProxyRefusals(t *testing.T) {
	h := startHubWith(t, true)
	authProxy := testutil.StartProxy(t, testutil.ProxyOptions{User: "gw", Password: "s3cret"})
	wrongPW := *authProxy.URL
	wrongPW.User = url.UserPassword("gw", "wrong-pw")
	onlyOther := testutil.StartProxy(t, testutil.ProxyOptions{ConnectPorts: []int{443}})
	gone := &url.URL{Scheme: "http", Host: closedPort(t)}
	for _, tc := range []struct {
		name  string
		proxy *url.URL
		want  string
		log   *testutil.Proxy
	}{
		{"407 without credentials", authProxy.URL, "proxy " + authProxy.URL.String() + " refused CONNECT " + h.HTTPSAddr() + ": 407 Proxy Authentication Required (the proxy wants credentials", authProxy},
		// tinyproxy answers a wrong password 401.
		{"wrong password", &wrongPW, "proxy " + authProxy.URL.String() + " refused CONNECT " + h.HTTPSAddr() + ": 401 Unauthorized (the proxy wants credentials", nil},
		{"403 for the port", onlyOther.URL, "proxy " + onlyOther.URL.String() + " refused CONNECT " + h.HTTPSAddr() + ": 403", nil},
		{"proxy not listening", gone, "proxy " + gone.String() + ": dial tcp " + gone.Host + ": connect: connection refused", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
			cfg.Transport = TransportWebSocket
			cfg.WebSocketAddress = h.HTTPSAddr()
			cfg.Proxy = fixedProxy(tc.proxy)
			cfg.MinRetryDelay, cfg.MaxRetryDelay = 200*time.Millisecond, 400*time.Millisecond
			s, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			var before int
			if tc.log != nil {
				before = tc.log.Connects(t, h.HTTPSAddr())
			}
			start := time.Now()
			stop := run(t, s)
			testutil.Eventually(t, wait, "a failed attempt", func() bool { return s.Health().LastError != "" })
			hl := s.Health()
			if hl.Connected || !strings.Contains(hl.LastError, tc.want) || strings.Contains(hl.LastError, "s3cret") || strings.Contains(hl.LastError, "wrong-pw") {
				t.Fatalf("health = %+v\nwant an error containing %q and no password", hl, tc.want)
			}
			if tc.log == nil {
				stop()
				return
			}
			// Retries back off: 200–400 ms apart (less jitter), so at most
			// one attempt per 100 ms, however long the proxy keeps refusing.
			time.Sleep(2 * time.Second)
			stop()
			n := tc.log.Connects(t, h.HTTPSAddr()) - before
			if limit := int(time.Since(start)/(100*time.Millisecond)) + 1; n < 2 || n > limit {
				t.Fatalf("%d CONNECT attempts in %s, want 2..%d", n, time.Since(start).Round(time.Millisecond), limit)
			}
		})
	}
}

// A proxy that allows CONNECT to 443 only (403 for 8883) makes auto fall
// back to the WebSocket through the same proxy.
func TestAutoFallsBackThroughAProxyThatAllows443Only(t *testing.T) {
	h := startHubWith(t, true)
	p := testutil.StartProxy(t, testutil.ProxyOptions{ConnectPorts: []int{port(t, h.HTTPSAddr())}})
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	cfg.Transport = TransportAuto
	cfg.WebSocketAddress = h.HTTPSAddr()
	cfg.Proxy = fixedProxy(p.URL)
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connected", func() bool { return s.Health().Connected })
	if hl := s.Health(); hl.Transport != TransportWebSocket {
		t.Fatalf("health = %+v", hl)
	}
	if a, w := p.Connects(t, h.addr), p.Connects(t, h.HTTPSAddr()); a != 2 || w != 1 {
		t.Fatalf("CONNECTs: %d to 8883's stand-in, %d to 443's; want 2 and 1:\n%s", a, w, p.Log(t))
	}
}
