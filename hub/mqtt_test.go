package hub

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1" //nolint:gosec // X.509 thumbprints
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

// signRaw signs sr exactly as given (the C SDK sends it unencoded).
func signRaw(sr string, key []byte, exp time.Time) string {
	se := strconv.FormatInt(exp.Unix(), 10)
	m := hmac.New(sha256.New, key)
	m.Write([]byte(sr + "\n" + se))
	return "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(base64.StdEncoding.EncodeToString(m.Sum(nil))) + "&se=" + se
}

func TestConnectAuthentication(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	addDevice(t, h, "other")
	disabledKey := addDevice(t, h, "off")
	svc := newService(t, h)
	if st, b, _ := svc.do("PUT", "/devices/off", map[string]any{"deviceId": "off", "status": "disabled"}, "If-Match", "*"); st != 200 {
		t.Fatalf("disable: %d %s", st, b)
	}
	cs, _ := iothub.ParseConnectionString(h.ServiceConnectionString())
	policyKey, _ := cs.Key()
	host := h.HostName()
	res := iothub.DeviceResource(host, "dev1")
	hour := time.Now().Add(time.Hour)
	wrongKey := make([]byte, 32)

	tests := []struct {
		name string
		id   string
		o    devOpts
		want byte
	}{
		{"sas query-escaped sr", "dev1", devOpts{password: iothub.NewSAS(res, key, "", hour)}, 0},
		{"sas raw sr as the C SDK sends", "dev1", devOpts{password: signRaw(res, key, hour)}, 0},
		{"sas lower-case escapes", "dev1", devOpts{password: signRaw(strings.ReplaceAll(url.QueryEscape(res), "%2F", "%2f"), key, hour)}, 0},
		{"username without ?", "dev1", devOpts{username: host + "/dev1/api-version=2020-09-30", password: iothub.NewSAS(res, key, "", hour)}, 0},
		{"host case-insensitive", "dev1", devOpts{username: strings.ToUpper(host) + "/dev1/?api-version=2021-04-12", password: iothub.NewSAS(res, key, "", hour)}, 0},
		{"policy token", "dev1", devOpts{password: iothub.NewSAS(host+"/devices", policyKey, ServicePolicy, hour)}, 0},
		{"wrong key", "dev1", devOpts{password: iothub.NewSAS(res, wrongKey, "", hour)}, 5},
		{"other device's key", "other", devOpts{password: iothub.NewSAS(iothub.DeviceResource(host, "other"), key, "", hour)}, 5},
		{"token for another device", "other", devOpts{password: iothub.NewSAS(res, key, "", hour)}, 5},
		{"expired token", "dev1", devOpts{password: iothub.NewSAS(res, key, "", time.Now().Add(-time.Minute))}, 5},
		{"wrong host", "dev1", devOpts{username: "elsewhere.example/dev1/?api-version=2021-04-12", password: iothub.NewSAS(res, key, "", hour)}, 5},
		{"no api-version", "dev1", devOpts{username: host + "/dev1/", password: iothub.NewSAS(res, key, "", hour)}, 5},
		{"client id mismatch", "dev1", devOpts{clientID: "other", password: iothub.NewSAS(res, key, "", hour)}, 5},
		{"unknown device", "ghost", devOpts{password: iothub.NewSAS(iothub.DeviceResource(host, "ghost"), key, "", hour)}, 5},
		{"not a SAS token", "dev1", devOpts{password: "secret"}, 5},
		{"no password, no certificate", "dev1", devOpts{}, 5},
		{"disabled device", "off", devOpts{password: iothub.NewSAS(iothub.DeviceResource(host, "off"), disabledKey, "", hour)}, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, code, err := dial(t, h, tc.id, tc.o)
			if code != tc.want {
				t.Fatalf("CONNACK %d, want %d (err %v)", code, tc.want, err)
			}
			if tc.want == 0 {
				if err != nil {
					t.Fatal(err)
				}
				d.c.Disconnect(50)
			}
		})
	}
}

// rawConnect sends a hand-made CONNECT over TLS and returns the bytes the
// hub answers with.
func rawConnect(t *testing.T, h *Hub, pkt []byte) []byte {
	t.Helper()
	c, err := tls.Dial("tcp", h.MQTTAddr(), &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitLong))
	if _, err := c.Write(pkt); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read CONNACK: %v", err)
	}
	return got
}

