package config

import (
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/gwagent/gwagent/firmware"
	"golang.org/x/sys/unix"
)

const cs = "HostName=hub.example.net;DeviceId=gw-01;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

var backends = []Backend{
	{Name: "simulated", Defaults: map[string]any{"apply": "15s", "failAt": "", "nested": map[string]any{"x": 1}}},
	{Name: "abpart", Defaults: map[string]any{"slotA": ""}},
}

func write(t *testing.T, name, body string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func load(t *testing.T, yaml string, args ...string) (*Config, error) {
	t.Helper()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	file := write(t, "config.yaml", yaml, 0o644)
	return Load(Options{File: file, Flags: fs, Backends: backends})
}

func TestDefaults(t *testing.T) {
	c, err := load(t, "hub:\n  connectionString: \""+cs+"\"\n")
	if err != nil {
		t.Fatal(err)
	}
	h := c.Hub
	if h.KeepAlive != 120*time.Second || h.SASTTL != time.Hour || h.ConnectTimeout != 30*time.Second ||
		h.RequestTimeout != 30*time.Second || h.MinRetryDelay != time.Second || h.MaxRetryDelay != time.Minute {
		t.Errorf("hub defaults %+v", h)
	}
	if h.ConnectionString.DeviceID != "gw-01" || h.RootCAs != nil || h.Certificate != nil {
		t.Errorf("hub %+v", h)
	}
	if c.StateDir != "/var/lib/gwagent" || c.Installer.Type != "abpart" || c.Report.MinInterval != 2*time.Second ||
		c.Report.MinPercentStep != 5 || c.Log.Level != "info" || c.Log.Format != "auto" || c.ShutdownTimeout != 10*time.Second ||
		c.Update.HealthTimeout != 5*time.Minute || c.Update.DownloadTimeout != 2*time.Hour {
		t.Errorf("defaults %+v", c)
	}
	if len(c.Installer.Settings) != 1 || c.Installer.Settings["slotA"] != "" {
		t.Errorf("installer settings %v", c.Installer.Settings)
	}
	// Unsigned images are refused by default: the default installer writes
	// the device.
	if c.Signature.AllowUnsigned || c.Signature.KeyDir != "/etc/gwagent/keys" {
		t.Errorf("signature defaults %+v", c.Signature)
	}
	c, err = load(t, "hub:\n  connectionString: \""+cs+"\"\ninstaller:\n  type: simulated\n")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"apply": "15s", "failAt": "", "nested": map[string]any{"x": 1}}
	if len(c.Installer.Settings) != 3 || c.Installer.Settings["apply"] != want["apply"] {
		t.Errorf("simulated installer settings %v", c.Installer.Settings)
	}
	if len(c.Warnings) != 0 {
		t.Errorf("warnings %v", c.Warnings)
	}
}

