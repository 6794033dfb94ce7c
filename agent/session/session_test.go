package session

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/agent/router"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/twin"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The session connects with a SAS token over verified TLS, subscribes, GETs
// the twin (its desired section arrives as a full document) and serves.
func TestConnectSubscribeGet(t *testing.T) {
	h := startHub(t)
	if _, err := h.UpdateDesired("gw-01", map[string]any{"logLevel": "debug"}); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	s, err := New(baseConfig(t, h.conn, h.addr, h.RootCAs(), rec))
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "the twin's desired section", func() bool { return len(rec.desiredList()) == 1 })
	d := rec.desiredList()[0]
	if !d.Full || d.Version < 2 || d.Doc["logLevel"] != "debug" {
		t.Fatalf("desired after connect = %+v, want full doc with logLevel=debug", d)
	}
	if _, ok := d.Doc["$version"]; ok {
		t.Fatal("$version left in the desired document")
	}
	if !h.Connected("gw-01") {
		t.Fatal("hub does not see the device")
	}
	hl := s.Health()
	if !hl.Connected || hl.Connects != 1 || hl.LastExchange.IsZero() || !strings.HasPrefix(hl.Describe(time.Now()), "connected to localhost") {
		t.Fatalf("health = %+v", hl)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := s.Probe(ctx); err != nil {
		t.Fatal(err)
	}
	// The connection was made over the subscriptions: a method call reaches
	// the (default) method callback.
	res, err := h.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "anything", ResponseTimeoutInSeconds: 10})
	if err != nil || res.Status != 501 {
		t.Fatalf("InvokeMethod = %+v, %v; want the default 501", res, err)
	}
}

// Refusals are reported, retried with backoff and never crash the loop.
func TestConnectFailures(t *testing.T) {
	h := startHub(t)
	other := startHub(t) // a hub with a CA of its own
	badKey := h.conn
	badKey.SharedAccessKey = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	tests := []struct {
		name string
		cfg  func(c *Config)
		want string
	}{
		{"system roots do not trust the local CA", func(c *Config) { c.RootCAs = nil },
			"certificate signed by unknown authority (the hub's certificate is not from a CA this system trusts: for a private hub such as gwhub or IoT Edge, set hub.caFile"},
		{"hub.caFile holds another CA", func(c *Config) { c.RootCAs = other.RootCAs() },
			"hub.caFile does not hold the CA that signed the hub's certificate"},
		{"certificate for another name", func(c *Config) { c.Conn.HostName = "other.example" },
			"the hub's certificate is not for other.example, the name TLS checks: it comes from HostName or GatewayHostName of the connection string, never from hub.address"},
		{"wrong key", func(c *Config) { c.Conn = badKey }, "check the device key"},
		{"nobody listening", func(c *Config) { c.Address = "127.0.0.1:1" }, "refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
			tc.cfg(&cfg)
			s, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			run(t, s)
			testutil.Eventually(t, wait, "a failed attempt", func() bool { return s.Health().LastError != "" })
			hl := s.Health()
			if hl.Connected || !strings.Contains(hl.LastError, tc.want) {
				t.Fatalf("health = %+v, want an error containing %q", hl, tc.want)
			}
			if rec.connectCount() != 0 {
				t.Fatal("OnConnect ran")
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			if err := s.Probe(ctx); err != nil {
				t.Fatalf("loop not responsive while retrying: %v", err)
			}
		})
	}
}

func TestNewRejectsBadIdentity(t *testing.T) {
	tests := []struct {
		name string
		cs   iothub.ConnectionString
	}{
		{"no host", iothub.ConnectionString{DeviceID: "d", SharedAccessKey: "AAAA"}},
		{"service", iothub.ConnectionString{HostName: "h", SharedAccessKeyName: "iothubowner", SharedAccessKey: "AAAA"}},
		{"x509 without cert", iothub.ConnectionString{HostName: "h", DeviceID: "d", X509: true}},
		{"no credentials", iothub.ConnectionString{HostName: "h", DeviceID: "d"}},
	}
	for _, tc := range tests {
		if _, err := New(Config{Conn: tc.cs}); err == nil {
			t.Errorf("%s: New accepted %+v", tc.name, tc.cs)
		}
	}
}

