package service

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service/servicetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// newClient returns a client for a fresh fake endpoint, with fast retries.
func newClient(t *testing.T, mod func(*Options)) (*Client, *servicetest.Server) {
	t.Helper()
	srv := servicetest.New()
	t.Cleanup(srv.Close)
	cs, err := iothub.ParseConnectionString(srv.ConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	ca, err := srv.WriteCAFile(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{CAFile: ca, BaseURL: srv.URL, UserAgent: "service-test/1",
		Retry: RetryPolicy{InitialInterval: 5 * time.Millisecond, MaxInterval: 20 * time.Millisecond}}
	if mod != nil {
		mod(&opts)
	}
	c, err := New(cs, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c, srv
}

func lastRequest(t *testing.T, srv *servicetest.Server) servicetest.Request {
	t.Helper()
	rs := srv.Requests()
	if len(rs) == 0 {
		t.Fatal("no request received")
	}
	return rs[len(rs)-1]
}

func TestNewRejects(t *testing.T) {
	cases := []struct {
		name, cs string
		opts     Options
	}{
		{"device string", "HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==", Options{}},
		{"bad base URL", "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==", Options{BaseURL: "https://127.0.0.1:1/x"}},
		{"missing CA file", "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==", Options{CAFile: "/nonexistent/ca.pem"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cs, err := iothub.ParseConnectionString(tc.cs)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := New(cs, tc.opts); err == nil {
				t.Fatal("New accepted it")
			}
		})
	}
}

// TestRequests checks the wire form of every call: verb, path, api-version,
// a valid policy SAS token, If-Match and the body.
func TestRequests(t *testing.T) {
	ctx := t.Context()
	cases := []struct {
		name      string
		setup     func(*servicetest.Server)
		call      func(*Client) error
		method    string
		path      string
		ifMatch   string
		checkBody func(t *testing.T, body []byte)
	}{
		{
			name: "create device", method: "PUT", path: "/devices/gw-01",
			call: func(c *Client) error {
				d, err := c.CreateDevice(ctx, "gw-01")
				if err == nil && (d.Authentication.SymmetricKey == nil || d.Authentication.SymmetricKey.PrimaryKey == "") {
					err = errors.New("no key in the answer")
				}
				return err
			},
			checkBody: func(t *testing.T, body []byte) {
				var d iothub.Device
				if err := json.Unmarshal(body, &d); err != nil {
					t.Fatal(err)
				}
				if d.DeviceID != "gw-01" || d.Authentication.Type != "sas" || d.Authentication.SymmetricKey == nil ||
					d.Authentication.SymmetricKey.PrimaryKey == d.Authentication.SymmetricKey.SecondaryKey {
					t.Errorf("body %s", body)
				}
			},
		},
		{
			name: "create X.509 device", method: "PUT", path: "/devices/cam-7",
			call: func(c *Client) error {
				_, err := c.CreateX509Device(ctx, "cam-7", strings.Repeat("AB", 20), "")
				return err
			},
			checkBody: func(t *testing.T, body []byte) {
				if !strings.Contains(string(body), `"type":"selfSigned"`) || !strings.Contains(string(body), strings.Repeat("AB", 20)) {
					t.Errorf("body %s", body)
				}
			},
		},
		{
			name: "get device with escaped id", method: "GET", path: "/devices/gw#1",
			setup: func(s *servicetest.Server) { s.AddDevice("gw#1") },
			call: func(c *Client) error {
				d, err := c.GetDevice(ctx, "gw#1")
				if err == nil && d.DeviceID != "gw#1" {
					err = errors.New("wrong device " + d.DeviceID)
				}
				return err
			},
		},
		{
			name: "delete device", method: "DELETE", path: "/devices/gw-01", ifMatch: "*",
			setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			call:  func(c *Client) error { return c.DeleteDevice(ctx, "gw-01") },
		},
		{
			name: "list devices", method: "GET", path: "/devices",
			setup: func(s *servicetest.Server) { s.AddDevice("a"); s.AddDevice("b") },
			call: func(c *Client) error {
				ds, err := c.ListDevices(ctx, 0)
				if err == nil && len(ds) != 2 {
					err = errors.New("want 2 devices")
				}
				return err
			},
		},
		{
			name: "get twin", method: "GET", path: "/twins/gw-01",
			setup: func(s *servicetest.Server) {
				s.AddDevice("gw-01")
				s.SetReported("gw-01", map[string]any{"big": 4503599627370495})
			},
			call: func(c *Client) error {
				tw, err := c.GetTwin(ctx, "gw-01")
				if err == nil && tw.Properties.Reported["big"] != json.Number("4503599627370495") {
					err = errors.New("number not kept exact")
				}
				return err
			},
		},
		{
			name: "update twin with etag", method: "PATCH", path: "/twins/gw-01", ifMatch: `"` + "ZXRhZy0y" + `"`,
			setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			call: func(c *Client) error {
				tw, err := c.UpdateTwin(ctx, "gw-01", DesiredPatch(json.RawMessage(`{"interval":5}`)), "ZXRhZy0y")
				if err == nil && tw.Properties.Desired["interval"] != json.Number("5") {
					err = errors.New("desired not merged")
				}
				return err
			},
			checkBody: func(t *testing.T, body []byte) {
				if string(body) != `{"properties":{"desired":{"interval":5}}}` {
					t.Errorf("body %s", body)
				}
			},
		},
		{
			name: "replace twin", method: "PUT", path: "/twins/gw-01",
			setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			call: func(c *Client) error {
				_, err := c.ReplaceTwin(ctx, "gw-01", map[string]any{"tags": map[string]any{"site": "A"}}, "")
				return err
			},
		},
		{
			name: "invoke method", method: "POST", path: "/twins/gw-01/methods",
			setup: func(s *servicetest.Server) {
				s.AddDevice("gw-01")
				s.HandleMethods(func(id string, req iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError) {
					return iothub.MethodResult{Status: 200, Payload: req.Payload}, nil
				})
			},
			call: func(c *Client) error {
				res, err := c.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "reboot", Payload: json.RawMessage(`{"a":1}`),
					ResponseTimeoutInSeconds: 10})
				if err == nil && (res.Status != 200 || string(res.Payload) != `{"a":1}`) {
					err = errors.New("wrong result")
				}
				return err
			},
			checkBody: func(t *testing.T, body []byte) {
				if string(body) != `{"methodName":"reboot","payload":{"a":1},"responseTimeoutInSeconds":10}` {
					t.Errorf("body %s", body)
				}
			},
		},
		{
			name: "query", method: "POST", path: "/devices/query",
			setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			call: func(c *Client) error {
				items, err := c.Query(ctx, "SELECT * FROM devices")
				if err == nil && len(items) != 1 {
					err = errors.New("want one item")
				}
				return err
			},
			checkBody: func(t *testing.T, body []byte) {
				if string(body) != `{"query":"SELECT * FROM devices"}` {
					t.Errorf("body %s", body)
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, srv := newClient(t, nil)
			if tc.setup != nil {
				tc.setup(srv)
			}
			if err := tc.call(c); err != nil {
				t.Fatal(err)
			}
			r := lastRequest(t, srv)
			if r.Method != tc.method || r.Path != tc.path {
				t.Errorf("sent %s %s, want %s %s", r.Method, r.Path, tc.method, tc.path)
			}
			if v := r.Query["api-version"]; len(v) != 1 || v[0] != "2021-04-12" {
				t.Errorf("api-version %v", v)
			}
			if r.AuthError != "" {
				t.Errorf("SAS refused: %s", r.AuthError)
			}
			sas, err := iothub.ParseSAS(r.Header.Get("Authorization"))
			if err != nil || sas.KeyName != servicetest.Policy || !sas.Covers(servicetest.HostName) || sas.Verify(srv.Key) != nil {
				t.Errorf("token %q: %v", r.Header.Get("Authorization"), err)
			}
			if d := time.Until(sas.Expiry); d < 50*time.Minute || d > 61*time.Minute {
				t.Errorf("token expires in %s, want about an hour", d)
			}
			if got := r.Header.Get("If-Match"); got != tc.ifMatch {
				t.Errorf("If-Match %q, want %q", got, tc.ifMatch)
			}
			if r.Header.Get("User-Agent") != "service-test/1" {
				t.Errorf("User-Agent %q", r.Header.Get("User-Agent"))
			}
			if len(r.Body) > 0 && !strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
				t.Errorf("Content-Type %q", r.Header.Get("Content-Type"))
			}
			if tc.checkBody != nil {
				tc.checkBody(t, r.Body)
			}
		})
	}
}

// TestRetries: throttling and server errors are retried with backoff, a 504
// only when the call is idempotent, client errors never, and the retries are
// bounded.
func TestRetries(t *testing.T) {
	cases := []struct {
		name       string
		fault      servicetest.Fault
		call       func(context.Context, *Client) error
		wantTries  int
		wantStatus int // 0: success
		wantCode   int
	}{
		{"429 then ok", servicetest.Fault{Path: "/twins/gw-01", Count: 2, Status: 429, Code: 429001, Message: "throttled"},
			getTwin, 3, 0, 0},
		{"500 then ok", servicetest.Fault{Path: "/twins/gw-01", Count: 1, Status: 500, Code: 500001},
			getTwin, 2, 0, 0},
		{"504101 on GET retried", servicetest.Fault{Path: "/twins/gw-01", Count: 1, Status: 504, Code: 504101},
			getTwin, 2, 0, 0},
		{"504101 on method not retried", servicetest.Fault{Path: "/twins/gw-01/methods", Count: 1, Status: 504, Code: 504101, Message: "Timed out waiting for the response from device."},
			invoke, 1, 504, 504101},
		{"429 on method retried", servicetest.Fault{Path: "/twins/gw-01/methods", Count: 1, Status: 429, Code: 429001},
			invoke, 2, 0, 0},
		{"404103 not retried", servicetest.Fault{Path: "/twins/gw-01/methods", Count: 1, Status: 404, Code: 404103, Message: "device isn't online"},
			invoke, 1, 404, 404103},
		{"412 not retried", servicetest.Fault{Path: "/twins/gw-01", Count: 1, Status: 412, Code: 412001},
			getTwin, 1, 412, 412001},
		{"bounded", servicetest.Fault{Path: "/twins/gw-01", Count: 100, Status: 503, Code: 503001},
			getTwin, 5, 503, 503001},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, srv := newClient(t, nil)
			srv.AddDevice("gw-01")
			srv.HandleMethods(func(string, iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError) {
				return iothub.MethodResult{Status: 200, Payload: json.RawMessage(`null`)}, nil
			})
			srv.Fail(tc.fault)
			err := tc.call(t.Context(), c)
			if n := len(srv.Requests()); n != tc.wantTries {
				t.Errorf("%d requests, want %d", n, tc.wantTries)
			}
			if tc.wantStatus == 0 {
				if err != nil {
					t.Fatalf("err %v", err)
				}
				return
			}
			var se *iothub.ServiceError
			if !errors.As(err, &se) {
				t.Fatalf("err %v is not a *iothub.ServiceError", err)
			}
			if se.HTTPStatus != tc.wantStatus || se.Code != tc.wantCode || Code(err) != tc.wantCode || HTTPStatus(err) != tc.wantStatus {
				t.Errorf("got HTTP %d code %d, want %d %d", se.HTTPStatus, se.Code, tc.wantStatus, tc.wantCode)
			}
			if tc.fault.Message != "" && se.Message != tc.fault.Message {
				t.Errorf("message %q", se.Message)
			}
		})
	}
}

