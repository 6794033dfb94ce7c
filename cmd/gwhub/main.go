package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/cli"
	"github.com/gwagent/gwagent/internal/logging"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "gwhub:", err)
		if cli.IsUsage(err) {
			os.Exit(cli.ExitUsage)
		}
		os.Exit(1)
	}
}

func run(args []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := rootCommand()
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}

func rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "gwhub",
		Short:         "A local Azure IoT hub: MQTT device protocol, twins, direct methods, the service REST API and a Device Provisioning Service",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(runCommand())
	cli.Setup(root)
	return root
}

func runCommand() *cobra.Command {
	var (
		cfg       hub.Config
		logLevel  string
		logFmt    string
		statsFile string
	)
	cmd := &cobra.Command{
		Use:   "run --state-dir DIR",
		Short: "Start the hub and serve until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.StateDir == "" {
				return cli.Usagef("--state-dir is required")
			}
			if cfg.TwinWriteRate < 0 {
				return cli.Usagef("--twin-write-rate must not be negative (0 turns the throttle off)")
			}
			log, _, err := logging.New(logging.Options{Level: logLevel, Format: logFmt})
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			cfg.Log = log.Named("hub")
			h, err := hub.New(cfg)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if err := h.Start(ctx); err != nil {
				return err
			}
			printBanner(cmd.OutOrStdout(), h, cfg)
			statsDone := make(chan struct{})
			go func() {
				defer close(statsDone)
				if statsFile == "" {
					return
				}
				if err := keepTwinWriteStats(ctx, h, statsFile, time.Second); err != nil {
					log.Warn("twin write stats file", zap.Error(err))
				}
			}()
			<-ctx.Done()
			<-statsDone
			log.Info("stopping", zap.String("reason", context.Cause(ctx).Error()))
			err = h.Close()
			if statsFile != "" {
				if werr := writeTwinWriteStats(statsFile, h.TwinWriteStats()); werr != nil {
					log.Warn("twin write stats file", zap.Error(werr))
				}
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.StateDir, "state-dir", "", "directory for the registry, twins, CA and service connection string (created if missing)")
	f.StringVar(&cfg.MQTTAddr, "mqtt-addr", hub.DefaultMQTTAddr, "MQTT over TLS listen address")
	f.StringVar(&cfg.HTTPSAddr, "https-addr", hub.DefaultHTTPSAddr, "service REST API (HTTPS) listen address")
	f.StringVar(&cfg.HostName, "hostname", hub.DefaultHostName, "the hub's host name: in connection strings, SAS tokens, MQTT usernames and the server certificate")
	f.BoolVar(&cfg.WebSocket, "ws", true, "also serve MQTT over WebSocket at "+hub.WebSocketPath+", as IoT Hub does on 443 (--ws=false: not)")
	f.StringVar(&cfg.WSAddr, "ws-addr", "", "serve MQTT over WebSocket on this address instead of the HTTPS listener")
	f.StringVar(&cfg.FilesDir, "files", "", "serve this directory read-only at https://HOST/files/ (firmware images)")
	f.StringVar(&cfg.TLSCertFile, "tls-cert", "", "server certificate (PEM) to use instead of the hub's own CA-signed one")
	f.StringVar(&cfg.TLSKeyFile, "tls-key", "", "private key (PEM) of --tls-cert")
	f.DurationVar(&cfg.ConnectTimeout, "connect-timeout", hub.DefaultConnectTimeout, "close a connection that has not finished its TLS handshake and CONNECT (or WebSocket upgrade, or HTTPS request headers) within this time")
	f.IntVar(&cfg.MaxPreAuthConns, "max-preauth-conns", hub.DefaultMaxPreAuthConns, "most connections that have not authenticated yet; more are closed at once")
	f.IntVar(&cfg.MaxPreAuthConnsPerIP, "max-preauth-conns-per-ip", hub.DefaultMaxPreAuthConnsPerIP, "most connections from one IP address that have not authenticated yet; more are closed at once")
	f.Float64Var(&cfg.TwinWriteRate, "twin-write-rate", DefaultTwinWriteRate, "service-side twin writes (PATCH/PUT /twins, jobs' twin updates) per second before the hub answers 429 ThrottlingException, as an S1 unit does; 0: no throttle")
	f.StringVar(&statsFile, "twin-write-stats", "", "rewrite this file every second with the twin-write counters as JSON (writes, throttled, peakPerSecond, limit, elapsedSeconds), and once more when the hub stops: for benchmarks")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFmt, "log-format", "auto", "log format: auto, console, json, journal")
	return cmd
}

// DefaultTwinWriteRate is gwhub's throttle of service-side twin writes:
// IoT Hub's twin-update throttle for one S1 unit (50/s), so a tool that
// does not pace its writes or honour 429 meets that here first, not in
// production. The library default (hub.Config) is no throttle, for tests.
const DefaultTwinWriteRate = 50

// bannerDevice is the device the banner's commands register and run.
const bannerDevice = "gw-01"

