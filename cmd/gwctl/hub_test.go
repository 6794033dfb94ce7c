package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
)

// startHub runs the local hub in-process on loopback ports.
func startHub(t *testing.T) (*hub.Hub, *env) {
	t.Helper()
	h, err := hub.New(hub.Config{StateDir: t.TempDir(), HostName: "gwhub.test", MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h, &env{cs: h.ServiceConnectionString(), dpsCS: h.DPSConnectionString(), ca: h.CAFile(), endpoint: "https://" + h.HTTPSAddr()}
}

// testDevice is a minimal device on the hub's MQTT surface: it answers
// firmwareUpdate with an update id and then reports the tutorial's states,
// each acknowledged (204) before the next, the way gwagent does.
type testDevice struct {
	t      *testing.T
	client paho.Client
	host   string
	mu     sync.Mutex
	acks   map[string]chan int // rid → twin response status
	rid    int
	wg     sync.WaitGroup
	// methods answers other methods than firmwareUpdate (see answer).
	methods map[string]func(payload []byte) (int, string)
}

// answer makes the device answer method with fn's status and body.
func (d *testDevice) answer(method string, fn func(payload []byte) (int, string)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.methods == nil {
		d.methods = map[string]func([]byte) (int, string){}
	}
	d.methods[method] = fn
}

func connectDevice(t *testing.T, h *hub.Hub, connectionString string, onUpdate func(d *testDevice, req json.RawMessage)) *testDevice {
	t.Helper()
	cs, err := iothub.ParseConnectionString(connectionString)
	if err != nil {
		t.Fatal(err)
	}
	key, err := cs.Key()
	if err != nil {
		t.Fatal(err)
	}
	d := &testDevice{t: t, host: cs.HostName, acks: map[string]chan int{}}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + h.MQTTAddr()).
		SetClientID(cs.DeviceID).
		SetUsername(iothub.Username(cs.HostName, cs.DeviceID, "gwctl-test/1")).
		SetPassword(iothub.NewSAS(iothub.DeviceResource(cs.HostName, cs.DeviceID), key, "", time.Now().Add(time.Hour))).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetTLSConfig(&tls.Config{RootCAs: h.RootCAs(), ServerName: cs.HostName, MinVersion: tls.VersionTLS12})
	d.client = paho.NewClient(opts)
	if tok := d.client.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("device connect: %v", tok.Error())
	}
	// Handlers only hand work on: paho's router must never block.
	sub := func(filter string, cb paho.MessageHandler) {
		if tok := d.client.Subscribe(filter, 0, cb); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe %s: %v", filter, tok.Error())
		}
	}
	sub(iothub.TwinResponseFilter, func(_ paho.Client, m paho.Message) {
		tp, err := iothub.ParseTopic(m.Topic())
		if err != nil {
			return
		}
		d.mu.Lock()
		ch := d.acks[tp.RID]
		d.mu.Unlock()
		if ch != nil {
			ch <- tp.Status
		}
	})
	sub(iothub.MethodsFilter, func(_ paho.Client, m paho.Message) {
		tp, err := iothub.ParseTopic(m.Topic())
		if err != nil || tp.Kind != iothub.KindMethodRequest {
			return
		}
		status, body := 404, `{"error":"unknown method `+tp.Method+`"}`
		if tp.Method == "firmwareUpdate" {
			status, body = 200, `{"updateId":"u-1","status":"accepted"}`
		}
		d.mu.Lock()
		fn := d.methods[tp.Method]
		d.mu.Unlock()
		if fn != nil {
			status, body = fn(m.Payload())
		}
		d.client.Publish(iothub.MethodResponseTopic(status, tp.RID), 0, false, body) // not waited on: never block the router
		if status == 200 && fn == nil {
			payload := append(json.RawMessage(nil), m.Payload()...)
			d.wg.Go(func() { onUpdate(d, payload) })
		}
	})
	t.Cleanup(func() {
		d.wg.Wait()
		d.client.Disconnect(250)
	})
	return d
}