func getTwin(ctx context.Context, c *Client) error {
	_, err := c.GetTwin(ctx, "gw-01")
	return err
}

func invoke(ctx context.Context, c *Client) error {
	_, err := c.InvokeMethod(ctx, "gw-01", iothub.MethodRequest{MethodName: "firmwareUpdate"})
	return err
}

// TestRetryAfter: the hub's Retry-After stretches the wait beyond the
// client's own (tiny) backoff.
func TestRetryAfter(t *testing.T) {
	c, srv := newClient(t, nil)
	srv.AddDevice("gw-01")
	srv.Fail(servicetest.Fault{Path: "/twins/gw-01", Count: 1, Status: 429, Code: 429001, RetryAfter: 1})
	start := time.Now()
	if _, err := c.GetTwin(t.Context(), "gw-01"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < time.Second {
		t.Errorf("retried after %s, before the hub's Retry-After of 1s", d)
	}
}

// TestMethodTimeout: a caller's short HTTP client timeout does not cut off
// a method call that the hub is still allowed to wait for.
func TestMethodTimeout(t *testing.T) {
	_, srv := newClient(t, nil)
	hc := srv.Client()
	hc.Timeout = 200 * time.Millisecond
	cs, _ := iothub.ParseConnectionString(srv.ConnectionString())
	c2, err := New(cs, Options{HTTPClient: hc, BaseURL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.CloseIdleConnections()
	srv.AddDevice("gw-01")
	srv.HandleMethods(func(string, iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError) {
		time.Sleep(500 * time.Millisecond) // the device takes a while to answer
		return iothub.MethodResult{Status: 200, Payload: json.RawMessage(`{"ok":true}`)}, nil
	})
	res, err := c2.InvokeMethod(t.Context(), "gw-01", iothub.MethodRequest{MethodName: "slow", ResponseTimeoutInSeconds: 5})
	if err != nil || res.Status != 200 {
		t.Fatalf("res %+v err %v", res, err)
	}
}

func TestInvalidArguments(t *testing.T) {
	c, srv := newClient(t, nil)
	ctx := t.Context()
	cases := map[string]func() error{
		"empty id":      func() error { _, err := c.GetTwin(ctx, ""); return err },
		"id with slash": func() error { _, err := c.GetDevice(ctx, "a/b"); return err },
		"method name":   func() error { _, err := c.InvokeMethod(ctx, "d", iothub.MethodRequest{MethodName: "a/b"}); return err },
		"response timeout": func() error {
			_, err := c.InvokeMethod(ctx, "d", iothub.MethodRequest{MethodName: "m", ResponseTimeoutInSeconds: 301})
			return err
		},
		"connect timeout": func() error {
			_, err := c.InvokeMethod(ctx, "d", iothub.MethodRequest{MethodName: "m", ConnectTimeoutInSeconds: -1})
			return err
		},
		"payload not json": func() error {
			_, err := c.InvokeMethod(ctx, "d", iothub.MethodRequest{MethodName: "m", Payload: json.RawMessage(`{`)})
			return err
		},
		"short key":       func() error { _, err := c.CreateDeviceWithKeys(ctx, "d", "AAAA", "AAAA"); return err },
		"no thumbprint":   func() error { _, err := c.CreateX509Device(ctx, "d", "", ""); return err },
		"empty query":     func() error { _, err := c.Query(ctx, ""); return err },
		"query page size": func() error { _, _, err := c.QueryPage(ctx, "SELECT * FROM devices", 1001, ""); return err },
		"payload too large": func() error {
			_, err := c.InvokeMethod(ctx, "d", iothub.MethodRequest{MethodName: "m", Payload: json.RawMessage(`"` + strings.Repeat("x", 128*1024) + `"`)})
			return err
		},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			if err := f(); !errors.Is(err, ErrInvalid) {
				t.Errorf("err %v, want ErrInvalid", err)
			}
		})
	}
	if n := len(srv.Requests()); n != 0 {
		t.Errorf("%d requests sent for invalid arguments", n)
	}
}

func TestQueryPaging(t *testing.T) {
	c, srv := newClient(t, nil)
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		srv.AddDevice(id)
	}
	srv.LimitQueryPages(2)
	items, err := c.Query(t.Context(), "SELECT * FROM devices")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, it := range items {
		var tw iothub.Twin
		if err := json.Unmarshal(it, &tw); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, tw.DeviceID)
	}
	if strings.Join(ids, ",") != "a,b,c,d,e" {
		t.Errorf("ids %v", ids)
	}
	rs := srv.Requests()
	wantCont := []string{"", "2", "4"}
	if len(rs) != len(wantCont) {
		t.Fatalf("%d requests, want %d", len(rs), len(wantCont))
	}
	for i, r := range rs {
		if got := r.Header.Get("x-ms-continuation"); got != wantCont[i] {
			t.Errorf("page %d: continuation %q, want %q", i, got, wantCont[i])
		}
		if got := r.Header.Get("x-ms-max-item-count"); got != "1000" {
			t.Errorf("page %d: max item count %q", i, got)
		}
	}
}

