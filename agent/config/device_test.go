package config

import (
	"errors"
	"strings"
	"testing"
)

// device.compatible: empty by default, set from the file or the
// environment, and a value that could never match exactly (blanks,
// control characters) stops the agent naming the key.
func TestDeviceCompatible(t *testing.T) {
	csLine := "hub:\n  connectionString: \"" + cs + "\"\n"
	c, err := load(t, csLine)
	if err != nil {
		t.Fatal(err)
	}
	if c.Device.Compatible != "" {
		t.Errorf("default %q, want empty", c.Device.Compatible)
	}
	c, err = load(t, csLine+"device:\n  compatible: acme-gw-x86\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Device.Compatible != "acme-gw-x86" {
		t.Errorf("from the file: %q", c.Device.Compatible)
	}
	t.Setenv("GWAGENT_DEVICE_COMPATIBLE", " acme-gw-arm ")
	if c, err = load(t, csLine+"device:\n  compatible: acme-gw-x86\n"); err != nil {
		t.Fatal(err)
	}
	if c.Device.Compatible != "acme-gw-arm" {
		t.Errorf("from the environment: %q", c.Device.Compatible)
	}
	t.Setenv("GWAGENT_DEVICE_COMPATIBLE", "")
	_, err = load(t, csLine+"device:\n  compatible: \"acme gw\"\n")
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "config: device.compatible: device type \"acme gw\"") {
		t.Fatalf("err = %v", err)
	}
}
