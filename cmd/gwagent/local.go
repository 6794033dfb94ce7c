package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/agent/local"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/abpart"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Local control: status reads the persisted state directly (the state
// files are replaced atomically, so reading them while the daemon runs is
// safe) and the bootloader environment through its read path; it builds
// none of the daemon's objects and writes nothing, and asks the running
// daemon, if any, only how its hub connection is. Commit and rollback only
// ever go through the running daemon's control socket, so the daemon's
// state machine stays the one writer of the update record and the
// bootloader environment. None of them needs the device's connection
// string.

// pingTimeout bounds asking the daemon.
const pingTimeout = 3 * time.Second

// inspectTimeout bounds reading the slots and the bootloader environment
// (a bootloader tool stuck on a lock).
const inspectTimeout = 30 * time.Second

func loadLocalConfig(cmd *cobra.Command) (*config.Config, error) {
	return config.Load(config.Options{Flags: cmd.Flags(), Backends: installer.Specs(), Local: true})
}

// statusReport is `gwagent status -o json`; the field names are stable.
type statusReport struct {
	Agent struct {
		Running bool   `json:"running"`
		PID     int    `json:"pid,omitempty"`
		Socket  string `json:"socket"`
		// Hub is the running agent's session with its hub.
		Hub *local.Hub `json:"hub,omitempty"`
		// Installer is the running agent's installer, which differs from
		// the top-level one (the configuration's) until a restart.
		Installer string `json:"installer,omitempty"`
		// Error says why the agent could not be asked (other than not
		// running: then Running is false and Error empty).
		Error string `json:"error,omitempty"`
	} `json:"agent"`
	StateDir         string                `json:"stateDir"`
	Installer        string                `json:"installer"`
	RunningVersion   string                `json:"runningVersion,omitempty"`
	CommittedVersion string                `json:"committedVersion,omitempty"`
	RunningSlot      string                `json:"runningSlot,omitempty"`
	CommittedSlot    string                `json:"committedSlot,omitempty"`
	TrialSlot        string                `json:"trialSlot,omitempty"`
	Update           updateReport          `json:"update"`
	LastResult       string                `json:"lastResult"`
	Slots            []abpart.SlotStatus   `json:"slots,omitempty"`
	Bootloader       *bootenv.State        `json:"bootloader,omitempty"`
	SlotError        string                `json:"slotError,omitempty"`
	InstallerError   string                `json:"installerError,omitempty"`
	RecordError      string                `json:"recordError,omitempty"`
	Error            *firmware.UpdateError `json:"error,omitempty"`
}

type updateReport struct {
	ID            string `json:"id,omitempty"`
	Phase         string `json:"phase"`
	Busy          bool   `json:"busy"`
	TargetVersion string `json:"targetVersion,omitempty"`
	Slot          string `json:"slot,omitempty"`
	Bytes         int64  `json:"bytes,omitempty"`
	Total         int64  `json:"total,omitempty"`
}

func newStatusCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the slots, versions, the current or last update and the hub connection",
		Long: `Show what the agent knows about the device: the running and committed slot and
version, the update in progress (id, phase) or the last one's result, and for
the abpart installer the slots and the bootloader variables. It reads the
persisted state in stateDir and the bootloader environment and writes
nothing, so it works the same whether the daemon runs or not, and needs no
connection string. When the daemon runs, it also shows the daemon's hub
connection (asked over stateDir/` + local.SocketName + `, root only).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("-o %q: want text or json", output)
			}
			cfg, err := loadLocalConfig(cmd)
			if err != nil {
				return err
			}
			r, err := collectStatus(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(r)
			}
			return printStatus(cmd.OutOrStdout(), r, time.Now())
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	config.RegisterFlags(cmd.Flags())
	return cmd
}

func collectStatus(ctx context.Context, cfg *config.Config) (statusReport, error) {
	r := statusReport{StateDir: cfg.StateDir, Installer: cfg.Installer.Type}
	askAgent(ctx, &r)

	st, err := firmware.ReadStatus(agent.FirmwareStateDir(cfg.StateDir), cfg.CurrentVersion)
	switch {
	case errors.Is(err, firmware.ErrUnknownFormat):
		r.RecordError = err.Error()
	case err != nil:
		return r, fmt.Errorf("read the update state: %w", err)
	}
	p := st.Progress
	r.Update = updateReport{ID: p.UpdateID, Phase: string(p.Phase), Busy: st.Busy, TargetVersion: p.TargetVersion, Slot: p.Slot, Bytes: p.Bytes, Total: p.Total}
	r.Error = p.Err
	r.LastResult = lastResult(st)
	switch _, err := os.Stat(cfg.StateDir); {
	case r.RecordError != "":
		r.LastResult = "unknown (" + r.RecordError + ")"
	case errors.Is(err, fs.ErrNotExist):
		r.LastResult = "none (the agent has not run on this device: " + err.Error() + ")"
	}

	ictx, cancel := context.WithTimeout(ctx, inspectTimeout)
	defer cancel()
	view, err := installer.Inspect(ictx, cfg.Installer, installer.Deps{StateDir: cfg.StateDir})
	switch {
	case errors.Is(err, config.ErrConfig):
		return r, err
	case err != nil && cfg.Installer.Type == "abpart":
		r.SlotError = err.Error()
	case err != nil:
		r.InstallerError = err.Error()
	}
	cur := p.CurrentVersion
	if view.Version != "" {
		cur = view.Version
	}
	r.RunningVersion, r.CommittedVersion = cur, cur
	if s := view.AB; s != nil {
		r.RunningSlot, r.TrialSlot, r.Slots, r.Bootloader = s.Running, s.TrialSlot, s.Slots[:], &s.Env
		for _, sl := range s.Slots {
			if sl.Committed {
				r.CommittedSlot = sl.Name
			}
		}
		// On a trial boot the new version runs but the old one is still
		// the committed one.
		if st.Busy && p.Slot != "" && s.Running == p.Slot && s.TrialSlot == p.Slot && p.TargetVersion != "" {
			r.RunningVersion = p.TargetVersion
		}
	}
	return r, nil
}

// askAgent asks the running agent, if any, how its hub connection is.
func askAgent(ctx context.Context, r *statusReport) {
	r.Agent.Socket = local.Path(r.StateDir)
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	resp, err := local.Call(ctx, r.Agent.Socket, local.Request{Op: local.OpStatus})
	switch {
	case errors.Is(err, local.ErrNotRunning):
	case err != nil:
		// Most often a user other than root: the socket is root only.
		r.Agent.Error = err.Error()
	default:
		// An answer, even a refusal, means the agent runs.
		r.Agent.Running, r.Agent.PID, r.Agent.Hub, r.Agent.Installer = true, resp.PID, resp.Hub, resp.Installer
		if !resp.OK {
			r.Agent.Error = resp.Error
		}
	}
}

func lastResult(st firmware.Status) string {
	p := st.Progress
	switch {
	case p.UpdateID == "":
		return "none (no update has run)"
	case st.Busy && p.Phase == firmware.PhaseCommitting:
		return "in progress: trial boot, waiting for the health verdict (gwagent commit or gwagent rollback decide now)"
	case st.Busy:
		return "in progress: " + string(p.Phase)
	case p.Phase == firmware.PhaseCompleted:
		return "completed"
	case p.Err != nil:
		return fmt.Sprintf("%s: %s: %s", p.Phase, p.Err.Code, p.Err.Message)
	}
	return string(p.Phase)
}

func printStatus(w io.Writer, r statusReport, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	a := r.Agent
	agentLine := "stopped (no answer on " + a.Socket + ")"
	switch {
	case a.Running && a.PID != 0:
		agentLine = fmt.Sprintf("running (pid %d)", a.PID)
	case a.Running:
		agentLine = "running"
	case a.Error != "":
		agentLine = "unknown (" + a.Error + ")"
	}
	fmt.Fprintf(tw, "agent:\t%s\n", agentLine)
	switch h := a.Hub; {
	case h != nil:
		line := h.State
		if d := now.Sub(h.Since).Round(time.Second); !h.Since.IsZero() && d > 0 {
			line += fmt.Sprintf(" (for %s)", d)
		}
		fmt.Fprintf(tw, "hub:\t%s\n", line)
		if !h.Connected && h.LastError != "" {
			fmt.Fprintf(tw, "last hub error:\t%s\n", h.LastError)
		}
	case a.Running && a.Error != "":
		fmt.Fprintf(tw, "hub:\tunknown (%s)\n", a.Error)
	}
	fmt.Fprintf(tw, "installer:\t%s\n", installerText(r))
	fmt.Fprintf(tw, "running version:\t%s\n", orDash(r.RunningVersion))
	fmt.Fprintf(tw, "committed version:\t%s\n", orDash(r.CommittedVersion))
	if r.RunningSlot != "" {
		fmt.Fprintf(tw, "running slot:\t%s\n", r.RunningSlot)
		fmt.Fprintf(tw, "committed slot:\t%s\n", orDash(r.CommittedSlot))
		if r.TrialSlot != "" {
			fmt.Fprintf(tw, "trial slot:\t%s\n", r.TrialSlot)
		}
	}
	u := r.Update
	fmt.Fprintf(tw, "update:\t%s\n", orDash(u.ID))
	fmt.Fprintf(tw, "phase:\t%s\n", u.Phase)
	if u.TargetVersion != "" {
		fmt.Fprintf(tw, "target version:\t%s\n", u.TargetVersion)
	}
	if u.Busy && u.Total > 0 {
		fmt.Fprintf(tw, "downloaded:\t%d of %d bytes (as last persisted)\n", u.Bytes, u.Total)
	}
	fmt.Fprintf(tw, "last result:\t%s\n", r.LastResult)
	if r.SlotError != "" {
		fmt.Fprintf(tw, "slots:\tunknown: %s\n", r.SlotError)
	}
	if r.InstallerError != "" {
		fmt.Fprintf(tw, "installer state:\tunknown: %s\n", r.InstallerError)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.Slots) > 0 {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SLOT\tPATH\tBYTES\tSTATE")
		for _, s := range r.Slots {
			var flags []string
			if s.Running {
				flags = append(flags, "running")
			}
			if s.Committed {
				flags = append(flags, "committed")
			}
			if s.Name == r.TrialSlot {
				flags = append(flags, "trial")
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", s.Name, s.Path, s.Capacity, orDash(strings.Join(flags, ",")))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if b := r.Bootloader; b != nil {
		_, err := fmt.Fprintf(w, "bootloader: %s=%s %s=%t %s=%d %s=%d\n", bootenv.VarSlot, orDash(b.Slot),
			bootenv.VarUpgradeAvailable, b.UpgradeAvailable, bootenv.VarBootCount, b.BootCount, bootenv.VarBootLimit, b.BootLimit)
		return err
	}
	return nil
}

// installerText names the configured installer, says when it writes
// nothing, and when the running agent still uses another one.
func installerText(r statusReport) string {
	s := r.Installer
	if s == "simulated" {
		s += " (writes nothing to the device: for demos and labs)"
	}
	if a := r.Agent.Installer; a != "" && a != r.Installer {
		s += fmt.Sprintf("; the running agent uses %s until it is restarted", a)
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// notRunningHelp explains why commit and rollback need the daemon.
const notRunningHelp = `commit and rollback go through the running agent so that its update record stays the only truth; start it (systemctl start gwagent) and run this again.
While it is stopped the bootloader decides: each boot of a trial slot uses one of its bootlimit attempts, then the previous slot boots again`

func newVerdictCmd(op string) *cobra.Command {
	var wait time.Duration
	short := map[string]string{
		local.OpCommit:   "Commit the running trial boot now (skip the rest of the health check)",
		local.OpRollback: "Roll the running trial boot back now (the previous slot boots again)",
	}[op]
	cmd := &cobra.Command{
		Use:   op,
		Short: short,
		Long: short + `.

A trial boot is the committing phase of an update with an installer that
commits (abpart): the agent waits up to update.healthTimeout for its health
verdict. This command gives the verdict in its place, through the running
agent's control socket (stateDir/` + local.SocketName + `, root only), and waits
up to --wait for the agent to act on it. The simulated installer has no
trial boot. With the agent stopped nothing is changed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadLocalConfig(cmd)
			if err != nil {
				return err
			}
			return runVerdict(cmd.Context(), cmd.OutOrStdout(), local.Path(cfg.StateDir), op, wait, persistedPhase(cfg))
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", time.Minute, "how long to wait for the outcome (0: do not wait)")
	config.RegisterFlags(cmd.Flags())
	return cmd
}

