package session

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"log/slog"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/agent/router"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
)

// wait is the generous bound of every wait in these tests.
const wait = 15 * time.Second

// localHub starts the project's local hub on loopback and registers one
// device.
type localHub struct {
	*hub.Hub
	dir, addr string
	ws        bool // serve MQTT over WebSocket on the HTTPS listener
	conn      iothub.ConnectionString
}

func startHub(t *testing.T) *localHub {
	t.Helper()
	return startHubWith(t, false)
}

// startHubWith starts the local hub, serving MQTT over WebSocket on its
// HTTPS listener too when ws is set.
func startHubWith(t *testing.T, ws bool) *localHub {
	t.Helper()
	lh := &localHub{dir: t.TempDir(), addr: "127.0.0.1:0", ws: ws}
	lh.start(t)
	s, err := lh.CreateDevice("gw-01")
	if err != nil {
		t.Fatal(err)
	}
	if lh.conn, err = iothub.ParseConnectionString(s); err != nil {
		t.Fatal(err)
	}
	return lh
}

// start (re)starts the hub on the same state directory and port.
func (lh *localHub) start(t *testing.T) {
	t.Helper()
	lh.startWith(t, nil)
}

// startWith creates the hub, runs before (e.g. to change a twin while no
// device can be connected), then starts listening.
func (lh *localHub) startWith(t *testing.T, before func(*hub.Hub)) {
	t.Helper()
	h, err := hub.New(hub.Config{StateDir: lh.dir, MQTTAddr: lh.addr, HTTPSAddr: "127.0.0.1:0", WebSocket: lh.ws, Log: zaptest.NewLogger(t).Named("hub")})
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(h)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	lh.Hub = h
	lh.addr = h.MQTTAddr()
	t.Cleanup(func() { _ = h.Close() })
}

// recorder collects what a session hands to its callbacks.
type recorder struct {
	mu       sync.Mutex
	desired  []Desired
	connects int
}

func (r *recorder) onDesired(d Desired) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.desired = append(r.desired, d)
}

func (r *recorder) onConnect() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.connects++
}

func (r *recorder) connectCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.connects
}

func (r *recorder) desiredList() []Desired {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Desired(nil), r.desired...)
}

// run starts s and stops it at cleanup, checking that Run returns.
func run(t *testing.T, s *Session) context.CancelFunc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(wait):
			t.Errorf("Run did not return after cancel")
		}
	})
	return cancel
}

func baseConfig(t *testing.T, cs iothub.ConnectionString, addr string, roots *x509.CertPool, rec *recorder) Config {
	return Config{
		Conn:           cs,
		Transport:      TransportMQTT,
		Address:        addr,
		RootCAs:        roots,
		KeepAlive:      30 * time.Second,
		ConnectTimeout: 5 * time.Second,
		RequestTimeout: 5 * time.Second,
		MinRetryDelay:  50 * time.Millisecond,
		MaxRetryDelay:  500 * time.Millisecond,
		ClientType:     "gwagent-test/0",
		Log:            zaptest.NewLogger(t).Named("session"),
		OnDesired:      rec.onDesired,
		OnConnect:      rec.onConnect,
	}
}

// rawBroker is a plain MQTT broker (mochi) over TLS on loopback with an
// inline client, for cases the local hub never produces (stale desired
// versions). The test plays the hub with Publish and inline subscriptions.
type rawBroker struct {
	*mochi.Server
	addr     string
	roots    *x509.CertPool
	connects chan packets.Packet // every CONNECT
}

// startRawBroker starts the broker; clientCAs, when set, requires and
// verifies a client certificate.
func startRawBroker(t *testing.T, clientCAs ...*x509.CertPool) *rawBroker {
	t.Helper()
	certPEM, roots := selfSigned(t, "localhost")
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	connects := make(chan packets.Packet, 16)
	if err := srv.AddHook(&allowAll{connects: connects}, nil); err != nil {
		t.Fatal(err)
	}
	tcfg := &tls.Config{Certificates: []tls.Certificate{certPEM}, MinVersion: tls.VersionTLS12}
	if len(clientCAs) > 0 {
		tcfg.ClientAuth = tls.RequireAndVerifyClientCert
		tcfg.ClientCAs = clientCAs[0]
	}
	ln := listeners.NewTCP(listeners.Config{ID: "tls", Address: "127.0.0.1:0", TLSConfig: tcfg})
	if err := srv.AddListener(ln); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return &rawBroker{Server: srv, addr: ln.Address(), roots: roots, connects: connects}
}

// answerGets answers every twin GET with the given desired document.
func (b *rawBroker) answerGets(t *testing.T, desired func() map[string]any) {
	t.Helper()
	err := b.Subscribe("$iothub/twin/GET/#", 1, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		tp, err := iothub.ParseTopic(pk.TopicName)
		if err != nil {
			t.Errorf("device sent %q: %v", pk.TopicName, err)
			return
		}
		body, _ := json.Marshal(map[string]any{"desired": desired(), "reported": map[string]any{"$version": 1}})
		_ = b.Publish(iothub.TwinResponseTopic(200, tp.RID, 0), body, false, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func selfSigned(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool
}

// allowAll lets every client connect and use every topic, and records the
// CONNECT packets.
type allowAll struct {
	mochi.HookBase
	connects chan packets.Packet
}

func (*allowAll) ID() string { return "allow-all" }
func (*allowAll) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}
func (h *allowAll) OnConnectAuthenticate(_ *mochi.Client, pk packets.Packet) bool {
	select {
	case h.connects <- pk:
	default:
	}
	return true
}
func (*allowAll) OnACLCheck(*mochi.Client, string, bool) bool { return true }

// connect returns the next CONNECT the broker saw.
func (b *rawBroker) connect(t *testing.T) packets.Packet {
	t.Helper()
	select {
	case pk := <-b.connects:
		return pk
	case <-time.After(wait):
		t.Fatal("no CONNECT reached the broker")
		return packets.Packet{}
	}
}

// methodsFunc adapts a function to Methods.
type methodsFunc func(ctx context.Context, name string, payload []byte) router.Response

func (f methodsFunc) ServeMethod(ctx context.Context, name string, payload []byte) router.Response {
	return f(ctx, name, payload)
}
