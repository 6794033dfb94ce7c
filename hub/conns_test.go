package hub

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

// waitClosed reads from c until the hub closes it and returns how long that
// took. It fails the test if c is still open after waitLong: a read
// timeout on the client's side is not the hub closing the connection.
func waitClosed(t *testing.T, c net.Conn) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(waitLong))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v", waitLong)
	}
	return time.Since(start)
}

func dialFrom(t *testing.T, localIP, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: waitLong}
	if localIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(localIP)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func clientTLS(h *Hub) *tls.Config {
	return &tls.Config{RootCAs: h.RootCAs(), ServerName: "localhost", NextProtos: []string{"http/1.1"}}
}

// TestSilentConnectionsClosed: a client that connects and then says
// nothing — before the TLS handshake, after it, or after the WebSocket
// upgrade — is closed once Config.ConnectTimeout has passed, while a device
// that connected properly stays.
func TestSilentConnectionsClosed(t *testing.T) {
	const timeout = time.Second
	for _, own := range []bool{false, true} {
		t.Run(fmt.Sprintf("own WebSocket listener=%v", own), func(t *testing.T) {
			h := startHub(t, func(c *Config) {
				c.ConnectTimeout = timeout
				c.WebSocket = true
				if own {
					c.WSAddr = "127.0.0.1:0"
				}
			})
			key := addDevice(t, h, "dev1")
			dev := connect(t, h, "dev1", key)
			dev.sub(iothub.TwinResponseFilter)
			wsHost := strings.TrimSuffix(strings.TrimPrefix(h.WebSocketURL(), "wss://"), WebSocketPath)

			cases := []struct {
				name  string
				setup func(t *testing.T) net.Conn // returns the connection once it is silent
			}{
				{"MQTT, no TLS handshake", func(t *testing.T) net.Conn { return dialFrom(t, "", h.MQTTAddr()) }},
				{"MQTT, TLS but no CONNECT", func(t *testing.T) net.Conn {
					c := tls.Client(dialFrom(t, "", h.MQTTAddr()), clientTLS(h))
					if err := c.Handshake(); err != nil {
						t.Fatal(err)
					}
					return c
				}},
				{"WebSocket, no TLS handshake", func(t *testing.T) net.Conn { return dialFrom(t, "", wsHost) }},
				{"WebSocket, TLS but no request", func(t *testing.T) net.Conn {
					c := tls.Client(dialFrom(t, "", wsHost), clientTLS(h))
					if err := c.Handshake(); err != nil {
						t.Fatal(err)
					}
					return c
				}},
				{"WebSocket, upgraded but no CONNECT", func(t *testing.T) net.Conn {
					d := websocket.Dialer{TLSClientConfig: clientTLS(h), Subprotocols: []string{"mqtt"}, HandshakeTimeout: waitLong}
					ws, resp, err := d.Dial(h.WebSocketURL(), nil)
					if err != nil {
						t.Fatal(err)
					}
					resp.Body.Close()
					t.Cleanup(func() { ws.Close() })
					return ws.NetConn()
				}},
			}
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					start := time.Now()
					c := tc.setup(t)
					waitClosed(t, c)
					if el := time.Since(start); el < timeout {
						t.Fatalf("closed after %v, before the connect timeout of %v", el, timeout)
					}
				})
			}
			// The device outlived the connect timeout several times over.
			if rt, _ := dev.twinRequest(iothub.TwinGetTopic("after"), nil); rt.Status != 200 {
				t.Fatalf("device after the silent clients: twin GET %d", rt.Status)
			}
			testutil.Eventually(t, waitLong, "every place in the gate given back", func() bool { return h.gate.pending() == 0 })
		})
	}
}

