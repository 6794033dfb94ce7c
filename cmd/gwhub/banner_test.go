package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// binDir holds gwhub, gwctl and gwagent built for the tests that run them
// as a person would.
var binDir string

// buildPrograms builds the three programs into a temporary folder.
func buildPrograms() (dir string, err error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("the go tool is needed to build the programs: %w", err)
	}
	dir, err = os.MkdirTemp("", "gwhub-test-bin-")
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool, "build", "-o", dir+"/",
		"github.com/gwagent/gwagent/cmd/gwhub", "github.com/gwagent/gwagent/cmd/gwctl", "github.com/gwagent/gwagent/cmd/gwagent")
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("go build: %w\n%s", err, out)
	}
	return dir, nil
}

// hubProcess is gwhub run as a separate process.
type hubProcess struct {
	cmd    *exec.Cmd
	banner []string
	done   chan error
}

// startGwhub runs the gwhub binary with args and waits for its banner.
func startGwhub(t *testing.T, args ...string) *hubProcess {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "gwhub"), append([]string{"run"}, args...)...)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	hp := &hubProcess{cmd: cmd, done: make(chan error, 1)}
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		hp.done <- cmd.Wait()
	}()
	t.Cleanup(func() { hp.stop(t) })
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("gwhub ended before its banner was complete:\n%s\nstderr:\n%s", strings.Join(hp.banner, "\n"), stderr.String())
			}
			hp.banner = append(hp.banner, l)
			if l == "Stop with Ctrl-C." {
				go func() { // the rest, so that gwhub never blocks on stdout
					for range lines {
					}
				}()
				t.Logf("banner:\n%s", strings.Join(hp.banner, "\n"))
				return hp
			}
		case <-deadline:
			t.Fatalf("no complete banner:\n%s\nstderr:\n%s", strings.Join(hp.banner, "\n"), stderr.String())
		}
	}
}

// stop interrupts gwhub as Ctrl-C does and checks that it exits 0.
func (hp *hubProcess) stop(t *testing.T) {
	t.Helper()
	if hp.cmd.ProcessState != nil {
		return
	}
	_ = hp.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-hp.done:
		if err != nil {
			t.Errorf("gwhub after Ctrl-C: %v", err)
		}
	case <-time.After(20 * time.Second):
		_ = hp.cmd.Process.Kill()
		<-hp.done
		t.Error("gwhub did not stop on Ctrl-C")
	}
}

// commands are the banner's shell commands: the indented lines after a
// line ending in a colon that start with a program or a subshell.
func (hp *hubProcess) commands() []string {
	var out []string
	for _, l := range hp.banner {
		l = strings.TrimPrefix(l, "  ")
		for _, p := range []string{"gwctl ", "gwagent ", "(umask "} {
			if strings.HasPrefix(l, p) {
				out = append(out, l)
			}
		}
	}
	return out
}

// shell runs line with sh in dir, the built programs first on PATH.
func shell(ctx context.Context, dir, line string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "sh", "-c", line)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PATH="+binDir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return cmd
}

// The banner's commands work as printed: pasted into a shell in another
// folder, they register a device, run an agent as it and call it. The
// hub's host name does not resolve and its state folder has a space in
// its name, so the commands must carry --endpoint, --hub-address and quotes.
func TestBannerCommandsWorkAsPrinted(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "hub state")
	hp := startGwhub(t, "--state-dir", stateDir, "--hostname", "gwhub.invalid",
		"--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--log-level", "warn")
	cmds := hp.commands()
	if len(cmds) != 3 {
		t.Fatalf("want 3 commands (register, agent, call), got %d: %q", len(cmds), cmds)
	}
	register, agent, call := cmds[0], cmds[1], cmds[2]
	work := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Register.
	if out, err := shell(ctx, work, register).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", register, err, out)
	}
	csFile := filepath.Join(work, bannerDevice+".connection-string")
	raw, err := os.ReadFile(csFile)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := iothub.ParseConnectionString(strings.TrimSpace(string(raw)))
	if err != nil || cs.DeviceID != bannerDevice || cs.HostName != "gwhub.invalid" {
		t.Fatalf("registered %q: %v", raw, err)
	}
	if fi, err := os.Stat(csFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("connection string file: %v, %v; want mode 0600", fi.Mode(), err)
	}
	// Pasted again, it fails and keeps the file.
	if out, err := shell(ctx, work, register).CombinedOutput(); err == nil {
		t.Fatalf("%s ran twice: %s", register, out)
	}
	if again, err := os.ReadFile(csFile); err != nil || !bytes.Equal(again, raw) {
		t.Fatalf("the second registration changed the file: %q, %v", again, err)
	}

	// The agent as printed, then the same over WebSocket only, as on a
	// network that blocks 8883 (its own state: the first one's update may
	// still run).
	for _, variant := range []string{"", " --hub-transport websocket --state-dir ws.state"} {
		runAgentAndCall(t, ctx, work, agent+variant, call)
	}
	hp.stop(t)
}

