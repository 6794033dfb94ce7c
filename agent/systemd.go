package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/session"
	"github.com/gwagent/gwagent/firmware"
)

const (
	notifyReady    = daemon.SdNotifyReady
	notifyStopping = daemon.SdNotifyStopping
	notifyWatchdog = daemon.SdNotifyWatchdog
)

// Notifier is the service manager's notification channel.
type Notifier interface {
	// Notify sends one state line ("READY=1", "STATUS=…"). Not running
	// under a service manager is not an error.
	Notify(state string) error
	// WatchdogInterval is the service manager's watchdog timeout; zero
	// when there is no watchdog.
	WatchdogInterval() time.Duration
}

// Systemd notifies systemd through $NOTIFY_SOCKET (sd_notify); without the
// variable it does nothing.
type Systemd struct{}

// Notify implements Notifier.
func (Systemd) Notify(state string) error {
	_, err := daemon.SdNotify(false, state)
	return err
}

// WatchdogInterval implements Notifier ($WATCHDOG_USEC for this process).
func (Systemd) WatchdogInterval() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0
	}
	return d
}

func (a *Agent) notify(state string) {
	if err := a.notifier.Notify(state); err != nil {
		a.log.Debug("service manager notification failed", zap.String("state", state), zap.Error(err))
	}
}

func (a *Agent) kickStatus() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// statusLoop keeps STATUS= in step with the session and the update.
func (a *Agent) statusLoop(ctx context.Context) {
	last := ""
	for {
		if s := a.StatusLine(); s != last {
			a.notify("STATUS=" + s)
			last = s
		}
		select {
		case <-ctx.Done():
			return
		case p := <-a.probeStatus:
			close(p)
		case <-a.session.Changed():
		case <-a.kick:
		}
	}
}

// StatusLine says what the agent is doing, for systemctl status:
// "connected to HUB; idle; installer abpart", "offline, retrying in 8s;
// downloading 42% of 1.2.0; installer abpart", "…; idle; cannot save
// reported state to DIR: no space left on device; installer abpart".
func (a *Agent) StatusLine() string {
	return hubLine(a.session.Health(), time.Now()) + "; " + updateLine(a.manager.Status()) + a.queueLine() + a.installerLine()
}

// maxCauseLen bounds the hub error on the status line; the journal and
// gwagent status have it whole.
const maxCauseLen = 120

// hubLine is the session's state and, while it is not connected, why the
// last attempt failed ("offline, retrying in 8s (connect to …: connection
// refused)"): a gateway that cannot reach its hub or DPS says why in
// systemctl status.
func hubLine(h session.Health, now time.Time) string {
	line := h.Describe(now)
	if h.Connected || h.LastError == "" {
		return line
	}
	cause := h.LastError
	if len(cause) > maxCauseLen {
		cause = strings.ToValidUTF8(cause[:maxCauseLen], "") + "…"
	}
	return line + " (" + cause + ")"
}

// installerLine names the installer in use, so that a gateway running the
// simulated one (which writes nothing) shows it in systemctl status.
func (a *Agent) installerLine() string {
	if t := a.installerType; t != "simulated" {
		return "; installer " + t
	}
	return "; installer simulated (writes nothing to the device)"
}

// updateStage is the update's stage for the status line (updateLine).
func updateStage(st firmware.Status) string {
	if !st.Busy {
		return "idle"
	}
	p := st.Progress
	what := p.TargetVersion
	if what == "" {
		what = "update " + p.UpdateID
		if len(p.UpdateID) > 8 {
			what = "update " + p.UpdateID[:8]
		}
	}
	switch p.Phase {
	case firmware.PhaseAccepted:
		return "update to " + what + " accepted"
	case firmware.PhaseDownloading:
		if p.Percent >= 0 {
			return fmt.Sprintf("downloading %d%% of %s", p.Percent, what)
		}
		return fmt.Sprintf("downloading %s (%s)", what, bytesText(p.Bytes))
	case firmware.PhaseWaitingForWindow:
		if p.Window != nil && !p.Window.OpensAt.IsZero() {
			return fmt.Sprintf("%s waits for its maintenance window, opening %s", what, p.Window.OpensAt.UTC().Format("2006-01-02 15:04 UTC"))
		}
		return what + " waits for its maintenance window"
	case firmware.PhaseRebooting:
		return "rebooting into " + what
	}
	return string(p.Phase) + " " + what
}

func bytesText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// watchdog pings the service manager at half its timeout, but only while
// the health check passes: a wedged loop stops the pings and the service
// manager restarts the agent.
func (a *Agent) watchdog(ctx context.Context) {
	interval := a.notifier.WatchdogInterval()
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	a.log.Debug("watchdog enabled", zap.Duration("interval", interval))
	for {
		if err := a.Healthy(ctx, interval/4); err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Error("health check failed: not feeding the watchdog", zap.Error(err))
		} else {
			a.notify(notifyWatchdog)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Healthy checks, within d, that the agent's loops answer: the session's
// connection loop and desired worker, the status and reboot loops, the
// firmware state machine and the queue.
func (a *Agent) Healthy(ctx context.Context, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := a.session.Probe(ctx); err != nil {
		return err
	}
	for name, ch := range map[string]chan chan struct{}{"status loop": a.probeStatus, "reboot worker": a.probeReboot} {
		if err := probe(ctx, ch); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	if !a.managerAlive.Load() {
		return errors.New("firmware state machine stopped")
	}
	// Status and Len take the locks their loops hold: a loop stuck with
	// its lock held makes them hang.
	done := make(chan struct{})
	go func() {
		a.manager.Status()
		a.queue.Len()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("firmware state machine or queue not responding: %w", ctx.Err())
	}
	return nil
}

func probe(ctx context.Context, ch chan chan struct{}) error {
	reply := make(chan struct{})
	select {
	case ch <- reply:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-reply:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
