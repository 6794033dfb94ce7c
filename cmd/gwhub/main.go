package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/logging"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gwhub:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := &cobra.Command{
		Use:           "gwhub",
		Short:         "A local Azure IoT hub: MQTT device protocol, twins, direct methods and the service REST API",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(runCommand())
	return root.ExecuteContext(ctx)
}

func runCommand() *cobra.Command {
	var (
		cfg      hub.Config
		logLevel string
		logFmt   string
	)
	cmd := &cobra.Command{
		Use:   "run --state-dir DIR",
		Short: "Start the hub and serve until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.StateDir == "" {
				return errors.New("--state-dir is required")
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
			<-ctx.Done()
			log.Info("stopping", zap.String("reason", context.Cause(ctx).Error()))
			return h.Close()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.StateDir, "state-dir", "", "directory for the registry, twins, CA and service connection string (created if missing)")
	f.StringVar(&cfg.MQTTAddr, "mqtt-addr", hub.DefaultMQTTAddr, "MQTT over TLS listen address")
	f.StringVar(&cfg.HTTPSAddr, "https-addr", hub.DefaultHTTPSAddr, "service REST API (HTTPS) listen address")
	f.StringVar(&cfg.HostName, "hostname", hub.DefaultHostName, "the hub's host name: in connection strings, SAS tokens, MQTT usernames and the server certificate")
	f.BoolVar(&cfg.WebSocket, "ws", false, "also serve MQTT over WebSocket at "+hub.WebSocketPath)
	f.StringVar(&cfg.WSAddr, "ws-addr", "", "serve MQTT over WebSocket on this address instead of the HTTPS listener (with --ws)")
	f.StringVar(&cfg.FilesDir, "files", "", "serve this directory read-only at https://HOST/files/ (firmware images)")
	f.StringVar(&cfg.TLSCertFile, "tls-cert", "", "server certificate (PEM) to use instead of the hub's own CA-signed one")
	f.StringVar(&cfg.TLSKeyFile, "tls-key", "", "private key (PEM) of --tls-cert")
	f.DurationVar(&cfg.ConnectTimeout, "connect-timeout", hub.DefaultConnectTimeout, "close a connection that has not finished its TLS handshake and CONNECT (or WebSocket upgrade, or HTTPS request headers) within this time")
	f.IntVar(&cfg.MaxPreAuthConns, "max-preauth-conns", hub.DefaultMaxPreAuthConns, "most connections that have not authenticated yet; more are closed at once")
	f.IntVar(&cfg.MaxPreAuthConnsPerIP, "max-preauth-conns-per-ip", hub.DefaultMaxPreAuthConnsPerIP, "most connections from one IP address that have not authenticated yet; more are closed at once")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&logFmt, "log-format", "auto", "log format: auto, console, json, journal")
	return cmd
}

// printBanner tells a person where the hub listens and how to use it.
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
	if ca := h.CAFile(); ca != "" {
		p("  CA certificate:       %s  (clients must trust it, e.g. NODE_EXTRA_CA_CERTS=%s)", ca, ca)
	}
	p("  service connection string: %s", h.ServiceConnectionStringFile())
	p("Register a device and print its connection string:")
	p("  gwctl --connection-string \"$(cat %s)\" device add DEVICE_ID", h.ServiceConnectionStringFile())
	p("Stop with Ctrl-C.")
}
