package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
	"github.com/gwagent/gwagent/iothub/service/servicetest"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files under testdata/")

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type env struct {
	srv      *servicetest.Server
	cs       string // service connection string
	dpsCS    string // DPS service connection string
	ca       string
	endpoint string
	tty      bool
}

func newEnv(t *testing.T) *env {
	t.Helper()
	srv := servicetest.New()
	t.Cleanup(srv.Close)
	ca, err := srv.WriteCAFile(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &env{srv: srv, cs: srv.ConnectionString(), ca: ca, endpoint: srv.URL}
}

type result struct {
	stdout, stderr string
	code           int
}

// gwctl runs the command tree in-process with the connection string and CA
// taken from the environment, as an operator's shell would provide them.
func (e *env) gwctl(t *testing.T, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	vars := map[string]string{"IOTHUB_CONNECTION_STRING": e.cs, "GWCTL_CA_FILE": e.ca, "IOTHUB_DPS_CONNECTION_STRING": e.dpsCS}
	a := &app{stdout: &out, stderr: &errb, getenv: func(k string) string { return vars[k] },
		isTerminal: func() bool { return e.tty }, loc: time.UTC}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	code := a.run(ctx, append([]string{"--endpoint", e.endpoint}, args...))
	return result{out.String(), errb.String(), code}
}

func okMethods(srv *servicetest.Server, status int, payload string) {
	srv.HandleMethods(func(string, iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError) {
		return iothub.MethodResult{Status: status, Payload: json.RawMessage(payload)}, nil
	})
}

func TestCommands(t *testing.T) {
	cases := []struct {
		name       string
		setup      func(*servicetest.Server)
		args       []string
		wantCode   int
		wantOut    []string // substrings of stdout
		wantErr    string   // substring of stderr
		wantMethod string   // body of the last request
	}{
		{name: "device add", args: []string{"device", "add", "gw-01"},
			wantOut: []string{"HostName=fake-hub.azure-devices.net;DeviceId=gw-01;SharedAccessKey="}},
		{name: "device add json", args: []string{"-o", "json", "device", "add", "gw-01"},
			wantOut: []string{`"deviceId": "gw-01"`, `"connectionString": "HostName=fake-hub.azure-devices.net;DeviceId=gw-01;SharedAccessKey=`}},
		{name: "device add x509", args: []string{"device", "add", "cam", "--x509-thumbprint", strings.Repeat("ab", 20)},
			wantOut: []string{"HostName=fake-hub.azure-devices.net;DeviceId=cam;x509=true"}},
		{name: "device add twice", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") }, args: []string{"device", "add", "gw-01"},
			wantCode: 1, wantErr: "device gw-01 already exists (409001)"},
		{name: "device show", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") }, args: []string{"device", "show", "gw-01"},
			wantOut: []string{"deviceId:", "gw-01", "authentication:", "sas", "connectionString:"}},
		{name: "device show missing", args: []string{"device", "show", "nope"},
			wantCode: 1, wantErr: "device nope is not registered on the hub (404001)"},
		{name: "device list", setup: func(s *servicetest.Server) { s.AddDevice("a-1"); s.AddDevice("b-2") }, args: []string{"device", "list"},
			wantOut: []string{"DEVICE", "a-1", "b-2", "Disconnected"}},
		{name: "device delete", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") }, args: []string{"device", "delete", "gw-01"},
			wantOut: []string{"deleted gw-01"}},
		{name: "twin show", setup: func(s *servicetest.Server) {
			s.AddDevice("gw-01")
			s.SetReported("gw-01", map[string]any{"firmwareStatus": "standBy"})
		}, args: []string{"twin", "show", "gw-01"},
			wantOut: []string{"{\n  \"", `  "deviceId": "gw-01",`, `"firmwareStatus": "standBy"`}},
		{name: "twin set", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			args: []string{"twin", "set", "gw-01", "--desired", `{"telemetryInterval":5}`}, wantOut: []string{"desired properties of gw-01 updated"},
			wantMethod: `{"properties":{"desired":{"telemetryInterval":5}}}`},
		{name: "twin set stale etag", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			args: []string{"twin", "set", "gw-01", "--desired", `{"a":1}`, "--etag", "old"}, wantCode: 1, wantErr: "(412001)"},
		{name: "twin set not an object", args: []string{"twin", "set", "gw-01", "--desired", `[1]`}, wantCode: 64, wantErr: "--desired must be a JSON object"},
		{name: "method offline", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") }, args: []string{"method", "invoke", "gw-01", "reboot"},
			wantCode: 1, wantErr: "device gw-01 is not online (404103)"},
		{name: "method ok", setup: func(s *servicetest.Server) { s.AddDevice("gw-01"); okMethods(s, 200, `{"rebooting":true}`) },
			args:    []string{"method", "invoke", "gw-01", "reboot", "--payload", `{"delay":1}`, "--timeout", "10s", "--connect-timeout", "5s"},
			wantOut: []string{`"status": 200`, `"rebooting": true`}, wantMethod: `{"methodName":"reboot","payload":{"delay":1},"responseTimeoutInSeconds":10,"connectTimeoutInSeconds":5}`},
		{name: "method device error", setup: func(s *servicetest.Server) {
			s.AddDevice("gw-01")
			okMethods(s, 404, `{"error":"unknown method frob"}`)
		},
			args: []string{"method", "invoke", "gw-01", "frob"}, wantCode: 1, wantOut: []string{`"status": 404`}, wantErr: "answered frob with status 404"},
		{name: "method bad timeout", args: []string{"method", "invoke", "gw-01", "reboot", "--timeout", "1s"}, wantCode: 64, wantErr: "--timeout must be between 5s and 300s"},
		{name: "method bad payload", args: []string{"method", "invoke", "gw-01", "reboot", "--payload", "{"}, wantCode: 64, wantErr: "--payload is not valid JSON"},
		{name: "missing argument", args: []string{"twin", "show"}, wantCode: 64, wantErr: "want 1 argument(s): ID"},
		{name: "unknown flag", args: []string{"twin", "show", "x", "--frob"}, wantCode: 64, wantErr: "unknown flag: --frob"},
		{name: "bad output", args: []string{"-o", "yaml", "device", "list"}, wantCode: 64, wantErr: "--output must be text or json"},
		{name: "device connection string", args: []string{"--connection-string", "HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==", "device", "list"},
			wantCode: 64, wantErr: "gwctl needs a service one"},
		{name: "untrusted certificate", args: []string{"--ca-file", "/etc/ssl/certs/ca-certificates.crt", "device", "list"},
			wantCode: 1, wantErr: "cannot verify the hub's TLS certificate"},
		{name: "query", setup: func(s *servicetest.Server) { s.AddDevice("a-1"); s.AddDevice("b-2") }, args: []string{"query", "SELECT * FROM devices"},
			wantOut: []string{`"deviceId": "a-1"`, `"deviceId": "b-2"`}},
		{name: "update without watch", setup: func(s *servicetest.Server) {
			s.AddDevice("gw-01")
			okMethods(s, 200, `{"updateId":"u-7","status":"accepted"}`)
		}, args: []string{"update", "gw-01", "--uri", "https://example.com/fw.img", "--version", "1.3.0", "--sha256", strings.Repeat("0f", 32), "--size", "1024"},
			wantOut:    []string{"u-7\n"},
			wantMethod: `{"methodName":"firmwareUpdate","payload":{"fwPackageUri":"https://example.com/fw.img","version":"1.3.0","sha256":"` + strings.Repeat("0f", 32) + `","size":1024},"responseTimeoutInSeconds":30}`},
		{name: "update tutorial payload", setup: func(s *servicetest.Server) {
			s.AddDevice("gw-01")
			okMethods(s, 200, `{"Response":"Firmware update started"}`)
		}, args: []string{"update", "gw-01", "--uri", "https://example.com/fw.img"},
			wantOut:    []string{`{"Response":"Firmware update started"}`},
			wantMethod: `{"methodName":"firmwareUpdate","payload":{"fwPackageUri":"https://example.com/fw.img"},"responseTimeoutInSeconds":30}`},
		{name: "update busy", setup: func(s *servicetest.Server) {
			s.AddDevice("gw-01")
			okMethods(s, 409, `{"error":"busy","updateId":"u-6"}`)
		}, args: []string{"update", "gw-01", "--uri", "https://example.com/fw.img"}, wantCode: 1, wantErr: "device gw-01 is busy with update u-6 (409)"},
		{name: "update refused", setup: func(s *servicetest.Server) {
			s.AddDevice("gw-01")
			okMethods(s, 400, `{"error":"fwPackageUri: scheme ftp is not supported"}`)
		}, args: []string{"update", "gw-01", "--uri", "ftp://example.com/fw.img"}, wantCode: 1, wantErr: "device gw-01 refused the update (400): fwPackageUri: scheme ftp"},
		{name: "update offline", setup: func(s *servicetest.Server) { s.AddDevice("gw-01") },
			args: []string{"update", "gw-01", "--uri", "https://example.com/fw.img", "--watch"}, wantCode: 1, wantErr: "device gw-01 is not online (404103)"},
		{name: "update bad sha", args: []string{"update", "gw-01", "--uri", "https://example.com/fw.img", "--sha256", "abc"}, wantCode: 64, wantErr: "--sha256 must be 64 hex digits"},
		{name: "update relative uri", args: []string{"update", "gw-01", "--uri", "fw.img"}, wantCode: 64, wantErr: "--uri must be an absolute URL"},
		{name: "update no uri", args: []string{"update", "gw-01"}, wantCode: 64, wantErr: `required flag(s) "uri" not set`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			if tc.setup != nil {
				tc.setup(e.srv)
			}
			r := e.gwctl(t, tc.args...)
			if r.code != tc.wantCode {
				t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", r.code, tc.wantCode, r.stdout, r.stderr)
			}
			for _, s := range tc.wantOut {
				if !strings.Contains(r.stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, r.stdout)
				}
			}
			if tc.wantErr != "" && !strings.Contains(r.stderr, tc.wantErr) {
				t.Errorf("stderr lacks %q:\n%s", tc.wantErr, r.stderr)
			}
			if tc.wantErr == "" && r.stderr != "" {
				t.Errorf("unexpected stderr: %s", r.stderr)
			}
			if tc.wantMethod != "" {
				rs := e.srv.Requests()
				if got := string(rs[len(rs)-1].Body); got != tc.wantMethod {
					t.Errorf("request body\n%s\nwant\n%s", got, tc.wantMethod)
				}
			}
		})
	}
}

