package config

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/viper"

	"github.com/gwagent/gwagent/iothub/dps"
)

// DefaultModelID is gwagent's IoT Plug and Play model (docs/dtdl/gateway.json).
const DefaultModelID = "dtmi:gwagent:Gateway;1"

// MachineIDFile is read for the default registration id.
var MachineIDFile = "/etc/machine-id"

// Provisioning is the provisioning.* section: how to get the identity from
// the Device Provisioning Service.
type Provisioning struct {
	IDScope        string
	GlobalEndpoint string // the DPS host name (TLS checks it)
	Address        string // host:port to dial instead of GlobalEndpoint:8883
	// WebSocketAddress is the host:port the WebSocket transport dials
	// instead of GlobalEndpoint:443.
	WebSocketAddress string
	RegistrationID   string
	// Key is the device's symmetric key: provisioning.key(File), or
	// derived from provisioning.groupKey(File) and RegistrationID. Secret.
	Key []byte
	// FromGroup says Key was derived from a group key.
	FromGroup bool
	// KeyFile is the file Key came from (provisioning.keyFile or
	// provisioning.groupKeyFile), empty for an inline key: the agent's
	// user must be able to read it (gwagent access).
	KeyFile string
	Payload json.RawMessage // custom payload (a JSON object), or nil
	// X509 names the certificate of X.509 attestation
	// (provisioning.x509.certFile/keyFile); Certificate is it loaded, nil
	// for symmetric keys. The gateway connects to its hub with it too.
	X509        X509
	Certificate *tls.Certificate
}

// Attested reports whether the section has an attestation (a key or a
// certificate), i.e. the gateway provisions through DPS.
func (p Provisioning) Attested() bool { return len(p.Key) > 0 || p.Certificate != nil }

// String redacts the key.
func (p Provisioning) String() string {
	return fmt.Sprintf("{idScope:%s endpoint:%s address:%s registrationId:%s key:[redacted] group:%v x509:%s}",
		p.IDScope, p.GlobalEndpoint, p.Address, p.RegistrationID, p.FromGroup, p.X509.CertFile)
}

var provisioningKeys = []key{
	{name: "provisioning.idScope", def: "", usage: "DPS id scope; with no connection string the agent provisions itself",
		set: str(func(c *Config) *string { return &c.Provisioning.IDScope })},
	{name: "provisioning.globalEndpoint", def: dps.DefaultGlobalEndpoint, usage: "DPS host name",
		set: str(func(c *Config) *string { return &c.Provisioning.GlobalEndpoint })},
	{name: "provisioning.address", def: "", usage: "host:port to dial instead of the DPS host name on 8883",
		set: str(func(c *Config) *string { return &c.Provisioning.Address })},
	{name: "provisioning.webSocketAddress", def: "", usage: "host:port to dial instead of the DPS host name on 443 (hub.transport websocket or auto)",
		set: str(func(c *Config) *string { return &c.Provisioning.WebSocketAddress })},
	{name: "provisioning.registrationId", def: "", usage: "DPS registration id (default: derived from /etc/machine-id)",
		set: str(func(c *Config) *string { return &c.Provisioning.RegistrationID })},
	{name: "provisioning.key", def: "", set: func(*Config, any) error { return nil }},          // loadProvisioning
	{name: "provisioning.keyFile", def: "", set: func(*Config, any) error { return nil }},      // loadProvisioning
	{name: "provisioning.groupKey", def: "", set: func(*Config, any) error { return nil }},     // loadProvisioning
	{name: "provisioning.groupKeyFile", def: "", set: func(*Config, any) error { return nil }}, // loadProvisioning
	{name: "provisioning.x509.certFile", def: "", usage: "device certificate (PEM) for X.509 attestation; its CN is the registration id",
		set: str(func(c *Config) *string { return &c.Provisioning.X509.CertFile })},
	{name: "provisioning.x509.keyFile", def: "", usage: "private key (PEM) of provisioning.x509.certFile",
		set: str(func(c *Config) *string { return &c.Provisioning.X509.KeyFile })},
	{name: "provisioning.payload", def: "", usage: "custom JSON object sent with the registration",
		set: func(c *Config, raw any) error {
			var b []byte
			switch x := raw.(type) {
			case nil:
			case string:
				if strings.TrimSpace(x) == "" {
					return nil
				}
				b = []byte(x)
			case map[string]any:
				var err error
				if b, err = json.Marshal(x); err != nil {
					return err
				}
			default:
				return fmt.Errorf("must be a JSON object, not %T", raw)
			}
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				return fmt.Errorf("must be a JSON object: %w", err)
			}
			c.Provisioning.Payload = b
			return nil
		}},
}

