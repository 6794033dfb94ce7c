package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/iothub"
)

// DefaultFile is where a device keeps its configuration.
const DefaultFile = "/etc/gwagent/config.yaml"

// EnvPrefix prefixes every environment override: hub.keepAlive is
// GWAGENT_HUB_KEEPALIVE.
const EnvPrefix = "GWAGENT"

// ErrConfig is wrapped by every configuration error.
var ErrConfig = errors.New("config")

// Config is the whole agent configuration, validated.
type Config struct {
	Hub       Hub
	StateDir  string // absolute
	Installer Installer
	Report    Report
	Log       Log
	Update    Update
	Signature Signature
	// ShutdownTimeout bounds the graceful stop (flush of the twin queue,
	// persisting state, disconnect).
	ShutdownTimeout time.Duration
	// CurrentVersion is the running firmware version when the installer
	// cannot tell and no update has completed since.
	CurrentVersion string
	// Device describes what kind of device this is, for the signed
	// metadata of images.
	Device Device
	// Provisioning, when IDScope is set and no connection string is, gets
	// the identity from the Device Provisioning Service (provisioning.go).
	Provisioning Provisioning

	// File is the configuration file that was read, empty if none.
	File string
	// Warnings are things a person should fix that do not stop the agent
	// (a world-readable secrets file). The caller logs them once a logger
	// exists.
	Warnings []string

	window firmware.Window // update.window.* as read, for loadWindow
}

// Hub is how to reach and authenticate to the IoT hub.
type Hub struct {
	// ConnectionString is the device identity. It holds a secret: never log
	// it (String() of Hub redacts it).
	ConnectionString iothub.ConnectionString
	// ConnectionStringFile is where it came from when read from a file.
	ConnectionStringFile string
	// Address overrides where the socket goes ("host:port"); empty means
	// GatewayHostName or HostName on port 8883. TLS always verifies the
	// gateway or hub name, never this address.
	Address string
	// Transport is mqtt (TLS on 8883), websocket (MQTT over WebSocket on
	// 443) or auto (8883, falling back to 443; the default).
	Transport string
	// WebSocketAddress overrides where the WebSocket transport's socket
	// goes ("host:port"); empty means the gateway or hub name on 443.
	WebSocketAddress string
	// Proxy is the HTTP proxy of the hub session; unset means the
	// https_proxy / HTTPS_PROXY and NO_PROXY variables.
	Proxy Proxy
	// CAFile is a PEM bundle of trusted roots; empty means the system roots.
	CAFile string
	// RootCAs is CAFile loaded; nil means the system roots.
	RootCAs *x509.CertPool
	// X509 is the client certificate, for connection strings with x509=true.
	X509 X509
	// Certificate is X509 loaded; nil for SAS authentication.
	Certificate *tls.Certificate

	// ModelID is the IoT Plug and Play model id announced in the MQTT
	// username and the DPS registration; empty: none.
	ModelID string

	KeepAlive      time.Duration
	SASTTL         time.Duration // lifetime of each minted token; reconnect at 80%
	ConnectTimeout time.Duration
	RequestTimeout time.Duration // twin GET / reported PATCH answer wait
	MinRetryDelay  time.Duration // reconnect backoff start
	MaxRetryDelay  time.Duration // reconnect backoff cap
}

// Proxy is an HTTP proxy: a URL (http://host:port) and, optionally, a file
// holding "user:password" for basic authentication. The credentials are
// never logged: String and Name leave them out.
type Proxy struct {
	// URL is the proxy's URL without credentials; empty: not set.
	URL string
	// CredentialsFile holds "user:password" on its first line.
	CredentialsFile string

	url *url.URL // URL parsed, with the credentials; nil when not set
}

// Set reports whether a proxy is configured.
func (p Proxy) Set() bool { return p.url != nil }

// Resolved is the proxy's URL with its credentials, for dialling only;
// nil when not set.
func (p Proxy) Resolved() *url.URL {
	if p.url == nil {
		return nil
	}
	u := *p.url
	return &u
}

// String is the proxy's URL without credentials.
func (p Proxy) String() string { return p.URL }