// Every key can be set from the file, the environment and (for the common
// ones) a flag, with flags over environment over file.
func TestPrecedence(t *testing.T) {
	t.Setenv("GWAGENT_HUB_KEEPALIVE", "60s")
	t.Setenv("GWAGENT_LOG_LEVEL", "warn")
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", cs)
	t.Setenv("GWAGENT_INSTALLER_SIMULATED_APPLY", "1s")
	t.Setenv("GWAGENT_INSTALLER_SIMULATED_NESTED_X", "7")
	t.Setenv("GWAGENT_REPORT_MINPERCENTSTEP", "10")
	c, err := load(t, "hub:\n  keepAlive: 30s\nlog:\n  level: error\n  format: json\nstateDir: /tmp/gw\n", "--installer=simulated", "--log-level=debug", "--state-dir=/tmp/flag")
	if err != nil {
		t.Fatal(err)
	}
	if c.Hub.KeepAlive != 60*time.Second {
		t.Errorf("keepAlive %s: env should beat the file", c.Hub.KeepAlive)
	}
	if c.Log.Level != "debug" {
		t.Errorf("log.level %s: the flag should beat env and file", c.Log.Level)
	}
	if c.Log.Format != "json" || c.StateDir != "/tmp/flag" || c.Report.MinPercentStep != 10 {
		t.Errorf("config %+v", c)
	}
	if c.Installer.Settings["apply"] != "1s" {
		t.Errorf("installer.simulated.apply %v", c.Installer.Settings["apply"])
	}
	if n, ok := c.Installer.Settings["nested"].(map[string]any); !ok || n["x"] != "7" {
		t.Errorf("installer.simulated.nested %v", c.Installer.Settings["nested"])
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	csLine := "hub:\n  connectionString: \"" + cs + "\"\n"
	tests := []struct {
		name, yaml string
		args       []string
		want       string
	}{
		{"keepAlive too long", csLine + "  keepAlive: 1200s\n", nil, "config: hub.keepAlive: must be between 5s and 19m37s, got 20m0s"},
		{"keepAlive without unit", csLine + "  keepAlive: 120\n", nil, "config: hub.keepAlive: 120 has no unit (write e.g. 120s)"},
		{"bad duration", csLine + "  sasTTL: soon\n", nil, `config: hub.sasTTL: "soon" is not a duration`},
		{"no connection string", "", nil, "config: hub.connectionString: required"},
		{"bad connection string", "hub:\n  connectionString: \"HostName=h\"\n", nil, "config: hub.connectionString: iothub: invalid connection string"},
		{"service connection string", "hub:\n  connectionString: \"HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA\"\n", nil, "config: hub.connectionString: this is a service connection string"},
		{"missing secrets file", "hub:\n  connectionStringFile: /nonexistent/cs\n", nil, "config: hub.connectionStringFile: open /nonexistent/cs"},
		{"missing CA", csLine + "  caFile: /nonexistent/ca.pem\n", nil, "config: hub.caFile: open /nonexistent/ca.pem"},
		{"x509 without files", "hub:\n  connectionString: \"HostName=h.x;DeviceId=d;x509=true\"\n", nil, "config: hub.x509.certFile: the connection string says x509=true"},
		{"cert without x509", csLine + "  x509:\n    certFile: /c\n", nil, "config: hub.x509.certFile: a client certificate needs a connection string with x509=true"},
		{"bad address", csLine + "  address: nohostport\n", nil, "config: hub.address:"},
		{"bad WebSocket address", csLine + "  webSocketAddress: nohostport\n", nil, "config: hub.webSocketAddress:"},
		{"unknown transport", csLine + "  transport: quic\n", nil, `config: hub.transport: "quic" is not one of auto, mqtt, websocket`},
		{"proxy not a URL", csLine + "  proxy: proxy.example:3128\n", nil, `config: hub.proxy: "proxy.example:3128" is not an http://host:port proxy URL`},
		{"https proxy", csLine + "update:\n  proxy: https://proxy.example:3128\n", nil, `config: update.proxy: "https://proxy.example:3128" is not an http://host:port proxy URL`},
		{"proxy credentials in the URL", csLine + "  proxy: http://u:secret@proxy.example:3128\n", nil, "config: hub.proxy: put the proxy's credentials in hub.proxyCredentialsFile, not in the URL"},
		{"proxy credentials without proxy", csLine + "  proxyCredentialsFile: /etc/p\n", nil, "config: hub.proxyCredentialsFile: set without hub.proxy"},
		{"missing proxy credentials", csLine + "  proxy: http://proxy.example:3128\n  proxyCredentialsFile: /nonexistent/p\n", nil, "config: hub.proxyCredentialsFile: open /nonexistent/p"},
		{"retry order", csLine + "  minRetryDelay: 2m\n  maxRetryDelay: 1m\n", nil, "config: hub.minRetryDelay: must not exceed hub.maxRetryDelay"},
		{"unknown installer", csLine + "installer:\n  type: rauc\n", nil, `config: installer.type: unknown installer "rauc" (known: abpart, simulated)`},
		{"unknown installer flag", csLine, []string{"--installer=swupdate"}, `config: installer.type: unknown installer "swupdate"`},
		{"log level", csLine + "log:\n  level: loud\n", nil, `config: log.level: "loud" is not one of debug, info, warn, error`},
		{"log format", csLine, []string{"--log-format=xml"}, `config: log.format: "xml" is not one of auto, console, json, journal`},
		{"percent step", csLine + "report:\n  minPercentStep: 0\n", nil, "config: report.minPercentStep: must be between 1 and 100, got 0"},
		{"percent step type", csLine + "report:\n  minPercentStep: lots\n", nil, `config: report.minPercentStep: "lots" is not a whole number`},
		{"typo", csLine + "  keepalive2: 30s\n", nil, "config: hub.keepalive2: unknown key"},
		{"unknown installer key", csLine + "installer:\n  simulated:\n    aply: 1s\n", nil, "config: installer.simulated.aply: unknown key"},
		{"scalar for a section", "hub: 5\n", nil, "config: hub: unknown key"},
		{"empty stateDir", csLine + "stateDir: \"\"\n", nil, "config: stateDir: must not be empty"},
		{"no signing keys", csLine + "installer:\n  type: abpart\nsignature:\n  keyDir: \"\"\n", nil, "config: signature.keyDir: must name the folder of trusted keys"},
		{"not yaml", "hub: [", nil, "config: reading"},
		{"allowed host with a port", csLine + "update:\n  allowedHosts: [fw.example.com:443]\n", nil, `config: update.allowedHosts: "fw.example.com:443": a host name without a port`},
		{"allowed host as a URL", csLine + "update:\n  allowedHosts: [\"https://fw.example.com\"]\n", nil, `config: update.allowedHosts: "https://fw.example.com": a host name, not a URL`},
		{"window start", csLine + "update:\n  window:\n    start: \"26:00\"\n    duration: 2h\n", nil, `config: update.window.start "26:00": must be a time of day HH:MM`},
		{"window duration", csLine + "update:\n  window:\n    start: \"02:00\"\n    duration: 0s\n", nil, "config: update.window.duration 0s: must be more than 0 and at most 24h"},
		{"window zone", csLine + "update:\n  window:\n    start: \"02:00\"\n    duration: 2h\n    timeZone: Europe/Nowhere\n", nil, `config: update.window.timeZone "Europe/Nowhere": unknown time zone`},
		{"window without duration", csLine + "update:\n  window:\n    start: \"02:00\"\n", nil, "config: update.window.duration: required with update.window.start"},
		{"allowed host wildcard inside", csLine + "update:\n  allowedHosts: [\"fw.*.example.com\"]\n", nil, `config: update.allowedHosts: "fw.*.example.com": "*" only as the first label`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := load(t, tc.yaml, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v\nwant it to contain %q", err, tc.want)
			}
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("%v does not wrap ErrConfig", err)
			}
		})
	}
}