func connectPacket(name string, level byte, v5 bool, clientID string) []byte {
	var body []byte
	body = append(body, 0, byte(len(name)))
	body = append(body, name...)
	body = append(body, level, 0x02, 0, 60)
	if v5 {
		body = append(body, 0) // no properties
	}
	body = append(body, 0, byte(len(clientID)))
	body = append(body, clientID...)
	return append([]byte{0x10, byte(len(body))}, body...)
}

func TestOnlyMQTT311(t *testing.T) {
	h := startHub(t)
	addDevice(t, h, "dev1")
	for _, tc := range []struct {
		name string
		pkt  []byte
	}{
		{"MQTT 3.1", connectPacket("MQIsdp", 3, false, "dev1")},
		{"MQTT 5", connectPacket("MQTT", 5, true, "dev1")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := rawConnect(t, h, tc.pkt)
			if want := []byte{0x20, 0x02, 0x00, 0x01}; string(got) != string(want) {
				t.Fatalf("answer % x, want % x (CONNACK unacceptable protocol version)", got, want)
			}
		})
	}
}

// connect311 builds a CONNECT with the given protocol name, level and
// flags, then the fields as length-prefixed strings (client id, will topic
// and message, user name, password — whichever the flags announce).
func connect311(name string, level, flags byte, fields ...string) []byte {
	str := func(b []byte, s string) []byte { return append(append(b, byte(len(s)>>8), byte(len(s))), s...) }
	body := str(nil, name)
	body = append(body, level, flags, 0, 60)
	for _, f := range fields {
		body = str(body, f)
	}
	pkt := []byte{0x10}
	for n := len(body); ; {
		b := byte(n % 128)
		if n /= 128; n > 0 {
			pkt = append(pkt, b|0x80)
			continue
		}
		pkt = append(pkt, b)
		break
	}
	return append(pkt, body...)
}