// TestTokenCache: one token serves calls until 80% of its lifetime, then a
// new one is minted; a ready-made token from the connection string is used
// until it expires and then refused.
func TestTokenCache(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs, err := iothub.ParseConnectionString("HostName=h.azure-devices.net;SharedAccessKeyName=service;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
		if err != nil {
			t.Fatal(err)
		}
		ts, err := newTokenSource(cs, time.Hour, time.Now)
		if err != nil {
			t.Fatal(err)
		}
		first, _ := ts.Token()
		time.Sleep(47 * time.Minute)
		if again, _ := ts.Token(); again != first {
			t.Error("token renewed at 47 of 60 minutes")
		}
		time.Sleep(2 * time.Minute)
		renewed, _ := ts.Token()
		if renewed == first {
			t.Fatal("token not renewed at 49 of 60 minutes")
		}
		sas, err := iothub.ParseSAS(renewed)
		key, _ := cs.Key()
		if err != nil || sas.Verify(key) != nil || sas.KeyName != "service" || sas.Resource != "h.azure-devices.net" {
			t.Fatalf("renewed token %q: %v", renewed, err)
		}
		if !sas.Expiry.Equal(time.Now().Add(time.Hour).Truncate(time.Second)) {
			t.Errorf("expiry %s", sas.Expiry)
		}

		fixed := iothub.NewSAS("h.azure-devices.net", key, "service", time.Now().Add(10*time.Minute))
		// iothub.ParseConnectionString insists on a key for a policy, but a
		// caller may build the struct with a token handed out by a token service.
		fcs := iothub.ConnectionString{HostName: "h.azure-devices.net", SharedAccessKeyName: "service", SharedAccessSignature: fixed}
		fts, err := newTokenSource(fcs, time.Hour, time.Now)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := fts.Token(); err != nil || got != fixed {
			t.Errorf("fixed token: %q %v", got, err)
		}
		time.Sleep(11 * time.Minute)
		if _, err := fts.Token(); !errors.Is(err, iothub.ErrSASExpired) {
			t.Errorf("expired fixed token: err %v", err)
		}
	})
}