// TestPreAuthCaps: connections that have not authenticated are capped per
// remote IP and in all; those over a cap are closed at once, the refusals
// are logged once per interval, and the places come back when the
// connections end.
func TestPreAuthCaps(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	const refusedMsg = "closing new connections: too many that have not authenticated"
	refusals := func() int { return logs.FilterMessage(refusedMsg).Len() }

	t.Run("per IP", func(t *testing.T) {
		h := startHub(t, func(c *Config) {
			c.ConnectTimeout = time.Minute
			c.MaxPreAuthConnsPerIP = 3
			c.WebSocket = true
			c.Log = zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), core))
		})
		key := addDevice(t, h, "dev1")
		silent := make([]net.Conn, 3)
		for i := range silent {
			silent[i] = dialFrom(t, "127.0.0.1", h.MQTTAddr())
		}
		testutil.Eventually(t, waitLong, "3 connections held", func() bool { return h.gate.pending() == 3 })

		// Over the cap from the same address: closed at once, on both
		// listeners, and a device cannot get in either.
		for i := range 5 {
			addr := h.MQTTAddr()
			if i%2 == 1 {
				addr = h.HTTPSAddr()
			}
			if el := waitClosed(t, dialFrom(t, "127.0.0.1", addr)); el > waitLong/2 {
				t.Fatalf("connection over the cap closed after %v", el)
			}
		}
		if _, _, err := dial(t, h, "dev1", devOpts{password: sas(h, "dev1", key, time.Hour), localIP: "127.0.0.1"}); err == nil {
			t.Fatal("a device from the capped address connected")
		}
		// Another address is not held back.
		d, code, err := dial(t, h, "dev1", devOpts{password: sas(h, "dev1", key, time.Hour), localIP: "127.0.0.2"})
		if err != nil {
			t.Fatalf("device from 127.0.0.2: CONNACK %d: %v", code, err)
		}
		d.c.Disconnect(50)
		if n := refusals(); n != 1 {
			t.Fatalf("%d log lines about refused connections, want 1 per %v", n, logEvery)
		}

		// The places come back when the silent connections end.
		for _, c := range silent {
			c.Close()
		}
		testutil.Eventually(t, waitLong, "the places given back", func() bool { return h.gate.pending() == 0 })
		connect(t, h, "dev1", key).c.Disconnect(50)
		if h.gate.pending() != 0 {
			t.Fatalf("%d places held after a device connected", h.gate.pending())
		}
	})

	t.Run("in all", func(t *testing.T) {
		h := startHub(t, func(c *Config) {
			c.ConnectTimeout = time.Minute
			c.MaxPreAuthConns = 2
		})
		for range 2 {
			dialFrom(t, "127.0.0.1", h.HTTPSAddr())
		}
		testutil.Eventually(t, waitLong, "2 connections held", func() bool { return h.gate.pending() == 2 })
		if el := waitClosed(t, dialFrom(t, "127.0.0.2", h.MQTTAddr())); el > waitLong/2 {
			t.Fatalf("connection over the cap closed after %v", el)
		}
	})
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{every: 10 * time.Second}
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at       time.Duration
		wantLog  bool
		wantHeld int
	}{
		{0, true, 0}, {time.Second, false, 0}, {9 * time.Second, false, 0},
		{10 * time.Second, true, 2}, {11 * time.Second, false, 0}, {30 * time.Second, true, 1},
	}
	for _, s := range steps {
		held, ok := l.allow(t0.Add(s.at))
		if ok != s.wantLog || held != s.wantHeld {
			t.Errorf("at %v: log %v held %d, want %v %d", s.at, ok, held, s.wantLog, s.wantHeld)
		}
	}
}

// fdChildEnv makes the test binary run fdChild instead of the tests.
const fdChildEnv = "HUB_TEST_FD_CHILD"

// fdChildInfo is what the child prints on its first line.
type fdChildInfo struct {
	MQTTAddr, HTTPSAddr, Key string
	Limit                    uint64
}

