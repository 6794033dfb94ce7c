package iothub

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// ErrConnectionString is wrapped by every connection-string parse error.
var ErrConnectionString = errors.New("iothub: invalid connection string")

// ConnectionString is a device, module or service connection string:
// key=value pairs separated by ';'.
type ConnectionString struct {
	HostName              string
	DeviceID              string
	ModuleID              string
	SharedAccessKey       string
	SharedAccessKeyName   string
	SharedAccessSignature string
	GatewayHostName       string
	X509                  bool
}

// ParseConnectionString parses and checks a device, module or service
// connection string. Each pair is split at its first '=' because base64 keys
// and SAS tokens contain '='. Keys are case-sensitive.
func ParseConnectionString(s string) (ConnectionString, error) {
	var c ConnectionString
	seen := map[string]bool{}
	for _, part := range strings.Split(strings.TrimSpace(s), ";") {
		if part == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok || k == "" {
			return ConnectionString{}, fmt.Errorf("%w: %q is not key=value", ErrConnectionString, redactPair(part))
		}
		if seen[k] {
			return ConnectionString{}, fmt.Errorf("%w: %s given twice", ErrConnectionString, k)
		}
		seen[k] = true
		switch k {
		case "HostName":
			c.HostName = v
		case "DeviceId":
			c.DeviceID = v
		case "ModuleId":
			c.ModuleID = v
		case "SharedAccessKey":
			c.SharedAccessKey = v
		case "SharedAccessKeyName":
			c.SharedAccessKeyName = v
		case "SharedAccessSignature":
			c.SharedAccessSignature = v
		case "GatewayHostName":
			c.GatewayHostName = v
		case "x509":
			if v != "true" {
				return ConnectionString{}, fmt.Errorf("%w: x509 must be \"true\", got %q", ErrConnectionString, v)
			}
			c.X509 = true
		default:
			// Unknown keys (UseProvisioning, …) are ignored, as the SDKs do.
		}
	}
	if err := c.validate(); err != nil {
		return ConnectionString{}, err
	}
	return c, nil
}

func redactPair(p string) string {
	if len(p) > 24 {
		return p[:24] + "…"
	}
	return p
}

func (c ConnectionString) validate() error {
	if c.HostName == "" {
		return fmt.Errorf("%w: HostName is missing", ErrConnectionString)
	}
	if c.SharedAccessKey != "" {
		if _, err := c.Key(); err != nil {
			return err
		}
	}
	if c.IsService() {
		if c.SharedAccessKey == "" {
			return fmt.Errorf("%w: SharedAccessKeyName needs SharedAccessKey", ErrConnectionString)
		}
		return nil
	}
	if c.DeviceID == "" {
		return fmt.Errorf("%w: DeviceId is missing (or SharedAccessKeyName for a service connection string)", ErrConnectionString)
	}
	if len(c.DeviceID) > 128 {
		return fmt.Errorf("%w: DeviceId is longer than 128 characters", ErrConnectionString)
	}
	n := 0
	for _, set := range []bool{c.SharedAccessKey != "", c.SharedAccessSignature != "", c.X509} {
		if set {
			n++
		}
	}
	switch {
	case n == 0:
		return fmt.Errorf("%w: one of SharedAccessKey, SharedAccessSignature or x509=true is required", ErrConnectionString)
	case n > 1:
		return fmt.Errorf("%w: SharedAccessKey, SharedAccessSignature and x509=true exclude each other", ErrConnectionString)
	}
	return nil
}

// IsService reports whether c is a service (policy) connection string.
func (c ConnectionString) IsService() bool {
	return c.DeviceID == "" && c.SharedAccessKeyName != ""
}

// Key returns the decoded SharedAccessKey.
func (c ConnectionString) Key() ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(c.SharedAccessKey)
	if err != nil || len(k) == 0 {
		return nil, fmt.Errorf("%w: SharedAccessKey is not base64", ErrConnectionString)
	}
	return k, nil
}

// String formats c in the canonical key order.
func (c ConnectionString) String() string {
	var b strings.Builder
	add := func(k, v string) {
		if v == "" {
			return
		}
		if b.Len() > 0 {
			b.WriteByte(';')
		}
		b.WriteString(k + "=" + v)
	}
	add("HostName", c.HostName)
	add("DeviceId", c.DeviceID)
	add("ModuleId", c.ModuleID)
	add("SharedAccessKeyName", c.SharedAccessKeyName)
	add("SharedAccessKey", c.SharedAccessKey)
	add("SharedAccessSignature", c.SharedAccessSignature)
	if c.X509 {
		add("x509", "true")
	}
	add("GatewayHostName", c.GatewayHostName)
	return b.String()
}

// Resource is the SAS resource URI this identity signs for.
func (c ConnectionString) Resource() string {
	switch {
	case c.IsService():
		return c.HostName
	case c.ModuleID != "":
		return ModuleResource(c.HostName, c.DeviceID, c.ModuleID)
	default:
		return DeviceResource(c.HostName, c.DeviceID)
	}
}