// load parses the URL and reads the credentials file; key names the
// section for errors (hub.proxy, update.proxy).
func (p *Proxy) load(key string) error {
	if p.URL == "" {
		if p.CredentialsFile != "" {
			return fmt.Errorf("%w: %sCredentialsFile: set without %s", ErrConfig, key, key)
		}
		return nil
	}
	u, err := url.Parse(p.URL)
	if err != nil || u.Scheme != "http" || u.Hostname() == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return fmt.Errorf("%w: %s: %q is not an http://host:port proxy URL", ErrConfig, key, redactURL(p.URL))
	}
	if u.User != nil {
		return fmt.Errorf("%w: %s: put the proxy's credentials in %sCredentialsFile, not in the URL", ErrConfig, key, key)
	}
	u.Path = ""
	if p.CredentialsFile != "" {
		b, err := os.ReadFile(p.CredentialsFile)
		if err != nil {
			return fmt.Errorf("%w: %sCredentialsFile: %w", ErrConfig, key, err)
		}
		line, _, _ := strings.Cut(string(b), "\n")
		user, pw, ok := strings.Cut(strings.TrimRight(line, "\r"), ":")
		if !ok || user == "" {
			return fmt.Errorf("%w: %sCredentialsFile: %s must hold user:password on its first line", ErrConfig, key, p.CredentialsFile)
		}
		u.User = url.UserPassword(user, pw)
	}
	p.URL = (&url.URL{Scheme: u.Scheme, Host: u.Host}).String()
	p.url = u
	return nil
}

// redactURL hides a password in a URL that failed to parse as a proxy.
func redactURL(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		return u.Redacted()
	}
	return "(unparsable)"
}

// X509 names the client certificate files.
type X509 struct {
	CertFile string
	KeyFile  string
}

// Device is the device.* section.
type Device struct {
	// Compatible is this device's type, e.g. "acme-gw-x86": an image whose
	// signed metadata does not list it is refused before the download
	// (firmware.Config.Compatible). Empty: not set.
	Compatible string
}

// Installer selects the firmware backend.
type Installer struct {
	Type string
	// Settings is the installer.<type> section, with defaults and
	// environment overrides applied; the backend decodes it.
	Settings map[string]any
}

// Report shapes progress reporting.
type Report struct {
	MinInterval    time.Duration // at most one progress patch per interval
	MinPercentStep int           // and at least every N percent
}

// Signature is the minisign policy for firmware images.
type Signature struct {
	// KeyDir holds the trusted minisign public keys (*.pub); it is read
	// for each update, so keys can be rotated without a restart.
	KeyDir string
	// AllowUnsigned accepts updates that name no signatureUri. The key
	// takes true, false or auto: auto (the default) allows them only for
	// the simulated installer, which writes nothing to the device, so the
	// tutorial's unsigned payload keeps working there while every real
	// backend requires signatures.
	AllowUnsigned bool

	allowUnsignedAuto bool // resolved once installer.type is known
}

// Update bounds the firmware update state machine.
type Update struct {
	// HealthTimeout is how long a trial boot may take to reach the hub
	// before the update is rolled back (installers that commit).
	HealthTimeout time.Duration
	// DownloadTimeout bounds one download, retries included.
	DownloadTimeout time.Duration
	// StallTimeout ends a download failed when no new byte arrived for
	// this long, across attempts (firmware.Config.StallTimeout).
	StallTimeout time.Duration
	// AdaptiveFallback is what an adaptive install (indexUri) does when
	// it cannot go on: full (download the whole image) or fail
	// (firmware.Config.AdaptiveFallback).
	AdaptiveFallback string
	// MaxRangeBytes bounds one Range request of an adaptive install
	// (firmware.Config.MaxRangeBytes).
	MaxRangeBytes int
	// AdaptiveMinReuse is the share of a new image (0 to 1) the device must
	// already hold for an adaptive install to assemble it; below it the
	// install downloads the plain image. 0: always assemble
	// (firmware.Config.AdaptiveMinReuse).
	AdaptiveMinReuse float64
	// HealthSystemState is which `systemctl is-system-running` answers
	// pass the health check of a trial boot: running, degraded (running
	// or degraded) or ignore (not asked).
	HealthSystemState string
	// HealthUnits must all be active for a trial boot to pass.
	HealthUnits []string
	// Proxy is the HTTP proxy of downloads; unset means the https_proxy /
	// HTTPS_PROXY, http_proxy and NO_PROXY variables.
	Proxy Proxy
	// AllowedHosts, when not empty, are the only hosts images and
	// signatures may be downloaded from, redirects included: host names,
	// IP addresses or *.example.com patterns (firmware.Config.AllowedHosts).
	AllowedHosts []string
	// Window, when set (update.window.start and .duration), is the
	// device's maintenance window: updates that do not carry their own
	// apply only inside it (firmware.Config.Window). Nil: none.
	Window *firmware.Window
}

// Log configures logging.
type Log struct {
	Level  string // debug, info, warn, error
	Format string // auto, console, json, journal
}

// Backend describes an installer backend to the loader: its name and the
// defaults of its installer.<name>.* keys (so they can be overridden from the
// environment and checked for typos).
type Backend struct {
	Name     string
	Defaults map[string]any
}