func init() { keys = append(keys, provisioningKeys...) }

// DefaultRegistrationID derives a registration id from the machine id:
// "gw-" and the first 16 hex digits of HMAC-SHA256(machine id,
// "gwagent-dps"), an application-specific id as systemd recommends (the
// machine id itself is never sent).
func DefaultRegistrationID() (string, error) {
	b, err := os.ReadFile(MachineIDFile)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", fmt.Errorf("%s is empty", MachineIDFile)
	}
	m := hmac.New(sha256.New, []byte(id))
	m.Write([]byte("gwagent-dps"))
	return "gw-" + hex.EncodeToString(m.Sum(nil))[:16], nil
}

// secret reads an inline key or a key file (one of the two).
func (c *Config) secret(v *viper.Viper, name string) (value, file string, err error) {
	inline, err := toString(v.Get(name))
	if err != nil {
		return "", "", fmt.Errorf("%w: %s: %w", ErrConfig, name, err)
	}
	file, err = toString(v.Get(name + "File"))
	if err != nil {
		return "", "", fmt.Errorf("%w: %sFile: %w", ErrConfig, name, err)
	}
	inline, file = strings.TrimSpace(inline), strings.TrimSpace(file)
	switch {
	case inline != "" && file != "":
		return "", "", fmt.Errorf("%w: %s: set %s or %sFile, not both", ErrConfig, name, name, name)
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return "", "", fmt.Errorf("%w: %sFile: %w", ErrConfig, name, err)
		}
		if who := readersBesidesAgent(file); who != "" {
			c.Warnings = append(c.Warnings, fmt.Sprintf("%sFile: %s is readable by %s besides root and the agent; make it root:root 0600", name, file, who))
		}
		return strings.TrimSpace(string(b)), file, nil
	}
	return inline, "", nil
}

// loadProvisioning checks the provisioning section and resolves the key.
func (c *Config) loadProvisioning(v *viper.Viper) error {
	p := &c.Provisioning
	if p.GlobalEndpoint == "" {
		p.GlobalEndpoint = dps.DefaultGlobalEndpoint
	}
	if p.Address != "" {
		if _, port, err := net.SplitHostPort(p.Address); err != nil || port == "" {
			return fmt.Errorf("%w: provisioning.address: %q is not host:port", ErrConfig, p.Address)
		}
	}
	if p.WebSocketAddress != "" {
		if _, port, err := net.SplitHostPort(p.WebSocketAddress); err != nil || port == "" {
			return fmt.Errorf("%w: provisioning.webSocketAddress: %q is not host:port", ErrConfig, p.WebSocketAddress)
		}
	}
	if p.X509.CertFile != "" || p.X509.KeyFile != "" {
		return c.loadProvisioningX509(v)
	}
	if p.RegistrationID == "" {
		id, err := DefaultRegistrationID()
		if err != nil {
			return fmt.Errorf("%w: provisioning.registrationId: not set and none can be derived from the machine id: %w", ErrConfig, err)
		}
		p.RegistrationID = id
	}
	if !dps.ValidRegistrationID(p.RegistrationID) {
		return fmt.Errorf("%w: provisioning.registrationId: %q is not a registration id (lower-case letters, digits and -._:)", ErrConfig, p.RegistrationID)
	}
	key, keyFile, err := c.secret(v, "provisioning.key")
	if err != nil {
		return err
	}
	group, groupFile, err := c.secret(v, "provisioning.groupKey")
	if err != nil {
		return err
	}
	p.KeyFile = keyFile + groupFile // at most one is set (checked below)
	switch {
	case key != "" && group != "":
		return fmt.Errorf("%w: provisioning.key: set a device key or a group key, not both", ErrConfig)
	case group != "":
		if key, err = dps.DeriveKeyBase64(group, p.RegistrationID); err != nil {
			return fmt.Errorf("%w: provisioning.groupKey: %w", ErrConfig, err)
		}
		p.FromGroup = true
	case key == "":
		return fmt.Errorf("%w: provisioning.key: required with provisioning.idScope (or provisioning.keyFile, provisioning.groupKey, provisioning.groupKeyFile)", ErrConfig)
	}
	b, err := base64.StdEncoding.DecodeString(key)
	if err != nil || len(b) == 0 {
		return fmt.Errorf("%w: provisioning.key: not a base64 key", ErrConfig)
	}
	p.Key = b
	return nil
}

