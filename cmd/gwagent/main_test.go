package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
)

// runMainEnv makes the test binary run gwagent's main with its arguments,
// so that tests see the exit code a person sees.
const runMainEnv = "GWAGENT_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// gwagent runs gwagent's main in a process of its own.
func gwagent(t *testing.T, args ...string) (stderr string, code int) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	err = cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return errb.String(), cmd.ProcessState.ExitCode()
}

// A mistyped flag or command exits 64 and says what was meant; a bad
// configuration still exits 78.
func TestTyposExit64(t *testing.T) {
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"rn"}, 64, `unknown command "rn" for "gwagent"; did you mean run?`},
		{[]string{"statu"}, 64, "did you mean status?"},
		{[]string{"run", "--confg", "x.yaml"}, 64, "unknown flag: --confg; did you mean --config?"},
		{[]string{"run", "--stateDir", "/tmp/x"}, 64, "did you mean --state-dir?"},
		{[]string{"run", "--ca-fle", "ca.pem"}, 64, "did you mean --ca-file?"},
		{[]string{"run", "-hub-address", "h:1"}, 64, "did you mean --hub-address?"},
		{[]string{"status", "--bogus"}, 64, "unknown flag: --bogus (see gwagent status --help)"},
		{[]string{"version", "extra"}, 64, `unknown command "extra" for "gwagent version"`},
		{[]string{"run", "--config", "/nonexistent/gwagent.yaml"}, 78, "config"},
	}
	for _, c := range cases {
		stderr, code := gwagent(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("gwagent %s: exit %d, stderr %q; want %d and %q", strings.Join(c.args, " "), code, stderr, c.code, c.want)
		}
	}
}

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

// The shipped configuration on a device whose disk has no partitions named
// rootA and rootB: the agent refuses to start (78, so systemd does not
// restart it) and says which keys to set and which labels it looked for,
// instead of falling back to an installer that writes nothing.
func TestShippedConfigWithoutSlotsExits78(t *testing.T) {
	labels := t.TempDir()
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", "HostName=hub.example.net;DeviceId=gw-01;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
	t.Setenv("GWAGENT_INSTALLER_ABPART_PARTLABELDIR", labels)
	stderr, code := gwagent(t, "run", "--config", "../../configs/gwagent.yaml", "--state-dir", t.TempDir(), "--log-format", "json")
	if code != 78 {
		t.Fatalf("exit %d, want 78; stderr %s", code, stderr)
	}
	for _, w := range []string{"installer.abpart", "abpart.slotA", "abpart.slotB", `"rootA"`, `"rootB"`, filepath.Join(labels, "rootA"), "abpart.labelA"} {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr %q does not say %q", stderr, w)
		}
	}
}