// Options say where the configuration comes from.
type Options struct {
	// File is the YAML file; empty means DefaultFile if it exists.
	File string
	// Flags, when set, were registered with RegisterFlags and parsed.
	Flags *pflag.FlagSet
	// Backends are the installer backends that exist.
	Backends []Backend
	// Local loads the configuration for a command that only reads the
	// device's own state (gwagent status): the hub keys (connection string,
	// secrets file, TLS material) are neither required nor read, and
	// Config.Hub keeps only its durations.
	Local bool
}

// key is one configuration key: its canonical name, default, flag and how it
// lands in Config.
type key struct {
	name  string
	def   any
	flag  string
	usage string
	set   func(c *Config, raw any) error
}

var keys = []key{
	{name: "hub.connectionString", def: "", usage: "device connection string (secret; prefer hub.connectionStringFile)",
		set: func(c *Config, raw any) error { return nil }}, // resolved in loadHub
	{name: "hub.connectionStringFile", def: "", flag: "connection-string-file", usage: "file holding the device connection string (mode 0600)",
		set: str(func(c *Config) *string { return &c.Hub.ConnectionStringFile })},
	{name: "hub.address", def: "", flag: "hub-address", usage: "host:port to dial instead of the hub's name on 8883",
		set: str(func(c *Config) *string { return &c.Hub.Address })},
	{name: "hub.transport", def: "auto", flag: "hub-transport", usage: "mqtt (8883), websocket (443) or auto (8883, falling back to 443)",
		set: oneOf(func(c *Config) *string { return &c.Hub.Transport }, "auto", "mqtt", "websocket")},
	{name: "hub.webSocketAddress", def: "", flag: "hub-ws-address", usage: "host:port to dial instead of the hub's name on 443 (websocket transport)",
		set: str(func(c *Config) *string { return &c.Hub.WebSocketAddress })},
	{name: "hub.proxy", def: "", flag: "hub-proxy", usage: "HTTP proxy of the hub session, http://host:port (empty: https_proxy and NO_PROXY)",
		set: str(func(c *Config) *string { return &c.Hub.Proxy.URL })},
	{name: "hub.proxyCredentialsFile", def: "", usage: "file holding user:password for hub.proxy",
		set: str(func(c *Config) *string { return &c.Hub.Proxy.CredentialsFile })},
	{name: "hub.caFile", def: "", flag: "ca-file", usage: "PEM file of trusted root CAs (empty: system roots)",
		set: str(func(c *Config) *string { return &c.Hub.CAFile })},
	{name: "hub.x509.certFile", def: "", usage: "client certificate (PEM) for x509=true",
		set: str(func(c *Config) *string { return &c.Hub.X509.CertFile })},
	{name: "hub.x509.keyFile", def: "", usage: "client key (PEM) for x509=true",
		set: str(func(c *Config) *string { return &c.Hub.X509.KeyFile })},
	{name: "hub.modelId", def: DefaultModelID, usage: "IoT Plug and Play model id sent when connecting and provisioning (empty: none)",
		set: func(c *Config, raw any) error {
			if err := str(func(c *Config) *string { return &c.Hub.ModelID })(c, raw); err != nil {
				return err
			}
			if c.Hub.ModelID != "" && !validModelID(c.Hub.ModelID) {
				return fmt.Errorf("%q is not a DTMI (dtmi:<path>;<version>)", c.Hub.ModelID)
			}
			return nil
		}},
	{name: "hub.keepAlive", def: "120s", set: dur(func(c *Config) *time.Duration { return &c.Hub.KeepAlive }, 5*time.Second, 1177*time.Second)},
	{name: "hub.sasTTL", def: "1h", set: dur(func(c *Config) *time.Duration { return &c.Hub.SASTTL }, 5*time.Second, 365*24*time.Hour)},
	{name: "hub.connectTimeout", def: "30s", set: dur(func(c *Config) *time.Duration { return &c.Hub.ConnectTimeout }, time.Second, 5*time.Minute)},
	{name: "hub.requestTimeout", def: "30s", set: dur(func(c *Config) *time.Duration { return &c.Hub.RequestTimeout }, time.Second, 5*time.Minute)},
	{name: "hub.minRetryDelay", def: "1s", set: dur(func(c *Config) *time.Duration { return &c.Hub.MinRetryDelay }, 10*time.Millisecond, time.Hour)},
	{name: "hub.maxRetryDelay", def: "60s", set: dur(func(c *Config) *time.Duration { return &c.Hub.MaxRetryDelay }, 100*time.Millisecond, time.Hour)},
	{name: "stateDir", def: "/var/lib/gwagent", flag: "state-dir", usage: "directory for the agent's persistent state",
		set: str(func(c *Config) *string { return &c.StateDir })},
	{name: "currentVersion", def: "", usage: "running firmware version when the installer cannot tell",
		set: str(func(c *Config) *string { return &c.CurrentVersion })},
	{name: "device.compatible", def: "", usage: "device type that a signed image's metadata must list (empty: not set)",
		set: func(c *Config, raw any) error {
			if err := str(func(c *Config) *string { return &c.Device.Compatible })(c, raw); err != nil {
				return err
			}
			if c.Device.Compatible == "" {
				return nil
			}
			return signature.CheckCompatible(c.Device.Compatible)
		}},
	{name: "installer.type", def: "abpart", flag: "installer", usage: "firmware installer backend",
		set: str(func(c *Config) *string { return &c.Installer.Type })},
	{name: "report.minInterval", def: "2s", set: dur(func(c *Config) *time.Duration { return &c.Report.MinInterval }, 0, time.Hour)},
	{name: "report.minPercentStep", def: 5, set: intIn(func(c *Config) *int { return &c.Report.MinPercentStep }, 1, 100)},
	{name: "log.level", def: "info", flag: "log-level", usage: "debug, info, warn or error",
		set: oneOf(func(c *Config) *string { return &c.Log.Level }, "debug", "info", "warn", "error")},
	{name: "log.format", def: "auto", flag: "log-format", usage: "auto, console, json or journal",
		set: oneOf(func(c *Config) *string { return &c.Log.Format }, "auto", "console", "json", "journal")},
	{name: "update.healthTimeout", def: "5m", set: dur(func(c *Config) *time.Duration { return &c.Update.HealthTimeout }, time.Second, 24*time.Hour)},
	{name: "update.healthSystemState", def: "running",
		set: oneOf(func(c *Config) *string { return &c.Update.HealthSystemState }, "running", "degraded", "ignore")},
	{name: "update.healthUnits", def: []string{}, set: units(func(c *Config) *[]string { return &c.Update.HealthUnits })},
	{name: "update.downloadTimeout", def: "2h", set: dur(func(c *Config) *time.Duration { return &c.Update.DownloadTimeout }, time.Minute, 7*24*time.Hour)},
	{name: "update.stallTimeout", def: "3m", set: dur(func(c *Config) *time.Duration { return &c.Update.StallTimeout }, time.Second, 24*time.Hour)},
	{name: "update.adaptiveFallback", def: "full", usage: "when an adaptive install (indexUri) cannot go on: full (download the whole image) or fail",
		set: oneOf(func(c *Config) *string { return &c.Update.AdaptiveFallback }, "full", "fail")},
	{name: "update.maxRangeBytes", def: 1 << 20, set: intIn(func(c *Config) *int { return &c.Update.MaxRangeBytes }, 4096, 100<<20)},
	{name: "update.adaptiveMinReuse", def: "3%", usage: "share of a new image the device must hold for an adaptive install to assemble it, e.g. 3% (0%: always)",
		set: percent(func(c *Config) *float64 { return &c.Update.AdaptiveMinReuse })},
	{name: "update.proxy", def: "", usage: "HTTP proxy of downloads, http://host:port (empty: https_proxy, http_proxy and NO_PROXY)",
		set: str(func(c *Config) *string { return &c.Update.Proxy.URL })},
	{name: "update.proxyCredentialsFile", def: "", usage: "file holding user:password for update.proxy",
		set: str(func(c *Config) *string { return &c.Update.Proxy.CredentialsFile })},
	{name: "update.allowedHosts", def: []string{}, set: hosts(func(c *Config) *[]string { return &c.Update.AllowedHosts })},
	{name: "update.window.start", def: "", usage: "daily maintenance window: local time HH:MM it opens (empty: no window)",
		set: str(func(c *Config) *string { return &c.window.Start })},
	{name: "update.window.duration", def: "", usage: "how long the maintenance window stays open (e.g. 2h, at most 24h)",
		set: str(func(c *Config) *string { return &c.window.Duration })},
	{name: "update.window.timeZone", def: "UTC", usage: "IANA time zone of update.window.start (e.g. Europe/Berlin)",
		set: str(func(c *Config) *string { return &c.window.TimeZone })},
	{name: "signature.keyDir", def: "/etc/gwagent/keys", usage: "folder of trusted minisign public keys (*.pub)",
		set: str(func(c *Config) *string { return &c.Signature.KeyDir })},
	{name: "signature.allowUnsigned", def: "auto", usage: "accept firmware images without a signature: true, false, or auto (only for the simulated installer)",
		set: func(c *Config, raw any) error {
			if s, ok := raw.(string); ok && strings.EqualFold(strings.TrimSpace(s), "auto") {
				c.Signature.allowUnsignedAuto = true
				return nil
			}
			return boolean(func(c *Config) *bool { return &c.Signature.AllowUnsigned })(c, raw)
		}},
	{name: "shutdownTimeout", def: "10s", set: dur(func(c *Config) *time.Duration { return &c.ShutdownTimeout }, 0, 10*time.Minute)},
}