// printBanner tells a person where the hub listens and how to use it: the
// commands it prints work as printed, pasted into a shell on this machine.
func printBanner(w io.Writer, h *hub.Hub, cfg hub.Config) {
	host := h.HostName()
	_, mport, _ := net.SplitHostPort(h.MQTTAddr())
	_, hport, _ := net.SplitHostPort(h.HTTPSAddr())
	p := func(format string, args ...any) { _, _ = fmt.Fprintf(w, format+"\n", args...) }
	p("gwhub is running (host name %s)", host)
	p("  MQTT over TLS:        mqtts://%s:%s  (listening on %s)", host, mport, h.MQTTAddr())
	p("  service REST API:     https://%s:%s  (listening on %s)", host, hport, h.HTTPSAddr())
	if u := h.WebSocketURL(); u != "" {
		wsPort := hport
		if cfg.WSAddr != "" {
			if _, port, err := net.SplitHostPort(strings.TrimSuffix(strings.TrimPrefix(u, "wss://"), hub.WebSocketPath)); err == nil {
				wsPort = port
			}
		}
		p("  MQTT over WebSocket:  wss://%s:%s%s", host, wsPort, hub.WebSocketPath)
	}
	if cfg.FilesDir != "" {
		abs, _ := filepath.Abs(cfg.FilesDir)
		p("  files:                https://%s:%s/files/  (serving %s)", host, hport, abs)
	}
	ca := absPath(h.CAFile())
	if ca != "" {
		p("  CA certificate:       %s  (clients must trust it, e.g. NODE_EXTRA_CA_CERTS=%s)", ca, ca)
	}
	csFile := absPath(h.ServiceConnectionStringFile())
	p("  service connection string: %s", csFile)
	// DPS shares the hub's host name and ports (hub/dps.go): devices use
	// provisioningHost = the hub's host name.
	p("  DPS (same host and ports): id scope %s, provisioningHost %s", h.IDScope(), host)
	p("  DPS service connection string: %s", absPath(h.DPSConnectionStringFile()))

	// gwctl and the agent reach the hub by its host name on 443 and 8883
	// unless told otherwise; TLS checks the name in the URL (gwctl) or the
	// hub's host name (the agent).
	ownCert := ca == ""
	gwctlFlags := fmt.Sprintf(`--connection-string "$(cat %s)"`, shellQuote(csFile))
	if !ownCert {
		gwctlFlags += " --ca-file " + shellQuote(ca)
	}
	if a := endpointAddr(h.HTTPSAddr(), host, ownCert); a != "" {
		gwctlFlags += " --endpoint https://" + a
	}
	agentFlags := ""
	if !ownCert {
		agentFlags += " --ca-file " + shellQuote(ca)
	}
	if a := hubAddress(h.MQTTAddr(), host); a != "" {
		agentFlags += " --hub-address " + a
	}
	// The agent falls back to MQTT over WebSocket when 8883 is blocked
	// (hub.transport auto): tell it where that listens too.
	if u := h.WebSocketURL(); u != "" {
		if a := webSocketAddress(strings.TrimSuffix(strings.TrimPrefix(u, "wss://"), hub.WebSocketPath), host); a != "" {
			agentFlags += " --hub-ws-address " + a
		}
	}
	csOut := bannerDevice + ".connection-string"
	// umask: the file holds the device key; set -C: pasted again, the
	// line must not empty the file of a device registered before.
	p("Register a device, its connection string into ./%s:", csOut)
	p("  (umask 077; set -C; gwctl %s device add %s >%s)", gwctlFlags, bannerDevice, csOut)
	p("Run an agent as %s on this machine (simulated installer, state in ./%s.state):", bannerDevice, bannerDevice)
	p("  gwagent run --connection-string-file %s%s --state-dir %s.state --installer simulated", csOut, agentFlags, bannerDevice)
	p("Call it (gwctl takes the same flags for every command):")
	p(`  gwctl %s method invoke %s firmwareUpdate --payload '{"fwPackageUri":"test.com"}'`, gwctlFlags, bannerDevice)
	p("Stop with Ctrl-C.")
}

// endpointAddr is the host[:port] gwctl on this machine should be given as
// --endpoint for the REST listener bound to addr, or "" when its default,
// https://{host name}, reaches it. gwctl checks the certificate against the
// URL's host: the hub's own certificate names 127.0.0.1 and ::1 besides the
// host name; one given with --tls-cert is trusted to name the host name only.
func endpointAddr(addr, hostName string, ownCert bool) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	loop, ok := loopback(addr)
	switch {
	case ownCert || !ok:
		if port == "443" {
			return ""
		}
		return net.JoinHostPort(hostName, port)
	case port == "443" && hostName == hub.DefaultHostName:
		return ""
	case port == "443" && strings.Contains(loop, ":"):
		return "[" + loop + "]"
	case port == "443":
		return loop
	}
	return net.JoinHostPort(loop, port)
}

// hubAddress is the host:port the agent on this machine should be given as
// --hub-address for the MQTT listener bound to addr, or "" when its default,
// {host name}:8883, reaches it. The agent checks the certificate against the
// host name whatever the address.
func hubAddress(addr, hostName string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	loop, ok := loopback(addr)
	switch {
	case !ok:
		return addr // a listener on one address: that address
	case port == "8883" && hostName == hub.DefaultHostName:
		return ""
	}
	return net.JoinHostPort(loop, port)
}

// webSocketAddress is the host:port the agent on this machine should be
// given as --hub-ws-address for the WebSocket listener bound to addr, or ""
// when its default, {host name}:443, reaches it.
func webSocketAddress(addr, hostName string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	loop, ok := loopback(addr)
	switch {
	case !ok:
		return addr
	case port == "443" && hostName == hub.DefaultHostName:
		return ""
	}
	return net.JoinHostPort(loop, port)
}

// loopback is the loopback address that reaches a listener bound to addr,
// if one does (a wildcard or loopback listener).
func loopback(addr string) (string, bool) {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", false
	}
	if h == "" {
		return "127.0.0.1", true
	}
	ip := net.ParseIP(h)
	switch {
	case ip == nil:
		return "", false
	case ip.IsLoopback() && ip.To4() == nil:
		return "::1", true
	case ip.IsLoopback() || ip.IsUnspecified():
		return "127.0.0.1", true
	}
	return "", false
}

func absPath(p string) string {
	if p == "" {
		return ""
	}
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// shellQuote quotes s for a POSIX shell when it holds anything but the
// characters of ordinary paths.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:@%+=,") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
