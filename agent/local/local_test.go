package local

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func serve(t *testing.T, path string, h Handler) {
	t.Helper()
	srv, err := Listen(path, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket file left behind: %v", err)
		}
	})
}

func TestRoundTrip(t *testing.T) {
	path := Path(t.TempDir())
	serve(t, path, func(_ context.Context, req Request) Response {
		if req.Op == OpCommit {
			return Response{OK: true, Message: "committing", UpdateID: "u1", Phase: "committing"}
		}
		return Response{Error: "unknown " + req.Op}
	})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket mode %v, want a 0600 socket", fi.Mode())
	}
	for _, tc := range []struct {
		op   string
		want Response
	}{
		{OpCommit, Response{OK: true, Message: "committing", UpdateID: "u1", Phase: "committing", PID: os.Getpid()}},
		{"format", Response{Error: "unknown format", PID: os.Getpid()}},
	} {
		got, err := Call(t.Context(), path, Request{Op: tc.op})
		if err != nil || got != tc.want {
			t.Errorf("%s: %+v, %v; want %+v", tc.op, got, err, tc.want)
		}
	}
}

// The status answer carries the hub connection; unset times stay unset.
func TestStatusRoundTrip(t *testing.T) {
	path := Path(t.TempDir())
	since := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	hub := Hub{Host: "hub.example.net", State: "offline, retrying in 8s", Since: since, RetryAt: since.Add(8 * time.Second),
		LastError: "dial tcp: connection refused", Connects: 2, Drops: 2}
	serve(t, path, func(_ context.Context, req Request) Response {
		if req.Op != OpStatus {
			return Response{Error: "unexpected " + req.Op}
		}
		h := hub
		return Response{OK: true, Phase: "idle", Hub: &h}
	})
	got, err := Call(t.Context(), path, Request{Op: OpStatus})
	if err != nil || !got.OK || got.Hub == nil || !reflect.DeepEqual(*got.Hub, hub) {
		t.Fatalf("status: %+v (hub %+v), %v; want hub %+v", got, got.Hub, err, hub)
	}
	if !ReadOnly(OpStatus) || !ReadOnly(OpPing) || ReadOnly(OpCommit) || ReadOnly(OpRollback) {
		t.Error("ReadOnly: only ping and status only read")
	}
}

func TestBadRequests(t *testing.T) {
	path := Path(t.TempDir())
	serve(t, path, func(context.Context, Request) Response { return Response{OK: true} })
	for _, tc := range []struct {
		name, body, want string
	}{
		{"not json", "hello\n", "bad request"},
		{"too long", `{"op":"` + strings.Repeat("x", MaxMessage) + `"}` + "\n", "longer than"},
	} {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte(tc.body)); err != nil {
			t.Fatal(err)
		}
		var resp Response
		err = readMsg(c, &resp)
		c.Close()
		if err != nil || resp.OK || !strings.Contains(resp.Error, tc.want) {
			t.Errorf("%s: %+v, %v; want an error saying %q", tc.name, resp, err, tc.want)
		}
	}
}

func TestNotRunning(t *testing.T) {
	dir := t.TempDir()
	if _, err := Call(t.Context(), Path(dir), Request{Op: OpPing}); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("no socket: %v, want ErrNotRunning", err)
	}
	// A socket file left by a killed agent: nobody listens.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: Path(dir), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := Call(t.Context(), Path(dir), Request{Op: OpPing}); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("stale socket: %v, want ErrNotRunning", err)
	}
	// The next agent replaces it.
	serve(t, Path(dir), func(context.Context, Request) Response { return Response{OK: true} })
	if r, err := Call(t.Context(), Path(dir), Request{Op: OpPing}); err != nil || !r.OK {
		t.Fatalf("after replacing the stale socket: %+v, %v", r, err)
	}
}

func TestListenRefusesNonSocket(t *testing.T) {
	p := filepath.Join(t.TempDir(), SocketName)
	if err := os.WriteFile(p, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(p, nil, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "keep me" {
		t.Fatal("the regular file was replaced")
	}
}

// Even with the modes opened by hand, another user is refused by the peer
// check. The client runs as nobody (the test runs as root).
func TestPeerCheck(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root to run a client as another user")
	}
	// The system python, which another user can run (a per-user shim may
	// not be).
	py := "/usr/bin/python3"
	if _, err := os.Stat(py); err != nil {
		t.Fatalf("%s is needed for a client as another user: %v", py, err)
	}
	dir := t.TempDir()
	path := Path(dir)
	called := make(chan struct{}, 1)
	serve(t, path, func(context.Context, Request) Response { called <- struct{}{}; return Response{OK: true} })
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	script := `import socket,sys
s=socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"op":"commit"}\n')
except OSError:
    pass  # the server may refuse and close before reading the request
print(s.makefile().readline())`
	cmd := exec.Command(py, "-c", script, path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("client as nobody: %v: %s", err, out)
	}
	var resp Response
	if err := json.Unmarshal(out, &resp); err != nil || resp.OK || !strings.Contains(resp.Error, "root only") {
		t.Fatalf("answer to nobody: %s (%v)", out, err)
	}
	select {
	case <-called:
		t.Fatal("the handler ran for another user")
	default:
	}
}