// Keys lists the canonical key names, in documentation order.
func Keys() []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.name
	}
	return out
}

// Default returns the default value of a key, and whether the key exists.
func Default(name string) (any, bool) {
	for _, k := range keys {
		if k.name == name {
			return k.def, true
		}
	}
	return nil, false
}

// RegisterFlags adds the flags for the common keys (and --config) to fs.
func RegisterFlags(fs *pflag.FlagSet) {
	fs.String("config", "", "configuration file (default "+DefaultFile+" if present)")
	for _, k := range keys {
		if k.flag == "" {
			continue
		}
		fs.String(k.flag, fmt.Sprint(k.def), k.usage+" (key "+k.name+")")
	}
}

// loadWindow validates update.window.*: unset start and duration mean no
// window; one without the other is an error naming the missing key.
func (c *Config) loadWindow() error {
	w := c.window
	switch {
	case w.Start == "" && w.Duration == "":
		return nil
	case w.Start == "":
		return fmt.Errorf("%w: update.window.start: required with update.window.duration", ErrConfig)
	case w.Duration == "":
		return fmt.Errorf("%w: update.window.duration: required with update.window.start", ErrConfig)
	}
	pw, err := firmware.ParseWindow("update.window", w)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrConfig, strings.TrimPrefix(err.Error(), firmware.ErrInvalidRequest.Error()+": "))
	}
	c.Update.Window = &pw
	return nil
}