// report publishes a reported patch and waits for the hub's 204.
func (d *testDevice) report(patch map[string]any) {
	d.mu.Lock()
	d.rid++
	rid := fmt.Sprint(d.rid)
	ch := make(chan int, 1)
	d.acks[rid] = ch
	d.mu.Unlock()
	b, _ := json.Marshal(patch)
	d.client.Publish(iothub.TwinReportedTopic(rid), 0, false, b)
	select {
	case st := <-ch:
		if st != 204 {
			d.t.Errorf("reported patch answered %d", st)
		}
	case <-time.After(10 * time.Second):
		d.t.Error("no answer to a reported patch")
	}
}

func state(status, updateID, version string, bytes, total int64) map[string]any {
	now := time.Now().UTC().Format(time.RFC3339Nano)
	fw := map[string]any{"status": status, "updateId": updateID, "currentVersion": version, "targetVersion": "1.3.0",
		"bytes": bytes, "totalBytes": total, "updatedAt": now, "error": nil}
	p := map[string]any{"firmwareStatus": status, "firmware": fw}
	switch status {
	case "standBy":
		p["logTime"] = now
	case "downloading":
		p["downloadComplete"] = now
	case "applying":
		p["startedApplyingImage"] = now
	case "completed":
		p["lastFirmwareUpdate"] = now
	}
	return p
}