// A proxy's credentials come from their file, reach the dialler only
// through Resolved, and never show in the proxy's name; the error of a bad
// URL does not show a password either.
func TestProxy(t *testing.T) {
	creds := write(t, "proxy-creds", "gw:s3cret\n", 0o600)
	c, err := load(t, "hub:\n  connectionString: \""+cs+"\"\n  transport: websocket\n  proxy: http://proxy.example:3128\n  proxyCredentialsFile: "+creds+"\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Hub.Transport != "websocket" || !c.Hub.Proxy.Set() || c.Update.Proxy.Set() {
		t.Fatalf("hub = %+v, update proxy = %+v", c.Hub, c.Update.Proxy)
	}
	u := c.Hub.Proxy.Resolved()
	if pw, _ := u.User.Password(); u.Host != "proxy.example:3128" || u.User.Username() != "gw" || pw != "s3cret" {
		t.Fatalf("resolved proxy = %v", u)
	}
	if s := fmt.Sprintf("%v %+v %s", c.Hub.Proxy, c.Hub, c.Hub.Proxy); strings.Contains(s, "s3cret") {
		t.Fatalf("the password shows in %s", s)
	}
	_, err = load(t, "hub:\n  connectionString: \""+cs+"\"\n  proxy: \"http://u:s3cret@proxy.example/x?y\"\n")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("err = %v", err)
	}
}

func TestInlineConnectionStringWins(t *testing.T) {
	c, err := load(t, "hub:\n  connectionString: \""+cs+"\"\n  connectionStringFile: /nonexistent\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Hub.ConnectionStringFile != "" || len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "ignored") {
		t.Fatalf("hub %+v warnings %v", c.Hub, c.Warnings)
	}
}