// Load reads, merges and validates the configuration. Precedence, highest
// first: flags that were set, GWAGENT_… environment variables, the file,
// defaults.
func Load(opts Options) (*Config, error) {
	v := viper.New()
	v.SetEnvPrefix(EnvPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	for _, k := range keys {
		v.SetDefault(k.name, k.def)
	}
	backends := map[string]Backend{}
	for _, b := range opts.Backends {
		backends[strings.ToLower(b.Name)] = b
		for name, def := range flatten("installer."+b.Name, b.Defaults) {
			v.SetDefault(name, def)
		}
	}

	c := &Config{}
	file := opts.File
	if file == "" && opts.Flags != nil {
		if f := opts.Flags.Lookup("config"); f != nil && f.Changed {
			file = f.Value.String()
		}
	}
	explicit := file != ""
	if file == "" {
		file = DefaultFile
	}
	v.SetConfigFile(file)
	v.SetConfigType("yaml")
	if err := v.ReadInConfig(); err != nil {
		var pe *fs.PathError
		switch {
		case !explicit && errors.As(err, &pe) && errors.Is(pe, fs.ErrNotExist):
			// No file at the default place: defaults and environment only
			// (containers, tests).
		default:
			return nil, fmt.Errorf("%w: reading %s: %w", ErrConfig, file, err)
		}
	} else {
		c.File = file
	}

	if opts.Flags != nil {
		for _, k := range keys {
			if k.flag == "" {
				continue
			}
			if f := opts.Flags.Lookup(k.flag); f != nil && f.Changed {
				v.Set(k.name, f.Value.String())
			}
		}
	}

	if err := checkUnknown(v, backends); err != nil {
		return nil, err
	}
	for _, k := range keys {
		if err := k.set(c, v.Get(k.name)); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrConfig, k.name, err)
		}
	}
	if !opts.Local {
		if err := c.loadHub(v); err != nil {
			return nil, err
		}
	}
	if err := c.Hub.Proxy.load("hub.proxy"); err != nil {
		return nil, err
	}
	if err := c.Update.Proxy.load("update.proxy"); err != nil {
		return nil, err
	}
	if err := c.loadWindow(); err != nil {
		return nil, err
	}
	if c.Hub.MinRetryDelay > c.Hub.MaxRetryDelay {
		return nil, fmt.Errorf("%w: hub.minRetryDelay: must not exceed hub.maxRetryDelay (%s)", ErrConfig, c.Hub.MaxRetryDelay)
	}
	if c.Signature.allowUnsignedAuto {
		c.Signature.AllowUnsigned = c.Installer.Type == "simulated"
	}
	if c.Signature.KeyDir == "" && !c.Signature.AllowUnsigned {
		return nil, fmt.Errorf("%w: signature.keyDir: must name the folder of trusted keys unless signature.allowUnsigned is true", ErrConfig)
	}
	if c.StateDir == "" {
		return nil, fmt.Errorf("%w: stateDir: must not be empty", ErrConfig)
	}
	abs, err := filepath.Abs(c.StateDir)
	if err != nil {
		return nil, fmt.Errorf("%w: stateDir: %w", ErrConfig, err)
	}
	c.StateDir = abs

	b, ok := backends[strings.ToLower(c.Installer.Type)]
	if !ok {
		return nil, fmt.Errorf("%w: installer.type: unknown installer %q (known: %s)", ErrConfig, c.Installer.Type, knownNames(opts.Backends))
	}
	c.Installer.Type = b.Name
	c.Installer.Settings = map[string]any{}
	for name := range flatten("", b.Defaults) {
		setPath(c.Installer.Settings, name, v.Get("installer."+b.Name+"."+name))
	}
	return c, nil
}