// TestDeviceAddConnectionString: the printed string is the registry's own
// key, usable by a device.
func TestDeviceAddConnectionString(t *testing.T) {
	e := newEnv(t)
	r := e.gwctl(t, "device", "add", "gw-01")
	cs, err := iothub.ParseConnectionString(strings.TrimSpace(r.stdout))
	if err != nil || cs.IsService() || cs.DeviceID != "gw-01" {
		t.Fatalf("%q: %v", r.stdout, err)
	}
	r = e.gwctl(t, "-o", "json", "device", "show", "gw-01")
	var d iothub.Device
	if err := json.Unmarshal([]byte(r.stdout), &d); err != nil {
		t.Fatal(err)
	}
	if d.Authentication.SymmetricKey == nil || d.Authentication.SymmetricKey.PrimaryKey != cs.SharedAccessKey {
		t.Errorf("printed key %q is not the registry's primary key %+v", cs.SharedAccessKey, d.Authentication)
	}
}

func fw(status, updateID string, bytes, total int64, at string) map[string]any {
	detail := map[string]any{"status": status, "updateId": updateID, "targetVersion": "1.3.0", "currentVersion": "1.2.0",
		"bytes": bytes, "totalBytes": total, "updatedAt": at, "error": nil}
	if total > 0 {
		detail["percent"] = bytes * 100 / total
	}
	r := map[string]any{"firmwareStatus": status, "firmware": detail, "logTime": "2026-11-26T11:59:00Z"}
	switch status {
	case service.StatusDownloading:
		r["downloadComplete"] = "2026-11-26T12:00:01Z"
	case service.StatusApplying:
		r["startedApplyingImage"] = at
	case service.StatusCompleted:
		r["lastFirmwareUpdate"] = at
		detail["currentVersion"] = "1.3.0"
	case service.StatusFailed, service.StatusRolledBack:
		detail["error"] = map[string]any{"code": "sha256Mismatch", "message": "image digest does not match"}
	}
	return r
}