// persistedPhase reads the update's phase from the persisted record: the
// state machine writes each phase before acting on it, so the record shows
// a rollback before the reboot that finishes it. Each call reads one file.
func persistedPhase(cfg *config.Config) func() (id, phase string, err error) {
	dir := agent.FirmwareStateDir(cfg.StateDir)
	return func() (string, string, error) {
		st, err := firmware.ReadStatus(dir, "")
		return st.UpdateID, string(st.Phase), err
	}
}

// runVerdict sends the verdict, then follows the persisted update until it
// leaves the committing phase.
func runVerdict(ctx context.Context, out io.Writer, sock, op string, wait time.Duration, phase func() (string, string, error)) error {
	resp, err := local.Call(ctx, sock, local.Request{Op: op})
	if errors.Is(err, local.ErrNotRunning) {
		return fmt.Errorf("%w.\n%s", err, notRunningHelp)
	}
	if err != nil {
		return err
	}
	if !resp.OK {
		return fmt.Errorf("%s refused: %s", op, resp.Error)
	}
	fmt.Fprintln(out, resp.Message)
	if wait <= 0 {
		return nil
	}
	id := resp.UpdateID
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	t := time.NewTicker(200 * time.Millisecond) // polling a local socket, not retrying a failure
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("update %s still %s after %s; see gwagent status", id, firmware.PhaseCommitting, wait)
		case <-t.C:
		}
		pid, ph, err := phase()
		if err != nil || pid != id || ph == string(firmware.PhaseCommitting) {
			continue
		}
		fmt.Fprintf(out, "update %s: %s\n", id, ph)
		if op == local.OpCommit && ph != string(firmware.PhaseCompleted) {
			return fmt.Errorf("update %s ended %s, not completed; see gwagent status", id, ph)
		}
		if op == local.OpRollback {
			fmt.Fprintln(out, "the previous slot boots next; the agent reboots the device to finish the rollback")
		}
		return nil
	}
}
