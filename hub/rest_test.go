package hub

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

func TestRegistry(t *testing.T) {
	h := startHub(t)
	svc := newService(t, h)

	st, b, resp := svc.do("PUT", "/devices/gw-01", `{"deviceId":"gw-01"}`)
	if st != 200 {
		t.Fatalf("create: %d %s", st, b)
	}
	var dev iothub.Device
	if err := json.Unmarshal(b, &dev); err != nil {
		t.Fatal(err)
	}
	if dev.Authentication.Type != "sas" || !validKey(dev.Authentication.SymmetricKey.PrimaryKey) ||
		!validKey(dev.Authentication.SymmetricKey.SecondaryKey) || dev.Status != "enabled" || dev.ETag == "" ||
		dev.GenerationID == "" || dev.ConnectionState != "Disconnected" {
		t.Fatalf("created device %s", b)
	}
	if resp.Header.Get("ETag") != `"`+dev.ETag+`"` {
		t.Fatalf("ETag header %q", resp.Header.Get("ETag"))
	}
	// The generated key works for MQTT.
	key, _ := (iothub.ConnectionString{SharedAccessKey: dev.Authentication.SymmetricKey.SecondaryKey}).Key()
	d := connect(t, h, "gw-01", key)
	// The session is registered just after the CONNACK is written, so the
	// state may lag the client by a moment (IoT Hub's does too).
	testutil.Eventually(t, waitLong, "connectionState Connected", func() bool {
		st, b, _ := svc.do("GET", "/devices/gw-01", nil)
		return st == 200 && strings.Contains(string(b), `"connectionState":"Connected"`)
	})

	// Create again: conflict. Update needs If-Match.
	st, b, _ = svc.do("PUT", "/devices/gw-01", `{"deviceId":"gw-01"}`)
	wantError(t, st, b, 409, iothub.CodeDeviceAlreadyExists)
	st, b, _ = svc.do("PUT", "/devices/gw-01", `{"deviceId":"gw-01","status":"disabled"}`, "If-Match", `"bm9wZQ=="`)
	wantError(t, st, b, 412, iothub.CodePreconditionFailed)
	st, b, _ = svc.do("PUT", "/devices/gw-01", `{"deviceId":"gw-01","status":"disabled"}`, "If-Match", `"`+dev.ETag+`"`)
	if st != 200 || !strings.Contains(string(b), `"status":"disabled"`) {
		t.Fatalf("disable: %d %s", st, b)
	}
	// Disabling closes the connection; keys are kept.
	d.waitLost()
	var upd iothub.Device
	_ = json.Unmarshal(b, &upd)
	if upd.Authentication.SymmetricKey.PrimaryKey != dev.Authentication.SymmetricKey.PrimaryKey || upd.ETag == dev.ETag {
		t.Fatalf("update changed keys or kept etag: %s", b)
	}
	// Given keys are used; bad ones are refused.
	st, b, _ = svc.do("PUT", "/devices/k1", `{"deviceId":"k1","authentication":{"type":"sas","symmetricKey":{"primaryKey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","secondaryKey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}}}`)
	if st != 200 || !strings.Contains(string(b), "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=") {
		t.Fatalf("create with keys: %d %s", st, b)
	}
	for _, tc := range []struct{ name, path, body string }{
		{"bad key", "/devices/k2", `{"authentication":{"type":"sas","symmetricKey":{"primaryKey":"!!"}}}`},
		{"bad thumbprint", "/devices/k3", `{"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint":"xyz"}}}`},
		{"id mismatch", "/devices/k4", `{"deviceId":"other"}`},
		{"bad id", "/devices/a%20b", `{}`},
		{"bad status", "/devices/k5", `{"status":"sleepy"}`},
		{"CA auth", "/devices/k6", `{"authentication":{"type":"certificateAuthority"}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, b, _ := svc.do("PUT", tc.path, tc.body)
			wantError(t, st, b, 400, iothub.CodeArgumentInvalid)
		})
	}

	st, b, _ = svc.do("GET", "/devices", nil)
	var list []iothub.Device
	if st != 200 || json.Unmarshal(b, &list) != nil || len(list) != 2 || list[0].DeviceID != "gw-01" || list[1].DeviceID != "k1" {
		t.Fatalf("list: %d %s", st, b)
	}

	st, b, _ = svc.do("DELETE", "/devices/k1", nil, "If-Match", `"nope"`)
	wantError(t, st, b, 412, iothub.CodePreconditionFailed)
	if st, b, _ := svc.do("DELETE", "/devices/k1", nil, "If-Match", `"*"`); st != 204 {
		t.Fatalf("delete: %d %s", st, b)
	}
	st, b, _ = svc.do("GET", "/devices/k1", nil)
	wantError(t, st, b, 404, iothub.CodeDeviceNotFound)
	st, b, _ = svc.do("DELETE", "/devices/k1", nil)
	wantError(t, st, b, 404, iothub.CodeDeviceNotFound)
	if _, err := h.CreateDevice("gw-01"); err == nil {
		t.Fatal("CreateDevice of an existing id succeeded")
	}
}

func TestServiceAuth(t *testing.T) {
	h := startHub(t)
	svc := newService(t, h)
	cs, _ := iothub.ParseConnectionString(h.ServiceConnectionString())
	key, _ := cs.Key()
	hour := time.Now().Add(time.Hour)
	for _, tc := range []struct{ name, token string }{
		{"no token", ""},
		{"garbage", "Bearer abc"},
		{"wrong key", iothub.NewSAS(h.HostName(), make([]byte, 32), ServicePolicy, hour)},
		{"wrong policy", iothub.NewSAS(h.HostName(), key, "service", hour)},
		{"no policy", iothub.NewSAS(h.HostName(), key, "", hour)},
		{"wrong host", iothub.NewSAS("other.example", key, ServicePolicy, hour)},
		{"expired", iothub.NewSAS(h.HostName(), key, ServicePolicy, time.Now().Add(-time.Second))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := *svc
			s.token = tc.token
			st, b, _ := s.do("GET", "/devices", nil)
			wantError(t, st, b, 401, codeUnauthorizedAccess)
		})
	}
	if st, _, _ := svc.do("GET", "/devices", nil); st != 200 {
		t.Fatalf("good token: %d", st)
	}
}

func TestQueryEndpoint(t *testing.T) {
	h := startHub(t)
	svc := newService(t, h)
	for _, id := range []string{"a1", "a2", "b1"} {
		key := addDevice(t, h, id)
		if id != "b1" {
			d := connect(t, h, id, key)
			d.sub(iothub.TwinResponseFilter)
			d.twinRequest(iothub.TwinReportedTopic("1"), []byte(`{"firmware":{"currentVersion":"`+id+`"},"firmwareStatus":"completed"}`))
		}
	}
	svc.do("PATCH", "/twins/a1", `{"tags":{"site":"lab","n":3}}`)
	svc.do("PATCH", "/twins/b1", `{"tags":{"site":"field","n":7}}`)
	for _, tc := range []struct {
		query string
		want  string
	}{
		{"SELECT * FROM devices", "a1,a2,b1"},
		{"select * from devices where tags.site = 'lab'", "a1"},
		{"SELECT * FROM devices WHERE properties.reported.firmwareStatus = 'completed' AND is_defined(tags.site)", "a1"},
		{"SELECT * FROM devices WHERE tags.n > 5 OR deviceId = 'a2'", "a2,b1"},
		{"SELECT * FROM devices WHERE NOT is_defined(properties.reported.firmware)", "b1"},
		{"SELECT * FROM devices WHERE properties.reported.firmware.currentVersion = 'a2'", "a2"},
		{"SELECT * FROM devices WHERE connectionState = 'Connected'", "a1,a2"},
		{"SELECT TOP 1 * FROM devices", "a1"},
	} {
		t.Run(tc.query, func(t *testing.T) {
			st, b, _ := svc.do("POST", "/devices/query", map[string]string{"query": tc.query})
			var twins []iothub.Twin
			if st != 200 || json.Unmarshal(b, &twins) != nil {
				t.Fatalf("%d %s", st, b)
			}
			var ids []string
			for _, tw := range twins {
				ids = append(ids, tw.DeviceID)
			}
			if got := strings.Join(ids, ","); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
	// Paging.
	st, b, resp := svc.do("POST", "/devices/query", `{"query":"SELECT * FROM devices"}`, "x-ms-max-item-count", "2")
	cont := resp.Header.Get("x-ms-continuation")
	if st != 200 || cont == "" || strings.Count(string(b), `"deviceId"`) != 2 {
		t.Fatalf("page 1: %d %s cont %q", st, b, cont)
	}
	st, b, resp = svc.do("POST", "/devices/query", `{"query":"SELECT * FROM devices"}`, "x-ms-max-item-count", "2", "x-ms-continuation", cont)
	if st != 200 || resp.Header.Get("x-ms-continuation") != "" || !strings.Contains(string(b), `"deviceId":"b1"`) {
		t.Fatalf("page 2: %d %s", st, b)
	}
	st, b, _ = svc.do("POST", "/devices/query", `{"query":"SELECT * FROM devices WHERE"}`)
	wantError(t, st, b, 400, iothub.CodeArgumentInvalid)
}

func TestFilesServed(t *testing.T) {
	dir := t.TempDir()
	img := []byte(strings.Repeat("0123456789", 1000))
	if err := os.WriteFile(filepath.Join(dir, "fw-1.3.0.bin"), img, 0o644); err != nil {
		t.Fatal(err)
	}
	h := startHub(t, func(c *Config) { c.FilesDir = dir })
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost"}}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: waitLong}
	req, _ := http.NewRequestWithContext(context.Background(), "GET", "https://"+h.HTTPSAddr()+"/files/fw-1.3.0.bin", nil)
	req.Header.Set("Range", "bytes=9990-")
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 206 || string(b) != "0123456789" || resp.Header.Get("Content-Range") != "bytes 9990-9999/10000" {
		t.Fatalf("range GET: %d %q %q", resp.StatusCode, b, resp.Header.Get("Content-Range"))
	}
	resp, err = cl.Get("https://" + h.HTTPSAddr() + "/files/missing.bin")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("missing file: %d", resp.StatusCode)
	}
}

func TestRestartKeepsState(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}
	h1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h1.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	key := addDevice(t, h1, "gw-01")
	d := connect(t, h1, "gw-01", key)
	d.sub(iothub.TwinResponseFilter)
	for i := range 3 {
		d.twinRequest(iothub.TwinReportedTopic(string(rune('a'+i))), []byte(`{"step":`+string(rune('0'+i))+`}`))
	}
	if _, err := h1.UpdateDesired("gw-01", map[string]any{"interval": 30}); err != nil {
		t.Fatal(err)
	}
	before, _ := h1.Twin("gw-01")
	svcBefore, caBefore := h1.ServiceConnectionString(), mustRead(t, h1.CAFile())
	d.c.Disconnect(50)
	if err := h1.Close(); err != nil {
		t.Fatal(err)
	}

	h2 := startHubWith(t, cfg)
	if h2.ServiceConnectionString() != svcBefore || mustRead(t, h2.CAFile()) != caBefore {
		t.Fatal("restart changed the service connection string or the CA")
	}
	after, err := h2.Twin("gw-01")
	if err != nil {
		t.Fatal(err)
	}
	if after.Version != before.Version || after.ETag != before.ETag ||
		after.Properties.Reported["$version"] != int64(4) || after.Properties.Desired["$version"] != int64(2) ||
		after.Properties.Reported["step"].(json.Number) != "2" || after.Properties.Desired["interval"].(json.Number) != "30" {
		t.Fatalf("twin after restart %+v, before %+v", after, before)
	}
	// The device reconnects with the same key and continues the versions.
	d2 := connect(t, h2, "gw-01", key)
	d2.sub(iothub.TwinResponseFilter)
	rt, _ := d2.twinRequest(iothub.TwinReportedTopic("z"), []byte(`{"step":3}`))
	if rt.Status != 204 || rt.Version != 5 {
		t.Fatalf("patch after restart: %d v%d", rt.Status, rt.Version)
	}
	// Files are private.
	for _, f := range []string{ServiceConnectionStringFile, caKeyFile, serverKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v mode %v", f, err, st.Mode())
		}
	}
}

func mustRead(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// rawRequest opens an HTTP/1.1 connection to the hub's REST API and sends
// head (request line and headers) and then body, which may be shorter than
// the Content-Length it announces.
func rawRequest(t *testing.T, h *Hub, head, body string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c := tls.Client(dialFrom(t, "", h.HTTPSAddr()), clientTLS(h))
	_ = c.SetDeadline(time.Now().Add(waitLong))
	if _, err := io.WriteString(c, head+"\r\n"+body); err != nil {
		t.Fatal(err)
	}
	return c, bufio.NewReader(c)
}

// TestUnauthenticatedBodyNotRead: a request without a valid token is
// answered 401 from its headers, without waiting for its body, and its
// connection is closed, so a client cannot hold it by trickling a body.
func TestUnauthenticatedBodyNotRead(t *testing.T) {
	const readTimeout = time.Minute
	h := startHub(t, func(c *Config) { c.ReadTimeout = readTimeout })
	cs, _ := iothub.ParseConnectionString(h.ServiceConnectionString())
	key, _ := cs.Key()
	wrong := iothub.NewSAS(h.HostName(), make([]byte, 32), ServicePolicy, time.Now().Add(time.Hour))
	for _, tc := range []struct{ name, auth, extra string }{
		{"no token", "", ""},
		{"wrong key", "Authorization: " + wrong + "\r\n", ""},
		{"expect 100-continue", "", "Expect: 100-continue\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			c, br := rawRequest(t, h, "PUT /devices/gw-01?api-version="+iothub.APIVersion+" HTTP/1.1\r\nHost: localhost\r\n"+
				"Content-Type: application/json\r\nContent-Length: 100000\r\n"+tc.auth+tc.extra, "{")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			wantError(t, resp.StatusCode, b, 401, codeUnauthorizedAccess)
			if !resp.Close {
				t.Error("401 does not say Connection: close")
			}
			waitClosed(t, c)
			if el := time.Since(start); el > readTimeout/4 {
				t.Fatalf("connection closed after %v; the read timeout is %v", el, readTimeout)
			}
		})
	}
	t.Run("HTTP/2", func(t *testing.T) {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost"}, ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		pr, pw := io.Pipe()
		defer pw.Close()
		go func() { _, _ = pw.Write([]byte("{")) }()
		req, _ := http.NewRequest("PUT", "https://"+h.HTTPSAddr()+"/devices/gw-01?api-version="+iothub.APIVersion, pr)
		req.ContentLength = 100000
		start := time.Now()
		resp, err := (&http.Client{Transport: tr, Timeout: waitLong}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Fatalf("spoke %s, want HTTP/2", resp.Proto)
		}
		wantError(t, resp.StatusCode, b, 401, codeUnauthorizedAccess)
		if el := time.Since(start); el > readTimeout/4 {
			t.Fatalf("answered after %v", el)
		}
	})
	// A client with a token is still served, body and all.
	tok := iothub.NewSAS(h.HostName(), key, ServicePolicy, time.Now().Add(time.Hour))
	_, br := rawRequest(t, h, "PUT /devices/gw-01?api-version="+iothub.APIVersion+" HTTP/1.1\r\nHost: localhost\r\n"+
		"Content-Type: application/json\r\nContent-Length: 2\r\nAuthorization: "+tok+"\r\n", "{}")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("authorized PUT: %d", resp.StatusCode)
	}
}

// TestSlowBodyTimesOut: even an authorized client has Config.ReadTimeout
// to send its request.
func TestSlowBodyTimesOut(t *testing.T) {
	const readTimeout = time.Second
	h := startHub(t, func(c *Config) { c.ReadTimeout = readTimeout })
	cs, _ := iothub.ParseConnectionString(h.ServiceConnectionString())
	key, _ := cs.Key()
	tok := iothub.NewSAS(h.HostName(), key, ServicePolicy, time.Now().Add(time.Hour))
	start := time.Now()
	c, _ := rawRequest(t, h, "PUT /devices/gw-01?api-version="+iothub.APIVersion+" HTTP/1.1\r\nHost: localhost\r\n"+
		"Content-Type: application/json\r\nContent-Length: 100000\r\nAuthorization: "+tok+"\r\n", "{")
	waitClosed(t, c)
	if el := time.Since(start); el < readTimeout {
		t.Fatalf("closed after %v, before the read timeout", el)
	}
	if h.store.get("gw-01") != nil {
		t.Fatal("a device was created from a cut-off body")
	}
}

// TestFilesConfined: /files/ serves regular files inside the folder and
// answers 404 for everything else — symlinks out of it (to the hub's own
// service connection string, to /etc/passwd), directories, dotfiles, FIFOs.
func TestFilesConfined(t *testing.T) {
	dir := t.TempDir()
	outside := t.TempDir()
	write := func(p, data string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, name string) {
		t.Helper()
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, "fw.bin"), "image")
	write(filepath.Join(dir, "sub", "inner.bin"), "inner")
	write(filepath.Join(dir, ".hidden"), "secret")
	write(filepath.Join(dir, ".git", "config"), "secret")
	write(filepath.Join(dir, "sub", ".env"), "secret")
	write(filepath.Join(outside, "secret.txt"), "secret")
	if err := syscall.Mkfifo(filepath.Join(dir, "pipe"), 0o644); err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	link(filepath.Join(state, ServiceConnectionStringFile), "service")
	link("../"+filepath.Base(outside)+"/secret.txt", "relative-out")
	link(filepath.Join(outside, "secret.txt"), "absolute-out")
	link("/etc/passwd", "passwd")
	link(outside, "dir-out")
	link("fw.bin", "fw-latest.bin")
	link("sub", "sub-link")
	h := startHub(t, func(c *Config) { c.StateDir = state; c.FilesDir = dir })
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost"}}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: waitLong,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(method, p string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "https://"+h.HTTPSAddr()+p, nil)
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, p, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tc := range []struct {
		path   string
		status int
		body   string
	}{
		{"/files/fw.bin", 200, "image"},
		{"/files/sub/inner.bin", 200, "inner"},
		{"/files/fw-latest.bin", 200, "image"},      // a link that stays inside
		{"/files/sub-link/inner.bin", 200, "inner"}, // through a directory link inside
		{"/files/service", 404, ""},
		{"/files/relative-out", 404, ""},
		{"/files/absolute-out", 404, ""},
		{"/files/passwd", 404, ""},
		{"/files/dir-out/secret.txt", 404, ""},
		{"/files/.hidden", 404, ""},
		{"/files/.git/config", 404, ""},
		{"/files/sub/.env", 404, ""},
		{"/files/%2e%2e/" + filepath.Base(outside) + "/secret.txt", 404, ""},
		{"/files/", 404, ""},
		{"/files/sub", 404, ""},
		{"/files/sub/", 404, ""},
		{"/files/pipe", 404, ""},
		{"/files/missing.bin", 404, ""},
	} {
		t.Run(tc.path, func(t *testing.T) {
			st, body := get("GET", tc.path)
			if st != tc.status || (tc.status == 200 && body != tc.body) {
				t.Fatalf("GET: %d %q, want %d %q", st, body, tc.status, tc.body)
			}
			if strings.Contains(body, "secret") || strings.Contains(body, "SharedAccessKey") || strings.Contains(body, "root:") ||
				strings.Contains(body, "<a href") {
				t.Fatalf("GET leaked: %q", body)
			}
			if st, _ := get("HEAD", tc.path); st != tc.status {
				t.Fatalf("HEAD: %d, want %d", st, tc.status)
			}
		})
	}
}