// Methods reach the Methods handler with their payload and the answer goes back with
// the call's rid and status, for any status.
func TestMethodRoundTrip(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	afterRan := make(chan string, 8)
	cfg.Methods = methodsFunc(func(_ context.Context, name string, payload []byte) router.Response {
		var p struct{ Status int }
		_ = json.Unmarshal(payload, &p)
		body := json.RawMessage(fmt.Sprintf(`{"method":%q,"echo":%s}`, name, payload))
		return router.Response{Status: p.Status, Body: body, After: func() { afterRan <- name }}
	})
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })
	for _, status := range []int{200, 400, 404, 409, 500} {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		payload := json.RawMessage(fmt.Sprintf(`{"Status":%d}`, status))
		res, err := h.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "m" + fmt.Sprint(status), Payload: payload, ResponseTimeoutInSeconds: 10})
		cancel()
		if err != nil {
			t.Fatalf("status %d: %v", status, err)
		}
		want := fmt.Sprintf(`{"method":"m%d","echo":{"Status":%d}}`, status, status)
		if res.Status != status || string(res.Payload) != want {
			t.Fatalf("got %d %s, want %d %s", res.Status, res.Payload, status, want)
		}
		select {
		case name := <-afterRan:
			if name != fmt.Sprintf("m%d", status) {
				t.Fatalf("after ran for %s", name)
			}
		case <-time.After(wait):
			t.Fatal("after hook did not run")
		}
	}
}

// A handler that blocks does not stop twin traffic, desired patches or other
// calls: calls beyond MaxMethodCalls in flight get 503 at once.
func TestHandlersNeverBlockTheSession(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	cfg.MaxMethodCalls = 3
	release := make(chan struct{})
	var entered atomic.Int32
	cfg.Methods = methodsFunc(func(ctx context.Context, name string, _ []byte) router.Response {
		if name == "block" {
			entered.Add(1)
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return router.JSON(200, nil)
	})
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })

	// Three calls hold the three slots; the rest must be refused quickly.
	var wg sync.WaitGroup
	results := make(chan int, 8)
	for range 6 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			res, err := h.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "block", ResponseTimeoutInSeconds: 10})
			if err != nil {
				results <- 0
				return
			}
			results <- res.Status
		})
	}
	testutil.Eventually(t, wait, "three 503 answers", func() bool { return len(results) >= 3 })
	for range 3 {
		if st := <-results; st != 503 {
			t.Fatalf("early answer %d, want 503", st)
		}
	}
	// Meanwhile the twin works.
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := s.PatchReported(ctx, []byte(`{"k":1}`)); err != nil {
		t.Fatalf("PatchReported while a handler blocks: %v", err)
	}
	if _, err := h.UpdateDesired("gw-01", map[string]any{"x": 1}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "the desired patch", func() bool {
		l := rec.desiredList()
		return len(l) == 2 && !l[1].Full
	})
	if err := s.Probe(ctx); err != nil {
		t.Fatal(err)
	}
	close(release)
	wg.Wait()
	close(results)
	for st := range results {
		if st != 200 {
			t.Fatalf("released call answered %d", st)
		}
	}
}

