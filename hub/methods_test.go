package hub

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/iothub"
)

// answerMethods makes the device answer every method call with status and
// payload (echoing the request payload when payload is "echo").
func (d *testDevice) answerMethods(status int, payload string) {
	d.t.Helper()
	tok := d.c.Subscribe(iothub.MethodsFilter, 0, func(c paho.Client, m paho.Message) {
		t, err := iothub.ParseTopic(m.Topic())
		if err != nil {
			return
		}
		body := []byte(payload)
		if payload == "echo" {
			body = m.Payload()
		}
		// Never wait on a token inside a paho handler.
		c.Publish(iothub.MethodResponseTopic(status, t.RID), 0, false, body)
	})
	if !tok.WaitTimeout(waitLong) || tok.Error() != nil {
		d.t.Fatalf("subscribe methods: %v", tok.Error())
	}
}

func TestMethodRoundTrip(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	svc := newService(t, h)
	d := connect(t, h, "dev1", key)
	d.answerMethods(200, "echo")

	st, b, _ := svc.do("POST", "/twins/dev1/methods", map[string]any{
		"methodName": "firmwareUpdate", "payload": map[string]any{"fwPackageUri": "https://x/fw.bin"}, "responseTimeoutInSeconds": 30,
	})
	if st != 200 {
		t.Fatalf("invoke: %d %s", st, b)
	}
	var res iothub.MethodResult
	if err := json.Unmarshal(b, &res); err != nil || res.Status != 200 || string(res.Payload) != `{"fwPackageUri":"https://x/fw.bin"}` {
		t.Fatalf("result %s (%v)", b, err)
	}
	// No payload: the device gets JSON null and echoes it.
	res2, err := h.InvokeMethod(context.Background(), "dev1", iothub.MethodRequest{MethodName: "reboot"})
	if err != nil || res2.Status != 200 || string(res2.Payload) != "null" {
		t.Fatalf("InvokeMethod: %+v %v", res2, err)
	}
	// The device answering with an empty body gives payload null too.
	d2 := connect(t, h, "dev1", key)
	d2.answerMethods(204, "")
	res2, err = h.InvokeMethod(context.Background(), "dev1", iothub.MethodRequest{MethodName: "reboot", Payload: json.RawMessage(`{"a":1}`)})
	if err != nil || res2.Status != 204 || string(res2.Payload) != "null" {
		t.Fatalf("InvokeMethod: %+v %v", res2, err)
	}
}

func TestMethodErrors(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	keyQuiet := addDevice(t, h, "quiet")
	keyBad := addDevice(t, h, "badjson")
	addDevice(t, h, "offline")
	svc := newService(t, h)
	connect(t, h, "quiet", keyQuiet).sub(iothub.TwinResponseFilter) // online, not subscribed to methods
	connect(t, h, "badjson", keyBad).answerMethods(200, "not json")
	connect(t, h, "dev1", key).answerMethods(201, `{"ok":true}`)

	big := `"` + strings.Repeat("x", iothub.MaxMethodPayload) + `"`
	tests := []struct {
		name   string
		id     string
		body   string
		status int
		code   int
	}{
		{"offline device", "offline", `{"methodName":"reboot"}`, 404, iothub.CodeDeviceNotOnline},
		{"not subscribed", "quiet", `{"methodName":"reboot"}`, 404, iothub.CodeDeviceNotOnline},
		{"unknown device", "ghost", `{"methodName":"reboot"}`, 404, iothub.CodeDeviceNotFound},
		{"bad JSON", "dev1", `{"methodName":`, 400, iothub.CodeIotHubFormatError},
		{"no method name", "dev1", `{"payload":1}`, 400, iothub.CodeArgumentInvalid},
		{"method name with /", "dev1", `{"methodName":"a/b"}`, 400, iothub.CodeArgumentInvalid},
		{"method name with space", "dev1", `{"methodName":"a b"}`, 400, iothub.CodeArgumentInvalid},
		{"response timeout too short", "dev1", `{"methodName":"m","responseTimeoutInSeconds":4}`, 400, iothub.CodeArgumentInvalid},
		{"response timeout too long", "dev1", `{"methodName":"m","responseTimeoutInSeconds":301}`, 400, iothub.CodeArgumentInvalid},
		{"connect timeout negative", "dev1", `{"methodName":"m","connectTimeoutInSeconds":-1}`, 400, iothub.CodeArgumentInvalid},
		{"connect timeout too long", "dev1", `{"methodName":"m","connectTimeoutInSeconds":301}`, 400, iothub.CodeArgumentInvalid},
		{"payload not JSON", "dev1", `{"methodName":"m","payload":}`, 400, iothub.CodeIotHubFormatError},
		{"payload over 128 KB", "dev1", `{"methodName":"m","payload":` + big + `}`, 413, iothub.CodeMessageTooLarge},
		{"device answers non-JSON", "badjson", `{"methodName":"m"}`, 400, iothub.CodeArgumentInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, b, resp := svc.do("POST", "/twins/"+tc.id+"/methods", tc.body)
			e := wantError(t, st, b, tc.status, tc.code)
			if tc.code == iothub.CodeDeviceNotOnline {
				if !strings.Contains(e.Message, "isn't online") || !strings.Contains(string(b), `\"timeout\":\"00:00:00\"`) {
					t.Fatalf("404103 body %s", b)
				}
				if resp.Header.Get("iothub-errorcode") != "DeviceNotOnline" {
					t.Fatalf("iothub-errorcode %q", resp.Header.Get("iothub-errorcode"))
				}
			}
		})
	}
	// The hub keeps serving: a good call still works, with the device's
	// own status passed through.
	st, b, _ := svc.do("POST", "/twins/dev1/methods", `{"methodName":"m","payload":[1,2]}`)
	if st != 200 || string(b) != `{"status":201,"payload":{"ok":true}}` {
		t.Fatalf("good call after errors: %d %s", st, b)
	}
}

