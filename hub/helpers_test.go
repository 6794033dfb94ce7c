package hub

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/gwagent/gwagent/iothub"
)

func TestMain(m *testing.M) {
	if os.Getenv(fdChildEnv) != "" {
		os.Exit(fdChild())
	}
	goleak.VerifyTestMain(m)
}

// waitLong bounds every wait of the tests; generous for a loaded machine.
const waitLong = 20 * time.Second

// startHub starts a hub on loopback ports in a fresh state directory.
func startHub(t testing.TB, mods ...func(*Config)) *Hub {
	t.Helper()
	cfg := Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}
	if tt, ok := t.(*testing.T); ok {
		cfg.Log = zaptest.NewLogger(tt)
	}
	for _, m := range mods {
		m(&cfg)
	}
	return startHubWith(t, cfg)
}

func startHubWith(t testing.TB, cfg Config) *Hub {
	t.Helper()
	h, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return h
}

// addDevice registers a SAS device and returns its primary key.
func addDevice(t testing.TB, h *Hub, id string) []byte {
	t.Helper()
	cs, err := h.CreateDevice(id)
	if err != nil {
		t.Fatalf("CreateDevice(%s): %v", id, err)
	}
	c, err := iothub.ParseConnectionString(cs)
	if err != nil {
		t.Fatalf("device connection string %q: %v", cs, err)
	}
	key, err := c.Key()
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// device is a paho client acting as an IoT Hub device.
type testDevice struct {
	t    testing.TB
	id   string
	c    paho.Client
	msgs chan paho.Message
	lost chan error
}

type devOpts struct {
	username string
	password string
	clientID string
	tlsCert  *tls.Certificate
	keep     time.Duration
	wsURL    string
	localIP  string // dial from this loopback address (e.g. 127.0.0.2) instead of the default
}

func sas(h *Hub, id string, key []byte, ttl time.Duration) string {
	return iothub.NewSAS(iothub.DeviceResource(h.HostName(), id), key, "", time.Now().Add(ttl))
}

// dial connects a device and returns it with the CONNACK return code; err
// is set when the connection was not accepted.
func dial(t testing.TB, h *Hub, id string, o devOpts) (*testDevice, byte, error) {
	t.Helper()
	d := &testDevice{t: t, id: id, msgs: make(chan paho.Message, 64), lost: make(chan error, 1)}
	if o.username == "" {
		o.username = iothub.Username(h.HostName(), id, "hub-test/1.0")
	}
	if o.clientID == "" {
		o.clientID = id
	}
	tc := &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if o.tlsCert != nil {
		tc.Certificates = []tls.Certificate{*o.tlsCert}
	}
	broker := "ssl://" + h.MQTTAddr()
	if o.wsURL != "" {
		broker = o.wsURL
	}
	opts := paho.NewClientOptions().AddBroker(broker).
		SetClientID(o.clientID).SetUsername(o.username).SetPassword(o.password).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).
		SetCleanSession(true).SetOrderMatters(false).SetTLSConfig(tc).
		SetConnectTimeout(10 * time.Second).SetWriteTimeout(10 * time.Second).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case d.lost <- err:
			default:
			}
		}).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { d.msgs <- m })
	if o.keep > 0 {
		opts.SetKeepAlive(o.keep)
	}
	if o.localIP != "" {
		opts.SetDialer(&net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(o.localIP)}})
	}
	d.c = paho.NewClient(opts)
	tok := d.c.Connect()
	if !tok.WaitTimeout(waitLong) {
		t.Fatalf("connect %s: no CONNACK", id)
	}
	code := tok.(*paho.ConnectToken).ReturnCode()
	if err := tok.Error(); err != nil {
		return nil, code, err
	}
	t.Cleanup(func() { d.c.Disconnect(100) })
	return d, code, nil
}

// connect connects a device with a fresh SAS token and fails the test if
// the hub refuses.
func connect(t testing.TB, h *Hub, id string, key []byte) *testDevice {
	t.Helper()
	d, code, err := dial(t, h, id, devOpts{password: sas(h, id, key, time.Hour)})
	if err != nil {
		t.Fatalf("connect %s: CONNACK %d: %v", id, code, err)
	}
	return d
}

// sub subscribes to filters; messages arrive on d.msgs. It returns the
// SUBACK codes.
func (d *testDevice) sub(filters ...string) []byte {
	d.t.Helper()
	m := map[string]byte{}
	for _, f := range filters {
		m[f] = 0
	}
	tok := d.c.SubscribeMultiple(m, nil)
	if !tok.WaitTimeout(waitLong) {
		d.t.Fatalf("subscribe %v: no SUBACK", filters)
	}
	if err := tok.Error(); err != nil {
		d.t.Fatalf("subscribe %v: %v", filters, err)
	}
	res := tok.(*paho.SubscribeToken).Result()
	out := make([]byte, len(filters))
	for i, f := range filters {
		out[i] = res[f]
	}
	return out
}

