package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/internal/testutil"
)

// TestAccess: `gwagent access` lists, for the unit's start-up step, the
// secrets, the inactive slot and the environment to grant, the running slot
// to deny and the state directory, one "kind path" a line.
func TestAccess(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cs := write("connection-string", "HostName=h.example;DeviceId=d;SharedAccessKey=a2V5\n")
	slotA, slotB := write("a.img", "a"), write("b.img", "b")
	cmdline := write("cmdline", "root=/dev/vda2 gwagent.slot=B\n")
	env := write("grubenv", "")
	cfg := write("config.yaml", `hub:
  connectionStringFile: `+cs+`
stateDir: `+filepath.Join(dir, "state")+`
installer:
  type: abpart
  abpart:
    slotA: `+slotA+`
    slotB: `+slotB+`
    slotType: file
    cmdlinePath: `+cmdline+`
    bootenv:
      backend: grub
      grub:
        envFile: `+env+`
`)
	out, err := execute(context.Background(), "access", "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := "read " + cs + "\nwrite " + slotA + "\nwrite " + env + "\ndeny " + slotB + "\nstate " + filepath.Join(dir, "state") + "\n"
	if out != want {
		t.Fatalf("gwagent access printed\n%s\nwant\n%s", out, want)
	}

	// The configuration error the agent would stop on (exit status 78).
	if err := os.Remove(cs); err != nil {
		t.Fatal(err)
	}
	if _, err := execute(context.Background(), "access", "--config", cfg); !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), "hub.connectionStringFile") {
		t.Fatalf("access without the connection string = %v, want a config error naming the key", err)
	}
}

// TestAccessProvisioningKeyFile: a gateway that provisions through DPS with
// its (group) key in a root-only file lists that file, so that the unit's
// start-up step lets the agent's user read it.
func TestAccessProvisioningKeyFile(t *testing.T) {
	for _, key := range []string{"keyFile", "groupKeyFile"} {
		t.Run(key, func(t *testing.T) {
			dir := t.TempDir()
			keyFile := filepath.Join(dir, "dps-key")
			if err := os.WriteFile(keyFile, []byte("a2V5a2V5a2V5a2V5\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := filepath.Join(dir, "config.yaml")
			if err := os.WriteFile(cfg, []byte(`provisioning:
  idScope: 0ne00000001
  registrationId: gw-test
  `+key+`: `+keyFile+`
stateDir: `+filepath.Join(dir, "state")+`
installer:
  type: simulated
`), 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := execute(context.Background(), "access", "--config", cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, "read "+keyFile+"\n") {
				t.Fatalf("gwagent access printed\n%s\nwant a line %q", out, "read "+keyFile)
			}
		})
	}
}

// TestAccessProvisioningX509: with X.509 attestation the device certificate
// and its key are listed, for the same reason.
func TestAccessProvisioningX509(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := testutil.NewCA(t, "factory CA").Device(t, "gw-x509").WriteFiles(t, dir, "gw-x509")
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte(`provisioning:
  idScope: 0ne00000001
  x509:
    certFile: `+certFile+`
    keyFile: `+keyFile+`
stateDir: `+filepath.Join(dir, "state")+`
installer:
  type: simulated
`), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := execute(context.Background(), "access", "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{certFile, keyFile} {
		if !strings.Contains(out, "read "+f+"\n") {
			t.Errorf("gwagent access printed\n%s\nwant a line %q", out, "read "+f)
		}
	}
}