// loadProvisioningX509 loads the certificate of X.509 attestation; the
// registration id defaults to its CN. A certificate that DPS will refuse
// (expired, CN not the registration id) is a warning, not a failed start:
// the agent keeps running and retrying until the certificate is replaced.
func (c *Config) loadProvisioningX509(v *viper.Viper) error {
	p := &c.Provisioning
	if p.X509.CertFile == "" || p.X509.KeyFile == "" {
		return fmt.Errorf("%w: provisioning.x509.certFile: set both provisioning.x509.certFile and provisioning.x509.keyFile", ErrConfig)
	}
	for _, name := range []string{"provisioning.key", "provisioning.keyFile", "provisioning.groupKey", "provisioning.groupKeyFile"} {
		if s, _ := toString(v.Get(name)); strings.TrimSpace(s) != "" {
			return fmt.Errorf("%w: %s: set a symmetric key or provisioning.x509, not both", ErrConfig, name)
		}
	}
	cert, err := tls.LoadX509KeyPair(p.X509.CertFile, p.X509.KeyFile)
	if err != nil {
		return fmt.Errorf("%w: provisioning.x509.certFile: %w", ErrConfig, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return fmt.Errorf("%w: provisioning.x509.certFile: %w", ErrConfig, err)
	}
	cert.Leaf = leaf
	if who := readersBesidesAgent(p.X509.KeyFile); who != "" {
		c.Warnings = append(c.Warnings, fmt.Sprintf("provisioning.x509.keyFile: %s is readable by %s besides root and the agent; make it root:root 0600", p.X509.KeyFile, who))
	}
	cn := leaf.Subject.CommonName
	if p.RegistrationID == "" {
		if !dps.ValidRegistrationID(cn) {
			return fmt.Errorf("%w: provisioning.x509.certFile: the certificate's CN %q is not a registration id (lower-case letters, digits and -._:); set provisioning.registrationId or use another certificate", ErrConfig, cn)
		}
		p.RegistrationID = cn
	}
	if !dps.ValidRegistrationID(p.RegistrationID) {
		return fmt.Errorf("%w: provisioning.registrationId: %q is not a registration id (lower-case letters, digits and -._:)", ErrConfig, p.RegistrationID)
	}
	if cn != p.RegistrationID {
		c.Warnings = append(c.Warnings, fmt.Sprintf("provisioning.registrationId: %q is not the certificate's CN %q; DPS will refuse the registration", p.RegistrationID, cn))
	}
	if now := time.Now(); now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		c.Warnings = append(c.Warnings, fmt.Sprintf("provisioning.x509.certFile: the certificate is valid from %s to %s, not now; DPS will refuse it",
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339)))
	}
	p.Certificate = &cert
	if c.Hub.Certificate == nil {
		c.Hub.Certificate = &cert // the assigned hub is reached with the same certificate
	}
	return nil
}

// validModelID checks the shape of a DTMI: "dtmi:" path segments separated
// by ':', then ";" and a version number.
func validModelID(s string) bool {
	rest, ok := strings.CutPrefix(s, "dtmi:")
	if !ok {
		return false
	}
	path, ver, ok := strings.Cut(rest, ";")
	if !ok || path == "" || ver == "" || strings.Trim(ver, "0123456789") != "" {
		return false
	}
	for _, seg := range strings.Split(path, ":") {
		if seg == "" || strings.Trim(seg, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") != "" {
			return false
		}
	}
	return true
}