// TestMethodTimeoutMosquitto uses mosquitto_sub as a device that receives
// the call and never answers.
func TestMethodTimeoutMosquitto(t *testing.T) {
	sub := needTool(t, "mosquitto_sub")
	h := startHub(t)
	key := addDevice(t, h, "mute")
	svc := newService(t, h)
	cmd := exec.Command(sub, append(mosquittoArgs(h, "mute", sas(h, "mute", key, time.Hour)),
		"-t", iothub.MethodsFilter, "-q", "0", "-C", "1", "-v", "-W", "60")...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	start := time.Now()
	// connectTimeout lets the hub wait for mosquitto_sub to connect and
	// subscribe.
	st, b, _ := svc.do("POST", "/twins/mute/methods", `{"methodName":"reboot","payload":{"delay":1},"responseTimeoutInSeconds":5,"connectTimeoutInSeconds":20}`)
	e := wantError(t, st, b, 504, iothub.CodeGatewayTimeout)
	if e.Message != msgTimeout {
		t.Fatalf("504 message %q", e.Message)
	}
	if el := time.Since(start); el < 5*time.Second {
		t.Fatalf("504 after %v, before the 5 s response timeout", el)
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Fatalf("mosquitto_sub: %v: %s", waitErr, out.String())
		}
	case <-time.After(waitLong):
		t.Fatal("mosquitto_sub did not receive the call")
	}
	got := strings.TrimSpace(out.String())
	if !strings.HasPrefix(got, "$iothub/methods/POST/reboot/?$rid=") || !strings.HasSuffix(got, ` {"delay":1}`) {
		t.Fatalf("mosquitto_sub got %q", got)
	}
}

func TestMethodConnectTimeout(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "late")
	type result struct {
		res iothub.MethodResult
		err error
	}
	ch := make(chan result, 1)
	go func() {
		r, err := h.InvokeMethod(context.Background(), "late", iothub.MethodRequest{MethodName: "ping", ConnectTimeoutInSeconds: 30})
		ch <- result{r, err}
	}()
	// The call waits for the device to come online and subscribe instead
	// of failing at once.
	select {
	case r := <-ch:
		t.Fatalf("call returned while the device was offline: %+v %v", r.res, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	d := connect(t, h, "late", key)
	d.answerMethods(200, `"pong"`)
	select {
	case r := <-ch:
		if r.err != nil || r.res.Status != 200 || string(r.res.Payload) != `"pong"` {
			t.Fatalf("result %+v %v", r.res, r.err)
		}
	case <-time.After(waitLong):
		t.Fatal("the call did not complete after the device came online")
	}
	// With a short connect timeout and nobody coming, 404103 after the wait.
	addDevice(t, h, "never")
	start := time.Now()
	_, err := h.InvokeMethod(context.Background(), "never", iothub.MethodRequest{MethodName: "ping", ConnectTimeoutInSeconds: 1})
	var se *iothub.ServiceError
	if !errors.As(err, &se) || se.Code != iothub.CodeDeviceNotOnline {
		t.Fatalf("err %v, want 404103", err)
	}
	if time.Since(start) < time.Second {
		t.Fatal("404103 before the connect timeout")
	}
}

// TestLateMethodResponseIgnored checks that an answer after the timeout, or
// for an unknown rid, does not disturb the hub.
func TestLateMethodResponseIgnored(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	d := connect(t, h, "dev1", key)
	calls := make(chan string, 4)
	tok := d.c.Subscribe(iothub.MethodsFilter, 0, func(_ paho.Client, m paho.Message) { calls <- m.Topic() })
	tok.WaitTimeout(waitLong)
	d.sub(iothub.TwinResponseFilter)
	// An answer nobody asked for.
	d.pub(iothub.MethodResponseTopic(200, "nobody"), 1, []byte(`{}`))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := h.InvokeMethod(ctx, "dev1", iothub.MethodRequest{MethodName: "slow"})
	if err == nil {
		t.Fatal("call answered although the device did not answer")
	}
	topic := <-calls
	pt, _ := iothub.ParseTopic(topic)
	d.pub(iothub.MethodResponseTopic(200, pt.RID), 1, []byte(`{"late":true}`))
	if rt, _ := d.twinRequest(iothub.TwinGetTopic("alive"), nil); rt.Status != 200 {
		t.Fatalf("device not served after late answers: %d", rt.Status)
	}
}
