package health

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
)

// System-state policies (update.healthSystemState).
const (
	// PolicyRunning accepts only "running": a failed unit fails the trial.
	PolicyRunning = "running"
	// PolicyDegraded also accepts "degraded" (some unit failed).
	PolicyDegraded = "degraded"
	// PolicyIgnore does not ask systemd about the system state (configured
	// units are still checked).
	PolicyIgnore = "ignore"
)

// Policies lists the accepted update.healthSystemState values.
var Policies = []string{PolicyRunning, PolicyDegraded, PolicyIgnore}

// Errors.
var (
	// ErrUnhealthy is wrapped by every failed verdict.
	ErrUnhealthy = errors.New("health: trial boot not healthy")
	// ErrOperatorRollback is wrapped when a person asked for the rollback.
	ErrOperatorRollback = errors.New("health: rollback requested by the operator")
	// ErrNoTrial is returned by Decide when no health check is waiting
	// for a verdict.
	ErrNoTrial = errors.New("health: no trial boot is waiting for a verdict")
	// ErrPending is returned by Decide when a verdict is already pending.
	ErrPending = errors.New("health: a verdict is already pending")
)

// Systemd is the seam to the service manager.
type Systemd interface {
	// SystemState is the output of `systemctl is-system-running`:
	// initializing, starting, running, degraded, maintenance, stopping,
	// offline or unknown.
	SystemState(ctx context.Context) (string, error)
	// UnitState is the output of `systemctl is-active UNIT`: active,
	// activating, inactive, failed, …
	UnitState(ctx context.Context, unit string) (string, error)
}

// Config configures a Checker.
type Config struct {
	// Timeout bounds one check (update.healthTimeout).
	Timeout time.Duration
	// Online is closed once the hub session has connected.
	Online <-chan struct{}
	// Acked waits until the reported patches queued so far were
	// acknowledged by the hub (twin.Queue.Flush); nil skips that check.
	Acked func(ctx context.Context) error
	// Systemd answers the systemd questions; nil means the agent does not
	// run under systemd and the system and unit checks are skipped (with a
	// warning when units are configured).
	Systemd Systemd
	// SystemState is the policy: PolicyRunning (default), PolicyDegraded or
	// PolicyIgnore.
	SystemState string
	// Units must all be active (update.healthUnits).
	Units []string
	// MinPoll and MaxPoll shape the backoff between systemd probes
	// (defaults 500ms and 10s).
	MinPoll, MaxPoll time.Duration
	Log              *zap.Logger
}

// Verdict is an operator's decision about the running trial boot.
type Verdict struct {
	UpdateID string
	Commit   bool // true: commit now; false: roll back now
}

// Checker runs the health check of a trial boot. Its Check is the
// firmware.Config.HealthCheck; Decide hands it an operator verdict.
type Checker struct {
	cfg Config
	log *zap.Logger

	verdict chan Verdict // cap 1: the pending operator verdict

	mu      sync.Mutex // guards waiting
	waiting string     // update id of the running Check, "" when none
}

// New returns a Checker.
func New(cfg Config) *Checker {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.SystemState == "" {
		cfg.SystemState = PolicyRunning
	}
	if cfg.MinPoll <= 0 {
		cfg.MinPoll = 500 * time.Millisecond
	}
	if cfg.MaxPoll < cfg.MinPoll {
		cfg.MaxPoll = max(10*time.Second, cfg.MinPoll)
	}
	return &Checker{cfg: cfg, log: cfg.Log, verdict: make(chan Verdict, 1)}
}

