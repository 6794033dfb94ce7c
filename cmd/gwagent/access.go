package main

import (
	"bufio"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
)

// newAccessCmd is `gwagent access`: what the agent's unprivileged user must
// be able to open, for the unit's start-up step that grants it as root.
func newAccessCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "access",
		Short: "List what the agent's user must be able to open (used by the unit's start-up step)",
		Long: `List, one per line, what the agent's own user needs for this configuration:

  read PATH    a secret the configuration names (connection string file, hub CA,
               client certificate and key, DPS key or group key file)
  write PATH   the inactive A/B slot and the bootloader environment
  deny PATH    the running slot (both slots when the running one cannot be told)
  lock PATH    the lock file of fw_printenv/fw_setenv
  state DIR    the state directory
  note TEXT    what is not granted and why

The running slot is told as the abpart installer tells it (abpart.runningSlot,
else the kernel command line), so after a committed update the other slot is
listed. It opens no slot and writes nothing. gwagent.service runs it as root
before each start (ExecStartPre=+/usr/libexec/gwagent/grant-access), which
grants exactly this to the user gwagent.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(config.Options{Flags: cmd.Flags(), Backends: installer.Specs()})
			if err != nil {
				return err
			}
			a, err := installer.NeededAccess(cfg.Installer)
			if err != nil {
				return err
			}
			w := bufio.NewWriter(cmd.OutOrStdout())
			line := func(kind, v string) {
				switch {
				case v == "":
				case strings.Contains(v, "\n") && kind != "note":
					// A newline would start an entry of its own.
					fmt.Fprintf(w, "note %s %q not granted: it holds a newline\n", kind, v)
				default:
					fmt.Fprintf(w, "%s %s\n", kind, strings.ReplaceAll(v, "\n", " "))
				}
			}
			for _, f := range []string{cfg.Hub.ConnectionStringFile, cfg.Hub.CAFile, cfg.Hub.X509.CertFile, cfg.Hub.X509.KeyFile, cfg.Provisioning.KeyFile,
				cfg.Provisioning.X509.CertFile, cfg.Provisioning.X509.KeyFile} {
				line("read", f)
			}
			for _, p := range a.Write {
				line("write", p)
			}
			for _, p := range a.Deny {
				line("deny", p)
			}
			line("lock", a.Lock)
			line("state", cfg.StateDir)
			for _, n := range a.Notes {
				line("note", n)
			}
			return w.Flush()
		},
	}
	config.RegisterFlags(cmd.Flags())
	return cmd
}
