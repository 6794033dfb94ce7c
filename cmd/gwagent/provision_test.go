package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/provision"
	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
	"github.com/gwagent/gwagent/iothub/service"
)

const testGroupKey = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

// dpsHub is a local hub, which is also a DPS, with a symmetric-key
// enrollment group of testGroupKey.
func dpsHub(t *testing.T) *hub.Hub {
	t.Helper()
	h, err := hub.New(hub.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	cs, _ := iothub.ParseConnectionString(h.DPSConnectionString())
	svc, err := service.NewDPS(cs, service.Options{BaseURL: "https://" + h.HTTPSAddr(), CAFile: h.CAFile()})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.CloseIdleConnections()
	if _, err := svc.PutEnrollmentGroup(context.Background(), dps.EnrollmentGroup{EnrollmentGroupID: "factory",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKey{PrimaryKey: testGroupKey}}}, ""); err != nil {
		t.Fatal(err)
	}
	return h
}

// provisionConfig writes a factory image's configuration: no connection
// string, a provisioning section with the group key.
func provisionConfig(t *testing.T, h *hub.Hub, stateDir, regID string) string {
	t.Helper()
	reg := ""
	if regID != "" {
		reg = fmt.Sprintf("  registrationId: %q\n", regID)
	}
	y := fmt.Sprintf("stateDir: %q\nhub:\n  caFile: %q\nprovisioning:\n  idScope: %q\n  globalEndpoint: %q\n  address: %q\n%s  groupKey: %q\n",
		stateDir, h.CAFile(), h.IDScope(), h.HostName(), h.MQTTAddr(), reg, testGroupKey)
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestProvisionCommand(t *testing.T) {
	h := dpsHub(t)
	stateDir := t.TempDir()
	cfgFile := provisionConfig(t, h, stateDir, "gw-0042")
	derived, _ := dps.DeriveKeyBase64(testGroupKey, "gw-0042")

	out, err := execute(context.Background(), "provision", "--config", cfgFile, "--show-registration-id")
	if err != nil || out != "gw-0042\n" {
		t.Fatalf("--show-registration-id: %q %v", out, err)
	}

	out, err = execute(context.Background(), "provision", "--config", cfgFile)
	if err != nil {
		t.Fatalf("provision: %v\n%s", err, out)
	}
	for _, re := range []string{`(?m)^assigned hub:\s+` + regexp.QuoteMeta(h.HostName()) + `$`, `(?m)^device id:\s+gw-0042$`,
		`(?m)^registration id:\s+gw-0042 \(id scope ` + h.IDScope() + `\)$`, `registered now`} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("provision output lacks %s:\n%s", re, out)
		}
	}
	if strings.Contains(out, derived) || strings.Contains(out, testGroupKey) {
		t.Errorf("provision printed a key:\n%s", out)
	}
	first, ok, err := provision.Load(stateDir)
	if !ok || err != nil || first.DeviceID != "gw-0042" || first.Key != derived {
		t.Fatalf("kept assignment %+v %v %v", first, ok, err)
	}
	if _, err := h.Twin("gw-0042"); err != nil {
		t.Errorf("DPS did not create the device on the hub: %v", err)
	}

	// Without --force the kept assignment is printed; DPS is not asked.
	t.Setenv("GWAGENT_PROVISIONING_ADDRESS", "127.0.0.1:1")
	out, err = execute(context.Background(), "provision", "--config", cfgFile, "-o", "json")
	var r provisionReport
	if err != nil || json.Unmarshal([]byte(out), &r) != nil || r.Fresh || r.DeviceID != "gw-0042" || !r.ProvisionedAt.Equal(first.ProvisionedAt) {
		t.Fatalf("provision again: %v %+v\n%s", err, r, out)
	}
	if strings.Contains(out, "key") {
		t.Errorf("json names a key:\n%s", out)
	}

	// --force with DPS unreachable fails and keeps the assignment.
	_, err = execute(context.Background(), "provision", "--config", cfgFile, "--force", "--timeout", "10s")
	if err == nil || !strings.Contains(err.Error(), "provisioning (DPS") || !strings.Contains(err.Error(), "the kept assignment stays") {
		t.Fatalf("--force without DPS: %v", err)
	}
	if a, ok, _ := provision.Load(stateDir); !ok || !a.ProvisionedAt.Equal(first.ProvisionedAt) {
		t.Fatalf("a failed --force changed the kept assignment: %+v", a)
	}

	// --force with DPS up registers again and replaces it.
	t.Setenv("GWAGENT_PROVISIONING_ADDRESS", h.MQTTAddr())
	out, err = execute(context.Background(), "provision", "--config", cfgFile, "--force")
	if err != nil || !strings.Contains(out, "registered now") {
		t.Fatalf("--force: %v\n%s", err, out)
	}
	if a, ok, _ := provision.Load(stateDir); !ok || !a.ProvisionedAt.After(first.ProvisionedAt) {
		t.Fatalf("--force kept %+v", a)
	}
}

func TestProvisionShowsDefaultRegistrationID(t *testing.T) {
	h := dpsHub(t)
	machineID := filepath.Join(t.TempDir(), "machine-id")
	if err := os.WriteFile(machineID, []byte("0123456789abcdef0123456789abcdef\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	old := config.MachineIDFile
	config.MachineIDFile = machineID
	t.Cleanup(func() { config.MachineIDFile = old })
	m := hmac.New(sha256.New, []byte("0123456789abcdef0123456789abcdef"))
	m.Write([]byte("gwagent-dps"))
	want := "gw-" + hex.EncodeToString(m.Sum(nil))[:16]

	cfgFile := provisionConfig(t, h, t.TempDir(), "")
	out, err := execute(context.Background(), "provision", "--config", cfgFile, "--show-registration-id")
	if err != nil || out != want+"\n" {
		t.Fatalf("--show-registration-id: %q %v, want %s", out, err, want)
	}
	// The factory enrolls that id and the gateway registers with it.
	out, err = execute(context.Background(), "provision", "--config", cfgFile)
	if err != nil || !regexp.MustCompile(`(?m)^device id:\s+`+want+`$`).MatchString(out) {
		t.Fatalf("provision: %v\n%s", err, out)
	}
}

// A configuration that does not provision says why, as a configuration error.
func TestProvisionWithoutProvisioning(t *testing.T) {
	h := dpsHub(t)
	cs, err := h.CreateDevice("gw-cs")
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := provisionConfig(t, h, t.TempDir(), "gw-0042")
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", cs)
	_, err = execute(context.Background(), "provision", "--config", cfgFile)
	if !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), "takes precedence over provisioning") {
		t.Fatalf("with a connection string: %v", err)
	}
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte(fmt.Sprintf("stateDir: %q\n", t.TempDir())), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = execute(context.Background(), "provision", "--config", p)
	if !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), "provisioning.idScope") {
		t.Fatalf("without a provisioning section: %v", err)
	}
}