func TestPatchReported(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	cfg.RequestTimeout = time.Second
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := s.PatchReported(ctx, []byte(`{"a":1}`)); !errors.Is(err, iothub.ErrNotConnected) {
		t.Fatalf("offline PatchReported = %v, want ErrNotConnected", err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })

	v1, err := s.PatchReported(ctx, []byte(`{"a":1}`))
	if err != nil {
		t.Fatal(err)
	}
	v2, err := s.PatchReported(ctx, []byte(`{"a":2}`))
	if err != nil || v2 <= v1 {
		t.Fatalf("second patch: version %d after %d, %v", v2, v1, err)
	}
	tw, err := h.Twin("gw-01")
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(tw.Properties.Reported["a"]) != "2" {
		t.Fatalf("reported a = %v", tw.Properties.Reported["a"])
	}

	for _, status := range []int{429, 500, 400} {
		h.InjectTwinFault("gw-01", hub.TwinFault{Op: hub.TwinReported, Count: 1, Status: status})
		_, err := s.PatchReported(ctx, []byte(`{"a":3}`))
		var se *iothub.StatusError
		if !errors.As(err, &se) || se.Status != status || len(se.Body) == 0 {
			t.Fatalf("fault %d: err = %v", status, err)
		}
	}
	// Invalid content: the real hub's 400.
	_, err = s.PatchReported(ctx, []byte(`{"bad.key":1}`))
	var se *iothub.StatusError
	if !errors.As(err, &se) || se.Status != 400 || se.Temporary() {
		t.Fatalf("bad key: %v", err)
	}
	// No answer in time.
	h.InjectTwinFault("gw-01", hub.TwinFault{Op: hub.TwinReported, Count: 1, Delay: 3 * time.Second})
	if _, err := s.PatchReported(ctx, []byte(`{"a":4}`)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("delayed answer: %v, want ErrTimeout", err)
	}
	// The delayed request holds the device's later ones behind it.
	testutil.Eventually(t, wait, "the hub to answer again", func() bool {
		_, err := s.PatchReported(ctx, []byte(`{"a":4}`))
		return err == nil
	})
	// The connection drops with the answer outstanding.
	h.InjectTwinFault("gw-01", hub.TwinFault{Op: hub.TwinReported, Count: 1, Disconnect: true})
	if _, err := s.PatchReported(ctx, []byte(`{"a":5}`)); !errors.Is(err, iothub.ErrNotConnected) {
		t.Fatalf("dropped connection: %v, want ErrNotConnected", err)
	}
	testutil.Eventually(t, wait, "reconnect", func() bool { return rec.connectCount() == 2 })
	if _, err := s.PatchReported(ctx, []byte(`{"a":6}`)); err != nil {
		t.Fatalf("after reconnect: %v", err)
	}
}

// The session implements the queue's Publisher: a queue drains through it
// and 429s are retried.
func TestQueueThroughSession(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	s, err := New(baseConfig(t, h.conn, h.addr, h.RootCAs(), rec))
	if err != nil {
		t.Fatal(err)
	}
	q, err := twin.OpenQueue(twin.QueueOptions{Dir: t.TempDir(), MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}, s, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	qdone := make(chan error, 1)
	go func() { qdone <- q.Run(ctx) }()
	defer func() {
		cancel()
		<-qdone
		_ = q.Close()
	}()
	h.InjectTwinFault("gw-01", hub.TwinFault{Op: hub.TwinReported, Count: 2, Status: 429})
	if err := q.Report(map[string]any{"firmwareStatus": "standBy"}, true); err != nil {
		t.Fatal(err)
	}
	run(t, s)
	fctx, fcancel := context.WithTimeout(context.Background(), wait)
	defer fcancel()
	if err := q.Flush(fctx); err != nil {
		t.Fatal(err)
	}
	tw, _ := h.Twin("gw-01")
	if tw.Properties.Reported["firmwareStatus"] != "standBy" {
		t.Fatalf("reported = %v", tw.Properties.Reported)
	}
}

// After the hub restarts, the session reconnects, subscribes again and
// GETs the twin: a desired change made while it was away arrives.
func TestReconnectAfterHubRestart(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	s, err := New(baseConfig(t, h.conn, h.addr, h.RootCAs(), rec))
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 && len(rec.desiredList()) == 1 })
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "offline", func() bool { return !s.Health().Connected })
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := s.PatchReported(ctx, []byte(`{"a":1}`)); !errors.Is(err, iothub.ErrNotConnected) {
		t.Fatalf("PatchReported offline = %v", err)
	}
	var version int64
	h.startWith(t, func(hh *hub.Hub) {
		// No device can be connected yet: only the GET can bring this.
		var err error
		if version, err = hh.UpdateDesired("gw-01", map[string]any{"logLevel": "warn"}); err != nil {
			t.Fatal(err)
		}
	})
	testutil.Eventually(t, wait, "reconnect", func() bool { return rec.connectCount() == 2 })
	testutil.Eventually(t, wait, "the change made while offline", func() bool { return len(rec.desiredList()) == 2 })
	d := rec.desiredList()[1]
	if !d.Full || d.Version != version || d.Doc["logLevel"] != "warn" {
		t.Fatalf("desired after reconnect = %+v, want full v%d", d, version)
	}
	if hl := s.Health(); hl.Drops != 1 || hl.Connects != 2 {
		t.Fatalf("health = %+v", hl)
	}
	// Subscriptions are back: methods and desired patches arrive.
	res, err := h.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "m", ResponseTimeoutInSeconds: 10})
	if err != nil || res.Status != 501 {
		t.Fatalf("method after reconnect: %+v %v", res, err)
	}
	if _, err := h.UpdateDesired("gw-01", map[string]any{"logLevel": "error"}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "a desired patch", func() bool { return len(rec.desiredList()) == 3 })
	if d := rec.desiredList()[2]; d.Full || d.Doc["logLevel"] != "error" {
		t.Fatalf("patch = %+v", d)
	}
}

