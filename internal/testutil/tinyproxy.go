package testutil

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Proxy is a real HTTP proxy, Debian's tinyproxy, run by a test on
// loopback with its own config, log and pid.
type Proxy struct {
	// URL is http://127.0.0.1:PORT, without credentials.
	URL *url.URL
	// LogFile is tinyproxy's log: each CONNECT shows as
	// "Request (file descriptor N): CONNECT host:port HTTP/1.1".
	LogFile string
}

// ProxyOptions configure StartProxy.
type ProxyOptions struct {
	// User and Password, when set, make the proxy require basic
	// authentication (407 without it).
	User, Password string
	// ConnectPorts, when set, are the only ports CONNECT may reach (403
	// for the others), as proxies that allow 443 only.
	ConnectPorts []int
}

// StartProxy starts tinyproxy (package tinyproxy-bin, installed by make
// deps) on a free loopback port and stops it, by its pid, at cleanup. A
// missing tinyproxy fails the test.
func StartProxy(t testing.TB, o ProxyOptions) *Proxy {
	t.Helper()
	bin, err := exec.LookPath("tinyproxy")
	if err != nil {
		t.Fatalf("tinyproxy is needed (make deps installs tinyproxy-bin): %v", err)
	}
	// tinyproxy started as root drops to nobody, who must reach and write
	// the log: not under t.TempDir, whose parent is private.
	dir, err := os.MkdirTemp("", "gwagent-tinyproxy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	p := &Proxy{URL: &url.URL{Scheme: "http", Host: addr}, LogFile: filepath.Join(dir, "tinyproxy.log")}
	var conf strings.Builder
	fmt.Fprintf(&conf, "Port %s\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nLogLevel Connect\nLogFile %q\n", port, p.LogFile)
	if os.Geteuid() == 0 {
		conf.WriteString("User nobody\nGroup nogroup\n")
	}
	if o.User != "" {
		fmt.Fprintf(&conf, "BasicAuth %s %s\n", o.User, o.Password)
	}
	for _, cp := range o.ConnectPorts {
		fmt.Fprintf(&conf, "ConnectPort %d\n", cp)
	}
	cf := filepath.Join(dir, "tinyproxy.conf")
	if err := os.WriteFile(cf, []byte(conf.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-d", "-c", cf)
	out, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		_ = out.Close()
	})
	Eventually(t, 10*time.Second, "tinyproxy listening on "+addr, func() bool {
		select {
		case <-done:
			b, _ := os.ReadFile(out.Name())
			t.Fatalf("tinyproxy exited at start:\n%s", b)
		default:
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		_ = c.Close()
		return true
	})
	return p
}

// Log is the proxy's log so far.
func (p *Proxy) Log(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(p.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Connects counts the CONNECT requests to target in the log.
func (p *Proxy) Connects(t testing.TB, target string) int {
	t.Helper()
	return strings.Count(p.Log(t), ": CONNECT "+target+" ")
}