func TestFiles(t *testing.T) {
	t.Run("secrets file, warn when readable by others", func(t *testing.T) {
		// The file is the test's own: its group is the process's, which is
		// the agent's own group when the agent reads it. Others, and
		// another group through an ACL entry, are warned about; the
		// agent's own group through an ACL entry (what the unit's start-up
		// step adds) is not, nor an entry the ACL mask disables.
		other := uint32(os.Getegid() + 4242)
		for _, tc := range []struct {
			name string
			mode os.FileMode
			acl  []aclEntry
			warn string
		}{
			{"0600", 0o600, nil, ""},
			{"0640, own group", 0o640, nil, ""},
			{"0644", 0o644, nil, "others"},
			{"ACL: agent's group", 0o600, aclWith(aclGroup, aclRead, uint32(os.Getegid()), aclRead), ""},
			{"ACL: another group", 0o600, aclWith(aclGroup, aclRead, other, aclRead), fmt.Sprintf("group %d", other)},
			{"ACL: another user", 0o600, aclWith(aclUser, aclRead, other, aclRead), fmt.Sprintf("user %d", other)},
			{"ACL: masked out", 0o600, aclWith(aclGroup, aclRead, other, 0), ""},
		} {
			p := write(t, "cs", cs+"\n", tc.mode)
			if err := os.Chmod(p, tc.mode); err != nil {
				t.Fatal(err)
			}
			if tc.acl != nil {
				setACL(t, p, tc.acl)
			}
			c, err := load(t, "", "--connection-string-file="+p)
			if err != nil {
				t.Fatal(err)
			}
			if c.Hub.ConnectionString.DeviceID != "gw-01" || c.Hub.ConnectionStringFile != p {
				t.Fatalf("hub %+v", c.Hub)
			}
			got := ""
			if len(c.Warnings) == 1 && strings.Contains(c.Warnings[0], "chmod 600") {
				got = c.Warnings[0]
			}
			if (got == "") != (tc.warn == "") || !strings.Contains(got, tc.warn) {
				t.Fatalf("%s: warnings %q, want one naming %q", tc.name, c.Warnings, tc.warn)
			}
		}
	})
	t.Run("CA file and X.509", func(t *testing.T) {
		certPEM, keyPEM := selfSignedPEM(t)
		ca := write(t, "ca.pem", string(certPEM), 0o644)
		key := write(t, "key.pem", string(keyPEM), 0o600)
		yaml := "hub:\n  connectionString: \"HostName=h.example;DeviceId=d;x509=true\"\n  caFile: " + ca +
			"\n  x509:\n    certFile: " + ca + "\n    keyFile: " + key + "\n"
		c, err := load(t, yaml)
		if err != nil {
			t.Fatal(err)
		}
		if c.Hub.RootCAs == nil || c.Hub.Certificate == nil {
			t.Fatalf("hub %+v", c.Hub)
		}
		if _, err := load(t, "hub:\n  connectionString: \""+cs+"\"\n  caFile: "+key+"\n"); err == nil || !strings.Contains(err.Error(), "hub.caFile: ") {
			t.Fatalf("a key as CA: %v", err)
		}
	})
	t.Run("explicit file must exist, default may not", func(t *testing.T) {
		if _, err := Load(Options{File: "/nonexistent/gwagent.yaml", Backends: backends}); err == nil || !strings.Contains(err.Error(), "/nonexistent/gwagent.yaml") {
			t.Fatalf("err = %v", err)
		}
		t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", cs)
		fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
		RegisterFlags(fs)
		// DefaultFile does not exist on the test machine.
		if _, err := os.Stat(DefaultFile); err == nil {
			t.Skip(DefaultFile + " exists here")
		}
		c, err := Load(Options{Flags: fs, Backends: backends})
		if err != nil || c.File != "" {
			t.Fatalf("Load = %+v, %v", c, err)
		}
	})
}