// scriptUpdate makes firmwareUpdate accept update u-2 and the twin then go
// through script, one state per read.
func scriptUpdate(s *servicetest.Server, script ...map[string]any) {
	s.AddDevice("gw-01")
	// The twin still holds the previous update's final state.
	s.SetReported("gw-01", fw(service.StatusCompleted, "u-1", 0, 0, "2026-11-25T09:00:00Z"))
	s.HandleMethods(func(id string, req iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError) {
		s.ScriptReported(id, script...)
		return iothub.MethodResult{Status: 200, Payload: json.RawMessage(`{"updateId":"u-2","status":"accepted"}`)}, nil
	})
}

func TestUpdateWatch(t *testing.T) {
	const at = "2026-11-26T12:00:0"
	cases := []struct {
		name     string
		script   []map[string]any
		fault    *servicetest.Fault
		extra    []string
		wantCode int
		golden   string
		wantErr  string
	}{
		{
			name: "completed",
			script: []map[string]any{
				fw(service.StatusCompleted, "u-1", 0, 0, "2026-11-25T09:00:00Z"), // stale: not this update
				fw(service.StatusStandBy, "u-2", 0, 0, at+"0Z"),
				fw(service.StatusDownloading, "u-2", 0, 10_000_000, at+"1Z"),
				fw(service.StatusDownloading, "u-2", 4_200_000, 10_000_000, at+"2Z"),
				fw(service.StatusDownloading, "u-2", 10_000_000, 10_000_000, at+"3Z"),
				fw(service.StatusApplying, "u-2", 10_000_000, 10_000_000, at+"4Z"),
				fw(service.StatusCompleted, "u-2", 10_000_000, 10_000_000, at+"5Z"),
			},
			fault:  &servicetest.Fault{Method: "GET", Path: "/twins/gw-01", Count: 1, Status: 429, Code: 429001},
			golden: "update_watch_completed.golden",
		},
		{
			name: "failed",
			script: []map[string]any{
				fw(service.StatusDownloading, "u-2", 512, 0, at+"1Z"),
				fw(service.StatusFailed, "u-2", 512, 0, at+"2Z"),
			},
			wantCode: 1,
			golden:   "update_watch_failed.golden",
			wantErr:  "update u-2 on gw-01 ended failed: sha256Mismatch: image digest does not match",
		},
		{
			name:     "timeout",
			script:   []map[string]any{fw(service.StatusApplying, "u-2", 0, 0, at+"4Z")},
			extra:    []string{"--timeout", "600ms"},
			wantCode: 2,
			golden:   "update_watch_timeout.golden",
			wantErr:  `no final state of the update on gw-01 within 600ms (last status "applying")`,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			scriptUpdate(e.srv, tc.script...)
			if tc.fault != nil {
				e.srv.Fail(*tc.fault)
			}
			args := append([]string{"update", "gw-01", "--uri", "https://example.com/fw.img", "--version", "1.3.0", "--watch", "--interval", "100ms"}, tc.extra...)
			r := e.gwctl(t, args...)
			if r.code != tc.wantCode {
				t.Errorf("exit code %d, want %d; stderr: %s", r.code, tc.wantCode, r.stderr)
			}
			if tc.wantErr != "" && !strings.Contains(r.stderr, tc.wantErr) {
				t.Errorf("stderr %q lacks %q", r.stderr, tc.wantErr)
			}
			golden(t, tc.golden, r.stdout)
		})
	}
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", name)
	if *updateGolden {
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s:\n--- got\n%s--- want\n%s", p, got, want)
	}
}

