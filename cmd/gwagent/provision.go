package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/agent/provision"
	"github.com/gwagent/gwagent/internal/logging"
)

// provisionReport is `gwagent provision -o json`; it never holds the key.
type provisionReport struct {
	IDScope        string    `json:"idScope"`
	RegistrationID string    `json:"registrationId"`
	AssignedHub    string    `json:"assignedHub"`
	DeviceID       string    `json:"deviceId"`
	Substatus      string    `json:"substatus,omitempty"`
	ProvisionedAt  time.Time `json:"provisionedAt"`
	// Fresh says DPS was asked now; false: the kept assignment.
	Fresh bool `json:"fresh"`
}

func newProvisionCmd() *cobra.Command {
	var force, showRegID bool
	var output string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "provision",
		Short: "Get the gateway's identity from the Device Provisioning Service and print the assignment",
		Long: `Register with the Device Provisioning Service (DPS) configured in the
provisioning section and print the assignment: the hub and the device id
(never the key). A gateway that has an assignment in stateDir prints it without
asking DPS; --force registers again and replaces the kept assignment only once
DPS assigned the gateway, so a failed --force leaves the identity that worked.
A running agent uses a new assignment after a restart (systemctl restart gwagent).

--show-registration-id prints the registration id the gateway registers with
(provisioning.registrationId, or the one derived from /etc/machine-id) and
exits, so that a factory can enroll it (gwctl dps enrollment add ID, or
gwctl dps derive-key for a group). It needs no key and no DPS.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("-o %q: want text or json", output)
			}
			if showRegID {
				return printRegistrationID(cmd)
			}
			return runProvision(cmd, force, output, timeout)
		},
	}
	config.RegisterFlags(cmd.Flags())
	cmd.Flags().BoolVar(&force, "force", false, "register again even if an assignment is kept")
	cmd.Flags().BoolVar(&showRegID, "show-registration-id", false, "print the registration id and exit")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up on DPS after this long")
	cmd.MarkFlagsMutuallyExclusive("force", "show-registration-id")
	return cmd
}

func printRegistrationID(cmd *cobra.Command) error {
	cfg, err := loadLocalConfig(cmd)
	if err != nil {
		return err
	}
	id := cfg.Provisioning.RegistrationID
	if id == "" {
		if id, err = config.DefaultRegistrationID(); err != nil {
			return fmt.Errorf("%w: provisioning.registrationId: not set and none can be derived from the machine id: %w", config.ErrConfig, err)
		}
	}
	_, err = fmt.Fprintln(cmd.OutOrStdout(), id)
	return err
}

func runProvision(cmd *cobra.Command, force bool, output string, timeout time.Duration) error {
	cfg, err := config.Load(config.Options{Flags: cmd.Flags(), Backends: installer.Specs()})
	if err != nil {
		return err
	}
	if cfg.Provisioning.IDScope == "" {
		return fmt.Errorf("%w: provisioning.idScope: not set, so the gateway does not provision through DPS", config.ErrConfig)
	}
	if !cfg.Provisioning.Attested() {
		return fmt.Errorf("%w: hub.connectionString or hub.connectionStringFile is set and takes precedence over provisioning; remove it to provision through DPS", config.ErrConfig)
	}
	log, _, err := logging.New(logging.Options{Level: cfg.Log.Level, Format: cfg.Log.Format})
	if err != nil {
		return fmt.Errorf("%w: log: %w", config.ErrConfig, err)
	}
	defer func() { _ = log.Sync() }()
	for _, w := range cfg.Warnings {
		log.Warn(w)
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	a, fresh, err := agent.Provision(ctx, cfg, log.Named("provision"), force)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (no assignment within --timeout %s)", err, timeout)
		}
		if force {
			if _, ok, _ := provision.Load(cfg.StateDir); ok {
				err = fmt.Errorf("%w; the kept assignment stays", err)
			}
		}
		return err
	}
	if fresh {
		// Run as root for a daemon that runs as its own user: the file
		// goes to the owner of the state folder, as the daemon would have
		// written it.
		if err := chownLikeDir(filepath.Join(cfg.StateDir, provision.AssignmentFile), cfg.StateDir); err != nil {
			log.Warn("assignment kept, but not given to the state folder's owner", zap.Error(err))
		}
	}
	r := provisionReport{IDScope: a.IDScope, RegistrationID: a.RegistrationID, AssignedHub: a.AssignedHub, DeviceID: a.DeviceID,
		Substatus: a.Substatus, ProvisionedAt: a.ProvisionedAt, Fresh: fresh}
	if output == "json" {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	if err := printAssignment(cmd.OutOrStdout(), r); err != nil {
		return err
	}
	if fresh {
		fmt.Fprintln(cmd.ErrOrStderr(), "gwagent: assignment kept in", filepath.Join(cfg.StateDir, provision.AssignmentFile)+"; a running agent uses it after a restart")
	}
	return nil
}

func printAssignment(out io.Writer, r provisionReport) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "assigned hub:\t%s\n", r.AssignedHub)
	fmt.Fprintf(w, "device id:\t%s\n", r.DeviceID)
	fmt.Fprintf(w, "registration id:\t%s (id scope %s)\n", r.RegistrationID, r.IDScope)
	how := "kept from an earlier registration"
	if r.Fresh {
		how = "registered now"
		if r.Substatus != "" {
			how += ", " + r.Substatus
		}
	}
	fmt.Fprintf(w, "provisioned:\t%s (%s)\n", r.ProvisionedAt.Local().Format(time.RFC3339), how)
	return w.Flush()
}

// chownLikeDir gives path to the owner of dir when this process is root
// and dir belongs to someone else.
func chownLikeDir(path, dir string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || sys.Uid == 0 {
		return nil
	}
	return os.Chown(path, int(sys.Uid), int(sys.Gid))
}
