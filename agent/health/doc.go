// Package health decides whether a trial boot is healthy enough to commit:
// the verdict the firmware state machine waits for in the committing phase
// (firmware.Config.HealthCheck).
//
// A trial boot passes when, within one time budget (update.healthTimeout),
// the hub session is back, the reported patches queued since the start were
// acknowledged by the hub, systemd reports the system running (or degraded,
// when the policy allows it) and every configured unit is active. A person at
// the device can cut the wait short with an operator verdict (gwagent commit
// or gwagent rollback through the agent's local control socket).
//
// It owns the policy and the waiting (bounded, with backoff between systemd
// probes). It must not commit, roll back or reboot anything itself: it only
// returns nil or an error, and the state machine acts on it. systemd is
// reached through the small Systemd seam (systemctl by default), so tests run
// without systemd as PID 1.
package health