// runAgentAndCall runs the agent command, calls firmwareUpdate on it with
// the call command until it answers 200, and stops it.
func runAgentAndCall(t *testing.T, ctx context.Context, work, agent, call string) {
	t.Helper()
	// The agent, as a process of its own (exec: its pid is the agent's).
	var agentOut syncBuffer
	ac := shell(ctx, work, "exec "+agent)
	ac.Stdout, ac.Stderr = &agentOut, &agentOut
	if err := ac.Start(); err != nil {
		t.Fatal(err)
	}
	agentDone := make(chan error, 1)
	go func() { agentDone <- ac.Wait() }()
	defer func() {
		if ac.ProcessState == nil {
			_ = ac.Process.Kill()
			<-agentDone
		}
	}()

	// Call it: the device is offline (404103) until the agent connects.
	var last []byte
	deadline := time.Now().Add(45 * time.Second)
	for {
		out, err := shell(ctx, work, call).Output()
		if err == nil {
			last = out
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v\n%s\nagent:\n%s", call, err, out, agentOut.String())
		}
		select {
		case err := <-agentDone:
			t.Fatalf("the agent exited: %v\n%s", err, agentOut.String())
		case <-time.After(200 * time.Millisecond):
		}
	}
	if !bytes.Contains(last, []byte(`"status": 200`)) || !bytes.Contains(last, []byte(`"accepted"`)) {
		t.Fatalf("firmwareUpdate answer:\n%s", last)
	}

	if err := ac.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-agentDone:
		if err != nil {
			t.Errorf("agent after SIGTERM: %v\n%s", err, agentOut.String())
		}
	case <-time.After(30 * time.Second):
		t.Errorf("agent did not stop on SIGTERM")
	}
	if strings.Contains(agent, "websocket") && !strings.Contains(agentOut.String(), `"transport": "websocket"`) && !strings.Contains(agentOut.String(), "transport=websocket") && !strings.Contains(agentOut.String(), `"transport":"websocket"`) {
		t.Errorf("the agent did not log a WebSocket connect:\n%s", agentOut.String())
	}
}

// With the default ports and host name no flag is needed but the CA; an
// address that is not loopback, or a certificate of one's own, changes
// what the banner says.
func TestBannerAddresses(t *testing.T) {
	cases := []struct {
		addr, host string
		ownCert    bool
		endpoint   string
		hubAddr    string
		wsAddr     string
	}{
		{":443", "localhost", false, "", "127.0.0.1:443", ""},
		{"0.0.0.0:443", "localhost", false, "", "127.0.0.1:443", ""},
		{"0.0.0.0:8883", "localhost", false, "127.0.0.1:8883", "", "127.0.0.1:8883"},
		{":8443", "localhost", false, "127.0.0.1:8443", "127.0.0.1:8443", "127.0.0.1:8443"},
		{"127.0.0.1:8443", "localhost", false, "127.0.0.1:8443", "127.0.0.1:8443", "127.0.0.1:8443"},
		{"[::1]:8443", "localhost", false, "[::1]:8443", "[::1]:8443", "[::1]:8443"},
		{"[::]:443", "gwhub.lab", false, "127.0.0.1", "127.0.0.1:443", "127.0.0.1:443"},
		{"[::1]:443", "gwhub.lab", false, "[::1]", "[::1]:443", "[::1]:443"},
		{"192.0.2.10:8443", "gwhub.lab", false, "gwhub.lab:8443", "192.0.2.10:8443", "192.0.2.10:8443"},
		{"192.0.2.10:443", "gwhub.lab", false, "", "192.0.2.10:443", "192.0.2.10:443"},
		{":443", "gwhub.lab", true, "", "127.0.0.1:443", "127.0.0.1:443"},
		{":8443", "gwhub.lab", true, "gwhub.lab:8443", "127.0.0.1:8443", "127.0.0.1:8443"},
	}
	for _, c := range cases {
		if got := endpointAddr(c.addr, c.host, c.ownCert); got != c.endpoint {
			t.Errorf("endpointAddr(%q, %q, %v) = %q, want %q", c.addr, c.host, c.ownCert, got, c.endpoint)
		}
		if got := hubAddress(c.addr, c.host); got != c.hubAddr {
			t.Errorf("hubAddress(%q, %q) = %q, want %q", c.addr, c.host, got, c.hubAddr)
		}
		if got := webSocketAddress(c.addr, c.host); got != c.wsAddr {
			t.Errorf("webSocketAddress(%q, %q) = %q, want %q", c.addr, c.host, got, c.wsAddr)
		}
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"/var/tmp/hub/ca.pem": "/var/tmp/hub/ca.pem",
		"/tmp/hub state/ca":   "'/tmp/hub state/ca'",
		"/tmp/it's":           `'/tmp/it'\''s'`,
		"/tmp/$HOME":          "'/tmp/$HOME'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(in)).Output()
		if err != nil || string(out) != in {
			t.Errorf("sh read %s as %q (%v), want %q", shellQuote(in), out, err, in)
		}
	}
}

// A mistyped flag or command exits 64 and says what was meant.
func TestTyposExit64(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"rn"}, `unknown command "rn" for "gwhub"; did you mean run?`},
		{[]string{"run", "--state-dr", "x"}, "unknown flag: --state-dr; did you mean --state-dir?"},
		{[]string{"run", "-state-dir", "x"}, "did you mean --state-dir?"},
		{[]string{"run", "--stateDir", "x"}, "did you mean --state-dir?"},
		{[]string{"run", "--https-adr", ":1"}, "did you mean --https-addr?"},
		{[]string{"run", "--bogus"}, "unknown flag: --bogus (see gwhub run --help)"},
		{[]string{"run", "extra"}, `unknown command "extra" for "gwhub run"`},
		{[]string{"run"}, "--state-dir is required"},
	}
	for _, c := range cases {
		cmd := exec.Command(filepath.Join(binDir, "gwhub"), c.args...)
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = io.Discard, &stderr
		err := cmd.Run()
		code := cmd.ProcessState.ExitCode()
		if code != 64 || !strings.Contains(stderr.String(), c.want) {
			t.Errorf("gwhub %s: exit %d (%v), stderr %q; want 64 and %q", strings.Join(c.args, " "), code, err, stderr.String(), c.want)
		}
	}
}