// TestUpdateWatchTerminal: on a terminal the download shows as a progress
// bar; the transitions stay plain lines.
func TestUpdateWatchTerminal(t *testing.T) {
	e := newEnv(t)
	e.tty = true
	scriptUpdate(e.srv,
		fw(service.StatusDownloading, "u-2", 0, 10_000_000, "2026-11-26T12:00:01Z"),
		fw(service.StatusDownloading, "u-2", 5_000_000, 10_000_000, "2026-11-26T12:00:02Z"),
		fw(service.StatusCompleted, "u-2", 10_000_000, 10_000_000, "2026-11-26T12:00:05Z"))
	r := e.gwctl(t, "update", "gw-01", "--uri", "https://example.com/fw.img", "--watch", "--interval", "100ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	for _, s := range []string{"update u-2 accepted by gw-01\n", "12:00:01 downloading version 1.3.0\n", "\rdownloading 5 MB of 10 MB  50% |███████████████               |", "12:00:05 completed (running 1.3.0)\n"} {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("output lacks %q:\n%s", s, r.stdout)
		}
	}
	t.Logf("terminal output: %q", r.stdout)
	if strings.Contains(r.stdout, "12:00:02 downloading 50%") {
		t.Errorf("plain progress line on a terminal:\n%s", r.stdout)
	}
}