// connectAnswer sends a CONNECT over TLS and returns the CONNACK return
// code, or -1 when the hub closed the connection without a CONNACK. A
// refusal must be followed by the hub closing the connection.
func connectAnswer(t *testing.T, h *Hub, pkt []byte) int {
	t.Helper()
	c, err := tls.Dial("tcp", h.MQTTAddr(), &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitLong))
	if _, err := c.Write(pkt); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	n, err := io.ReadFull(c, got)
	switch {
	case n == 0 && err != nil && !isTimeout(err):
		return -1
	case err != nil:
		t.Fatalf("read CONNACK: % x, %v", got[:n], err)
	case got[0] != 0x20 || got[1] != 0x02 || got[2] != 0x00:
		t.Fatalf("answer % x is not a 3.1.1 CONNACK", got)
	case got[3] > 0x05:
		t.Fatalf("CONNACK return code %#x: MQTT 3.1.1 has 0x00-0x05 only", got[3])
	}
	if got[3] != 0 {
		if rest, err := io.ReadAll(c); len(rest) > 0 || isTimeout(err) {
			t.Fatalf("after CONNACK %#x: % x, %v; want the connection closed", got[3], rest, err)
		}
	}
	return int(got[3])
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestConnack311 sends hand-made CONNECTs, malformed or unusual, and checks
// that the hub answers each as an MQTT 3.1.1 server must: a 3.1.1 return
// code (0x01 for another protocol level, 0x02 for a client identifier it
// rejects) or, where 3.1.1 has no code, a closed connection without a
// CONNACK [MQTT-3.2.2-6]. The broker beneath answers some of them with
// MQTT 5 codes (0x80, 0x82, 0x9A, 0x9B) on its own.
func TestConnack311(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	user := iothub.Username(h.HostName(), "dev1", "raw/1")
	pass := sas(h, "dev1", key, time.Hour)
	const (
		clean    = 0x02
		will     = 0x04
		willQoS1 = 0x08
		willQoS2 = 0x10
		willQoS3 = 0x18
		retain   = 0x20
		password = 0x40
		username = 0x80
		closed   = -1
	)
	for _, tc := range []struct {
		name string
		pkt  []byte
		want int
	}{
		{"well-formed", connect311("MQTT", 4, clean|username|password, "dev1", user, pass), 0},
		{"reserved flag", connect311("MQTT", 4, clean|username|password|0x01, "dev1", user, pass), closed},
		{"protocol name MQIsdp at level 4", connect311("MQIsdp", 4, clean|username|password, "dev1", user, pass), closed},
		{"unknown protocol name", connect311("MQXX", 4, clean|username|password, "dev1", user, pass), closed},
		// Level 5 and MQIsdp level 3: TestOnlyMQTT311.
		{"level 3 named MQTT", connect311("MQTT", 3, clean|username|password, "dev1", user, pass), 0x01},
		{"password without user name", connect311("MQTT", 4, clean|password, "dev1", pass), closed},
		{"will retain without will", connect311("MQTT", 4, clean|retain|username|password, "dev1", user, pass), closed},
		{"will QoS without will", connect311("MQTT", 4, clean|willQoS1|username|password, "dev1", user, pass), closed},
		{"will QoS 3", connect311("MQTT", 4, clean|will|willQoS3|username|password, "dev1", "devices/dev1/messages/events/", "x", user, pass), closed},
		{"will QoS 2", connect311("MQTT", 4, clean|will|willQoS2|username|password, "dev1", "devices/dev1/messages/events/", "x", user, pass), closed},
		{"empty will topic", connect311("MQTT", 4, clean|will|username|password, "dev1", "", "x", user, pass), closed},
		{"empty client id, clean", connect311("MQTT", 4, clean|username|password, "", user, pass), 0x02},
		{"empty client id, not clean", connect311("MQTT", 4, username|password, "", user, pass), 0x02},
		// Allowed by 3.1.1; the hub drops wills.
		{"will retained", connect311("MQTT", 4, clean|will|retain|username|password, "dev1", "devices/dev1/messages/events/", "x", user, pass), 0},
		{"will with empty message", connect311("MQTT", 4, clean|will|willQoS1|username|password, "dev1", "devices/dev1/messages/events/", "", user, pass), 0},
		// An empty password is a password of length 0: no SAS token.
		{"empty password", connect311("MQTT", 4, clean|username|password, "dev1", user, ""), 0x05},
		{"no password", connect311("MQTT", 4, clean|username, "dev1", user), 0x05},
		{"wrong password", connect311("MQTT", 4, clean|username|password, "dev1", user, "x"), 0x05},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := connectAnswer(t, h, tc.pkt); got != tc.want {
				t.Fatalf("answer %d, want %d (-1: closed without CONNACK)", got, tc.want)
			}
		})
	}
}

func TestTokenExpiryClosesConnection(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	exp := time.Now().Add(3 * time.Second)
	d, code, err := dial(t, h, "dev1", devOpts{password: iothub.NewSAS(iothub.DeviceResource(h.HostName(), "dev1"), key, "", exp)})
	if err != nil {
		t.Fatalf("CONNACK %d: %v", code, err)
	}
	d.sub(iothub.TwinResponseFilter)
	if err := d.waitLost(); err == nil {
		t.Fatal("connection lost without error")
	}
	// se has one-second resolution.
	if now := time.Now(); now.Before(exp.Truncate(time.Second)) {
		t.Fatalf("closed at %v, before the token expired at %v", now, exp)
	}
	testutil.Eventually(t, waitLong, "the hub to list the device as disconnected", func() bool { return !h.Connected("dev1") })
}

func TestSecondConnectionDropsFirst(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	first := connect(t, h, "dev1", key)
	second := connect(t, h, "dev1", key)
	if err := first.waitLost(); err == nil {
		t.Fatal("first connection lost without error")
	}
	second.sub(iothub.TwinResponseFilter)
	rt, _ := second.twinRequest(iothub.TwinGetTopic("1"), nil)
	if rt.Status != 200 {
		t.Fatalf("second connection: twin GET status %d", rt.Status)
	}
	select {
	case err := <-second.lost:
		t.Fatalf("second connection lost: %v", err)
	default:
	}
}