// fdChild runs a hub in a process with few file descriptors: it starts the
// hub with a device, lowers RLIMIT_NOFILE to what it holds plus 16, prints
// fdChildInfo and serves until its stdin closes.
func fdChild() int {
	log, _ := zap.NewDevelopment()
	h, err := New(Config{StateDir: os.Getenv(fdChildEnv), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0",
		ConnectTimeout: 5 * time.Minute, MaxPreAuthConns: 10000, MaxPreAuthConnsPerIP: 10000, Log: log})
	if err == nil {
		err = h.Start(context.Background())
	}
	var cs string
	if err == nil {
		cs, err = h.CreateDevice("dev1")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c, _ := iothub.ParseConnectionString(cs)
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	lim := syscall.Rlimit{Cur: uint64(len(entries)) + 16}
	var old syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old)
	lim.Max = old.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b, _ := json.Marshal(fdChildInfo{MQTTAddr: h.MQTTAddr(), HTTPSAddr: h.HTTPSAddr(), Key: c.SharedAccessKey, Limit: lim.Cur})
	fmt.Println(string(b))
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = h.Close()
	return 0
}

// TestAcceptRecoversFromDescriptorExhaustion runs the hub in a child
// process with a low RLIMIT_NOFILE, opens more idle connections than it
// has descriptors so that its accepts fail, closes them again, and checks
// that the MQTT listener accepts devices afterwards.
func TestAcceptRecoversFromDescriptorExhaustion(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fdChildEnv+"="+dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &syncLines{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		stdin.Close()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("child hub: %v\n%s", err, stderr)
			}
		case <-time.After(waitLong):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("child hub did not stop\n%s", stderr)
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("child hub: %v\n%s", err, stderr)
	}
	var info fdChildInfo
	if err := json.Unmarshal([]byte(line), &info); err != nil {
		t.Fatalf("child hub said %q: %v", line, err)
	}
	key, _ := base64.StdEncoding.DecodeString(info.Key)
	view, err := New(Config{StateDir: dir, MQTTAddr: info.MQTTAddr, HTTPSAddr: info.HTTPSAddr})
	if err != nil {
		t.Fatal(err)
	}

	// Twice as many idle connections as the child has spare descriptors:
	// the kernel queues those it cannot accept.
	conns := make([]net.Conn, 2*16)
	for i := range conns {
		conns[i] = dialFrom(t, "", info.MQTTAddr)
	}
	// Every descriptor is taken; then the child says its accepts fail.
	fdDir := fmt.Sprintf("/proc/%d/fd", cmd.Process.Pid)
	testutil.Eventually(t, waitLong, "the child to use all its descriptors", func() bool {
		entries, err := os.ReadDir(fdDir)
		return err == nil && uint64(len(entries)) >= info.Limit
	})
	testutil.Eventually(t, waitLong, "the child to report failing accepts", func() bool {
		return strings.Contains(stderr.String(), "MQTT listener cannot accept connections")
	})
	if !strings.Contains(stderr.String(), "too many open files") {
		t.Fatalf("accepts failed for another reason than descriptors:\n%s", stderr)
	}
	for _, c := range conns {
		c.Close()
	}
	// The listener kept trying: a device gets in once descriptors are free.
	d, code, err := dial(t, view, "dev1", devOpts{password: sas(view, "dev1", key, time.Hour)})
	if err != nil {
		t.Fatalf("device after the descriptors came back: CONNACK %d: %v\n%s", code, err, stderr)
	}
	d.sub(iothub.TwinResponseFilter)
	if rt, _ := d.twinRequest(iothub.TwinGetTopic("1"), nil); rt.Status != 200 {
		t.Fatalf("twin GET: %d", rt.Status)
	}
	d.c.Disconnect(50)
	// The failures were reported once per interval, not once per attempt.
	if n := strings.Count(stderr.String(), "MQTT listener cannot accept connections"); n > 2 {
		t.Fatalf("%d log lines about failing accepts", n)
	}
}

// syncLines collects a child's stderr.
type syncLines struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncLines) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncLines) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