func TestDeviceConnectionString(t *testing.T) {
	key := "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	cases := []struct {
		name string
		d    iothub.Device
		want string
	}{
		{"sas", iothub.Device{DeviceID: "gw-01", Authentication: iothub.Authentication{Type: "sas", SymmetricKey: &iothub.SymmetricKey{PrimaryKey: key, SecondaryKey: "x"}}},
			"HostName=h.azure-devices.net;DeviceId=gw-01;SharedAccessKey=" + key},
		{"x509", iothub.Device{DeviceID: "cam", Authentication: iothub.Authentication{Type: "selfSigned"}},
			"HostName=h.azure-devices.net;DeviceId=cam;x509=true"},
		{"no key", iothub.Device{DeviceID: "cam", Authentication: iothub.Authentication{Type: "sas"}}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DeviceConnectionString("h.azure-devices.net", tc.d)
			if tc.want == "" {
				if err == nil {
					t.Fatalf("got %q, want an error", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestAuthFailureIsNotRetried(t *testing.T) {
	_, srv := newClient(t, nil)
	// A client signing with another key: the hub refuses it with 401.
	cs, _ := iothub.ParseConnectionString("HostName=" + servicetest.HostName + ";SharedAccessKeyName=iothubowner;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
	bad, err := New(cs, Options{HTTPClient: srv.Client(), BaseURL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.GetTwin(t.Context(), "gw-01")
	if HTTPStatus(err) != http.StatusUnauthorized {
		t.Fatalf("err %v", err)
	}
	if n := len(srv.Requests()); n != 1 {
		t.Errorf("%d requests", n)
	}
	bad.CloseIdleConnections()
}

// TestUntrustedCertificateIsNotRetried: a TLS verification failure is
// permanent, so the call fails at once instead of backing off.
func TestUntrustedCertificateIsNotRetried(t *testing.T) {
	srv := servicetest.New()
	defer srv.Close()
	cs, _ := iothub.ParseConnectionString(srv.ConnectionString())
	core, logs := observer.New(zap.DebugLevel)
	c, err := New(cs, Options{BaseURL: srv.URL, Log: zap.New(core)}) // system roots only
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	_, err = c.GetTwin(t.Context(), "gw-01")
	var cv *tls.CertificateVerificationError
	if !errors.As(err, &cv) {
		t.Fatalf("err %v, want a certificate verification error", err)
	}
	if n := logs.FilterMessage("retrying service call").Len(); n != 0 {
		t.Errorf("retried %d times", n)
	}
}

// A redirect is never followed: the service token must not travel on to
// another place, least of all in clear text.
func TestRedirectNotFollowed(t *testing.T) {
	var leaked atomic.Int32
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			leaked.Add(1)
		}
		w.WriteHeader(200)
	}))
	defer plain.Close()
	redirecting := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, plain.URL+r.URL.Path, http.StatusFound)
	}))
	defer redirecting.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: redirecting.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	cs, err := iothub.ParseConnectionString("HostName=hub.example.net;SharedAccessKeyName=iothubowner;SharedAccessKey=" + base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef")))
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(cs, Options{CAFile: ca, BaseURL: redirecting.URL, Retry: RetryPolicy{MaxTries: 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	_, err = c.GetTwin(t.Context(), "gw-01")
	if err == nil || !strings.Contains(err.Error(), "redirect") {
		t.Fatalf("GetTwin through a redirect: %v, want an error naming the redirect", err)
	}
	if n := leaked.Load(); n != 0 {
		t.Fatalf("the token reached the redirect target %d times", n)
	}
}