// loadHub resolves the connection string (inline or from a secrets file) and
// loads the TLS material, naming the key on every error.
func (c *Config) loadHub(v *viper.Viper) error {
	inline, err := toString(v.Get("hub.connectionString"))
	if err != nil {
		return fmt.Errorf("%w: hub.connectionString: %w", ErrConfig, err)
	}
	inline = strings.TrimSpace(inline)
	var raw, from string
	switch {
	case inline != "":
		if c.Hub.ConnectionStringFile != "" {
			// Layers (file, environment, flags) may each bring one: the
			// explicit string wins, as it usually comes from the higher
			// layer (GWAGENT_HUB_CONNECTIONSTRING over the shipped file).
			c.Warnings = append(c.Warnings, "hub.connectionStringFile: ignored because hub.connectionString is set")
			c.Hub.ConnectionStringFile = ""
		}
		raw, from = inline, "hub.connectionString"
	case c.Provisioning.IDScope != "" && (c.Hub.ConnectionStringFile == "" || !exists(c.Hub.ConnectionStringFile)):
		// A factory image ships the provisioning section; a connection
		// string written onto the device later wins.
		c.Hub.ConnectionStringFile = ""
		if err := c.loadCA(); err != nil {
			return err
		}
		return c.loadProvisioning(v)
	case c.Hub.ConnectionStringFile != "":
		from = "hub.connectionStringFile"
		b, err := os.ReadFile(c.Hub.ConnectionStringFile)
		if err != nil {
			return fmt.Errorf("%w: hub.connectionStringFile: %w", ErrConfig, err)
		}
		raw = strings.TrimSpace(string(b))
		if who := readersBesidesAgent(c.Hub.ConnectionStringFile); who != "" {
			c.Warnings = append(c.Warnings, fmt.Sprintf("hub.connectionStringFile: %s is readable by %s besides root and the agent; make it root:root 0600 (chmod 600, setfacl -b): the unit gives the agent's user read access itself",
				c.Hub.ConnectionStringFile, who))
		}
	default:
		return fmt.Errorf("%w: hub.connectionString: required (or hub.connectionStringFile, or provisioning.idScope to get one from DPS): the device connection string from the hub", ErrConfig)
	}
	cs, err := iothub.ParseConnectionString(raw)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrConfig, from, err)
	}
	if cs.IsService() {
		return fmt.Errorf("%w: %s: this is a service connection string; the agent needs a device connection string (HostName=…;DeviceId=…;SharedAccessKey=…)", ErrConfig, from)
	}
	if cs.SharedAccessSignature != "" {
		c.Warnings = append(c.Warnings, from+": a fixed SharedAccessSignature cannot be renewed; the hub closes the connection when it expires")
	}
	c.Hub.ConnectionString = cs

	if c.Hub.Address != "" {
		if _, port, err := net.SplitHostPort(c.Hub.Address); err != nil || port == "" {
			return fmt.Errorf("%w: hub.address: %q is not host:port", ErrConfig, c.Hub.Address)
		}
	}
	if c.Hub.WebSocketAddress != "" {
		if _, port, err := net.SplitHostPort(c.Hub.WebSocketAddress); err != nil || port == "" {
			return fmt.Errorf("%w: hub.webSocketAddress: %q is not host:port", ErrConfig, c.Hub.WebSocketAddress)
		}
	}
	if err := c.loadCA(); err != nil {
		return err
	}
	switch {
	case cs.X509 && (c.Hub.X509.CertFile == "" || c.Hub.X509.KeyFile == ""):
		return fmt.Errorf("%w: hub.x509.certFile: the connection string says x509=true: set hub.x509.certFile and hub.x509.keyFile", ErrConfig)
	case !cs.X509 && (c.Hub.X509.CertFile != "" || c.Hub.X509.KeyFile != ""):
		return fmt.Errorf("%w: hub.x509.certFile: a client certificate needs a connection string with x509=true", ErrConfig)
	case cs.X509:
		cert, err := tls.LoadX509KeyPair(c.Hub.X509.CertFile, c.Hub.X509.KeyFile)
		if err != nil {
			return fmt.Errorf("%w: hub.x509.certFile: %w", ErrConfig, err)
		}
		c.Hub.Certificate = &cert
	}
	return nil
}

