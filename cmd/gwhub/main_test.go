package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	dir, err := buildPrograms()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "leaked goroutines:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// syncBuffer is written by the command and read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRunPrintsBannerAndStops(t *testing.T) {
	dir := t.TempDir()
	files := t.TempDir()
	cmd := runCommand()
	out := &syncBuffer{}
	cmd.SetOut(out)
	cmd.SetArgs([]string{"--state-dir", dir, "--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0",
		"--ws", "--files", files, "--log-level", "error", "--log-format", "json",
		"--connect-timeout", "5s", "--max-preauth-conns", "100", "--max-preauth-conns-per-ip", "10"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- cmd.ExecuteContext(ctx) }()

	deadline := time.After(20 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(out.String(), "Stop with Ctrl-C.") {
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v\n%s", err, out.String())
		case <-deadline:
			t.Fatalf("no banner:\n%s", out.String())
		case <-tick.C:
		}
	}
	t.Logf("banner after %v", time.Since(start))
	banner := out.String()
	for _, want := range []string{
		"mqtts://localhost:", "https://localhost:", "wss://localhost:", "/$iothub/websocket", "/files/",
		filepath.Join(dir, "ca.pem"), filepath.Join(dir, "service-connection-string"), "device add",
	} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner lacks %q:\n%s", want, banner)
		}
	}
	cs, err := os.ReadFile(filepath.Join(dir, "service-connection-string"))
	if err != nil || !strings.HasPrefix(string(cs), "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=") {
		t.Fatalf("service connection string %q (%v)", cs, err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run after cancel: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not stop after cancel")
	}
}

func TestRunNeedsStateDir(t *testing.T) {
	cmd := runCommand()
	cmd.SetArgs(nil)
	cmd.SetOut(&bytes.Buffer{})
	cmd.SetErr(&bytes.Buffer{})
	if err := cmd.ExecuteContext(context.Background()); err == nil || !strings.Contains(err.Error(), "--state-dir") {
		t.Fatalf("err %v, want a --state-dir error", err)
	}
}