func TestPublishRules(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	addDevice(t, h, "dev2")
	tests := []struct {
		name   string
		topic  string
		qos    byte
		closed bool
	}{
		{"own telemetry", "devices/dev1/messages/events/", 1, false},
		{"own telemetry with properties", "devices/dev1/messages/events/%24.ct=application%2Fjson&a=b", 1, false},
		{"twin GET", iothub.TwinGetTopic("7"), 0, false},
		{"another device's telemetry", "devices/dev2/messages/events/", 1, true},
		{"arbitrary topic", "foo/bar", 0, true},
		{"method request topic", "$iothub/methods/POST/reboot/?$rid=1", 0, true},
		{"desired patch topic", "$iothub/twin/PATCH/properties/desired/?$version=3", 0, true},
		{"QoS 2", "devices/dev1/messages/events/", 2, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := connect(t, h, "dev1", key)
			d.sub(iothub.TwinResponseFilter)
			d.c.Publish(tc.topic, tc.qos, false, []byte(`{}`))
			if tc.closed {
				d.waitLost()
				return
			}
			// The connection still works: a twin GET is answered.
			rt, _ := d.twinRequest(iothub.TwinGetTopic("check"), nil)
			if rt.Status != 200 {
				t.Fatalf("twin GET after publish: %d", rt.Status)
			}
		})
	}
}

func TestSubscribeRules(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	d := connect(t, h, "dev1", key)
	filters := []string{
		iothub.MethodsFilter, iothub.TwinResponseFilter, iothub.DesiredFilter, iothub.C2DFilter("dev1"),
		"#", "$iothub/twin/res/+", "devices/dev2/messages/devicebound/#", "$iothub/methods/POST/reboot",
	}
	got := d.sub(filters...)
	want := []byte{0, 0, 0, 0, 0x80, 0x80, 0x80, 0x80}
	for i := range filters {
		if got[i] != want[i] {
			t.Errorf("SUBACK for %q: %#x, want %#x", filters[i], got[i], want[i])
		}
	}
	// QoS 2 is granted as QoS 1.
	tok := d.c.Subscribe(iothub.DesiredFilter, 2, nil)
	tok.WaitTimeout(waitLong)
	if q := tok.(interface{ Result() map[string]byte }).Result()[iothub.DesiredFilter]; q != 1 {
		t.Errorf("QoS 2 subscription granted %d, want 1", q)
	}
}

func TestKeepAliveEnforced(t *testing.T) {
	// A 3 s cap gives a 2 s keep-alive; paho asks for 60 s and would ping
	// only after 60 s, so the hub drops it.
	h := startHub(t, func(c *Config) { c.KeepAliveCap = 3 * time.Second })
	key := addDevice(t, h, "dev1")
	d, code, err := dial(t, h, "dev1", devOpts{password: sas(h, "dev1", key, time.Hour), keep: 60 * time.Second})
	if err != nil {
		t.Fatalf("CONNACK %d: %v", code, err)
	}
	start := time.Now()
	d.waitLost()
	if el := time.Since(start); el < 2*time.Second {
		t.Fatalf("dropped after %v, before 1.5 × keep-alive", el)
	}
	if got := h.keepAlive(0); got != 2 {
		t.Fatalf("keepAlive(0) = %d, want the cap 2", got)
	}
	def := &Hub{cfg: Config{KeepAliveCap: DefaultKeepAliveCap}}
	for _, tc := range []struct{ asked, want uint16 }{{60, 60}, {1177, 1177}, {1178, 1178}, {1500, 1178}, {0, 1178}} {
		if got := def.keepAlive(tc.asked); got != tc.want {
			t.Errorf("keepAlive(%d) = %d, want %d", tc.asked, got, tc.want)
		}
	}
}

