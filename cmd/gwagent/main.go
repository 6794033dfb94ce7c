// Command gwagent is the gateway device agent: a systemd daemon that keeps
// an MQTT session with an IoT hub, answers the firmwareUpdate and reboot
// direct methods, drives the firmware installer and reports progress as
// device-twin reported properties.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/agent/local"
	"github.com/gwagent/gwagent/internal/buildinfo"
	"github.com/gwagent/gwagent/internal/cli"
	"github.com/gwagent/gwagent/internal/logging"
)

// exitConfig is EX_CONFIG from sysexits.h: the unit can stop restarting on
// it (RestartPreventExitStatus=78), since a bad configuration stays bad.
const exitConfig = 78

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gwagent:", err)
		os.Exit(exitCode(err))
	}
}

// exitCode is 78 for a bad configuration, 64 for a mistake in the command
// line (an unknown flag or command) and 1 for anything else.
func exitCode(err error) int {
	switch {
	case errors.Is(err, config.ErrConfig):
		return exitConfig
	case cli.IsUsage(err):
		return cli.ExitUsage
	}
	return 1
}

func run() error {
	return newRootCmd().ExecuteContext(context.Background())
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "gwagent",
		Short: "Device agent for Linux gateways managed through an IoT hub",
		Long: `gwagent keeps a Linux gateway connected to its IoT hub (Azure IoT Hub, IoT Edge
or the local gwhub) over MQTT 3.1.1 and TLS. It answers the firmwareUpdate and
reboot direct methods, drives the configured firmware installer (simulated or
A/B partitions) and reports progress as device-twin reported properties through
a persistent queue, so nothing reported is lost across outages and restarts.

The configuration is read from ` + config.DefaultFile + ` (or --config); every key
can be overridden by an environment variable GWAGENT_<KEY> with dots as
underscores (hub.keepAlive is GWAGENT_HUB_KEEPALIVE) and the common ones by flags.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newRunCmd(), newVersionCmd(), newStatusCmd(), newVerdictCmd(local.OpCommit), newVerdictCmd(local.OpRollback))
	root.AddCommand(newAccessCmd(), newProvisionCmd())
	cli.Setup(root)
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of gwagent",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), "gwagent", buildinfo.Get())
			return err
		},
	}
}

func newRunCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the agent (the daemon; systemd starts it with Type=notify)",
		Long: `Run the agent until SIGINT or SIGTERM. It tells systemd READY=1 as soon as its
state is open (it starts and keeps working while the hub is unreachable),
keeps STATUS= up to date, feeds the watchdog while its health check passes and
stops gracefully, flushing reported properties for up to shutdownTimeout.
SIGHUP reloads log.level and report.*; other changed keys need a restart.
Exit status 78 means the configuration is wrong (the message names the key).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAgent(cmd)
		},
	}
	config.RegisterFlags(cmd.Flags())
	return cmd
}

func runAgent(cmd *cobra.Command) error {
	opts := config.Options{Flags: cmd.Flags(), Backends: installer.Specs()}
	cfg, err := config.Load(opts)
	if err != nil {
		return err
	}
	log, level, err := logging.New(logging.Options{Level: cfg.Log.Level, Format: cfg.Log.Format})
	if err != nil {
		return fmt.Errorf("%w: log: %w", config.ErrConfig, err)
	}
	defer func() { _ = log.Sync() }()
	for _, w := range cfg.Warnings {
		log.Warn(w)
	}
	if cfg.File != "" {
		log.Info("configuration read", zap.String("file", cfg.File))
	}

	ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	a, err := agent.New(agent.Options{Config: cfg, Log: log, Level: level})
	if err != nil {
		return err
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				next, err := config.Load(opts)
				if err != nil {
					log.Error("reload failed; the running configuration stays", zap.Error(err))
					continue
				}
				if _, restart := a.Reload(next); len(restart) > 0 {
					log.Warn("changed keys take effect after a restart", zap.Strings("keys", restart))
				}
			}
		}
	}()
	return a.Run(ctx)
}
