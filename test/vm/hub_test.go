package vm

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// hubHost is the hub's name for the guest: its certificate is issued for it
// and the guest's /etc/hosts maps it to 10.0.2.2 (the host, through QEMU's
// user-mode network).
const hubHost = "gwhub.vm.test"

type hubProcess struct {
	mqttAddr, httpsAddr string
	caFile              string
	serviceCS           string
	logFile             string
	bin                 string
}

// startHub starts build/gwhub on free loopback ports, serving filesDir at
// /files/, and waits until it answers.
func startHub(ctx context.Context, t *testing.T, bin, stateDir, filesDir string) *hubProcess {
	t.Helper()
	h := &hubProcess{mqttAddr: freeAddr(t), httpsAddr: freeAddr(t), bin: bin, logFile: stateDir + ".log"}
	logf, err := os.Create(h.logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(bin, "gwhub"), "run", "--state-dir", stateDir,
		"--mqtt-addr", h.mqttAddr, "--https-addr", h.httpsAddr, "--hostname", hubHost,
		"--files", filesDir, "--log-format", "json")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	h.caFile = filepath.Join(stateDir, "ca.pem")
	csFile := filepath.Join(stateDir, "service-connection-string")
	deadline := time.Now().Add(30 * time.Second)
	for {
		cs, csErr := os.ReadFile(csFile)
		_, caErr := os.Stat(h.caFile)
		if csErr == nil && caErr == nil && len(cs) > 0 && dialable(h.mqttAddr) && dialable(h.httpsAddr) {
			h.serviceCS = strings.TrimSpace(string(cs))
			return h
		}
		select {
		case err := <-exited:
			t.Fatalf("gwhub exited: %v\n%s", err, readOr(h.logFile))
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("gwhub not serving after 30s\n%s", readOr(h.logFile))
		}
	}
}

func (h *hubProcess) port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// gwctl runs build/gwctl against the hub and returns its stdout.
func (h *hubProcess) gwctl(ctx context.Context, args ...string) (string, error) {
	args = append([]string{"--endpoint", "https://" + h.httpsAddr}, args...)
	cmd := exec.CommandContext(ctx, filepath.Join(h.bin, "gwctl"), args...)
	cmd.Env = append(os.Environ(), "IOTHUB_CONNECTION_STRING="+h.serviceCS, "GWCTL_CA_FILE="+h.caFile)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("gwctl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (h *hubProcess) client(t *testing.T) *service.Client {
	t.Helper()
	cs, err := iothub.ParseConnectionString(h.serviceCS)
	if err != nil {
		t.Fatal(err)
	}
	c, err := service.New(cs, service.Options{CAFile: h.caFile, BaseURL: "https://" + h.httpsAddr, RequestTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// twinState is what the watcher records of the device's twin: the firmware
// state it reports and whether the hub sees it connected.
type twinState struct {
	at        time.Time
	fw        service.FirmwareState
	connected bool
	startedAt string // reported agent.startedAt: changes with each agent start
}

func (s twinState) code() string {
	if s.fw.Error == nil {
		return ""
	}
	return s.fw.Error.Code
}

func (s twinState) String() string {
	conn := "offline"
	if s.connected {
		conn = "connected"
	}
	b := fmt.Sprintf("%s update=%.8s target=%s current=%s slot=%s", s.fw.Status, s.fw.UpdateID, s.fw.TargetVersion, s.fw.CurrentVersion, s.fw.Slot)
	if s.fw.Percent >= 0 {
		b += fmt.Sprintf(" %d%%", s.fw.Percent)
	}
	if s.fw.Error != nil {
		b += fmt.Sprintf(" error=%s (%s)", s.fw.Error.Code, s.fw.Error.Message)
	}
	return b + " " + conn
}

// key is what makes a new entry in the twin history (progress within a
// phase too, so a power cut can be timed on it).
func (s twinState) key() string {
	return fmt.Sprintf("%s|%s|%s|%s|%s|%d|%v|%s", s.fw.Status, s.fw.UpdateID, s.fw.CurrentVersion, s.fw.Slot, s.code(), s.fw.Percent, s.connected, s.startedAt)
}

// watchTwin polls the twin through the service REST API every 250 ms and
// records each distinct state, until ctx ends.
func watchTwin(ctx context.Context, c *service.Client, id string) (*stream[twinState], *sync.WaitGroup) {
	hist := newStream[twinState]()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		last := ""
		for ctx.Err() == nil {
			tw, err := c.GetTwin(ctx, id)
			if err == nil {
				s := twinState{at: time.Now(), fw: service.ParseFirmwareState(tw.Properties.Reported),
					connected: strings.EqualFold(tw.ConnectionState, "Connected")}
				if a, ok := tw.Properties.Reported["agent"].(map[string]any); ok {
					s.startedAt, _ = a["startedAt"].(string)
				}
				if k := s.key(); k != last {
					last = k
					hist.add(s)
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(250 * time.Millisecond):
			}
		}
	}()
	return hist, &wg
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func dialable(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func readOr(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return string(b)
}