// With a short token lifetime the session reconnects with a fresh token
// before the hub would drop it: renewals, no drops.
func TestTokenRenewalBeforeExpiry(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	cfg.SASTTL = 3 * time.Second
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "two renewals", func() bool { return s.Health().Renewals >= 2 })
	testutil.Eventually(t, wait, "reconnected", func() bool { return s.Health().Connected })
	if hl := s.Health(); hl.Drops != 0 || hl.Connects < 3 {
		t.Fatalf("health = %+v: the hub dropped an expired token", hl)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	testutil.Eventually(t, wait, "twin works", func() bool {
		_, err := s.PatchReported(ctx, []byte(`{"a":1}`))
		return err == nil
	})
}

// Desired patches are applied in order and those with a $version the
// session already applied (through the GET or an earlier patch) are
// ignored.
func TestDesiredVersionFiltering(t *testing.T) {
	b := startRawBroker(t)
	var mu sync.Mutex
	getVersion := int64(4)
	b.answerGets(t, func() map[string]any {
		mu.Lock()
		defer mu.Unlock()
		return map[string]any{"$version": getVersion, "a": getVersion}
	})
	rec := &recorder{}
	cs := iothub.ConnectionString{HostName: "localhost", DeviceID: "gw-01", SharedAccessKey: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}
	s, err := New(baseConfig(t, cs, b.addr, b.roots, rec))
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 && len(rec.desiredList()) == 1 })
	for _, v := range []int64{3, 4, 5, 5, 2, 7, 6} {
		body := fmt.Sprintf(`{"a":%d,"$version":%d}`, v, v)
		if err := b.Publish(iothub.DesiredPatchTopic(v), []byte(body), false, 0); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, wait, "patches 5 and 7", func() bool { return len(rec.desiredList()) == 3 })
	// A reconnect whose GET shows nothing new delivers nothing; a GET with
	// a newer version delivers the whole document.
	mu.Lock()
	getVersion = 7
	mu.Unlock()
	b.kickAll(t)
	testutil.Eventually(t, wait, "reconnect", func() bool { return rec.connectCount() == 2 })
	mu.Lock()
	getVersion = 9
	mu.Unlock()
	b.kickAll(t)
	testutil.Eventually(t, wait, "second reconnect", func() bool { return rec.connectCount() == 3 })
	testutil.Eventually(t, wait, "full v9", func() bool { return len(rec.desiredList()) == 4 })
	// A GET with a lower version means the twin was recreated: it is taken.
	mu.Lock()
	getVersion = 1
	mu.Unlock()
	b.kickAll(t)
	testutil.Eventually(t, wait, "third reconnect", func() bool { return rec.connectCount() == 4 })
	testutil.Eventually(t, wait, "full v1", func() bool { return len(rec.desiredList()) == 5 })
	got := rec.desiredList()
	want := []struct {
		v    int64
		full bool
	}{{4, true}, {5, false}, {7, false}, {9, true}, {1, true}}
	for i, w := range want {
		if got[i].Version != w.v || got[i].Full != w.full || fmt.Sprint(got[i].Doc["a"]) != fmt.Sprint(w.v) {
			t.Fatalf("delivery %d = %+v, want v%d full=%v", i, got[i], w.v, w.full)
		}
	}
	// No stray late delivery: deliveries are in order, so a marker patch
	// published now arrives right after the five, or something came between.
	if err := b.Publish(iothub.DesiredPatchTopic(2), []byte(`{"a":"marker","$version":2}`), false, 0); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, "the marker patch", func() bool { return len(rec.desiredList()) >= 6 })
	if got := rec.desiredList(); len(got) != 6 || got[5].Version != 2 || got[5].Doc["a"] != "marker" {
		t.Fatalf("deliveries after the five: %+v, want only the marker v2", got[5:])
	}
}

