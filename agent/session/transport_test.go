package session

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

// The WebSocket transport reaches the local hub's /$iothub/websocket on its
// HTTPS listener, with the same SAS authentication and TLS verification,
// and carries methods and twin requests.
func TestWebSocketTransport(t *testing.T) {
	h := startHubWith(t, true)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, "127.0.0.1:1", h.RootCAs(), rec) // 8883 is never dialled
	cfg.Transport = TransportWebSocket
	cfg.WebSocketAddress = h.HTTPSAddr()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connected over WebSocket", func() bool { return s.Health().Connected })
	if hl := s.Health(); hl.Transport != TransportWebSocket || !strings.HasSuffix(hl.Describe(time.Now()), "over WebSocket") {
		t.Fatalf("health = %+v (%q)", hl, hl.Describe(time.Now()))
	}
	ctx := t.Context()
	if _, err := s.PatchReported(ctx, []byte(`{"over":"websocket"}`)); err != nil {
		t.Fatal(err)
	}
	tw, err := h.Twin("gw-01")
	if err != nil || tw.Properties.Reported["over"] != "websocket" {
		t.Fatalf("twin = %+v, %v", tw, err)
	}
	res, err := h.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "anything", ResponseTimeoutInSeconds: 10})
	if err != nil || res.Status != 501 {
		t.Fatalf("InvokeMethod = %+v, %v; want the default 501", res, err)
	}
}

// A server that answers the upgrade with anything but 101 gives an error
// that names the WebSocket upgrade and the answer.
func TestWebSocketUpgradeRefused(t *testing.T) {
	h := startHub(t) // no WebSocket: the REST listener wants a service token
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	cfg.Transport = TransportWebSocket
	cfg.WebSocketAddress = h.HTTPSAddr()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "a failed attempt", func() bool { return s.Health().LastError != "" })
	hl := s.Health()
	want := "WebSocket upgrade at wss://localhost:443/$iothub/websocket refused: 401 Unauthorized"
	if hl.Connected || !strings.Contains(hl.LastError, want) {
		t.Fatalf("health = %+v, want an error containing %q", hl, want)
	}
}

// blackhole accepts connections and never answers: a firewall that drops
// 8883 looks like this to a client, up to its connect timeout.
func blackhole(t *testing.T) (addr string, accepted *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted = new(atomic.Int32)
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return ln.Addr().String(), accepted
}

// closedPort is a loopback address nobody listens on: connects are refused.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

func readRecord(t *testing.T, file string) transportRecord {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var r transportRecord
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// auto falls back to the WebSocket when 8883 refuses or swallows
// connections, within FallbackAfter attempts; it remembers the choice, so
// the next start goes to 443 at once; after ProbeEvery it tries 8883 again
// and goes back to it when it works.
func TestAutoFallsBackAndRemembers(t *testing.T) {
	h := startHubWith(t, true)
	for _, tc := range []struct {
		name    string
		blocked func(t *testing.T) (string, *atomic.Int32)
	}{
		{"8883 refused", func(t *testing.T) (string, *atomic.Int32) { return closedPort(t), nil }},
		{"8883 blackholed", blackhole},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blocked, accepted := tc.blocked(t)
			file := filepath.Join(t.TempDir(), "transport.json")
			newSession := func(mqttAddr string) *Session {
				rec := &recorder{}
				cfg := baseConfig(t, h.conn, mqttAddr, h.RootCAs(), rec)
				cfg.Transport = TransportAuto
				cfg.WebSocketAddress = h.HTTPSAddr()
				cfg.TransportFile = file
				cfg.ConnectTimeout = time.Second
				s, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				return s
			}

			s := newSession(blocked)
			start := time.Now()
			stop := run(t, s)
			testutil.Eventually(t, wait, "connected", func() bool { return s.Health().Connected })
			took := time.Since(start)
			t.Logf("fallback from a blocked 8883 to a working 443 session took %s (connect timeout 1s, fallback after 2 failures)", took.Round(time.Millisecond))
			if hl := s.Health(); hl.Transport != TransportWebSocket {
				t.Fatalf("health = %+v, want the WebSocket", hl)
			}
			if accepted != nil && accepted.Load() != 2 {
				t.Fatalf("the blackhole saw %d attempts, want 2", accepted.Load())
			}
			// The choice is saved just after the connect.
			testutil.Eventually(t, wait, "the choice saved", func() bool { _, err := os.Stat(file); return err == nil })
			r := readRecord(t, file)
			if r.Transport != TransportWebSocket || time.Since(r.Since) > time.Minute {
				t.Fatalf("remembered %+v", r)
			}
			stop()
			testutil.Eventually(t, wait, "the hub drops the device", func() bool { return !h.Connected("gw-01") })

			// A restart goes straight to 443: 8883 is not tried again.
			s = newSession(blocked)
			stop = run(t, s)
			testutil.Eventually(t, wait, "connected again", func() bool { return s.Health().Connected })
			if hl := s.Health(); hl.Transport != TransportWebSocket || hl.Connects != 1 || hl.LastError != "" {
				t.Fatalf("health after restart = %+v, want a first-attempt WebSocket connect", hl)
			}
			if accepted != nil && accepted.Load() != 2 {
				t.Fatalf("the restart tried 8883 (%d attempts in all)", accepted.Load())
			}
			stop()
			testutil.Eventually(t, wait, "the hub drops the device", func() bool { return !h.Connected("gw-01") })

			// A day later 8883 is tried again; it works now, and is kept.
			old := transportRecord{Transport: TransportWebSocket, Since: time.Now().Add(-25 * time.Hour)}
			b, _ := json.Marshal(old)
			if err := os.WriteFile(file, b, 0o600); err != nil {
				t.Fatal(err)
			}
			s = newSession(h.addr)
			stop = run(t, s)
			testutil.Eventually(t, wait, "connected over 8883", func() bool { return s.Health().Connected })
			if hl := s.Health(); hl.Transport != TransportMQTT {
				t.Fatalf("health after the probe = %+v, want 8883", hl)
			}
			testutil.Eventually(t, wait, "8883 remembered", func() bool { return readRecord(t, file).Transport == TransportMQTT })
			stop()
			testutil.Eventually(t, wait, "the hub drops the device", func() bool { return !h.Connected("gw-01") })
		})
	}
}

// A refusal by the hub itself (a wrong key) is not a blocked port: auto
// stays on 8883 however often it fails.
func TestAutoDoesNotFallBackOnAuthRefusal(t *testing.T) {
	h := startHubWith(t, true)
	cs := h.conn
	cs.SharedAccessKey = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	rec := &recorder{}
	cfg := baseConfig(t, cs, h.addr, h.RootCAs(), rec)
	cfg.Transport = TransportAuto
	cfg.WebSocketAddress = h.HTTPSAddr()
	cfg.FallbackAfter = 1
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	var errs int
	last := ""
	testutil.Eventually(t, wait, "three refused attempts", func() bool {
		hl := s.Health()
		if hl.Transport != TransportMQTT {
			t.Fatalf("switched transport on an auth refusal: %+v", hl)
		}
		if hl.LastError != "" && !hl.RetryAt.IsZero() && hl.RetryAt.String() != last {
			last = hl.RetryAt.String()
			errs++
		}
		return errs >= 3
	})
	if hl := s.Health(); !strings.Contains(hl.LastError, "check the device key") {
		t.Fatalf("health = %+v", hl)
	}
}