// TestAgainstLocalHub drives gwctl against the real local hub with a real
// MQTT device on it: registry, twins, methods, queries and a watched update.
func TestAgainstLocalHub(t *testing.T) {
	h, e := startHub(t)

	r := e.gwctl(t, "device", "add", "gw-01")
	if r.code != 0 {
		t.Fatalf("device add: %d %s", r.code, r.stderr)
	}
	deviceCS := strings.TrimSpace(r.stdout)
	if !strings.HasPrefix(deviceCS, "HostName=gwhub.test;DeviceId=gw-01;SharedAccessKey=") {
		t.Fatalf("device connection string %q", deviceCS)
	}

	r = e.gwctl(t, "method", "invoke", "gw-01", "reboot")
	if r.code != 1 || !strings.Contains(r.stderr, "device gw-01 is not online (404103)") {
		t.Fatalf("offline device: %d %q", r.code, r.stderr)
	}

	var updatePayload json.RawMessage
	d := connectDevice(t, h, deviceCS, func(d *testDevice, req json.RawMessage) {
		updatePayload = req
		for _, p := range []map[string]any{
			state("standBy", "u-1", "1.2.0", 0, 0),
			state("downloading", "u-1", "1.2.0", 0, 4_000_000),
			state("downloading", "u-1", "1.2.0", 2_000_000, 4_000_000),
			state("applying", "u-1", "1.2.0", 4_000_000, 4_000_000),
			state("completed", "u-1", "1.3.0", 4_000_000, 4_000_000),
		} {
			time.Sleep(300 * time.Millisecond) // the simulated work of each stage
			d.report(p)
		}
	})
	// What the previous update left: must not be taken for this one.
	d.report(state("completed", "u-0", "1.2.0", 0, 0))

	r = e.gwctl(t, "method", "invoke", "gw-01", "frob")
	if r.code != 1 || !strings.Contains(r.stdout, `"status": 404`) {
		t.Errorf("unknown method: %d %q %q", r.code, r.stdout, r.stderr)
	}

	r = e.gwctl(t, "update", "gw-01", "--uri", "https://example.com/fw-1.3.0.img", "--version", "1.3.0", "--watch", "--interval", "100ms", "--timeout", "1m")
	if r.code != 0 {
		t.Fatalf("update --watch: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	t.Logf("gwctl update --watch:\n%s", r.stdout)
	d.wg.Wait()
	if string(updatePayload) != `{"fwPackageUri":"https://example.com/fw-1.3.0.img","version":"1.3.0"}` {
		t.Errorf("device got payload %s", updatePayload)
	}
	// Polling may miss a short state, but what is shown is in order and
	// ends with this update's completion.
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if lines[0] != "update u-1 accepted by gw-01" {
		t.Errorf("first line %q", lines[0])
	}
	order := map[string]int{"standBy": 0, "downloading": 1, "applying": 2, "completed": 3}
	stamp := regexp.MustCompile(`^\d\d:\d\d:\d\d (\w+)`)
	last := -1
	for _, l := range lines[1:] {
		m := stamp.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("line %q has no time stamp", l)
			continue
		}
		if order[m[1]] < last {
			t.Errorf("state %s after a later one:\n%s", m[1], r.stdout)
		}
		last = order[m[1]]
	}
	if lines[len(lines)-1][9:] != "completed (running 1.3.0)" {
		t.Errorf("last line %q", lines[len(lines)-1])
	}

	r = e.gwctl(t, "twin", "show", "gw-01")
	if r.code != 0 || !strings.Contains(r.stdout, `"firmwareStatus": "completed"`) || !strings.Contains(r.stdout, `"updateId": "u-1"`) {
		t.Errorf("twin show: %d %s %s", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "twin", "set", "gw-01", "--desired", `{"firmware":{"channel":"beta"}}`)
	if r.code != 0 {
		t.Errorf("twin set: %d %s", r.code, r.stderr)
	}
	r = e.gwctl(t, "-o", "json", "twin", "show", "gw-01")
	var tw iothub.Twin
	if err := json.Unmarshal([]byte(r.stdout), &tw); err != nil {
		t.Fatalf("twin show json: %v\n%s", err, r.stdout)
	}
	if fw, _ := tw.Properties.Desired["firmware"].(map[string]any); fw["channel"] != "beta" {
		t.Errorf("desired %v", tw.Properties.Desired)
	}
	r = e.gwctl(t, "query", "SELECT * FROM devices WHERE properties.reported.firmwareStatus = 'completed'")
	if r.code != 0 || !strings.Contains(r.stdout, `"deviceId": "gw-01"`) {
		t.Errorf("query: %d %s %s", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "device", "list")
	if r.code != 0 || !strings.Contains(r.stdout, "gw-01") || !strings.Contains(r.stdout, "Connected") {
		t.Errorf("device list: %d %s %s", r.code, r.stdout, r.stderr)
	}
	r = e.gwctl(t, "device", "delete", "gw-01")
	if r.code != 0 {
		t.Errorf("device delete: %d %s", r.code, r.stderr)
	}
	r = e.gwctl(t, "twin", "show", "gw-01")
	if r.code != 1 || !strings.Contains(r.stderr, "(404001)") {
		t.Errorf("twin of a deleted device: %d %s", r.code, r.stderr)
	}
}

// A method call to a registered device that is not connected says how to
// wait for it (--connect-timeout), and after waiting, that it waited.
func TestOfflineDeviceAgainstLocalHub(t *testing.T) {
	_, e := startHub(t)
	if r := e.gwctl(t, "device", "add", "gw-01"); r.code != 0 {
		t.Fatalf("device add: %d %s", r.code, r.stderr)
	}
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"method", "invoke", "gw-01", "reboot"},
			[]string{"device gw-01 is not online (404103)", "start its agent", "add --connect-timeout 60s"}},
		{[]string{"update", "gw-01", "--uri", "https://example.com/fw.img"},
			[]string{"device gw-01 is not online (404103)", "add --connect-timeout 60s"}},
		{[]string{"method", "invoke", "gw-01", "reboot", "--connect-timeout", "1s"},
			[]string{"device gw-01 is not online (404103)", "did not connect within --connect-timeout 1s"}},
	} {
		r := e.gwctl(t, c.args...)
		if r.code != exitFailure {
			t.Errorf("gwctl %s: exit %d, want %d; stderr %q", strings.Join(c.args, " "), r.code, exitFailure, r.stderr)
		}
		for _, w := range c.want {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("gwctl %s: stderr %q lacks %q", strings.Join(c.args, " "), r.stderr, w)
			}
		}
	}
}