// Check waits for a healthy trial boot of update id, at most cfg.Timeout.
// It returns nil when every condition holds or an operator committed, and an
// error wrapping ErrUnhealthy (or ErrOperatorRollback) otherwise.
func (c *Checker) Check(ctx context.Context, id string) error {
	c.mu.Lock()
	c.waiting = id
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.waiting = ""
		c.mu.Unlock()
	}()

	cctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	done := make(chan error, 1)
	var last lastState
	go func() { done <- c.conditions(cctx, &last) }()

	log := c.log.With(zap.String("update_id", id))
	for {
		select {
		case err := <-done:
			if err == nil {
				log.Info("trial boot healthy")
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("%w within %s: %s", ErrUnhealthy, c.cfg.Timeout, last.why(err))
		case v := <-c.verdict:
			if v.UpdateID != id {
				log.Warn("ignoring an operator verdict for another update", zap.String("verdict_update_id", v.UpdateID))
				continue
			}
			cancel()
			<-done
			if v.Commit {
				log.Info("operator committed the trial boot")
				return nil
			}
			log.Warn("operator rolled the trial boot back")
			return fmt.Errorf("%w", ErrOperatorRollback)
		}
	}
}

// Decide hands an operator verdict to the running check of v.UpdateID (the
// caller checks Waiting first). A verdict that arrives as that check ends
// stays pending and is ignored by the next check, which is for another
// update.
func (c *Checker) Decide(v Verdict) error {
	select {
	case c.verdict <- v:
		return nil
	default:
		return ErrPending
	}
}

// Waiting returns the update id whose check is running ("" when none).
func (c *Checker) Waiting() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.waiting
}

// lastState remembers what the probes last saw, for the failure message.
type lastState struct {
	mu   sync.Mutex
	step string
}

func (l *lastState) set(s string) {
	l.mu.Lock()
	l.step = s
	l.mu.Unlock()
}

func (l *lastState) why(err error) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.step == "" {
		return err.Error()
	}
	return l.step
}

// conditions waits for each condition in turn, all within ctx.
func (c *Checker) conditions(ctx context.Context, last *lastState) error {
	last.set("the hub session did not come back")
	select {
	case <-c.cfg.Online:
	case <-ctx.Done():
		return ctx.Err()
	}
	if c.cfg.Acked != nil {
		last.set("the hub did not acknowledge the reported properties")
		if err := c.cfg.Acked(ctx); err != nil {
			return err
		}
	}
	if c.cfg.Systemd == nil {
		if len(c.cfg.Units) > 0 {
			c.log.Warn("not running under systemd: update.healthUnits not checked", zap.Strings("units", c.cfg.Units))
		}
		last.set("")
		return nil
	}
	b := retry.NewBackoff(c.cfg.MinPoll, c.cfg.MaxPoll)
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		msg, err := c.probe(ctx)
		if err != nil {
			last.set(msg)
		}
		return struct{}{}, err
	}, backoff.WithBackOff(b), backoff.WithMaxElapsedTime(0))
	if err == nil {
		last.set("")
	}
	return err
}

// probe asks systemd once; a non-nil error means "not yet" and msg says why.
func (c *Checker) probe(ctx context.Context) (msg string, err error) {
	if c.cfg.SystemState != PolicyIgnore {
		st, err := c.cfg.Systemd.SystemState(ctx)
		if err != nil {
			return "systemd did not answer: " + err.Error(), err
		}
		ok := st == "running" || st == "degraded" && c.cfg.SystemState == PolicyDegraded
		if !ok {
			m := fmt.Sprintf("systemd reports the system %q (update.healthSystemState: %s)", st, c.cfg.SystemState)
			return m, errors.New(m)
		}
	}
	var bad []string
	for _, u := range c.cfg.Units {
		st, err := c.cfg.Systemd.UnitState(ctx, u)
		if err != nil {
			st = "unknown: " + err.Error()
		}
		if st != "active" {
			bad = append(bad, u+" is "+st)
		}
	}
	if len(bad) > 0 {
		m := "configured units not active: " + strings.Join(bad, ", ")
		return m, errors.New(m)
	}
	return "", nil
}

// ValidPolicy reports whether p is a known system-state policy.
func ValidPolicy(p string) bool { return slices.Contains(Policies, p) }
