package provision

import (
	"context"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/agent/session"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
	"github.com/gwagent/gwagent/iothub/service"
)

// startWSHub is startHub with MQTT over WebSocket on its HTTPS port.
func startWSHub(t *testing.T) (*hub.Hub, *service.Client) {
	t.Helper()
	h, err := hub.New(hub.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", WebSocket: true, Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	cs, _ := iothub.ParseConnectionString(h.DPSConnectionString())
	svc, err := service.NewDPS(cs, service.Options{BaseURL: "https://" + h.HTTPSAddr(), CAFile: h.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.CloseIdleConnections)
	if _, err := svc.PutEnrollmentGroup(context.Background(), dps.EnrollmentGroup{EnrollmentGroupID: "factory",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKey{PrimaryKey: groupKey}}}, ""); err != nil {
		t.Fatal(err)
	}
	return h, svc
}

func TestRegisterOverWebSocket(t *testing.T) {
	h, svc := startWSHub(t)
	ctx := context.Background()

	// websocket: only 443 (here the hub's HTTPS address) is dialled.
	c := cfgFor(h, "gw-ws-1", groupKey)
	c.Transport, c.Address, c.WebSocketAddress = session.TransportWebSocket, "127.0.0.1:1", h.HTTPSAddr()
	if a, err := Register(ctx, c); err != nil || a.DeviceID != "gw-ws-1" {
		t.Fatalf("websocket: %+v %v", a, err)
	}

	// auto: 8883 refused, then the WebSocket.
	c = cfgFor(h, "gw-ws-2", groupKey)
	c.Transport, c.Address, c.WebSocketAddress = session.TransportAuto, "127.0.0.1:1", h.HTTPSAddr()
	if a, err := Register(ctx, c); err != nil || a.DeviceID != "gw-ws-2" {
		t.Fatalf("auto with 8883 refused: %+v %v", a, err)
	}
	// auto does not fall back when DPS refuses: that is not a network problem.
	c = cfgFor(h, "gw-ws-3", "MTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTE=")
	c.Transport, c.WebSocketAddress = session.TransportAuto, "127.0.0.1:1"
	if _, err := Register(ctx, c); err == nil || !strings.Contains(err.Error(), "DPS refused") {
		t.Fatalf("auto with a wrong key: %v", err)
	}
	// mqtt never tries the WebSocket.
	c = cfgFor(h, "gw-ws-4", groupKey)
	c.Transport, c.Address, c.WebSocketAddress = session.TransportMQTT, "127.0.0.1:1", h.HTTPSAddr()
	if _, err := Register(ctx, c); err == nil {
		t.Fatal("mqtt registered through the WebSocket")
	}

	// X.509 over the WebSocket: the client certificate rides the TLS under it.
	ca := testutil.NewCA(t, "factory CA")
	if _, err := svc.PutEnrollmentGroup(ctx, dps.EnrollmentGroup{EnrollmentGroupID: "x509",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: ca.PEM}}}}}, ""); err != nil {
		t.Fatal(err)
	}
	c = cfgFor(h, "gw-ws-x509", groupKey)
	c.Key, c.Certificate = nil, &ca.Device(t, "gw-ws-x509").TLS
	c.Transport, c.WebSocketAddress = session.TransportWebSocket, h.HTTPSAddr()
	if a, err := Register(ctx, c); err != nil || !a.X509 {
		t.Fatalf("X.509 over websocket: %+v %v", a, err)
	}
}

// Through a real HTTP proxy (tinyproxy): the WebSocket's TLS runs in a
// CONNECT tunnel, and the proxy's log shows it.
func TestRegisterOverWebSocketThroughProxy(t *testing.T) {
	h, _ := startWSHub(t)
	p := testutil.StartProxy(t, testutil.ProxyOptions{})
	c := cfgFor(h, "gw-proxied", groupKey)
	c.Transport, c.WebSocketAddress = session.TransportWebSocket, h.HTTPSAddr()
	c.Proxy = func(string) (*url.URL, error) { return p.URL, nil }
	c.Timeout = 30 * time.Second
	if a, err := Register(context.Background(), c); err != nil || a.DeviceID != "gw-proxied" {
		t.Fatalf("through the proxy: %+v %v", a, err)
	}
	if n := p.Connects(t, h.HTTPSAddr()); n == 0 {
		t.Fatalf("no CONNECT %s in the proxy's log:\n%s", h.HTTPSAddr(), p.Log(t))
	}
}