func selfSignedPEM(t *testing.T) ([]byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "d"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func TestKeysAndDefaults(t *testing.T) {
	seen := map[string]bool{}
	for _, k := range Keys() {
		if seen[strings.ToLower(k)] {
			t.Errorf("key %s twice", k)
		}
		seen[strings.ToLower(k)] = true
		if _, ok := Default(k); !ok {
			t.Errorf("no default for %s", k)
		}
	}
	if _, ok := Default("nope"); ok {
		t.Error("Default(nope) found")
	}
}

// TestAllowUnsigned: auto (the default) accepts unsigned images only for
// the simulated installer; an explicit value wins, from the file or the
// environment.
func TestAllowUnsigned(t *testing.T) {
	base := "hub:\n  connectionString: \"" + cs + "\"\n"
	tests := []struct {
		name, yaml, env string
		want            bool
	}{
		{"auto, simulated", base + "installer:\n  type: simulated\n", "", true},
		{"auto, default installer", base, "", false},
		{"auto, abpart", base + "installer:\n  type: abpart\n", "", false},
		{"explicit auto, abpart", base + "installer:\n  type: abpart\nsignature:\n  allowUnsigned: auto\n", "", false},
		{"false, simulated", base + "installer:\n  type: simulated\nsignature:\n  allowUnsigned: false\n", "", false},
		{"true, abpart", base + "installer:\n  type: abpart\nsignature:\n  allowUnsigned: true\n", "", true},
		{"environment", base + "installer:\n  type: abpart\n", "true", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("GWAGENT_SIGNATURE_ALLOWUNSIGNED", tc.env)
			}
			c, err := load(t, tc.yaml)
			if err != nil {
				t.Fatal(err)
			}
			if c.Signature.AllowUnsigned != tc.want {
				t.Errorf("AllowUnsigned = %v, want %v", c.Signature.AllowUnsigned, tc.want)
			}
		})
	}
	if _, err := load(t, base+"signature:\n  allowUnsigned: sometimes\n"); err == nil || !strings.Contains(err.Error(), "signature.allowUnsigned") {
		t.Errorf("a bad value: %v", err)
	}
}

// A command that only reads local state loads without the hub's secrets;
// every other key is still checked.
func TestLocal(t *testing.T) {
	missing := "hub:\n  connectionStringFile: /nonexistent/cs\n"
	if _, err := load(t, missing); err == nil || !strings.Contains(err.Error(), "hub.connectionStringFile") {
		t.Fatalf("daemon config without a readable secrets file: %v", err)
	}
	for _, yaml := range []string{"", missing} {
		c, err := Load(Options{File: write(t, "config.yaml", yaml+"stateDir: /var/lib/x\n", 0o644), Backends: backends, Local: true})
		if err != nil {
			t.Fatalf("local load of %q: %v", yaml, err)
		}
		if c.StateDir != "/var/lib/x" || c.Installer.Type != "abpart" || c.Hub.ConnectionString.DeviceID != "" {
			t.Errorf("local config %+v", c)
		}
	}
	if _, err := Load(Options{File: write(t, "config.yaml", "installer:\n  type: nope\n", 0o644), Backends: backends, Local: true}); err == nil ||
		!strings.Contains(err.Error(), "installer.type") {
		t.Fatalf("local load of a bad installer.type: %v", err)
	}
}

// aclWith is an access ACL of a 0600 file plus one named entry (tag, perm,
// id) and the given mask.
func aclWith(tag, perm uint16, id uint32, mask uint16) []aclEntry {
	const undefined = 0xffffffff
	return []aclEntry{
		{tag: 0x01, perm: 0o6, id: undefined}, // owner
		{tag: tag, perm: perm, id: id},
		{tag: aclGroupObj, perm: 0, id: undefined},
		{tag: aclMask, perm: mask, id: undefined},
		{tag: aclOther, perm: 0, id: undefined},
	}
}

// setACL writes the file's access ACL as setfacl does.
func setACL(t *testing.T, path string, entries []aclEntry) {
	t.Helper()
	b := binary.LittleEndian.AppendUint32(nil, 2)
	// The kernel wants the entries sorted by tag, then id.
	slices.SortFunc(entries, func(a, b aclEntry) int { return cmp.Or(cmp.Compare(a.tag, b.tag), cmp.Compare(a.id, b.id)) })
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	if err := unix.Setxattr(path, "system.posix_acl_access", b, 0); err != nil {
		t.Fatalf("set an ACL on %s (the test needs a file system with POSIX ACLs): %v", path, err)
	}
}