// TestUpdateWatchJSON: --output json gives one JSON object per event.
func TestUpdateWatchJSON(t *testing.T) {
	e := newEnv(t)
	scriptUpdate(e.srv,
		fw(service.StatusDownloading, "u-2", 1, 2, "2026-11-26T12:00:01Z"),
		fw(service.StatusCompleted, "u-2", 2, 2, "2026-11-26T12:00:05Z"))
	r := e.gwctl(t, "-o", "json", "update", "gw-01", "--uri", "https://example.com/fw.img", "--watch", "--interval", "100ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	var kinds []string
	for _, line := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		var ev struct {
			Event string `json:"event"`
			State struct {
				Status string `json:"status"`
			} `json:"state"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		kinds = append(kinds, ev.Event+":"+ev.State.Status)
	}
	if got := strings.Join(kinds, " "); got != "accepted: transition:downloading progress:downloading transition:completed" {
		t.Errorf("events %s", got)
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 999: "999 B", 1000: "1 kB", 4_200_000: "4.2 MB", 10_000_000: "10 MB", 1_500_000_000: "1.5 GB", 123_456_789: "123 MB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestPlainHTTPEndpoint: an http:// endpoint would carry the service token
// in clear text; gwctl refuses it with a usage error unless --insecure is
// given, and then warns.
func TestPlainHTTPEndpoint(t *testing.T) {
	var mu sync.Mutex
	var auths []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		auths = append(auths, r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte("[]"))
	}))
	defer srv.Close()
	cs := servicetest.New()
	defer cs.Close()
	run := func(env map[string]string, args ...string) result {
		t.Helper()
		var out, errb bytes.Buffer
		vars := map[string]string{"IOTHUB_CONNECTION_STRING": cs.ConnectionString()}
		for k, v := range env {
			vars[k] = v
		}
		a := &app{stdout: &out, stderr: &errb, getenv: func(k string) string { return vars[k] },
			isTerminal: func() bool { return false }, loc: time.UTC}
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		code := a.run(ctx, args)
		return result{out.String(), errb.String(), code}
	}
	sent := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(auths)
	}

	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
	}{
		{"flag", nil, []string{"--endpoint", srv.URL, "device", "list"}},
		{"environment", map[string]string{"GWCTL_ENDPOINT": srv.URL}, []string{"device", "list"}},
		{"upper-case scheme", nil, []string{"--endpoint", strings.Replace(srv.URL, "http://", "HTTP://", 1), "device", "list"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(tc.env, tc.args...)
			if r.code != exitUsage {
				t.Fatalf("exit %d, want %d; stderr %q", r.code, exitUsage, r.stderr)
			}
			for _, want := range []string{"plain HTTP", "clear text", "https://", "--insecure"} {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("stderr %q lacks %q", r.stderr, want)
				}
			}
			if n := sent(); n != 0 {
				t.Fatalf("%d requests reached the server", n)
			}
		})
	}
	t.Run("other scheme", func(t *testing.T) {
		if r := run(nil, "--endpoint", "ftp://127.0.0.1:21", "device", "list"); r.code != exitUsage || !strings.Contains(r.stderr, "https://") {
			t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
	t.Run("insecure", func(t *testing.T) {
		r := run(nil, "--endpoint", srv.URL, "--insecure", "device", "list")
		if r.code != exitOK {
			t.Fatalf("exit %d; stderr %q", r.code, r.stderr)
		}
		if !strings.Contains(r.stderr, "warning") || !strings.Contains(r.stderr, "clear text") || !strings.Contains(r.stderr, srv.URL) {
			t.Fatalf("no clear-text warning on stderr: %q", r.stderr)
		}
		if n := sent(); n != 1 || !strings.HasPrefix(auths[0], "SharedAccessSignature ") {
			t.Fatalf("requests %d, Authorization %q", n, auths)
		}
	})
}

// A mistyped flag or command exits 64 and says what was meant, at every
// level of the command tree; nothing reaches the hub.
func TestTyposExit64(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"devic", "add", "gw-01"}, `unknown command "devic" for "gwctl"; did you mean device?`},
		{[]string{"device", "ad", "gw-01"}, `unknown command "ad" for "gwctl device"; did you mean add?`},
		{[]string{"twin", "shw", "gw-01"}, `unknown command "shw" for "gwctl twin"; did you mean show or set?`},
		{[]string{"--conection-string", "x", "device", "list"}, "unknown flag: --conection-string; did you mean --connection-string?"},
		{[]string{"device", "list", "--ca-fil", "x"}, "unknown flag: --ca-fil; did you mean --ca-file?"},
		{[]string{"method", "invoke", "gw-01", "reboot", "--conect-timeout", "5s"}, "did you mean --connect-timeout?"},
		{[]string{"method", "invoke", "gw-01", "reboot", "--connect", "5s"}, "did you mean --connect-timeout or --connection-string?"},
		{[]string{"update", "gw-01", "--ur", "https://example.com/fw.img"}, "did you mean --uri?"},
		{[]string{"update", "gw-01", "--uri", "https://example.com/fw.img", "--sha265", "ab"}, "did you mean --sha256?"},
		{[]string{"-verbose", "device", "list"}, "did you mean --verbose?"},
		{[]string{"device", "list", "--frob"}, "unknown flag: --frob (see gwctl device list --help)"},
		{[]string{"device", "list", "extra"}, `gwctl device list takes no arguments, got "extra"`},
		{[]string{"update", "gw-01"}, `required flag(s) "uri" not set`},
	}
	for _, c := range cases {
		e := newEnv(t)
		r := e.gwctl(t, c.args...)
		if r.code != exitUsage || !strings.Contains(r.stderr, c.want) {
			t.Errorf("gwctl %s: exit %d, stderr %q; want %d and %q", strings.Join(c.args, " "), r.code, r.stderr, exitUsage, c.want)
		}
		if n := len(e.srv.Requests()); n != 0 {
			t.Errorf("gwctl %s: %d requests reached the hub", strings.Join(c.args, " "), n)
		}
	}

	// A group named alone shows its commands.
	e := newEnv(t)
	if r := e.gwctl(t, "device"); r.code != exitOK || !strings.Contains(r.stdout, "Available Commands:") {
		t.Errorf("gwctl device: exit %d, stdout %q", r.code, r.stdout)
	}
}

// TestWatchPrinterRetryAndOutage: a retry on the twin prints the attempt,
// its error and when the next one starts; a hub that cannot be reached is
// said once, with the cause, and its return too.
func TestWatchPrinterRetryAndOutage(t *testing.T) {
	var out strings.Builder
	p := newWatchPrinter(&out, time.UTC, false, false)
	at := time.Date(2026, 11, 26, 12, 0, 3, 0, time.UTC)
	p.event(service.WatchEvent{Kind: service.EventRetry, Time: at, State: service.FirmwareState{Status: service.StatusDownloading,
		Retry: &service.FirmwareRetry{Attempt: 3, LastError: "download from https://fw.example.com/a.img: HTTP 503 Service Unavailable",
			NextAttemptAt: at.Add(8 * time.Second)}}})
	p.event(service.WatchEvent{Kind: service.EventHubUnreachable, Time: at.Add(time.Second), Error: "dial tcp 127.0.0.1:443: connect: connection refused"})
	p.event(service.WatchEvent{Kind: service.EventHubReachable, Time: at.Add(2 * time.Second)})
	want := "12:00:03 retrying: attempt 3 failed: download from https://fw.example.com/a.img: HTTP 503 Service Unavailable; next attempt at 12:00:11\n" +
		"12:00:04 cannot reach the hub to read the twin: dial tcp 127.0.0.1:443: connect: connection refused; still trying\n" +
		"12:00:05 the hub answers again\n"
	if out.String() != want {
		t.Errorf("printed\n%s\nwant\n%s", out.String(), want)
	}
}