func selfSignedCert(t *testing.T, cn string) (tls.Certificate, string, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	s1 := sha1.Sum(der) //nolint:gosec // thumbprint
	s256 := sha256.Sum256(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		strings.ToUpper(hex.EncodeToString(s1[:])), hex.EncodeToString(s256[:])
}

func TestX509Device(t *testing.T) {
	h := startHub(t, func(c *Config) { c.WebSocket = true })
	svc := newService(t, h)
	cert, sha1Print, sha256Print := selfSignedCert(t, "x1")
	other, _, _ := selfSignedCert(t, "x1")
	for id, print := range map[string]string{"x1": sha1Print, "x2": sha256Print} {
		st, b, _ := svc.do("PUT", "/devices/"+id, map[string]any{"deviceId": id,
			"authentication": map[string]any{"type": "selfSigned", "x509Thumbprint": map[string]any{"primaryThumbprint": print}}})
		if st != 200 {
			t.Fatalf("create %s: %d %s", id, st, b)
		}
	}
	if cs, _ := h.DeviceConnectionString("x1"); !strings.Contains(cs, "x509=true") {
		t.Fatalf("connection string %q lacks x509=true", cs)
	}
	for _, tc := range []struct {
		name string
		id   string
		cert *tls.Certificate
		ws   bool
		want byte
	}{
		{"SHA-1 thumbprint", "x1", &cert, false, 0},
		{"SHA-256 thumbprint", "x2", &cert, false, 0},
		{"other certificate", "x1", &other, false, 5},
		{"no certificate", "x1", nil, false, 5},
		{"over WebSocket", "x1", &cert, true, 0},
		{"over WebSocket, other certificate", "x1", &other, true, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := devOpts{tlsCert: tc.cert}
			if tc.ws {
				o.wsURL = h.WebSocketURL()
			}
			d, code, err := dial(t, h, tc.id, o)
			if code != tc.want {
				t.Fatalf("CONNACK %d, want %d (%v)", code, tc.want, err)
			}
			if d != nil {
				d.c.Disconnect(50)
			}
		})
	}
}

func TestWebSocket(t *testing.T) {
	for _, own := range []bool{false, true} {
		t.Run("own listener="+strconv.FormatBool(own), func(t *testing.T) {
			h := startHub(t, func(c *Config) {
				c.WebSocket = true
				if own {
					c.WSAddr = "127.0.0.1:0"
				}
			})
			key := addDevice(t, h, "dev1")
			d, code, err := dial(t, h, "dev1", devOpts{password: sas(h, "dev1", key, time.Hour), wsURL: h.WebSocketURL()})
			if err != nil {
				t.Fatalf("CONNACK %d: %v", code, err)
			}
			d.sub(iothub.TwinResponseFilter)
			rt, body := d.twinRequest(iothub.TwinReportedTopic("1"), []byte(`{"over":"ws"}`))
			if rt.Status != 204 || rt.Version != 2 {
				t.Fatalf("reported patch over WebSocket: %d v%d %s", rt.Status, rt.Version, body)
			}
		})
	}
}

// mosquittoArgs are the connection arguments for mosquitto_sub/pub acting
// as device id.
func mosquittoArgs(h *Hub, id, password string) []string {
	_, port, _ := strings.Cut(h.MQTTAddr(), ":")
	return []string{"-h", "localhost", "-p", port, "--cafile", h.CAFile(), "-V", "mqttv311",
		"-i", id, "-u", iothub.Username(h.HostName(), id, "mosquitto"), "-P", password}
}

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required (apt-get install mosquitto-clients)", name)
		}
		t.Skipf("%s not installed (apt-get install mosquitto-clients)", name)
	}
	return p
}

func TestMosquittoPubWrongSAS(t *testing.T) {
	pub := needTool(t, "mosquitto_pub")
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	wrong := iothub.NewSAS(iothub.DeviceResource(h.HostName(), "dev1"), make([]byte, 32), "", time.Now().Add(time.Hour))
	out, err := exec.Command(pub, append(mosquittoArgs(h, "dev1", wrong), "-t", "devices/dev1/messages/events/", "-m", "x")...).CombinedOutput()
	if err == nil || !strings.Contains(strings.ToLower(string(out)), "not authori") {
		t.Fatalf("mosquitto_pub with a wrong SAS: err %v, output %q; want a 'not authorised' refusal", err, out)
	}
	good := sas(h, "dev1", key, time.Hour)
	if out, err := exec.Command(pub, append(mosquittoArgs(h, "dev1", good), "-q", "1", "-t", "devices/dev1/messages/events/", "-m", "x")...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub with a good SAS: %v %s", err, out)
	}
}