// update.allowedHosts: a YAML list, or names separated by blanks or commas
// in the environment; empty by default (any host).
func TestAllowedHosts(t *testing.T) {
	csLine := "hub:\n  connectionString: \"" + cs + "\"\n"
	c, err := load(t, csLine)
	if err != nil {
		t.Fatal(err)
	}
	if c.Update.AllowedHosts == nil || len(c.Update.AllowedHosts) != 0 {
		t.Errorf("default %#v, want an empty list", c.Update.AllowedHosts)
	}
	c, err = load(t, csLine+"update:\n  allowedHosts: [fw.example.com, \"*.cdn.example.net\", 192.0.2.7]\n")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.Update.AllowedHosts, " "); got != "fw.example.com *.cdn.example.net 192.0.2.7" {
		t.Errorf("from the file: %q", got)
	}
	t.Setenv("GWAGENT_UPDATE_ALLOWEDHOSTS", "fw.example.com, *.example.org")
	c, err = load(t, csLine)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.Update.AllowedHosts, " "); got != "fw.example.com *.example.org" {
		t.Errorf("from the environment: %q", got)
	}
}

func TestWindow(t *testing.T) {
	csLine := "hub:\n  connectionString: \"" + cs + "\"\n"
	c, err := load(t, csLine)
	if err != nil {
		t.Fatal(err)
	}
	if c.Update.Window != nil {
		t.Errorf("default window %+v, want none", c.Update.Window)
	}
	c, err = load(t, csLine+"update:\n  window:\n    start: \"2:00\"\n    duration: 90m\n    timeZone: Europe/Berlin\n")
	if err != nil {
		t.Fatal(err)
	}
	if w := c.Update.Window; w == nil || *w != (firmware.Window{Start: "02:00", Duration: "1h30m0s", TimeZone: "Europe/Berlin"}) {
		t.Errorf("from the file: %+v", w)
	}
	t.Setenv("GWAGENT_UPDATE_WINDOW_START", "23:30")
	t.Setenv("GWAGENT_UPDATE_WINDOW_DURATION", "3h")
	c, err = load(t, csLine)
	if err != nil {
		t.Fatal(err)
	}
	if w := c.Update.Window; w == nil || *w != (firmware.Window{Start: "23:30", Duration: "3h0m0s", TimeZone: "UTC"}) {
		t.Errorf("from the environment: %+v", w)
	}
}

func TestAdaptiveMinReuse(t *testing.T) {
	csLine := "hub:\n  connectionString: \"" + cs + "\"\n"
	for _, tc := range []struct {
		yaml string
		want float64
		err  string
	}{
		{"", 0.03, ""},
		{"update:\n  adaptiveMinReuse: 12.5%\n", 0.125, ""},
		{"update:\n  adaptiveMinReuse: 0%\n", 0, ""},
		{"update:\n  adaptiveMinReuse: 3\n", 0, "config: update.adaptiveMinReuse: must be a percentage like 3%, not 3"},
		{"update:\n  adaptiveMinReuse: lots%\n", 0, `config: update.adaptiveMinReuse: "lots%" is not a percentage like 3%`},
		{"update:\n  adaptiveMinReuse: 120%\n", 0, "config: update.adaptiveMinReuse: must be between 0% and 100%, got 120%"},
	} {
		c, err := load(t, csLine+tc.yaml)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want %q", tc.yaml, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", tc.yaml, err)
		}
		if c.Update.AdaptiveMinReuse != tc.want {
			t.Errorf("%q: %v, want %v", tc.yaml, c.Update.AdaptiveMinReuse, tc.want)
		}
	}
}

// The package's account reads the secrets through the unit's ACL entry: a
// root shell (gwagent provision, gwagent access) must not call that entry
// another reader. The test stands in the system group daemon for gwagent.
func TestSecretReadableByAgentAccount(t *testing.T) {
	g, err := user.LookupGroup("daemon")
	if err != nil {
		t.Fatalf("the test needs the system group daemon: %v", err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	path := filepath.Join(t.TempDir(), "group-key")
	if err := os.WriteFile(path, []byte("key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	setACL(t, path, aclWith(aclGroup, aclRead, uint32(gid), aclRead))
	defer func(a string) { agentAccount = a }(agentAccount)
	agentAccount = "daemon"
	if who := readersBesidesAgent(path); who != "" {
		t.Errorf("with the agent's account %s granted: readers %q, want none", agentAccount, who)
	}
	agentAccount = "gwagent-test-no-such-account"
	if who := readersBesidesAgent(path); who != "group "+g.Gid {
		t.Errorf("with group %s not the agent's: readers %q, want group %s", g.Gid, who, g.Gid)
	}
}
