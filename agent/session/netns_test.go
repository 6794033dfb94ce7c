package session

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

// Environment of the re-executed test binary that plays the gateway inside
// the network namespace.
const (
	netnsChildEnv = "GWAGENT_TEST_NETNS_CHILD"
	netnsConnEnv  = "GWAGENT_TEST_NETNS_CONN"
	netnsCAEnv    = "GWAGENT_TEST_NETNS_CA"
	netnsMQTTEnv  = "GWAGENT_TEST_NETNS_MQTT"
	netnsWSEnv    = "GWAGENT_TEST_NETNS_WS"
)

// netnsConnectTimeout is hub.connectTimeout in the namespace test: with it
// a blackholed 8883 costs two timeouts before the fallback.
const netnsConnectTimeout = 3 * time.Second

func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// A gateway in a network namespace of its own, whose outbound 8883 an
// nftables rule drops (or rejects), reaches the hub on the host side of a
// veth pair over the WebSocket with hub.transport auto. The time from the
// start to the working WebSocket session is printed.
func TestAutoFallbackWith8883BlockedByNftables(t *testing.T) {
	if os.Getenv(netnsChildEnv) != "" {
		netnsChild(t)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for ip netns and nftables")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("nft is needed (make deps installs nftables): %v", err)
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	ns, hostIf, nsIf := "gwws-"+id, "gwh"+id, "gwn"+id
	// A /30 of its own inside 192.0.2.0/24, so parallel runs rarely meet.
	k, _ := rand.Int(rand.Reader, big.NewInt(63))
	hostIP := fmt.Sprintf("192.0.2.%d", 4*k.Int64()+1)
	nsIP := fmt.Sprintf("192.0.2.%d", 4*k.Int64()+2)

	sh(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	sh(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIf)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", hostIf).Run() })
	sh(t, "ip", "link", "set", nsIf, "netns", ns)
	sh(t, "ip", "addr", "add", hostIP+"/30", "dev", hostIf)
	sh(t, "ip", "link", "set", hostIf, "up")
	sh(t, "ip", "netns", "exec", ns, "ip", "addr", "add", nsIP+"/30", "dev", nsIf)
	sh(t, "ip", "netns", "exec", ns, "ip", "link", "set", nsIf, "up")
	sh(t, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

	h, err := hub.New(hub.Config{StateDir: t.TempDir(), MQTTAddr: hostIP + ":0", HTTPSAddr: hostIP + ":0", WebSocket: true,
		Log: zaptest.NewLogger(t).Named("hub")})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	cs, err := h.CreateDevice("gw-01")
	if err != nil {
		t.Fatal(err)
	}
	_, mqttPort, _ := strings.Cut(h.MQTTAddr(), hostIP+":")
	sh(t, "ip", "netns", "exec", ns, "nft", "add", "table", "inet", "gwtest")
	sh(t, "ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "gwtest", "out", "{ type filter hook output priority 0 ; }")

	for _, tc := range []struct{ name, verdict string }{
		{"dropped", "drop"},
		{"rejected", "reject with tcp reset"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sh(t, "ip", "netns", "exec", ns, "nft", "flush", "chain", "inet", "gwtest", "out")
			sh(t, "ip", "netns", "exec", ns, "sh", "-c", fmt.Sprintf("nft add rule inet gwtest out ip daddr %s tcp dport %s %s", hostIP, mqttPort, tc.verdict))
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestAutoFallbackWith8883BlockedByNftables$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), netnsChildEnv+"=1", netnsConnEnv+"="+cs, netnsCAEnv+"="+h.CAFile(),
				netnsMQTTEnv+"="+h.MQTTAddr(), netnsWSEnv+"="+h.HTTPSAddr())
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("the gateway in the namespace: %v\n%s", err, out)
			}
			m := regexp.MustCompile(`FALLBACK (\S+) over websocket`).FindSubmatch(out)
			if m == nil {
				t.Fatalf("no fallback reported:\n%s", out)
			}
			t.Logf("8883 %s by nftables: a working WebSocket session %s after the start (hub.connectTimeout %s, fallback after 2 failures)", tc.name, m[1], netnsConnectTimeout)
		})
	}
}

// netnsChild is the gateway: auto, 8883 blocked, the WebSocket open.
func netnsChild(t *testing.T) {
	cs, err := iothub.ParseConnectionString(os.Getenv(netnsConnEnv))
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(os.Getenv(netnsCAEnv))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	rec := &recorder{}
	cfg := baseConfig(t, cs, os.Getenv(netnsMQTTEnv), roots, rec)
	cfg.Transport = TransportAuto
	cfg.WebSocketAddress = os.Getenv(netnsWSEnv)
	cfg.ConnectTimeout = netnsConnectTimeout
	cfg.MinRetryDelay, cfg.MaxRetryDelay = time.Second, 60*time.Second // the defaults
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	run(t, s)
	testutil.Eventually(t, time.Minute, "connected", func() bool { return s.Health().Connected })
	took := time.Since(start)
	hl := s.Health()
	if hl.Transport != TransportWebSocket {
		t.Fatalf("health = %+v, want the WebSocket", hl)
	}
	fmt.Printf("FALLBACK %s over %s\n", took.Round(time.Millisecond), hl.Transport)
}