func (d *testDevice) pub(topic string, qos byte, payload []byte) {
	d.t.Helper()
	tok := d.c.Publish(topic, qos, false, payload)
	if !tok.WaitTimeout(waitLong) {
		d.t.Fatalf("publish %s: no PUBACK", topic)
	}
}

// next waits for a message whose topic starts with prefix, skipping others.
func (d *testDevice) next(prefix string) paho.Message {
	d.t.Helper()
	deadline := time.After(waitLong)
	for {
		select {
		case m := <-d.msgs:
			if strings.HasPrefix(m.Topic(), prefix) {
				return m
			}
		case <-deadline:
			d.t.Fatalf("%s: no message on %s…", d.id, prefix)
		}
	}
}

// waitLost waits until the hub closes the connection.
func (d *testDevice) waitLost() error {
	d.t.Helper()
	select {
	case err := <-d.lost:
		return err
	case <-time.After(waitLong):
		d.t.Fatalf("%s: connection was not closed", d.id)
		return nil
	}
}

// twinRequest sends a twin request and returns the parsed response topic
// and body.
func (d *testDevice) twinRequest(topic string, body []byte) (iothub.Topic, []byte) {
	d.t.Helper()
	rid := topicRID(d.t, topic)
	d.pub(topic, 0, body)
	for {
		m := d.next("$iothub/twin/res/")
		rt, err := iothub.ParseTopic(m.Topic())
		if err != nil {
			d.t.Fatalf("bad response topic %q: %v", m.Topic(), err)
		}
		if rt.RID == rid {
			return rt, m.Payload()
		}
	}
}

func topicRID(t testing.TB, topic string) string {
	pt, err := iothub.ParseTopic(topic)
	if err != nil {
		t.Fatalf("topic %q: %v", topic, err)
	}
	return pt.RID
}

// service calls the hub's REST API with the service connection string.
type service struct {
	t      testing.TB
	h      *Hub
	client *http.Client
	token  string
}

func newService(t testing.TB, h *Hub) *service {
	cs, err := iothub.ParseConnectionString(h.ServiceConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	key, err := cs.Key()
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost"}}
	t.Cleanup(tr.CloseIdleConnections)
	return &service{
		t: t, h: h, client: &http.Client{Transport: tr, Timeout: 5 * time.Minute},
		token: iothub.NewSAS(cs.HostName, key, cs.SharedAccessKeyName, time.Now().Add(time.Hour)),
	}
}

// do sends a request; body may be nil, a []byte, a string or a value to
// encode as JSON. It returns the status, the body and the response.
func (s *service) do(method, path string, body any, hdr ...string) (int, []byte, *http.Response) {
	s.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		r = bytes.NewReader(b)
	case string:
		r = strings.NewReader(b)
	default:
		enc, err := json.Marshal(b)
		if err != nil {
			s.t.Fatal(err)
		}
		r = bytes.NewReader(enc)
	}
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	req, err := http.NewRequest(method, "https://"+s.h.HTTPSAddr()+path+sep+"api-version="+iothub.APIVersion, r)
	if err != nil {
		s.t.Fatal(err)
	}
	req.Header.Set("Authorization", s.token)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := s.client.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	return resp.StatusCode, b, resp
}

// wantError checks an IoT Hub error answer.
func wantError(t testing.TB, status int, body []byte, wantStatus, wantCode int) *iothub.ServiceError {
	t.Helper()
	if status != wantStatus {
		t.Fatalf("status %d, want %d; body %s", status, wantStatus, body)
	}
	e := iothub.ParseServiceError(status, body)
	if e.Code != wantCode {
		t.Fatalf("error code %d, want %d; body %s", e.Code, wantCode, body)
	}
	// The body is IoT Hub's nested form: Message holds the inner JSON.
	var outer struct{ Message, ExceptionMessage string }
	if err := json.Unmarshal(body, &outer); err != nil || !strings.Contains(outer.Message, `"errorCode":`) {
		t.Fatalf("error body is not IoT Hub's nested form: %s", body)
	}
	return e
}

func decodeJSON(t testing.TB, b []byte) map[string]any {
	t.Helper()
	m, err := decodeAny(b)
	if err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return m
}

func num(t testing.TB, v any) int64 {
	t.Helper()
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		if err != nil {
			t.Fatalf("%v is not an integer", v)
		}
		return i
	case float64:
		return int64(n)
	}
	t.Fatalf("%v (%T) is not a number", v, v)
	return 0
}
