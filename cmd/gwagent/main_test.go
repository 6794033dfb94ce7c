package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func execute(ctx context.Context, args ...string) (string, error) {
	cmd := newRootCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	return out.String(), err
}

func TestVersion(t *testing.T) {
	out, err := execute(context.Background(), "version")
	if err != nil || !strings.HasPrefix(out, "gwagent ") {
		t.Fatalf("version: %q, %v", out, err)
	}
}

func TestRunBadConfig(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("hub:\n  keepAlive: 2h\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := execute(context.Background(), "run", "--config", p)
	if !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), "hub.keepAlive") {
		t.Fatalf("err = %v", err)
	}
	_, err = execute(context.Background(), "run", "--config", filepath.Join(t.TempDir(), "missing.yaml"))
	if !errors.Is(err, config.ErrConfig) {
		t.Fatalf("missing file: %v", err)
	}
}

// gwagent run against a local hub with the flags and environment a demo
// uses, stopped by its context as by SIGTERM.
func TestRunAgainstHub(t *testing.T) {
	h, err := hub.New(hub.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	cs, err := h.CreateDevice("gw-cli")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", cs)
	t.Setenv("GWAGENT_HUB_MINRETRYDELAY", "100ms")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := execute(ctx, "run", "--config", "../../configs/dev.yaml", "--ca-file", h.CAFile(),
			"--hub-address", h.MQTTAddr(), "--state-dir", t.TempDir(), "--log-format", "json")
		done <- err
	}()
	testutil.Eventually(t, 20*time.Second, "the agent's standBy report", func() bool {
		tw, err := h.Twin("gw-cli")
		return err == nil && tw.Properties.Reported["firmwareStatus"] == "standBy"
	})
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not stop")
	}
}