func (b *rawBroker) kickAll(t *testing.T) {
	t.Helper()
	for _, cl := range b.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		cl.Stop(errors.New("kicked by the test"))
	}
}

// Stopping returns promptly, online or while retrying, and leaves no
// goroutine behind (goleak checks the whole package).
func TestStop(t *testing.T) {
	h := startHub(t)
	for _, addr := range []string{h.addr, "127.0.0.1:1"} {
		rec := &recorder{}
		s, err := New(baseConfig(t, h.conn, addr, h.RootCAs(), rec))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		testutil.Eventually(t, wait, "an attempt", func() bool { return rec.connectCount() == 1 || s.Health().LastError != "" })
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(wait):
			t.Fatal("Run did not return")
		}
		if err := s.Run(context.Background()); !errors.Is(err, ErrClosed) {
			t.Fatalf("second Run = %v", err)
		}
		pctx, pcancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		if err := s.Probe(pctx); err == nil {
			t.Fatal("Probe passed with the loop stopped")
		}
		pcancel()
	}
}

func FuzzDecodeGet(f *testing.F) {
	f.Add([]byte(`{"desired":{"$version":3,"a":1},"reported":{"$version":1}}`))
	f.Add([]byte(`{"desired":{"$version":"x"}}`))
	f.Add([]byte(`{"desired":[]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, body []byte) {
		doc, v, rep, err := decodeGet(body)
		if err != nil {
			return
		}
		if doc == nil || rep == nil || v < 0 {
			t.Fatalf("decodeGet(%q) = %v, %d", body, doc, v)
		}
		if _, ok := doc["$version"]; ok {
			t.Fatal("$version kept")
		}
		if _, ok := rep["$version"]; ok {
			t.Fatal("reported $version kept")
		}
	})
}

// The CONNECT packet is what IoT Hub expects: MQTT 3.1.1, client id = device
// id, the documented username, a SAS password for the device resource, or
// no password with an X.509 client certificate.
func TestConnectPacket(t *testing.T) {
	key := "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	t.Run("sas", func(t *testing.T) {
		b := startRawBroker(t)
		b.answerGets(t, func() map[string]any { return map[string]any{"$version": 1} })
		rec := &recorder{}
		cs := iothub.ConnectionString{HostName: "localhost", DeviceID: "gw-01", SharedAccessKey: key}
		s, err := New(baseConfig(t, cs, b.addr, b.roots, rec))
		if err != nil {
			t.Fatal(err)
		}
		run(t, s)
		pk := b.connect(t)
		c := pk.Connect
		if pk.ProtocolVersion != 4 || c.ClientIdentifier != "gw-01" || !c.Clean ||
			string(c.Username) != "localhost/gw-01/?api-version=2021-04-12&DeviceClientType=gwagent-test%2F0" {
			t.Fatalf("CONNECT v%d id %q clean %v user %q", pk.ProtocolVersion, c.ClientIdentifier, c.Clean, c.Username)
		}
		sas, err := iothub.ParseSAS(string(c.Password))
		if err != nil {
			t.Fatal(err)
		}
		k, _ := cs.Key()
		if err := sas.Verify(k); err != nil || !sas.Covers("localhost/devices/gw-01") || sas.KeyName != "" {
			t.Fatalf("SAS %+v: %v", sas, err)
		}
		if ttl := time.Until(sas.Expiry); ttl < 50*time.Minute || ttl > time.Hour {
			t.Fatalf("token lifetime %v, want about the default 1h", ttl)
		}
		testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })
	})
	t.Run("x509", func(t *testing.T) {
		clientCert, clientPool := selfSigned(t, "gw-x509")
		b := startRawBroker(t, clientPool)
		b.answerGets(t, func() map[string]any { return map[string]any{"$version": 1} })
		rec := &recorder{}
		cs := iothub.ConnectionString{HostName: "localhost", DeviceID: "gw-x509", X509: true}
		cfg := baseConfig(t, cs, b.addr, b.roots, rec)
		cfg.Certificate = &clientCert
		s, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		run(t, s)
		pk := b.connect(t)
		if pk.Connect.PasswordFlag || len(pk.Connect.Password) != 0 || pk.Connect.ClientIdentifier != "gw-x509" {
			t.Fatalf("X.509 CONNECT %+v", pk.Connect)
		}
		testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })
		if !s.Health().Connected {
			t.Fatal("not connected")
		}
	})
}

// fuzzMsg is an incoming PUBLISH as paho hands it to a handler.
type fuzzMsg struct {
	topic   string
	payload []byte
}

func (m fuzzMsg) Duplicate() bool   { return false }
func (m fuzzMsg) Qos() byte         { return 0 }
func (m fuzzMsg) Retained() bool    { return false }
func (m fuzzMsg) Topic() string     { return m.topic }
func (m fuzzMsg) MessageID() uint16 { return 0 }
func (m fuzzMsg) Payload() []byte   { return m.payload }
func (m fuzzMsg) Ack()              {}

// Whatever the hub sends, the message handler returns at once, never
// panics, and what it hands on is well formed.
func FuzzOnMessage(f *testing.F) {
	f.Add("$iothub/methods/POST/firmwareUpdate/?$rid=1", []byte(`{"fwPackageUri":"https://x"}`))
	f.Add("$iothub/twin/PATCH/properties/desired/?$version=3", []byte(`{"a":1,"$version":3}`))
	f.Add("$iothub/twin/res/200/?$rid=r-1", []byte(`{"desired":{"$version":2},"reported":{}}`))
	f.Add("$iothub/twin/res/204/?$rid=r-2&$version=9", []byte(``))
	f.Add("$iothub/twin/PATCH/properties/desired/?$version=x", []byte(`[]`))
	f.Fuzz(func(t *testing.T, topic string, payload []byte) {
		s, err := New(Config{Conn: iothub.ConnectionString{HostName: "h", DeviceID: "d", SharedAccessKey: "AAAA"}, MaxMethodCalls: 1})
		if err != nil {
			t.Fatal(err)
		}
		s.runCtx = context.Background()
		c := &conn{client: mqtt.NewClient(mqtt.NewClientOptions()), lost: make(chan struct{})}
		// Requests in flight for the rids the seeds answer.
		_, get := s.register(true)
		s.mu.Lock()
		s.pending["r-1"] = get
		s.pending["r-2"] = &pending{done: make(chan struct{})}
		s.mu.Unlock()
		h := s.onMessage(c)
		done := make(chan struct{})
		go func() {
			for range 4 { // more calls than MaxMethodCalls
				h(nil, fuzzMsg{topic, payload})
			}
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("handler blocked")
		}
		s.calls.Wait()
		for len(s.desired) > 0 {
			d := <-s.desired
			if _, ok := d.Doc["$version"]; ok || d.Doc == nil || d.Version < 0 {
				t.Fatalf("desired %+v", d)
			}
		}
	})
}