// checkUnknown rejects keys nobody reads, which are almost always typos.
func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// loadCA loads hub.caFile.
func (c *Config) loadCA() error {
	if c.Hub.CAFile == "" {
		return nil
	}
	pem, err := os.ReadFile(c.Hub.CAFile)
	if err != nil {
		return fmt.Errorf("%w: hub.caFile: %w", ErrConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%w: hub.caFile: %s holds no PEM certificate", ErrConfig, c.Hub.CAFile)
	}
	c.Hub.RootCAs = pool
	return nil
}

func checkUnknown(v *viper.Viper, backends map[string]Backend) error {
	known := map[string]bool{}
	for _, k := range keys {
		known[strings.ToLower(k.name)] = true
	}
	for name, b := range backends {
		for k := range flatten("installer."+name, b.Defaults) {
			known[strings.ToLower(k)] = true
		}
	}
	var unknown []string
	for _, k := range v.AllKeys() {
		if known[k] {
			continue
		}
		if isSection(k, known) {
			if _, ok := v.Get(k).(map[string]any); ok || v.Get(k) == nil {
				continue // a section whose keys are all commented out
			}
		}
		unknown = append(unknown, k)
	}
	if len(unknown) == 0 {
		return nil
	}
	slices.Sort(unknown)
	return fmt.Errorf("%w: %s: unknown key (the shipped %s lists every key)", ErrConfig, strings.Join(unknown, ", "), DefaultFile)
}

func isSection(k string, known map[string]bool) bool {
	for name := range known {
		if strings.HasPrefix(name, k+".") {
			return true
		}
	}
	return false
}

func knownNames(bs []Backend) string {
	names := make([]string, 0, len(bs))
	for _, b := range bs {
		names = append(names, b.Name)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// flatten turns a nested defaults map into dotted keys under prefix.
func flatten(prefix string, m map[string]any) map[string]any {
	out := map[string]any{}
	for k, val := range m {
		name := k
		if prefix != "" {
			name = prefix + "." + k
		}
		if sub, ok := val.(map[string]any); ok {
			for kk, vv := range flatten(name, sub) {
				out[kk] = vv
			}
			continue
		}
		out[name] = val
	}
	return out
}

func setPath(m map[string]any, dotted string, val any) {
	parts := strings.Split(dotted, ".")
	for _, p := range parts[:len(parts)-1] {
		sub, ok := m[p].(map[string]any)
		if !ok {
			sub = map[string]any{}
			m[p] = sub
		}
		m = sub
	}
	m[parts[len(parts)-1]] = val
}

func toString(raw any) (string, error) {
	switch x := raw.(type) {
	case nil:
		return "", nil
	case string:
		return x, nil
	case int, int64, float64, bool:
		return fmt.Sprint(x), nil
	}
	return "", fmt.Errorf("must be a string, not %T", raw)
}

func str(field func(*Config) *string) func(*Config, any) error {
	return func(c *Config, raw any) error {
		s, err := toString(raw)
		if err != nil {
			return err
		}
		*field(c) = strings.TrimSpace(s)
		return nil
	}
}

// boolean reads true or false (YAML booleans, or "true"/"false" from the
// environment).
func boolean(field func(*Config) *bool) func(*Config, any) error {
	return func(c *Config, raw any) error {
		switch x := raw.(type) {
		case bool:
			*field(c) = x
		case string:
			b, err := strconv.ParseBool(strings.TrimSpace(x))
			if err != nil {
				return fmt.Errorf("must be true or false, not %q", x)
			}
			*field(c) = b
		default:
			return fmt.Errorf("must be true or false, not %T", raw)
		}
		return nil
	}
}

// units reads a list of systemd unit names: a YAML list, or a string of
// names separated by blanks or commas (from the environment).
func units(field func(*Config) *[]string) func(*Config, any) error {
	return func(c *Config, raw any) error {
		names, err := stringList(raw, "unit names")
		if err != nil {
			return err
		}
		out := []string{}
		for _, n := range names {
			if strings.HasPrefix(n, "-") || strings.ContainsAny(n, "/ ") {
				return fmt.Errorf("%q is not a unit name", n)
			}
			out = append(out, n)
		}
		*field(c) = out
		return nil
	}
}

// stringList reads a list key: a YAML list, or (from the environment or a
// flag) one string of entries separated by blanks or commas. Empty entries
// are dropped.
func stringList(raw any, what string) ([]string, error) {
	var names []string
	switch x := raw.(type) {
	case nil:
	case string:
		names = strings.FieldsFunc(x, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
	case []string:
		names = x
	case []any:
		for _, e := range x {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("must be a list of %s, not %T", what, e)
			}
			names = append(names, s)
		}
	default:
		return nil, fmt.Errorf("must be a list of %s, not %T", what, raw)
	}
	var out []string
	for _, n := range names {
		if n = strings.TrimSpace(n); n != "" {
			out = append(out, n)
		}
	}
	return out, nil
}

// hosts is a list of download hosts, each a firmware.ValidHostPattern.
func hosts(field func(*Config) *[]string) func(*Config, any) error {
	return func(c *Config, raw any) error {
		names, err := stringList(raw, "host names")
		if err != nil {
			return err
		}
		for _, n := range names {
			if err := firmware.ValidHostPattern(n); err != nil {
				return err
			}
		}
		*field(c) = append([]string{}, names...)
		return nil
	}
}

func oneOf(field func(*Config) *string, allowed ...string) func(*Config, any) error {
	return func(c *Config, raw any) error {
		s, err := toString(raw)
		if err != nil {
			return err
		}
		s = strings.ToLower(strings.TrimSpace(s))
		if !slices.Contains(allowed, s) {
			return fmt.Errorf("%q is not one of %s", s, strings.Join(allowed, ", "))
		}
		*field(c) = s
		return nil
	}
}

// ParseDuration reads a configuration duration: a Go duration string with a
// unit ("120s", "1h30m"). Bare numbers are refused because their unit would
// be a guess.
func ParseDuration(raw any) (time.Duration, error) {
	switch x := raw.(type) {
	case time.Duration:
		return x, nil
	case string:
		x = strings.TrimSpace(x)
		if _, err := strconv.ParseFloat(x, 64); err == nil {
			return 0, fmt.Errorf("%s has no unit (write e.g. %ss)", x, x)
		}
		d, err := time.ParseDuration(x)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (use a unit, e.g. 30s, 5m, 1h)", x)
		}
		return d, nil
	case int, int64, float64:
		return 0, fmt.Errorf("%v has no unit (write e.g. %vs)", x, x)
	}
	return 0, fmt.Errorf("must be a duration like 30s, not %T", raw)
}

func dur(field func(*Config) *time.Duration, lo, hi time.Duration) func(*Config, any) error {
	return func(c *Config, raw any) error {
		d, err := ParseDuration(raw)
		if err != nil {
			return err
		}
		if d < lo || d > hi {
			return fmt.Errorf("must be between %s and %s, got %s", lo, hi, d)
		}
		*field(c) = d
		return nil
	}
}

// percent reads a share written as a percentage, "3%" or "12.5%", into a
// fraction (0.03, 0.125), from 0% to 100%.
func percent(field func(*Config) *float64) func(*Config, any) error {
	return func(c *Config, raw any) error {
		x, ok := raw.(string)
		if !ok {
			return fmt.Errorf("must be a percentage like 3%%, not %v", raw)
		}
		num, found := strings.CutSuffix(strings.TrimSpace(x), "%")
		v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
		if !found || err != nil || math.IsNaN(v) {
			return fmt.Errorf("%q is not a percentage like 3%%", x)
		}
		if v < 0 || v > 100 {
			return fmt.Errorf("must be between 0%% and 100%%, got %s", x)
		}
		*field(c) = v / 100
		return nil
	}
}

func intIn(field func(*Config) *int, lo, hi int) func(*Config, any) error {
	return func(c *Config, raw any) error {
		var n int
		switch x := raw.(type) {
		case int:
			n = x
		case int64:
			n = int(x)
		case float64:
			if x != float64(int(x)) {
				return fmt.Errorf("%v is not a whole number", x)
			}
			n = int(x)
		case string:
			var err error
			if n, err = strconv.Atoi(strings.TrimSpace(x)); err != nil {
				return fmt.Errorf("%q is not a whole number", x)
			}
		default:
			return fmt.Errorf("must be a whole number, not %T", raw)
		}
		if n < lo || n > hi {
			return fmt.Errorf("must be between %d and %d, got %d", lo, hi, n)
		}
		*field(c) = n
		return nil
	}
}
