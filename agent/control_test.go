package agent

import (
	"context"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/agent/local"
	"github.com/gwagent/gwagent/internal/testutil"
)

// gwagent status asks the running agent over its control socket how its
// hub connection is: connected, then offline with the reason once the hub
// goes away. Each status request is logged at Debug only.
func TestControlStatus(t *testing.T) {
	e := newEnv(t)
	// A retry delay long enough to see "retrying in" between attempts.
	yaml := strings.Replace(e.yaml(nil), "minRetryDelay: 50ms\n  maxRetryDelay: 500ms", "minRetryDelay: 3s\n  maxRetryDelay: 5s", 1)
	if !strings.Contains(yaml, "minRetryDelay: 3s") {
		t.Fatal("the retry delays were not replaced")
	}
	cfg := loadConfig(t, yaml)
	logs, observed := observer.New(zapcore.DebugLevel)
	r := start(t, cfg, func(o *Options) {
		o.Log = zap.New(zapcore.NewTee(o.Log.Core(), logs))
	})
	testutil.Eventually(t, wait, "the agent connected", func() bool { return r.Session().Health().Connected })

	sock := local.Path(cfg.StateDir)
	ask := func() local.Response {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		resp, err := local.Call(ctx, sock, local.Request{Op: local.OpStatus})
		if err != nil {
			t.Fatal(err)
		}
		if !resp.OK || resp.Hub == nil || resp.Error != "" {
			t.Fatalf("status answer: %+v", resp)
		}
		return resp
	}
	host := cfg.Hub.ConnectionString.HostName
	const calls = 5
	for range calls {
		resp := ask()
		h := resp.Hub
		if !h.Connected || h.Host != host || h.State != "connected to "+host || h.Connects < 1 || h.Since.IsZero() || resp.Phase != "idle" {
			t.Fatalf("status while connected: %+v, hub %+v", resp, h)
		}
	}
	var debug int
	for _, en := range observed.All() {
		if !strings.HasSuffix(en.LoggerName, "control") {
			continue
		}
		if en.Level >= zapcore.InfoLevel {
			t.Errorf("the agent logged a status request at %s: %s %v", en.Level, en.Message, en.ContextMap())
		}
		if en.Message == "control request" && en.ContextMap()["op"] == local.OpStatus {
			debug++
		}
	}
	// The log line exists (at Debug), so the check above looks at it.
	if debug != calls {
		t.Errorf("%d status requests logged at debug, want %d", debug, calls)
	}

	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	var last local.Response
	testutil.Eventually(t, wait, "offline, retrying, with the reason", func() bool {
		last = ask()
		h := last.Hub
		return !h.Connected && strings.HasPrefix(h.State, "offline, retrying in") && h.LastError != "" && !h.RetryAt.IsZero()
	})
	if last.Hub.Drops < 1 {
		t.Errorf("hub after the drop: %+v", last.Hub)
	}
}
